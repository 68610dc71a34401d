"""The run folder: config, per-epoch metrics, checkpoints, curves.

::

    RUN/config.json                      every resolved setting + dataset and model metadata
    RUN/metrics.jsonl                    one EpochMetrics per line
    RUN/checkpoints/last.safetensors     weights, self-describing (`reslab.checkpoint.save_model`)
    RUN/checkpoints/last.state.pt        weights, optimizer, EMA, step/epoch, RNG states, history
    RUN/checkpoints/best.safetensors     the evaluated weights with the lowest test top-1 error
    RUN/curves.png                       loss and error curves
    RUN/tensorboard/                     TensorBoard events (--tensorboard)

Every file is written atomically (temporary file, fsync, rename). The state file is the
training checkpoint and is complete on its own: it also holds the weights, so `--resume` reads
only it. It is written first, the portable model file after; a crash during either write leaves
a complete previous or new state file, so a run can always be resumed, exactly. The state file
holds only tensors and plain Python values and is read with ``torch.load(weights_only=True)``:
loading a run never executes code.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..checkpoint import atomic_write, atomic_write_text, save_model
from .config import TrainConfig

STATE_FORMAT = 1


@dataclass(frozen=True)
class EpochMetrics:
    """One line of metrics.jsonl. Errors are fractions; test values are None when the epoch
    was not evaluated (see `eval_every`). `wall_time` is the run's total seconds so far."""

    epoch: int
    step: int
    train_loss: float
    train_error: float
    test_loss: float | None
    test_top1_error: float | None
    test_top5_error: float | None
    lr: float
    images_per_sec: float
    wall_time: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochMetrics:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last.safetensors"

    @property
    def state(self) -> Path:
        return self.root / "checkpoints" / "last.state.pt"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best.safetensors"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def new_run_dir(config: TrainConfig, base: str | Path = "runs") -> Path:
    """`config.out`, or runs/MODEL-DATA-YYYYmmdd-HHMMSS (with -2, -3, ... if taken)."""
    if config.out:
        return Path(config.out).expanduser()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{config.model}-{config.data}-{stamp}"
    n = 2
    while path.exists():
        path = Path(base) / f"{config.model}-{config.data}-{stamp}-{n}"
        n += 1
    return path


def check_new_run_dir(path: Path) -> None:
    if (path / "config.json").exists():
        raise ValueError(
            f"{path} already holds a run; continue it with `reslab train --resume {path}` or "
            "choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder; choose another --out")


def write_config(files: RunFiles, config: TrainConfig, extra: dict[str, Any]) -> None:
    import reslab

    doc = {"config": config.to_dict(), **extra,
           "versions": {"reslab": reslab.__version__, "torch": torch.__version__}}
    atomic_write_text(files.config, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_config(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, the whole config.json document) of a run folder."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no config.json); pass the folder that "
            "`reslab train` wrote (its --out)"
        )
    doc = json.loads(path.read_text())
    return TrainConfig.from_dict(doc["config"]), doc


def save_checkpoint(files: RunFiles, model: nn.Module, meta: dict[str, Any],
                    state: dict[str, Any]) -> None:
    """The complete training state (with the weights) first, then the model file; each atomically."""
    from ..checkpoint import _unwrap

    weights = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    full = {"format": STATE_FORMAT, "model_meta": meta, "model": weights, **state}
    atomic_write(files.state, lambda p: torch.save(full, p))
    save_model(files.last, model, {**meta, "step": state["step"], "epoch": state["epoch"]})


def load_checkpoint(files: RunFiles, model: nn.Module) -> dict[str, Any]:
    """Load the checkpointed weights into `model` (strictly) and return the training state."""
    from ..checkpoint import _unwrap

    if not files.state.exists():
        raise FileNotFoundError(
            f"{files.state} is missing, so {files.root} cannot be resumed (it stopped before "
            "its first checkpoint); start the run again"
        )
    try:
        state = torch.load(files.state, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file, or one with pickled code in it
        raise ValueError(f"{files.state} cannot be read as a reslab training state ({e.__class__.__name__}); "
                         "start the run again") from None
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{files.state} has state format {state.get('format')!r}, this reslab "
                         f"reads {STATE_FORMAT}; resume it with the reslab version that wrote it")
    try:
        _unwrap(model).load_state_dict(state["model"], strict=True)
    except RuntimeError as e:
        meta = state.get("model_meta", {})
        raise ValueError(
            f"{files.state} holds weights of model {meta.get('model')!r} "
            f"{meta.get('model_kwargs')} that do not fit the model of this run's config: "
            f"{str(e).splitlines()[0]} Resume with the run folder the checkpoint came from, or "
            "start a new run"
        ) from None
    return state


def write_metrics(files: RunFiles, history: Sequence[EpochMetrics]) -> None:
    """Rewrite metrics.jsonl from the whole history, so a resumed run never repeats a line."""
    text = "".join(json.dumps(m.as_dict()) + "\n" for m in history)
    atomic_write_text(files.metrics, text)


def read_metrics(run_dir: str | Path) -> list[EpochMetrics]:
    path = Path(run_dir) / "metrics.jsonl"
    return [EpochMetrics.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]


def plot_curves(path: Path, history: Sequence[EpochMetrics], title: str) -> None:
    """Loss (left) and top-1 error (right) per epoch, training solid and test dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend state
    ax_loss, ax_err = fig.subplots(1, 2)
    epochs = [m.epoch for m in history]
    tested = [m for m in history if m.test_loss is not None]
    ax_loss.plot(epochs, [m.train_loss for m in history], label="train")
    ax_loss.plot([m.epoch for m in tested], [m.test_loss for m in tested], "--", label="test")
    ax_err.plot(epochs, [100 * m.train_error for m in history], label="train")
    ax_err.plot([m.epoch for m in tested], [100 * m.test_top1_error for m in tested], "--",
                label="test top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
