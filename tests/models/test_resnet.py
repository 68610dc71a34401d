"""The ResNet family: exact sizes, torchvision layout, unit variants and shortcut options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.models.resnet import BasicBlock, Bottleneck, ResNet, ResidualUnit, cifar_resnet

# He et al. 2015, Table 6 (computed counts, paper-numbers.md G.1); plain twins have the same counts.
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962,
                1202: 19_421_274}
# torchvision's published counts (paper-numbers.md F.1).
IMAGENET_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                   152: 60_192_808}
IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                   152: (3, 8, 36, 3)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_resnet_parameter_count_is_exact(depth):
    assert reslab.model_info(f"resnet{depth}").params == CIFAR_PARAMS[depth]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_twin_has_the_same_parameters_as_option_a_resnet(depth):
    assert reslab.model_info(f"plain{depth}").params == CIFAR_PARAMS[depth]


@pytest.mark.parametrize("depth", sorted(IMAGENET_PARAMS))
def test_imagenet_resnet_parameter_count_matches_torchvision(depth):
    assert reslab.model_info(f"resnet{depth}").params == IMAGENET_PARAMS[depth]


def test_preact_resnet164_parameter_count():
    assert reslab.model_info("preact_resnet164").params == 1_703_258


def test_resnet50_macs_agree_with_torchvision_within_one_percent():
    macs = reslab.model_info("resnet50").macs
    assert abs(macs - 4.089e9) / 4.089e9 < 0.01


def expected_torchvision_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet state_dict keys and shapes, written from its architecture definition."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    in_ch = 64
    for stage, (count, width) in enumerate(zip(IMAGENET_LAYERS[depth], (64, 128, 256, 512)), 1):
        out = width * expansion
        for i in range(count):
            p = f"layer{stage}.{i}"
            if bottleneck:
                shapes = [(width, in_ch, 1, 1), (width, width, 3, 3), (out, width, 1, 1)]
            else:
                shapes = [(width, in_ch, 3, 3), (width, width, 3, 3)]
            for j, shape in enumerate(shapes, 1):
                keys[f"{p}.conv{j}.weight"] = shape
                bn(f"{p}.bn{j}", shape[0])
            if i == 0 and (stage > 1 or in_ch != out):
                keys[f"{p}.downsample.0.weight"] = (out, in_ch, 1, 1)
                bn(f"{p}.downsample.1", out)
            in_ch = out
    keys["fc.weight"] = (1000, in_ch)
    keys["fc.bias"] = (1000,)
    return keys


@pytest.mark.parametrize("depth", sorted(IMAGENET_LAYERS))
def test_imagenet_resnet_has_torchvision_state_dict_keys_and_shapes(depth):
    with torch.device("meta"):
        model = reslab.create_model(f"resnet{depth}")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_torchvision_keys(depth)
    assert list(got) == list(expected_torchvision_keys(depth))  # same order as torchvision too


def test_stride_in_1x1_moves_the_stride_and_keeps_the_size():
    v15 = reslab.create_model("resnet50")
    v1 = reslab.create_model("resnet50", stride_in_1x1=True)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert n_params(v1) == n_params(v15)
    assert reslab.complexity(v1, (3, 224, 224)).macs < reslab.complexity(v15, (3, 224, 224)).macs


def _all_resnet_family_models() -> list[str]:
    return [n for n in reslab.list_models() if n.startswith(("resnet", "plain", "preact_resnet"))]


@pytest.mark.parametrize("name", _all_resnet_family_models())
def test_every_model_runs_forward_and_backward_in_train_eval_and_channels_last(name):
    info = reslab.model_info(name)
    size = 32 if info.dataset == "imagenet" else 8
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=5)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    model_cl.train()
    model_cl(x.to(memory_format=torch.channels_last)).sum().backward()


# --- unit variants (He et al. 2016, Fig. 4): operation order checked against hand-written math ---


def _unit(unit: str, in_ch=8, width=8, stride=1, shortcut="B", **kw) -> BasicBlock:
    torch.manual_seed(0)
    m = BasicBlock(in_ch, width, stride, shortcut=shortcut, unit=unit, **kw)
    for bn in [m for m in m.modules() if isinstance(m, nn.BatchNorm2d)]:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _bn(m: nn.BatchNorm2d, x):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _conv(m: nn.Conv2d, x):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding)


EXPECTED_UNIT = {
    # (a) original: y = ReLU(x + BN(conv(ReLU(BN(conv(x))))))
    "original": lambda m, x: F.relu(x + _bn(m.bn2, _conv(m.conv2, F.relu(_bn(m.bn1, _conv(m.conv1, x)))))),
    # (b) BN after addition: y = ReLU(BN(x + conv(ReLU(BN(conv(x))))))
    "bn_after_add": lambda m, x: F.relu(_bn(m.bn2, x + _conv(m.conv2, F.relu(_bn(m.bn1, _conv(m.conv1, x)))))),
    # (c) ReLU before addition: y = x + ReLU(BN(conv(ReLU(BN(conv(x))))))
    "relu_before_add": lambda m, x: x + F.relu(_bn(m.bn2, _conv(m.conv2, F.relu(_bn(m.bn1, _conv(m.conv1, x)))))),
    # (d) ReLU-only pre-activation: y = x + BN(conv(ReLU(BN(conv(ReLU(x))))))
    "relu_preact": lambda m, x: x + _bn(m.bn2, _conv(m.conv2, F.relu(_bn(m.bn1, _conv(m.conv1, F.relu(x)))))),
    # (e) full pre-activation: y = x + conv(ReLU(BN(conv(ReLU(BN(x))))))
    "full_preact": lambda m, x: x + _conv(m.conv2, F.relu(_bn(m.bn2, _conv(m.conv1, F.relu(_bn(m.bn1, x)))))),
}


@pytest.mark.parametrize("unit", sorted(EXPECTED_UNIT))
def test_unit_variant_computes_its_figure_4_order(unit):
    m = _unit(unit)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), EXPECTED_UNIT[unit](m, x))


def test_full_preact_projection_shortcut_sees_the_preactivated_input():
    m = _unit("full_preact", in_ch=8, width=16, stride=2)
    x = torch.randn(2, 8, 6, 6)
    a = F.relu(_bn(m.bn1, x))
    expected = _conv(m.downsample, a) + _conv(m.conv2, F.relu(_bn(m.bn2, _conv(m.conv1, a))))
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected)
    assert isinstance(m.downsample, nn.Conv2d)  # no BN on a pre-activation projection


def test_preact_models_end_with_bn_relu_and_imagenet_first_unit_reuses_the_stem_activation():
    m = reslab.create_model("preact_resnet50")
    assert isinstance(m.final_bn, nn.BatchNorm2d) and m.final_bn.num_features == 2048
    assert not hasattr(m.layer1[0], "bn1")  # stem already ends in BN-ReLU
    assert hasattr(m.layer1[1], "bn1") and m.layer1[1].bn1.num_features == 256
    c = reslab.create_model("preact_resnet110")
    assert not hasattr(c, "bn1")  # CIFAR pre-act stem is a bare conv ...
    assert c.layer1[0].bn1.num_features == 16  # ... normalised by the first unit


# --- shortcut options A/B/C (He et al. 2015, Sec. 3.3) ---


def test_option_a_adds_no_parameters_and_zero_pads_channels():
    a = cifar_resnet(20, shortcut="A")
    assert n_params(a) == n_params(cifar_resnet(20, shortcut="none"))
    unit = a.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    s = unit.downsample(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_option_b_projects_only_where_the_shape_changes_and_c_projects_every_unit():
    def projections(model):
        return [isinstance(u.downsample, nn.Sequential) for u in model.units()]

    b = cifar_resnet(20, shortcut="B")
    c = cifar_resnet(20, shortcut="C")
    assert projections(b) == [False] * 3 + [True, False, False] + [True, False, False]
    assert all(projections(c))
    r34c = reslab.create_model("resnet34", shortcut="C")
    assert sum(projections(r34c)) == 16  # every unit; 13 more than option B's three
    assert n_params(cifar_resnet(20, shortcut="A")) < n_params(b) < n_params(c)


def test_plain_network_has_no_shortcut():
    plain = reslab.create_model("plain20")
    unit = plain.layer1[1].eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(unit(x), F.relu(unit.residual(x)))


# --- shortcut variants (He et al. 2016, Fig. 2 / Table 1) ---


def test_constant_scaling_halves_both_paths():
    m = _unit("original", shortcut_variant="scaling", shortcut_scale=0.5, residual_scale=0.5)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.relu(0.5 * x + 0.5 * m.residual(x)))


@pytest.mark.parametrize("variant", ["exclusive_gating", "shortcut_gating"])
def test_gates_start_with_the_configured_bias(variant):
    m = _unit("original", shortcut_variant=variant, gate_bias=-6.0)
    assert torch.all(m.gate.bias == -6.0) and torch.all(m.gate.weight == 0)
    x = torch.randn(2, 8, 6, 6)
    g = torch.sigmoid(torch.tensor(-6.0))
    f = m.residual(x)
    expected = (1 - g) * x + (g * f if variant == "exclusive_gating" else f)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.relu(expected))


def test_conv1x1_shortcut_variant_projects_every_unit_and_dropout_shortcut_drops():
    m = cifar_resnet(20, shortcut_variant="conv1x1")
    assert all(isinstance(u.downsample, nn.Sequential) for u in m.units())
    d = _unit("original", shortcut_variant="dropout", shortcut_dropout=0.5).train()
    assert isinstance(d.shortcut_drop, nn.Dropout) and d.shortcut_drop.p == 0.5


def test_plain_network_rejects_shortcut_variants():
    with pytest.raises(ValueError, match="plain network"):
        cifar_resnet(20, shortcut="none", shortcut_variant="scaling")


# --- options ---


def test_zero_init_residual_makes_every_unit_an_identity_at_start():
    model = reslab.create_model("resnet20", zero_init_residual=True).eval()
    x = F.relu(torch.randn(2, 16, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.layer1[0](x), x)


def test_lesioned_unit_keeps_only_its_shortcut():
    model = reslab.create_model("resnet20").eval()
    x = F.relu(torch.randn(2, 16, 8, 8))
    unit = model.layer2[0]
    unit.lesioned = True
    with torch.no_grad():
        torch.testing.assert_close(unit(x), unit.downsample(x))
        model.layer1[1].lesioned = True
        torch.testing.assert_close(model.layer1[1](x), x)
    plain_unit = reslab.create_model("plain20").eval().layer2[0]
    plain_unit.lesioned = True
    with torch.no_grad():
        assert plain_unit(x).shape == (2, 32, 4, 4)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = reslab.create_model("resnet20", drop_path_rate=0.5)
    rates = [u.drop_path.p for u in model.units() if hasattr(u.drop_path, "p")]
    assert rates[0] < rates[-1] == pytest.approx(0.5)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_in_chans_and_num_classes_are_honoured():
    model = reslab.create_model("resnet20", in_chans=1, num_classes=7)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_he_initialisation():
    torch.manual_seed(0)
    model = reslab.create_model("resnet50")
    w = model.layer3[0].conv2.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


# --- errors ---


def test_wrong_channel_count_names_the_expected_shape():
    model = reslab.create_model("resnet20")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*in_chans=1"):
        model(torch.randn(2, 1, 32, 32))


def test_input_too_small_for_the_stride_names_the_minimum():
    model = reslab.create_model("resnet18")
    with pytest.raises(ValueError, match=r"H, W >= 32"):
        model(torch.randn(1, 3, 16, 16))


def test_bad_options_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match="shortcut must be one of A, B, C, none"):
        reslab.create_model("resnet20", shortcut="D")
    with pytest.raises(ValueError, match="unit must be one of"):
        reslab.create_model("resnet20", unit="preact")
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)


def test_units_lists_every_residual_unit_in_order():
    model = reslab.create_model("resnet56")
    units = model.units()
    assert len(units) == 27 and all(isinstance(u, ResidualUnit) for u in units)
    assert units[0] is model.layer1[0] and units[-1] is model.layer3[-1]
    assert isinstance(reslab.create_model("resnet50").units()[0], Bottleneck)
    assert isinstance(ResNet().units()[0], BasicBlock)
