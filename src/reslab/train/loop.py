"""The training loop.

`fit(model, data, config)` trains a model on a `DatasetBundle` and returns a `RunResult` with the
per-epoch metrics; given a run folder it also checkpoints every epoch and can resume exactly.
`train(config)` builds the data and the model from the config and writes a run folder;
`resume(run_dir)` continues one. See ``runs.py`` for the folder's files.

In-memory datasets live on the training device as uint8; every step slices a batch there,
augments it with batch tensor ops and normalises it (no DataLoader, no per-image Python).
Folder datasets use a DataLoader with workers. Randomness comes from three places, each
reproducible: the global torch RNG (weights, dropout), a per-epoch generator for the data order
(seeded from seed and epoch), and one augmentation generator whose state is checkpointed, so a
run interrupted anywhere continues with the very same batches.

Under torchrun (see ``dist.py``) every rank draws the same data order and takes its shard of it;
the augmentation and dropout draws are seeded per rank (rank 0 keeps the single-process seeds),
and the checkpoint holds every rank's generator states, so a distributed run resumes exactly too.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..checkpoint import _unwrap, save_model
from ..data import (
    AugmentSpec, DatasetBundle, InMemoryDataset, alternating_flips, augment_batch, batches,
    load_dataset, mean_colour, normalize,
)
from .config import ERROR_WARMUP_MIN_DEPTH, RUNTIME_FIELDS, TrainConfig
from .dist import DistContext, backend_for, check_sync_bn, process_group, torchrun_environment, wrap_model
from .evaluate import evaluate_model
from .progress import Reporter, make_reporter
from .runs import (EpochMetrics, RunFiles, check_new_run_dir, load_checkpoint, new_run_dir, plot_curves,
                   read_config, save_checkpoint, write_config, write_metrics)
from .schedule import ErrorWarmup, build_schedule
from .step import EMA, StepOutput, freeze_bn_scales, make_optimizer, make_train_step


class StopTraining(Exception):
    """Raise from a callback to stop cleanly: the run is checkpointed and `fit` returns."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@dataclass
