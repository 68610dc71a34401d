"""`reslab demo`: the degradation problem and its residual fix, on the embedded digits, in a minute.

He et al. 2015, Fig. 1 and 6: a deeper *plain* network has higher *training* error than a
shallower one (so it is an optimisation problem, not over-fitting), while the residual network of
the same depth trains at least as well as the shallow one. The demo trains plain-20, plain-56,
ResNet-20 and ResNet-56 (CIFAR layout, 1-channel input) on digits with the same recipe and budget,
prints a table, draws the four training-error curves and states what the numbers show. The
statement is computed from the measured numbers, so a run where the effect does not appear says so.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write, atomic_write_text
from .config import TrainConfig
from .loop import TrainingDiverged, build_model, fit, load_data, resolve_config
from .progress import Reporter
from .runs import EpochMetrics

MODELS = ("plain20", "plain56", "resnet20", "resnet56")
# He et al.'s recipe (SGD momentum 0.9, wd 1e-4, batch 128, BN, lr ÷10 at 50% and 75%) for 15
# epochs (165 steps) of digits. The lr is 0.02 instead of 0.1 for all four nets: on 1,437 images
# 0.1 is "slightly too large to start converging" for 56 layers, as the paper found for
# ResNet-110 on CIFAR (measured here: ResNet-56 still had 84% training error after 10 epochs at
# 0.1, 6% at 0.02; plain-56 stays above 80% at 0.02, 0.05 and 0.1 alike).
EPOCHS = 15
LR = 0.02
# Differences smaller than this (in error fraction) are reported as "about the same".
MARGIN = 0.005


@dataclass(frozen=True)
class DemoRow:
    model: str
    depth: int
    params: int
    final_train_error: float
    test_accuracy: float
    seconds: float
    diverged: bool = False


@dataclass(frozen=True)
class DemoResult:
    rows: list[DemoRow]
    histories: dict[str, list[EpochMetrics]]
    statement: list[str]
    out: Path
    seconds: float


def demo_config(epochs: int = EPOCHS, *, train_limit: int | None = None, seed: int = 0) -> TrainConfig:
    """The one recipe every demo model trains with."""
    return TrainConfig.from_recipe("default", data="digits", epochs=epochs, lr=LR,
                                   train_limit=train_limit, seed=seed, progress="none")


def run_demo(out: str | Path = "demo", *, epochs: int = EPOCHS, train_limit: int | None = None,
             seed: int = 0, models: Sequence[str] = MODELS, show_progress: bool | None = None) -> DemoResult:
    """Train `models` on digits with the same budget; write degradation.png, results.json and
    summary.md into `out`; return the table and the statement."""
    import time

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models import count_params, model_info

    out = Path(out)
    config = demo_config(epochs, train_limit=train_limit, seed=seed)
    data = load_data(config)
    console = Console()
    show = console.is_terminal if show_progress is None else show_progress
    rows, histories = [], {}
    start = time.perf_counter()
    with Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("epochs"), TimeElapsedColumn(), console=console, disable=not show) as bar:
        for name in models:
            cfg = resolve_config(config.replace(model=name), data)
            torch.manual_seed(seed)
            model = build_model(cfg)
            depth, params = model_info(name).depth, count_params(model)
            task = bar.add_task(name, total=cfg.epochs)
            began = time.perf_counter()
            try:
                result = fit(model, data, cfg, reporter=_EpochTicks(bar, task))
                last = result.final
                row = DemoRow(name, depth, params, last.train_error, 1 - last.test_top1_error,
                              result.wall_time)
            except TrainingDiverged:
                row = DemoRow(name, depth, params, 1.0, 0.0, time.perf_counter() - began, diverged=True)
                result = None
            rows.append(row)
            histories[name] = result.history if result else []
            if not show:
                print(f"{name:>9}: training error {100 * row.final_train_error:5.2f}%  test accuracy "
                      f"{100 * row.test_accuracy:5.2f}%  {row.seconds:5.1f}s", flush=True)
    statement = state_findings({r.model: r for r in rows})
    res = DemoResult(rows, histories, statement, out, time.perf_counter() - start)
    _write(res, config)
    _print(res, console)
    return res


class _EpochTicks(Reporter):
    def __init__(self, bar, task) -> None:
        self.bar, self.task = bar, task

    def epoch(self, metrics: EpochMetrics) -> None:
        self.bar.update(self.task, completed=metrics.epoch)


def state_findings(rows: dict[str, DemoRow]) -> list[str]:
    """What the table shows about degradation (He et al. 2015, Sec. 4.1), from its numbers."""

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    def compare(a: DemoRow, b: DemoRow) -> str:
        d = a.final_train_error - b.final_train_error
        return "about the same" if abs(d) < MARGIN else ("higher" if d > 0 else "lower")

    def than(c: str) -> str:
        return f"{c} training error {'as' if c == 'about the same' else 'than'}"

    lines = []
    p20, p56, r20, r56 = (rows.get(m) for m in MODELS)
    if p20 and p56:
        c = compare(p56, p20)
        verdict = {
            "higher": "the deeper plain net trains worse — the degradation problem of He et al. 2015 "
                      "(Fig. 1): more layers, higher training error, so it is not over-fitting",
            "lower": "no degradation at this budget: the deeper plain net trains better",
            "about the same": "no clear degradation at this budget",
        }[c]
        lines.append(f"plain-56 ends with {than(c)} plain-20 ({pct(p56.final_train_error)} "
                     f"vs {pct(p20.final_train_error)}): {verdict}.")
    if p56 and r56:
        c = compare(r56, p56)
        verdict = {
            "lower": "identity shortcuts remove the optimisation difficulty at equal depth",
            "higher": "the shortcuts did not help at this budget",
            "about the same": "the shortcuts made no clear difference at this budget",
        }[c]
        lines.append(f"ResNet-56 ends with {than(c)} plain-56 ({pct(r56.final_train_error)} "
                     f"vs {pct(p56.final_train_error)}) and {pct(r56.test_accuracy)} vs "
                     f"{pct(p56.test_accuracy)} test accuracy: {verdict}.")
    if r20 and r56:
        c = compare(r56, r20)
        verdict = {
            "lower": "with shortcuts, depth no longer hurts training",
            "about the same": "with shortcuts, the deeper net trains as well as the shallow one",
            "higher": "even with shortcuts the deeper net lags at this budget",
        }[c]
        lines.append(f"ResNet-56 ends with {than(c)} ResNet-20 ({pct(r56.final_train_error)} "
                     f"vs {pct(r20.final_train_error)}): {verdict}.")
    for r in rows.values():
        if r.diverged:
            lines.append(f"{r.model} diverged (non-finite loss) with this recipe.")
    return lines


def _write(res: DemoResult, config: TrainConfig) -> None:
    res.out.mkdir(parents=True, exist_ok=True)
    plot_degradation(res.out / "degradation.png", res.histories)
    doc = {"config": config.to_dict(), "rows": [asdict(r) for r in res.rows],
           "histories": {k: [m.as_dict() for m in v] for k, v in res.histories.items()},
           "statement": res.statement, "seconds": res.seconds}
    atomic_write_text(res.out / "results.json", json.dumps(doc, indent=1) + "\n")
    table = ["| model | depth | params | final training error | test accuracy | time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r.model} | {r.depth} | {r.params:,} | {100 * r.final_train_error:.2f}% | "
              f"{100 * r.test_accuracy:.2f}% | {r.seconds:.1f} |" for r in res.rows]
    text = ("# reslab demo: degradation on digits\n\n" + "\n".join(table) + "\n\n"
            + "\n".join(f"- {s}" for s in res.statement) + "\n\n![training error](degradation.png)\n")
    atomic_write_text(res.out / "summary.md", text)


def plot_degradation(path: Path, histories: dict[str, list[EpochMetrics]]) -> None:
    """Training error (left, the four curves) and test error (right) per epoch, like He et al.
    2015, Fig. 1/6: plain nets dashed, residual nets solid, one colour per depth."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_test = fig.subplots(1, 2, sharey=True)
    colours = {"20": "tab:blue", "56": "tab:red"}
    for name, history in histories.items():
        if not history:
            continue
        depth = "".join(ch for ch in name if ch.isdigit())
        style = dict(color=colours.get(depth), linestyle="--" if name.startswith("plain") else "-",
                     label=name.replace("plain", "plain-").replace("resnet", "ResNet-"))
        epochs = [m.epoch for m in history]
        ax_train.plot(epochs, [100 * m.train_error for m in history], **style)
        ax_test.plot(epochs, [100 * (m.test_top1_error or 0) for m in history], **style)
    ax_train.set(xlabel="epoch", ylabel="error (%)", title="training error")
    ax_test.set(xlabel="epoch", title="test error")
    for ax in (ax_train, ax_test):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Plain vs residual networks on digits (cf. He et al. 2015, Fig. 1/6)")
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def _print(res: DemoResult, console) -> None:
    from rich.table import Table

    table = Table(title="reslab demo: plain vs residual networks on digits (same recipe and budget)")
    for col in ("model", "depth", "params", "final training error", "test accuracy", "time"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in res.rows:
        table.add_row(r.model, str(r.depth), f"{r.params:,}",
                      "diverged" if r.diverged else f"{100 * r.final_train_error:.2f}%",
                      f"{100 * r.test_accuracy:.2f}%", f"{r.seconds:.1f}s")
    console.print(table)
    for line in res.statement:
        console.print("• " + line, highlight=False)
    console.print(f"wrote {res.out / 'degradation.png'}, {res.out / 'summary.md'}, "
                  f"{res.out / 'results.json'} in {res.seconds:.1f}s", highlight=False)
    sys.stdout.flush()
