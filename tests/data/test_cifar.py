"""CIFAR-10/100 readers: both official formats, written here as tiny files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data import DataError, DatasetNotFoundError, load_dataset
from reslab.data import cifar

REAL_CIFAR = Path("/work/shared/data/cifar-10-batches-bin")


def records(n: int, seed: int) -> np.ndarray:
    """n random images as CIFAR stores them: (n, 3072) bytes, R plane, G plane, B plane."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10_python(folder: Path, per_batch: int = 2, bytes_keys: bool = True) -> dict:
    """data_batch_1..5 + test_batch; returns the written arrays for comparison."""
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)  # Python 2 pickles have bytes keys
    written = {"train": [], "train_labels": [], "test": None, "test_labels": None}
    for i in range(1, 6):
        data, labels = records(per_batch, i), [(i + j) % 10 for j in range(per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels, key("batch_label"): b"x"}, f, protocol=2)
        written["train"].append(data)
        written["train_labels"] += labels
    data, labels = records(3, 99), [7, 0, 9]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({key("data"): data, key("labels"): labels}, f, protocol=2)
    written["train"] = np.concatenate(written["train"])
    written["test"], written["test_labels"] = data, labels
    return written


def write_cifar10_bin(folder: Path, per_batch: int = 2) -> dict:
    folder.mkdir(parents=True)
    train, train_labels = [], []
    for i in range(1, 6):
        data, labels = records(per_batch, 10 + i), np.array([(3 * i + j) % 10 for j in range(per_batch)], np.uint8)
        (folder / f"data_batch_{i}.bin").write_bytes(np.hstack([labels[:, None], data]).tobytes())
        train.append(data)
        train_labels += labels.tolist()
    data, labels = records(4, 77), np.array([1, 2, 3, 4], np.uint8)
    (folder / "test_batch.bin").write_bytes(np.hstack([labels[:, None], data]).tobytes())
    return {"train": np.concatenate(train), "train_labels": train_labels, "test": data, "test_labels": labels.tolist()}


