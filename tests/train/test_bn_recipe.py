"""Frozen BatchNorm scales and a separate learning rate for BatchNorm shifts (freeze_bn_scale,
bn_shift_lr): the optimizer's groups, what the training loop does with them, and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reslab import create_model
from reslab.checkpoint import load_state_dict_file
from reslab.cli import build_parser
from reslab.train import Callback, TrainConfig, make_optimizer, make_train_step, resume, train
from reslab.train.step import freeze_bn_scales


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("decay_bn_bias, shift_decay, groups", [(True, 5e-4 / 64, 2), (False, 0.0, 3)])
def test_bn_shifts_get_their_own_group_with_the_same_decay_per_step(decay_bn_bias, shift_decay,
                                                                     groups):
    model = net()
    opt = make_optimizer(model, TrainConfig(weight_decay=5e-4, decay_bn_bias=decay_bn_bias,
                                            bn_shift_lr=64))
    assert len(opt.param_groups) == groups
    shift = group_of(opt, model[1].bias)
    assert [p is model[1].bias for p in shift["params"]] == [True]
    assert shift["lr_scale"] == 64 and shift["weight_decay"] == pytest.approx(shift_decay)
    for other in (model[0].weight, model[1].weight, model[5].weight, model[5].bias):
        assert "lr_scale" not in group_of(opt, other)
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in opt.param_groups) == 5


def test_without_a_shift_lr_the_groups_are_the_usual_ones():
    opt = make_optimizer(net(), TrainConfig(weight_decay=5e-4, decay_bn_bias=False))
    assert [(g["weight_decay"], len(g["params"]), "lr_scale" in g) for g in opt.param_groups] == [
        (5e-4, 2, False), (0.0, 3, False)]


def test_frozen_scales_stay_out_of_the_optimizer_and_do_not_move():
    model = net()
    assert freeze_bn_scales(model) == 1
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    opt = make_optimizer(model, TrainConfig(lr=0.5, weight_decay=5e-4))
    assert all(p is not model[1].weight for g in opt.param_groups for p in g["params"])
    step = make_train_step(model, opt)
    for _ in range(3):
        step(*batch())
    assert torch.equal(model[1].weight, torch.ones(4))
    assert not torch.equal(model[1].bias, torch.zeros(4))


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


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny, stop_at_step):
    settings = dict(recipe="fast", freeze_bn_scale=True, bn_shift_lr=16.0, precision="fp32",
                    ema_decay=0.9)
    full = train(tiny(out=str(tmp_path / "a"), **settings))
    part = train(tiny(out=str(tmp_path / "b"), **settings), callbacks=[stop_at_step(4)])
    assert (part.status, part.steps) == ("stopped", 4)
    rest = resume(tmp_path / "b")
    assert (rest.status, rest.steps) == ("completed", full.steps)
    a = load_state_dict_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["bn1.weight"], torch.ones_like(a["bn1.weight"]))
