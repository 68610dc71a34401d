"""Frozen BatchNorm scales and a separate learning rate for BatchNorm shifts (freeze_bn_scale,
bn_shift_lr) in training runs: what the loop does with them and the refusals. The optimizer's
groups are tested with the other optimizer tests in test_train_step.py, resume with the others in
test_train_loop.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reslab import create_model
from reslab.cli import build_parser
from reslab.train import Callback, TrainConfig, train
from reslab.train.step import freeze_bn_scales


def test_freezing_a_zero_initialised_scale_is_refused():
    model = create_model("resnet20", zero_init_residual=True)
    with pytest.raises(ValueError, match="all-zero BatchNorm scale of .*zero_init_residual"):
        freeze_bn_scales(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen halfway


def test_bn_shift_lr_must_be_positive():
    with pytest.raises(ValueError, match="bn_shift_lr"):
        TrainConfig(bn_shift_lr=0)


def test_train_command_has_the_flags():
    args = build_parser().parse_args(["train", "--freeze-bn-scale", "--bn-shift-lr", "64"])
    assert (args.freeze_bn_scale, args.bn_shift_lr) == (True, 64.0)


class RecordLr(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[float, list[float]]] = []

    def on_step_end(self, state) -> None:
        self.seen.append((state.lr, [g["lr"] for g in state.optimizer.param_groups]))


def test_the_loop_scales_the_shifts_lr_and_keeps_the_scales_at_one(tiny):
    record = RecordLr()
    cfg = tiny(recipe="fast", freeze_bn_scale=True, bn_shift_lr=8.0, precision="fp32")
    result = train(cfg, callbacks=[record])
    assert len(record.seen) == result.steps
    for lr, groups in record.seen:  # the fast recipe: decayed weights, undecayed, shifts
        assert groups == [lr, lr, pytest.approx(8 * lr)]
    norms = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(not torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
