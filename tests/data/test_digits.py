"""The embedded digits: scaling, the fixed stratified split, statistics."""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import numpy as np
import torch

from reslab.data import AugmentSpec, load_dataset
from reslab.data.digits import split_indices


def digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def test_the_embedded_file_is_the_one_the_split_was_fixed_on():
    raw = resources.files("reslab.data").joinpath("assets/digits.csv.gz").read_bytes()
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == (
        "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"
    )


def test_split_sizes_and_stratification():
    bundle = load_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert torch.bincount(bundle.test.labels).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
    assert torch.bincount(bundle.train.labels).tolist() == [142, 145, 142, 146, 145, 146, 145, 143, 139, 144]


def test_split_indices_never_drift():
    train, test = split_indices()
    assert digest(test) == "6e7ed2bd02fa9531a15ec5f6e1b605f5e095cbc99af045f05973c531c68586fa"
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    val_train, val = split_indices(val_split=True)
    assert (len(val_train), len(val)) == (1149, 288)
    assert digest(val) == "d92058e3a858783aa1b225a2ce3a1c8222ce0add4b22143b7a12303640ffb1eb"
    assert set(val.tolist()) | set(val_train.tolist()) == set(train.tolist())


def test_val_split_replaces_the_test_set_with_held_out_training_images():
    bundle = load_dataset("digits", val_split=True)
    assert (len(bundle.train), len(bundle.test)) == (1149, 288)
    assert torch.bincount(bundle.test.labels).tolist() == [29, 29, 28, 29, 29, 29, 29, 29, 28, 29]


def test_pixels_are_scaled_from_0_16_to_0_255():
    bundle = load_dataset("digits")
    train, _ = split_indices()
    assert train[0] == 0  # the file's first row, whose first pixels are 0,0,5,13,9,1,0,0
    first = bundle.train.images[0]
    assert first.shape == (1, 8, 8) and first.dtype == torch.uint8
    assert first[0, 0].tolist() == [0, 0, 80, 207, 143, 16, 0, 0]  # (255·v + 8) // 16
    assert int(bundle.train.labels[0]) == 0
    assert set(torch.unique(bundle.train.images).tolist()) <= {(255 * v + 8) // 16 for v in range(17)}
    assert int(bundle.train.images.max()) == 255


def test_bundle_describes_the_data():
    bundle = load_dataset("digits")
    x = bundle.train.images.double() / 255
    assert bundle.mean == (round(float(x.mean()), 6),)
    assert bundle.std == (round(float(x.std(unbiased=False)), 6),)
    assert bundle.classes == tuple("0123456789") and bundle.num_classes == 10
    assert (bundle.in_chans, bundle.image_size, bundle.in_memory) == (1, (8, 8), True)
    assert bundle.augment == AugmentSpec(pad=1, flip=False, cutout=0)


def test_train_limit_is_class_balanced_and_seed_independent():
    a = load_dataset("digits", train_limit=100, seed=0)
    b = load_dataset("digits", train_limit=100, seed=1)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10
    assert torch.equal(a.train.images, b.train.images)
