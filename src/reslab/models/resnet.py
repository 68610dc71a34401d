"""ResNet (He et al. 2015), its plain twins, and the residual-unit variants of He et al. 2016.

One `ResNet` class with orthogonal switches, so every plain twin and paper variant is one flag
away from its ResNet:

- ``block``: ``"basic"`` (two 3×3 convs) or ``"bottleneck"`` (1×1 reduce, 3×3, 1×1 restore, ×4).
- ``shortcut``: ``"A"`` zero-padding identity, ``"B"`` projection only where the shape changes,
  ``"C"`` projection everywhere, ``"none"`` for the plain network (He et al. 2015, Sec. 3.3).
- ``unit``: where BN and ReLU sit (He et al. 2016, Fig. 4): ``"original"`` (a),
  ``"bn_after_add"`` (b), ``"relu_before_add"`` (c), ``"relu_preact"`` (d), ``"full_preact"`` (e).
- ``shortcut_variant``: the shortcut modifications of He et al. 2016, Fig. 2 / Table 1:
  ``"identity"``, ``"scaling"``, ``"exclusive_gating"``, ``"shortcut_gating"``, ``"conv1x1"``,
  ``"dropout"``.
- ``stem``: ``"imagenet"`` (7×7/2 conv + 3×3/2 max-pool), ``"cifar"`` (one 3×3 conv), or
  ``"imagenet_preact"`` (7×7/2 conv + 3×3/2 max-pool with no BN-ReLU between them, the max-pool
  padding with zeros: Keras ResNetV2, whose first unit normalises the stem itself).
- ``stride_in_1x1``: put the bottleneck's stride in its first 1×1 conv (paper/Caffe) instead of the
  3×3 (torchvision's "v1.5", the default).
- ``downsample_at``: ``"first"`` (He et al.: the first unit of stages 2…N strides) or ``"last"``
  (TF-slim/Keras ResNetV2: the last unit of stages 1…N−1 strides, through a strided identity).
- ``conv_bias``: give a bias to every conv whose output does not go straight into a BN (the
  layout of Keras ResNetV2; a bias in front of BN is redundant, BN subtracts the mean).

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv2``, ``layer1.0.downsample.0``,
``fc``), so torchvision checkpoints load into the ImageNet models with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import bn_relu
from .layers import DropPath, ZeroPadShortcut, check_input, conv1x1, conv3x3, he_init
from .registry import register_model

UNITS = ("original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact")
SHORTCUTS = ("A", "B", "C", "none")
SHORTCUT_VARIANTS = (
    "identity", "scaling", "exclusive_gating", "shortcut_gating", "conv1x1", "dropout",
)
R1 = "He et al. 2015 (arXiv:1512.03385)"
R2 = "He et al. 2016 (arXiv:1603.05027)"


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class ResidualUnit(nn.Module):
    """A residual unit: y = f(s(x) + F(x)) with the layer order chosen by ``unit``.

    Eq. (1) of He et al. 2015 is y = F(x, {W_i}) + x; the unit variants move BN and ReLU around
    the addition (He et al. 2016, Fig. 4). ``F`` is the residual branch (two 3×3 convs for the
    basic block, 1×1-3×3-1×1 for the bottleneck), ``s`` the shortcut.

    Analysis hooks used by the experiments:
    - ``residual_out`` is an ``nn.Identity`` applied to F(x) just before it meets the shortcut
      (after the last BN for the original unit): a forward hook on it sees the residual response.
    - ``lesioned = True`` deletes the residual branch (F ≡ 0) at test time, keeping the shortcut,
      as in Veit et al. 2016. A plain unit (no shortcut) then passes its input through the
      parameter-free option-A map.
    """

    expansion = 1
    # BN-ReLU (and the original unit's BN-add-ReLU) through reslab.kernels when training on a CPU;
    # switched by reslab.kernels.set_fused_kernels.
    fused_bn_relu = False

    def __init__(
        self,
        in_ch: int,
        width: int,
        stride: int = 1,
        *,
        shortcut: str = "B",
        unit: str = "original",
        shortcut_variant: str = "identity",
        stride_in_1x1: bool = False,
        preact_input: bool = True,
        conv_bias: bool = False,
        drop_path: float = 0.0,
        shortcut_scale: float = 0.5,
        residual_scale: float = 0.5,
        gate_bias: float = -6.0,
        shortcut_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.unit = unit
        self.variant = shortcut_variant
        self.shortcut_scale, self.residual_scale = shortcut_scale, residual_scale
        self.lesioned = False
        preact = unit == "full_preact"
        # The residual branch: convs with their BNs, named as torchvision names them.
        # Only a conv that feeds no BN gets a bias (conv_bias): the last one when BN comes later.
        last_bias = conv_bias and unit in ("full_preact", "bn_after_add")
        convs = self._convs(in_ch, width, out_ch, stride, stride_in_1x1, last_bias)
        for i, conv in enumerate(convs, 1):
            setattr(self, f"conv{i}", conv)
            if preact and i == 1 and not preact_input:
                continue  # first unit after a stem that already ends in BN-ReLU
            channels = conv.in_channels if preact else conv.out_channels
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels))
        self.depth = len(convs)
        self.relu = nn.ReLU(inplace=True)
        self.residual_out = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

        # The shortcut s(x).
        changes_shape = stride != 1 or in_ch != out_ch
        # Option B projects where the channels grow; a stride-only change keeps the identity,
        # "performed with a stride of 2" (He et al. 2015, Sec. 3.3), as Keras ResNetV2 does.
        project = shortcut == "C" or shortcut_variant == "conv1x1" or (
            shortcut == "B" and in_ch != out_ch
        )
        self.has_shortcut = shortcut != "none"
        if project:
            proj = conv1x1(in_ch, out_ch, stride, bias=conv_bias and preact)
            # Pre-activation units already normalise the projection's input (He et al. 2016, appendix).
            self.downsample = proj if preact else nn.Sequential(proj, nn.BatchNorm2d(out_ch))
        elif changes_shape:
            # Option A (and the lesion path of a plain unit that changes shape).
            self.downsample = ZeroPadShortcut(in_ch, out_ch, stride)
        else:
            self.downsample = None
        if shortcut_variant in ("exclusive_gating", "shortcut_gating"):
            # g(x) = sigmoid(W_g x + b_g), a 1×1 conv; a negative b_g starts the gate near the shortcut.
            self.gate = conv1x1(in_ch, out_ch, stride, bias=True)
            self.gate_bias_init = gate_bias
            self.reset_gate()
        if shortcut_variant == "dropout":
            self.shortcut_drop = nn.Dropout(shortcut_dropout)

    def _convs(self, in_ch, width, out_ch, stride, stride_in_1x1, last_bias) -> list[nn.Conv2d]:
        return [conv3x3(in_ch, width, stride), conv3x3(width, out_ch, bias=last_bias)]

    def reset_gate(self) -> None:
        """Gate weights 0 and bias b_g: every gate starts at sigmoid(b_g), as the paper's b_g sweep."""
        if hasattr(self, "gate"):
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, self.gate_bias_init)

    def last_norm(self) -> nn.Module | None:
        """The module whose zero-init makes the unit start as an identity (zero_init_residual)."""
        if self.unit == "bn_after_add":
            return None  # its last BN sits after the addition: zeroing it would kill the signal
        if self.unit == "full_preact":
            return getattr(self, f"conv{self.depth}")
        return getattr(self, f"bn{self.depth}")

    def _bn_relu(self, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(bn, x) if self.fused_bn_relu else self.relu(bn(x))

    def residual(self, x: torch.Tensor, preactivated: bool = False,
                 last_bn: bool = True) -> torch.Tensor:
        """F(x): the residual branch alone, in the unit's layer order.

        ``preactivated``: x already went through this unit's first BN-ReLU (full pre-activation
        with a projection shortcut, where both paths share it). ``last_bn=False`` (original unit)
        stops at the last conv, for the fused BN-add-ReLU.
        """
        unit = self.unit
        for i in range(1, self.depth + 1):
            conv = getattr(self, f"conv{i}")
            bn = getattr(self, f"bn{i}", None)
            last = i == self.depth
            if unit == "full_preact":  # BN-ReLU-conv
                if bn is not None and not (i == 1 and preactivated):
                    x = self._bn_relu(bn, x)
                x = conv(x)
            elif unit == "relu_preact":  # ReLU-conv-BN; the input's ReLU must not touch x in place
                x = bn(conv(torch.relu(x) if i == 1 else self.relu(x)))
            else:  # conv-BN-ReLU; the last BN/ReLU depend on the unit
                x = conv(x)
                if not last or unit == "relu_before_add":
                    x = self._bn_relu(bn, x)
                elif unit != "bn_after_add" and last_bn:
                    x = bn(x)
        return x

    def _fuse_tail(self) -> bool:
        """Whether y = relu(BN(conv(…)) + x) can run as one fused kernel: the original unit with a
        plain identity-variant shortcut and nothing (hook, drop-path, lesion) between BN and add."""
        return (self.fused_bn_relu and self.training and self.unit == "original"
                and self.variant == "identity" and self.has_shortcut and not self.lesioned
                and isinstance(self.drop_path, nn.Identity)
                and not self.residual_out._forward_hooks and not self.residual_out._forward_pre_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fuse_tail():
            s = x if self.downsample is None else self.downsample(x)
            return bn_relu(getattr(self, f"bn{self.depth}"), self.residual(x, last_bn=False), s)
        shared = self.unit == "full_preact" and isinstance(self.downsample, nn.Conv2d)
        if shared:
            # Both paths see BN-ReLU(x) (He et al. 2016 appendix; fb.resnet.torch 'both_preact').
            x = self._bn_relu(self.bn1, x) if hasattr(self, "bn1") else x
        f = None
        if not self.lesioned:
            f = self.drop_path(self.residual_out(self.residual(x, preactivated=shared)))
        s = None
        if self.has_shortcut or self.lesioned:
            s = x if self.downsample is None else self.downsample(x)
        return self._combine(x, s, f)

    def _combine(self, x, s, f) -> torch.Tensor:
        v = self.variant
        if f is not None and s is not None:
            if v == "scaling":
                s, f = self.shortcut_scale * s, self.residual_scale * f
            elif v in ("exclusive_gating", "shortcut_gating"):
                g = torch.sigmoid(self.gate(x))
                s = (1 - g) * s
                if v == "exclusive_gating":
                    f = g * f
            elif v == "dropout":
                s = self.shortcut_drop(s)
        if f is None:  # lesioned: y = s(x), through the unit's post-addition layers
            y = s
        elif s is None:  # plain unit
            y = f
        else:
            y = s + f
        if self.unit == "bn_after_add":
            y = getattr(self, f"bn{self.depth}")(y)
        if self.unit in ("original", "bn_after_add"):
            y = torch.relu(y) if y is x else self.relu(y)
        return y


class BasicBlock(ResidualUnit):
    """Two 3×3 convs (He et al. 2015, Fig. 2): ResNet-18/34 and the CIFAR nets."""

    expansion = 1


class Bottleneck(ResidualUnit):
    """1×1 reduce, 3×3, 1×1 restore ×4 (He et al. 2015, Fig. 5): ResNet-50/101/152, ResNet-164."""

    expansion = 4

    def _convs(self, in_ch, width, out_ch, stride, stride_in_1x1, last_bias) -> list[nn.Conv2d]:
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        return [conv1x1(in_ch, width, s1), conv3x3(width, width, s3),
                conv1x1(width, out_ch, bias=last_bias)]


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Residual network (or its plain twin) for ImageNet-size or CIFAR-size images."""

    fused_bn_relu = False  # the stem's and the final BN-ReLU; see ResidualUnit.fused_bn_relu

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        *,
        block: str = "basic",
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: str = "imagenet",
        shortcut: str = "B",
        unit: str = "original",
        shortcut_variant: str = "identity",
        stride_in_1x1: bool = False,
        downsample_at: str = "first",
        conv_bias: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
        shortcut_scale: float = 0.5,
        residual_scale: float = 0.5,
        gate_bias: float = -6.0,
        shortcut_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _choice(block, tuple(BLOCKS), "block")
        _choice(stem, ("imagenet", "cifar", "imagenet_preact"), "stem")
        _choice(downsample_at, ("first", "last"), "downsample_at")
        _choice(shortcut, SHORTCUTS, "shortcut")
        _choice(unit, UNITS, "unit")
        _choice(shortcut_variant, SHORTCUT_VARIANTS, "shortcut_variant")
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        if shortcut == "none" and shortcut_variant != "identity":
            raise ValueError("a plain network (shortcut='none') has no shortcut to modify")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.unit, self.shortcut, self.block = unit, shortcut, block
        unit_cls = BLOCKS[block]
        preact = unit == "full_preact"

        stem_width = widths[0] if stem == "cifar" else 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stem_stride = 4
        elif stem == "imagenet_preact":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=conv_bias)
            # Keras pads with zeros; on an input that is not rectified this differs from the
            # -inf padding of MaxPool2d(padding=1) at the borders, so the padding is explicit.
            self.maxpool = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(3, stride=2))
            stem_stride = 4
        else:
            self.conv1 = conv3x3(in_chans, stem_width, bias=conv_bias and preact)
            # The pre-activation CIFAR nets start with a bare conv: the first unit normalises it.
            if not preact:
                self.bn1 = nn.BatchNorm2d(stem_width)
                self.relu = nn.ReLU(inplace=True)
            stem_stride = 1
        stem_activates = hasattr(self, "bn1")

        total = sum(layers)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        kwargs = dict(
            shortcut=shortcut, unit=unit, shortcut_variant=shortcut_variant,
            stride_in_1x1=stride_in_1x1, conv_bias=conv_bias, shortcut_scale=shortcut_scale,
            residual_scale=residual_scale, gate_bias=gate_bias, shortcut_dropout=shortcut_dropout,
        )
        in_ch, k = stem_width, 0
        for stage, (count, width) in enumerate(zip(layers, widths), 1):
            units = []
            for i in range(count):
                if downsample_at == "first":
                    stride = 2 if stage > 1 and i == 0 else 1
                else:
                    stride = 2 if stage < len(layers) and i == count - 1 else 1
                first = stage == 1 and i == 0
                units.append(unit_cls(
                    in_ch, width, stride, preact_input=not (first and stem_activates),
                    drop_path=rates[k], **kwargs,
                ))
                in_ch, k = width * unit_cls.expansion, k + 1
            setattr(self, f"layer{stage}", nn.Sequential(*units))
        self.num_stages = len(layers)
        self.num_features = in_ch
        self.min_input_size = stem_stride * 2 ** (len(layers) - 1)
        if preact:
            # Full pre-activation ends with BN-ReLU after the last addition (He et al. 2016).
            self.final_bn = nn.BatchNorm2d(in_ch)
            self.final_relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

        he_init(self)
        for m in self.units():
            m.reset_gate()
            if zero_init_residual and (last := m.last_norm()) is not None:
                nn.init.zeros_(last.weight)

    def units(self) -> list[ResidualUnit]:
        """All residual units in forward order (the 'blocks' of the analysis experiments)."""
        return [m for m in self.modules() if isinstance(m, ResidualUnit)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if hasattr(self, "bn1"):
            x = bn_relu(self.bn1, x) if self.fused_bn_relu else self.relu(self.bn1(x))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (layer1 … layerN), e.g. for detection backbones."""
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        x = self.stem(x)
        out = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "final_bn"):
            x = (bn_relu(self.final_bn, x) if self.fused_bn_relu
                 else self.final_relu(self.final_bn(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


# ---------------------------------------------------------------------------------------------
# Named models. ImageNet: He et al. 2015 Table 1 (torchvision layout, option B by default).
# CIFAR: 6n+2 layers, 16-32-64 channels, option A (He et al. 2015 Sec. 4.2).
# ---------------------------------------------------------------------------------------------

IMAGENET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def imagenet_resnet(depth: int, **kwargs) -> ResNet:
    block, layers = IMAGENET_LAYERS[depth]
    return ResNet(layers, block=block, **kwargs)


def cifar_resnet(depth: int, block: str = "basic", **kwargs) -> ResNet:
    """The CIFAR family: 6n+2 layers with basic units, 9n+2 with bottleneck units."""
    per_unit = 2 if block == "basic" else 3
    if (depth - 2) % (3 * per_unit):
        raise ValueError(f"a CIFAR ResNet with {block} units has depth {3 * per_unit}n+2, got {depth}")
    n = (depth - 2) // (3 * per_unit)
    kwargs.setdefault("shortcut", "A")
    return ResNet((n, n, n), block=block, widths=(16, 32, 64), stem="cifar", **kwargs)


def _register_all() -> None:
    for depth in (18, 34, 50, 101, 152, 200):
        register_model(name=f"resnet{depth}", family="resnet", depth=depth, dataset="imagenet",
                       paper=R2 if depth == 200 else R1)(
            lambda d=depth, **kw: imagenet_resnet(d, **kw))
        register_model(name=f"preact_resnet{depth}", family="preact_resnet", depth=depth,
                       dataset="imagenet", paper=R2)(
            lambda d=depth, **kw: imagenet_resnet(d, **{"unit": "full_preact", **kw}))
    for depth in (18, 34):
        register_model(name=f"plain{depth}", family="plain", depth=depth, dataset="imagenet",
                       paper=R1)(lambda d=depth, **kw: imagenet_resnet(d, **{"shortcut": "none", **kw}))
    for depth in CIFAR_DEPTHS:
        register_model(name=f"resnet{depth}", family="resnet_cifar", depth=depth, dataset="cifar10",
                       paper=R1)(lambda d=depth, **kw: cifar_resnet(d, **kw))
        if depth != 1202:
            register_model(name=f"plain{depth}", family="plain_cifar", depth=depth,
                           dataset="cifar10", paper=R1)(
                lambda d=depth, **kw: cifar_resnet(d, **{"shortcut": "none", **kw}))
    for depth, block in ((110, "basic"), (164, "bottleneck"), (1001, "bottleneck")):
        register_model(name=f"preact_resnet{depth}", family="preact_resnet_cifar", depth=depth,
                       dataset="cifar10", paper=R2)(
            lambda d=depth, b=block, **kw: cifar_resnet(
                d, block=b, **{"unit": "full_preact", "shortcut": "B", **kw}))


_register_all()