class LoopState:
    """Where a run is. Everything but `model`, `optimizer` and `loss` is checkpointed."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss·n, correct, n
    epoch_train_time: float = 0.0
    elapsed: float = 0.0  # seconds of earlier sessions of this run
    best_top1_error: float | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    lr: float = 0.0
    loss: torch.Tensor | None = None  # the last step's loss (reading it waits for the device)
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None


class Callback:
    """Hooks into `fit`. Raise `StopTraining` from either to stop after a checkpoint.

    `on_step_end` runs after each optimizer step, with gradients still in ``.grad``.
    """

    def on_step_end(self, state: LoopState) -> None:
        pass

    def on_epoch_end(self, state: LoopState, metrics: EpochMetrics) -> None:
        pass


@dataclass
class RunResult:
    """What a run produced. `model` holds the last weights (the plain module, not its DDP
    wrapper); `eval_model` the evaluated ones (the EMA when `ema_decay` is set, else `model`)."""

    model: nn.Module
    eval_model: nn.Module
    config: TrainConfig
    history: list[EpochMetrics]
    status: str  # "completed", "stopped" (StopTraining) or "interrupted" (SIGINT/SIGTERM)
    steps: int
    epochs: int
    best_top1_error: float | None
    wall_time: float
    run_dir: Path | None = None
    signal: int | None = None

    @property
    def final(self) -> EpochMetrics | None:
        return self.history[-1] if self.history else None


# ----------------------------------------------------------------------------- the public API

def train(config: TrainConfig, *, callbacks: Sequence[Callback] = (), dist: DistContext | None = None,
          reporter: Reporter | None = None) -> RunResult:
    """Train `config.model` on `config.data` into a new run folder (`config.out` or runs/...).

    Started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) and given no `dist`, it opens the
    process group itself and trains data-parallel (see ``dist.py``).
    """
    if dist is None and (env := torchrun_environment()) is not None:
        with process_group(env, resolve_device(config.device), config.dist_timeout) as dist:
            return train(config, callbacks=callbacks, dist=dist, reporter=reporter)
    dist = dist or DistContext()
    data = load_data_in_turn(config, dist)
    config = resolve_config(config, data)
    check_sync_bn(config.sync_bn, config.device, dist)
    # Rank 0 names the folder (a default name holds the time) and checks it; all ranks then fail
    # alike or go on alike, instead of the others waiting for a rank 0 that has stopped.
    run_dir = problem = None
    if dist.is_main:
        run_dir = new_run_dir(config)
        try:
            check_new_run_dir(run_dir)
        except ValueError as e:
            problem = str(e)
    run_dir, problem = dist.broadcast_object((run_dir, problem))
    if problem:
        raise ValueError(problem)
    config = config.replace(out=str(run_dir))
    torch.manual_seed(config.seed)  # the initial weights (the same on every rank)
    model = build_model(config)
    if dist.is_main:
        write_config(RunFiles(run_dir), config, {"dataset": dataset_meta(data), "model": model_meta(config, data),
                                                 "distributed": distributed_meta(config, dist)})
    return fit(model, data, config, run_dir=run_dir, callbacks=callbacks, dist=dist, reporter=reporter)


def resume(run_dir: str | Path, *, callbacks: Sequence[Callback] = (), dist: DistContext | None = None,
           reporter: Reporter | None = None, **runtime: Any) -> RunResult:
    """Continue the run in `run_dir` from its last checkpoint, exactly as it would have gone on.

    Only settings that do not change the computation (`RUNTIME_FIELDS`: device, threads,
    workers, progress, tensorboard, data_dir, dist_timeout) may be changed. Under torchrun it
    opens the process group as `train` does; the world size must be the run's.
    """
    if dist is None and (env := torchrun_environment()) is not None:
        saved, _ = read_config(run_dir)
        device = runtime.get("device") or saved.device
        timeout = runtime.get("dist_timeout") or saved.dist_timeout
        with process_group(env, resolve_device(device), timeout) as dist:
            return resume(run_dir, callbacks=callbacks, dist=dist, reporter=reporter, **runtime)
    dist = dist or DistContext()
    config, doc = read_config(run_dir)
    trained_on = doc.get("distributed", {}).get("world_size", 1)
    if trained_on != dist.world_size:
        raise ValueError(
            f"{run_dir} was trained by {trained_on} process(es) and this resume runs {dist.world_size}; "
            f"the data shards and steps per epoch depend on it, so resume with the same number "
            f"(torchrun --nproc-per-node=... --nnodes=... giving a world size of {trained_on}"
            + ("" if trained_on > 1 else ", or without torchrun") + ")"
        )
    given = {k: v for k, v in runtime.items() if v is not None}
    unknown = sorted(set(given) - set(config.to_dict()))
    if unknown:
        raise ValueError(f"TrainConfig has no setting {', '.join(map(repr, unknown))}")
    changed = {k: v for k, v in given.items() if v != getattr(config, k)}
    fixed = sorted(set(changed) - set(RUNTIME_FIELDS))
    if fixed:
        raise ValueError(
            f"--resume continues {run_dir} with the settings in its config.json, so "
            f"{', '.join(fixed)} cannot change (only {', '.join(RUNTIME_FIELDS)} can); drop "
            "those flags, or start a new run with --out"
        )
    config = config.replace(**changed, out=str(run_dir))
    data = load_data_in_turn(config, dist)
    if doc.get("dataset") and dataset_meta(data) != doc["dataset"]:
        raise ValueError(
            f"the dataset {config.data!r} is not the one {run_dir} was trained on (its size, "
            "mean/std or classes differ); point --data-dir at the original files"
        )
    model = build_model(config)
    return fit(model, data, config, run_dir=run_dir, callbacks=callbacks, dist=dist,
               reporter=reporter, resume=True)


def fit(
    model: nn.Module,
    data: DatasetBundle,
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    dist: DistContext | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> RunResult:
    """Train `model` on `data` with `config`'s recipe; checkpoint into `run_dir` if given.

    With a `dist` of more than one process (the process group open), the model is wrapped in
    DistributedDataParallel here (SyncBatchNorm first with `config.sync_bn`; a model already in
    DDP is used as it is); its plain module is what is checkpointed. Returns when the
    step budget is spent, when a callback raises `StopTraining`, or on SIGINT/SIGTERM (after
    saving a checkpoint). Raises `TrainingDiverged` when the loss stops being finite.
    """
    if not resume:
        fit_to_data(model, data)
    run = _Run(model, data, resolve_config(config, data), run_dir, dist or DistContext(), reporter, callbacks)
    with run.torch_settings(), _SignalGuard() as signals:
        if resume:
            run.restore()
        run.reporter.start(total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                           epochs=run.epochs, step=run.state.step)
        try:
            while run.state.step < run.total_steps:
                run.model.train()
                run.start_clock()
                for x8, y, flip in run.epoch_batches():
                    run.state.lr = run.lr()
                    for group in run.optimizer.param_groups:
                        group["lr"] = run.state.lr * group.get("lr_scale", 1.0)
                    x = normalize(augment_batch(x8, run.augment, run.aug_gen, flip), data.mean,
                                  data.std, channels_last=run.config.channels_last)
                    out = run.train_step(x, y)
                    if run.ema is not None:
                        run.ema.update(run.model)
                    run.record(out, len(y))
                    for cb in callbacks:
                        cb.on_step_end(run.state)
                    if run.dist.any(signals.received is not None, run.device):
                        run.stop_clock()
                        return run.finish("interrupted", signals.received)
                    if run.state.step >= run.total_steps:
                        break
                run.stop_clock()
                run.end_epoch()
            return run.finish("completed")
        except StopTraining:
            run.stop_clock()
            return run.finish("stopped")
        finally:
            run.close()


# ----------------------------------------------------------------------------- config → objects

WHITENING_IMAGES = 10_000  # training images the input-whitening layers are fitted to


def fit_to_data(model: nn.Module, data: DatasetBundle, limit: int = WHITENING_IMAGES) -> int:
    """Fit the model's data-dependent layers (`PatchWhitening`) that are not fitted yet to the
    first `limit` training images, normalised as training normalises them; returns how many.
    Deterministic, so every rank of a distributed run fits the same filters."""
    from ..models.layers import fit_whitening, unfitted_whitening

    if not unfitted_whitening(model):  # nothing to fit: skip normalising the images
        return 0
    n = min(limit, len(data.train))
    if isinstance(data.train, InMemoryDataset):
        images = data.train.images[:n].cpu()
    else:  # a folder dataset decodes each image: fewer of them
        images = torch.stack([data.train[i][0] for i in range(min(n, 1000))])
    return fit_whitening(model, normalize(images, data.mean, data.std))


def load_data(config: TrainConfig) -> DatasetBundle:
    return load_dataset(
        config.data, data_dir=config.data_dir, download=config.download, val_split=config.val_split,
        seed=config.seed, train_limit=config.train_limit, test_limit=config.test_limit,
        **config.data_options,
    )


def load_data_in_turn(config: TrainConfig, dist: DistContext) -> DatasetBundle:
    """`load_data`; with --download in a distributed run, rank 0 first, then the first rank of
    each other node, then the rest, so no two processes unpack the same archive at once."""
    if not (config.download and dist.world_size > 1):
        return load_data(config)
    turn = 0 if dist.is_main else 1 if dist.local_rank == 0 else 2
    data = None
    for phase in range(3):
        if phase == turn:
            data = load_data(config)
        dist.barrier()
    return data


def resolve_config(config: TrainConfig, data: DatasetBundle) -> TrainConfig:
    """Fill every "follow the dataset / recipe / machine" setting with its value (idempotent)."""
    from ..models import model_info

    if config.eval_tta == "10crop" and not data.in_memory:
        # A folder dataset's test images are already cropped to the model's size; its 10 crops
        # come from the full-size images, which only `reslab eval` loads.
        raise ValueError(
            f"--eval-tta 10crop during training needs an in-memory dataset (digits, cifar10, "
            f"cifar100, synthetic), not {data.name!r}; train with --eval-tta none or flip and "
            "evaluate the run afterwards with `reslab eval RUN --tta 10crop`")
    warmup = config.error_warmup
    if warmup == "auto":
        warmup = "on" if model_info(config.model).depth >= ERROR_WARMUP_MIN_DEPTH else "off"
    resolved = config.replace(
        num_classes=config.num_classes or data.num_classes,
        in_chans=config.in_chans or data.in_chans,
        epochs=config.epochs_or_default(),
        pad=data.augment.pad if config.pad is None else config.pad,
        flip=data.augment.flip if config.flip is None else config.flip,
        cutout=data.augment.cutout if config.cutout is None else config.cutout,
        pad_mode=data.augment.pad_mode if config.pad_mode is None else config.pad_mode,
        error_warmup=warmup,
        device=resolve_device(config.device),
    )
    if resolved.alternate_flip and not data.in_memory:
        raise ValueError(
            f"--alternate-flip needs an in-memory dataset (digits, cifar10, cifar100, synthetic): "
            f"{data.name!r} images are flipped one at a time by its loader; use the random flip")
    if resolved.alternate_flip and not resolved.flip:
        raise ValueError("--alternate-flip decides which images to flip, but flipping is off "
                         "(--no-flip or the dataset's default); drop one of the two")
    return resolved


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
    return device


def build_model(config: TrainConfig) -> nn.Module:
    from ..models import create_model

    return create_model(config.model, num_classes=config.num_classes, in_chans=config.in_chans,
                        **config.model_kwargs)


def model_meta(config: TrainConfig, data: DatasetBundle) -> dict[str, Any]:
    """The metadata of every model file the run writes: enough for `load_model` and `predict`."""
    return {
        "model": config.model,
        "model_kwargs": {**config.model_kwargs, "num_classes": config.num_classes,
                         "in_chans": config.in_chans},
        "dataset": data.name, "mean": list(data.mean), "std": list(data.std),
        "classes": list(data.classes), "image_size": list(data.image_size),
    }


def distributed_meta(config: TrainConfig, dist: DistContext) -> dict[str, Any]:
    """How many processes trained the run and what that made of the batch and the lr."""
    scale = dist.world_size if config.scale_lr else 1
    return {
        "world_size": dist.world_size, "batch_size_per_process": config.batch_size,
        "global_batch_size": config.batch_size * dist.world_size, "lr": config.lr * scale,
        "sync_bn": config.sync_bn and dist.world_size > 1,
        "backend": backend_for(config.device) if dist.world_size > 1 else None,
    }


def dataset_meta(data: DatasetBundle) -> dict[str, Any]:
    return {
        "name": data.name, "train_size": len(data.train), "test_size": len(data.test),
        "num_classes": data.num_classes, "in_chans": data.in_chans,
        "image_size": list(data.image_size), "mean": list(data.mean), "std": list(data.std),
        "classes": list(data.classes),
    }


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed for one random stream of the run, stable across platforms and versions."""
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- the run's machinery

