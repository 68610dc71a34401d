"""ResNet-9 (Page 2018, DAWNBench): size, arithmetic, residual units, logit scale, features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab.models.resnet9 import Residual, ResNet9


def conv_params(c_in: int, c_out: int) -> int:
    """A bias-free 3×3 conv and its BN (γ, β)."""
    return c_in * c_out * 9 + 2 * c_out


# stem 3→64; layer1 64→128 + residual (2 × 128→128); layer2 128→256; layer3 256→512 + residual
# (2 × 512→512); bias-free fc 512→10.
RESNET9_PARAMS = (conv_params(3, 64) + conv_params(64, 128) + 2 * conv_params(128, 128)
                  + conv_params(128, 256) + conv_params(256, 512) + 2 * conv_params(512, 512)
                  + 512 * 10)


def test_parameter_count_is_page_2018s():
    assert RESNET9_PARAMS == 6_573_120
    assert reslab.model_info("resnet9").params == 6_573_120
    model = reslab.create_model("resnet9")
    assert sum(p.numel() for p in model.parameters()) == 6_573_120
    assert model.fc.bias is None


def test_macs_at_32x32():
    # Each 3×3 conv: H·W·C_out·C_in·9 at the resolution it runs at (the pool follows the conv).
    convs = (32 * 32 * 64 * 3 * 9            # stem at 32×32
             + 32 * 32 * 128 * 64 * 9        # layer1 conv at 32×32, then pool to 16×16
             + 2 * 16 * 16 * 128 * 128 * 9   # layer1 residual at 16×16
             + 16 * 16 * 256 * 128 * 9       # layer2 conv at 16×16, pool to 8×8
             + 8 * 8 * 512 * 256 * 9         # layer3 conv at 8×8, pool to 4×4
             + 2 * 4 * 4 * 512 * 512 * 9)    # layer3 residual at 4×4
    assert convs + 512 * 10 == 379_261_952
    info = reslab.model_info("resnet9")
    assert info.macs == 379_261_952 and info.input_size == (3, 32, 32)
    assert (info.family, info.depth, info.dataset) == ("resnet9", 9, "cifar10")
    assert reslab.complexity(reslab.create_model("resnet9"), (3, 32, 32)).macs == 379_261_952
    assert "resnet9" in reslab.list_models("resnet*")


def test_output_shape_and_class_and_channel_overrides():
    torch.manual_seed(0)
    model = reslab.create_model("resnet9").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        small = reslab.create_model("resnet9", num_classes=7, in_chans=1).eval()
        assert small.stem[0].in_channels == 1 and small.fc.out_features == 7
        # three 2× max-pools: 8×8 is the smallest input, pooled down to 1×1
        assert small.min_input_size == 8
        assert small(torch.randn(3, 1, 8, 8)).shape == (3, 7)
        # a larger input still gives one logit vector per image (global max-pool)
        assert small(torch.randn(1, 1, 40, 40)).shape == (1, 7)


def test_stages_1_and_3_have_a_residual_unit_and_stage_2_not():
    model = reslab.create_model("resnet9")
    units = [[m for m in layer if isinstance(m, Residual)]
             for layer in (model.layer1, model.layer2, model.layer3)]
    assert [len(u) for u in units] == [1, 0, 1]
    assert [isinstance(m, nn.MaxPool2d) for m in model.layer2] == [False, True]


def test_residual_unit_is_x_plus_two_conv_bn_relu():
    torch.manual_seed(0)
    unit = reslab.create_model("resnet9").layer1[2].eval()
    x = torch.randn(2, 128, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), x + unit.conv2(unit.conv1(x)), rtol=0, atol=0)
        assert not torch.equal(unit(x), x)
        # With the last BN's γ = β = 0 the branch is ReLU(0) = 0: the unit is the identity, and
        # no ReLU follows the addition (the negative inputs come through unchanged).
        unit.conv2[1].weight.zero_()
        unit.conv2[1].bias.zero_()
        out = unit(x)
    assert torch.equal(out, x) and (out < 0).any()


def test_logits_are_an_eighth_of_the_classifier_on_the_global_max_pool():
    torch.manual_seed(0)
    model = reslab.create_model("resnet9").eval()
    unscaled = ResNet9(logit_scale=1.0).eval()
    unscaled.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), unscaled(x)
        pooled = model.forward_stages(x)[-1].amax(dim=(2, 3))  # global max-pool
        fc = model.fc(pooled)
    assert model.logit_scale == 0.125
    assert torch.equal(b, fc)
    assert torch.equal(a * 8, b)  # × 0.125 is exact in binary floating point
    assert not torch.equal(a, b)


def test_features_only_gives_the_three_stages():
    m = reslab.create_model("resnet9", features_only=True).eval()
    assert m.channels == [128, 256, 512] and m.reductions == [2, 4, 8]
    assert [f.module for f in m.feature_info] == ["layer1", "layer2", "layer3"]
    assert not any(n.startswith("model.fc.") for n, _ in m.named_parameters())
    with torch.no_grad():
        feats = m(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]


@pytest.mark.parametrize("kwargs", [dict(widths=(64, 128, 256)),
                                    dict(widths=(32, 64, 128, 256, 512)),
                                    dict(residual=(True, True))])
def test_wrong_number_of_widths_or_flags_is_a_value_error(kwargs):
    with pytest.raises(ValueError, match="ResNet9 takes 4 widths"):
        reslab.create_model("resnet9", **kwargs)


def test_custom_widths_build_a_narrower_net():
    m = reslab.create_model("resnet9", widths=(8, 16, 32, 64), residual=(False, True, False))
    assert m.fc.in_features == 64
    assert [sum(isinstance(u, Residual) for u in layer) for layer in (m.layer1, m.layer2, m.layer3)] == [0, 1, 0]
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("shape, hint", [
    ((2, 3, 4, 4), "Resize or pad the images"),
    ((2, 1, 32, 32), "Create the model with in_chans=1"),
    ((3, 32, 32), "Resize or pad the images"),
])
def test_inputs_it_cannot_take_are_refused_with_the_shape_it_expects(shape, hint):
    with pytest.raises(ValueError, match=r"ResNet9 expects input of shape \(N, 3, H, W\) with H, W >= 8") as e:
        reslab.create_model("resnet9")(torch.randn(*shape))
    assert hint in str(e.value)
