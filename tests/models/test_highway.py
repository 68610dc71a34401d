"""Highway networks (Srivastava et al. 2015): gates, carry path, sizes, ResNet-twin structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.models.highway import HighwayNet, HighwayUnit, cifar_highway, default_gate_bias

DEPTHS = (20, 32, 44, 56, 110)


def highway_params(depth: int, classes: int = 10) -> int:
    """Parameters of a CIFAR highway net: each unit is a ResNet basic unit + a biased 3×3 gate."""
    n = (depth - 2) // 6
    total = 3 * 9 * 16 + 2 * 16  # stem conv + BN
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            h = 9 * in_ch * width + 2 * width + 9 * width * width + 2 * width  # conv-BN-conv-BN
            gate = 9 * in_ch * width + width  # W_T, b_T
            total += h + gate
            in_ch = width
    return total + 64 * classes + classes


def _unit(in_ch=8, out_ch=8, stride=1, **kw) -> HighwayUnit:
    torch.manual_seed(0)
    m = HighwayUnit(in_ch, out_ch, stride, **kw)
    for bn in (m.bn1, m.bn2):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _bn(m: nn.BatchNorm2d, x):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _conv(m: nn.Conv2d, x):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding)


def _h(m: HighwayUnit, x):
    """H(x) = BN(conv(ReLU(BN(conv(x))))), written out independently of the unit's code."""
    return _bn(m.bn2, _conv(m.conv2, F.relu(_bn(m.bn1, _conv(m.conv1, x)))))


def _carry(x, out_ch: int, stride: int):
    """Option A: subsample, then zero-pad the new channels evenly before and after."""
    x = x[:, :, ::stride, ::stride]
    extra = out_ch - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


def _force_gate(unit: HighwayUnit, value: float):
    return unit.gate_out.register_forward_hook(lambda m, i, o: torch.full_like(o, value))


# --- gate bias ---


def test_default_gate_bias_follows_the_papers_depth_guideline():
    assert [default_gate_bias(d) for d in (5, 10, 11, 20, 21, 30, 110)] == [
        -1.0, -1.0, -2.0, -2.0, -3.0, -3.0, -3.0]


@pytest.mark.parametrize("depth,bias", [(20, -2.0), (32, -3.0), (110, -3.0)])
def test_every_gate_bias_starts_at_the_depth_default(depth, bias):
    model = reslab.create_model(f"highway{depth}")
    assert model.gate_bias == bias
    assert all(torch.all(u.transform_gate.bias == bias) for u in model.units())
    assert HighwayNet((1, 1, 1)).units()[0].transform_gate.bias[0].item() == -1.0  # depth 8


def test_gate_bias_override_and_initial_gate_values():
    model = reslab.create_model("highway20", gate_bias=-5.0).eval()
    assert all(torch.all(u.transform_gate.bias == -5.0) for u in model.units())
    unit = model.layer1[0]
    # zero input: the conv contributes nothing, so T = σ(b_T) exactly
    with torch.no_grad():
        t = unit.gate(torch.zeros(1, 16, 4, 4))
    torch.testing.assert_close(t, torch.full_like(t, torch.sigmoid(torch.tensor(-5.0)).item()))


def test_gate_weights_keep_he_initialisation():
    torch.manual_seed(0)
    w = reslab.create_model("highway56").layer3[1].transform_gate.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


# --- the highway layer y = H(x)·T(x) + x·(1 − T(x)) ---


def test_unit_computes_the_gated_combination():
    m = _unit()
    x = torch.randn(2, 8, 6, 6)
    t = torch.sigmoid(_conv(m.transform_gate, x))
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.relu(_h(m, x) * t + x * (1 - t)))


def test_gate_forced_to_one_gives_the_transform_and_to_zero_the_carry():
    m = _unit()
    x = F.relu(torch.randn(2, 8, 6, 6))  # a unit's input is the previous unit's ReLU output
    with torch.no_grad():
        handle = _force_gate(m, 1.0)
        torch.testing.assert_close(m(x), F.relu(_h(m, x)))
        handle.remove()
        handle = _force_gate(m, 0.0)
        assert torch.equal(m(x), x)
        handle.remove()


def test_shape_changing_unit_carries_through_option_a_and_gates_at_output_resolution():
    m = _unit(8, 16, stride=2)
    assert m.transform_gate.stride == (2, 2) and m.transform_gate.out_channels == 16
    x = F.relu(torch.randn(2, 8, 6, 6))
    seen = {}
    m.gate_out.register_forward_hook(lambda mod, i, o: seen.update(t=o))
    with torch.no_grad():
        y = m(x)
        t = seen["t"]
        assert t.shape == (2, 16, 3, 3) == y.shape
        c = _carry(x, 16, 2)
        torch.testing.assert_close(y, F.relu(_h(m, x) * t + c * (1 - t)))
        handle = _force_gate(m, 0.0)
        assert torch.equal(m(x), c)
        handle.remove()
        _force_gate(m, 1.0)
        torch.testing.assert_close(m(x), F.relu(_h(m, x)))


def test_lesioned_unit_returns_the_carry_path_only():
    x = F.relu(torch.randn(2, 8, 6, 6))
    for unit, expected in ((_unit(), x), (_unit(8, 16, 2), _carry(x, 16, 2))):
        unit.lesioned = True
        with torch.no_grad():
            assert torch.equal(unit(x), expected)


