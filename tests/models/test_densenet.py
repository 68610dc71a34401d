"""DenseNet (Huang et al. 2017): exact sizes, torchvision layout, dense connectivity, options."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab
from reslab.models.densenet import (
    DenseLayer, DenseNet, Transition, cifar_densenet, remap_legacy_densenet_keys,
)

# torchvision's published counts, DenseNet-264 computed (paper-numbers.md D.2).
IMAGENET_PARAMS = {121: 7_978_856, 161: 28_681_000, 169: 14_149_480, 201: 20_013_928,
                   264: 33_337_704}
# paper-numbers.md D.3, computed with the 10-class head.
CIFAR_PARAMS = {
    "densenet40_k12": 1_019_722, "densenet100_k12": 6_979_642, "densenet100_k24": 27_249_082,
    "densenet_bc100_k12": 769_162, "densenet_bc250_k24": 15_324_406,
    "densenet_bc190_k40": 25_624_430,
}
# (growth rate, init features, layers per block) from [D] Table 1 / torchvision.
IMAGENET_ARCH = {121: (32, 64, (6, 12, 24, 16)), 161: (48, 96, (6, 12, 36, 24)),
                 169: (32, 64, (6, 12, 32, 32)), 201: (32, 64, (6, 12, 48, 32)),
                 264: (32, 64, (6, 12, 64, 48))}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kw) -> DenseNet:
    """Two CIFAR-style blocks of two layers: cheap enough to check numbers by hand."""
    torch.manual_seed(0)
    kw = {"growth_rate": 4, "bottleneck": True, "compression": 0.5, "stem": "cifar",
          "num_classes": 3, **kw}
    return DenseNet((2, 2), **kw)


# --- sizes ---


@pytest.mark.parametrize("depth", sorted(IMAGENET_PARAMS))
def test_imagenet_densenet_parameter_count_is_exact(depth):
    assert reslab.model_info(f"densenet{depth}").params == IMAGENET_PARAMS[depth]


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_densenet_parameter_count_matches_table_2(name):
    assert reslab.model_info(name).params == CIFAR_PARAMS[name]


def test_densenet121_macs_agree_with_torchvision_within_one_percent():
    macs = reslab.model_info("densenet121").macs  # torchvision _ops: 2.834 GFLOPS (= GMACs)
    assert abs(macs - 2.834e9) / 2.834e9 < 0.01


def test_model_info_fields():
    info = reslab.model_info("densenet_bc100_k12")
    assert (info.family, info.depth, info.dataset, info.input_size, info.num_classes) == (
        "densenet_cifar", 100, "cifar10", (3, 32, 32), 10)
    assert "Huang et al. 2017" in info.paper
    assert reslab.model_info("densenet201").family == "densenet"
    assert reslab.list_models(family="densenet") == [
        "densenet121", "densenet161", "densenet169", "densenet201", "densenet264"]


# --- torchvision layout ---


def expected_torchvision_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """torchvision's densenet state_dict keys and shapes, written from its architecture."""
    k, c, blocks = IMAGENET_ARCH[depth]
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, ch: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (ch,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["features.conv0.weight"] = (c, 3, 7, 7)
    bn("features.norm0", c)
    for b, count in enumerate(blocks, 1):
        for layer in range(1, count + 1):
            p = f"features.denseblock{b}.denselayer{layer}"
            bn(f"{p}.norm1", c)
            keys[f"{p}.conv1.weight"] = (4 * k, c, 1, 1)
            bn(f"{p}.norm2", 4 * k)
            keys[f"{p}.conv2.weight"] = (k, 4 * k, 3, 3)
            c += k
        if b < len(blocks):
            bn(f"features.transition{b}.norm", c)
            keys[f"features.transition{b}.conv.weight"] = (c // 2, c, 1, 1)
            c //= 2
    bn("features.norm5", c)
    keys["classifier.weight"] = (1000, c)
    keys["classifier.bias"] = (1000,)
    return keys


def test_expected_key_generator_reproduces_torchvision_counts():
    for depth in (121, 161, 169, 201):
        shapes = [s for key, s in expected_torchvision_keys(depth).items()
                  if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert sum(torch.Size(s).numel() for s in shapes) == IMAGENET_PARAMS[depth]


@pytest.mark.parametrize("depth", [121, 161, 169, 201])
def test_imagenet_densenet_has_torchvision_state_dict_keys_and_shapes(depth):
    with torch.device("meta"):
        model = reslab.create_model(f"densenet{depth}")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_torchvision_keys(depth)
    assert list(got) == list(expected_torchvision_keys(depth))


def test_imagenet_stem_and_head_are_torchvisions():
    model = reslab.create_model("densenet121")
    conv0, pool0 = model.features.conv0, model.features.pool0
    assert (conv0.kernel_size, conv0.stride, conv0.padding) == ((7, 7), (2, 2), (3, 3))
    assert (pool0.kernel_size, pool0.stride, pool0.padding) == (3, 2, 1)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.num_features == 1024 and model.classifier.in_features == 1024
    # head: ReLU after norm5, global average pool, linear
    model.eval()
    x = torch.randn(2, 1024, 3, 3)
    n5 = model.features.norm5
    with torch.no_grad():
        nn.init.uniform_(n5.bias, -1, 1)
        expected = model.classifier(F.relu(n5(x)).mean((2, 3)))
        torch.testing.assert_close(model.forward_head(x), expected)


def _legacy_name(key: str) -> str:
    # The inverse of the renaming torchvision applies on load: "norm1" -> "norm.1" in dense layers.
    return re.sub(r"(denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", key)


def test_remap_legacy_keys_loads_an_old_torchvision_checkpoint():
    model = reslab.create_model("densenet121")
    state = model.state_dict()
    legacy = {_legacy_name(k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock3.denselayer24.conv.2.weight" in legacy
    remapped = remap_legacy_densenet_keys(legacy)
    assert list(remapped) == list(state)  # every key renamed, order kept
    assert all(remapped[k] is state[k] for k in state)
    fresh = reslab.create_model("densenet121")
    fresh.load_state_dict(remapped, strict=True)
    assert torch.equal(fresh.features.denseblock2.denselayer5.norm2.running_var,
                       state["features.denseblock2.denselayer5.norm2.running_var"])


def test_remap_legacy_keys_leaves_other_keys_and_rejects_duplicates():
    t = torch.zeros(1)
    kept = {"features.transition1.norm.weight": t, "module.classifier.bias": t,
            "features.norm5.running_mean": t}
    assert remap_legacy_densenet_keys(kept) == kept
    both = {"features.denseblock1.denselayer1.norm.1.weight": t,
            "features.denseblock1.denselayer1.norm1.weight": t}
    with pytest.raises(ValueError, match=r"both the legacy key .*norm\.1\.weight.*keep only one"):
        remap_legacy_densenet_keys(both)


# --- every model runs ---


def _all_densenets() -> list[str]:
    return reslab.list_models("densenet*")


@pytest.mark.parametrize("name", _all_densenets())
def test_every_model_runs_forward_and_backward_in_train_eval_and_channels_last(name):
    info = reslab.model_info(name)
    # Every net at its minimum input size (a 1×1 last stage): 32² for ImageNet, 4² for CIFAR.
    size = 32 if info.dataset == "imagenet" else 4
    torch.manual_seed(0)
    model = reslab.create_model(name, num_classes=5)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.to(memory_format=torch.channels_last))
    # Untrained deep DenseNets in eval mode reach outputs of ~1e7 (running var 1 does not
    # normalise), so the tolerance is relative to the output's scale.
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-4)
    model_cl.train()
    model_cl(x.to(memory_format=torch.channels_last)).sum().backward()


# --- dense connectivity (Eq. 2) and transitions ---


def _randomise_bn(model: nn.Module) -> nn.Module:
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _bn(m: nn.BatchNorm2d, x):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def test_basic_layer_is_bn_relu_conv3x3_of_the_concatenation():
    torch.manual_seed(0)
    layer = _randomise_bn(DenseLayer(6, 4, bottleneck=False))
    assert not hasattr(layer, "conv2") and layer.conv1.kernel_size == (3, 3)
    x0, x1 = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)
    expected = F.conv2d(F.relu(_bn(layer.norm1, torch.cat([x0, x1], 1))), layer.conv1.weight,
                        padding=1)
    with torch.no_grad():
        torch.testing.assert_close(layer([x0, x1]), expected)


def test_bottleneck_layer_is_bn_relu_conv1x1_4k_then_bn_relu_conv3x3_k():
    torch.manual_seed(0)
    layer = _randomise_bn(DenseLayer(6, 4, bottleneck=True, bn_size=4))
    assert layer.conv1.weight.shape == (16, 6, 1, 1) and layer.conv2.weight.shape == (4, 16, 3, 3)
    x0, x1 = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 5, 5)
    a = F.conv2d(F.relu(_bn(layer.norm1, torch.cat([x0, x1], 1))), layer.conv1.weight)
    expected = F.conv2d(F.relu(_bn(layer.norm2, a)), layer.conv2.weight, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(layer([x0, x1]), expected)


def test_dense_block_concatenates_its_input_and_every_layers_output():
    model = _randomise_bn(tiny())
    block = model.features.denseblock1
    assert [layer.norm1.num_features for layer in block.values()] == [8, 12]  # 2k, 2k + k
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y1 = block.denselayer1([x])
        y2 = block.denselayer2([x, y1])
        torch.testing.assert_close(block(x), torch.cat([x, y1, y2], 1))


def test_bc100_channel_counts_follow_growth_and_compression():
    model = reslab.create_model("densenet_bc100_k12")
    assert model.features.conv0.out_channels == 24  # 2k for BC
    assert len(model.features.denseblock1) == 16  # (100 - 4) / 6
    # 24 + 16·12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342
    assert model.features.transition1.conv.weight.shape[:2] == (108, 216)
    assert model.features.transition2.conv.weight.shape[:2] == (150, 300)
    assert model.num_features == 342
    basic = reslab.create_model("densenet40_k12")
    assert basic.features.conv0.out_channels == 16 and len(basic.features.denseblock3) == 12
    assert basic.features.transition1.conv.weight.shape[:2] == (160, 160)  # θ = 1
    assert basic.num_features == 16 + 3 * 12 * 12


def test_compression_keeps_the_floor_of_theta_m_channels():
    model = DenseNet((3, 1), growth_rate=5, bottleneck=False, compression=0.5, stem="cifar")
    # 16 + 3·5 = 31 channels -> ⌊15.5⌋ = 15
    assert model.features.transition1.conv.out_channels == 15
    model = DenseNet((2, 1), growth_rate=4, bottleneck=False, compression=0.3, stem="cifar")
    assert model.features.transition1.conv.out_channels == 7  # ⌊0.3 · 24⌋


def test_transition_is_bn_relu_conv1x1_avgpool():
    torch.manual_seed(0)
    t = _randomise_bn(Transition(6, 3))
    assert list(dict(t.named_children())) == ["norm", "relu", "conv", "pool"]
    x = torch.randn(2, 6, 6, 6)
    expected = F.avg_pool2d(F.conv2d(F.relu(_bn(t.norm, x)), t.conv.weight), 2)
    with torch.no_grad():
        torch.testing.assert_close(t(x), expected)


def test_forward_stages_returns_every_dense_block_output():
    with torch.no_grad():
        stages = reslab.create_model("densenet121").eval().forward_stages(torch.randn(1, 3, 64, 64))
    # 64 + 6·32 = 256 at stride 4; 128 + 12·32 = 512; 256 + 24·32 = 1024; 512 + 16·32 = 1024
    assert [tuple(s.shape) for s in stages] == [
        (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 1024, 2, 2)]
    cifar = reslab.create_model("densenet_bc100_k12")
    assert cifar.num_stages == 3 and cifar.min_input_size == 4
    with torch.no_grad():
        shapes = [tuple(s.shape) for s in cifar.eval().forward_stages(torch.randn(1, 3, 8, 8))]
    assert shapes == [(1, 216, 8, 8), (1, 300, 4, 4), (1, 342, 2, 2)]


def test_units_lists_every_dense_layer_in_order():
    model = reslab.create_model("densenet121")
    units = model.units()
    assert len(units) == 6 + 12 + 24 + 16 and all(isinstance(u, DenseLayer) for u in units)
    assert units[0] is model.features.denseblock1.denselayer1
    assert units[-1] is model.features.denseblock4.denselayer16
    assert len(reslab.create_model("densenet_bc100_k12").units()) == 48


# --- options ---


def test_overrides_turn_densenet100_into_densenet_bc100():
    model = reslab.create_model("densenet100_k12", bottleneck=True, compression=0.5)
    assert n_params(model) == CIFAR_PARAMS["densenet_bc100_k12"]
    wider = reslab.create_model("densenet_bc100_k12", growth_rate=24)
    assert wider.features.conv0.out_channels == 48 and wider.growth_rate == 24
    assert reslab.create_model("densenet121", growth_rate=48).features.conv0.out_channels == 96


def test_drop_rate_drops_after_every_conv_in_training_only():
    model = tiny(drop_rate=0.5)
    layer = model.features.denseblock1.denselayer1
    seen = {}
    layer.norm2.register_forward_hook(lambda m, i, o: seen.update(after_conv1=i[0]))
    model.features.norm5.register_forward_hook(lambda m, i, o: seen.update(block_out=i[0]))
    assert isinstance(model.features.transition1.drop, nn.Dropout)
    assert model.features.transition1.drop.p == 0.5
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model(x)
    zeros = (seen["after_conv1"] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6  # dropout right after the 1×1 conv
    # the new channels of the last layer (after its 3×3 conv) are dropped as well
    new = seen["block_out"][:, -4:]
    assert 0.4 < (new == 0).float().mean().item() < 0.6
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model(x)
    assert (seen["after_conv1"] == 0).float().mean().item() < 0.01
    # no dropout module when off, so the module tree is exactly torchvision's
    assert not hasattr(tiny().features.transition1, "drop")


def test_memory_efficient_gives_the_same_outputs_gradients_and_running_stats():
    plain = tiny(drop_rate=0.2)
    efficient = copy.deepcopy(plain)
    for layer in efficient.units():
        layer.memory_efficient = True
    calls = []
    efficient.features.denseblock1.denselayer2.conv1.register_forward_hook(
        lambda m, i, o: calls.append(1))
    x = torch.randn(3, 3, 8, 8)
    outs = []
    for model in (plain, efficient):
        model.train()
        torch.manual_seed(123)  # same dropout masks
        out = model(x)
        (out * torch.arange(1.0, 4.0)).sum().backward()
        outs.append(out)
    assert len(calls) == 2  # forward once, recomputed once in backward: it really checkpoints
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, b), c in zip(plain.named_buffers(), efficient.buffers()):
        torch.testing.assert_close(c, b, msg=name)  # BN statistics updated once, not twice
    assert efficient.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 1


def test_memory_efficient_option_reaches_every_layer_and_is_off_by_default():
    model = reslab.create_model("densenet_bc100_k12", memory_efficient=True)
    assert all(u.memory_efficient for u in model.units())
    assert not any(u.memory_efficient for u in reslab.create_model("densenet_bc100_k12").units())


def test_in_chans_and_num_classes_are_honoured():
    model = reslab.create_model("densenet40_k12", in_chans=1, num_classes=7)
    assert model.features.conv0.in_channels == 1 and model.classifier.out_features == 7
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_he_initialisation_and_zero_classifier_bias():
    torch.manual_seed(0)
    model = reslab.create_model("densenet121")
    w = model.features.denseblock3.denselayer1.conv2.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert w.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert torch.all(model.classifier.bias == 0)


# --- errors ---


def test_wrong_channel_count_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*in_chans=1"):
        reslab.create_model("densenet40_k12")(torch.randn(2, 1, 8, 8))


def test_input_too_small_for_the_stride_names_the_minimum():
    with pytest.raises(ValueError, match=r"H, W >= 32"):
        reslab.create_model("densenet121")(torch.randn(1, 3, 16, 16))


def test_bad_options_are_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"depth 3n\+4"):
        cifar_densenet(41)
    with pytest.raises(ValueError, match=r"depth 6n\+4 with bottleneck"):
        cifar_densenet(43, bottleneck=True)  # 3n+4 but not 6n+4
    with pytest.raises(ValueError, match=r"compression θ must be in \(0, 1\]"):
        reslab.create_model("densenet_bc100_k12", compression=0.0)
    with pytest.raises(ValueError, match="stem must be one of imagenet, cifar"):
        DenseNet(stem="mnist")
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
        reslab.create_model("densenet40_k12", drop_rate=1.0)
    with pytest.raises(ValueError, match="block_config needs at least one block"):
        DenseNet(())
