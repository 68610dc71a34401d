"""ImageNet-style image folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

Images are decoded with Pillow (converted to RGB) inside `FolderDataset.__getitem__`, so a
`torch.utils.data.DataLoader` with workers decodes in parallel; each item is a uint8 CHW
tensor and its label, and normalisation happens later on the training device
(`augment.normalize`). Class indices follow the sorted names of the ``train`` subfolders.

Transforms (written here, no torchvision):

* train: random-resized crop (area fraction 0.08-1, aspect ratio 3/4-4/3; the "Inception"
  crop of Szegedy et al. 2015, used by the torchvision reference recipe) resized to
  `image_size`, then a horizontal flip with probability 1/2. Random numbers come from torch's
  global generator, which `DataLoader` seeds differently in every worker.
* eval: resize so the shorter side is `resize` (bilinear, aspect kept), then the centre
  `image_size` crop; with ``tta="10crop"`` the 4 corner crops, the centre crop and their
  flips instead (``ten_crop``), a (10, 3, S, S) tensor per image.

Unreadable images: ``on_corrupt="skip"`` (default) warns with the path, remembers the file in a
shared-memory table (so the count is right even when DataLoader workers did the reading) and
returns the next readable image, so batches stay full; ``on_corrupt="stop"`` raises
`CorruptImageError` naming the file.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import center_crop, ten_crop
from .base import (
    AugmentSpec, DataError, DatasetBundle, DatasetNotFoundError, balanced_subset, check_limit,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
ON_CORRUPT = ("skip", "stop")
TTA = (None, "10crop")
# What Pillow raises for truncated, damaged or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class CorruptImageError(DataError):
    """An image file could not be decoded (raised when on_corrupt="stop")."""


def find_classes(split_dir: Path) -> tuple[str, ...]:
    """The sorted names of the class subfolders of `split_dir` (hidden folders ignored)."""
    return tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")))


def list_images(split_dir: Path, classes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(path, label) of every image file under split_dir/<class>/, sorted by class then name."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in find_classes(split_dir) if c not in index]
    if unknown:
        raise DataError(
            f"{split_dir} has class folders that train/ lacks: {', '.join(unknown[:5])}; "
            "every evaluation class needs training images"
        )
    samples = []
    for name in classes:
        folder = split_dir / name
        if not folder.is_dir():
            continue
        files = sorted(
            e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        samples.extend((f, index[name]) for f in files)
    return samples


def random_resized_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering 8-100% of the area with aspect 3/4-4/3.

    Ten tries at a random area and log-uniform aspect ratio; if none fits inside the image,
    the largest central crop whose aspect ratio lies in the range.
    """
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*CROP_SCALE).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,)).item())
            left = int(torch.randint(width - w + 1, (1,)).item())
            return left, top, w, h
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif aspect > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is `size`, the longer side round(long · size/short)."""
    w, h = img.size
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return img.resize(new, Image.BILINEAR)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class FolderDataset(torch.utils.data.Dataset):
    """One split of an image folder, yielding (uint8 CHW tensor, label); see the module docstring."""

    def __init__(
        self,
        split_dir: str | Path,
        *,
        classes: tuple[str, ...] | None = None,
        train: bool = False,
        image_size: int = 224,
        resize: int = 256,
        tta: str | None = None,
        on_corrupt: str = "skip",
        limit: int | None = None,
    ) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise DataError(f"on_corrupt must be 'skip' or 'stop', got {on_corrupt!r}")
        if tta not in TTA:
            raise DataError(f"tta must be None or '10crop', got {tta!r}")
        if train and tta:
            raise DataError("tta='10crop' is a test-time view; build the train split without it")
        if not isinstance(image_size, int) or not isinstance(resize, int) or not 0 < image_size <= resize:
            raise DataError(
                f"need integers 0 < image_size <= resize (the centre crop is taken from the resized "
                f"image), got image_size={image_size!r}, resize={resize!r}"
            )
        self.root = Path(split_dir)
        self.classes = classes if classes is not None else find_classes(self.root)
        self.train, self.image_size, self.resize = train, image_size, resize
        self.tta, self.on_corrupt = tta, on_corrupt
        samples = list_images(self.root, self.classes)
        if not samples:
            raise DatasetNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.root}; "
                "expected <class>/<image> files"
            )
        if check_limit("limit", limit) is not None:
            samples = [samples[i] for i in balanced_subset([s[1] for s in samples], limit)]
        self.samples = samples
        # Shared memory: writes made by DataLoader worker processes are seen here too.
        self._corrupt = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def corrupt_count(self) -> int:
        """How many distinct files failed to decode so far (and are skipped from now on)."""
        return int(self._corrupt.sum())

    @property
    def corrupt_paths(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._corrupt).flatten().tolist()]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self._corrupt[i]:
                continue
            path, label = self.samples[i]
            try:
                with Image.open(path) as raw:
                    img = raw.convert("RGB")
            except _DECODE_ERRORS as e:
                if self.on_corrupt == "stop":
                    raise CorruptImageError(
                        f"cannot decode image {path}: {e}; remove or replace the file, or use "
                        "on_corrupt='skip' to skip unreadable images"
                    ) from e
                self._corrupt[i] = 1
                warnings.warn(f"skipping unreadable image {path}: {e}", RuntimeWarning, stacklevel=2)
                continue
            return self.transform(img), label
        raise DataError(f"none of the {n} images in {self.root} can be decoded")

    def transform(self, img: Image.Image) -> torch.Tensor:
        """The train or eval transform of one decoded RGB image."""
        s = self.image_size
        if self.train:
            left, top, w, h = random_resized_crop_box(*img.size)
            img = img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
            if torch.rand(1).item() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return to_tensor(img)
        x = to_tensor(resize_shorter(img, self.resize))
        if self.tta == "10crop":
            return ten_crop(x[None], s)[0].contiguous()
        return center_crop(x, s).contiguous()


def load_folder(
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_split: bool = False,
    image_size: int = 224,
    resize: int = 256,
    on_corrupt: str = "skip",
    tta: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DatasetBundle:
    """Both splits of an image folder; `tta` applies to the evaluation split."""
    layout = "a folder with train/<class>/*.jpg and val/<class>/*.jpg"
    if data_dir is None:
        raise DataError(f"the folder dataset needs --data-dir DIR, {layout}")
    if download:
        raise DataError("folder datasets cannot be downloaded; drop --download and point --data-dir at " + layout)
    if val_split:
        raise DataError(
            "val_split is for CIFAR's 45k/5k split; a folder dataset is evaluated on its val/ folder. "
            "To tune on held-out training images, move them into a separate folder tree"
        )
    root = Path(data_dir).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetNotFoundError(
                f"{root / split} not found: --data-dir must be {layout} (searched {root}); "
                "folder datasets are not downloadable, so --download does not apply"
            )
    classes = find_classes(root / "train")
    if not classes:
        raise DatasetNotFoundError(f"{root / 'train'} has no class subfolders; expected {layout}")
    common = dict(classes=classes, image_size=image_size, resize=resize, on_corrupt=on_corrupt)
    train = FolderDataset(root / "train", train=True, limit=train_limit, **common)
    test = FolderDataset(root / "val", train=False, tta=tta, limit=test_limit, **common)
    return DatasetBundle(
        name="folder", train=train, test=test, num_classes=len(classes), in_chans=3,
        image_size=(image_size, image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=classes,
        # Crop and flip already happen per image in FolderDataset, so nothing is left for batches.
        augment=AugmentSpec(pad=0, flip=False, cutout=0), in_memory=False,
    )
