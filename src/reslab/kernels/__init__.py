"""Hand-written CPU kernels for the training step, compiled on first use.

``bn_relu(bn, x, residual)`` is ``relu(bn(x) + residual)`` for a BatchNorm in training mode, as one
forward pass and one backward pass instead of PyTorch's three kernels each way (BN, add, ReLU;
threshold_backward, BN backward). It works on channels-last CPU tensors (float32, bfloat16,
float64); anything else, and any BN it cannot stand in for exactly, goes through the modules.

``max_pool2x2(x)`` is ``F.max_pool2d(x, 2)`` (ResNet-9's pooling) with a one-byte argmax instead of
PyTorch's int64 indices and a backward that writes each input gradient once instead of
zero-filling and scattering; same values, same gradients, ties and NaNs resolved as PyTorch does.

``set_fused_kernels(model)`` switches a model's modules to them. The C++ sources (``bn_relu.cpp``,
``max_pool.cpp``) are compiled with ``torch.utils.cpp_extension`` the first time the
kernel is used (about 35 s on 2 cores; cached under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``), for the machine it runs on (``-march=native``: AVX-512 where the CPU
has it; the build is named after the CPU's feature flags, so a shared cache never hands one CPU
another's build). That needs a C++ compiler with OpenMP and ``ninja`` (a dependency of reslab);
without them ``available()`` is False with the reason in ``unavailable_reason()``, and the
modules run instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_SOURCES = [Path(__file__).with_name(name) for name in ("bn_relu.cpp", "max_pool.cpp")]
_lock = threading.Lock()
_ext = None
_error: str | None = None


def _cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction-set flags (the build uses -march=native)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """Put the ninja of the `ninja` package on PATH when the environment is not activated
    (``.venv/bin/reslab`` run directly): cpp_extension looks for it there."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load():
    """The compiled extension, building it on first call; None (with ``_error`` set) if it cannot be."""
    global _ext, _error
    with _lock:
        if _ext is not None or _error is not None:
            return _ext
        try:
            from torch.utils import cpp_extension

            if shutil.which(os.environ.get("CXX", "c++")) is None:
                raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
            _ninja_on_path()
            cpp_extension.verify_ninja_availability()
            _ext = cpp_extension.load(
                name=f"reslab_bn_relu_{_cpu_tag()}",
                sources=[str(p) for p in _SOURCES],
                extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - any build failure means "use the modules"
            _error = f"{type(e).__name__}: {e}".strip()
        return _ext


def available() -> bool:
    """Whether the fused kernel is compiled (compiling it now if needed)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The (N*H*W, C) view of a channels-last tensor (a copy if it is not channels-last)."""
    t = t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The (N, C, H, W) channels-last view of rows made by ``_rows`` from a tensor of ``shape``."""
    n, c, h, w = shape
    return t.view(n, h, w, c).permute(0, 3, 1, 2)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        ext = _load()
        xr = _rows(x)
        rr = None if residual is None else _rows(residual.to(x.dtype))
        y, mean, invstd, var = ext.forward(xr, weight, bias, rr, eps)
        ctx.residual = residual is not None
        ctx.save_for_backward(xr, weight, bias, mean, invstd, y if ctx.residual else None)
        ctx.mark_non_differentiable(mean, var)
        return _from_rows(y, x.shape), mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xr, weight, bias, mean, invstd, y = ctx.saved_tensors
        dx, dw, db, dres = _load().backward(_rows(gy.to(xr.dtype)), xr, y, weight, bias, mean, invstd)
        dres = _from_rows(dres, gy.shape) if ctx.residual else None
        return _from_rows(dx, gy.shape), dw, db, dres, None


def fusable(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``bn_relu`` can stand in exactly for this BN module on this input."""
    return (
        type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
        and bn.momentum is not None and x.device.type == "cpu" and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and bn.weight.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        and x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] * x.shape[2] * x.shape[3] > 1
        and not bn._forward_hooks and not bn._forward_pre_hooks
        and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
        and available()
    )


def bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(bn(x) + residual)`` (``relu(bn(x))`` without one), fused where ``fusable`` says so.

    Updates ``bn``'s running statistics and batch counter exactly as ``bn(x)`` does in training.
    """
    if not fusable(bn, x) or (residual is not None and (residual.shape != x.shape
                                                         or residual.dtype != x.dtype)):
        y = bn(x)
        return F.relu(y if residual is None else y + residual)
    y, mean, var = _BNReLU.apply(x, bn.weight, bn.bias, residual, bn.eps)
    with torch.no_grad():
        m = x.shape[0] * x.shape[2] * x.shape[3]
        var = var * (m / (m - 1))  # running_var keeps the unbiased variance, as nn.BatchNorm2d
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
        bn.running_var.lerp_(var.to(bn.running_var.dtype), bn.momentum)
        bn.num_batches_tracked.add_(1)
    return y


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, idx = _load().max_pool2x2_forward(x.permute(0, 2, 3, 1))
        ctx.save_for_backward(idx)
        ctx.size = x.shape[2:]
        return y.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable  # the C++ backward records no graph: refuse double backward
    def backward(ctx, gy):
        (idx,) = ctx.saved_tensors
        g = gy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return _load().max_pool2x2_backward(g, idx, *ctx.size).permute(0, 3, 1, 2)


def poolable(x: torch.Tensor) -> bool:
    """Whether ``max_pool2x2`` runs the kernel for ``x`` (else it calls PyTorch's pooling)."""
    return (
        x.device.type == "cpu" and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[2] >= 2 and x.shape[3] >= 2 and x.numel() > 0
        # Tracing and export record PyTorch's op, which exporters know.
        and not torch.jit.is_scripting() and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and available()
    )


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, through the kernel where ``poolable`` says so (its result is
    channels-last, as PyTorch's is for channels-last input)."""
    return _MaxPool2x2.apply(x) if poolable(x) else F.max_pool2d(x, 2)


# The class attributes that switch a module to reslab's kernels.
SWITCHES = ("fused_bn_relu", "fused_max_pool")


def set_fused_kernels(model: nn.Module, on: bool = True) -> int:
    """Switch reslab's CPU kernels on (or off) in every module of ``model`` that has one: the
    fused BN-ReLU (``fused_bn_relu``) and the 2×2 max-pool (``fused_max_pool``).

    Returns how many modules were switched. The BN-ReLU path only runs where ``fusable`` holds
    (training mode, channels-last CPU input, no hooks on the BN) and the pooling where
    ``poolable`` does, so eval, export and the analysis hooks see the plain modules' results
    whatever the switch says.
    """
    n = 0
    for m in model.modules():
        for switch in SWITCHES:
            if hasattr(type(m), switch):
                setattr(m, switch, on)
                n += 1
    return n
