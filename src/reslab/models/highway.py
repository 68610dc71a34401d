"""Highway networks (Srivastava, Greff, Schmidhuber 2015, "Training Very Deep Networks").

A highway layer (Sec. 2, Eq. 3 with C = 1 − T):

    y = H(x)·T(x) + x·(1 − T(x)),    T(x) = σ(W_T x + b_T)

T is the *transform gate*, 1 − T the *carry gate*. With T = 0 the layer passes x through, with
T = 1 it is the plain layer H. A negative initial b_T biases the net towards carrying its input,
which is what lets very deep highway nets train; ResNet's y = F(x) + x is the gate-free relative.

The convolutional units here are built so that a highway net and a CIFAR ResNet of the same depth
differ *only* in how the two paths are combined: H is a ResNet basic unit's branch
(conv-BN-ReLU-conv-BN), a ReLU follows the combination, stages change shape at the same places,
the carry path uses the same parameter-free option-A map, and the module names (``conv1``,
``layer1.0.bn2``, ``fc``, ...) are the ResNet's, plus one ``transform_gate`` conv per unit.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .layers import DropPath, ZeroPadShortcut, check_input, conv3x3, he_init
from .registry import register_model

H = "Srivastava et al. 2015 (arXiv:1507.06228)"


def default_gate_bias(depth: int) -> float:
    """The paper's guideline for conv highway nets: b_T = −1, −2, −3 for depths of about 10, 20, 30.

    Read as −1 up to depth 10, −2 up to 20 and −3 beyond.
    """
    if depth <= 10:
        return -1.0
    if depth <= 20:
        return -2.0
    return -3.0


class HighwayUnit(nn.Module):
    """A convolutional highway layer: y = ReLU(H(x)·T(x) + c(x)·(1 − T(x))).

    H(x) = BN(conv3×3(ReLU(BN(conv3×3(x))))), the branch of a ResNet basic unit. T(x) is a sigmoid
    over a 3×3 conv, the same receptive field as H ([H] Sec. 2), with bias ``gate_bias``. c is the
    carry map: the identity, or where the unit changes shape the option-A map (stride, zero-pad
    channels), with the gate conv strided so that T is computed at the output resolution.

    Analysis hooks (nothing is recorded unless a hook is registered):
    - ``transform_out`` (alias ``residual_out``, the name ResidualUnit uses) is an
      ``nn.Identity`` applied to H(x) before gating: a forward hook sees the transform's response.
    - ``gate_out`` is an ``nn.Identity`` applied to T(x): a forward hook reads the gate values
      (or replaces them, e.g. with ones or zeros, to force the gate).
    - ``lesioned = True`` sets T ≡ 0: the unit returns ReLU(c(x)), the carry path only.

    ``drop_path`` (stochastic depth) drops the whole gated update per sample while training:
    T is multiplied by a Bernoulli mask and rescaled, so a dropped sample gets y = ReLU(c(x)).
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, *, gate_bias: float = -2.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.transform_gate = conv3x3(in_ch, out_ch, stride, bias=True)
        self.gate_bias_init = gate_bias
        changes_shape = stride != 1 or in_ch != out_ch
        self.carry = ZeroPadShortcut(in_ch, out_ch, stride) if changes_shape else nn.Identity()
        self.transform_out = nn.Identity()
        self.gate_out = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.lesioned = False
        self.reset_gate()

    @property
    def residual_out(self) -> nn.Identity:
        """The hook point on H(x), under the name the residual units use."""
        return self.transform_out

    def reset_gate(self) -> None:
        """Set b_T to ``gate_bias`` (the gate weights keep their He initialisation)."""
        nn.init.constant_(self.transform_gate.bias, self.gate_bias_init)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """H(x): conv-BN-ReLU-conv-BN."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) = σ(W_T x + b_T), one value per output channel and position."""
        return torch.sigmoid(self.transform_gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.carry(x)
        if self.lesioned:
            return torch.relu(c)  # c may be x itself: not in place
        h = self.transform_out(self.transform(x))
        t = self.drop_path(self.gate_out(self.gate(x)))
        return self.relu(h * t + c * (1 - t))


class HighwayNet(nn.Module):
    """A convolutional highway net laid out as the CIFAR ResNets (He et al. 2015, Sec. 4.2).

    A 3×3 conv-BN-ReLU stem, ``layers[i]`` highway units of ``widths[i]`` channels per stage (the
    first unit of stages 2… strides by 2), global average pool and a linear classifier: depth
    2·sum(layers) + 2. ``gate_bias`` defaults to `default_gate_bias` of that depth.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 3, 3),
        *,
        widths: tuple[int, ...] = (16, 32, 64),
        gate_bias: float | None = None,
        drop_path_rate: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers or any(n < 1 for n in layers):
            raise ValueError(
                f"layers {layers} and widths {widths} must be non-empty, of the same length, "
                "with at least one unit per stage"
            )
        self.depth = 2 * sum(layers) + 2
        self.gate_bias = default_gate_bias(self.depth) if gate_bias is None else float(gate_bias)
        if not math.isfinite(self.gate_bias):
            raise ValueError(f"gate_bias must be a finite number, got {gate_bias}")
        self.in_chans, self.num_classes = in_chans, num_classes

        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        total = sum(layers)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        in_ch, k = widths[0], 0
        for stage, (count, width) in enumerate(zip(layers, widths), 1):
            units = []
            for i in range(count):
                stride = 2 if stage > 1 and i == 0 else 1
                units.append(HighwayUnit(in_ch, width, stride, gate_bias=self.gate_bias,
                                         drop_path=rates[k]))
                in_ch, k = width, k + 1
            setattr(self, f"layer{stage}", nn.Sequential(*units))
        self.num_stages = len(layers)
        self.num_features = in_ch
        self.min_input_size = 2 ** (len(layers) - 1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

        he_init(self)  # zeroes every conv bias, the gates' included ...
        for unit in self.units():
            unit.reset_gate()  # ... so b_T is set afterwards

    def units(self) -> list[HighwayUnit]:
        """All highway units in forward order (the 'blocks' of the analysis experiments)."""
        return [m for m in self.modules() if isinstance(m, HighwayUnit)]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (layer1 … layerN)."""
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        x = self.relu(self.bn1(self.conv1(x)))
        out = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


# ---------------------------------------------------------------------------------------------
# Named models: the CIFAR ResNet layouts (6n+2 layers, 16-32-64 channels) with gated units.
# ---------------------------------------------------------------------------------------------

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def cifar_highway(depth: int, **kwargs) -> HighwayNet:
    """A CIFAR highway net of depth 6n + 2: three stages of n units, 16-32-64 channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"a CIFAR highway net has depth 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return HighwayNet((n, n, n), **kwargs)


def _cifar_builder(depth: int) -> Callable[..., HighwayNet]:
    def build(**overrides) -> HighwayNet:
        return cifar_highway(depth, **overrides)

    return build


for _depth in CIFAR_DEPTHS:
    register_model(name=f"highway{_depth}", family="highway", depth=_depth, dataset="cifar10",
                   paper=H)(_cifar_builder(_depth))
