import json

from reslab.train.demo import MODELS, DemoRow, run_demo, state_findings


def row(model, train_error, acc=0.9):
    return DemoRow(model, int(model[-2:]), 1, train_error, acc, 1.0)


def test_demo_on_a_tiny_budget_writes_table_figure_and_statement(tmp_path, capsys):
    res = run_demo(tmp_path, epochs=1, train_limit=64, show_progress=False)
    assert [r.model for r in res.rows] == list(MODELS)
    assert (tmp_path / "degradation.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in doc["rows"]] == list(MODELS) and doc["statement"] == res.statement
    assert len(res.statement) == 3
    out = capsys.readouterr().out
    assert "final training error" in out and "plain56" in out and res.statement[0][:40] in out.replace("\n", " ")
    assert "| resnet56 | 56 |" in (tmp_path / "summary.md").read_text()


def test_findings_are_computed_from_the_numbers():
    rows = {r.model: r for r in (row("plain20", 0.05), row("plain56", 0.80, 0.2),
                                 row("resnet20", 0.021), row("resnet56", 0.018, 0.97))}
    lines = state_findings(rows)
    assert lines[0].startswith("plain-56 ends with higher training error than plain-20 (80.00% vs 5.00%): "
                               "the deeper plain net trains worse")
    assert lines[1].startswith("ResNet-56 ends with lower training error than plain-56 (1.80% vs 80.00%) "
                               "and 97.00% vs 20.00% test accuracy: identity shortcuts remove")
    assert lines[2] == ("ResNet-56 ends with about the same training error as ResNet-20 (1.80% vs 2.10%): "
                        "with shortcuts, the deeper net trains as well as the shallow one.")


def test_findings_say_so_when_the_effect_does_not_appear():
    rows = {r.model: r for r in (row("plain20", 0.30), row("plain56", 0.10),
                                 row("resnet20", 0.05), row("resnet56", 0.20))}
    lines = state_findings(rows)
    assert "plain-56 ends with lower training error than plain-20" in lines[0]
    assert "no degradation at this budget" in lines[0]
    assert "the shortcuts did not help at this budget" in lines[1]
    assert "even with shortcuts the deeper net lags" in lines[2]
