"""The highway experiment: errors of the three families, gate statistics read right, findings."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from reslab.data import load_dataset, normalize
from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.common import train_cached
from reslab.experiments.highway import (
    CLOSED, NOISE_POINTS, OPEN, SAME, depths, findings, gate_statistics)
from reslab.models import create_model

# fp32 NCHW: bf16/channels-last kernels take seconds to set up for one tiny training step.
TRAIN = {"precision": "fp32", "channels_last": False}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("highway", scale="demo", out=str(tmp_path_factory.mktemp("h")),
                           budget=0.05, options={"depths": [20], "train": TRAIN})
    return cfg, run_experiment(cfg)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", test_limit=64)


def _gates(res):
    return res.extra_tables["Gate statistics per highway layer (test set)"]


def test_writes_table_curves_gates_and_report(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "curves.png", "gates.png"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert "![gates](gates.png)" in report and "Gate statistics per highway layer" in report


def test_one_row_per_family_with_the_models_parameter_count(result):
    _, res = result
    assert [r["model"] for r in res.rows] == ["plain20", "resnet20", "highway20"]
    for r in res.rows:
        model = create_model(r["model"], num_classes=10, in_chans=1)
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert 0 <= r["train error (%)"] <= 100 and 0 <= r["test error (%)"] <= 100
    by = {r["model"]: r for r in res.rows}
    assert by["resnet20"]["paper CIFAR-10 error (%)"] == 8.75
    assert math.isnan(by["highway20"]["paper CIFAR-10 error (%)"])
    # plain and residual twins have the same parameters; the gates add one 3×3 conv per unit.
    assert by["plain20"]["params"] == by["resnet20"]["params"] < by["highway20"]["params"]


def test_gate_table_has_one_row_per_highway_unit_with_values_in_range(result):
    _, res = result
    gates = _gates(res)
    assert [g["unit"] for g in gates] == list(range(1, 10))
    assert [g["downsampling"] for g in gates] == [False] * 3 + [True, False, False] * 2
    for g in gates:
        assert 0 <= g["mean T"] <= 1 and 0 <= g["mean T init"] <= 1
        assert g["carry 1−T"] == pytest.approx(1 - g["mean T"])
        assert 0 <= g["nearly closed (%)"] + g["nearly open (%)"] <= 100
        assert g["gate bias init"] == -2.0  # the paper's guideline for depth ≈ 20


def test_findings_follow_from_the_tables(result):
    _, res = result
    gates = _gates(res)
    assert res.findings == findings(res.rows, gates)
    by = {r["model"]: r for r in res.rows}
    errs = {f: by[f"{f}20"]["train error (%)"] for f in ("plain", "resnet", "highway")}
    lowest = " and ".join(f for f in errs if errs[f] == min(errs.values()))
    assert res.findings[0].startswith(
        f"Depth 20: final training error plain {errs['plain']:.2f}%, resnet "
        f"{errs['resnet']:.2f}%, highway {errs['highway']:.2f}%")
    assert f"lowest training error: {lowest}" in res.findings[0]
    means = [g["mean T"] for g in gates]
    gate_finding = [f for f in res.findings if f.startswith("highway20: averaged")][0]
    assert f"T = {statistics.fmean(means):.3f}" in gate_finding
    assert f"{sum(m < 0.5 for m in means)} of 9 layers carry mostly" in gate_finding
    gap = by["highway20"]["train error (%)"] - by["resnet20"]["train error (%)"]
    slow = [f for f in res.findings if f.startswith("highway20 ends")]
    assert slow == ([f"highway20 ends {gap:.2f} points of training error above its ResNet twin "
                     f"while its gates pass on average T = {statistics.fmean(means):.3f} of "
                     "each transform H(x) — and the same fraction of the gradient to H, since "
                     "∂y/∂H = T — which is consistent with its transform branches learning more "
                     "slowly than the ResNet's residual branches."] if gap >= NOISE_POINTS else [])
    moves = [abs(g["mean T"] - g["mean T init"]) for g in gates]
    change = [f for f in res.findings if f.startswith("highway20: the gates start")][0]
    assert change.endswith("stayed near their initial bias." if max(moves) < SAME
                           else "moved away from their initial bias.")


def test_findings_report_degradation_across_depths_honestly():
    rows = [{"model": f"{f}{d}", "family": f, "depth": d, "train error (%)": e,
             "test error (%)": e + 1}
            for (f, d, e) in [("plain", 20, 5.0), ("resnet", 20, 4.0), ("highway", 20, 6.0),
                              ("plain", 56, 3.0), ("resnet", 56, 4.3), ("highway", 56, 9.0)]]
    out = findings(rows, [])
    assert "plain: 56 layers reach 3.00% training error vs 5.00% at 20 layers (-2.00 points): " \
           "it does not degrade with depth here." in out
    assert "resnet: 56 layers reach 4.30% training error vs 4.00% at 20 layers (+0.30 points): " \
           "it trains about equally at both depths here." in out
    assert "highway: 56 layers reach 9.00% training error vs 6.00% at 20 layers (+3.00 points): " \
           "it degrades with depth here." in out


def test_several_seeds_give_mean_and_std(result):
    cfg, _ = result  # the same folder: seed 0 comes from the model cache
    cfg2 = ExperimentConfig("highway", scale="demo", out=cfg.out, budget=0.05, seeds=2,
                            options={"depths": [20], "train": TRAIN})
    res = run_experiment(cfg2)
    for row in res.rows:
        runs = [train_cached(cfg2, row["model"], seed=s) for s in (0, 1)]
        errors = [100 * t.final.train_error for t in runs]
        assert row["train error (%)"] == pytest.approx(statistics.fmean(errors))
        assert row["train error std"] == pytest.approx(statistics.stdev(errors))


def test_gate_findings_on_known_gate_tables():
    rows = [{"model": m, "family": m[:-2], "depth": 20, "train error (%)": e,
             "test error (%)": e} for m, e in (("resnet20", 2.0), ("highway20", 12.0))]
    gates = [{"model": "highway20", "unit": u, "gate bias init": -2.0, "mean T init": 0.1,
              "mean T": t, "nearly closed (%)": c, "nearly open (%)": 0.0}
             for u, t, c in ((1, 0.1, 40.0), (2, 0.1, 30.0), (3, 0.7, 0.0))]
    out = findings(rows, gates)
    assert out[1] == (
        "highway20: averaged over layers and test images T = 0.300, i.e. the layers carry 70.0% "
        "of their input; 2 of 3 layers carry mostly (mean T < 0.5); 23.3% of gate values are "
        "nearly closed (T < 0.1) and 0.0% nearly open (T > 0.9); the layer that transforms most "
        "is unit 3 (T = 0.700).")
    assert out[2].startswith("highway20 ends 10.00 points of training error above its ResNet "
                             "twin while its gates pass on average T = 0.300")
    assert out[3] == (
        "highway20: the gates start at mean T = 0.100 (b_T = -2); after training the mean "
        "per-layer change is 0.200 and the largest +0.600 (unit 3: 0.100 → 0.700): the gates "
        "moved away from their initial bias.")
    assert out[4] == (
        "highway20: the first third of the layers average T = 0.100, the last third 0.700: the "
        "later layers transform more (difference +0.600).")


def test_gate_statistics_read_forced_gates(digits):
    torch.manual_seed(0)
    model = create_model("highway20", num_classes=10, in_chans=1)
    images = digits.test.images
    for bias, closed, opened in ((-30.0, 1.0, 0.0), (30.0, 0.0, 1.0)):
        for unit in model.units():
            torch.nn.init.zeros_(unit.transform_gate.weight)
            torch.nn.init.constant_(unit.transform_gate.bias, bias)
        stats = gate_statistics(model, images, digits.mean, digits.std)
        assert len(stats) == 9
        for s in stats:
            assert s["closed"] == closed and s["open"] == opened
            assert s["mean T"] == pytest.approx(torch.sigmoid(torch.tensor(bias)).item(), abs=1e-9)


def test_gate_means_equal_the_gates_computed_directly(digits):
    torch.manual_seed(1)
    model = create_model("highway20", num_classes=10, in_chans=1).eval()
    images = digits.test.images
    stats = gate_statistics(model, images, digits.mean, digits.std, batch_size=16)
    seen = []
    unit = model.units()[4]
    unit.register_forward_hook(lambda m, inp, out: seen.append(m.gate(inp[0])))
    with torch.no_grad():
        model(normalize(images, digits.mean, digits.std))
    t = seen[0]
    assert stats[4]["mean T"] == pytest.approx(t.double().mean().item(), rel=1e-5)
    assert stats[4]["closed"] == pytest.approx((t < CLOSED).double().mean().item())
    assert stats[4]["open"] == pytest.approx((t > OPEN).double().mean().item())


def test_unregistered_depth_is_rejected():
    cfg = ExperimentConfig("highway", options={"depths": [20, 50]})
    with pytest.raises(ValueError, match="no registered plain50, highway50"):
        depths(cfg)
