"""ImageNet-style folders: classes, eval/train transforms, 10-crop, corrupt images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.data import (
    CorruptImageError, DataError, DatasetNotFoundError, FolderDataset, load_dataset, ten_crop,
)
from reslab.data.folder import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box


def pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tree(root: Path, corrupt: bool = False) -> dict[str, np.ndarray]:
    """train/{cat,dog}/ and val/{cat,dog}/ of lossless PNGs, 32×40 (H×W)."""
    saved = {}
    for split, per_class in (("train", 3), ("val", 2)):
        for label, name in enumerate(("dog", "cat")):  # created out of order: classes must be sorted
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                arr = pixels(32, 40, seed=100 * label + 10 * k + (split == "val"))
                path = folder / f"{k}.png"
                Image.fromarray(arr).save(path)
                saved[str(path)] = arr
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    if corrupt:
        (root / "train" / "cat" / "1b_broken.jpg").write_bytes(b"this is not a jpeg")
        good = (root / "train" / "cat" / "0.png").read_bytes()
        (root / "train" / "cat" / "1c_truncated.png").write_bytes(good[: len(good) // 2])
    return saved


def test_classes_are_sorted_and_files_listed_per_class(tmp_path):
    make_tree(tmp_path)
    bundle = load_dataset("folder", data_dir=tmp_path, image_size=24, resize=32)
    assert bundle.classes == ("cat", "dog") and bundle.num_classes == 2
    assert [Path(p).relative_to(tmp_path).as_posix() for p, _ in bundle.train.samples] == [
        "train/cat/0.png", "train/cat/1.png", "train/cat/2.png",
        "train/dog/0.png", "train/dog/1.png", "train/dog/2.png",
    ]
    assert [label for _, label in bundle.test.samples] == [0, 0, 1, 1]
    assert bundle.mean == IMAGENET_MEAN and bundle.std == IMAGENET_STD
    assert bundle.image_size == (24, 24) and bundle.in_chans == 3 and not bundle.in_memory
    assert not bundle.augment.enabled  # crop and flip already happen per image


def test_eval_transform_is_resize_then_center_crop(tmp_path):
    saved = make_tree(tmp_path)
    bundle = load_dataset("folder", data_dir=tmp_path, image_size=24, resize=32)
    image, label = bundle.test[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == 0
    # The shorter side is already 32, so the resize keeps the pixels; the crop starts at (4, 8).
    arr = saved[bundle.test.samples[0][0]]
    assert torch.equal(image, torch.from_numpy(arr[4:28, 8:32]).permute(2, 0, 1))


def test_eval_resize_makes_the_shorter_side_the_resize_value(tmp_path):
    make_tree(tmp_path)
    ds = FolderDataset(tmp_path / "val", train=False, image_size=16, resize=16)
    constant = tmp_path / "val" / "cat" / "0.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(constant)
    image, _ = ds[0]
    assert image.shape == (3, 16, 16) and bool((image == 200).all())


def test_ten_crop_view_holds_the_eval_crop_and_the_flips(tmp_path):
    saved = make_tree(tmp_path)
    single = FolderDataset(tmp_path / "val", train=False, image_size=24, resize=32)
    tta = FolderDataset(tmp_path / "val", train=False, image_size=24, resize=32, tta="10crop")
    crops, label = tta[1]
    assert crops.shape == (10, 3, 24, 24) and crops.dtype == torch.uint8 and label == 0
    assert torch.equal(crops[4], single[1][0])
    assert torch.equal(crops[5:], crops[:5].flip(-1))
    full = torch.from_numpy(saved[tta.samples[1][0]]).permute(2, 0, 1)
    assert torch.equal(crops[0], full[:, :24, :24]) and torch.equal(crops[3], full[:, 8:, 16:])
    assert torch.equal(crops, ten_crop(full[None], 24)[0])


def test_train_transform_is_a_seeded_random_crop_and_flip(tmp_path):
    make_tree(tmp_path)
    ds = FolderDataset(tmp_path / "train", train=True, image_size=16)
    torch.manual_seed(0)
    a = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(0)
    b = [ds[i][0] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(1)
    assert not torch.equal(ds[0][0], a[0])


def test_random_resized_crop_boxes_stay_inside_with_the_paper_ranges():
    torch.manual_seed(0)
    for width, height in [(40, 32), (300, 200), (50, 400), (7, 7)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
            if width >= 40:  # big enough that rounding to whole pixels barely moves the ranges
                assert 0.07 <= w * h / (width * height) <= 1.0 and 0.7 <= w / h <= 1.4
    # No sampled box fits a 1×100 image, so it gets the fallback: the largest central crop
    # whose aspect ratio is in 3/4..4/3.
    assert random_resized_crop_box(1, 100) == (0, 49, 1, 1)


def test_corrupt_images_are_skipped_counted_and_replaced_by_the_next(tmp_path):
    make_tree(tmp_path, corrupt=True)
    ds = load_dataset("folder", data_dir=tmp_path, image_size=16, resize=32).test  # eval: deterministic
    train = FolderDataset(tmp_path / "train", train=False, image_size=16, resize=32)
    names = [Path(p).name for p, _ in train.samples]
    assert names[:5] == ["0.png", "1.png", "1b_broken.jpg", "1c_truncated.png", "2.png"]
    with pytest.warns(RuntimeWarning) as record:
        image, label = train[2]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith(f"skipping unreadable image {train.samples[2][0]}: ")
    assert messages[1].startswith(f"skipping unreadable image {train.samples[3][0]}: image file is truncated")
    assert torch.equal(image, train[4][0]) and label == 0
    assert train.corrupt_count == 2
    assert [Path(p).name for p in train.corrupt_paths] == ["1b_broken.jpg", "1c_truncated.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is skipped silently the second time
        assert torch.equal(train[3][0], train[4][0])
    assert ds.corrupt_count == 0


def test_corrupt_count_is_shared_with_dataloader_workers(tmp_path):
    make_tree(tmp_path, corrupt=True)
    train = FolderDataset(tmp_path / "train", train=True, image_size=8)
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = [len(labels) for _, labels in loader]
    assert sizes == [4, 4]  # batches stay full: 8 files, 2 broken, each replaced by the next
    assert train.corrupt_count == 2


def test_stop_policy_raises_naming_the_file(tmp_path):
    make_tree(tmp_path, corrupt=True)
    bundle = load_dataset("folder", data_dir=tmp_path, image_size=16, resize=32, on_corrupt="stop")
    assert bundle.train[1][0].shape == (3, 16, 16)
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*1b_broken.jpg.*on_corrupt='skip'"):
        bundle.train[2]


def test_missing_split_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path / 'val'} not found: --data-dir must be .*val/<class>"):
        load_dataset("folder", data_dir=tmp_path)
    with pytest.raises(DataError, match="needs --data-dir DIR"):
        load_dataset("folder")


def test_evaluation_class_without_training_images_is_an_error(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match="class folders that train/ lacks: zebra"):
        load_dataset("folder", data_dir=tmp_path, image_size=24, resize=32)


@pytest.mark.parametrize("options, message", [
    ({"on_corrupt": "ignore"}, "on_corrupt must be 'skip' or 'stop'"),
    ({"tta": "5crop"}, "tta must be None or '10crop'"),
    ({"image_size": 300}, "need integers 0 < image_size <= resize"),
    ({"val_split": True}, "val_split is for CIFAR"),
])
def test_bad_folder_options_are_explained(tmp_path, options, message):
    make_tree(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset("folder", data_dir=tmp_path, **options)


def test_limits_keep_classes_balanced(tmp_path):
    make_tree(tmp_path)
    bundle = load_dataset("folder", data_dir=tmp_path, image_size=24, resize=32, train_limit=4)
    assert [label for _, label in bundle.train.samples] == [0, 0, 1, 1]
