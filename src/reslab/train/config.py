"""`TrainConfig`: every setting of a training run, as data, and the named recipes.

The dataclass defaults are He et al. 2015's CIFAR hyper-parameters (Sec. 4.2: SGD, batch 128,
lr 0.1 divided by 10 twice, momentum 0.9, weight decay 1e-4, pad-4 crop + flip); a *recipe* is a
named set of values on top of those defaults (`RECIPES`), and every field can be overridden after
that (each one is a `reslab train` flag of the same name). The resolved config is written to the
run folder as ``config.json`` and is enough to reproduce the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..data.base import PAD_MODES

# Test-time augmentations (train.evaluate builds their views).
TTA = ("none", "flip", "flip-translate", "10crop")

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("step", "cosine", "onecycle", "constant")
MILESTONE_UNITS = ("fraction", "epoch", "step")
ERROR_WARMUP = ("off", "on", "auto")
PROGRESS = ("auto", "bar", "plain", "none")
# torch.compile's modes; reduce-overhead replays the step's kernels as CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# He et al. 2015, Sec. 4.2: ResNet-110 needs the lr-0.01 warm-up; shallower nets start at 0.1.
ERROR_WARMUP_MIN_DEPTH = 110
# Settings that change how a run executes but not what it computes, so `--resume` may change
# them (a moved dataset is checked against the run's record of it).
RUNTIME_FIELDS = ("device", "threads", "workers", "progress", "tensorboard", "data_dir", "dist_timeout")


def _f(help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (and `choices`/`minimum`) for the CLI and docs."""
    default = kw.pop("default")
    metadata = {"help": help, **kw}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Errors and rates are fractions (0.08 = 8%)."""

    # --- what to train on what
    model: str = _f("registered model name (`reslab models`)", default="resnet20")
    data: str = _f("dataset: digits, cifar10, cifar100, folder, synthetic", default="digits")
    model_kwargs: dict = _f("model constructor overrides, e.g. shortcut=A", default={})
    num_classes: int | None = _f("classifier outputs (default: the dataset's classes)",
                                 default=None, minimum=1)
    in_chans: int | None = _f("input channels (default: the dataset's)", default=None, minimum=1)
    data_dir: str | None = _f("where the dataset files are", default=None)
    download: bool = _f("download a missing CIFAR archive", default=False)
    val_split: bool = _f("evaluate on a held-out part of the training set (CIFAR: 45k/5k)",
                         default=False)
    train_limit: int | None = _f("use at most this many training images", default=None, minimum=1)
    test_limit: int | None = _f("evaluate on at most this many images", default=None, minimum=1)
    data_options: dict = _f("dataset options, e.g. image_size=64 num_train=500", default={})
    pad: int | None = _f("random-crop padding (default: the dataset's)", default=None, minimum=0)
    flip: bool | None = _f("random horizontal flip (default: the dataset's)", default=None)
    alternate_flip: bool = _f("airbench's derandomised flip (Jordan 2024): a random half of the "
                              "images is flipped in the first epoch, and every image is flipped in "
                              "every other epoch after that, so each is seen both ways in any two "
                              "epochs (in-memory datasets; needs flip)", default=False)
    cutout: int | None = _f("cutout square side, 0 = off (default: the dataset's)",
                            default=None, minimum=0)
    pad_mode: str | None = _f("what a random crop sees beyond the border: zero (black), mean (the "
                              "dataset's mean colour), reflect (the mirrored image) (default: the "
                              "dataset's)", default=None, choices=PAD_MODES)
    workers: int = _f("DataLoader worker processes for folder datasets", default=4, minimum=0)

    # --- optimisation (He et al. 2015, Sec. 3.4 and 4.2)
    recipe: str = _f("the named recipe the other values start from", default="default")
    epochs: int | None = _f("training epochs (default: the recipe's for this dataset)",
                            default=None, minimum=1)
    steps: int | None = _f("training iterations; overrides epochs", default=None, minimum=1)
    batch_size: int = _f("mini-batch size (of each process under torchrun: the global batch is "
                         "batch_size × world size)", default=128, minimum=1)
    lr: float = _f("peak learning rate", default=0.1, minimum=0.0, exclusive=True)
    momentum: float = _f("SGD momentum", default=0.9, minimum=0.0)
    nesterov: bool = _f("Nesterov momentum", default=False)
    weight_decay: float = _f("L2 weight decay", default=1e-4, minimum=0.0)
    decay_bn_bias: bool = _f("apply weight decay to BN parameters and biases too",
                             default=True)
    freeze_bn_scale: bool = _f("do not train the BatchNorm scales: they keep their initial values "
                               "(1 in a new model), as in Page's and airbench's fast recipes",
                               default=False)
    bn_shift_lr: float = _f("multiply the learning rate of BatchNorm shifts by this, dividing "
                            "their weight decay by it (the same decay per step); airbench: 64, "
                            "with frozen scales", default=1.0, minimum=0.0, exclusive=True)
    label_smoothing: float = _f("label smoothing of the cross-entropy", default=0.0, minimum=0.0)
    schedule: str = _f("lr schedule", default="step", choices=SCHEDULES)
    milestones: tuple[float, ...] = _f("step schedule: where the lr is multiplied by lr_decay",
                                       default=(0.5, 0.75))
    milestone_unit: str = _f("unit of milestones", default="fraction", choices=MILESTONE_UNITS)
    lr_decay: float = _f("step schedule factor", default=0.1, minimum=0.0, exclusive=True)
    warmup_epochs: float = _f("linear lr warm-up from 0, in epochs", default=0.0, minimum=0.0)
    min_lr_factor: float = _f("cosine/onecycle: final lr as a fraction of lr", default=0.0,
                              minimum=0.0)
    onecycle_peak: float = _f("onecycle: fraction of training at which the lr peaks",
                              default=0.25, minimum=0.0)
    error_warmup: str = _f("lr error_warmup_lr until training error < threshold (auto: "
                           f"for depth >= {ERROR_WARMUP_MIN_DEPTH})", default="off",
                           choices=ERROR_WARMUP)
    error_warmup_lr: float = _f("learning rate of the error warm-up", default=0.01,
                                minimum=0.0, exclusive=True)
    error_warmup_threshold: float = _f("training error that ends the error warm-up",
                                       default=0.8, minimum=0.0)
    grad_clip: float | None = _f("clip the gradient norm to this", default=None, minimum=0.0,
                                 exclusive=True)
    ema_decay: float | None = _f("keep an EMA of the weights with this decay (e.g. 0.999) and "
                                 "evaluate it", default=None, minimum=0.0)

    # --- numerics and speed
    precision: str = _f("autocast precision", default="fp32", choices=PRECISIONS)
    channels_last: bool = _f("NHWC memory layout", default=False)
    compile: bool = _f("torch.compile the training step", default=False)
    compile_mode: str = _f("torch.compile mode (reduce-overhead: CUDA graphs on a GPU)",
                           default="default", choices=COMPILE_MODES)
    fused_kernels: bool = _f("on a CPU, run BN-ReLU and BN-add-ReLU as reslab's fused kernel "
                             "(compiled on first use; needs a C++ compiler and ninja)", default=False)
    device: str = _f("cpu, cuda, cuda:1, ... or auto", default="auto")
    threads: int | None = _f("CPU threads (default: torch's)", default=None, minimum=1)
    seed: int = _f("seed of weights, data order and augmentation", default=0, minimum=0)
    deterministic: bool = _f("deterministic algorithms only (bitwise-reproducible)",
                             default=False)

    # --- data parallel (under torchrun; see docs/scale-out.md)
    sync_bn: bool = _f("normalise with the statistics of the global batch across processes "
                       "(SyncBatchNorm; GPUs only)", default=False)
    scale_lr: bool = _f("multiply lr and error_warmup_lr by the number of processes (the linear "
                        "scaling rule of Goyal et al. 2017 for the global batch)", default=False)
    dist_timeout: float = _f("seconds a process waits for the others before failing with an "
                             "error (a rank died or hangs)", default=300.0, minimum=0.0,
                             exclusive=True)

    # --- bookkeeping
    out: str | None = _f("run folder (default: runs/MODEL-DATA-TIME)", default=None)
    eval_every: int = _f("evaluate every N epochs (and after the last)", default=1, minimum=1)
    eval_batch_size: int = _f("evaluation batch size", default=512, minimum=1)
    eval_tta: str = _f("test-time augmentation of the evaluations: none, flip (mean probability "
                       "of the image and its mirror), flip-translate (also both shifted one pixel "
                       "diagonally each way: 6 views), 10crop", default="none", choices=TTA)
    tensorboard: bool = _f("write TensorBoard events", default=False)
    progress: str = _f("progress display (auto: a bar on a terminal, lines otherwise)",
                       default="auto", choices=PROGRESS)

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ so JSON round trips give equal configs.
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "data_options", dict(self.data_options))
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.error_warmup_threshold > 1:
            raise ValueError(f"error_warmup_threshold is a fraction in [0, 1], got "
                             f"{self.error_warmup_threshold}")
        if not 0 < self.onecycle_peak < 1:
            raise ValueError(f"onecycle_peak must lie strictly between 0 and 1, got {self.onecycle_peak}")
        if self.ema_decay is not None and not self.ema_decay < 1:
            raise ValueError(f"ema_decay must be below 1 (e.g. 0.999), got {self.ema_decay}")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must increase, got {list(self.milestones)}")
        if self.milestone_unit == "fraction" and any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(
                f"fraction milestones lie strictly between 0 and 1, got {list(self.milestones)}; "
                "use --milestone-unit epoch or step for absolute positions"
            )

    # --- construction
    @classmethod
    def from_recipe(cls, recipe: str = "default", **overrides: Any) -> TrainConfig:
        """The dataclass defaults, then `RECIPES[recipe]`, then `overrides`.

        An explicit `epochs` drops the recipe's `steps` budget and vice versa, so
        ``from_recipe("paper", epochs=10)`` trains 10 epochs instead of 64k iterations.
        """
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values = dict(RECIPES[recipe].values)
        if overrides.get("epochs") is not None:
            values.pop("steps", None)
        if overrides.get("steps") is not None:
            values.pop("epochs", None)
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig has no field {', '.join(map(repr, unknown))}")
        return cls(**{**values, **overrides, "recipe": recipe})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"config has unknown keys {', '.join(unknown)}; it was written by a different "
                "reslab version — start a new run"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # --- derived values
    def epochs_or_default(self) -> int | None:
        """`epochs`, or the recipe's budget for this dataset; None when `steps` sets the budget."""
        if self.steps is not None:
            return None
        if self.epochs is not None:
            return self.epochs
        return RECIPES[self.recipe].epochs_for(self.data)


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """Range and choice checks from the field's metadata: the CLI and the API share them."""
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
    minimum = f.metadata.get("minimum")
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if f.metadata.get("exclusive") and value <= minimum:
            raise ValueError(f"{f.name} must be greater than {minimum}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{f.name} must be at least {minimum}, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """A named set of TrainConfig values, plus the epoch budget per dataset (``"*"``: others)."""

    name: str
    description: str
    values: Mapping[str, Any]
    epochs: Mapping[str, int] = field(default_factory=dict)

    def epochs_for(self, data: str) -> int | None:
        return self.epochs.get(data, self.epochs.get("*"))


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "default",
            "He et al. 2015's hyper-parameters (SGD 0.9, lr 0.1, wd 1e-4, batch 128, lr ÷10 at "
            "50% and 75%), with an epoch budget per dataset",
            {},
            # CIFAR: 164 epochs with drops at 82/123 is the fb.resnet.torch translation of 64k
            # iterations; digits: 30 epochs reach >= 97% with ResNet-20 in seconds.
            {"digits": 30, "synthetic": 5, "cifar10": 164, "cifar100": 164, "folder": 90, "*": 30},
        ),
        Recipe(
            "paper",
            "He et al. 2015, Sec. 4.2 exactly: batch 128, lr 0.1 ÷10 at 32k and 48k iterations, "
            "stop at 64k, wd 1e-4, momentum 0.9; lr 0.01 until training error < 80% for depth >= 110",
            {"batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
             "schedule": "step", "milestones": (32000, 48000), "milestone_unit": "step",
             "lr_decay": 0.1, "steps": 64000, "error_warmup": "auto", "error_warmup_lr": 0.01,
             "error_warmup_threshold": 0.8},
        ),
        Recipe(
            "densenet",
            "Huang et al. 2017, Sec. 4.2: batch 64, 300 epochs, lr 0.1 ÷10 at 50% and 75%, "
            "Nesterov momentum 0.9 without dampening, wd 1e-4",
            {"batch_size": 64, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
             "schedule": "step", "milestones": (0.5, 0.75), "milestone_unit": "fraction",
             "lr_decay": 0.1},
            {"*": 300},
        ),
        Recipe(
            "fast",
            "time to accuracy on a small CPU: one-cycle lr (peak 0.2 at 25%), Nesterov, label "
            "smoothing 0.1, no wd on BN/bias, batch 256, reflect-padded crops, bf16 autocast, "
            "channels-last, fused BN-ReLU kernel, few epochs",
            {"batch_size": 256, "lr": 0.2, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "decay_bn_bias": False, "label_smoothing": 0.1,
             "schedule": "onecycle", "onecycle_peak": 0.25, "precision": "bf16",
             "pad_mode": "reflect", "channels_last": True, "fused_kernels": True},
            {"digits": 15, "synthetic": 3, "cifar10": 15, "cifar100": 20, "folder": 16, "*": 15},
        ),
    )
}
