"""One optimizer step, the optimizer, mixed precision and the weight EMA.

`make_train_step` is what the training loop and `reslab bench train` both time, so the benchmark
measures exactly the step that training runs.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import kernels
from ..checkpoint import _unwrap
from .config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOutput:
    """Detached 0-dim tensors on the training device (reading them waits for the device)."""

    loss: torch.Tensor
    correct: torch.Tensor


def autocast(precision: str, device_type: str) -> ContextManager:
    """Autocast to bf16/fp16 for the forward pass; fp32 runs as is."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}; got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum (and Nesterov), weight decay optionally sparing BN parameters and biases.

    Every tensor of dimension <= 1 is a BN scale/shift or a bias; decaying them shrinks the scale
    of the normalised activations rather than regularising a mapping (Goyal et al. 2017, Sec. 5.1;
    the "no bias decay" of Jia et al. 2018). With ``config.bn_shift_lr`` other than 1 the BN shifts
    form a group of their own whose ``lr_scale`` the training loop multiplies the scheduled lr
    by, with the weight decay divided by it so that the decay per step stays the same.
    Parameters that do not require gradients (frozen BN scales, whitening filters) are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    shift_ids = set()
    if config.bn_shift_lr != 1:
        shift_ids = {id(m.bias) for m in model.modules() if isinstance(m, _BatchNorm) and m.bias is not None}
    shifts = [p for p in params if id(p) in shift_ids]
    params = [p for p in params if id(p) not in shift_ids]
    if not config.decay_bn_bias:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": config.weight_decay}]
    if shifts:
        decay = config.weight_decay if config.decay_bn_bias else 0.0
        groups.append({"params": shifts, "weight_decay": decay / config.bn_shift_lr,
                       "lr_scale": config.bn_shift_lr})
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
        dampening=0.0, **fast_sgd_kwargs(device),
    )


def freeze_bn_scales(model: nn.Module) -> int:
    """Stop training every BatchNorm scale: it keeps its current value, 1 in a new model (Page's
    and airbench's fast recipes train with the scales fixed at 1).

    Returns how many were frozen. A scale that is all zeros (``zero_init_residual``) would switch
    its residual branch off for good, so that is an error, and then nothing is frozen.
    """
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, _BatchNorm) and m.weight is not None}
    zero = [name for name, m in norms.items() if not m.weight.detach().any()]
    if zero:
        raise ValueError(
            f"freeze_bn_scale would keep the all-zero BatchNorm scale of {', '.join(zero[:3])}"
            f"{' ...' if len(zero) > 3 else ''} at zero, switching its branch off for good (the "
            "model was built with zero_init_residual); drop one of the two settings"
        )
    for m in norms.values():
        m.weight.requires_grad_(False)
    return len(norms)


def fast_sgd_kwargs(device: torch.device | str) -> dict:
    """SGD's fastest implementation on `device`: one fused kernel for all parameters on a GPU;
    foreach (a few multi-tensor ops) on a CPU, where the fused kernel measured no faster."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
    fused_kernels: bool = False,
    label_smoothing: float = 0.0,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], StepOutput]:
    """A function (x, y) -> StepOutput doing forward, backward and the optimizer step.

    `x` is the normalised float batch (channels-last already when `channels_last`), `y` int64
    labels. The model is put in channels-last layout here when asked, and switched to reslab's
    fused BN-ReLU kernel with `fused_kernels` on a CPU (a warning says why if it cannot be
    compiled here; training then runs the standard modules). The loss is computed in
    fp32 from the (possibly bf16/fp16) logits. Gradients stay in ``.grad`` after the step, so a
    callback may read them; they are cleared at the start of the next step.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    device_type = next(model.parameters()).device.type
    fuse = fused_kernels and device_type == "cpu"
    if fuse and not kernels.available():
        warnings.warn(f"reslab's fused CPU kernels are not available ({kernels.unavailable_reason()}); "
                      "training with the standard modules. Install a C++ compiler and ninja "
                      "(pip install ninja) to use them.", stacklevel=2)
        fuse = False
    kernels.set_fused_kernels(model, fuse)
    # Static shapes (the loop drops a short last batch), so no dynamic-shape recompiles; with
    # mode="reduce-overhead" the forward and backward replay as CUDA graphs, which is safe here
    # because the step reads its outputs (loss, argmax) before the next replay overwrites them.
    forward = torch.compile(model, mode=compile_mode, dynamic=False) if compile else model
    if precision == "fp16" and scaler is None:
        raise ValueError("fp16 training needs a GradScaler (pass scaler=torch.amp.GradScaler())")

    def step(x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device_type):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
        return StepOutput(loss.detach(), correct)

    return step


class EMA:
    """An exponential moving average of the weights (and BN statistics): θ̄ ← d·θ̄ + (1−d)·θ.

    Polyak & Juditsky 1992 averaging in the exponential form most ImageNet recipes use; the
    average usually evaluates better than the last iterate. Integer buffers (BN's batch
    counter) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = _unwrap(model).state_dict()
        floats_ema, floats_src = [], []
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                floats_ema.append(value)
                floats_src.append(src[name])
            else:
                value.copy_(src[name])
        torch._foreach_lerp_(floats_ema, floats_src, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
