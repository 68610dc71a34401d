"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from either official format, held in memory.

Formats (https://www.cs.toronto.edu/~kriz/cifar.html):

* python: pickled dicts, ``cifar-10-batches-py/data_batch_1..5, test_batch`` (key ``labels``)
  and ``cifar-100-python/train, test`` (key ``fine_labels``), each with ``data``, a uint8
  array of shape (N, 3072). Unpickling runs through an Unpickler that can build nothing but
  numpy arrays, dtypes and bytes, so a tampered file cannot run code.
* binary: ``cifar-10-batches-bin/data_batch_1..5.bin, test_batch.bin``, records of 1 label byte
  + 3072 pixel bytes; ``cifar-100-binary/train.bin, test.bin``, records of a coarse label
  byte, a fine label byte and 3072 pixel bytes.

In both, the 3072 bytes are the red plane, then green, then blue, each 32×32 row-major, which
is exactly the memory layout of a (3, 32, 32) CHW array. The python format is preferred when
both are present (it is the lossless one everywhere). `data_dir` may be the folder holding the
files or its parent.

`val_split=True` is the 45k/5k split of He et al. 2015, Sec. 4.2: the last 5,000 images of the
training set (the second half of ``data_batch_5``) become the evaluation split and the first
45,000 the training split. It uses no random numbers, so it is the same in every run.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import (
    AugmentSpec, DataError, DatasetBundle, DatasetNotFoundError, InMemoryDataset, channel_stats,
    default_data_dir, limit_dataset,
)
from .download import archive_name, download_and_extract

VAL_SIZE = 5000
PIXELS = 3 * 32 * 32

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
# Official md5 sums of the archives on the CIFAR page.
KNOWN_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
DEFAULT_ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)


@dataclass(frozen=True)
class Layout:
    """Where one official format keeps its files."""

    folder: str
    binary: bool
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str  # python: dict key of the labels; binary: unused
    header: int  # binary: label bytes before the pixels of each record
    label_byte: int  # binary: which of those bytes is the label we use


LAYOUTS = {
    "cifar10": (
        Layout("cifar-10-batches-py", False, tuple(f"data_batch_{i}" for i in range(1, 6)),
               ("test_batch",), "batches.meta", "labels", 0, 0),
        Layout("cifar-10-batches-bin", True, tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
               ("test_batch.bin",), "batches.meta.txt", "", 1, 0),
    ),
    "cifar100": (
        Layout("cifar-100-python", False, ("train",), ("test",), "meta", "fine_labels", 0, 0),
        # The fine label is the second byte; the first is the coarse (superclass) label.
        Layout("cifar-100-binary", True, ("train.bin",), ("test.bin",), "fine_label_names.txt",
               "", 2, 1),
    ),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DEFAULT_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and bytes, and refuses every other global in the stream."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists and strings, so this file is damaged or was tampered with"
            )
        return allowed[(module, name)]


def _allowed_globals() -> dict[tuple[str, str], object]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    # Pickles name the module they were written with, numpy 1 or numpy 2, so allow both names.
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


