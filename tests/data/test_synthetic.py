"""Synthetic data: any shape, deterministic from the seed, learnable."""

from __future__ import annotations

import pytest
import torch

from reslab.data import DataError, load_dataset


def test_shape_and_options():
    bundle = load_dataset("synthetic", num_train=20, num_test=6, image_size=(5, 7), in_chans=2, num_classes=3)
    assert bundle.train.images.shape == (20, 2, 5, 7) and bundle.train.images.dtype == torch.uint8
    assert len(bundle.test) == 6 and bundle.num_classes == 3 and bundle.in_chans == 2
    assert bundle.image_size == (5, 7) and bundle.classes == ("class_0", "class_1", "class_2")
    assert int(bundle.train.labels.max()) < 3 and len(bundle.mean) == 2


def test_deterministic_from_seed():
    a, b, c = (load_dataset("synthetic", num_train=8, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_classes_are_learnable_by_their_mean_image():
    bundle = load_dataset("synthetic", num_train=400, num_test=100, image_size=8, num_classes=4)
    x, y = bundle.train.images.float().flatten(1), bundle.train.labels
    centroids = torch.stack([x[y == k].mean(0) for k in range(4)])
    pred = torch.cdist(bundle.test.images.float().flatten(1), centroids).argmin(1)
    assert (pred == bundle.test.labels).float().mean() > 0.95


def test_val_split_is_a_separate_draw():
    plain = load_dataset("synthetic", num_train=8, num_test=4)
    val = load_dataset("synthetic", num_train=8, num_test=4, val_split=True)
    assert torch.equal(plain.train.images, val.train.images)
    assert not torch.equal(plain.test.images, val.test.images)


def test_bad_sizes_are_explained():
    with pytest.raises(DataError, match="synthetic num_classes must be a positive integer, got 0"):
        load_dataset("synthetic", num_classes=0)
