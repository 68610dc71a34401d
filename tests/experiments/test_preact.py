"""`reslab experiment preact`: the five residual-unit variants (He et al. 2016, Table 2)."""

import csv
import json
import math

import pytest

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments import common
from reslab.experiments.preact import VARIANTS, findings, ranks, ranking, spearman
from reslab.models import create_model

PAPER_110 = {"original": 6.61, "bn_after_add": 8.17, "relu_before_add": 7.84,
             "relu_preact": 6.71, "full_preact": 6.37}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ExperimentConfig("preact", scale="demo", out=str(tmp_path_factory.mktemp("preact")),
                           budget=0.05, options={"depth": 20})
    return cfg, run_experiment(cfg)


def test_writes_table_report_and_training_curves(tiny):
    cfg, result = tiny
    folder = cfg.folder
    assert (folder / "preact_curves.png").read_bytes()[:4] == b"\x89PNG"
    with open(folder / "results.csv") as f:
        assert [r["unit"] for r in csv.DictReader(f)] == list(PAPER_110)
    doc = json.loads((folder / "results.json").read_text())
    assert doc["findings"] == result.findings
    report = (folder / "report.md").read_text()
    for finding in result.findings:
        assert finding in report
    assert "| (e) | full_preact |" in report and "6.37" in report


def test_one_row_per_variant_with_the_papers_number_beside_it(tiny):
    _, result = tiny
    assert [r["variant"] for r in result.rows] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert {r["unit"]: r["paper ResNet-110 (%)"] for r in result.rows} == PAPER_110


def test_every_variant_is_resnet20_with_its_unit_option(tiny):
    _, result = tiny
    for row in result.rows:
        net = create_model("resnet20", num_classes=10, in_chans=1, unit=row["unit"])
        assert row["params"] == sum(p.numel() for p in net.parameters())


def test_errors_are_the_final_epoch_of_each_cached_run(tiny):
    cfg, result = tiny
    for v, row in zip(VARIANTS, result.rows):
        run = common.train_cached(cfg, "resnet20", model_kwargs=v.model_kwargs)  # cache hit
        last = run.history[-1]
        assert row["train error (%)"] == pytest.approx(100 * last.train_error)
        assert row["test error (%)"] == pytest.approx(100 * last.test_top1_error)
        assert row["early train error (%)"] == pytest.approx(100 * run.history[0].train_error)
        assert row["diverged"] == 0


def test_each_variant_is_trained_once_and_the_original_carries_no_override(tiny):
    cfg, _ = tiny
    # No override for (a): other experiments training plain `resnet20` reuse the same model.
    docs = [json.loads(p.read_text()) for p in (cfg.folder.parent / "_models").glob("*/history.json")]
    assert sorted(json.dumps(d["config"]["model_kwargs"]) for d in docs) == sorted(
        ["{}"] + [json.dumps({"unit": u}) for u in list(PAPER_110)[1:]])


def test_findings_follow_from_the_rows(tiny):
    _, result = tiny
    rows, text = result.rows, result.findings
    by_error = sorted(rows, key=lambda r: r["test error (%)"])
    first = text[0]
    positions = [first.index(f"{r['variant']} {r['unit']} {r['test error (%)']:.2f}%") for r in by_error]
    assert positions == sorted(positions)
    paper_order = sorted(rows, key=lambda r: r["paper ResNet-110 (%)"])
    agree = sum(a["unit"] == b["unit"] for a, b in zip(by_error, paper_order))
    assert f"{agree} of 5 places agree" in first

    low = min(r["test error (%)"] for r in rows)
    e = next(r for r in rows if r["unit"] == "full_preact")["test error (%)"]
    n_low = sum(r["test error (%)"] == low for r in rows)
    (best,) = [f for f in text if f.startswith("Full pre-activation (e)")]
    if e == low and n_low == 1:
        assert "has the lowest test error" in best
    elif e == low:
        assert "ties for the lowest" in best
    else:
        assert "is not the best here" in best

    b = next(r for r in rows if r["unit"] == "bn_after_add")
    lines = [f for f in text if f.startswith("BN after addition (b)")]
    assert len(lines) == 3
    for line, column in zip(lines, ("test error (%)", "early train error (%)", "train error (%)")):
        high = max(r[column] for r in rows)
        n_high = sum(r[column] == high for r in rows)
        if b[column] == high:
            assert ("has the highest" if n_high == 1 else "ties for the highest") in line
        else:
            assert "is not the worst" in line


