"""The responses experiment: residual-branch stds read at the right place, table and findings."""

from __future__ import annotations

import math

import pytest
import torch

from reslab.data import load_dataset, normalize
from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.common import dataset, train_cached
from reslab.experiments.responses import (
    SAME_RATIO, findings, include_deepest, is_downsampling, last_bn_scale, response_stds,
)
from reslab.models import create_model
from reslab.train import evaluate_model

TRAIN = {"precision": "fp32", "channels_last": False}
TABLE = "Response std per unit (forward order; ↓ marks downsampling units)"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("responses", scale="demo", out=str(tmp_path_factory.mktemp("r")),
                           budget=0.05, options={"depths": [20], "train": TRAIN})
    return cfg, run_experiment(cfg)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", test_limit=40)


def test_writes_table_figure_and_report(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "responses.png"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert "![responses](responses.png)" in report and TABLE in report


def test_summary_rows_agree_with_the_per_unit_table(result):
    _, res = result
    assert [r["model"] for r in res.rows] == ["plain20", "resnet20"]
    units = res.extra_tables[TABLE]
    assert [u["unit"] for u in units] == list(range(1, 10))
    assert [u["↓ (9 units)"] for u in units] == [False] * 3 + [True, False, False] * 2
    for row in res.rows:
        stds = [u[row["model"]] for u in units]
        assert row["units"] == 9
        assert row["mean std"] == pytest.approx(sum(stds) / 9)
        assert (row["max std"], row["min std"]) == (max(stds), min(stds))
        assert (row["first unit std"], row["last unit std"]) == (stds[0], stds[-1])
        assert 0 < row["last BN scale (mean abs γ)"] < 2


def test_test_error_is_the_models_evaluated_error(result):
    cfg, res = result
    for row in res.rows:
        trained = train_cached(cfg, row["model"])
        bundle = dataset(trained.config)
        full = evaluate_model(trained.model, bundle.test, mean=bundle.mean, std=bundle.std)
        assert row["test error (%)"] == pytest.approx(100 * full.top1_error, abs=1e-12)


def test_findings_follow_from_the_tables(result):
    _, res = result
    units = res.extra_tables[TABLE]
    per_unit = {m: [u[m] for u in units] for m in ("plain20", "resnet20")}
    down = {m: [u["↓ (9 units)"] for u in units] for m in per_unit}
    assert res.findings == findings(res.rows, per_unit, down, chance=90.0)
    said = list(res.findings)
    untrained = [r["model"] for r in res.rows if r["test error (%)"] >= 88.0]
    if untrained:  # a 1-epoch budget may leave both at chance; the report must say so
        assert said[0].startswith(untrained[0]) and " at chance (90%)" in said.pop(0)
    by = {r["model"]: r["mean std"] for r in res.rows}
    ratio = by["resnet20"] / by["plain20"]
    smaller = sum(r < p for r, p in zip(per_unit["resnet20"], per_unit["plain20"]))
    assert said[0].startswith(
        f"Depth 20: the ResNet's responses average {by['resnet20']:.3f}, {ratio:.2f}× the plain "
        f"net's {by['plain20']:.3f}; smaller in {smaller} of 9 units")
    assert ("closer to zero" in said[0]) == (ratio < 1 - SAME_RATIO)
    assert ("about the same size" in said[0]) == (abs(ratio - 1) <= SAME_RATIO)
    scales = [r["last BN scale (mean abs γ)"] for r in res.rows]
    if not untrained:
        assert f"average {min(scales):.3f}–{max(scales):.3f} across the networks" in said[-1]


@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_response_std_is_the_std_of_the_branch_output_over_all_values(name, digits):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1).eval()
    x = normalize(digits.test.images, digits.mean, digits.std)
    inputs = []
    handles = [u.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
               for u in model.units()]
    with torch.no_grad():
        logits = model(x)
        # F(x) recomputed from each unit's input, pooled over images, channels and positions.
        expected = [u.residual(v).std(unbiased=False).item()
                    for u, v in zip(model.units(), inputs)]
    for h in handles:
        h.remove()
    # Three batches (16 + 16 + 8 images) accumulate to the same std as one pass.
    stds, error = response_stds(model, digits.test.images, digits.mean, digits.std,
                                digits.test.labels, batch_size=16)
    assert stds == pytest.approx(expected, rel=1e-5)
    assert error == (logits.argmax(1) != digits.test.labels).sum().item() / 40
    assert math.isnan(response_stds(model, digits.test.images, digits.mean, digits.std)[1])


