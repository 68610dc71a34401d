"""The residual-network model zoo: a registry of named builders over one class per family."""

from .complexity import Complexity, complexity, count_params
from .registry import ModelInfo, UnknownModelError, create_model, list_models, model_info, register_model

__all__ = [
    "Complexity", "ModelInfo", "UnknownModelError", "complexity", "count_params", "create_model",
    "list_models", "model_info", "register_model",
]
