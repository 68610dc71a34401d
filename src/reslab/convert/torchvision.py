"""torchvision ResNet / DenseNet checkpoints (``.pth``) → reslab models.

reslab's ImageNet ResNets and DenseNets use torchvision's module names, so a torchvision
state_dict loads unchanged (``resnet18`` … ``resnet152``; reslab's default ResNet is torchvision's
"v1.5" with the stride in the 3×3 conv). Old DenseNet files name the dense-layer modules
``norm.1``/``conv.2``; `remap_legacy_densenet_keys` renames them. Files are read with
``torch.load(weights_only=True)``: a file that needs to run pickled code is refused.
torchvision itself is not needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .common import Converted, Preprocessing, build_and_load

PREPROCESSING = Preprocessing(
    "torchvision", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
    "torchvision ImageNet weights: RGB in [0, 1] normalised by the ImageNet mean/std.",
)


def guess_model(state: dict[str, torch.Tensor]) -> str:
    """The reslab name of a torchvision ResNet/DenseNet state_dict, from its keys and shapes."""
    from ..models.densenet import IMAGENET_CONFIGS
    from ..models.resnet import IMAGENET_LAYERS

    if any(k.startswith("features.denseblock") for k in state):
        layers = tuple(
            len({m.group(1) for k in state
                 if (m := re.match(rf"features\.denseblock{b}\.denselayer(\d+)\.", k))})
            for b in range(1, 5)
        )
        growth = state["features.denseblock1.denselayer1.conv2.weight"].shape[0]
        for depth, (k, blocks) in IMAGENET_CONFIGS.items():
            if (k, blocks) == (growth, layers):
                return f"densenet{depth}"
        raise ValueError(f"a DenseNet with growth rate {growth} and blocks {layers} is no "
                         "torchvision DenseNet; pass --model with the reslab name")
    if "fc.weight" in state and "layer1.0.conv1.weight" in state:
        units = tuple(
            len({m.group(1) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
            for s in range(1, 5)
        )
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        for depth, spec in IMAGENET_LAYERS.items():
            if spec == (block, units):
                return f"resnet{depth}"
        raise ValueError(f"a ResNet with {block} units {units} is no torchvision ResNet; "
                         "pass --model with the reslab name")
    raise ValueError(
        "the checkpoint's keys are neither a torchvision ResNet (conv1, layer1…4, fc) nor a "
        "DenseNet (features.denseblock…); pass --model with the reslab name it fits"
    )


def from_torchvision(path: str | Path, model: str | None = None) -> Converted:
    """Load a torchvision ResNet/DenseNet ``.pth`` (or ``.safetensors``) into its reslab model."""
    from ..checkpoint import load_state_dict_file
    from ..models.densenet import remap_legacy_densenet_keys

    state = load_state_dict_file(path)
    if any(".denselayer" in k for k in state):
        state = remap_legacy_densenet_keys(state)
    name = model or guess_model(state)
    head = state.get("fc.weight", state.get("classifier.weight"))
    stem = state.get("conv1.weight", state.get("features.conv0.weight"))
    kwargs = {}
    if head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    if stem is not None:
        kwargs["in_chans"] = int(stem.shape[1])
    net = build_and_load(name, kwargs, state, source=f"{Path(path).name} (torchvision layout)")
    return Converted(net, name, kwargs, "torchvision", f"torchvision {name}", PREPROCESSING)
