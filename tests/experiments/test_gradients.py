"""The gradients experiment: per-layer norms measured right, and findings that follow from them."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.gradients import (
    carry_product, downsampling_units, findings, gradient_norms, networks, unit_names)
from reslab.models import create_model

# fp32 NCHW: bf16/channels-last kernels take seconds to set up for one tiny training step.
TRAIN = {"precision": "fp32", "channels_last": False}
OPTIONS = {"train": TRAIN, "depth": 20, "densenet": "densenet40_k12",
           "densenet_kwargs": {"growth_rate": 4}, "batches": 1, "batch_size": 16}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("gradients", scale="demo", out=str(tmp_path_factory.mktemp("g")),
                           budget=0.05, options=OPTIONS)
    return cfg, run_experiment(cfg)


def _per_layer(cfg):
    with open(cfg.folder / "per_layer.csv") as f:
        return list(csv.DictReader(f))


def test_writes_table_report_figure_and_per_layer_csv(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "gradients.png", "per_layer.csv"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert "![gradients](gradients.png)" in report
    assert all(f in report for f in res.findings)
    assert json.loads((cfg.folder / "results.json").read_text())["rows"] == json.loads(
        json.dumps(res.rows, default=str))


def test_five_networks_at_two_checkpoints(result):
    cfg, res = result
    labels = ["plain-20", "ResNet-20", "pre-act-20", "highway-20", "DenseNet-40"]
    assert [n.label for n in networks(cfg)] == labels
    assert [(r["network"], r["checkpoint"]) for r in res.rows] == [
        (n, c) for n in labels for c in ("init", "trained")]


def test_one_entry_per_unit_with_finite_positive_norms(result):
    cfg, _ = result
    per_layer = _per_layer(cfg)
    for net in networks(cfg):
        model = create_model(net.model, num_classes=10, in_chans=1, **net.kwargs)
        units = len(model.units())
        for checkpoint in ("init", "trained"):
            rows = [r for r in per_layer
                    if r["network"] == net.label and r["checkpoint"] == checkpoint]
            assert [int(r["unit"]) for r in rows] == list(range(1, units + 1))
            assert [r["downsampling"] == "True" for r in rows] == downsampling_units(model)
            for r in rows:
                for key in ("grad_w", "grad_x"):
                    value = float(r[key])
                    assert math.isfinite(value) and value > 0, (net.label, checkpoint, r)


def test_summary_rows_are_computed_from_the_per_layer_numbers(result):
    cfg, res = result
    per_layer = _per_layer(cfg)
    for row in res.rows:
        layers = [r for r in per_layer
                  if r["network"] == row["network"] and r["checkpoint"] == row["checkpoint"]]
        x = [float(r["grad_x"]) for r in layers]
        w = [float(r["grad_w"]) for r in layers]
        assert row["units"] == len(layers)
        highway_init = row["network"].startswith("highway") and row["checkpoint"] == "init"
        assert math.isnan(row["carry product"]) != highway_init
        assert row["ratio x_1/x_L"] == pytest.approx(x[0] / x[-1], rel=1e-12)
        assert row["orders x_1/x_L"] == pytest.approx(math.log10(x[0] / x[-1]), abs=1e-12)
        for key, v in (("spread grad_x (orders)", x), ("spread grad_w (orders)", w)):
            assert row[key] == pytest.approx(math.log10(max(v) / min(v)), abs=1e-12)


def test_findings_follow_from_the_rows(result):
    _, res = result
    by = {(r["network"], r["checkpoint"]): r for r in res.rows}
    assert res.findings == findings(res.rows)
    init = [f for f in res.findings if f.startswith("Init: ‖∂L/∂x_1‖")][0]
    for label in ("plain-20", "ResNet-20", "pre-act-20", "highway-20", "DenseNet-40"):
        assert f"{label} {by[label, 'init']['ratio x_1/x_L']:.3g}" in init
    p, r = by["plain-20", "init"], by["ResNet-20", "init"]
    compare = [f for f in res.findings if f.startswith("Init: ") and "plain-20's input" in f][0]
    if abs(p["orders x_1/x_L"]) > abs(r["orders x_1/x_L"]):
        assert f"by {abs(p['orders x_1/x_L']):.2f} orders of magnitude" in compare
        assert ("grows" if p["orders x_1/x_L"] > 0 else "shrinks") in compare
    else:
        assert "did not appear in the plain net" in compare
    h = by["highway-20", "init"]
    carry = [f for f in res.findings if f.startswith("highway-20 at initialisation")][0]
    assert f"x_1/x_L = {h['ratio x_1/x_L']:.3g}, against (1 − σ(b_T))^(n−1) = " \
           f"{h['carry product']:.3g}" in carry


def test_findings_say_when_the_plain_net_keeps_its_gradient():
    rows = [
        {"network": "plain-20", "checkpoint": "init", "ratio x_1/x_L": 2.0,
         "orders x_1/x_L": math.log10(2.0), "spread grad_w (orders)": 0.5},
        {"network": "ResNet-20", "checkpoint": "init", "ratio x_1/x_L": 10.0,
         "orders x_1/x_L": 1.0, "spread grad_w (orders)": 0.25},
    ]
    out = findings(rows)
    assert out[0] == ("Init: ‖∂L/∂x_1‖/‖∂L/∂x_L‖ (first unit's input over the last's) is "
                      "plain-20 2, ResNet-20 10.")
    assert "changes by 0.30 orders of magnitude from the last unit to the first, no more than " \
           "ResNet-20's 1.00" in out[1]
    assert "did not appear in the plain net here" in out[1]
    assert "0.50 orders of magnitude across plain-20's units (the most) and 0.25 across " \
           "ResNet-20's (the least)" in out[2]


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_resnet_norms_equal_autograd_of_the_stem_output_and_unit_weights():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x, y = _batch()
    w, gx = gradient_norms(model, [(x, y)])
    net = model.train()
    stem = net.stem(x)
    stem.retain_grad()
    out = net.forward_head(net.layer3(net.layer2(net.layer1(stem))))
    F.cross_entropy(out, y).backward()
    assert gx[0] == pytest.approx(float(stem.grad.norm()), rel=1e-5)
    first = net.units()[0]
    expected_w = math.sqrt(float(first.conv1.weight.grad.norm()) ** 2
                           + float(first.conv2.weight.grad.norm()) ** 2)
    assert w[0] == pytest.approx(expected_w, rel=1e-5)
    assert len(w) == len(gx) == 9


def test_norms_are_averaged_over_the_batches():
    torch.manual_seed(0)
    model = create_model("plain20", num_classes=10, in_chans=1)
    a, b = _batch(1), _batch(2)
    (wa, xa), (wb, xb), (w, x) = (gradient_norms(model, bs) for bs in ([a], [b], [a, b]))
    assert w == pytest.approx([(p + q) / 2 for p, q in zip(wa, wb)], rel=1e-6)
    assert x == pytest.approx([(p + q) / 2 for p, q in zip(xa, xb)], rel=1e-6)


def test_dense_layer_input_is_the_previous_layers_output():
    torch.manual_seed(0)
    model = create_model("densenet40_k12", num_classes=10, in_chans=1, growth_rate=3)
    x, y = _batch()
    _, gx = gradient_norms(model, [(x, y)])
    net = model.train()
    outs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outs.append(out)

    net.units()[0].register_forward_hook(keep)
    F.cross_entropy(net(x), y).backward()
    # Layer 2's newest input is layer 1's output; its gradient sums every later reader of it.
    assert gx[1] == pytest.approx(float(outs[0].grad.norm()), rel=1e-5)
    assert len(gx) == 36 and unit_names(net)[0] == "features.denseblock1.denselayer1"


def test_identity_shortcuts_pass_the_gradient_unchanged_when_the_residual_is_zero():
    # ∂x_L/∂x_l = 1 + ∂F/∂x_l: with F ≡ 0 (zero last conv of every pre-act unit) every unit's
    # input gradient is the last unit's.
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, unit="full_preact")
    for unit in model.units():
        torch.nn.init.zeros_(unit.conv2.weight)
    _, gx = gradient_norms(model, [_batch()])
    # Option A's stride and zero channels drop only positions and channels that carry no gradient
    # when F ≡ 0, so the norm passes unchanged through every unit, downsampling ones included.
    assert gx == pytest.approx([gx[-1]] * len(gx), rel=1e-5)
    assert downsampling_units(model) == [False] * 3 + [True, False, False] * 2


def test_carry_product_is_the_highway_carry_factor_over_all_but_the_last_unit():
    model = create_model("highway20", num_classes=10, in_chans=1)  # b_T = −2, 9 units
    assert carry_product(model) == pytest.approx((1 - 1 / (1 + math.exp(2.0))) ** 8, rel=1e-6)
    assert carry_product(create_model("resnet20", num_classes=10, in_chans=1)) is None


def test_unknown_depth_is_rejected_with_the_valid_ones():
    cfg = ExperimentConfig("gradients", options={"depth": 21})
    with pytest.raises(ValueError, match="20, 32, 44, 56 or 110"):
        networks(cfg)


def test_a_densenet_option_that_is_no_densenet_is_rejected():
    cfg = ExperimentConfig("gradients", options={"densenet": "resnet20"})
    with pytest.raises(ValueError, match="'resnet20' is not a registered DenseNet; choose one of "
                                         "densenet40_k12"):
        networks(cfg)
