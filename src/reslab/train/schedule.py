"""Learning-rate schedules as pure functions of the optimizer step.

Because the lr depends on nothing but the step (and, for the error warm-up, one saved flag), a
resumed run needs no scheduler state to continue exactly where it stopped.

- ``step``: lr · lr_decay^k after the k-th milestone (He et al. 2015, Sec. 4.2: ÷10 at 32k and
  48k iterations; Huang et al. 2017: ÷10 at 50% and 75% of the epochs).
- ``cosine``: half a cosine from lr down to lr · min_lr_factor (Loshchilov & Hutter 2017, SGDR
  without restarts).
- ``onecycle``: linear ramp from lr/25 up to lr at `onecycle_peak` of training, then linear
  decay to lr · min_lr_factor (Smith & Topin 2018, the triangular form used by the fast CIFAR
  trainers).
- ``constant``: lr throughout.

A linear warm-up (Goyal et al. 2017, "gradual warmup") multiplies any of them by
(step + 1) / warmup_steps over the first `warmup_steps` steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from .config import TrainConfig

ONECYCLE_START = 1 / 25  # the lr at step 0 as a fraction of the peak (PyTorch's div_factor)


@dataclass(frozen=True)
class LRSchedule:
    """lr(step) for steps 0 .. total_steps-1; `milestones` are in steps."""

    kind: str
    base_lr: float
    total_steps: int
    milestones: tuple[int, ...] = ()
    decay: float = 0.1
    warmup_steps: int = 0
    min_factor: float = 0.0
    peak: float = 0.25

    def __call__(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def factor(self, step: int) -> float:
        f = self._main(step)
        if step < self.warmup_steps:
            f *= (step + 1) / self.warmup_steps
        return f

    def _main(self, step: int) -> float:
        last = max(self.total_steps - 1, 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            # bisect_right: the decay applies from the milestone step itself onwards.
            return self.decay ** bisect.bisect_right(self.milestones, step)
        if self.kind == "cosine":
            start = min(self.warmup_steps, last - 1)  # the cosine begins after the warm-up
            t = min(max(step - start, 0) / max(last - start, 1), 1.0)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "onecycle":
            peak = max(round(self.peak * last), 1)
            if step <= peak:
                return ONECYCLE_START + (1 - ONECYCLE_START) * step / peak
            t = min((step - peak) / max(last - peak, 1), 1.0)
            return 1 + (self.min_factor - 1) * t
        raise ValueError(f"unknown schedule {self.kind!r}")


def build_schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> LRSchedule:
    """The schedule of `config` for a run of `total_steps` with `steps_per_epoch` steps an epoch."""
    unit = {"fraction": total_steps, "epoch": steps_per_epoch, "step": 1}[config.milestone_unit]
    milestones = tuple(int(round(m * unit)) for m in config.milestones)
    if config.schedule == "step" and config.milestone_unit != "fraction":
        late = [m for m, s in zip(config.milestones, milestones) if s >= total_steps]
        if late:
            raise ValueError(
                f"milestone(s) {', '.join(f'{m:g}' for m in late)} ({config.milestone_unit}) fall "
                f"after the last step ({total_steps}); set --milestones inside the budget or use "
                "--milestone-unit fraction"
            )
    return LRSchedule(
        kind=config.schedule,
        base_lr=config.lr,
        total_steps=total_steps,
        milestones=milestones,
        decay=config.lr_decay,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
        min_factor=config.min_lr_factor,
        peak=config.onecycle_peak,
    )


@dataclass
class ErrorWarmup:
    """He et al. 2015, Sec. 4.2 (ResNet-110): lr 0.01 "until the training error is below 80%
    (about 400 iterations), and then go back to 0.1".

    The training error is smoothed over batches (an exponential average with weight 0.9 on the
    past) so that one lucky batch does not end the warm-up; once it ends it stays ended.
    """

    lr: float
    threshold: float
    done: bool = False
    smoothed_error: float | None = None

    SMOOTHING = 0.9

    def update(self, batch_error: float) -> None:
        if self.done:
            return
        s = self.smoothed_error
        self.smoothed_error = batch_error if s is None else self.SMOOTHING * s + (1 - self.SMOOTHING) * batch_error
        self.done = self.smoothed_error < self.threshold

    def lr_or(self, scheduled: float) -> float:
        return scheduled if self.done else self.lr

    def state_dict(self) -> dict:
        return {"done": self.done, "smoothed_error": self.smoothed_error}

    def load_state_dict(self, state: dict) -> None:
        self.done, self.smoothed_error = bool(state["done"]), state["smoothed_error"]
