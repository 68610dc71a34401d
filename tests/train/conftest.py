"""Tiny, fast training setups shared by the trainer tests (digits subsets, ResNet-20 at 8×8)."""

from __future__ import annotations

import pytest

from reslab.train import Callback, StopTraining, TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    """ResNet-20 on 192 digits images, batch 64: 3 steps an epoch, ~0.1 s a step on 2 cores."""
    values = dict(model="resnet20", data="digits", train_limit=192, test_limit=100, batch_size=64,
                  epochs=3, progress="none", deterministic=True)
    values.update(overrides)
    return TrainConfig.from_recipe(values.pop("recipe", "default"), **values)


@pytest.fixture(scope="session")
def tiny():
    return tiny_config


class StopAtStep(Callback):
    """Interrupts a run (as Ctrl-C would, but cleanly) once it has finished step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            raise StopTraining


@pytest.fixture(scope="session")
def stop_at_step():
    return StopAtStep
