"""Convert other libraries' weights into reslab model files, with a model card beside them.

``convert(src, dst)`` reads a torchvision ``.pth`` or a Keras Applications ``.h5`` /
``.weights.h5`` / ``.keras`` file, builds the matching reslab model, writes it as a reslab model
file (safetensors + metadata, so `reslab.checkpoint.load_model` rebuilds it) and writes a JSON
model card next to it: model, classes, source and its checksum, conversion date, the sha256 of
the written weights and the preprocessing the weights expect.

Note on BatchNorm statistics: converted running means/variances are the source's. Keras's BN
momentum 0.99 is PyTorch's 0.01; reslab models use PyTorch's default 0.1, which only matters
when fine-tuning.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Converted, Preprocessing
from .keras import from_keras
from .torchvision import from_torchvision

SOURCES = ("torchvision", "keras")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

__all__ = [
    "ConversionResult", "Converted", "Preprocessing", "SOURCES", "convert", "detect_source",
    "from_keras", "from_torchvision",
]


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    card_path: Path
    model: str
    sha256: str
    card: dict[str, Any]


def detect_source(path: str | Path) -> str:
    """'keras' or 'torchvision' from the file name; ask for --from when it does not say."""
    suffix = Path(path).suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix in TORCH_SUFFIXES:
        return "torchvision"
    raise ValueError(
        f"cannot tell what {Path(path).name} is from its suffix {suffix!r}; pass --from "
        f"torchvision (.pth/.pt state_dicts) or --from keras (.h5/.weights.h5/.keras)"
    )


def convert(src: str | Path, dst: str | Path, *, model: str | None = None,
            source: str | None = None) -> ConversionResult:
    """Convert `src` to the reslab model file `dst` (``.safetensors``) plus ``dst.json``."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"no such file to convert: {src}")
    if dst.suffix != ".safetensors":
        raise ValueError(
            f"the converted model is written as safetensors: name it *.safetensors, not {dst.name}")
    source = source or detect_source(src)
    if source not in SOURCES:
        raise ValueError(f"--from must be one of {', '.join(SOURCES)}; got {source!r}")
    converted = from_keras(src, model) if source == "keras" else from_torchvision(src, model)
    return write_converted(converted, dst, src)


def write_converted(converted: Converted, dst: Path, src: Path) -> ConversionResult:
    """Write the model file and its card; the card's checksum is of the bytes written."""
    from .. import __version__
    from ..checkpoint import atomic_write_text, save_model
    from ..models import count_params
    from ..models.registry import _spec

    pre = converted.preprocessing
    size = list(_spec(converted.name).input_size[1:])  # the registered native size, not measured
    meta = {
        "model": converted.name, "model_kwargs": converted.model_kwargs, "dataset": "imagenet",
        "mean": list(pre.mean), "std": list(pre.std), "image_size": size,
        "source": converted.source_architecture, "preprocessing": pre.name,
    }
    save_model(dst, converted.model, meta)
    digest = _sha256(dst)
    card = {
        "model": converted.name,
        "model_kwargs": converted.model_kwargs,
        "num_classes": converted.model_kwargs.get("num_classes"),
        "params": count_params(converted.model),
        "image_size": size,
        "source": {"format": converted.source_format,
                   "architecture": converted.source_architecture,
                   "file": src.name, "sha256": _sha256(src)},
        "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reslab_version": __version__,
        "weights": {"file": dst.name, "sha256": digest, "bytes": dst.stat().st_size},
        "preprocessing": pre.as_dict(),
    }
    card_path = dst.with_suffix(".json")
    atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    return ConversionResult(dst, card_path, converted.name, digest, card)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
