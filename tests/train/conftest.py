"""Tiny, fast training setups shared by the trainer tests (digits subsets, ResNet-20 at 8×8)."""

from __future__ import annotations

import pytest

from reslab.train import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    """ResNet-20 on 192 digits images, batch 64: 3 steps an epoch, ~0.1 s a step on 2 cores."""
    values = dict(model="resnet20", data="digits", train_limit=192, test_limit=100, batch_size=64,
                  epochs=3, progress="none", deterministic=True)
    values.update(overrides)
    return TrainConfig.from_recipe(values.pop("recipe", "default"), **values)


@pytest.fixture(scope="session")
def tiny():
    return tiny_config
