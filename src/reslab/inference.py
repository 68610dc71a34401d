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
