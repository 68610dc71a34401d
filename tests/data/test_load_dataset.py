"""load_dataset's contract: names, options, limits, the dataset types."""

from __future__ import annotations

import pytest
import torch

from reslab.data import DATASETS, DataError, InMemoryDataset, UnknownDatasetError, load_dataset
from reslab.data.base import balanced_subset, channel_stats


def test_the_dataset_names():
    assert DATASETS == ("digits", "cifar10", "cifar100", "folder", "synthetic")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'cifar' \(did you mean 'cifar10'\?\); "
                                                  r"choose one of digits, cifar10, cifar100, folder, synthetic"):
        load_dataset("cifar")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(DataError, match="dataset 'digits' takes no option 'image_size'; its options are train_limit, test_limit"):
        load_dataset("digits", image_size=32)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_limits_must_be_positive_integers(bad):
    with pytest.raises(DataError, match=f"train_limit must be a positive integer or None, got {bad!r}"):
        load_dataset("digits", train_limit=bad)


def test_limit_larger_than_the_split_keeps_everything():
    assert len(load_dataset("digits", test_limit=10_000).test) == 360


def test_balanced_subset_goes_round_robin_over_classes():
    labels = [0, 0, 0, 1, 1, 2]
    assert balanced_subset(labels, 4).tolist() == [0, 1, 3, 5]
    assert balanced_subset(labels, 3).tolist() == [0, 3, 5]
    assert balanced_subset(labels, None).tolist() == list(range(6))


def test_channel_stats_are_exact():
    x = torch.tensor([0, 255, 51, 51, 255, 0, 51, 51], dtype=torch.uint8).reshape(2, 2, 2, 1)
    mean, std = channel_stats(x)  # channel 0: 0, 255, 255, 0; channel 1: all 51
    assert mean == (0.5, 0.2) and std == (0.5, 0.0)


def test_in_memory_dataset_items_and_device_moves():
    ds = InMemoryDataset(torch.arange(24, dtype=torch.uint8).reshape(2, 3, 2, 2), torch.tensor([4, 7]))
    image, label = ds[1]
    assert len(ds) == 2 and label == 7 and isinstance(label, int) and torch.equal(image, ds.images[1])
    moved = ds.to("cpu")
    assert isinstance(moved, InMemoryDataset) and moved.device == torch.device("cpu")


@pytest.mark.parametrize("images, labels, message", [
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), "images must be a uint8 tensor"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), "labels must be an int64"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), "2 images but 3 labels"),
])
def test_in_memory_dataset_rejects_bad_tensors(images, labels, message):
    with pytest.raises(DataError, match=message):
        InMemoryDataset(images, labels)
