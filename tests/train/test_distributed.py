"""Data-parallel training under torchrun: two CPU processes with gloo (docs/scale-out.md).

Every job here is bounded: subprocesses get a timeout and are killed in `finally`, so a broken
collective can fail a test but never hang the suite. A launch costs ~5-10 s on 2 cores (two
fresh Python processes importing torch), so the tests share one torchrun run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from reslab.checkpoint import load_state_dict_file
from reslab.data import AugmentSpec, augment_batch, batches, mean_colour, normalize
from reslab.train import (TrainConfig, build_model, load_data, make_optimizer, read_metrics,
                          resolve_config, resume, train)
from reslab.train.dist import DistContext, check_sync_bn, torchrun_environment
from reslab.train.loop import derive_seed

TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT = 180  # seconds: far above the ~10 s a launch takes, far below "hung"
# ResNet-20 on 64 digits: 2 ranks × 16 images = a global batch of 32, 2 steps an epoch, 3 steps;
# random crops (pad 2) and flips on, so each rank's own augmentation draws matter; lr 0.05 per
# 16 images, scaled to 0.1 for the global batch by the linear scaling rule (--scale-lr).
RUN = dict(model="resnet20", data="digits", train_limit=64, test_limit=40, batch_size=16, steps=3,
           lr=0.05, scale_lr=True, schedule="constant", pad=2, flip=True, cutout=0,
           deterministic=True, progress="none")


def cli_args(**values) -> list[str]:
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def child_env(**extra: str) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a rank killed by a signal (SIGABRT, SIGSEGV) prints its Python stack.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=2 -m reslab train ARGS` (a free port of its own)."""
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "reslab", "train", *args],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=child_env())


