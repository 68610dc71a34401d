"""Registry and complexity: names, errors, info, MAC counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reslab
from reslab.cli import main


def test_list_models_filters_by_glob_and_family():
    names = reslab.list_models("resnet*")
    assert "resnet50" in names and "resnet20" in names and "plain20" not in names
    assert reslab.list_models("plain*", family="plain_cifar") == [
        "plain20", "plain32", "plain44", "plain56", "plain110"]
    # natural order: resnet20 before resnet110
    assert names.index("resnet20") < names.index("resnet110") < names.index("resnet1202")


def test_unknown_model_lists_the_closest_names():
    with pytest.raises(reslab.UnknownModelError, match=r"unknown model 'resnt50'.*resnet50"):
        reslab.create_model("resnt50")


def test_model_info_fields():
    info = reslab.model_info("resnet56")
    assert (info.family, info.depth, info.input_size, info.dataset) == (
        "resnet_cifar", 56, (3, 32, 32), "cifar10")
    assert info.params == 853_018 and info.macs > 0 and "He et al. 2015" in info.paper


def test_complexity_counts_conv_and_linear_macs_by_formula():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 4))
    c = reslab.complexity(model, (3, 5, 5))
    assert c.macs == 8 * 5 * 5 * 3 * 9 + 8 * 5 * 5 * 4
    assert c.params == 8 * 3 * 9 + 200 * 4 + 4
    # outputs of conv (200 floats), flatten (200), linear (4), 4 bytes each
    assert c.activation_bytes == (200 + 200 + 4) * 4
    assert c.flops == 2 * c.macs


def test_complexity_leaves_a_real_model_untouched():
    model = reslab.create_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    c = reslab.complexity(model, (3, 32, 32))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert c.macs == reslab.model_info("resnet20").macs
    assert next(model.parameters()).device.type == "cpu"


def test_models_command_prints_a_table(capsys):
    assert main(["models", "resnet5*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "25,557,032" in out and "4.09G" in out


def test_models_command_rejects_a_pattern_matching_nothing(capsys):
    assert main(["models", "nothing*"]) == 2
    assert "no model matches" in capsys.readouterr().err
