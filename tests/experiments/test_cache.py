"""The experiments' model cache: which trained model a key names, and when it is reused."""

from __future__ import annotations

import hashlib
import json

from reslab.experiments import ExperimentConfig
from reslab.experiments.common import _key, _same_settings, train_cached
from reslab.train import TrainConfig

TRAIN = {"precision": "fp32", "channels_last": False}


def test_key_leaves_out_settings_at_their_default():
    empty = hashlib.sha256(b"{}").hexdigest()[:10]
    assert _key(TrainConfig(model="resnet20")) == f"resnet20-s0-{empty}"
    # Settings that do not change the model are never part of it either.
    assert _key(TrainConfig(model="resnet20", threads=1, progress="none")) == f"resnet20-s0-{empty}"
    changed = _key(TrainConfig(model="resnet20", lr=0.05))
    assert changed != f"resnet20-s0-{empty}" and changed.startswith("resnet20-s0-")
    assert _key(TrainConfig(model="resnet20", seed=3)).startswith("resnet20-s3-")


def test_same_settings_accepts_only_matching_or_unrecorded_defaults():
    config = TrainConfig(model="resnet20", lr=0.05)
    recorded = json.loads(json.dumps(config.to_dict()))
    assert _same_settings(recorded, config)
    older = {k: v for k, v in recorded.items() if k != "ema_decay"}  # a field added later
    assert _same_settings(older, config)
    assert not _same_settings(older, config.replace(ema_decay=0.999))
    assert not _same_settings({**recorded, "lr": 0.1}, config)
    assert _same_settings({**recorded, "threads": 7}, config)  # not a model setting


def test_cached_model_with_other_settings_is_retrained(tmp_path):
    cfg = ExperimentConfig("degradation", scale="demo", out=str(tmp_path), budget=0.02,
                           options={"train": TRAIN})
    first = train_cached(cfg, "resnet20")
    [folder] = (tmp_path / "_models").iterdir()
    summary = folder / "history.json"
    assert train_cached(cfg, "resnet20").seconds == first.seconds  # a hit: nothing retrained

    doc = json.loads(summary.read_text())
    doc["config"]["weight_decay"] = 0.5  # as if trained with another setting under this key
    doc["seconds"] = -1.0
    summary.write_text(json.dumps(doc))
    again = train_cached(cfg, "resnet20")
    assert again.seconds > 0
    assert json.loads(summary.read_text())["config"]["weight_decay"] == first.config.weight_decay
