"""features_only: per-stage feature maps with measured channels and reductions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab.models.features import FeatureExtractor


def test_resnet50_feature_info_channels_and_reductions():
    with torch.device("meta"):  # shapes only: no memory, no compute
        m = reslab.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    assert m.channels == [256, 512, 1024, 2048]
    assert m.reductions == [4, 8, 16, 32]
    assert [f.module for f in m.feature_info] == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", ["resnet20", "highway20"])
def test_cifar_nets_have_features_at_strides_1_2_4(name):
    m = reslab.create_model(name, features_only=True).eval()
    assert m.channels == [16, 32, 64] and m.reductions == [1, 2, 4]
    feats = m(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]


def test_densenet121_features_are_the_dense_block_outputs():
    with torch.device("meta"):
        m = reslab.create_model("densenet121", features_only=True)
    # 64 + 6·32 = 256; halved by each transition, then + layers·32 (Huang et al. 2017, Table 1)
    assert m.channels == [256, 512, 1024, 1024]
    assert m.reductions == [4, 8, 16, 32]
    assert [f.module for f in m.feature_info] == [f"features.denseblock{i}" for i in range(1, 5)]


def test_selected_stages_equal_forward_stages_of_the_same_weights():
    torch.manual_seed(0)
    full = reslab.create_model("resnet18").eval()
    m = reslab.create_model("resnet18", features_only=True, out_indices=(-1, 2)).eval()
    m.model.load_state_dict(full.state_dict(), strict=False)  # head keys are gone from m
    x = torch.randn(1, 3, 64, 64)
    stages = full.forward_stages(x)
    feats = m(x)
    assert m.out_indices == (2, 4) and [f.stage for f in m.feature_info] == [2, 4]
    torch.testing.assert_close(feats[0], stages[1])
    torch.testing.assert_close(feats[1], stages[3])


def test_head_is_removed_so_every_parameter_gets_a_gradient():
    m = reslab.create_model("preact_resnet18", num_classes=7, features_only=True)
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith(("model.fc.", "model.final_bn.")) for n in names)
    sum(f.sum() for f in m(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_out_indices_outside_the_stages_is_rejected_with_the_valid_range():
    with pytest.raises(ValueError, match=r"stage 0 does not exist; this model has stages 1\.\.3"):
        reslab.create_model("resnet20", features_only=True, out_indices=(0, 1))
    with pytest.raises(ValueError, match="names a stage twice"):
        reslab.create_model("resnet20", features_only=True, out_indices=(3, -1))


def test_out_indices_without_features_only_is_an_error():
    with pytest.raises(ValueError, match="pass it with features_only=True"):
        reslab.create_model("resnet20", out_indices=(1,))


def test_a_model_without_stages_cannot_be_wrapped():
    with pytest.raises(TypeError, match="no forward_stages"):
        FeatureExtractor(nn.Sequential(nn.Conv2d(3, 4, 3)))
