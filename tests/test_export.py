"""Export (ONNX checked in onnxruntime, TorchScript, ExportedProgram), BatchNorm folding, and the
OpenVINO session."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import reslab
from reslab.checkpoint import save_model
from reslab.cli import main
from reslab.export import (
    ExportCheckError, OpenVINOSession, conv_bn_pairs, export_model, fold_batchnorm,
    onnxruntime_session,
)
from reslab.models.densenet import cifar_densenet
from reslab.models.resnet import SHORTCUT_VARIANTS, UNITS, ResNet, cifar_resnet


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def assert_same_function(a: nn.Module, b: nn.Module, size=(2, 3, 8, 8)) -> None:
    x = torch.randn(*size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max().item() <= 1e-4 * max(1.0, yb.abs().max().item())


# BNs left after folding a 3-unit CIFAR net (n = 1), by unit variant. A BN stays when it
# normalises a sum (after the addition, or the input of a pre-activation unit), or when the
# conv output it reads is also read by an identity shortcut.
LEFT = {
    ("original", "basic"): 0, ("original", "bottleneck"): 0,
    ("relu_before_add", "basic"): 0, ("relu_before_add", "bottleneck"): 0,
    ("relu_preact", "basic"): 0, ("relu_preact", "bottleneck"): 0,
    ("bn_after_add", "basic"): 3, ("bn_after_add", "bottleneck"): 3,
    # 3 unit-input BNs + final_bn; the bottleneck's first unit projects from the shared
    # pre-activation, so the stem conv feeds only that unit's BN and it is folded.
    ("full_preact", "basic"): 4, ("full_preact", "bottleneck"): 3,
}


def test_every_unit_variant_has_a_folding_case():
    assert {unit for unit, _ in LEFT} == set(UNITS)


@pytest.mark.parametrize("unit,block", sorted(LEFT))
def test_fold_batchnorm_is_exact_for_every_unit_variant(unit, block):
    model = randomize_bn(cifar_resnet(8 if block == "basic" else 11, block=block, unit=unit,
                                      shortcut="B"))
    folded = fold_batchnorm(model)
    assert n_bn(folded) == LEFT[unit, block]
    assert_same_function(folded, model)


@pytest.mark.parametrize("variant,shortcut", list(itertools.product(SHORTCUT_VARIANTS, ["A", "C"])))
def test_fold_batchnorm_is_exact_for_every_shortcut_variant(variant, shortcut):
    model = randomize_bn(cifar_resnet(8, shortcut=shortcut, shortcut_variant=variant))
    folded = fold_batchnorm(model)
    assert n_bn(folded) == 0
    assert_same_function(folded, model)


def test_fold_batchnorm_plain_net_with_bn_after_add_folds_everything():
    # Without a shortcut there is no addition: the last conv feeds its BN directly.
    model = randomize_bn(cifar_resnet(8, unit="bn_after_add", shortcut="none"))
    assert n_bn(fold_batchnorm(model)) == 0


def test_fold_batchnorm_keras_v2_layout_and_imagenet_stem():
    model = randomize_bn(ResNet((1, 1), block="bottleneck", widths=(8, 16), unit="full_preact",
                                stem="imagenet_preact", downsample_at="last", conv_bias=True))
    folded = fold_batchnorm(model, torch.randn(2, 3, 16, 16))
    # conv1→bn2 and conv2→bn3 in both units fold; unit-input BNs and final_bn stay.
    assert n_bn(folded) == 3
    assert_same_function(folded, model, (2, 3, 16, 16))


def test_fold_batchnorm_densenet_folds_only_the_bottleneck_convs():
    model = randomize_bn(cifar_densenet(16, bottleneck=True, compression=0.5, growth_rate=4))
    pairs = conv_bn_pairs(model, torch.randn(1, 3, 8, 8))
    # Two -B layers per block, three blocks: conv1 → norm2 inside each; every norm1 reads a
    # concatenation and the transition convs feed an average pool.
    assert len(pairs) == 6
    assert all(c.endswith(".conv1") and b.endswith(".norm2") for c, b in pairs)
    assert_same_function(fold_batchnorm(model), model)


def test_fold_batchnorm_highway_net_folds_the_stem_and_both_transform_convs():
    model = randomize_bn(reslab.create_model("highway20"))
    folded = fold_batchnorm(model)
    assert len(folded.folded_bn_pairs) == 1 + 9 * 2 and n_bn(folded) == 0
    assert_same_function(folded, model)


class SharedConvOutput(nn.Module):
    """bn(c) + c: the conv output is read twice, so folding the BN would change the second read."""

    def __init__(self, inplace_relu: bool = False) -> None:
        super().__init__()
        self.conv, self.bn, self.inplace_relu = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), inplace_relu

    def forward(self, x):
        c = self.conv(x)
        if self.inplace_relu:
            return self.bn(torch.relu_(c))
        return self.bn(c) + c


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_fold_batchnorm_leaves_a_bn_whose_conv_output_is_read_elsewhere(inplace_relu):
    model = randomize_bn(SharedConvOutput(inplace_relu))
    folded = fold_batchnorm(model, torch.randn(1, 3, 8, 8))
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert_same_function(folded, model, (2, 3, 8, 8))


def test_fold_batchnorm_verifies_its_result(monkeypatch):
    # Force the wrong decision the analysis avoids: the output check must catch it.
    monkeypatch.setattr("reslab.export.conv_bn_pairs", lambda model, x: [("conv", "bn")])
    with pytest.raises(RuntimeError, match="folding 1 conv→BN pairs changed the output"):
        fold_batchnorm(randomize_bn(SharedConvOutput()), torch.randn(1, 3, 8, 8))


def test_fold_batchnorm_returns_a_copy_and_adds_the_bias():
    model = randomize_bn(reslab.create_model("resnet20"))
    folded = fold_batchnorm(model)
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    assert len(folded.folded_bn_pairs) == 19 and ("conv1", "bn1") in folded.folded_bn_pairs


def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path):
    model = randomize_bn(reslab.create_model("resnet20"))
    r = export_model(model, tmp_path / "r20.onnx", format="onnx", dynamic_batch=True, fold_bn=True)
    assert r.format == "onnx" and r.input_size == (3, 32, 32) and r.folded_pairs == 19
    assert r.checked_batch_sizes == (1, 3) and r.checked_with.startswith("onnxruntime")
    assert r.max_abs_diff < 1e-4
    # Independently of the built-in check: another batch size, and no BatchNormalization node.
    session = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    x = torch.randn(5, 3, 32, 32)
    (y,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), atol=1e-4, rtol=1e-4)
    graph = onnx.load(str(r.path))
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    assert {p.key: p.value for p in graph.metadata_props}["model"] == "resnet20"


def test_cli_exports_a_model_file_to_onnx_beside_it(tmp_path, capsys):
    model = randomize_bn(reslab.create_model("resnet20", num_classes=4))
    save_model(tmp_path / "model.safetensors", model,
               {"model": "resnet20", "model_kwargs": {"num_classes": 4}, "image_size": [24, 24]})
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "input 1×3×24×24" in out and "max abs diff vs PyTorch" in out
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 24, 24]
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    meta = json.loads(props["reslab"])
    assert meta["model_kwargs"] == {"num_classes": 4}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_reloads_and_matches(tmp_path):
    model = randomize_bn(reslab.create_model("resnet20", unit="full_preact"))
    r = export_model(model, tmp_path / "m.pt", format="torchscript", input_size=(16, 16),
                     fold_bn=True)
    assert r.input_size == (3, 16, 16) and r.max_abs_diff < 1e-4
    loaded = torch.jit.load(str(r.path))
    assert_same_function(loaded, model, (3, 3, 16, 16))


def test_exported_program_of_a_feature_extractor_returns_every_stage(tmp_path):
    model = reslab.create_model("resnet20", features_only=True, out_indices=(1, 3))
    r = export_model(model, tmp_path / "f.pt2", format="exported-program", dynamic_batch=True,
                     input_size=(3, 32, 32))
    assert r.max_abs_diff < 1e-4 and r.checked_batch_sizes == (1, 3)
    feats = torch.export.load(str(r.path)).module()(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 32, 32), (2, 64, 8, 8)]


def test_onnxruntime_session_runs_torch_tensors_through_the_checked_export():
    model = randomize_bn(reslab.create_model("resnet20", num_classes=3))
    run = onnxruntime_session(model, (3, 16, 16))
    assert run.export_result.fold_bn and run.export_result.max_abs_diff < 1e-4
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    y = run(x)
    assert isinstance(y, torch.Tensor) and y.shape == (4, 3)
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("streams, batches", [(1, (1, 4)), (3, (7, 3, 1))])
def test_openvino_session_splits_a_batch_across_streams_exactly(streams, batches):
    # fp32 checks the conversion and the splitting bit-near exactly; 7 images on 3 streams run as
    # chunks of 3, 3 and 1 padded to 3, whose padding must not leak into the result.
    model = randomize_bn(reslab.create_model("resnet20", num_classes=3))
    run = OpenVINOSession(model, (3, 16, 16), precision="fp32", streams=streams)
    assert run.streams == streams and run.inference_precision == "fp32"
    for n in batches:
        x = torch.randn(n, 3, 16, 16)
        y = run(x)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (n, 3)
        with torch.no_grad():
            torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)
    assert set(run._requests) == {-(-n // min(streams, n)) for n in batches}


@pytest.mark.parametrize("name", ["densenet40_k12", "highway20", "preact_resnet18", "resnet9"])
def test_openvino_session_runs_every_family(name):
    # Concatenations (DenseNet), gates (Highway), pre-activation, ResNet-9's pooling: each
    # converted model must pass the fp32 check and split like the ResNets.
    model = reslab.create_model(name, num_classes=4)
    run = OpenVINOSession(model, (3, 32, 32), precision="fp32", streams=2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
    torch.testing.assert_close(run(x), ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


def test_openvino_session_in_bf16_and_for_a_feature_extractor():
    model = randomize_bn(reslab.create_model("resnet20", num_classes=3))
    run = OpenVINOSession(model, (3, 16, 16))  # bf16; OpenVINO's choice of streams
    assert run.streams >= 1 and run.inference_precision in ("bf16", "fp32")  # fp32 without bf16
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(run(x), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    features = reslab.create_model("resnet20", features_only=True, out_indices=(1, 3))
    feats = OpenVINOSession(features, (3, 32, 32), precision="fp32", streams=2)(torch.randn(3, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(3, 16, 32, 32), (3, 64, 8, 8)]


def test_openvino_session_errors(monkeypatch):
    model = reslab.create_model("resnet20", num_classes=3)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16; got 'int8'"):
        OpenVINOSession(model, (3, 16, 16), precision="int8")
    with pytest.raises(ValueError, match="streams must be >= 1"):
        OpenVINOSession(model, (3, 16, 16), streams=0)
    run = OpenVINOSession(model, (3, 16, 16), precision="fp32", streams=1)
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 3, 16, 16\) with N >= 1, "
                                         r"got \(2, 3, 32, 32\)"):
        run(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"with N >= 1, got \(0, 3, 16, 16\)"):
        run(torch.randn(0, 3, 16, 16))
    monkeypatch.setattr("reslab.export._max_diff", lambda out, ref: (0.5, 1.0))
    with pytest.raises(ExportCheckError, match="conversion differs from PyTorch by up to 0.5"):
        OpenVINOSession(model, (3, 16, 16), fold_bn=False)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'reslab\[openvino\]'"):
        OpenVINOSession(model, (3, 16, 16))


class Noisy(nn.Module):
    """Random in its forward: no export of it can reproduce the eager outputs."""

    def forward(self, x):
        return x + torch.rand_like(x)


def test_an_export_that_disagrees_with_pytorch_is_removed_and_reported(tmp_path):
    with pytest.raises(ExportCheckError, match="differs from PyTorch by up to .*the file was removed"):
        export_model(Noisy(), tmp_path / "n.pt", format="torchscript", input_size=(3, 4, 4))
    assert not (tmp_path / "n.pt").exists()


def test_export_needs_a_known_format_and_input_size(tmp_path):
    with pytest.raises(ValueError, match="format must be one of onnx, torchscript, exported-program"):
        export_model(nn.Identity(), tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match=r"pass input_size=\(C, H, W\)"):
        export_model(nn.Conv2d(3, 3, 1), tmp_path / "x.pt", format="torchscript")


def test_cli_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such checkpoint or run folder" in capsys.readouterr().err