def test_last_bn_scale_reads_the_gamma_of_each_branch_s_final_bn():
    model = create_model("resnet20", num_classes=10, in_chans=1)
    assert last_bn_scale(model) == 1.0  # He init: γ = 1
    for i, unit in enumerate(model.units()):
        unit.bn2.weight.data.fill_(-0.1 * i)  # |γ| counts, the first BN does not
        unit.bn1.weight.data.fill_(5.0)
    # Every channel counts once: 3 units of 16, 32 and 64 channels.
    expected = 0.1 * (16 * (0 + 1 + 2) + 32 * (3 + 4 + 5) + 64 * (6 + 7 + 8)) / (3 * 112)
    assert last_bn_scale(model) == pytest.approx(expected)


def test_downsampling_units_are_the_first_of_stages_two_and_three():
    model = create_model("resnet56", num_classes=10, in_chans=1)
    marks = [is_downsampling(u) for u in model.units()]
    assert [i + 1 for i, m in enumerate(marks) if m] == [10, 19]


def test_deepest_pair_is_trained_only_if_its_estimate_fits_the_budget():
    # 110/56 × (30 s + 20 s) = 98.2 s > 90 s; already cached costs nothing.
    take, estimate = include_deepest([30.0, 20.0], 56, cached=False)
    assert not take and estimate == pytest.approx(50 * 110 / 56)
    assert include_deepest([10.0, 20.0], 56, cached=False) == (True, pytest.approx(30 * 110 / 56))
    assert include_deepest([300.0, 200.0], 56, cached=True) == (True, 0.0)
    assert include_deepest([], 56, cached=False) == (False, math.inf)


def test_findings_state_when_the_paper_s_effect_is_absent():
    rows = [{"model": m, "depth": d, "mean std": s} for m, d, s in
            (("plain20", 20, 0.5), ("resnet20", 20, 0.8), ("resnet56", 56, 0.9))]
    per_unit = {"plain20": [0.5, 0.5], "resnet20": [0.6, 1.0], "resnet56": [0.9, 0.9]}
    down = {m: [False, True] for m in per_unit}
    out = findings(rows, per_unit, down)
    assert "NOT smaller than the plain net's" in out[0] and "smaller in 0 of 2 units" in out[0]
    assert out[1] == ("Mean response per unit of ResNet-20 0.800, ResNet-56 0.900: the "
                      "responses do not fall with every increase in depth in this run.")
    assert out[2].startswith("resnet20: its 1 downsampling units respond with mean std 1.000, "
                             "1.67× the other units' 0.600: larger")
    assert out[3] == ("resnet56: its 1 downsampling units respond with mean std 0.900, 1.00× "
                      "the other units' 0.900: about the same (within 10%).")


def test_findings_flag_networks_at_chance():
    rows = [{"model": m, "depth": 20, "mean std": 1.0, "test error (%)": e}
            for m, e in (("plain20", 89.0), ("resnet20", 5.0))]
    per_unit = {"plain20": [1.0], "resnet20": [1.0]}
    out = findings(rows, per_unit, {m: [False] for m in per_unit}, chance=90.0)
    assert out[0] == ("plain20 (89.00%) errs at chance (90%): it did not train, so its "
                      "responses describe a broken network.")
    assert out[1].startswith("Depth 20:")


def test_findings_confirm_the_paper_when_the_numbers_do():
    rows = [{"model": m, "depth": d, "mean std": s} for m, d, s in
            (("plain20", 20, 1.0), ("resnet20", 20, 0.6), ("resnet56", 56, 0.4),
             ("resnet110", 110, 0.3))]
    per_unit = {m["model"]: [m["mean std"]] * 2 for m in rows}
    out = findings(rows, per_unit, {m: [False, False] for m in per_unit})
    assert out[0].endswith("0.60× the plain net's 1.000; smaller in 2 of 2 units — residual "
                           "functions are closer to zero, as in the paper.")
    assert out[1] == ("Mean response per unit of ResNet-20 0.600, ResNet-56 0.400, ResNet-110 "
                      "0.300: deeper ResNets have smaller responses, as in the paper (each unit "
                      "modifies the signal less).")
    assert len(out) == 2  # no downsampling units marked: nothing to compare them with


def test_projection_everywhere_does_not_make_every_unit_downsampling():
    model = create_model("resnet20", num_classes=10, in_chans=1, shortcut="C")
    assert all(u.downsample is not None for u in model.units())
    assert [is_downsampling(u) for u in model.units()] == [False] * 3 + [True, False, False] * 2