@contextlib.contextmanager
def launched(argv: list[str], logs: Path, world: int = 2) -> Iterator[list[subprocess.Popen]]:
    """`python ARGV` as ranks 0..world-1 with the environment torchrun gives its workers, but
    no torchrun agent (which would kill the other ranks when one dies): what the ranks do on
    their own is what is tested. All are killed on the way out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for rank in range(world):
            env = child_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            with open(logs / f"rank{rank}.log", "w") as out:
                procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def wait_for(path: Path, procs: list[subprocess.Popen], logs: Path, timeout: float = LAUNCH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), \
            "a rank exited before training began:\n" + "\n".join(
                (logs / f"rank{r}.log").read_text()[-2000:] for r in range(len(procs)))
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(run_dir / "checkpoints" / "last.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-process torchrun run of `RUN`, shared by the tests of this file."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(*cli_args(**RUN, out=out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


# ----------------------------------------------------------------------------- the reference

def one_process(shards: int) -> dict[str, torch.Tensor]:
    """The weights of `RUN` after its 3 steps, computed in this process, spelled out.

    Each step takes the next `shards * batch_size` images of the epoch's seeded permutation (the
    global batch) and gives shard r (positions r, r + shards, ...) to "rank" r, which augments
    it with its own generator and normalises it with its own batch statistics; the gradient is
    the mean over the shards, the lr `shards` times RUN's (--scale-lr), and the BN running
    statistics are shard 0's. For shards=1 this is plain single-process training.
    """
    config = TrainConfig.from_recipe("default", **{**RUN, "lr": RUN["lr"] * shards})
    data = load_data(config)
    config = resolve_config(config, data)
    spec = AugmentSpec(pad=config.pad, flip=config.flip, cutout=config.cutout, pad_mode=config.pad_mode,
                       fill=mean_colour(data.mean))
    # Rank 0 keeps the single-process seed; rank r > 0 derives its own.
    gens = [torch.Generator().manual_seed(derive_seed(config.seed, "augment", *(("rank", r) if r else ())))
            for r in range(shards)]
    torch.manual_seed(config.seed)
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    step, epoch = 0, 0
    while step < config.steps:
        order = torch.Generator().manual_seed(derive_seed(config.seed, "order", epoch))
        for x8, y in batches(data.train, config.batch_size * shards, shuffle=True, generator=order,
                             drop_last=True):
            optimizer.zero_grad()
            for r in range(shards):
                x = normalize(augment_batch(x8[r::shards], spec, gens[r]), data.mean, data.std)
                (F.cross_entropy(model(x), y[r::shards]) / shards).backward()
                if r == 0:
                    rank0_stats = [b.clone() for b in model.buffers()]
            for b, kept in zip(model.buffers(), rank0_stats):
                b.copy_(kept)
            optimizer.step()
            step += 1
            if step == config.steps:
                break
        epoch += 1
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_reference_with_one_shard_is_single_process_training(tmp_path):
    single = train(TrainConfig.from_recipe("default", **RUN, out=str(tmp_path / "one")))
    assert single.steps == 3
    assert max_diff(weights(tmp_path / "one"), one_process(shards=1)) == 0.0


# ----------------------------------------------------------------------------- torchrun

def test_two_processes_reach_the_weights_of_one_process_on_the_same_global_batch(two_ranks, tmp_path):
    run_dir, _ = two_ranks
    ddp = weights(run_dir)
    # Measured: 0.0 (the all-reduce of two fp32 gradients, each halved, is exact).
    assert max_diff(ddp, one_process(shards=2)) <= 1e-6
    # Per-rank BatchNorm is not full-batch BatchNorm: one process on all 32 images at once, at
    # the same lr, differs (with --sync-bn on GPUs it would not).
    big = {**RUN, "batch_size": 32, "lr": 0.1, "scale_lr": False}
    train(TrainConfig.from_recipe("default", **big, out=str(tmp_path / "big")))
    assert max_diff(ddp, weights(tmp_path / "big")) > 1e-3


def test_config_json_records_the_world_size_and_only_rank_0_reports(two_ranks):
    run_dir, done = two_ranks
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["distributed"] == {"world_size": 2, "batch_size_per_process": 16, "global_batch_size": 32,
                                  "lr": 0.1, "sync_bn": False, "backend": "gloo"}
    assert (doc["config"]["batch_size"], doc["config"]["lr"], doc["config"]["scale_lr"]) == (16, 0.05, True)
    assert {m.lr for m in read_metrics(run_dir)} == {0.1}
    assert done.stdout.count("resnet20 on digits: completed after 2 epochs (3 steps") == 1
    assert [m.step for m in read_metrics(run_dir)] == [2, 3]


def test_distributed_resume_continues_exactly(two_ranks, tmp_path):
    run_dir, _ = two_ranks
    stopped = tmp_path / "stopped"
    # Both ranks stop after the first step (mid-epoch, before any epoch ended), then resume the
    # folder rank 0 wrote: the Python API under torchrun's environment, in one launch (the
    # command line does the same through `reslab train --resume`).
    code = (
        "from reslab.train import Callback, StopTraining, TrainConfig, resume, train\n"
        "class Stop(Callback):\n"
        "    def on_step_end(self, state):\n"
        "        if state.step == 1:\n"
        "            raise StopTraining\n"
        f"r = train(TrainConfig.from_recipe('default', **{RUN!r}, out={str(stopped)!r}), callbacks=[Stop()])\n"
        "assert (r.status, r.steps, r.epochs) == ('stopped', 1, 0), (r.status, r.steps)\n"
        f"r = resume({str(stopped)!r})\n"
        "assert (r.status, r.steps) == ('completed', 3), (r.status, r.steps)\n"
    )
    with launched(["-c", code], tmp_path) as procs:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT) for p in procs]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert max_diff(weights(stopped), weights(run_dir)) == 0.0
    # The epoch's training loss includes both ranks' first step, saved with the checkpoint.
    strip = lambda ms: [{k: v for k, v in m.as_dict().items() if k not in ("wall_time", "images_per_sec")}
                        for m in ms]
    assert strip(read_metrics(stopped)) == strip(read_metrics(run_dir))


def test_resuming_with_another_number_of_processes_is_refused(two_ranks):
    run_dir, _ = two_ranks
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) and this resume runs 1; .* "
                                         r"giving a world size of 2\)"):
        resume(run_dir)


# ----------------------------------------------------------------------------- failures

def failing_run(tmp_path: Path, timeout: float, how: signal.Signals) -> tuple[int, float, str]:
    """Start a long 2-rank run, send `how` to rank 1 once rank 0 has finished an epoch, and
    return rank 0's exit status, the seconds it took to stop, and its output."""
    out = tmp_path / "run"
    args = ["-m", "reslab", "train", *cli_args(**{**RUN, "steps": 100_000}, dist_timeout=timeout, out=out)]
    with launched(args, tmp_path) as procs:
        wait_for(out / "metrics.jsonl", procs, tmp_path)
        procs[1].send_signal(how)
        start = time.monotonic()
        code = procs[0].wait(timeout=LAUNCH_TIMEOUT)
        took = time.monotonic() - start
    return code, took, (tmp_path / "rank0.log").read_text()