def test_binary_format_keeps_every_pixel_in_chw_order(tmp_path):
    written = write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    bundle = load_dataset("cifar10", data_dir=tmp_path)
    images = bundle.train.images
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    raw = written["train"]
    # Record 3: R at byte y*32+x, G at 1024 + y*32+x, B at 2048 + y*32+x.
    assert images[3, 0, 5, 7] == raw[3, 5 * 32 + 7]
    assert images[3, 1, 5, 7] == raw[3, 1024 + 5 * 32 + 7]
    assert images[3, 2, 31, 0] == raw[3, 2048 + 31 * 32]
    assert torch.equal(images, torch.from_numpy(raw).reshape(10, 3, 32, 32))
    assert bundle.train.labels.tolist() == written["train_labels"]
    assert torch.equal(bundle.test.images, torch.from_numpy(written["test"]).reshape(4, 3, 32, 32))
    assert bundle.test.labels.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_python_format_round_trips_with_python2_and_python3_keys(tmp_path, bytes_keys):
    written = write_cifar10_python(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    bundle = load_dataset("cifar10", data_dir=tmp_path)
    assert torch.equal(bundle.train.images, torch.from_numpy(written["train"]).reshape(-1, 3, 32, 32))
    assert bundle.train.labels.tolist() == written["train_labels"]
    assert bundle.test.labels.tolist() == [7, 0, 9]
    assert bundle.classes == cifar.CIFAR10_CLASSES and bundle.num_classes == 10


def test_data_dir_may_be_the_folder_itself(tmp_path):
    write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    a = load_dataset("cifar10", data_dir=tmp_path)
    b = load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-bin")
    assert torch.equal(a.train.images, b.train.images)


def test_python_format_is_preferred_when_both_are_present(tmp_path):
    py = write_cifar10_python(tmp_path / "cifar-10-batches-py")
    write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    bundle = load_dataset("cifar10", data_dir=tmp_path)
    assert bundle.train.labels.tolist() == py["train_labels"]


def test_cifar100_uses_fine_labels_in_both_formats(tmp_path):
    data = records(3, 5)
    fine, coarse = [99, 0, 42], [19, 4, 7]
    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    for split in ("train", "test"):
        with open(py / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f, protocol=2)
    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    rows = np.hstack([np.array(coarse, np.uint8)[:, None], np.array(fine, np.uint8)[:, None], data])
    for split in ("train.bin", "test.bin"):
        (binary / split).write_bytes(rows.tobytes())
    for root in (tmp_path / "py", tmp_path / "bin"):
        bundle = load_dataset("cifar100", data_dir=root)
        assert bundle.train.labels.tolist() == fine
        assert bundle.num_classes == 100 and len(bundle.classes) == 100
        assert bundle.classes[99] == "worm" and bundle.classes[42] == "leopard"
        assert torch.equal(bundle.test.images, torch.from_numpy(data).reshape(3, 3, 32, 32))


def test_class_names_come_from_the_meta_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10_bin(folder)
    names = [f"c{i}" for i in range(10)]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert load_dataset("cifar10", data_dir=tmp_path).classes == tuple(names)


def test_val_split_holds_out_the_last_images_of_the_training_set(tmp_path, monkeypatch):
    written = write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    monkeypatch.setattr(cifar, "VAL_SIZE", 3)  # the real split holds out 5,000 of 50,000
    bundle = load_dataset("cifar10", data_dir=tmp_path, val_split=True)
    full = torch.from_numpy(written["train"]).reshape(-1, 3, 32, 32)
    assert torch.equal(bundle.train.images, full[:7])
    assert torch.equal(bundle.test.images, full[7:])
    assert bundle.test.labels.tolist() == written["train_labels"][7:]


def test_mean_and_std_are_computed_on_the_train_split(tmp_path):
    written = write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    bundle = load_dataset("cifar10", data_dir=tmp_path)
    x = written["train"].reshape(-1, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(bundle.mean, x.mean(axis=(0, 2)), atol=1e-6)
    np.testing.assert_allclose(bundle.std, x.std(axis=(0, 2)), atol=1e-6)
    assert bundle.augment.pad == 4 and bundle.augment.flip and bundle.in_memory


def test_limits_take_class_balanced_subsets(tmp_path):
    write_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    bundle = load_dataset("cifar10", data_dir=tmp_path, train_limit=5, test_limit=2)
    assert len(bundle.train) == 5 and len(set(bundle.train.labels.tolist())) == 5
    assert bundle.test.labels.tolist() == [1, 2]


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR python batch.*refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_truncated_binary_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10_bin(folder)
    (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match=r"test_batch.bin is not a CIFAR binary batch: its 3000 bytes .* 3073-byte"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_labels_out_of_range_are_rejected(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10_bin(folder)
    (folder / "test_batch.bin").write_bytes(np.hstack([[[12]], records(1, 0)]).astype(np.uint8).tobytes())
    with pytest.raises(DataError, match="outside 0..9"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_missing_dataset_names_the_folder_the_files_and_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    for expected in (str(tmp_path), "cifar-10-batches-py", "data_batch_1", "test_batch.bin", "--download",
                     "cifar-10-python.tar.gz"):
        assert expected in message


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason="the shared CIFAR-10 binary copy is not on this machine")
def test_real_cifar10_binary_copy():
    bundle = load_dataset("cifar10", data_dir=REAL_CIFAR.parent)
    assert len(bundle.train) == 50000 and len(bundle.test) == 10000
    assert bundle.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # frog, truck, truck, deer, ...
    assert torch.bincount(bundle.train.labels).tolist() == [5000] * 10
    assert torch.bincount(bundle.train.labels[:10000]).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
    np.testing.assert_allclose(bundle.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
