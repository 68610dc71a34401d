"""`reslab experiment shortcuts`: options A/B/C (He et al. 2015, Table 3) and the shortcut
variants of He et al. 2016, Table 1."""

import csv
import json

import pytest

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.shortcuts import CASES, FAIL, HAMPER_MARGIN, OPTIONS, VARIANTS, findings

PAPER = {"A": 25.03, "B": 24.52, "C": 24.19, "identity": 6.61, "plain": FAIL,
         "scaling_shortcut": FAIL, "scaling": 12.35, "exclusive_gating_0": FAIL,
         "exclusive_gating": 8.70, "shortcut_gating_0": 12.86, "shortcut_gating": 6.91,
         "conv1x1": 12.22, "dropout": FAIL}
# ResNet-20's units as (input channels, output channels): 3 per stage, widths 16-32-64.
UNITS = [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)] + [(64, 64)] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ExperimentConfig("shortcuts", scale="demo", budget=0.05, options={"depth": 20},
                           out=str(tmp_path_factory.mktemp("shortcuts")))
    result = run_experiment(cfg)
    return cfg, result, {r["key"]: r for r in result.rows}


def test_writes_table_report_and_figures(tiny):
    cfg, result, _ = tiny
    for png in ("shortcuts.png", "shortcut_variants_curves.png"):
        assert (cfg.folder / png).read_bytes()[:4] == b"\x89PNG"
    with open(cfg.folder / "results.csv") as f:
        assert [r["key"] for r in csv.DictReader(f)] == list(PAPER)
    assert json.loads((cfg.folder / "results.json").read_text())["findings"] == result.findings
    report = (cfg.folder / "report.md").read_text()
    assert all(f in report for f in result.findings)
    assert "| fail (>20%) |" in report and "25.03" in report and "12.35" in report


def test_one_row_per_case_with_the_papers_number(tiny):
    _, result, by = tiny
    assert [r["key"] for r in result.rows] == [c.key for c in CASES] == list(PAPER)
    assert {k: r["paper (%)"] for k, r in by.items()} == PAPER
    assert [r["study"] for r in result.rows] == [OPTIONS] * 3 + [VARIANTS] * 10


def test_parameter_counts_follow_the_shortcut_options(tiny):
    _, _, by = tiny
    a = by["A"]["params"]
    # B: a 1×1 conv + BN where the channels grow; C and the 1×1-conv shortcut: on every unit;
    # a gate: a 1×1 conv with bias on every unit. Zero-padding, scaling and dropout add nothing.
    projection = {(i, o): i * o + 2 * o for i, o in UNITS}
    assert by["B"]["params"] - a == sum(v for (i, o), v in projection.items() if i != o) == 2752
    assert by["C"]["params"] - a == sum(projection[u] for u in UNITS) == 14240
    assert by["conv1x1"]["params"] == by["C"]["params"]
    for gated in ("exclusive_gating_0", "exclusive_gating", "shortcut_gating_0", "shortcut_gating"):
        assert by[gated]["params"] - a == sum(i * o + o for i, o in UNITS) == 13904
    for free in ("identity", "plain", "scaling_shortcut", "scaling", "dropout"):
        assert by[free]["params"] == a
    assert a < by["B"]["params"] < by["C"]["params"]


def test_cases_that_build_the_same_network_share_one_training(tiny):
    cfg, _, by = tiny
    for x, y in (("A", "identity"), ("C", "conv1x1")):
        assert {k: v for k, v in by[x].items() if k not in ("study", "case", "key", "on shortcut",
                                                             "on F", "paper (%)")} == \
               {k: v for k, v in by[y].items() if k not in ("study", "case", "key", "on shortcut",
                                                             "on F", "paper (%)")}
    # 13 rows, 11 distinct networks (the λ = 0 case is the plain twin).
    models = list((cfg.folder.parent / "_models").glob("*/history.json"))
    assert len(models) == 11
    assert sum(p.parent.name.startswith("plain20-") for p in models) == 1


