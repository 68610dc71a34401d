"""Keras Applications weights → reslab: ResNet50/101/152, ResNet50V2/101V2/152V2, DenseNet121/169/201.

Reads the weight files with h5py alone (Keras itself is not needed): Keras 3 ``.weights.h5``
(``model.save_weights``), a full ``.keras`` archive (its ``model.weights.h5``), and the legacy
HDF5 layout of Keras 2 / ``model.save("x.h5")`` (the files keras.io distributes).

How each Keras family maps onto reslab (every step exact; the tests compare against Keras):

- **ResNet50/101/152** (``resnet.py``, original v1): ``resnet{50,101,152}`` with
  ``stride_in_1x1=True`` (Keras strides in the first 1×1 conv of a unit, as the paper and Caffe).
  Keras gives every conv a bias; each of them feeds a BN, which subtracts the mean anyway, so the
  bias is folded into that BN's running mean (μ' = μ − b) and the reslab model stays the
  standard bias-free one.
- **ResNet50V2/101V2/152V2** (``resnet_v2.py``, pre-activation): ``preact_resnet{…}`` with
  ``stem="imagenet_preact"`` (conv → zero-padded max-pool, no BN-ReLU: the first unit's
  ``preact_bn`` normalises the stem), ``downsample_at="last"`` (Keras strides in the *last* unit
  of stacks 1–3, through a 1×1/2 max-pool = strided identity) and ``conv_bias=True`` (the stem
  conv, the units' last 1×1 conv and the projection shortcut carry biases in Keras). Keras's
  ``post_bn``/``post_relu`` are reslab's ``final_bn``/``final_relu``; a unit's ``preact_bn``,
  ``1_bn``, ``2_bn`` are ``bn1``, ``bn2``, ``bn3``; ``0_conv`` (from the shared pre-activation)
  is the projection ``downsample``.
- **DenseNet121/169/201**: the torchvision layout exactly (``conv1_conv`` → ``features.conv0``,
  ``conv{b+1}_block{l}_{0_bn,1_conv,1_bn,2_conv}`` → ``features.denseblock{b}.denselayer{l}.
  {norm1,conv1,norm2,conv2}``, ``pool{b+1}_*`` → ``features.transition{b}.*``, ``bn`` →
  ``features.norm5``, ``predictions`` → ``classifier``).

Padding: Keras pads explicitly (``ZeroPadding2D`` + ``valid``) or with ``same`` at stride 1 —
both symmetric, equal to PyTorch's ``padding=k//2`` for the stride-2 7×7 and 3×3 convs. The one
place zero padding is not what PyTorch's max-pool does is the V2 stem, whose max-pool sees an
unrectified input; there the reslab model pads with zeros too. Keras BN uses ε = 1.001e-5; the
difference to PyTorch's 1e-5 is added to the running variance (σ² + 1.001e-5 = σ'² + 1e-5).

Preprocessing (``keras.applications.*.preprocess_input``): ``caffe`` for v1 (BGR, minus the
ImageNet mean in 0–255), ``tf`` for V2 (scale to [−1, 1]), ``torch`` for DenseNet. The converted
models take RGB in [0, 1] normalised by the recorded mean/std, which reproduces each mode
exactly; for ``caffe`` the first conv's input channels are reordered from BGR to RGB.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..extras import require
from .common import Converted, Preprocessing, build_and_load

KERAS_BN_EPS = 1.001e-5
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
DENSENET_DEPTHS = {(6, 12, 24, 16): 121, (6, 12, 32, 32): 169, (6, 12, 48, 32): 201}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # Keras's BGR mean (103.939, 116.779, 123.68), reversed

PREPROCESSING = {
    "caffe": Preprocessing(
        "keras-caffe", tuple(m / 255 for m in CAFFE_MEAN_RGB), (1 / 255,) * 3,
        "Keras 'caffe' mode: BGR, 0-255 minus the ImageNet mean, no scaling. The first conv's "
        "input channels were reordered to RGB, so feed RGB in [0, 1] normalised by mean/std.",
    ),
    "tf": Preprocessing(
        "keras-tf", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "Keras 'tf' mode: pixels scaled to [-1, 1]; RGB in [0, 1] normalised by mean/std.",
    ),
    "torch": Preprocessing(
        "keras-torch", IMAGENET_MEAN, IMAGENET_STD,
        "Keras 'torch' mode: RGB in [0, 1] normalised by the ImageNet mean/std.",
    ),
}


@dataclass(frozen=True)
class KerasArchitecture:
    """What a Keras weight file holds, read off its layer names."""

    keras_name: str  # e.g. "ResNet50V2"
    family: str  # "resnet", "resnet_v2" or "densenet"
    blocks: tuple[int, ...]
    reslab_name: str
    model_kwargs: dict
    preprocessing: str  # Keras preprocess_input mode


# ---------------------------------------------------------------------------------------------
# Reading the three file layouts into {layer name: {weight name: array}}
# ---------------------------------------------------------------------------------------------

BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")


def read_keras_weights(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Every layer's weights in a Keras ``.weights.h5``, ``.keras`` or legacy ``.h5`` file."""
    (h5py,) = require("h5py", extra="keras", purpose="reading Keras files")

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such Keras weight file: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "model.weights.h5" not in z.namelist():
                raise ValueError(f"{path} is a zip archive without model.weights.h5, not a .keras file")
            data = z.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as f:
            layers = _read_keras3(f, path)
    else:
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path} is not an HDF5 or .keras file ({e})") from None
        with f:
            if "layers" in f and "layer_names" not in f.attrs:
                layers = _read_keras3(f, path)
            else:
                group = f["model_weights"] if "model_weights" in f else f
                if "layer_names" not in group.attrs:
                    raise ValueError(f"{path} is an HDF5 file but not a Keras weight file (no layer list)")
                layers = _read_legacy(group)
    return {_current_name(name): weights for name, weights in layers.items()}


