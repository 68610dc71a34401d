"""Progress output: a rich progress bar on a terminal, one plain line per epoch otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from .runs import EpochMetrics


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """The one-line summary of an epoch used by both reporters."""
    test = ""
    if m.test_loss is not None:
        test = (f"  test loss {m.test_loss:.4f} top-1 {100 * m.test_top1_error:.2f}% "
                f"top-5 {100 * m.test_top5_error:.2f}%")
    return (f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}  step {m.step}  "
            f"train loss {m.train_loss:.4f} err {100 * m.train_error:.2f}%{test}  "
            f"lr {m.lr:.4g}  {m.images_per_sec:,.0f} img/s  {m.wall_time:.1f}s")


class Reporter:
    """Silent base: `fit` calls these hooks; subclasses show them."""

    def start(self, *, total_steps: int, steps_per_epoch: int, epochs: int, step: int) -> None:
        pass

    def step(self, *, step: int, epoch: int, loss: float, accuracy: float,
             images_per_sec: float) -> None:
        pass

    def epoch(self, metrics: EpochMetrics) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainReporter(Reporter):
    """One line per epoch (and per message) for logs, CI and files."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.epochs = 0

    def start(self, *, total_steps: int, steps_per_epoch: int, epochs: int, step: int) -> None:
        self.epochs = epochs

    def epoch(self, metrics: EpochMetrics) -> None:
        print(format_epoch(metrics, self.epochs), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichReporter(Reporter):
    """A live bar over the whole run with loss, accuracy, images/s and ETA; epoch lines above it."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  "
                       "{task.fields[ips]:,.0f} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = None
        self.epochs = 0

    def start(self, *, total_steps: int, steps_per_epoch: int, epochs: int, step: int) -> None:
        self.epochs = epochs
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=step,
                                           epoch=step // max(steps_per_epoch, 1) + 1,
                                           loss=float("nan"), acc=0.0, ips=0.0)

    def step(self, *, step: int, epoch: int, loss: float, accuracy: float,
             images_per_sec: float) -> None:
        self.progress.update(self.task, completed=step, epoch=epoch, loss=loss, acc=accuracy,
                             ips=images_per_sec)

    def epoch(self, metrics: EpochMetrics) -> None:
        self.progress.console.print(format_epoch(metrics, self.epochs), highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(mode: str) -> Reporter:
    """auto: a bar when stdout is a terminal, plain lines otherwise; none: silent."""
    if mode == "none":
        return Reporter()
    if mode == "bar" or (mode == "auto" and sys.stdout.isatty()):
        return RichReporter()
    if mode in ("plain", "auto"):
        return PlainReporter()
    raise ValueError(f"progress must be auto, bar, plain or none; got {mode!r}")
