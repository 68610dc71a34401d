"""Data-parallel training across processes: `DistContext`, the torchrun launch, DDP wrapping.

A single process is rank 0 of a world of 1, and everything below is then a no-op. Under
``torchrun`` (which sets RANK, WORLD_SIZE and LOCAL_RANK), `train` and `resume` open the process
group themselves (`process_group`: gloo on CPU, NCCL on CUDA with rank r on ``cuda:LOCAL_RANK``,
with a timeout; destroyed when the process exits), `fit` wraps the model in
DistributedDataParallel (`wrap_model`, optionally with SyncBatchNorm), each rank trains on its
own shard of the same seeded permutation, evaluates every world_size-th test image and sums its
statistics with the others, and only rank 0 writes files and prints. docs/scale-out.md has the
commands.

Batch semantics: ``batch_size`` is the batch of one rank; an optimizer step averages the
gradients of all ranks (DDP's all-reduce), so it is one step on the global batch of
``batch_size × world_size`` images. Without SyncBatchNorm each rank normalises with the
statistics of its own ``batch_size`` images, and the BN running statistics are rank 0's (DDP
broadcasts them before every forward pass).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

# What torchrun (torch.distributed.elastic) sets for every worker process.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """A collective operation failed on this rank: another rank died, hangs, or is unreachable."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job: rank `rank` of `world_size` processes,
    `local_rank` on its node (the GPU it uses)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, "
                             f"world_size={self.world_size}")

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics and progress."""
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over all ranks (in place); `t` itself in a single process."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` is true on any rank, so that all ranks stop at the same step."""
        if self.world_size == 1:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)

    def all_gather(self, t: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Every rank's `t` (same shape and dtype on all ranks), in rank order, on the CPU.

        The exchange runs on `device` (NCCL moves only CUDA tensors)."""
        if self.world_size == 1:
            return [t.cpu()]
        local = t.to(device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, local)
        return [o.cpu() for o in out]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics), as DDP does before each
        forward pass; needed before evaluating, which runs outside DDP."""
        if self.world_size == 1:
            return
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def torchrun_environment() -> DistContext | None:
    """The `DistContext` that torchrun's RANK, WORLD_SIZE and LOCAL_RANK describe, or None when
    this process was not started by a launcher with more than one process."""
    if not all(v in os.environ for v in TORCHRUN_VARIABLES):
        return None
    try:
        rank, world, local = (int(os.environ[v]) for v in TORCHRUN_VARIABLES)
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
                         + ", ".join(f"{v}={os.environ[v]!r}" for v in TORCHRUN_VARIABLES)) from None
    if world == 1:
        return None  # one process: train exactly as without torchrun
    return DistContext(rank, world, local)


def backend_for(device: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors (NCCL cannot move CPU tensors)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(dist: DistContext, device: str, timeout: float) -> Iterator[DistContext]:
    """Open the default process group for `dist` (from torchrun's environment) unless it is open,
    and report a failed collective as `DistributedError`.

    `device` is the run's resolved device (cpu, cuda): on CUDA rank r uses ``cuda:LOCAL_RANK``.
    `timeout` (seconds) bounds every collective: a rank that waits longer for the others (one
    died or hangs) fails instead of waiting forever. gloo honours it directly; with NCCL the
    watchdog aborts the stuck collective after it.

    The group stays open for later runs of this process and is destroyed when it exits: a
    script that calls `train` and then `resume` would otherwise open a second group on the same
    rendezvous store while the other ranks still close the first (measured: stale addresses,
    "Connection reset by peer"). A group the caller opened is used as it is.
    """
    if not torch.distributed.is_available():
        raise ValueError("this PyTorch build has no torch.distributed; train in a single process")
    if not torch.distributed.is_initialized():
        _open(dist, device, timeout)
    try:
        yield DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), dist.local_rank)
    except Exception as e:
        if not is_communication_failure(e):
            raise
        # gloo words a timeout either way: "Timed out waiting …" or "Application timeout caused
        # pair closure" (seen when the peer is frozen with SIGSTOP on a loaded machine).
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            what = (f"waited longer than --dist-timeout {timeout:g}s for the other ranks: one of them "
                    "hangs or died (if they only need longer, e.g. for a slow first step or a big "
                    "checkpoint, raise --dist-timeout)")
        else:
            what = "lost the connection to another rank, which most likely died"
        raise DistributedError(
            f"rank {dist.rank} of {dist.world_size} stopped: a collective operation {what}; look for "
            f"that rank's own error in the output. ({_first_line(e)})"
        ) from e