def test_findings_follow_from_the_rows(tiny):
    _, result, by = tiny
    text = result.findings
    assert text[0].startswith(f"Parameters: option A {by['A']['params']:,}, B {by['B']['params']:,}")
    test = {k: by[k]["test error (%)"] for k in "ABC"}
    reproduced = test["C"] < test["B"] < test["A"]
    assert ("— the paper's order" in text[1]) == reproduced
    assert ("— not the paper's C < B < A" in text[1]) != reproduced
    assert f"A − C = {test['A'] - test['C']:+.2f} points" in text[1]

    ident = by["identity"]
    variants = [r for r in result.rows if r["study"] == VARIANTS and r["key"] != "identity"]
    better = [r for r in variants if r["test error (%)"] < ident["test error (%)"]]
    if better:
        assert text[2].startswith(f"{len(better)} of {len(variants)} shortcut modifications beat")
        assert all(r["case"] in text[2] for r in better)
    else:
        assert text[2].startswith(f"None of the {len(variants)} shortcut modifications beats")

    hampered = [r for r in variants
                if r["train error (%)"] > ident["train error (%)"] + HAMPER_MARGIN]
    listed, _, rest = text[3].partition("; within that margin: ")
    for r in variants:
        label = f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F) {r['train error (%)']:.2f}%"
        assert label in (listed if r in hampered else rest)
    assert text[3].startswith("Hampered optimisation" if hampered else "No modification's")


def _row(key, train, test):
    case = next(c for c in CASES if c.key == key)
    return {"study": case.study, "case": case.label, "key": key, "on shortcut": case.on_shortcut,
            "on F": case.on_residual, "params": 100 + (key not in ("A", "identity")), "diverged": 0,
            "train error (%)": train, "test error (%)": test,
            "paper (%)": FAIL if case.paper is None else case.paper}


def test_findings_when_the_papers_claims_hold():
    rows = [_row("A", 2.0, 5.0), _row("B", 2.0, 4.5), _row("C", 2.0, 4.0),
            _row("identity", 2.0, 5.0), _row("conv1x1", 6.0, 9.0), _row("dropout", 40.0, 50.0)]
    text = findings(rows, n_test=200)
    assert text[1].startswith("Test error by option: C 4.00% < B 4.50% < A 5.00% — the paper's order")
    assert "A − C = +1.00 points (+2 of 200 test images)" in text[1]
    assert text[1].endswith("against the paper's +0.84: projections lower the test error here too.")
    assert text[2].startswith("None of the 2 shortcut modifications beats the identity shortcut's "
                              "test error (5.00%), as in the paper; the closest is 1×1 conv shortcut")
    assert text[3].startswith("Hampered optimisation — final training error more than 1 point above "
                              "the identity's 2.00%: dropout shortcut, p=0.5 (dropout 0.5 · s, 1 · F) "
                              "40.00%, 1×1 conv shortcut (1×1 conv · s, 1 · F) 6.00%.")
    assert text[4].startswith("The shortcuts that can represent the identity (1×1 conv, gates) have 1 "
                              "extra parameters; 1 of 1 of them still train worse")
    assert text[5].endswith("1 of 1 exceed 20%, and they are the 1 worst of the table.")


def test_findings_say_so_when_the_effect_does_not_appear():
    rows = [_row("A", 2.0, 4.0), _row("B", 2.0, 4.5), _row("C", 2.0, 5.0),
            _row("identity", 2.0, 4.0), _row("conv1x1", 2.5, 3.0), _row("dropout", 1.0, 4.0)]
    text = findings(rows, n_test=200)
    assert "— not the paper's C < B < A" in text[1]
    assert text[1].endswith("the projections' extra parameters do not lower the test error here.")
    assert text[2].startswith("1 of 2 shortcut modifications beats the identity shortcut's test "
                              "error (4.00%): 1×1 conv shortcut")
    assert text[3].startswith("No modification's final training error is more than 1 point above")
    assert "none of the 1 trains worse than the identity here" in text[4]
    assert "0 of 1 exceed 20%" in text[5]


def test_unknown_cases_and_depths_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown shortcut case.*option_d.*choose from A, B, C"):
        run_experiment(ExperimentConfig("shortcuts", out=str(tmp_path),
                                        options={"cases": ["option_d"]}))
    with pytest.raises(ValueError, match="depth 1202 is not a CIFAR ResNet depth"):
        run_experiment(ExperimentConfig("shortcuts", out=str(tmp_path), options={"depth": 1202}))
