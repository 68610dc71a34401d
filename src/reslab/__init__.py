"""reslab: residual networks — the papers' architectures, trained fast, with their science as commands.

>>> import reslab
>>> model = reslab.create_model("resnet56", num_classes=10)
>>> reslab.model_info("resnet56").params
853018

Models and their complexity import eagerly; training, data, export, conversion, inference and
benchmarking load on first use (``reslab.TrainConfig``, ``reslab.export_model``), so ``import
reslab`` stays light. Training itself is ``reslab.train.train(config)``; conversion
``reslab.convert.convert(src, dst)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .checkpoint import load_model, save_model
from .models import (
    Complexity, ModelInfo, UnknownModelError, complexity, count_params, create_model, list_models,
    model_info,
)

__version__ = "0.1.0"

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "load_dataset": "reslab.data",
    "TrainConfig": "reslab.train",
    "RECIPES": "reslab.train",
    "resume": "reslab.train",
    "fit": "reslab.train",
    "evaluate": "reslab.train",
    "predict": "reslab.train",
    "export_model": "reslab.export",
    "fold_batchnorm": "reslab.export",
    "OpenVINOSession": "reslab.export",
    "optimize_for_inference": "reslab.inference",
    "fast_path": "reslab.inference",
    "bench_train": "reslab.bench",
    "bench_infer": "reslab.bench",
    "bench_backends": "reslab.bench",
    "tune_allocator": "reslab.runtime",
    "run_experiment": "reslab.experiments",
    "ExperimentConfig": "reslab.experiments",
}

__all__ = [
    "Complexity", "ModelInfo", "UnknownModelError", "complexity", "count_params", "create_model",
    "list_models", "load_model", "model_info", "save_model", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reslab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
