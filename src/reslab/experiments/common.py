"""What the experiments share: one training recipe per scale, and a cache of trained models.

Several experiments study the same trained networks (degradation trains plain/ResNet-20…56;
responses, lesion and highway read them again), so every trained model is kept under
``OUT/_models/KEY/`` (weights as a reslab model file + its per-epoch history) and reused by any
experiment that asks for the same model, settings, seed and scale.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_write_text, load_model, save_model
from ..data import DatasetBundle
from ..train import EpochMetrics, TrainConfig, TrainingDiverged, build_model, fit, load_data
from ..train.loop import model_meta, resolve_config
from . import ExperimentConfig

# The recipe of each scale: He et al.'s SGD recipe (momentum 0.9, wd 1e-4, lr ÷10 at 50%/75%).
# demo: digits, 15 epochs at lr 0.02 (the `reslab demo` budget: 0.1 is too large to start 56
# layers on 1,437 images); small: a 5k-image CIFAR subset for 15 epochs (ResNet-56 took 187 s
# on 2 CPU cores and `degradation` at depths 20-56 893 s; far from converged), with the
# paper's lr-0.01 warm-up for 110 layers (without it ResNet-110 diverged in its first epoch at
# lr 0.1 and stayed at chance); paper: the paper's 64k-iteration recipe. The fast path (bf16
# autocast, channels_last) halves CPU time.
SCALE_TRAINING: dict[str, dict[str, Any]] = {
    "demo": {"recipe": "default", "epochs": 15, "lr": 0.02},
    "small": {"recipe": "default", "epochs": 15, "lr": 0.1, "train_limit": 5_000,
              "test_limit": 2_000, "error_warmup": "auto"},
    "paper": {"recipe": "paper"},
}


@dataclass
class Trained:
    name: str
    model: nn.Module  # eval mode, on the experiment's device
    history: list[EpochMetrics]
    seconds: float
    diverged: bool
    config: TrainConfig

    @property
    def final(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


_DATA: dict[tuple, DatasetBundle] = {}


def training_config(cfg: ExperimentConfig, model: str, *, seed: int = 0,
                    model_kwargs: dict | None = None, **overrides: Any) -> TrainConfig:
    """The scale's recipe for `model` on the experiment's dataset, shrunk by `cfg.budget`."""
    values = dict(SCALE_TRAINING[cfg.scale])
    recipe = values.pop("recipe")
    if cfg.budget < 1 and "epochs" in values:
        values["epochs"] = max(1, round(values["epochs"] * cfg.budget))
    if cfg.budget < 1:
        values["train_limit"] = min(values.get("train_limit") or 10**9, max(200, round(2000 * cfg.budget)))
        values["test_limit"] = min(values.get("test_limit") or 10**9, max(100, round(1000 * cfg.budget)))
    fast = {"precision": "bf16", "channels_last": True}
    values = {**fast, **values, **cfg.options.get("train", {}), **overrides}
    return TrainConfig.from_recipe(
        recipe, model=model, data=cfg.dataset, data_dir=cfg.data_dir, seed=seed,
        model_kwargs=model_kwargs or {}, device=cfg.device, progress="none", **values)


def dataset(config: TrainConfig) -> DatasetBundle:
    key = (config.data, config.data_dir, config.train_limit, config.test_limit,
           config.val_split, json.dumps(config.data_options, sort_keys=True))
    if key not in _DATA:
        _DATA[key] = load_data(config)
    return _DATA[key]


def train_cached(cfg: ExperimentConfig, model: str, *, seed: int = 0,
                 model_kwargs: dict | None = None, **overrides: Any) -> Trained:
    """Train `model` with the scale's recipe, or load it if an earlier experiment did."""
    config = training_config(cfg, model, seed=seed, model_kwargs=model_kwargs, **overrides)
    data = dataset(config)
    config = resolve_config(config, data)
    key = _key(config)
    folder = Path(cfg.out) / "_models" / key
    summary = folder / "history.json"
    device = config.device if config.device != "auto" else cfg.device
    doc = json.loads(summary.read_text()) if summary.exists() else None
    if doc is not None and _same_settings(doc.get("config", {}), config):
        net, _ = load_model(folder / "model.safetensors", map_location=device)
        return Trained(model, net.eval(), [EpochMetrics.from_dict(h) for h in doc["history"]],
                       doc["seconds"], doc["diverged"], config)

    torch.manual_seed(config.seed)
    net = build_model(config)
    start = time.perf_counter()
    try:
        result = fit(net, data, config)
        history, diverged = result.history, False
        if result.status == "interrupted":
            # Never cache a half-trained model as finished: stop the experiment instead.
            raise KeyboardInterrupt(f"training {model} was interrupted; nothing was cached")
    except TrainingDiverged:
        history, diverged = [], True
    seconds = time.perf_counter() - start
    save_model(folder / "model.safetensors", net, model_meta(config, data))
    atomic_write_text(summary, json.dumps({
        "model": model, "config": config.to_dict(), "seconds": seconds, "diverged": diverged,
        "history": [h.as_dict() for h in history]}, indent=1))
    return Trained(model, net.eval(), history, seconds, diverged, config)


# Settings that do not change the trained model.
_NOT_IN_KEY = frozenset({"progress", "out", "device", "threads", "workers", "tensorboard"})


def _settings(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config's settings that change the model, their defaults), both as they read in JSON."""
    def as_json(c: TrainConfig) -> dict[str, Any]:
        d = json.loads(json.dumps(c.to_dict(), default=str))
        return {k: v for k, v in d.items() if k not in _NOT_IN_KEY}

    return as_json(config), as_json(TrainConfig(model=config.model))


def _key(config: TrainConfig) -> str:
    """The cache folder's name: the model, the seed and a digest of the settings that matter.

    Fields at their default value are left out of the digest, so a reslab version that adds a
    setting (with a default that keeps the old behaviour) still finds the models trained before;
    `_same_settings` then checks the cached model's full settings before it is reused.
    """
    current, defaults = _settings(config)
    d = {k: v for k, v in current.items() if v != defaults[k]}
    digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.model}-s{config.seed}-{digest}"


def _same_settings(cached: dict[str, Any], config: TrainConfig) -> bool:
    """Whether a cached model was trained with `config`'s settings.

    A setting the cache does not record (added to reslab later) must be at its default; any
    recorded one must match (a changed default therefore retrains instead of reusing).
    """
    current, defaults = _settings(config)
    return all(cached.get(k, defaults[k]) == v for k, v in current.items())


def seeds(cfg: ExperimentConfig) -> range:
    return range(cfg.seeds)
