"""Weight conversion: torchvision state_dicts and Keras Applications files, checked against Keras."""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; the Makefile sets it too

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from keras.applications import imagenet_utils  # noqa: E402
from torch import nn  # noqa: E402

import reslab  # noqa: E402
from reslab.checkpoint import load_model  # noqa: E402
from reslab.cli import main  # noqa: E402
from reslab.convert import convert, from_keras  # noqa: E402
from reslab.convert.keras import (  # noqa: E402
    _densenet_map, _resnet_v1_map, _resnet_v2_map, detect_architecture, read_keras_weights,
)
from reslab.convert.torchvision import guess_model  # noqa: E402

# Keras's get_weights() trips a NumPy 2 deprecation inside Keras itself, thousands of times.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state_dict with every float tensor randomised (BN variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else (
                torch.randn(v.shape, generator=g) * 0.1)
        out[k] = v
    return out


def test_torchvision_resnet_pth_converts_to_an_identical_reslab_model(tmp_path, capsys):
    source = reslab.create_model("resnet18", num_classes=5)
    source.load_state_dict(random_state(source))
    torch.save(source.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert main(["convert", str(tmp_path / "resnet18-f37072fd.pth"),
                 "--to", str(tmp_path / "r18.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "resnet18, 5 classes" in out and "preprocessing (torchvision)" in out
    model, meta = load_model(tmp_path / "r18.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source.eval()(x), rtol=0, atol=0)
    assert meta["model"] == "resnet18" and meta["model_kwargs"]["num_classes"] == 5
    card = json.loads((tmp_path / "r18.json").read_text())
    assert card["weights"]["sha256"] == sha256(tmp_path / "r18.safetensors")
    assert f"weights sha256 {card['weights']['sha256']}" in out
    assert card["source"] == {"format": "torchvision", "architecture": "torchvision resnet18",
                              "file": "resnet18-f37072fd.pth",
                              "sha256": sha256(tmp_path / "resnet18-f37072fd.pth")}
    assert card["num_classes"] == 5 and card["params"] == sum(p.numel() for p in source.parameters())
    assert card["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert card["converted_at"].endswith("+00:00")


def test_legacy_densenet_keys_are_remapped(tmp_path):
    source = reslab.create_model("densenet121", num_classes=3)
    source.load_state_dict(random_state(source, seed=1))
    legacy = {}
    for k, v in source.state_dict().items():
        for name in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                k = k.replace(f".{name}{i}.", f".{name}.{i}.") if ".denselayer" in k else k
        legacy[k] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "densenet121.pth")
    r = convert(tmp_path / "densenet121.pth", tmp_path / "d121.safetensors")
    model, _ = load_model(r.path)
    converted = model.state_dict()
    assert converted.keys() == source.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                  "densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_architecture_is_recognised_from_the_keys(name):
    with torch.device("meta"):
        state = reslab.create_model(name).state_dict()
    assert guess_model(state) == name


class NotATensor:
    pass


def test_a_pickle_that_needs_code_is_refused(tmp_path, capsys):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), "--to", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "could not be read as a weights-only PyTorch file" in err and "never unpickles code" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_checkpoint_for_another_model_names_the_mismatch(tmp_path):
    torch.save(reslab.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"do not fit reslab 'resnet34'.*missing layer1\.2"):
        convert(tmp_path / "r18.pth", tmp_path / "x.safetensors", model="resnet34")


def test_destination_and_source_kind_are_checked(tmp_path):
    (tmp_path / "w.bin2").write_bytes(b"")
    with pytest.raises(ValueError, match="pass --from torchvision"):
        convert(tmp_path / "w.bin2", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"name it \*\.safetensors"):
        convert(tmp_path / "w.bin2", tmp_path / "x.pth")


# ---------------------------------------------------------------------------------------------
# Keras Applications, compared with Keras itself (torch backend, inference mode)
# ---------------------------------------------------------------------------------------------


def keras_model(name: str, size: int = 32):
    """A Keras Application with random weights, random BN statistics and random biases."""
    km = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                           classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in km.layers:
        w = layer.get_weights()
        if len(w) == 4:  # BatchNormalization: gamma, beta, moving mean, moving variance
            n = w[0].shape
            w = [rng.uniform(0.5, 1.5, n), rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n),
                 rng.uniform(0.5, 2.0, n)]
        elif len(w) == 2:  # conv / dense with bias
            w = [w[0], rng.uniform(-0.5, 0.5, w[1].shape)]
        if w:
            layer.set_weights([np.asarray(a, np.float32) for a in w])
    return km


def compare_with_keras(km, model: nn.Module, meta: dict, mode: str, size: int = 32) -> float:
    """Max |Keras − reslab| relative to the logits' scale, each fed its own preprocessing."""
    images = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    y_keras = np.asarray(km(imagenet_utils.preprocess_input(images.copy(), mode=mode),
                            training=False).detach().cpu())
    x = torch.from_numpy(images / 255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        y = model.eval()(x.float()).numpy()
    return float(np.abs(y - y_keras).max() / max(1.0, np.abs(y_keras).max()))


def test_keras_resnet50_weights_h5_matches_keras(tmp_path):
    km = keras_model("ResNet50")
    km.save_weights(tmp_path / "resnet50.weights.h5")
    r = convert(tmp_path / "resnet50.weights.h5", tmp_path / "resnet50.safetensors")
    model, meta = load_model(r.path)
    assert meta["model"] == "resnet50"
    assert meta["model_kwargs"] == {"stride_in_1x1": True, "num_classes": 10, "in_chans": 3}
    # Keras's conv biases were folded into the BN means: the reslab model has none.
    assert model.conv1.bias is None and model.layer1[0].conv1.bias is None
    assert compare_with_keras(km, model, meta, "caffe") < 1e-5
    card = json.loads(r.card_path.read_text())
    assert card["preprocessing"]["name"] == "keras-caffe" and card["source"]["architecture"] == "ResNet50"
    assert card["preprocessing"]["std"] == [1 / 255] * 3


def test_keras_resnet50v2_keras_archive_matches_keras(tmp_path):
    km = keras_model("ResNet50V2")
    km.save(tmp_path / "resnet50v2.keras")
    r = convert(tmp_path / "resnet50v2.keras", tmp_path / "r50v2.safetensors")
    model, meta = load_model(r.path)
    assert meta["model"] == "preact_resnet50" and meta["preprocessing"] == "keras-tf"
    # Same parameters as Keras: biases exactly where Keras has them.
    assert sum(p.numel() for p in model.parameters()) == km.count_params() - sum(
        w.size for l in km.layers if type(l).__name__ == "BatchNormalization" for w in l.get_weights()[2:])
    assert compare_with_keras(km, model, meta, "tf") < 1e-5
    # The stem's zero padding is needed: PyTorch's -inf max-pool padding differs at the borders.
    model.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    assert compare_with_keras(km, model, meta, "tf") > 1e-4


def test_keras_densenet121_legacy_h5_matches_keras(tmp_path):
    km = keras_model("DenseNet121")
    km.save(tmp_path / "densenet121.h5")  # the legacy HDF5 layout keras.io's weight files use
    r = convert(tmp_path / "densenet121.h5", tmp_path / "d121.safetensors")
    model, meta = load_model(r.path)
    assert meta["model"] == "densenet121" and meta["preprocessing"] == "keras-torch"
    assert compare_with_keras(km, model, meta, "torch") < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", [("ResNet152", "caffe"), ("ResNet152V2", "tf"),
                                       ("DenseNet201", "torch")])
def test_deepest_keras_model_of_each_family_matches_keras(tmp_path, name, mode):
    km = keras_model(name)
    km.save_weights(tmp_path / f"{name}.weights.h5")
    r = convert(tmp_path / f"{name}.weights.h5", tmp_path / f"{name}.safetensors")
    model, meta = load_model(r.path)
    assert compare_with_keras(km, model, meta, mode) < 1e-5


def test_keras_applications_era_layer_names_are_read(tmp_path):
    """keras.io's files: Keras 2 HDF5, 'conv1/conv'-style names, 'kernel:0', 'fc1000'."""
    import h5py

    bn_vars = ("gamma", "beta", "moving_mean", "moving_variance")
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv1/conv", b"conv1/bn", b"fc1000"]
        f["conv1/conv/conv1/conv/kernel:0"] = np.ones((7, 7, 3, 64), np.float32)
        f["conv1/conv"].attrs["weight_names"] = [b"conv1/conv/kernel:0"]
        for v in bn_vars:
            f[f"conv1/bn/conv1/bn/{v}:0"] = np.zeros(64, np.float32)
        f["conv1/bn"].attrs["weight_names"] = [f"conv1/bn/{v}:0".encode() for v in bn_vars]
        f["fc1000/fc1000/kernel:0"] = np.zeros((1024, 1000), np.float32)
        f["fc1000/fc1000/bias:0"] = np.zeros(1000, np.float32)
        f["fc1000"].attrs["weight_names"] = [b"fc1000/kernel:0", b"fc1000/bias:0"]
    layers = read_keras_weights(tmp_path / "old.h5")
    assert set(layers) == {"conv1_conv", "conv1_bn", "predictions"}
    assert layers["conv1_conv"]["kernel"].shape == (7, 7, 3, 64)
    assert set(layers["conv1_bn"]) == set(bn_vars)
    assert set(layers["predictions"]) == {"kernel", "bias"}


# Every Keras model reslab converts: its family, blocks per stage, the reslab model and how many
# layers with weights Keras builds (counted from keras.applications 3.15: ResNet50 has 53 convs,
# 53 BNs and the dense layer).
R50, R101, R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
KERAS_MODELS = {
    "ResNet50": ("resnet", R50, "resnet50", 107),
    "ResNet101": ("resnet", R101, "resnet101", 209),
    "ResNet152": ("resnet", R152, "resnet152", 311),
    "ResNet50V2": ("resnet_v2", R50, "preact_resnet50", 103),
    "ResNet101V2": ("resnet_v2", R101, "preact_resnet101", 205),
    "ResNet152V2": ("resnet_v2", R152, "preact_resnet152", 307),
    "DenseNet121": ("densenet", (6, 12, 24, 16), "densenet121", 242),
    "DenseNet169": ("densenet", (6, 12, 32, 32), "densenet169", 338),
    "DenseNet201": ("densenet", (6, 12, 48, 32), "densenet201", 402),
}
MAPS = {"resnet": _resnet_v1_map, "resnet_v2": _resnet_v2_map, "densenet": _densenet_map}


@pytest.mark.parametrize("keras_name", sorted(KERAS_MODELS))
def test_every_keras_layer_maps_onto_every_reslab_parameter(keras_name):
    """The deeper models without running Keras: detection, and a one-to-one layer mapping."""
    family, blocks, reslab_name, n_layers = KERAS_MODELS[keras_name]
    rows = MAPS[family](blocks)
    assert len(rows) == n_layers and len({k for _, k, _ in rows}) == n_layers
    arch = detect_architecture({k: {} for _, k, _ in rows})
    assert (arch.keras_name, arch.reslab_name, arch.blocks) == (keras_name, reslab_name, blocks)
    with torch.device("meta"):
        model = reslab.create_model(reslab_name, **arch.model_kwargs)
    with_params = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert {m for m, _, _ in rows} == with_params


def test_keras_file_for_another_model_is_refused_with_the_right_name(tmp_path):
    keras_model("ResNet50V2").save_weights(tmp_path / "v2.weights.h5")
    with pytest.raises(ValueError, match=r"Keras ResNet50V2.*'preact_resnet50'.*--model preact_resnet50"):
        from_keras(tmp_path / "v2.weights.h5", model="resnet50")
