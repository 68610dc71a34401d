"""What every converter returns, and strict loading with errors that name the mismatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """How inputs must be prepared for converted weights: RGB in [0, 1], then (x − mean) / std."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": "RGB in [0, 1], then (x - mean) / std",
                "mean": list(self.mean), "std": list(self.std), "note": self.note}


@dataclass(frozen=True)
class Converted:
    """A reslab model holding converted weights, with what is needed to describe it."""

    model: nn.Module
    name: str
    model_kwargs: dict[str, Any]
    source_format: str  # "torchvision" or "keras"
    source_architecture: str  # e.g. "ResNet50V2", "torchvision resnet50"
    preprocessing: Preprocessing


def build_and_load(
    name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
    fill_missing: Sequence[str] = ("num_batches_tracked",),
) -> nn.Module:
    """Create reslab model `name` and load `state` strictly; buffers ending in `fill_missing`
    that the source does not have keep the model's own values."""
    from ..models import create_model

    model = create_model(name, **kwargs)
    own = model.state_dict()
    state = dict(state)
    for key, value in own.items():
        if key not in state and key.endswith(tuple(fill_missing)):
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the source, {tuple(v.shape)} in reslab"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise ValueError(
            f"{source} weights do not fit reslab {name!r} ({kwargs}): {'; '.join(problems)}. "
            "Pass --model with the matching reslab name (see `reslab models`)."
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