def _open(dist: DistContext, device: str, timeout: float) -> None:
    kind = torch.device(device)
    init: dict[str, Any] = {}
    if kind.type == "cuda":
        if kind.index is not None and kind.index != dist.local_rank:
            raise ValueError(
                f"--device {device} names one GPU, but under torchrun every rank uses its own "
                f"(this one, LOCAL_RANK={dist.local_rank}, uses cuda:{dist.local_rank}); pass "
                "--device cuda or auto")
        if dist.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={dist.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (torchrun --nproc-per-node=N)")
        torch.cuda.set_device(dist.local_rank)
        init["device_id"] = torch.device("cuda", dist.local_rank)
    torch.distributed.init_process_group(
        backend_for(device), rank=dist.rank, world_size=dist.world_size,
        timeout=datetime.timedelta(seconds=timeout), **init)
    global _opened
    _opened = True
    atexit.register(_destroy)


_opened = False  # whether this process has opened a process group (`_open`)


def exit_without_finalizing(code: int) -> None:
    """End a process that opened a process group with `code`, skipping the interpreter's
    finalization; return at once in any other process.

    Everything a normal exit does while Python is whole still happens: the exit handlers run
    (`_destroy` among them, which frees the DDP and destroys the process group) and the output is
    flushed. What is skipped is the teardown after them, where torch's distributed objects that
    outlive `destroy_process_group` are freed with the interpreter half gone: a gloo rank that had
    finished its run and written everything aborted there now and then ("terminate called without
    an active exception", SIGABRT, no Python frame; torchrun then reports the finished job as
    failed; 2 of 5 fresh-clone CI runs, 2026-11-24). The `reslab` command ends this way."""
    if not _opened:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _destroy() -> None:
    # A DistributedDataParallel still alive when the interpreter shuts down can abort the
    # process ("terminate called without an active exception"; measured with gloo and torch
    # 2.13 in ~1 of 8 runs, also under torchrun, which then reports a finished job as failed).
    # Freeing it first, while Python is fully alive, avoids that (0 of 100 runs). `fit` keeps no
    # reference to the DDP it made; collect the ones an exception's traceback cycle still holds.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_communication_failure(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo reports these as plain RuntimeErrors)."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo/transport", "Timed out", "timeout caused pair closure",
                            "Connection reset", "Connection closed", "NCCL", "ProcessGroup"))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_sync_bn(sync_bn: bool, device: str, dist: DistContext) -> None:
    """torch's SyncBatchNorm exchanges statistics only between GPU (CUDA/XPU) tensors: on CPU
    its forward pass raises (measured with torch 2.13), so refuse before anything is written."""
    if sync_bn and dist.world_size > 1 and torch.device(device).type == "cpu":
        raise ValueError(
            "--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU tensors. On CPU "
            "each rank normalises with its own batch's statistics; drop --sync-bn, or train on "
            "GPUs (torchrun with --device cuda)")


def wrap_model(model: nn.Module, dist: DistContext, device: torch.device, *, sync_bn: bool = False,
               channels_last: bool = False) -> nn.Module:
    """The model one rank trains: BatchNorm layers made SyncBatchNorm when `sync_bn` (each BN then
    normalises with the mean and variance of the global batch), wrapped in
    DistributedDataParallel. A single process gets `model` back; so does a model already in DDP.
    """
    if dist.world_size == 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        # Before DDP: its gradient buckets are laid out after the parameters' layout.
        model = model.to(memory_format=torch.channels_last)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