# The weight files on keras.io were written by keras-applications, whose layers were named
# "conv1/conv" (DenseNet) and whose classifier was "probs" (ResNet) or "fc1000" (DenseNet); Keras
# loads them by position, so the names never changed in the files.
_OLD_CLASSIFIER_NAMES = {"probs": "predictions", "fc1000": "predictions"}


def _current_name(name: str) -> str:
    name = name.replace("/", "_")
    return _OLD_CLASSIFIER_NAMES.get(name, name)


def _read_keras3(f, path: Path) -> dict[str, dict[str, np.ndarray]]:
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, group in f["layers"].items():
        if "vars" not in group or not len(group["vars"]):
            continue
        vars_ = group["vars"]
        name = vars_.attrs.get("name")
        if name is None:
            raise ValueError(
                f"{path}: layer {key!r} carries no layer name (written by an older Keras 3); "
                "load it in Keras and save it again with model.save_weights('x.weights.h5')"
            )
        arrays = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
        layers[str(name)] = _name_vars(str(name), arrays)
    return layers


def _name_vars(layer: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    # Keras 3 stores variables by position: Conv2D/Dense (kernel, bias), BN (gamma, beta, mean, var).
    if arrays[0].ndim in (2, 4):
        return dict(zip(("kernel", "bias"), arrays))
    if len(arrays) == 4:
        return dict(zip(BN_VARS, arrays))
    raise ValueError(f"layer {layer!r} has {len(arrays)} variables of an unexpected kind")


def _read_legacy(group) -> dict[str, dict[str, np.ndarray]]:
    layers: dict[str, dict[str, np.ndarray]] = {}
    for raw in group.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        g = group[name]
        weights = {}
        for wraw in g.attrs.get("weight_names", []):
            wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
            # "conv1_conv/kernel:0" (Keras 2) or "conv1_conv/kernel" (Keras 3 legacy writer)
            weights[wname.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(g[wname])
        if weights:
            layers[name] = weights
    return layers


# ---------------------------------------------------------------------------------------------
# Which architecture, and the layer-by-layer mapping
# ---------------------------------------------------------------------------------------------


def detect_architecture(layers: dict[str, dict[str, np.ndarray]]) -> KerasArchitecture:
    """ResNet v1 / V2 / DenseNet and its depth, from the layer names alone."""
    names = set(layers)
    counts = []
    for stage in range(2, 6):
        found = {int(m.group(1)) for n in names if (m := re.match(rf"conv{stage}_block(\d+)_", n))}
        counts.append(max(found, default=0))
    blocks = tuple(counts)
    if "post_bn" in names:
        family, depth = "resnet_v2", RESNET_DEPTHS.get(blocks)
        keras_name = f"ResNet{depth}V2"
        name, kwargs, mode = (f"preact_resnet{depth}",
                              dict(stem="imagenet_preact", downsample_at="last", conv_bias=True),
                              "tf")
    elif "pool2_conv" in names:
        family, depth = "densenet", DENSENET_DEPTHS.get(blocks)
        keras_name, name, kwargs, mode = f"DenseNet{depth}", f"densenet{depth}", {}, "torch"
    elif "conv2_block1_3_conv" in names:
        family, depth = "resnet", RESNET_DEPTHS.get(blocks)
        keras_name, name, kwargs, mode = (f"ResNet{depth}", f"resnet{depth}",
                                          dict(stride_in_1x1=True), "caffe")
    else:
        raise ValueError(
            "the Keras file is none of ResNet50/101/152, ResNet50V2/101V2/152V2, "
            "DenseNet121/169/201 (no conv2_block1_3_conv, post_bn or pool2_conv layer)"
        )
    if depth is None:
        raise ValueError(
            f"the Keras {family} has {blocks} blocks per stage, which is no Keras Applications "
            "model that reslab converts"
        )
    if "predictions" not in names:
        raise ValueError(
            f"the Keras {keras_name} was saved without its classifier (include_top=False); "
            "reslab converts whole classifiers: save the model built with include_top=True"
        )
    return KerasArchitecture(keras_name, family, blocks, name, kwargs, mode)


def _resnet_v1_map(blocks: tuple[int, ...]) -> list[tuple[str, str, str | None]]:
    """(reslab module, Keras layer, BN that absorbs the conv's bias) for the v1 ResNets."""
    rows = [("conv1", "conv1_conv", "bn1"), ("bn1", "conv1_bn", None)]
    for s, count in enumerate(blocks, 1):
        for u in range(count):
            t, k = f"layer{s}.{u}", f"conv{s + 1}_block{u + 1}"
            for i in (1, 2, 3):
                rows += [(f"{t}.conv{i}", f"{k}_{i}_conv", f"{t}.bn{i}"),
                         (f"{t}.bn{i}", f"{k}_{i}_bn", None)]
            if u == 0:
                rows += [(f"{t}.downsample.0", f"{k}_0_conv", f"{t}.downsample.1"),
                         (f"{t}.downsample.1", f"{k}_0_bn", None)]
    return rows + [("fc", "predictions", None)]


def _resnet_v2_map(blocks: tuple[int, ...]) -> list[tuple[str, str, str | None]]:
    rows = [("conv1", "conv1_conv", None)]
    for s, count in enumerate(blocks, 1):
        for u in range(count):
            t, k = f"layer{s}.{u}", f"conv{s + 1}_block{u + 1}"
            rows += [(f"{t}.bn1", f"{k}_preact_bn", None), (f"{t}.conv1", f"{k}_1_conv", None),
                     (f"{t}.bn2", f"{k}_1_bn", None), (f"{t}.conv2", f"{k}_2_conv", None),
                     (f"{t}.bn3", f"{k}_2_bn", None), (f"{t}.conv3", f"{k}_3_conv", None)]
            if u == 0:
                rows.append((f"{t}.downsample", f"{k}_0_conv", None))
    return rows + [("final_bn", "post_bn", None), ("fc", "predictions", None)]


def _densenet_map(blocks: tuple[int, ...]) -> list[tuple[str, str, str | None]]:
    rows = [("features.conv0", "conv1_conv", None), ("features.norm0", "conv1_bn", None)]
    for b, count in enumerate(blocks, 1):
        for layer in range(1, count + 1):
            t, k = f"features.denseblock{b}.denselayer{layer}", f"conv{b + 1}_block{layer}"
            rows += [(f"{t}.norm1", f"{k}_0_bn", None), (f"{t}.conv1", f"{k}_1_conv", None),
                     (f"{t}.norm2", f"{k}_1_bn", None), (f"{t}.conv2", f"{k}_2_conv", None)]
        if b < len(blocks):
            t, k = f"features.transition{b}", f"pool{b + 1}"
            rows += [(f"{t}.norm", f"{k}_bn", None), (f"{t}.conv", f"{k}_conv", None)]
    return rows + [("features.norm5", "bn", None), ("classifier", "predictions", None)]


MAPS = {"resnet": _resnet_v1_map, "resnet_v2": _resnet_v2_map, "densenet": _densenet_map}


def keras_to_state_dict(
    layers: dict[str, dict[str, np.ndarray]], arch: KerasArchitecture, *, bgr_to_rgb: bool
) -> dict[str, torch.Tensor]:
    """The reslab state_dict (without ``num_batches_tracked``) for the Keras layers."""
    state: dict[str, torch.Tensor] = {}
    rows = MAPS[arch.family](arch.blocks)
    folded_bias: dict[str, np.ndarray] = {}
    used = set()
    for module, layer, bias_into in rows:
        if layer not in layers:
            raise ValueError(f"the Keras {arch.keras_name} file lacks layer {layer!r}")
        w = layers[layer]
        used.add(layer)
        if "gamma" in w or "moving_mean" in w:  # BatchNormalization
            mean = w["moving_mean"].astype(np.float64)
            mean = mean - folded_bias.pop(module, 0.0)
            state[f"{module}.weight"] = _t(w["gamma"])
            state[f"{module}.bias"] = _t(w["beta"])
            state[f"{module}.running_mean"] = _t(mean)
            # PyTorch divides by sqrt(var + 1e-5); Keras by sqrt(var + 1.001e-5).
            state[f"{module}.running_var"] = _t(w["moving_variance"].astype(np.float64)
                                                + (KERAS_BN_EPS - 1e-5))
        elif w["kernel"].ndim == 4:  # Conv2D: (kh, kw, in, out) -> (out, in, kh, kw)
            kernel = w["kernel"].transpose(3, 2, 0, 1)
            if bgr_to_rgb and layer == "conv1_conv":
                kernel = kernel[:, ::-1]
            state[f"{module}.weight"] = _t(kernel)
            if "bias" in w:
                if bias_into is not None:
                    folded_bias[bias_into] = w["bias"].astype(np.float64)
                else:
                    state[f"{module}.bias"] = _t(w["bias"])
        else:  # Dense: (in, out) -> (out, in)
            state[f"{module}.weight"] = _t(w["kernel"].T)
            state[f"{module}.bias"] = _t(w["bias"])
    extra = sorted(set(layers) - used)
    if extra:
        raise ValueError(
            f"the Keras {arch.keras_name} file has layers with no reslab counterpart: "
            f"{', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}"
        )
    return state


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def from_keras(path: str | Path, model: str | None = None) -> Converted:
    """Convert a Keras Applications weight file to the matching reslab model (see module doc)."""
    layers = read_keras_weights(path)
    arch = detect_architecture(layers)
    if model is not None and model != arch.reslab_name:
        raise ValueError(
            f"{path} holds a Keras {arch.keras_name}, which converts to reslab {arch.reslab_name!r}, "
            f"not {model!r}; drop --model or pass --model {arch.reslab_name}"
        )
    first = layers["conv1_conv"]["kernel"]
    in_chans, num_classes = int(first.shape[2]), int(layers["predictions"]["kernel"].shape[1])
    rgb = arch.preprocessing == "caffe" and in_chans == 3
    state = keras_to_state_dict(layers, arch, bgr_to_rgb=rgb)
    kwargs = {**arch.model_kwargs, "num_classes": num_classes, "in_chans": in_chans}
    net = build_and_load(arch.reslab_name, kwargs, state, source=f"Keras {arch.keras_name}",
                         fill_missing=("num_batches_tracked",))
    return Converted(net, arch.reslab_name, kwargs, "keras", arch.keras_name,
                     PREPROCESSING[arch.preprocessing])
