"""ResNet-9: the fast CIFAR-10 residual network of Page 2018 (DAWNBench, "How to train your ResNet").

Nine weighted layers, all wide and shallow, so a GPU (or a CPU's matrix units) runs it near its
peak: a 64-channel stem, then three stages that each widen with a 3×3 conv-BN-ReLU and halve the
resolution by 2×2 max-pooling; stages 1 and 3 add one residual unit (two conv-BN-ReLU, identity
shortcut, no ReLU after the addition). A global max-pool and a bias-free linear classifier whose
logits are multiplied by 0.125 (Page's "Mul(weight=0.125)", which keeps the initial loss small
without changing the architecture) finish it. 6,573,120 parameters, 0.38 GMACs at 32×32: ten
times ResNet-20's arithmetic, but reaching 94% on CIFAR-10 in 24 epochs where ResNet-20 needs
160 epochs for 91%.

``whiten=k`` puts a `PatchWhitening` layer (fixed k×k filters that whiten the input's patches,
fitted to the training images by ``reslab train``; then a ReLU) in front of the stem, the input
whitening of Page's and airbench's fastest recipes: ``whiten=2`` feeds the stem 24 channels at
31×31 instead of 3 at 32×32.

Module names follow the other families where they can (``stem``, ``layer1..3``, ``fc``), and
``forward_stages``/``num_stages`` make it a `features_only` backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import bn_relu, max_pool2x2
from .layers import PatchWhitening, check_input
from .registry import register_model

PAGE = "Page 2018, DAWNBench ResNet-9 (myrtle.ai, 'How to train your ResNet')"


class ConvBN(nn.Sequential):
    """3×3 conv (no bias: BN follows) → BN → ReLU, as a Sequential (its weights are ``0.*``, ``1.*``).

    With ``fused_bn_relu`` set (reslab.kernels.set_fused_kernels) BN and ReLU run as one kernel
    while training on a CPU.
    """

    fused_bn_relu = False

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn, relu = self
        return bn_relu(bn, conv(x)) if self.fused_bn_relu else relu(bn(conv(x)))


class Residual(nn.Module):
    """x + F(x) with F two conv-BN-ReLU layers of the same width (Page's ``Residual``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(channels, channels)
        self.conv2 = ConvBN(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class MaxPool(nn.MaxPool2d):
    """2×2 max-pooling; with ``fused_max_pool`` set (reslab.kernels.set_fused_kernels) through
    reslab's CPU kernel, which computes the same values and gradients faster."""

    fused_max_pool = False

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x) if self.fused_max_pool else super().forward(x)


class Stage(nn.Sequential):
    """conv-BN-ReLU to the new width, 2×2 max-pool, then an optional residual unit."""

    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        layers = [ConvBN(c_in, c_out), MaxPool()]
        if residual:
            layers.append(Residual(c_out))
        super().__init__(*layers)


class ResNet9(nn.Module):
    def __init__(self, *, num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 residual: tuple[bool, bool, bool] = (True, False, True),
                 logit_scale: float = 0.125, whiten: int = 0) -> None:
        super().__init__()
        if len(widths) != 4 or len(residual) != 3:
            raise ValueError(f"ResNet9 takes 4 widths (stem + 3 stages) and 3 residual flags, got "
                             f"widths={widths}, residual={residual}")
        self.in_chans = in_chans
        if whiten < 0:
            raise ValueError("whiten is the side of the whitened patches (0: no whitening layer), "
                             f"got {whiten}")
        # three 2× poolings, after a whitening layer that takes whiten-1 pixels off each side
        self.min_input_size = 8 + max(whiten - 1, 0)
        self.num_stages = 3
        self.logit_scale = logit_scale
        if whiten:
            self.whiten = PatchWhitening(in_chans, whiten)
        self.stem = ConvBN(self.whiten.out_channels if whiten else in_chans, widths[0])
        self.layer1 = Stage(widths[0], widths[1], residual[0])
        self.layer2 = Stage(widths[1], widths[2], residual[1])
        self.layer3 = Stage(widths[2], widths[3], residual[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes, bias=False)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        if hasattr(self, "whiten"):
            x = torch.relu(self.whiten(x))
        x = self.stem(x)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


@register_model(family="resnet9", depth=9, dataset="cifar10", paper=PAGE)
def resnet9(**kwargs) -> ResNet9:
    return ResNet9(**kwargs)
