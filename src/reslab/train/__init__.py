"""Training, evaluation and prediction: `train(config)`, `fit(model, data, config)`,
`evaluate_model`, `predict`, and the recipes of the papers.

>>> from reslab.train import TrainConfig, train
>>> result = train(TrainConfig.from_recipe("default", model="resnet20", data="digits"))
>>> result.final.test_top1_error
"""

from .config import PRECISIONS, RECIPES, SCHEDULES, Recipe, TrainConfig
from .dist import DistContext
from .evaluate import TTA, EvalResult, evaluate_model, load_for_eval
from .loop import (Callback, LoopState, RunResult, StopTraining, TrainingDiverged, build_model, fit,
                   load_data, resolve_config, resume, train)
from .predict import Prediction, evaluate, predict
from .runs import EpochMetrics, read_config, read_metrics
from .schedule import ErrorWarmup, LRSchedule, build_schedule
from .step import EMA, make_optimizer, make_train_step

__all__ = [
    "EMA", "PRECISIONS", "RECIPES", "SCHEDULES", "TTA", "Callback", "DistContext", "EpochMetrics",
    "ErrorWarmup", "EvalResult", "LRSchedule", "LoopState", "Prediction", "Recipe", "RunResult",
    "StopTraining", "TrainConfig", "TrainingDiverged", "build_model", "build_schedule", "evaluate",
    "evaluate_model", "fit", "load_data", "load_for_eval", "make_optimizer", "make_train_step",
    "predict", "read_config", "read_metrics", "resolve_config", "resume", "train",
]
