"""DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks", arXiv:1608.06993).

Inside a dense block every layer receives the feature maps of all earlier layers (Eq. 2):

    x_l = H_l([x_0, x_1, ..., x_{l-1}])

where [...] is channel concatenation and H_l is BN-ReLU-Conv(3×3) producing k channels (the
growth rate). DenseNet-B puts a bottleneck in front, BN-ReLU-Conv(1×1, 4k)-BN-ReLU-Conv(3×3, k);
DenseNet-C lets each transition (BN, 1×1 conv, 2×2 average pool) keep only ⌊θm⌋ of its m channels;
DenseNet-BC does both (θ = 0.5).

One `DenseNet` class covers the ImageNet nets (Table 1: a 7×7/2 conv + 3×3/2 max-pool stem, four
blocks, k = 32, BC) and the CIFAR nets (Table 2: a 3×3 conv stem, three equal blocks). Module names
follow torchvision (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), so torchvision's DenseNet
checkpoints load with ``strict=True`` (older ones after `remap_legacy_densenet_keys`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import check_input, conv1x1, conv3x3, he_init
from .registry import register_model

D = "Huang et al. 2017 (arXiv:1608.06993)"
STEMS = ("imagenet", "cifar")


@contextlib.contextmanager
def _running_stats_restored(norm: nn.BatchNorm2d) -> Iterator[None]:
    """Undo what a re-run of `norm` does to its running statistics.

    Gradient checkpointing runs the checkpointed function a second time during backward; without
    this a training-mode BN would fold the same batch into its running mean/var twice.
    """
    saved = [b.clone() for b in norm.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(norm.buffers(), saved):
                buf.copy_(old)


class DenseLayer(nn.Module):
    """H_l of Huang et al. 2017, applied to the concatenation [x_0, ..., x_{l-1}] (Eq. 2).

    ``bottleneck=False``: BN-ReLU-Conv(3×3, k) (``norm1``, ``relu1``, ``conv1``).
    ``bottleneck=True`` (DenseNet-B): BN-ReLU-Conv(1×1, bn_size·k)-BN-ReLU-Conv(3×3, k), named as
    torchvision's ``_DenseLayer``.

    ``drop_rate``: dropout after each conv (Sec. 4.2: "a dropout layer after each convolutional
    layer (except the first one)", 0.2 for the runs without augmentation).
    ``memory_efficient``: recompute concatenation, ``norm1``, ``relu1`` and ``conv1`` in the
    backward pass instead of storing them (gradient checkpointing, Pleiss et al. 2017), so the
    memory of the concatenated input stops growing quadratically with the block's depth. Outputs,
    gradients and BN running statistics are those of the ordinary forward.
    """

    def __init__(
        self,
        in_ch: int,
        growth_rate: int,
        *,
        bottleneck: bool = True,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.bottleneck, self.drop_rate = bottleneck, drop_rate
        self.memory_efficient = memory_efficient
        first_out = bn_size * growth_rate if bottleneck else growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_ch, first_out) if bottleneck else conv3x3(in_ch, first_out)
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(first_out)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(first_out, growth_rate)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x

    def concat_conv1(self, *features: torch.Tensor) -> torch.Tensor:
        """conv1(ReLU(BN([x_0, ..., x_{l-1}]))): the part whose memory grows with the block."""
        return self._drop(self.conv1(self.relu1(self.norm1(torch.cat(features, 1)))))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if (self.memory_efficient and torch.is_grad_enabled()
                and any(f.requires_grad for f in features)):
            out = checkpoint(
                self.concat_conv1, *features, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _running_stats_restored(self.norm1)),
            )
        else:
            out = self.concat_conv1(*features)
        if self.bottleneck:
            out = self._drop(self.conv2(self.relu2(self.norm2(out))))
        return out


class DenseBlock(nn.ModuleDict):
    """A dense block: layer l sees the block input and the k new channels of every layer before it.

    Returns the concatenation of the input and all new feature maps: in_ch + num_layers·k channels.
    """

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, **layer_kwargs) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_ch + i * growth_rate, growth_rate,
                                                    **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """Transition between dense blocks (Sec. 3): BN, ReLU, 1×1 conv to ⌊θm⌋ channels, 2×2 avg-pool.

    With ``drop_rate > 0`` a dropout follows the conv, as in the authors' Torch code; it has no
    parameters, so the torchvision key names (``norm``, ``conv``) do not change.
    """

    def __init__(self, in_ch: int, out_ch: int, drop_rate: float = 0.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            norm=nn.BatchNorm2d(in_ch), relu=nn.ReLU(inplace=True), conv=conv1x1(in_ch, out_ch))
        if drop_rate > 0:
            layers["drop"] = nn.Dropout(drop_rate)
        layers["pool"] = nn.AvgPool2d(kernel_size=2, stride=2)
        super().__init__(layers)


class DenseNet(nn.Module):
    """DenseNet of Huang et al. 2017 for ImageNet-size (``stem="imagenet"``) or CIFAR-size images.

    ``block_config``: layers per dense block. ``growth_rate``: k. ``bottleneck``: the -B layer.
    ``compression``: θ, transitions keep ⌊θm⌋ of m channels (1.0 = no compression, 0.5 = -C).
    ``num_init_features``: the stem's channels; default 2k for DenseNet-B/BC, 16 otherwise
    (Sec. 3, "Implementation Details").
    """

    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        *,
        growth_rate: int = 32,
        bottleneck: bool = True,
        bn_size: int = 4,
        compression: float = 0.5,
        num_init_features: int | None = None,
        stem: str = "imagenet",
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
        if not block_config or any(n < 1 for n in block_config):
            raise ValueError(
                f"block_config needs at least one block of >= 1 layers, got {block_config}")
        if growth_rate < 1 or bn_size < 1:
            raise ValueError(
                f"growth_rate and bn_size must be >= 1, got {growth_rate} and {bn_size}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(
                f"compression θ must be in (0, 1] (0.5 for DenseNet-C), got {compression}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.growth_rate, self.compression, self.bottleneck = growth_rate, compression, bottleneck
        init = num_init_features or (2 * growth_rate if bottleneck else 16)

        if stem == "imagenet":
            stem_layers = OrderedDict(
                conv0=nn.Conv2d(in_chans, init, kernel_size=7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(init),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
            stem_stride = 4
        else:
            # The first dense layer normalises the stem's output itself (BN-ReLU-conv).
            stem_layers = OrderedDict(conv0=conv3x3(in_chans, init))
            stem_stride = 1
        self._stem_names = tuple(stem_layers)
        self.features = nn.Sequential(stem_layers)

        channels = init
        layer_kwargs = dict(bottleneck=bottleneck, bn_size=bn_size, drop_rate=drop_rate,
                            memory_efficient=memory_efficient)
        for i, num_layers in enumerate(block_config, 1):
            self.features.add_module(
                f"denseblock{i}", DenseBlock(num_layers, channels, growth_rate, **layer_kwargs))
            channels += num_layers * growth_rate
            if i < len(block_config):
                out = math.floor(compression * channels)
                self.features.add_module(f"transition{i}", Transition(channels, out, drop_rate))
                channels = out
        # torchvision calls the final BN norm5 whatever the number of blocks: kept for checkpoints.
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

        self.num_stages = len(block_config)
        self.num_features = channels
        self.min_input_size = stem_stride * 2 ** (len(block_config) - 1)
        he_init(self)
        nn.init.zeros_(self.classifier.bias)

    def units(self) -> list[DenseLayer]:
        """Every dense layer H_l in forward order (the 'blocks' of the analysis experiments)."""
        return [m for m in self.modules() if isinstance(m, DenseLayer)]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every dense block (before the next transition), e.g. for backbones.

        Stage i is transition i−1 followed by dense block i, so stage i has stride
        stem_stride · 2^(i−1), as the stages of a ResNet.
        """
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        for name in self._stem_names:
            x = getattr(self.features, name)(x)
        out = []
        for i in range(1, self.num_stages + 1):
            if i > 1:
                x = getattr(self.features, f"transition{i - 1}")(x)
            x = getattr(self.features, f"denseblock{i}")(x)
            out.append(x)
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU, global average pool, linear classifier (Table 1, "Classification Layer")."""
        x = F.relu(self.features.norm5(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


# Old torchvision checkpoints named the dense-layer modules "norm.1", "conv.2", ... (a dotted
# name that newer PyTorch rejects); they became "norm1", "conv2".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\."
    r"(weight|bias|running_mean|running_var|num_batches_tracked)$"
)


def remap_legacy_densenet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's legacy DenseNet keys (``...denselayer1.norm.1.weight``) to the current
    ones (``...denselayer1.norm1.weight``); every other key is kept, in order."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # new name -> the key it came from, to name both on a clash
    for key, value in state_dict.items():
        new = _LEGACY_KEY.sub(r"\1\2.\3", key)
        if new in out:
            legacy = key if new != key else source[new]
            raise ValueError(
                f"state_dict has both the legacy key {legacy!r} and its current name {new!r}; "
                "keep only one of them"
            )
        out[new], source[new] = value, key
    return out


# ---------------------------------------------------------------------------------------------
# Named models. ImageNet: Table 1 (DenseNet-BC, k = 32, 64 init channels; 161 is torchvision's
# k = 48 net). CIFAR: Table 2 (three blocks of (L − 4)/3 layers, halved for the -B layer).
# ---------------------------------------------------------------------------------------------

IMAGENET_CONFIGS = {
    121: (32, (6, 12, 24, 16)), 161: (48, (6, 12, 36, 24)), 169: (32, (6, 12, 32, 32)),
    201: (32, (6, 12, 48, 32)), 264: (32, (6, 12, 64, 48)),
}


def imagenet_densenet(depth: int, **kwargs) -> DenseNet:
    """DenseNet-BC for ImageNet (Table 1); ``growth_rate`` etc. can be overridden."""
    growth, blocks = IMAGENET_CONFIGS[depth]
    kwargs.setdefault("growth_rate", growth)
    return DenseNet(blocks, stem="imagenet", **kwargs)


def cifar_densenet(depth: int, *, bottleneck: bool = False, compression: float = 1.0,
                   growth_rate: int = 12, **kwargs) -> DenseNet:
    """The CIFAR/SVHN DenseNets: depth L = 3n + 4 (basic layers) or 6n + 4 (-B layers).

    The 4 are the stem conv, two transitions and the classifier; every basic layer has one conv,
    every -B layer two (Sec. 3; the authors' ``models/densenet.lua``).
    """
    per_layer = 6 if bottleneck else 3
    if depth < per_layer + 4 or (depth - 4) % per_layer:
        form = "6n+4 with bottleneck layers" if bottleneck else "3n+4"
        raise ValueError(f"a CIFAR DenseNet has depth {form} (e.g. 40, 100, 190, 250), got {depth}")
    n = (depth - 4) // per_layer
    return DenseNet((n, n, n), growth_rate=growth_rate, bottleneck=bottleneck,
                    compression=compression, stem="cifar", **kwargs)


CIFAR_MODELS = {
    # name: (depth, k, bottleneck, θ)
    "densenet40_k12": (40, 12, False, 1.0),
    "densenet100_k12": (100, 12, False, 1.0),
    "densenet100_k24": (100, 24, False, 1.0),
    "densenet_bc100_k12": (100, 12, True, 0.5),
    "densenet_bc250_k24": (250, 24, True, 0.5),
    "densenet_bc190_k40": (190, 40, True, 0.5),
}


def _cifar_builder(
    depth: int, growth_rate: int, bottleneck: bool, compression: float
) -> Callable[..., DenseNet]:
    # A closure rather than a lambda with default arguments, so that no override can clobber them.
    def build(**overrides) -> DenseNet:
        defaults = dict(growth_rate=growth_rate, bottleneck=bottleneck, compression=compression)
        return cifar_densenet(depth, **{**defaults, **overrides})

    return build


def _imagenet_builder(depth: int) -> Callable[..., DenseNet]:
    def build(**overrides) -> DenseNet:
        return imagenet_densenet(depth, **overrides)

    return build


def _register_all() -> None:
    for depth in IMAGENET_CONFIGS:
        register_model(name=f"densenet{depth}", family="densenet", depth=depth,
                       dataset="imagenet", paper=D)(_imagenet_builder(depth))
    for name, config in CIFAR_MODELS.items():
        register_model(name=name, family="densenet_cifar", depth=config[0], dataset="cifar10",
                       paper=D)(_cifar_builder(*config))


_register_all()