def test_hooks_see_the_transform_and_the_gate_and_record_nothing_by_default():
    m = _unit()
    assert m.residual_out is m.transform_out  # same hook point as ResidualUnit.residual_out
    assert isinstance(m.gate_out, nn.Identity) and isinstance(m.transform_out, nn.Identity)
    seen = {}
    m.residual_out.register_forward_hook(lambda mod, i, o: seen.update(h=o))
    m.gate_out.register_forward_hook(lambda mod, i, o: seen.update(t=o))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        m(x)
        torch.testing.assert_close(seen["h"], _h(m, x))
        torch.testing.assert_close(seen["t"], torch.sigmoid(_conv(m.transform_gate, x)))
    fresh = _unit()
    with torch.no_grad():
        fresh(x)
    stored = [k for k, v in vars(fresh).items() if isinstance(v, torch.Tensor)]
    assert stored == [] and not fresh.gate_out._forward_hooks  # a forward keeps no activations


def test_drop_path_drops_the_whole_gated_update_per_sample():
    m = _unit(drop_path=0.5)
    m.drop_path.train()  # only the drop-path in training mode: BN keeps its running statistics
    x = F.relu(torch.randn(64, 8, 4, 4))
    torch.manual_seed(1)
    with torch.no_grad():
        y = m(x)
        t = m.gate(x)
        kept = F.relu(_h(m, x) * (t / 0.5) + x * (1 - t / 0.5))  # T rescaled by 1/keep
    dropped = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    kept_ok = torch.tensor([torch.allclose(y[i], kept[i], atol=1e-5) for i in range(64)])
    assert torch.all(dropped ^ kept_ok) and 16 < dropped.sum() < 48


def test_drop_path_rates_grow_linearly_and_eval_is_deterministic():
    model = reslab.create_model("highway20", drop_path_rate=0.3)
    rates = [u.drop_path.p for u in model.units() if hasattr(u.drop_path, "p")]
    assert len(rates) == 8 and rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --- networks ---


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_count_matches_the_formula(depth):
    assert reslab.model_info(f"highway{depth}").params == highway_params(depth)


def test_parameter_count_values():
    # highway20 = resnet20 (269,722) + 9 gate convs: 3·(9·16·16+16) + (9·16·32+32) + 2·(9·32·32+32)
    # + (9·32·64+64) + 2·(9·64·64+64)
    assert highway_params(20) == 392_170 == 269_722 + 122_448


@pytest.mark.parametrize("depth", DEPTHS)
def test_highway_net_is_its_resnet_plus_one_gate_conv_per_unit(depth):
    with torch.device("meta"):
        highway = reslab.create_model(f"highway{depth}")
        resnet = reslab.create_model(f"resnet{depth}")
    h = {k: v.shape for k, v in highway.state_dict().items() if ".transform_gate." not in k}
    r = {k: v.shape for k, v in resnet.state_dict().items()}
    assert list(h.items()) == list(r.items())
    assert len(highway.units()) == len(resnet.units()) == (depth - 2) // 2


def test_model_info_fields():
    info = reslab.model_info("highway56")
    assert (info.family, info.depth, info.dataset, info.input_size, info.num_classes) == (
        "highway", 56, "cifar10", (3, 32, 32), 10)
    assert "Srivastava et al. 2015" in info.paper
    assert reslab.list_models(family="highway") == [f"highway{d}" for d in DEPTHS]


def test_forward_stages_shapes_and_units_order():
    model = reslab.create_model("highway20").eval()
    with torch.no_grad():
        shapes = [tuple(s.shape) for s in model.forward_stages(torch.randn(2, 3, 32, 32))]
    assert shapes == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    assert (model.num_stages, model.num_features, model.min_input_size) == (3, 64, 4)
    units = model.units()
    assert units[0] is model.layer1[0] and units[3] is model.layer2[0]
    assert units[-1] is model.layer3[-1]
    assert [type(u.carry).__name__ for u in units].count("ZeroPadShortcut") == 2


@pytest.mark.parametrize("name", [f"highway{d}" for d in DEPTHS])
def test_every_model_runs_forward_and_backward_in_train_eval_and_channels_last(name):
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=5)
    x = torch.randn(2, 3, 8, 8)
    model.train()
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(u.transform_gate.bias.grad.abs().sum() > 0 for u in model.units())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    model_cl.train()
    model_cl(x.to(memory_format=torch.channels_last)).sum().backward()


def test_in_chans_and_num_classes_are_honoured():
    model = reslab.create_model("highway20", in_chans=1, num_classes=7)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


# --- errors ---


def test_wrong_input_shape_names_the_expected_shape():
    model = reslab.create_model("highway20")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*in_chans=1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"H, W >= 4"):
        model(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_bad_depth_and_options_are_rejected():
    with pytest.raises(ValueError, match=r"depth 6n\+2.*got 21"):
        cifar_highway(21)
    with pytest.raises(ValueError, match="same length"):
        HighwayNet((3, 3), widths=(16, 32, 64))
    with pytest.raises(ValueError, match="gate_bias must be a finite number"):
        HighwayNet(gate_bias=float("nan"))
