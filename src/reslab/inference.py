"""`optimize_for_inference`: the fastest way reslab knows to run a trained model.

What it does, each step measurable on its own with `reslab bench infer`:
- folds every BatchNorm into the convolution before it (one op instead of two, same function);
- converts to channels_last (NHWC), the layout oneDNN's CPU convolutions and cuDNN's tensor-core
  kernels are fastest in;
- casts the weights to bf16 (or fp16 on GPU): on CPUs with AVX-512 bf16 and on GPUs this halves
  memory traffic and uses the low-precision matmul units; logits come back in that dtype;
- optionally `torch.compile`s the result with Inductor's weight freezing: the weights become
  constants of the compiled graph, so on CPU they are packed once into oneDNN's blocked layout
  (on AMX machines, its tile layout) and the ReLUs and residual additions run as the
  convolutions' post-ops instead of separate passes over memory. Pays off for repeated calls,
  costs a one-time compilation. (Freezing must be on while Dynamo traces, not only while
  Inductor compiles: passed as `torch.compile(options={"freezing": True})` it leaves the
  weights as graph inputs and packs nothing, measured with torch 2.13.)

`fast_path(model, input_size, backend=...)` builds the same for each backend reslab runs:
PyTorch (this module), ONNX Runtime (the checked fp32 export, `reslab.export`) or OpenVINO
(`reslab.OpenVINOSession`); `reslab bench infer --backend all` times them side by side, and
`reslab eval` / `reslab predict` take the same `--backend`.

Where the CPU is an Intel Xeon with AMX, `reslab.OpenVINOSession` (Intel's OpenVINO with its own
AMX convolution kernels) ran a ResNet-50 batch 5-25% faster than this module's compiled path
(2026-11-24, `reslab bench infer --backend openvino`); `reslab bench` measures both on any machine.

Run eager (without `compile`), each call re-allocates its activations; with glibc's default
malloc that costs page faults on every call, which `reslab.tune_allocator()` removes for the
whole process (ResNet-50, batch 16, bf16: 74 → 90 img/s on 2 AMD EPYC cores, 101 → 122 on 2
Intel Xeon cores with AMX; see `reslab.runtime`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _CastInput(nn.Module):
    """Cast the input to the model's dtype and layout so callers can pass fp32 NCHW tensors."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.model, self.dtype, self.channels_last = model, dtype, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class _Frozen(nn.Module):
    """`module` compiled with Inductor's freezing, which needs grad mode off while it traces."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def optimize_for_inference(model: nn.Module, *, precision: str = "bf16", channels_last: bool = True,
                           fold_bn: bool = True, compile: bool = False) -> nn.Module:
    """An eval-mode copy of `model` with BN folded, in channels_last and `precision`.

    The original model is left untouched. The returned module accepts fp32 NCHW input. With
    `compile`, the first call compiles (tens of seconds for a ResNet-50 on 2 cores) and bakes the
    weights in; a new input shape compiles again.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    fast = copy.deepcopy(model).eval()
    if fold_bn:
        from .export import fold_batchnorm

        fast = fold_batchnorm(fast)
    dtype = PRECISIONS[precision]
    fast = fast.to(dtype=dtype)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    wrapped = _CastInput(fast, dtype, channels_last).eval()
    if compile:
        wrapped = _Frozen(wrapped)
    return wrapped


BACKENDS = ("torch", "onnxruntime", "openvino")  # the last two: CPU runtimes, packages so named


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def available_backends(device: str = "cpu") -> tuple[str, ...]:
    """The backends `fast_path` can run here: torch always; ONNX Runtime and OpenVINO where their
    package imports and the model is on the CPU (they are CPU runtimes)."""
    import importlib.util

    if torch.device(device).type != "cpu":
        return ("torch",)
    return tuple(b for b in BACKENDS if b == "torch" or importlib.util.find_spec(b))


def fast_path(model: nn.Module, input_size: tuple[int, int, int], *, backend: str = "torch",
              streams: int | None = None, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """reslab's fastest way to run `model` with `backend`: `optimize_for_inference(model,
    **kwargs)` for torch, the checked ONNX export in onnxruntime (fp32; only ``fold_bn`` applies),
    or an `OpenVINOSession` (``precision``, ``fold_bn`` and ``streams`` apply)."""
    check_backend(backend)
    if backend != "openvino" and streams is not None:
        raise ValueError("streams split a batch across OpenVINO's streams; use backend='openvino'")
    if backend != "torch" and kwargs.get("compile"):
        raise ValueError(f"compile is torch.compile, for backend='torch'; the {backend} backend "
                         "compiles the model itself")
    if backend == "torch":
        return optimize_for_inference(model, **kwargs)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU; the model is on "
                         f"{next(model.parameters()).device}")
    if backend == "onnxruntime":
        from .export import onnxruntime_session

        return onnxruntime_session(model, input_size, fold_bn=kwargs.get("fold_bn", True))
    from .export import OpenVINOSession

    return OpenVINOSession(model, input_size, precision=kwargs.get("precision", "bf16"),
                           streams=streams, fold_bn=kwargs.get("fold_bn", True))