def _unpickle(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        try:
            # The official files were written by Python 2; "bytes" keeps its str values as bytes.
            obj = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path} is not a readable CIFAR python batch: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch: it holds a {type(obj).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_python(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or layout.label_key not in batch:
        raise DataError(
            f"{path} is not a CIFAR python batch: expected keys 'data' and {layout.label_key!r}, "
            f"found {sorted(map(str, batch))}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS or len(labels) != len(data):
        raise DataError(
            f"{path}: 'data' must be uint8 of shape (N, {PIXELS}) with N labels, got "
            f"{data.dtype} {data.shape} and {len(labels)} labels"
        )
    return data, labels


def _read_binary(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = layout.header + PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path} is not a CIFAR binary batch: its {raw.size} bytes are not a whole number of "
            f"{record}-byte records"
        )
    records = raw.reshape(-1, record)
    return records[:, layout.header :], records[:, layout.label_byte].astype(np.int64)


def _read_split(folder: Path, layout: Layout, files: tuple[str, ...], num_classes: int):
    read = _read_binary if layout.binary else _read_python
    parts = [read(folder / f, layout) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"labels in {folder} run from {labels.min()} to {labels.max()}, outside 0..{num_classes - 1}; "
            f"is this really {'CIFAR-100' if num_classes == 100 else 'CIFAR-10'}?"
        )
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return InMemoryDataset(images, torch.from_numpy(labels))


def _read_classes(folder: Path, layout: Layout, name: str) -> tuple[str, ...]:
    default = DEFAULT_CLASSES[name]
    path = folder / layout.meta
    if not path.is_file():
        return default
    if layout.binary:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        key = "fine_label_names" if name == "cifar100" else "label_names"
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(path).get(key, [])]
    if len(names) != len(default):
        raise DataError(f"{path} names {len(names)} classes, expected {len(default)}")
    return tuple(names)


def locate(name: str, data_dir: Path) -> tuple[Path, Layout] | None:
    """The folder and format of `name` in `data_dir` or one of its official subfolders."""
    for layout in LAYOUTS[name]:
        for folder in (data_dir, data_dir / layout.folder):
            if all((folder / f).is_file() for f in layout.train + layout.test):
                return folder, layout
    return None


def _not_found(name: str, data_dir: Path, archive: str) -> DatasetNotFoundError:
    wanted = "; or ".join(
        f"{', '.join(l.train + l.test)} ({'binary' if l.binary else 'python'} format, "
        f"usually in {l.folder}/)"
        for l in LAYOUTS[name]
    )
    return DatasetNotFoundError(
        f"{name} not found in {data_dir} (searched it and its subfolders "
        f"{', '.join(l.folder for l in LAYOUTS[name])}). Expected the files {wanted}. "
        f"Pass --data-dir pointing at them, or add --download to fetch {BASE_URL}{archive} "
        f"into {data_dir}."
    )


def load_cifar(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_split: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    url: str | None = None,
    md5: str | None = None,
) -> DatasetBundle:
    """CIFAR-10 or CIFAR-100 as uint8 tensors; `url`/`md5` override the download source."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    found = locate(name, root)
    archive = DEFAULT_ARCHIVE[name]
    if found is None and download:
        source = url or BASE_URL + archive
        file_name = archive_name(source)
        checksum = md5 or KNOWN_MD5.get(file_name)
        if checksum is None:
            raise DataError(f"no known md5 for {file_name}; pass md5=... to verify {source}")
        download_and_extract(source, checksum, root)
        found = locate(name, root)
        if found is None:
            raise DataError(f"the archive from {source} does not hold {name}: {_not_found(name, root, archive)}")
    if found is None:
        raise _not_found(name, root, archive)
    folder, layout = found
    num_classes = NUM_CLASSES[name]
    train = _read_split(folder, layout, layout.train, num_classes)
    test = _read_split(folder, layout, layout.test, num_classes)
    if val_split:
        if len(train) <= VAL_SIZE:
            raise DataError(f"val_split holds out {VAL_SIZE} images, but {folder} has only {len(train)} for training")
        cut = len(train) - VAL_SIZE
        train, test = (
            InMemoryDataset(train.images[:cut], train.labels[:cut]),
            InMemoryDataset(train.images[cut:], train.labels[cut:]),
        )
    train, test = limit_dataset(train, train_limit), limit_dataset(test, test_limit)
    mean, std = channel_stats(train.images)
    return DatasetBundle(
        name=name, train=train, test=test, num_classes=num_classes, in_chans=3, image_size=(32, 32),
        mean=mean, std=std, classes=_read_classes(folder, layout, name),
        augment=AugmentSpec(pad=4, flip=True), in_memory=True,
    )
