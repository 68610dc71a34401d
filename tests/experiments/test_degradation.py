"""The degradation experiment: plain vs ResNet error table, curves, findings from the numbers."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.common import Trained, train_cached
from reslab.experiments.degradation import SAME_POINTS, _row, cifar_depths, findings
from reslab.models import create_model
from reslab.train import EpochMetrics

# fp32 NCHW: bf16/channels-last kernels take seconds to set up for one tiny training step.
TRAIN = {"precision": "fp32", "channels_last": False}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("degradation", scale="demo", out=str(tmp_path_factory.mktemp("d")),
                           budget=0.05, options={"depths": [32, 20], "train": TRAIN})
    return cfg, run_experiment(cfg)


def test_writes_table_figure_and_report(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "degradation.png"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert "![degradation](degradation.png)" in report
    assert "8.75" in report  # the paper's ResNet-20 error beside the measured one
    saved = json.loads((cfg.folder / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == [r["model"] for r in res.rows]


def test_one_row_per_model_and_depth_with_exact_parameters(result):
    _, res = result
    assert [r["model"] for r in res.rows] == ["plain20", "plain32", "resnet20", "resnet32"]
    for r in res.rows:
        model = create_model(r["model"], num_classes=10, in_chans=1)
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert 0 <= r["final train error (%)"] <= 100
        assert r["best test error (%)"] <= r["final test error (%)"]
        assert r["runs"] == 1 and r["seconds"] > 0
    by = {r["model"]: r for r in res.rows}
    assert by["plain20"]["params"] == by["resnet20"]["params"]  # option A adds no parameters
    assert by["resnet32"]["paper test error (%)"] == 7.51
    assert math.isnan(by["plain32"]["paper test error (%)"])


def test_rows_are_the_cached_runs_final_epochs(result):
    cfg, res = result
    trained = train_cached(cfg, "resnet32")  # a cache hit: the very run the table reports
    row = next(r for r in res.rows if r["model"] == "resnet32")
    assert row["final train error (%)"] == 100 * trained.history[-1].train_error
    assert row["final test error (%)"] == 100 * trained.history[-1].test_top1_error
    assert row["seconds"] == trained.seconds


def test_findings_follow_from_the_table(result):
    _, res = result
    assert res.findings == findings(res.rows, "digits")
    by = {r["model"]: r["final train error (%)"] for r in res.rows}
    delta = by["plain32"] - by["plain20"]
    verdict = ("the degradation problem appears" if delta >= SAME_POINTS
               else "the degradation did not appear")
    assert f"plain-32's final training error ({by['plain32']:.2f}%)" in res.findings[0]
    assert verdict in res.findings[0] and f"{delta:+.2f} points" in res.findings[0]
    gap = by["plain32"] - by["resnet32"]
    assert res.findings[2].startswith(f"At depth 32, plain minus ResNet: {gap:+.2f} points")


def _rows(plain: dict[int, float], resnet: dict[int, float]) -> list[dict]:
    return [{"model": f"{f}{d}", "family": f, "depth": d, "final train error (%)": e,
             "final test error (%)": e + 1, "paper test error (%)": math.nan}
            for f, errs in (("plain", plain), ("resnet", resnet)) for d, e in errs.items()]


def test_findings_report_degradation_only_when_the_numbers_show_it():
    shows = findings(_rows({20: 5.0, 56: 9.0}, {20: 4.0, 56: 2.0}))
    assert "the degradation problem appears" in shows[0]
    assert "rises with depth" in shows[0]
    assert "the deeper ResNet trains better" in shows[1]
    assert shows[2].startswith("At depth 56, plain minus ResNet: +7.00 points")
    absent = findings(_rows({20: 9.0, 56: 5.0}, {20: 4.0, 56: 4.2}))
    assert "the degradation did not appear in this run" in absent[0]
    assert "does not fall with depth in this run" in absent[1]
    assert "do not lower the training error" not in absent[2]
    one = findings(_rows({20: 5.0}, {20: 4.0}))
    assert one[0].startswith("Only depth 20 was run")


def test_cifar10_findings_compare_with_table_6():
    rows = _rows({20: 5.0}, {20: 8.0})
    rows[1]["paper test error (%)"] = 8.75
    assert findings(rows, "cifar10")[-1] == (
        "CIFAR-10 test error measured vs the paper's Table 6: resnet20 9.00% vs 8.75%.")


def _run(train: float, test: float, model: nn.Module) -> Trained:
    metrics = EpochMetrics(1, 10, 0.1, train, 0.1, test, test, 0.1, 100.0, 1.0)
    return Trained("plain20", model, [metrics], 2.0, False, None)


def test_several_seeds_give_mean_and_std_columns():
    model = nn.Linear(3, 2)
    runs = [_run(0.10, 0.20, model), _run(0.20, 0.30, model)]
    row = _row("plain20", "plain", 20, runs, runs, n_seeds=2)
    assert row["final train error (%)"] == pytest.approx(15.0)
    assert row["final train error std"] == pytest.approx(math.sqrt(50))
    assert row["best test error std"] == pytest.approx(math.sqrt(50))
    assert row["params"] == 8 and row["runs"] == 2


def test_depths_must_have_a_plain_and_residual_twin():
    cfg = ExperimentConfig("degradation", options={"depths": [20, 21]})
    with pytest.raises(ValueError, match=r"depth\(s\) \[21\] have no registered pair"):
        cifar_depths(cfg, {"demo": (20,)})
    assert cifar_depths(ExperimentConfig("degradation"), {"demo": (56, 20)}) == (20, 56)
    with pytest.raises(ValueError, match="list of integers"):
        cifar_depths(ExperimentConfig("degradation", options={"depths": "deep"}), {})
