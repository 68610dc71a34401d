"""Process-level settings that decide how fast eager PyTorch code runs on the CPU.

**The allocator.** glibc's malloc serves every request above its mmap threshold (adaptive, at
most 32 MiB by default) with a fresh `mmap` and hands it back with `munmap` when it is freed, and
trims the top of its heap whenever more than its trim threshold is free. An eager PyTorch
forward pass frees and re-allocates its large activations on every call, so each call pays the
kernel to map and zero those pages again. Measured on the project's 2-core machine, a plain fp32
ResNet-50 at batch 16 and 224² took about 348,000 minor page faults and half a second of system
time per batch: 19.6 img/s with glibc's defaults, 36.3 img/s with `tune_allocator()`. Compiled
models plan most of their buffers and fault less (11,800 per batch; 91.4 → 99.4 img/s), and
reslab's fast training step barely faults at all (unchanged). Preloading jemalloc or tcmalloc
does this for PyTorch; `tune_allocator` gets most of it from glibc itself, at run time, by
keeping freed memory in the process for reuse.
The price: memory a run has freed is not returned to the operating system until it exits.

The `reslab` command tunes the allocator for every subcommand except `bench`, where
`--allocator tuned|system` chooses it for both sides of the comparison; set the environment
variable ``RESLAB_ALLOCATOR=system`` to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # requests above 1 GiB still get their own mapping
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt accepts: never trim
ALLOCATORS = ("system", "tuned")
ENV = "RESLAB_ALLOCATOR"

_tuned = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl names its library differently)
        return None
    # musl and other C libraries have no mallopt, or one that ignores these parameters
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only); True if the settings took effect.

    Idempotent; affects every allocation the process makes afterwards, PyTorch's included."""
    global _tuned
    if _tuned:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # older glibc refuses thresholds above half its heap size (32 MiB): fall back to that
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) or bool(
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    ok = ok and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _tuned = ok
    return ok


def allocator_tuned() -> bool:
    """Whether `tune_allocator` has taken effect in this process."""
    return _tuned


def tune_allocator_from_env() -> bool:
    """What the `reslab` command does at start: tune unless ``RESLAB_ALLOCATOR=system``."""
    choice = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if choice not in ALLOCATORS:
        raise ValueError(f"{ENV} must be one of {', '.join(ALLOCATORS)}; got {choice!r}")
    return choice == "tuned" and tune_allocator()


def minor_faults() -> int | None:
    """Minor page faults the process has taken so far (all threads), or None where the OS does
    not count them (no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
