"""Datasets as uint8 images plus what a model needs to preprocess them: `load_dataset(name)`.

Small datasets (digits, CIFAR, synthetic) are `InMemoryDataset`s that the training loop moves to
the accelerator once and batches there with `batches` + `augment_batch` + `normalize`; image
folders are `FolderDataset`s for a `DataLoader` with workers.
"""

from __future__ import annotations

import difflib
import inspect
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .augment import alternating_flips, augment_batch, batches, center_crop, normalize, ten_crop
from .base import (
    PAD_MODES, AugmentSpec, DataError, DatasetBundle, DatasetNotFoundError, InMemoryDataset,
    UnknownDatasetError, check_limit, default_data_dir, mean_colour,
)
from .cifar import load_cifar
from .digits import load_digits
from .download import DownloadError
from .folder import CorruptImageError, FolderDataset, load_folder
from .synthetic import load_synthetic

DATASETS = ("digits", "cifar10", "cifar100", "folder", "synthetic")

_LOADERS: dict[str, Callable[..., DatasetBundle]] = {
    "digits": load_digits,
    "cifar10": partial(load_cifar, "cifar10"),
    "cifar100": partial(load_cifar, "cifar100"),
    "folder": load_folder,
    "synthetic": load_synthetic,
}
# Arguments every dataset receives (each loader takes the ones that mean something to it).
_COMMON = ("data_dir", "download", "val_split", "seed")


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_split: bool = False,
    seed: int = 0,
    **options: Any,
) -> DatasetBundle:
    """Load a dataset by name (one of `DATASETS`) as a `DatasetBundle`.

    data_dir: where cifar10/cifar100 files are (default $RESLAB_DATA or ~/.cache/reslab/data)
      and the root of a folder dataset; the embedded digits and synthetic data need none.
    download: fetch a missing CIFAR archive from its official URL (md5-checked).
    val_split: evaluate on held-out training images instead of the test set (CIFAR: the
      paper's last 5k of 50k; digits: a fixed stratified 288 of 1,437; synthetic: a fresh draw).
    seed: seeds the synthetic data; splits and subsets of real data never depend on it, so
      runs with different seeds see the same images.
    options: train_limit / test_limit (every dataset: at most that many images, classes
      balanced, chosen without randomness); synthetic: num_train, num_test, image_size,
      in_chans, num_classes; folder: image_size (224), resize (256), on_corrupt ("skip" or
      "stop"), tta (None or "10crop"); cifar: url, md5 (a mirror of the official archive).
    """
    loader = _LOADERS.get(name)
    if loader is None:
        close = difflib.get_close_matches(str(name), DATASETS, n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownDatasetError(f"unknown dataset {name!r}{hint}; choose one of {', '.join(DATASETS)}")
    params = inspect.signature(loader).parameters
    own = [p for p in params if p not in _COMMON]
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise DataError(
            f"dataset {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(own)}"
        )
    for key in ("train_limit", "test_limit"):
        options[key] = check_limit(key, options.get(key))
    common = {"data_dir": data_dir, "download": download, "val_split": val_split, "seed": seed}
    return loader(**{k: v for k, v in common.items() if k in params}, **options)


__all__ = [
    "DATASETS", "PAD_MODES", "AugmentSpec", "CorruptImageError", "DataError", "DatasetBundle",
    "DatasetNotFoundError", "DownloadError", "FolderDataset", "InMemoryDataset",
    "UnknownDatasetError", "alternating_flips", "augment_batch", "batches", "center_crop",
    "default_data_dir", "load_dataset", "mean_colour", "normalize", "ten_crop",
]
