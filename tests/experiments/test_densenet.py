"""The densenet experiment: cost columns equal reslab.complexity, findings follow from the table."""

from __future__ import annotations

import math

import pytest

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.densenet import PAPER_ERROR, dominates, findings, models, pareto
from reslab.models import complexity, create_model, model_info

KWARGS = {"densenet40_k12": {"growth_rate": 4}}
# fp32 NCHW: bf16/channels-last kernels take seconds to set up for one tiny training step.
TRAIN = {"precision": "fp32", "channels_last": False}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("densenet", scale="demo", out=str(tmp_path_factory.mktemp("d")),
                           budget=0.05, options={"models": ["resnet20", "densenet40_k12"],
                                                 "model_kwargs": KWARGS, "train": TRAIN})
    return cfg, run_experiment(cfg)


def test_writes_table_scatter_and_report(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "densenet.png"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert "![densenet](densenet.png)" in report and all(f in report for f in res.findings)


def test_params_and_macs_are_reslab_complexity_at_the_digits_input(result):
    _, res = result
    assert [r["model"] for r in res.rows] == ["resnet20", "densenet40_k12"]
    for r in res.rows:
        model = create_model(r["model"], num_classes=10, in_chans=1, **KWARGS.get(r["model"], {}))
        c = complexity(model, (1, 8, 8))
        assert r["params"] == c.params
        assert r["MMACs"] == c.macs / 1e6
        info = model_info(r["model"])
        assert (r["paper params"], r["paper MMACs @32×32"]) == (info.params, info.macs / 1e6)
        assert r["paper C10+ error (%)"] == PAPER_ERROR[r["model"]]
        assert 0 <= r["test error (%)"] <= 100 and r["seconds"] > 0
    # The paper's own numbers beside the measured ones: ResNet-20 8.75%, DenseNet-40 5.24%.
    assert [r["paper C10+ error (%)"] for r in res.rows] == [8.75, 5.24]
    assert res.rows[0]["paper params"] == 269_722 and res.rows[1]["paper params"] == 1_019_722


def test_findings_follow_from_the_rows(result):
    cfg, res = result
    assert res.findings == findings(res.rows, 100)
    r, d = res.rows
    gap = r["test error (%)"] - d["test error (%)"]
    first = res.findings[0]
    assert first.startswith(f"Best DenseNet densenet40_k12: {d['test error (%)']:.2f}% test error")
    assert f"{round(abs(gap))} of 100 test images" in first  # 100 test images: 1 point = 1 image
    assert f"{d['params'] / r['params']:.2f}× the parameters" in first
    params = res.findings[1]
    n_dense = int(dominates(d, r, "params"))
    n_res = int(dominates(r, d, "params"))
    assert params.startswith(f"In parameters: {n_dense} DenseNet/ResNet pair(s)")
    assert f", {n_res} the other way round" in params
    front = ", ".join(x["model"] for x in pareto(res.rows, "params"))
    assert f"Pareto front is {front}:" in params


def test_pareto_front_and_efficiency_verdict_on_known_rows():
    def row(model, params, macs, err, seconds=1.0):
        return {"model": model, "family": "DenseNet" if model.startswith("d") else "ResNet",
                "params": params, "MMACs": macs, "test error (%)": err, "seconds": seconds,
                "paper C10+ error (%)": math.nan, "paper params": params}

    rows = [row("resnet20", 100, 10.0, 5.0), row("resnet56", 300, 30.0, 4.0),
            row("densenet_a", 200, 40.0, 3.0), row("densenet_b", 400, 50.0, 3.5)]
    assert [r["model"] for r in pareto(rows, "params")] == ["resnet20", "densenet_a"]
    assert [r["model"] for r in pareto(rows, "MMACs")] == ["resnet20", "resnet56", "densenet_a"]
    out = findings(rows, 200)
    assert out[0] == (
        "Best DenseNet densenet_a: 3.00% test error with 0.00M parameters and 40.0 MMACs; best "
        "ResNet resnet56: 4.00% with 0.00M and 30.0 MMACs. The DenseNet is 1.00 points better "
        "(2 of 200 test images) with 0.67× the parameters and 1.33× the MACs.")
    assert out[1] == (
        "In parameters: 1 DenseNet/ResNet pair(s) where the DenseNet costs no more and errs less, "
        "0 the other way round (densenet_a beats resnet56 by 2 test images); the error-vs-"
        "parameters Pareto front is resnet20, densenet_a: DenseNets are the more efficient in "
        "parameters here.")
    assert out[2].endswith("neither family is more efficient in multiply-adds here.")


def test_a_single_family_is_rejected():
    cfg = ExperimentConfig("densenet", options={"models": ["resnet20", "resnet56"]})
    with pytest.raises(ValueError, match="compares ResNets with DenseNets"):
        models(cfg)
