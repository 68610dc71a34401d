"""The types every dataset returns, the errors they raise, and helpers they share.

`InMemoryDataset` holds a small dataset as two tensors (uint8 images, int64 labels) so the
training loop can move it to the accelerator once and slice batches there (see `augment.py`);
`DatasetBundle` is what `load_dataset` returns: both splits plus everything a model file needs
to reproduce the preprocessing (mean, std, classes, image size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


class DataError(ValueError):
    """Bad input to the data pipeline: an unknown name, a bad option, a corrupt file."""


class UnknownDatasetError(DataError):
    pass


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where we looked; the message says where and what."""


@dataclass(eq=False)  # tensors have no single truth value, so no generated __eq__
class InMemoryDataset(torch.utils.data.Dataset):
    """A labelled image set held as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"images must be a uint8 tensor of shape (N, C, H, W), got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"labels must be an int64 tensor of shape (N,), got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.images.device != self.labels.device:
            raise DataError(
                f"images are on {self.images.device} but labels on {self.labels.device}; "
                "move both with .to(device)"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> InMemoryDataset:
        """The same data on `device` (moved once, so every later batch is sliced there)."""
        return InMemoryDataset(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def subset(self, indices: torch.Tensor | np.ndarray) -> InMemoryDataset:
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return InMemoryDataset(self.images[index], self.labels[index])


PAD_MODES = ("zero", "mean", "reflect")


@dataclass(frozen=True)
class AugmentSpec:
    """The train-time augmentation, applied to whole batches by `augment_batch`.

    The default is the CIFAR recipe of He et al. 2015, Sec. 4.2: "4 pixels are padded on each
    side, and a 32×32 crop is randomly sampled from the padded image or its horizontal flip".
    `pad_mode` says what the crop sees beyond the border: ``zero`` black pixels (torchvision's
    ``RandomCrop(padding=4)``, what most reproductions do), ``mean`` the `fill` colour (the
    dataset's mean, so zero after normalisation: He et al. pad the mean-subtracted image), or
    ``reflect`` the mirrored image (Page 2018 and airbench; no artificial edges, so the first
    layers' statistics on training batches match those of test images). `cutout` is the square
    erasing of DeVries & Taylor 2017 ("Improved Regularization of Convolutional Neural Networks
    with Cutout"), painted in the `fill` colour (they erase after normalisation: the mean).
    `fill` is one uint8 value per channel; empty means black.
    """

    pad: int = 4
    flip: bool = True
    cutout: int = 0
    pad_mode: str = "zero"
    fill: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.pad < 0 or self.cutout < 0:
            raise DataError(f"pad and cutout must be >= 0, got pad={self.pad}, cutout={self.cutout}")
        if self.pad_mode not in PAD_MODES:
            raise DataError(f"pad_mode must be one of {', '.join(PAD_MODES)}; got {self.pad_mode!r}")
        if any(not 0 <= v <= 255 for v in self.fill):
            raise DataError(f"fill is a uint8 colour (values 0..255 per channel), got {self.fill}")
        if self.pad_mode == "mean" and not self.fill:
            raise DataError("pad_mode='mean' needs the fill colour: AugmentSpec(fill=mean_colour(mean))")

    @property
    def enabled(self) -> bool:
        return bool(self.pad or self.flip or self.cutout)


def mean_colour(mean: Sequence[float]) -> tuple[int, ...]:
    """A dataset's per-channel mean (in [0, 1]) as the nearest uint8 colour, for `AugmentSpec.fill`."""
    return tuple(min(255, max(0, round(255 * float(m)))) for m in mean)


@dataclass(frozen=True)
class DatasetBundle:
    """Both splits of a dataset and what a model needs to preprocess its images.

    `test` is the evaluation split: the official test set, or the held-out validation part of
    the training set when `load_dataset(..., val_split=True)`.
    """

    name: str
    train: InMemoryDataset | torch.utils.data.Dataset
    test: InMemoryDataset | torch.utils.data.Dataset
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    augment: AugmentSpec
    in_memory: bool


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images on the 0-1 scale.

    Computed exactly from a 256-bin histogram per channel, so even 50k CIFAR images need no
    float copy of the data.
    """
    if len(images) == 0:
        raise DataError("cannot compute mean/std of an empty training split")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(round(float(mean), 6))
        stds.append(round(float(var.sqrt()), 6))
    return tuple(means), tuple(stds)


def balanced_subset(labels: np.ndarray | torch.Tensor, limit: int | None) -> np.ndarray:
    """Indices of at most `limit` samples, classes as equal as possible, in dataset order.

    Deterministic and seed-free, so every run (whatever its seed) sees the same subset: samples
    are taken round-robin over classes, each class in its own file order (the first of every
    class, then the second of every class, ...), and returned sorted. `None` keeps everything.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts  # position of each sample within its class
    order = np.lexsort((np.arange(n), rank))
    return np.sort(order[:limit])


def limit_dataset(ds: InMemoryDataset, limit: int | None) -> InMemoryDataset:
    """`ds` itself, or its `balanced_subset` of at most `limit` samples."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.subset(balanced_subset(ds.labels.cpu().numpy(), limit))


def check_limit(name: str, value: int | None) -> int | None:
    """`value` as an int, or None; anything but a positive integer is a clear error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def default_data_dir() -> Path:
    """Where datasets live when no data_dir is given: $RESLAB_DATA, else ~/.cache/reslab/data."""
    return Path(os.environ.get("RESLAB_DATA", "~/.cache/reslab/data")).expanduser()