def test_a_rank_that_hangs_makes_the_others_fail_after_the_timeout(tmp_path):
    # SIGSTOP: the rank is alive, its connections open, but it never answers again.
    # 6 s: short, yet long enough that two ranks starting on a loaded 2-core machine (one of
    # them still importing while the other waits in its first collective) do not time out.
    code, took, log = failing_run(tmp_path, timeout=6, how=signal.SIGSTOP)
    assert code == 1, log[-3000:]
    assert "reslab train: rank 0 of 2 stopped: a collective operation waited longer than " \
           "--dist-timeout 6s for the other ranks: one of them hangs or died" in log
    assert 5 <= took < 40  # it waited for the timeout (a collective may have begun just before)


def test_a_rank_that_dies_makes_the_others_fail_at_once(tmp_path):
    code, took, log = failing_run(tmp_path, timeout=120, how=signal.SIGKILL)
    assert code == 1, log[-3000:]
    assert "reslab train: rank 0 of 2 stopped: a collective operation lost the connection to " \
           "another rank, which most likely died" in log
    assert took < 30  # far inside the 120 s timeout: a closed connection needs no waiting


def test_an_error_on_the_ranks_names_the_rank(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    args = ["-m", "reslab", "train", *cli_args(**RUN, out=tmp_path / "taken")]
    with launched(args, tmp_path) as procs:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT) for p in procs]
    # Rank 0 checks the folder and tells every rank, so none waits for a rank 0 that stopped.
    assert codes == [2, 2], (tmp_path / "rank0.log").read_text()[-3000:]
    for rank in (0, 1):
        assert f"reslab train: error on rank {rank} of 2: {tmp_path / 'taken'} already holds a run" \
               in (tmp_path / f"rank{rank}.log").read_text()


# ----------------------------------------------------------------------------- in-process units

def test_torchrun_environment_is_read_from_rank_world_size_and_local_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_environment() == DistContext(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torchrun_environment() is None  # one process trains exactly as without torchrun
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE and LOCAL_RANK must be integers"):
        torchrun_environment()


def test_sync_bn_is_refused_on_cpu_with_more_than_one_process():
    with pytest.raises(ValueError, match="--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU"):
        check_sync_bn(True, "cpu", DistContext(0, 2))
    check_sync_bn(True, "cpu", DistContext())  # a single process has nothing to synchronise
    check_sync_bn(False, "cpu", DistContext(0, 2))


def test_a_process_that_opened_a_group_ends_without_finalizing(tmp_path):
    # What the `reslab` command does at the end of a distributed run: the exit handlers run and
    # the output is flushed, then the process leaves with the command's status.
    marker = tmp_path / "handler-ran"
    code = f"""
import atexit, sys
import reslab.train.dist as dist
dist.exit_without_finalizing(5)  # no group opened here: returns
atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
dist._opened = True
print("flushed", end="")
sys.stderr.write("err")
dist.exit_without_finalizing(3)
print("not reached")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env=child_env())
    assert (done.returncode, done.stdout, done.stderr) == (3, "flushed", "err")
    assert marker.read_text() == "yes"
