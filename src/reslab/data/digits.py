"""The embedded handwritten digits: 8×8 grayscale, 10 classes, available offline.

Source: the UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn ships it
(`load_digits`): 1,797 images, each 64 pixel counts 0..16 (a 4×4 block count of a 32×32
bitmap) followed by the label. Stored in ``assets/digits.csv.gz``.

Pixels: a count v in 0..16 becomes the byte (255·v + 8) // 16, i.e. round(v · 255 / 16) with
halves rounded up, so 0 -> 0 and 16 -> 255 and the 17 levels stay evenly spaced.

The train/test split is fixed forever (changing it would silently change every reported
digits number), and it depends on no random number generator, whose output may change between
library versions:

* every image i gets the key sha256("reslab-digits-test:" + str(i)) (hex digest);
* the test set has ceil(0.2 · 1797) = 360 images, shared among the classes in proportion to
  their sizes by the largest-remainder rule (ties to the lower class), i.e. per class 0..9:
  36, 37, 35, 37, 36, 36, 36, 36, 35, 36;
* within each class the images with the smallest keys form the test set; the remaining
  1,437 images are the training set. Both keep the file's order.

`val_split=True` splits the 1,437 training images the same way with the salt
"reslab-digits-val:": 288 validation images replace the test set, 1,149 remain for training.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
from importlib import resources

import numpy as np
import torch

from .base import AugmentSpec, DataError, DatasetBundle, InMemoryDataset, balanced_subset, channel_stats

NUM_IMAGES = 1797
TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    with resources.files(__package__).joinpath("assets/digits.csv.gz").open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.int64)
    if table.shape != (NUM_IMAGES, 65) or table[:, :64].min() < 0 or table[:, :64].max() > 16:
        raise DataError(
            f"the embedded digits file is damaged (table of shape {table.shape}); "
            "reinstall reslab"
        )
    pixels = ((table[:, :64] * 255 + 8) // 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    return pixels, table[:, 64]


def stratified_split(labels: np.ndarray, fraction: float, salt: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) indices, both ascending: a fixed, hash-ordered, stratified split.

    ceil(fraction · N) samples are held out, allotted to classes by largest remainder, and
    within each class the samples whose sha256(salt + index) is smallest are the ones held out.
    """
    labels = np.asarray(labels)
    n = len(labels)
    total = math.ceil(fraction * n)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = sizes * total // n
    remainder = sizes * total % n
    # Give the leftover places to the largest remainders; ties go to the lower class.
    for k in sorted(range(len(classes)), key=lambda k: (-remainder[k], k))[: total - quota.sum()]:
        quota[k] += 1
    held = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        keys = [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in members]
        held.extend(members[np.argsort(keys, kind="stable")[:q]])
    held_out = np.sort(np.asarray(held, dtype=np.int64))
    kept = np.setdiff1d(np.arange(n), held_out)
    return kept, held_out


def split_indices(val_split: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(train, evaluation) indices into the 1,797 images, as described in the module docstring."""
    _, labels = _raw()
    train, test = stratified_split(labels, TEST_FRACTION, "reslab-digits-test:")
    if not val_split:
        return train, test
    kept, val = stratified_split(labels[train], TEST_FRACTION, "reslab-digits-val:")
    return train[kept], train[val]


def load_digits(
    *, val_split: bool = False, train_limit: int | None = None, test_limit: int | None = None
) -> DatasetBundle:
    pixels, labels = _raw()
    train_idx, test_idx = split_indices(val_split)
    train_idx = train_idx[balanced_subset(labels[train_idx], train_limit)]
    test_idx = test_idx[balanced_subset(labels[test_idx], test_limit)]

    def part(index: np.ndarray) -> InMemoryDataset:
        return InMemoryDataset(torch.from_numpy(pixels[index]), torch.from_numpy(labels[index]))

    train, test = part(train_idx), part(test_idx)
    mean, std = channel_stats(train.images)
    return DatasetBundle(
        name="digits", train=train, test=test, num_classes=10, in_chans=1, image_size=(8, 8),
        mean=mean, std=std, classes=tuple(str(d) for d in range(10)),
        # A 1-pixel shift is already an eighth of the image; a mirrored digit is another symbol.
        augment=AugmentSpec(pad=1, flip=False), in_memory=True,
    )
