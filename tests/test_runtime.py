"""`reslab.runtime`: the allocator tuning, checked in fresh processes (it is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reslab.runtime import minor_faults, tune_allocator

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the allocator tuning is glibc's mallopt")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    if "RESLAB_ALLOCATOR" not in env:
        full.pop("RESLAB_ALLOCATOR", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=300)


HEAP = """
import torch
from reslab.runtime import tune_allocator, allocator_tuned
def in_heap(t):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            return lo <= t.data_ptr() < hi
before = in_heap(torch.empty(16 << 20))  # 64 MiB
assert not allocator_tuned()
print(before, tune_allocator(), allocator_tuned(), tune_allocator(), in_heap(torch.empty(16 << 20)))
"""


@needs_glibc
def test_tuning_serves_large_buffers_from_the_heap():
    out = _python(HEAP)
    assert out.returncode == 0, out.stderr
    # glibc maps a 64 MiB buffer with its own mmap (to be unmapped on free and faulted in
    # afresh next time); tuned, it comes from the heap, where freed memory is kept for reuse
    assert out.stdout.split() == ["False", "True", "True", "True", "True"]


def test_minor_faults_counts_up():
    first = minor_faults()
    if first is None:
        pytest.skip("this OS does not count page faults")
    bytearray(8 << 20)
    assert minor_faults() >= first


@needs_glibc
@pytest.mark.parametrize("value, tuned", [(None, True), ("tuned", True), ("system", False),
                                          (" System ", False)])
def test_the_command_tunes_unless_told_not_to(value, tuned):
    env = {} if value is None else {"RESLAB_ALLOCATOR": value}
    out = _python("from reslab.cli import main; from reslab.runtime import allocator_tuned; "
                  "main(['models', 'resnet20', '--json']); print(allocator_tuned())", **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(tuned)


def test_a_bad_allocator_setting_is_refused():
    out = subprocess.run([sys.executable, "-m", "reslab", "models", "resnet20"], capture_output=True,
                         text=True, env={**os.environ, "RESLAB_ALLOCATOR": "jemalloc"}, timeout=300)
    assert out.returncode == 2
    assert "RESLAB_ALLOCATOR must be one of system, tuned; got 'jemalloc'" in out.stderr


BENCH = """
import json
from reslab.bench import bench_infer
from reslab.runtime import tune_allocator
tiny = dict(warmup=0, repeats=2, iters=1, peak_n=64)
r = bench_infer("resnet20", batch=2, allocator="tuned", **tiny)
try:
    bench_infer("resnet20", batch=2, allocator="system", **tiny)
    refused = ""
except ValueError as e:
    refused = str(e)
print(json.dumps({"settings": r.settings, "refused": refused}))
"""


@needs_glibc
def test_bench_measures_the_tuned_allocator_and_refuses_to_pretend_otherwise():
    out = _python(BENCH)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.splitlines()[-1])
    assert doc["settings"]["allocator"] == "tuned"
    assert "already tuned its allocator" in doc["refused"] and "fresh process" in doc["refused"]


def test_the_bench_command_leaves_the_allocator_to_its_flag():
    from reslab.cli import main
    from reslab.runtime import allocator_tuned

    assert main(["bench", "infer", "--model", "resnet20", "--batch", "2", "--repeats", "1",
                 "--iters", "1", "--warmup", "0", "--peak-size", "64", "--json"]) == 0
    assert not allocator_tuned()


def test_tune_allocator_is_false_without_glibc(monkeypatch):
    import reslab.runtime as rt

    monkeypatch.setattr(rt, "_tuned", False)
    monkeypatch.setattr(rt.sys, "platform", "darwin")
    assert tune_allocator() is False and rt.allocator_tuned() is False
