import pytest
import torch
from torch import nn

from reslab.train import EMA, TrainConfig, make_optimizer, make_train_step
from reslab.train.step import freeze_bn_scales


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_repeated_steps_lower_the_loss(precision):
    model = tiny_net()
    opt = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0))
    step = make_train_step(model, opt, precision=precision, channels_last=True)
    x, y = batch()
    x = x.contiguous(memory_format=torch.channels_last)
    first = step(x, y).loss.item()
    for _ in range(20):
        out = step(x, y)
    assert out.loss.item() < first and 0 <= out.correct.item() <= 16


def test_fp16_needs_a_grad_scaler():
    model = tiny_net()
    with pytest.raises(ValueError, match="fp16 training needs a GradScaler"):
        make_train_step(model, make_optimizer(model, TrainConfig()), precision="fp16")


def test_gradient_clipping_bounds_the_update():
    model = tiny_net()
    opt = make_optimizer(model, TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    make_train_step(model, opt, grad_clip=1e-3)(*batch())
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_bn_and_bias_can_be_spared_weight_decay():
    model = tiny_net()
    groups = make_optimizer(model, TrainConfig(weight_decay=5e-4, decay_bn_bias=False)).param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert [len(g["params"]) for g in groups] == [2, 3]  # conv + fc weights; BN γ, β, fc bias
    assert len(make_optimizer(model, TrainConfig()).param_groups) == 1


def test_nesterov_and_momentum_reach_the_optimizer():
    g = make_optimizer(tiny_net(), TrainConfig(momentum=0.8, nesterov=True)).param_groups[0]
    assert (g["momentum"], g["nesterov"], g["dampening"]) == (0.8, True, 0.0)


def test_ema_is_the_exponential_average_of_the_weights():
    model = tiny_net()
    ema = EMA(model, decay=0.75)
    w0 = model[5].weight.detach().clone()
    with torch.no_grad():
        model[5].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.module[5].weight, 0.75 * w0 + 0.25 * (w0 + 1.0))
    assert ema.module[1].num_batches_tracked.item() == 7  # integer buffers are copied


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("decay_bn_bias, shift_decay, groups", [(True, 5e-4 / 64, 2), (False, 0.0, 3)])
def test_bn_shifts_get_their_own_group_with_the_same_decay_per_step(decay_bn_bias, shift_decay,
                                                                     groups):
    model = tiny_net()
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
    opt = make_optimizer(tiny_net(), TrainConfig(weight_decay=5e-4, decay_bn_bias=False))
    assert [(g["weight_decay"], len(g["params"]), "lr_scale" in g) for g in opt.param_groups] == [
        (5e-4, 2, False), (0.0, 3, False)]


def test_frozen_scales_stay_out_of_the_optimizer_and_do_not_move():
    model = tiny_net()
    assert freeze_bn_scales(model) == 1
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    opt = make_optimizer(model, TrainConfig(lr=0.5, weight_decay=5e-4))
    assert all(p is not model[1].weight for g in opt.param_groups for p in g["params"])
    step = make_train_step(model, opt)
    for _ in range(3):
        step(*batch())
    assert torch.equal(model[1].weight, torch.ones(4))
    assert not torch.equal(model[1].bias, torch.zeros(4))