def _row(unit, test, train=1.0, early=None):
    v = next(v for v in VARIANTS if v.unit == unit)
    return {"variant": v.letter, "unit": unit, "params": 1, "early train error (%)": early or train,
            "train error (%)": train, "test error (%)": test, "diverged": 0,
            "paper ResNet-110 (%)": v.paper_110}


def test_findings_when_the_paper_is_reproduced():
    rows = [_row("original", 6.6, 1.0), _row("bn_after_add", 8.2, 3.0, early=30.0),
            _row("relu_before_add", 7.8), _row("relu_preact", 6.7), _row("full_preact", 6.4)]
    text = findings(rows, n_test=1000)
    assert text[0].endswith("5 of 5 places agree (Spearman ρ = 1.00).")
    assert text[1].startswith("Best and worst variant differ by 1.80 percentage points, 18 of 1000")
    assert text[2].startswith("Full pre-activation (e) has the lowest test error (6.40%), as in the paper")
    assert text[3].startswith("BN after addition (b) has the highest test error (8.20%)")
    assert text[4].startswith("BN after addition (b) has the highest training error over the first "
                              "quarter of the epochs (30.00%)")
    assert text[5] == "BN after addition (b) has the highest final training error (3.00%)."


def test_findings_say_so_when_the_effect_does_not_appear():
    rows = [_row("original", 2.0), _row("bn_after_add", 1.0), _row("relu_before_add", 2.0),
            _row("relu_preact", 1.5, 9.0), _row("full_preact", 3.0)]
    text = findings(rows, n_test=360)
    assert "(b) bn_after_add 1.00% < (d) relu_preact 1.50% < (a) original 2.00% = " \
           "(c) relu_before_add 2.00% < (e) full_preact 3.00%" in text[0]
    assert text[2].startswith("Full pre-activation (e) is not the best here: (b) bn_after_add has "
                              "1.00% against its 3.00%")
    assert text[3].startswith("BN after addition (b) is not the worst in test error (1.00%): "
                              "(e) full_preact is higher (3.00%)")
    assert "(d) relu_preact is higher (9.00%)" in text[5]


def test_seed_spread_is_compared_with_the_gap_between_variants():
    rows = [_row("original", 2.0), _row("full_preact", 1.0)]
    for r in rows:
        r["test error std (%)"] = 1.0
    assert findings(rows, 100)[1].endswith("no more than twice the mean seed-to-seed std "
                                           "(1.00 points): within the noise.")


def test_ranks_share_ties_and_put_diverged_runs_last():
    assert ranks([3.0, 1.0, 3.0, math.nan]) == [2.5, 1.0, 2.5, 4.0]
    # No ties: Spearman's rho = 1 - 6 Σd² / (n(n² - 1)); here d = (0, 1, -1, 0).
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert math.isnan(spearman([1, 1], [1, 2]))
    rows = [{"n": "x", "e": 1.0}, {"n": "y", "e": 1.0}, {"n": "z", "e": math.nan}]
    assert ranking(rows, "e", lambda r: r["n"]) == "x 1.00% = y 1.00% < z diverged"


def test_bad_options_are_rejected_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown unit variant.*nope.*choose from original"):
        run_experiment(ExperimentConfig("preact", out=str(tmp_path), options={"units": ["nope"]}))
    with pytest.raises(ValueError, match="depth 21 is not a CIFAR ResNet depth.*20, 32"):
        run_experiment(ExperimentConfig("preact", out=str(tmp_path), options={"depth": 21}))


def test_several_seeds_give_mean_and_std_and_the_noise_comparison(tmp_path):
    cfg = ExperimentConfig("preact", out=str(tmp_path), budget=0.05, seeds=2,
                           options={"depth": 20, "units": ["original", "full_preact"]})
    result = run_experiment(cfg)
    assert [r["unit"] for r in result.rows] == ["original", "full_preact"]
    for v, row in zip((VARIANTS[0], VARIANTS[4]), result.rows):
        tests = [100 * common.train_cached(cfg, "resnet20", seed=s, model_kwargs=v.model_kwargs)
                 .history[-1].test_top1_error for s in (0, 1)]
        assert row["test error (%)"] == pytest.approx(sum(tests) / 2)
        assert row["test error std (%)"] == pytest.approx(abs(tests[0] - tests[1]) / math.sqrt(2))
        assert row["test error, mean ± std (%)"] == f"{sum(tests) / 2:.2f} ± {row['test error std (%)']:.2f}"
    assert "seed-to-seed std" in result.findings[1]
