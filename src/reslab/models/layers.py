"""Small building blocks shared by every family: convolutions, drop-path, shortcuts, input checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=bias)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: subsample by striding and pad the new channels with zeros.

    Parameter-free, so a residual net with option A has exactly the parameters of its plain twin.
    The added channels are split evenly before and after the existing ones, as in the CIFAR
    reproductions (akamaster, fb.resnet.torch concatenates zeros after; both are identities on
    the original channels).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option A cannot reduce channels ({in_ch} -> {out_ch}); use option B")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_ch - self.in_ch
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_ch}->{self.out_ch}, stride={self.stride}"


def check_input(x: torch.Tensor, in_chans: int, min_size: int, model: str) -> None:
    """Reject inputs a model cannot take, naming the shape it expects."""
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[-1] < min_size or x.shape[-2] < min_size:
        raise ValueError(
            f"{model} expects input of shape (N, {in_chans}, H, W) with H, W >= {min_size} "
            f"(its total stride), got {tuple(x.shape)}. "
            + (
                f"Create the model with in_chans={x.shape[1]} for {x.shape[1]}-channel images."
                if x.ndim == 4 and x.shape[1] != in_chans
                else "Resize or pad the images."
            )
        )


def he_init(module: nn.Module) -> None:
    """He (MSRA) initialisation as in the papers: fan-out normal for convs, BN to (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
