"""`reslab bench`: structure and consistency of its results (never timings), the plain baseline's
equivalence with reslab's models, and the fp32/bf16 agreement check on a trained model."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from reslab import create_model
from reslab.bench import (
    agreement, as_conv1x1, available_backends, baseline_for, bench_backends, bench_infer,
    bench_train, fast_path, matmul_peak, matmul_rates, _interleaved,
)
from reslab.cli import main

TINY = dict(warmup=0, repeats=2, iters=1, peak_n=64)


@pytest.mark.parametrize("name, size", [("resnet20", 32), ("resnet18", 64), ("resnet50", 64)])
def test_baseline_computes_the_same_function(name, size):
    torch.manual_seed(0)
    model = create_model(name).eval()
    base = baseline_for(model).eval()
    assert sum(p.numel() for p in base.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), rtol=1e-5, atol=1e-5)


def test_baseline_refuses_models_it_cannot_express():
    with pytest.raises(ValueError, match="original unit and shortcut A or B"):
        baseline_for(create_model("preact_resnet110"))


def test_matmul_peak_is_the_better_of_two_libraries():
    rates = matmul_rates(torch.float32, n=64, repeats=2)
    assert set(rates) == {"matmul", "conv1x1"} and min(rates.values()) > 0
    assert 0 < matmul_peak(torch.float32, n=64, repeats=2)


def test_the_peak_convolution_is_the_same_matmul():
    a, b = torch.randn(48, 32, dtype=torch.float64), torch.randn(32, 40, dtype=torch.float64)
    image, weight = as_conv1x1(a, b)
    assert image.shape == (1, 32, 1, 48) and weight.shape == (40, 32, 1, 1)
    torch.testing.assert_close(F.conv2d(image, weight)[0, :, 0, :].t(), a @ b)


def test_repeats_are_interleaved_and_rated_in_their_own_units():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("baseline", "reslab", "bf16 matmul")}
    m = _interleaved(fns, {"baseline": 4, "reslab": 4, "bf16 matmul": 2e9}, warmup=1, repeats=3,
                     iters=2, device="cpu")
    # warm-up once each, then A A B B C C per repeat: every measurement spans the same minutes
    assert calls == ["baseline", "reslab", "bf16 matmul"] + 3 * [
        "baseline", "baseline", "reslab", "reslab", "bf16 matmul", "bf16 matmul"]
    assert all(len(v.repeats) == 3 for v in m.values())
    assert m["bf16 matmul"].images_per_sec / m["reslab"].images_per_sec > 1e5  # FLOPs, not images


def test_every_timed_block_follows_an_untimed_call_of_its_own(monkeypatch):
    import reslab.bench as bench

    seen = {}

    def spy(fns, per_call, *, settle, **kw):
        seen.update(settle)
        return _interleaved(fns, per_call, settle=settle, **kw)

    monkeypatch.setattr(bench, "_interleaved", spy)
    bench._measure({"baseline": lambda: None, "torch": lambda: None}, 2, peak_n=64, device="cpu",
                   warmup=0, repeats=1, iters=1)
    assert seen == dict.fromkeys(["baseline", "torch", "fp32 matmul", "fp32 conv1x1",
                                  "bf16 matmul", "bf16 conv1x1"], 1)


def test_bench_train_result_is_consistent():
    r = bench_train("resnet20", batch=4, **TINY)
    assert r.mode == "train" and r.batch == 4 and r.input_size == (3, 32, 32)
    # stem 442,368 + stage 1 6×2,359,296 + stages 2, 3 each 1,179,648 + 5×2,359,296 + fc 640
    assert r.macs_per_image == 40_551_040
    assert len(r.baseline.repeats) == len(r.reslab.repeats) == 2
    assert r.baseline.spread[0] <= r.baseline.images_per_sec <= r.baseline.spread[1]
    assert r.speedup == pytest.approx(r.reslab.images_per_sec / r.baseline.images_per_sec)
    assert r.achieved_flops == pytest.approx(6 * r.macs_per_image * r.reslab.images_per_sec)
    assert r.fraction_of_peak == pytest.approx(r.achieved_flops / r.peak_flops["bf16"])
    for precision, rates in r.peak_detail.items():
        assert r.peak_flops[precision] == max(rates.values())
    assert r.settings["allocator"] == "system"
    for m in (r.baseline, r.reslab):  # counted per timed call (Linux and macOS count them)
        assert m.page_faults_per_call is None or m.page_faults_per_call >= 0


def test_bench_infer_checks_the_fast_path_against_the_baseline():
    r = bench_infer("resnet20", batch=2, **TINY)
    assert r.checks["baseline_equals_reslab_fp32"] is True
    assert 0 <= r.checks["random_input_top1_agreement"] <= 1
    assert r.achieved_flops == pytest.approx(2 * r.macs_per_image * r.reslab.images_per_sec)
    r32 = bench_infer("resnet20", batch=2, precision="fp32", **TINY)
    assert r32.fraction_of_peak == pytest.approx(r32.achieved_flops / r32.peak_flops["fp32"])
    assert r32.checks["max_abs_logit_diff"] < 1e-3  # BN folding alone changes only rounding


def test_bench_infer_with_openvino_says_what_it_ran():
    r = bench_infer("resnet20", batch=3, backend="openvino", streams=2, **TINY)
    s = r.settings
    assert s["backend"] == "openvino" and s["streams"] == 2 and s["openvino"]
    assert s["inference_precision"] in ("bf16", "fp32")  # fp32 on a CPU without bf16
    assert r.checks["baseline_equals_reslab_fp32"] is True
    assert r.checks["random_input_top1_agreement"] == 1.0 or s["inference_precision"] == "bf16"
    r32 = bench_infer("resnet20", batch=3, backend="openvino", precision="fp32", **TINY)
    assert r32.settings["inference_precision"] == "fp32" and r32.settings["streams"] >= 1
    assert r32.checks["max_abs_logit_diff"] < 1e-3
    assert r32.fraction_of_peak == pytest.approx(r32.achieved_flops / r32.peak_flops["fp32"])


def test_bench_infer_with_onnxruntime_is_measured_against_the_fp32_peak():
    # ONNX Runtime runs the fp32 export: asked for bf16, it says so and uses the fp32 peak.
    r = bench_infer("resnet20", batch=2, backend="onnxruntime", **TINY)
    assert r.settings["precision"] == "bf16" and r.settings["inference_precision"] == "fp32"
    assert r.fraction_of_peak == pytest.approx(r.achieved_flops / r.peak_flops["fp32"])
    assert r.checks["max_abs_logit_diff"] < 1e-3


def test_backends_are_timed_side_by_side_against_one_baseline_and_peak():
    rs = bench_backends("resnet20", backends=("openvino", "torch", "onnxruntime"), batch=3,
                        precision="bf16", compile=False, streams=2, **TINY)
    assert [r.settings["backend"] for r in rs] == ["openvino", "torch", "onnxruntime"]
    assert all(r.baseline == rs[0].baseline and r.peak_flops == rs[0].peak_flops for r in rs)
    ov, pt, ort = rs
    assert ov.settings["streams"] == 2 and pt.settings["streams"] is None  # streams: OpenVINO's
    assert ort.settings["streams"] is None and ort.settings["inference_precision"] == "fp32"
    for r in rs:
        assert r.reslab.label == "reslab" and len(r.reslab.repeats) == TINY["repeats"]
        assert r.speedup == pytest.approx(r.reslab.images_per_sec / r.baseline.images_per_sec)
        assert r.checks["baseline_equals_reslab_fp32"] is True
    assert pt.fraction_of_peak == pytest.approx(pt.achieved_flops / pt.peak_flops["bf16"])
    assert ort.fraction_of_peak == pytest.approx(ort.achieved_flops / ort.peak_flops["fp32"])
    assert ort.checks["max_abs_logit_diff"] < 1e-3


def test_available_backends():
    assert available_backends("cpu") == ("torch", "onnxruntime", "openvino")  # the dev extras
    assert available_backends("cuda") == ("torch",)  # the others are CPU runtimes


@pytest.mark.parametrize("kwargs, message", [
    (dict(backends=()), "backends is empty; name at least one of torch, onnxruntime, openvino"),
    (dict(backends=("torch", "torch")), "each backend once, please; got torch, torch"),
    (dict(backends=("torch", "tvm")), "backend must be one of torch, onnxruntime, openvino; got 'tvm'"),
    (dict(backends=("onnxruntime",), compile=True), "compile is torch.compile, for backend='torch'"),
    (dict(backends=("torch",), streams=2), "streams split a batch across OpenVINO's streams"),
])
def test_bench_backends_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench_backends("resnet20", batch=2, **kwargs, **TINY)


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="tensorrt"), "backend must be one of torch, onnxruntime, openvino; got 'tensorrt'"),
    (dict(streams=2), "streams split a batch across OpenVINO's streams; use backend='openvino'"),
    (dict(backend="openvino", compile=True),
     "compile is torch.compile, for backend='torch'; the openvino backend compiles the model itself"),
])
def test_fast_path_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fast_path(create_model("resnet20"), (3, 32, 32), **kwargs)


def test_cli_json_output(capsys):
    assert main(["bench", "infer", "--model", "resnet20", "--batch", "2", "--repeats", "1",
                 "--iters", "1", "--warmup", "0", "--peak-size", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"baseline", "reslab", "speedup", "peak_flops", "fraction_of_peak", "checks"} <= set(doc)
    assert doc["model"] == "resnet20" and doc["settings"]["precision"] == "bf16"


def test_cli_names_the_fastest_of_several_backends(capsys):
    argv = ["bench", "infer", "--model", "resnet20", "--batch", "2", "--repeats", "1", "--iters",
            "1", "--warmup", "0", "--peak-size", "64"]
    assert main([*argv, "--backend", "torch,onnxruntime", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rates = {r["settings"]["backend"]: r["reslab"]["images_per_sec"] for r in doc["results"]}
    assert list(rates) == ["torch", "onnxruntime"] and doc["fastest"] == max(rates, key=rates.get)
    assert main([*argv, "--backend", "all"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fastest here: --backend (torch|onnxruntime|openvino)\n", out)
    for b in ("torch", "onnxruntime", "openvino"):
        assert f"check {b} random_input_top1_agreement" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "train", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["bench", "train", "--backend", "openvino"],
     "--backend and --streams apply to `reslab bench infer`; training runs in PyTorch"),
    (["bench", "infer", "--backend", "openvino", "--compile", "--peak-size", "64"],
     "compile is torch.compile, for backend='torch'"),
    (["bench", "train", "--checkpoint", "x"], "--checkpoint applies to `reslab bench infer`"),
    (["bench", "infer", "--model", "preact_resnet110", "--peak-size", "64"],
     "original unit and shortcut A or B"),
    (["bench", "infer", "--backend", "openvino", "--streams", "0"], "--streams must be >= 1, got 0"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ("openvino,tvm", "unknown backend 'tvm': choose from torch, onnxruntime, openvino, a "
                     "comma-separated list of them, or all"),
    ("torch,torch", "each backend once, please; got 'torch,torch'"),
])
def test_cli_refuses_bad_backends(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "infer", "--backend", value])
    assert e.value.code == 2
    assert f"argument --backend: {message}" in capsys.readouterr().err


def test_cli_refuses_an_unknown_allocator(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "infer", "--allocator", "jemalloc"])
    assert e.value.code == 2
    assert "invalid choice: 'jemalloc' (choose from 'system', 'tuned')" in capsys.readouterr().err


def test_bench_refuses_an_unknown_allocator():
    with pytest.raises(ValueError, match="allocator must be one of system, tuned; got 'jemalloc'"):
        bench_train("resnet20", batch=2, allocator="jemalloc", **TINY)


def test_agreement_on_a_trained_model(tmp_path):
    from reslab.train import TrainConfig, evaluate, train

    run = tmp_path / "run"
    train(TrainConfig.from_recipe("default", model="resnet20", data="digits", epochs=1,
                                  train_limit=256, out=str(run), progress="none"))
    a = agreement(str(run), dict(precision="fp32", channels_last=True, fold_bn=True))
    ref = evaluate(str(run))
    assert a.images == ref.count == 360
    assert a.fp32_top1_error == pytest.approx(ref.top1_error)
    assert a.top1_agreement == 1.0  # fp32 BN folding does not move any prediction here
    b = agreement(str(run), dict(precision="bf16", channels_last=True, fold_bn=True))
    assert b.fp32_top1_error == a.fp32_top1_error and 0.9 <= b.top1_agreement <= 1
    # The compiled path (frozen weights, fused post-ops) is what `bench infer --compile` times.
    c = agreement(str(run), dict(precision="fp32", channels_last=True, fold_bn=True, compile=True))
    assert c.top1_agreement == 1.0 and c.fast_top1_error == a.fast_top1_error
    # `bench infer --backend openvino --checkpoint` checks the OpenVINO session itself.
    d = agreement(str(run), dict(precision="fp32", backend="openvino", streams=2))
    assert d.top1_agreement == 1.0 and d.fast_top1_error == a.fast_top1_error


def test_cli_benchmarks_a_checkpoints_own_architecture(tmp_path, capsys):
    from reslab.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig.from_recipe("default", model="resnet20", data="digits", epochs=1,
                                  train_limit=128, out=str(run), progress="none",
                                  model_kwargs={"shortcut": "B"}))
    assert main(["bench", "infer", "--checkpoint", str(run), "--batch", "2", "--repeats", "1",
                 "--iters", "1", "--warmup", "0", "--peak-size", "64", "--backend",
                 "torch,openvino", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for r in doc["results"]:
        # the trained model's options (shortcut B: projections, more parameters and MACs)
        kw = r["settings"]["model_kwargs"]
        assert (kw["shortcut"], kw["in_chans"], kw["num_classes"]) == ("B", 1, 10)
        assert r["input_size"] == [1, 8, 8]
        assert r["macs_per_image"] == reslab_macs("resnet20", (1, 8, 8), shortcut="B", in_chans=1)
        assert r["checks"]["test_set"]["images"] == 360
        assert r["checks"]["test_set"]["top1_agreement"] >= 0.9


def reslab_macs(name, size, **kwargs):
    from reslab import complexity

    return complexity(create_model(name, **kwargs), size).macs
