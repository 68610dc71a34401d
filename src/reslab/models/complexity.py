"""Parameters, multiply-accumulates and activation memory, measured by running the model.

How MACs are counted (the convention of torchvision's `_ops` and fvcore): one multiply-add per
weight use in every `Conv2d` and `Linear` layer, i.e. a conv contributes
``out_elements × (in_channels / groups) × kh × kw`` and a linear layer
``batch × in_features × out_features``. Batch-norm, activations, pooling, additions and
concatenations are not counted (they are memory-bound and below 1% of the total for ResNets).
Shapes come from a forward pass on a meta tensor (no memory, no arithmetic), so the count follows
the model actually built rather than a hand table.

Activation memory is the number of bytes of every leaf module's output for one forward pass at
the given batch size: roughly what a training step keeps for the backward pass (an upper bound,
since in-place ReLUs share storage with their inputs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    activation_bytes: int
    input_size: tuple[int, ...]

    @property
    def flops(self) -> int:
        """Floating-point operations of a forward pass: 2 per multiply-accumulate."""
        return 2 * self.macs


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def complexity(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> Complexity:
    """Measure `model` on an input of `input_size` = (C, H, W) (or (N, C, H, W))."""
    if len(input_size) == 3:
        shape = (batch_size, *input_size)
    elif len(input_size) == 4:
        shape = tuple(input_size)
    else:
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W), got {input_size}")
    params = count_params(model)
    on_meta = all(p.is_meta for p in model.parameters())
    probe = model if on_meta else copy.deepcopy(model).to("meta")

    macs = 0
    act = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal macs, act
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features
        if isinstance(output, torch.Tensor):
            act += output.numel() * output.element_size()

    leaves = [m for m in probe.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = probe.training
    try:
        probe.eval()
        with torch.no_grad():
            probe(torch.zeros(shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
        probe.train(was_training)
    return Complexity(params, macs, act, tuple(shape))
