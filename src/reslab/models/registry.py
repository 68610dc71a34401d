"""Name -> builder registry: `create_model`, `list_models`, `model_info`.

Each family module registers its named models with `@register_model(...)`; the builder takes
keyword overrides and returns an `nn.Module`. Sizes in `ModelInfo` are measured from the model
itself (built on the meta device, so even ResNet-1202 costs no memory), never typed in by hand.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    family: str
    depth: int
    input_size: tuple[int, int, int]
    dataset: str
    paper: str
    num_classes: int


@dataclass(frozen=True)
class ModelInfo:
    """What `reslab models` prints: sizes measured at the native input size."""

    name: str
    family: str
    depth: int
    params: int
    macs: int
    input_size: tuple[int, int, int]
    dataset: str
    paper: str
    num_classes: int


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(ValueError):
    pass


def register_model(
    *,
    family: str,
    depth: int,
    dataset: str,
    paper: str,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under `name` (default: the function's name)."""
    imagenet = dataset == "imagenet"
    size = input_size or ((3, 224, 224) if imagenet else (3, 32, 32))
    classes = num_classes or (1000 if imagenet else 10)

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise RuntimeError(f"model {key!r} registered twice")
        _REGISTRY[key] = ModelSpec(key, fn, family, depth, size, dataset, paper, classes)
        return fn

    return wrap


def _spec(name: str) -> ModelSpec:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"closest registered names: {', '.join(close)}" if close else "no close match"
        raise UnknownModelError(
            f"unknown model {name!r}; {hint}. Run `reslab models` or reslab.list_models() "
            "to see every registered name."
        ) from None


def list_models(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Registered names, optionally filtered by a glob pattern (``"resnet*"``) and family."""
    _ensure_loaded()
    names = sorted(_REGISTRY, key=_natural_key)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if family:
        names = [n for n in names if _REGISTRY[n].family == family]
    return names


def create_model(
    name: str, *, num_classes: int | None = None, in_chans: int = 3, features_only: bool = False,
    out_indices: Sequence[int] | None = None, **overrides
) -> nn.Module:
    """Build a registered model. Overrides are the family class's keyword arguments.

    ``features_only=True`` returns a backbone giving the feature maps of the stages in
    ``out_indices`` (1-based, default all) with their ``feature_info`` (see models/features.py).
    """
    spec = _spec(name)
    model = spec.builder(
        num_classes=num_classes if num_classes is not None else spec.num_classes,
        in_chans=in_chans,
        **overrides,
    )
    model.reslab_name = name
    if features_only:
        from .features import FeatureExtractor

        model = FeatureExtractor(model, out_indices)
        model.reslab_name = name
    elif out_indices is not None:
        raise ValueError("out_indices selects feature maps; pass it with features_only=True")
    return model


@functools.lru_cache(maxsize=None)
def model_info(name: str) -> ModelInfo:
    """Family, depth, exact parameter count and MACs at the native input size."""
    from .complexity import complexity

    spec = _spec(name)
    with torch.device("meta"):
        model = spec.builder(num_classes=spec.num_classes, in_chans=spec.input_size[0])
    c = complexity(model, spec.input_size)
    return ModelInfo(
        spec.name, spec.family, spec.depth, c.params, c.macs, spec.input_size,
        spec.dataset, spec.paper, spec.num_classes,
    )


def _natural_key(name: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _ensure_loaded() -> None:
    # The family modules register themselves on import.
    from . import densenet, highway, resnet, resnet9  # noqa: F401