class _Run:
    """Everything `fit` needs, built from the config, with the bookkeeping between steps."""

    def __init__(self, model: nn.Module, data: DatasetBundle, config: TrainConfig, run_dir: str | Path | None,
                 dist: DistContext, reporter: Reporter | None, callbacks: Sequence[Callback]) -> None:
        self.config, self.data, self.dist, self.callbacks = config, data, dist, callbacks
        self.device = torch.device(config.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Every rank reads the run folder on resume; only the main rank writes to it.
        self.files = RunFiles(self.run_dir) if self.run_dir is not None and dist.is_main else None
        self.reporter = reporter or (make_reporter(config.progress) if dist.is_main else Reporter())
        self.meta = model_meta(config, data)
        check_sync_bn(config.sync_bn, config.device, dist)
        # `plain` is what the caller gets back; the DDP wrapper made here must not outlive `fit`
        # (see dist._destroy).
        self.plain = model.to(self.device)
        if config.freeze_bn_scale:  # before DDP, which reduces the gradients of what trains
            freeze_bn_scales(self.plain)
        model = self.model = wrap_model(self.plain, dist, self.device, sync_bn=config.sync_bn,
                                        channels_last=config.channels_last)
        if dist.rank > 0:
            torch.manual_seed(self.seed("torch"))  # dropout, folder augmentation: rank's own draws
        self.optimizer = make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.train_step = make_train_step(
            model, self.optimizer, precision=config.precision, channels_last=config.channels_last,
            compile=config.compile, compile_mode=config.compile_mode,
            fused_kernels=config.fused_kernels, label_smoothing=config.label_smoothing,
            grad_clip=config.grad_clip, scaler=self.scaler,
        )
        self.ema = EMA(model, config.ema_decay) if config.ema_decay is not None else None
        self.augment = AugmentSpec(pad=config.pad, flip=config.flip, cutout=config.cutout,
                                   pad_mode=config.pad_mode, fill=mean_colour(data.mean))
        self.train_set = data.train.to(self.device) if isinstance(data.train, InMemoryDataset) else data.train
        # The augmentation draws on the device the batches live on: a CPU generator driving GPU
        # batches would copy its draws to the GPU every step, and each such copy from pageable
        # memory waits for the GPU to finish everything queued before it.
        gen_device = self.train_set.device if isinstance(self.train_set, InMemoryDataset) else "cpu"
        self.aug_gen = torch.Generator(device=gen_device).manual_seed(self.seed("augment"))
        per_rank = math.ceil(len(data.train) / dist.world_size)
        # A last batch smaller than batch_size is dropped (noisy BN statistics, a different
        # effective step), unless the whole split is smaller than one batch.
        self.drop_last = per_rank >= config.batch_size
        self.steps_per_epoch = per_rank // config.batch_size if self.drop_last else 1
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # The linear scaling rule (Goyal et al. 2017, Sec. 2.1): k times the batch, k times the lr.
        k = dist.world_size if config.scale_lr else 1
        rates = config if k == 1 else config.replace(lr=config.lr * k, error_warmup_lr=config.error_warmup_lr * k)
        self.lr_schedule = build_schedule(rates, self.steps_per_epoch, self.total_steps)
        self.warmup = (ErrorWarmup(rates.error_warmup_lr, config.error_warmup_threshold)
                       if config.error_warmup == "on" else None)
        # Reading a loss waits for the device; on a GPU batch that wait over several steps.
        self.sync_every = 1 if self.device.type == "cpu" else 25
        self.pending: list[tuple[StepOutput, int]] = []
        self.state = LoopState(model=model, optimizer=self.optimizer)
        self.clock = time.perf_counter()  # start of this session
        self.epoch_clock: float | None = None  # start of the current stretch of training steps
        self.writer = None
        self.last_saved: tuple[int, int] | None = None  # (step, epoch) of the last checkpoint

    def seed(self, *tags: object) -> int:
        """The seed of one random stream of this rank; rank 0's are the single-process seeds."""
        rank = () if self.dist.rank == 0 else ("rank", self.dist.rank)
        return derive_seed(self.config.seed, *tags, *rank)

    # --- data and lr
    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The current epoch's (uint8 images, labels, which to flip or None: draw at random) on
        the device, after the batches done."""
        cfg, st = self.config, self.state
        order = torch.Generator().manual_seed(derive_seed(cfg.seed, "order", st.epoch))
        if isinstance(self.train_set, InMemoryDataset):
            # The step count ends the epoch (islice), so a short last batch is never used; the
            # permutation is padded to a multiple of world_size, as the folder sampler's is.
            it = batches(self.train_set, cfg.batch_size, shuffle=True, generator=order,
                         rank=self.dist.rank, world_size=self.dist.world_size, with_index=True)
            flips = None
            if cfg.alternate_flip:  # one parity per image, the same on every rank
                parity = torch.Generator().manual_seed(derive_seed(cfg.seed, "flip"))
                flips = alternating_flips(len(self.train_set), st.epoch, parity,
                                          self.train_set.images.device)
            for x8, y, index in islice(it, st.batch, self.steps_per_epoch):
                yield x8, y, None if flips is None else flips[index]
            return
        sampler = _EpochSampler(len(self.train_set), order, self.dist, skip=st.batch * cfg.batch_size)
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
            drop_last=self.drop_last, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed("workers", st.epoch)),
        )
        for x, y in islice(loader, self.steps_per_epoch - st.batch):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None

    def start_clock(self) -> None:
        self.epoch_clock = time.perf_counter()

    def stop_clock(self) -> None:
        self.state.epoch_train_time = self.train_time()
        self.epoch_clock = None

    def train_time(self) -> float:
        """Seconds spent in training steps this epoch (evaluation excluded)."""
        running = time.perf_counter() - self.epoch_clock if self.epoch_clock is not None else 0.0
        return max(self.state.epoch_train_time + running, 1e-9)

    def lr(self) -> float:
        scheduled = self.lr_schedule(self.state.step)
        return self.warmup.lr_or(scheduled) if self.warmup is not None else scheduled

    # --- bookkeeping of a step
    def record(self, out: StepOutput, n: int) -> None:
        st = self.state
        st.step += 1
        st.batch += 1
        st.loss = out.loss
        self.pending.append((out, n))
        warming = self.warmup is not None and not self.warmup.done
        if warming or len(self.pending) >= self.sync_every or st.step >= self.total_steps:
            self.flush()

    def flush(self) -> None:
        """Read the pending losses: stop on a non-finite one, update sums, warm-up and progress."""
        if not self.pending:
            return
        values = torch.stack([torch.stack([o.loss.float(), o.correct.float()]) for o, _ in self.pending]).tolist()
        first = self.state.step - len(self.pending) + 1
        st = self.state
        if self.warmup is not None:
            # The warm-up ends on the error of the global batch, so every rank switches its lr
            # at the same step (a per-rank decision would make the replicas drift apart).
            counts = self.dist.all_reduce_sum(torch.tensor(
                [[correct, n] for (_, correct), (_, n) in zip(values, self.pending)],
                dtype=torch.float64, device=self.device)).tolist()
        for i, ((loss, correct), (_, n)) in enumerate(zip(values, self.pending)):
            if not math.isfinite(loss):
                self.diverged(first + i, loss)
            st.sums[0] += loss * n
            st.sums[1] += correct
            st.sums[2] += n
            if self.warmup is not None:
                self.warmup.update(1.0 - counts[i][0] / counts[i][1])
        self.pending.clear()
        self.reporter.step(step=st.step, epoch=st.epoch + 1, loss=st.sums[0] / st.sums[2],
                           accuracy=st.sums[1] / st.sums[2],
                           images_per_sec=st.sums[2] * self.dist.world_size / self.train_time())

    def diverged(self, step: int, loss: float) -> None:
        if self.last_saved is not None and self.files is not None:
            saved = (f"the last good checkpoint is {self.files.last} (step {self.last_saved[0]}, "
                     f"epoch {self.last_saved[1]})")
        elif self.files is not None:
            saved = f"no checkpoint was written yet in {self.files.root}"
        else:
            saved = "this run keeps no checkpoints (no run folder)"
        self.write_summary()
        raise TrainingDiverged(
            f"the training loss became {loss} at step {step} (epoch {self.state.epoch + 1}, "
            f"lr {self.state.lr:.4g}); training stopped and nothing after the divergence was saved; "
            f"{saved}. Try a lower --lr, --grad-clip, --warmup-epochs or --precision fp32"
        )

    # --- end of an epoch
    def end_epoch(self) -> None:
        cfg, st = self.config, self.state
        loss_sum, correct, n = self.dist.all_reduce_sum(
            torch.tensor(st.sums, dtype=torch.float64, device=self.device)).tolist()
        last = st.step >= self.total_steps
        test = None
        if (st.epoch + 1) % cfg.eval_every == 0 or last:
            # Evaluation runs outside DDP: give every rank rank 0's BN statistics first.
            self.dist.broadcast_buffers(_unwrap(self.model))
            if self.ema is not None:
                self.dist.broadcast_buffers(self.ema.module)
            test = evaluate_model(self.eval_model, self.data.test, mean=self.data.mean, std=self.data.std,
                                  batch_size=cfg.eval_batch_size, precision=cfg.precision,
                                  channels_last=cfg.channels_last, workers=cfg.workers, dist=self.dist,
                                  tta=cfg.eval_tta, pad=cfg.pad or 0)
        metrics = EpochMetrics(
            epoch=st.epoch + 1, step=st.step, train_loss=loss_sum / n, train_error=1 - correct / n,
            test_loss=test.loss if test else None,
            test_top1_error=test.top1_error if test else None,
            test_top5_error=test.top5_error if test else None, lr=st.lr,
            images_per_sec=n / self.train_time(), wall_time=self.wall_time(),
        )
        st.history.append(metrics)
        st.epoch, st.batch, st.sums, st.epoch_train_time = st.epoch + 1, 0, [0.0, 0.0, 0.0], 0.0
        improved = test is not None and (st.best_top1_error is None or test.top1_error < st.best_top1_error)
        if improved:
            st.best_top1_error = test.top1_error
        if self.files is not None:
            write_metrics(self.files, st.history)
        self.save()  # on every rank: a distributed save gathers each rank's RNG states
        if self.files is not None:
            if improved:
                save_model(self.files.best, self.eval_model,
                           {**self.meta, "step": st.step, "epoch": st.epoch,
                            "test_top1_error": test.top1_error})
            self.log_tensorboard(metrics)
        self.reporter.epoch(metrics)
        for cb in self.callbacks:
            cb.on_epoch_end(st, metrics)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else _unwrap(self.model)

    def wall_time(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.clock

    # --- checkpoints
    def save(self) -> None:
        """Checkpoint (rank 0 writes). Every rank calls it at the same points."""
        self.flush()
        st = self.state
        if self.run_dir is None or self.last_saved == (st.step, st.epoch):
            return
        rng = {"torch": torch.get_rng_state(), "augment": self.aug_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ranks = self.gather_rank_states(rng) if self.dist.world_size > 1 else None
        self.last_saved = (st.step, st.epoch)
        if self.files is None:
            return
        save_checkpoint(self.files, self.model, self.meta, {
            "step": st.step, "epoch": st.epoch, "batch": st.batch, "sums": list(st.sums),
            "epoch_train_time": st.epoch_train_time, "elapsed": self.wall_time(),
            "best_top1_error": st.best_top1_error, "lr": st.lr,
            "history": [m.as_dict() for m in st.history],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
            "rng": rng,
            **({"ranks": ranks} if ranks is not None else {}),
        })

    def gather_rank_states(self, rng: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """What differs between ranks, for every rank: its generator states (each rank draws its
        own augmentations) and its share of the epoch's running loss/accuracy sums."""
        gathered = {k: self.dist.all_gather(v, self.device) for k, v in rng.items()}
        sums = self.dist.all_gather(torch.tensor(self.state.sums, dtype=torch.float64), self.device)
        return [{"rng": {k: v[r] for k, v in gathered.items()}, "sums": sums[r].tolist()}
                for r in range(self.dist.world_size)]

    def restore(self) -> None:
        if self.run_dir is None:
            raise ValueError("resume needs the run folder to read the checkpoint from")
        files = RunFiles(self.run_dir)
        saved = load_checkpoint(files, self.model)
        self.optimizer.load_state_dict(saved["optimizer"])
        for name, obj in (("scaler", self.scaler), ("ema", self.ema), ("warmup", self.warmup)):
            if obj is not None:
                obj.load_state_dict(saved[name])
        rng, sums = saved["rng"], saved["sums"]
        if self.dist.world_size > 1:
            written_by = len(saved.get("ranks", [None]))
            if written_by != self.dist.world_size:
                raise ValueError(f"{files.state} was written by a run of {written_by} process(es), not "
                                 f"{self.dist.world_size}; resume it with {written_by}")
            rng, sums = saved["ranks"][self.dist.rank]["rng"], saved["ranks"][self.dist.rank]["sums"]
        torch.set_rng_state(rng["torch"])
        try:
            self.aug_gen.set_state(rng["augment"])
        except RuntimeError:
            # Resumed on another kind of device (the CPU and CUDA generators keep different
            # states): a fresh augmentation stream for the rest of the run, seeded by the step.
            self.aug_gen.manual_seed(self.seed("augment", saved["step"]))
            self.reporter.message("the augmentation random stream restarts: the run was "
                                  "checkpointed on another kind of device")
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        st = self.state
        st.step, st.epoch, st.batch = saved["step"], saved["epoch"], saved["batch"]
        st.sums, st.epoch_train_time = list(sums), saved["epoch_train_time"]
        st.elapsed, st.best_top1_error, st.lr = saved["elapsed"], saved["best_top1_error"], saved["lr"]
        st.history = [EpochMetrics.from_dict(d) for d in saved["history"]]
        self.clock = time.perf_counter()
        self.last_saved = (st.step, st.epoch)
        self.reporter.message(f"resumed {files.root} at step {st.step} (epoch {st.epoch + 1}, "
                              f"batch {st.batch})")

    # --- the end
    def finish(self, status: str, signum: int | None = None) -> RunResult:
        if status != "completed" or self.last_saved != (self.state.step, self.state.epoch):
            self.save()
        self.write_summary()
        # No rank returns before rank 0 has written the run's last files: a script on any rank
        # may read the run folder next, and a rank that tears down its process group while
        # rank 0 is still busy is the likeliest source of the rare abort at exit (see
        # dist._destroy). All ranks agree on completing and on being interrupted; a callback
        # that stops one rank alone fails this wait after --dist-timeout, as it would the next
        # gradient exchange.
        self.dist.barrier()
        if status != "completed" and self.files is not None:
            why = signal.Signals(signum).name if signum else "a callback"
            self.reporter.message(
                f"stopped by {why} at step {self.state.step}; checkpoint saved — continue with "
                f"`reslab train --resume {self.files.root}`")
        st = self.state
        return RunResult(
            model=self.plain, eval_model=self.eval_model, config=self.config, history=list(st.history),
            status=status, steps=st.step, epochs=st.epoch, best_top1_error=st.best_top1_error,
            wall_time=self.wall_time(), run_dir=self.files.root if self.files else None, signal=signum,
        )

    def write_summary(self) -> None:
        if self.files is not None and self.state.history:
            plot_curves(self.files.curves, self.state.history,
                        f"{self.config.model} on {self.config.data} ({self.config.recipe} recipe)")

    def log_tensorboard(self, m: EpochMetrics) -> None:
        if not self.config.tensorboard:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed session wrote after the checkpoint we resumed.
            self.writer = SummaryWriter(str(self.files.tensorboard), purge_step=m.step)
        for key, value in m.as_dict().items():
            if key not in ("epoch", "step") and value is not None:
                self.writer.add_scalar(key, value, m.step)
        self.writer.flush()

    def close(self) -> None:
        self.reporter.close()
        if self.writer is not None:
            self.writer.close()

    @contextlib.contextmanager
    def torch_settings(self) -> Iterator[None]:
        """Threads, determinism and denormal flushing for the run, restored afterwards."""
        cfg = self.config
        threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        bench = torch.backends.cudnn.benchmark
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.use_deterministic_algorithms(cfg.deterministic)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        # Deep plain nets produce denormal floats, which CPUs handle ~10x slower (measured: a
        # plain-56 step on digits took 513 ms instead of 52 ms); flushing them to zero is harmless.
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det)
            torch.backends.cudnn.benchmark = bench
            torch.set_flush_denormal(False)


class _EpochSampler(torch.utils.data.Sampler):
    """This rank's indices of one epoch's permutation (as `batches` shards in-memory data),
    after the first `skip` of them: what a DataLoader of a folder dataset iterates over."""

    def __init__(self, n: int, generator: torch.Generator, dist: DistContext, skip: int) -> None:
        order = torch.randperm(n, generator=generator)
        if dist.world_size > 1 and n % dist.world_size:
            order = torch.cat([order, order[: dist.world_size - n % dist.world_size]])
        self.indices = order[dist.rank::dist.world_size][skip:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _SignalGuard:
    """SIGINT/SIGTERM set `received` instead of killing the process, so the loop can save a
    checkpoint at the next step boundary. The first signal restores the previous handlers, so a
    second one acts as usual (the checkpoint files are written atomically either way)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def __exit__(self, *exc: object) -> None:
        self.restore()
