"""reslab: residual networks — the papers' architectures, trained fast, with their science as commands."""

from .models import (
    Complexity, ModelInfo, UnknownModelError, complexity, count_params, create_model, list_models,
    model_info,
)

__version__ = "0.1.0"

__all__ = [
    "Complexity", "ModelInfo", "UnknownModelError", "complexity", "count_params", "create_model",
    "list_models", "model_info", "__version__",
]
