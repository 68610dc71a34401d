"""Export a model to ONNX, TorchScript or a `torch.export` ExportedProgram, checked against eager.

`export_model` writes the file atomically, loads it back with the runtime that will run it
(onnxruntime for ONNX, `torch.jit.load`, `torch.export.load`) and compares its outputs with the
eager PyTorch model on random inputs; the largest absolute difference is part of the result, and
an export that disagrees is deleted and reported as an error instead of being left behind.

`fold_batchnorm` folds every BatchNorm into the convolution in front of it for inference,
W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β (Ioffe & Szegedy 2015, Eq. (1) at inference).
Which pairs may be folded is not guessed from module names: one forward pass records which
tensors every operation reads, and a conv→BN pair is folded only when the BN's input *is* the
conv's output and nothing else reads that output. This finds the torchvision-style ``conv1→bn1``
pairs of the original unit, ``downsample = Sequential(conv, bn)``, ``conv_i → bn_{i+1}`` inside a
full pre-activation unit, and leaves alone a BN that normalises a sum (the unit variant with BN
after the addition) or a conv output that a shortcut also reads.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .checkpoint import atomic_path
from .extras import require

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CHECK_TOLERANCE = 1e-4  # how far a converted model may differ from PyTorch, relative to max|output|
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ExportCheckError(RuntimeError):
    """The exported file computes something other than the eager model."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how well the written file agrees with eager PyTorch."""

    path: Path
    format: str
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    fold_bn: bool
    folded_pairs: int
    max_abs_diff: float
    output_scale: float  # largest |output| of the eager model: what max_abs_diff compares with
    checked_batch_sizes: tuple[int, ...]
    checked_with: str
    size_bytes: int


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------


class _ReadRecorder(TorchFunctionMode):
    """Records, in order, the ids of the tensors every torch function reads, and who read them."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str | None, set[int]]] = []  # (BN it ran inside, tensor ids read)
        self.inside_norm: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Attribute getters (x.shape, x.ndim) look at metadata, not at the values.
        if getattr(func, "__name__", "") != "__get__":
            ids = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            owner = self.inside_norm[-1] if self.inside_norm else None
            self.reads.append((owner, ids))
        return func(*args, **kwargs)


def conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """Names of the (conv, BN) pairs of `model` that can be folded, found by one forward pass.

    A pair qualifies when, in eval mode, the BN's input is exactly the conv's output, each module
    runs once, and no operation other than the BN reads the conv's output (an in-place ReLU, a
    shortcut or a concatenation reading it would see a different tensor after folding).
    """
    names = {m: n for n, m in model.named_modules()}
    convs = {m for m in names if isinstance(m, CONVS) and not m.transposed}
    norms = {m for m in names if isinstance(m, NORMS) and m.track_running_stats}
    rec = _ReadRecorder()
    calls: dict[str, int] = {}
    conv_out: dict[str, tuple[int, torch.Tensor]] = {}  # conv -> (reads before it, its output)
    norm_in: dict[str, int] = {}  # BN -> id of its input

    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    def conv_hook(m, args, out):
        count(names[m])
        conv_out[names[m]] = (len(rec.reads), out)  # keeping `out` alive keeps its id unique

    def norm_pre(m, args):
        count(names[m])
        norm_in[names[m]] = id(args[0])
        rec.inside_norm.append(names[m])

    def norm_post(m, args, out):
        rec.inside_norm.pop()

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_pre_hook(norm_pre) for m in norms]
    handles += [m.register_forward_hook(norm_post) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), rec:
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    pairs = []
    for conv, (made, out) in conv_out.items():
        if calls[conv] != 1:
            continue
        readers = {owner for owner, ids in rec.reads[made:] if id(out) in ids}
        if len(readers) != 1 or None in readers:
            continue
        (norm,) = readers
        if calls[norm] == 1 and norm_in.get(norm) == id(out):
            pairs.append((conv, norm))
    return pairs


@torch.no_grad()
def _fold_pair(conv: nn.Module, bn: nn.Module) -> None:
    # In float64, so the folded weights round once instead of accumulating errors.
    scale = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    w = conv.weight
    view = (-1,) + (1,) * (w.ndim - 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = bias * scale + shift
    w.copy_((w.double() * scale.view(view)).to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias.to(w.dtype))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BatchNorm folded into its conv.

    Folded BNs are replaced by ``nn.Identity`` (same function at inference, fewer ops); BNs that
    cannot be folded exactly stay. The copy is checked against the original on `example_input`
    (default: a random batch at the model's smallest input size) and a mismatch raises.
    Only for inference: training the folded copy would train without normalisation.
    """
    model = copy.deepcopy(model).eval()
    x = _example_input(model) if example_input is None else example_input
    pairs = conv_bn_pairs(model, x)
    with torch.no_grad():
        reference = model(x)
    for conv, norm in pairs:
        _fold_pair(model.get_submodule(conv), model.get_submodule(norm))
        _replace(model, norm, nn.Identity())
    with torch.no_grad():
        diff, scale = _max_diff(model(x), reference)
    dtype = next(model.parameters(), torch.empty(0)).dtype
    # Loose enough for bf16 rounding, far below what a wrongly folded pair does (order 1).
    if diff > max(1e-3, 50 * torch.finfo(dtype).eps) * max(1.0, scale):
        raise RuntimeError(
            f"folding {len(pairs)} conv→BN pairs changed the output by {diff:.3g} "
            f"(output scale {scale:.3g}); this is a reslab bug, please report it"
        )
    model.folded_bn_pairs = pairs
    return model


def _example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    param = next(model.parameters(), None)
    size = getattr(model, "min_input_size", 32)
    chans = getattr(model, "in_chans", None)
    if chans is None:
        first = next((m for m in model.modules() if isinstance(m, CONVS)), None)
        chans = first.in_channels if first is not None else 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, chans, size, size, generator=gen)
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


def _max_diff(out: Any, ref: Any) -> tuple[float, float]:
    """Largest |out − ref| over every output tensor, and the largest |ref| (the output's scale)."""
    outs, refs = tree_leaves(out), tree_leaves(ref)
    if len(outs) != len(refs):
        raise ExportCheckError(f"the export returns {len(outs)} outputs, the model {len(refs)}")
    diff = scale = 0.0
    for o, r in zip(outs, refs):
        o, r = torch.as_tensor(o).float(), torch.as_tensor(r).float()
        if o.shape != r.shape:
            raise ExportCheckError(f"an output has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        diff = max(diff, (o - r).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return diff, scale


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_model(
    model_or_path: nn.Module | str | Path,
    path: str | Path,
    *,
    format: str = "onnx",
    input_size: Sequence[int] | None = None,
    dynamic_batch: bool = False,
    fold_bn: bool = False,
    opset: int | None = None,
    tolerance: float = CHECK_TOLERANCE,
) -> ExportResult:
    """Export a model (or a reslab model file / run folder) and check the file against eager.

    ``input_size``: (C, H, W) or (H, W) of the example input; by default the size stored in the
    model file, else the registered model's native size. ``dynamic_batch`` makes the batch
    dimension symbolic (checked at batch sizes 1 and 3); otherwise the file is for batch 1.
    ``fold_bn`` folds BatchNorm into the convs first (`fold_batchnorm`). The check fails when the
    largest difference exceeds ``tolerance`` × max(1, largest |output|).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    model, meta = _resolve(model_or_path)
    model = copy.deepcopy(model).cpu().float().eval()  # files are fp32, checked on the CPU
    size = _input_size(model, meta, input_size)
    batches = (1, 3) if dynamic_batch else (1,)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((2 if dynamic_batch else 1, *size), generator=gen)
    checks = [torch.randn((b, *size), generator=gen) for b in batches]
    with torch.no_grad():
        references = [model(x) for x in checks]
    exported, pairs = model, 0
    if fold_bn:
        exported = fold_batchnorm(model, example)
        pairs = len(exported.folded_bn_pairs)

    path = Path(path)
    writer = {"onnx": _write_onnx, "torchscript": _write_torchscript,
              "exported-program": _write_exported_program}[format]
    with atomic_path(path) as tmp:
        runner, checked_with = writer(exported, example, tmp, dynamic_batch, opset, meta)
    diff = scale = 0.0
    try:
        run = runner(path)
        for x, ref in zip(checks, references):
            d, s = _max_diff(run(x), ref)
            diff, scale = max(diff, d), max(scale, s)
        if not diff <= tolerance * max(1.0, scale):  # also catches NaN
            raise ExportCheckError(
                f"the {format} export differs from PyTorch by up to {diff:.3g} (output scale "
                f"{scale:.3g}, tolerance {tolerance:g} relative); the file was removed"
            )
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return ExportResult(path, format, size, dynamic_batch, fold_bn, pairs, diff, scale, batches,
                        checked_with, path.stat().st_size)


def onnxruntime_session(
    model: nn.Module, input_size: Sequence[int], *, fold_bn: bool = True, dynamic_batch: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` exported to ONNX (checked), as a function running it in onnxruntime on CPU.

    The returned function takes and returns torch tensors; its ``export_result`` attribute is the
    `ExportResult` of the check. The ONNX file lives in a temporary folder only while loading.
    """
    (ort,) = require("onnxruntime", extra="onnx", purpose="the ONNX Runtime backend")

    with tempfile.TemporaryDirectory() as folder:
        result = export_model(model, Path(folder) / "model.onnx", input_size=input_size,
                              dynamic_batch=dynamic_batch, fold_bn=fold_bn)
        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        (out, *rest) = session.run(None, {"input": x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(out) if not rest else [torch.from_numpy(o) for o in (out, *rest)]

    run.export_result = result
    return run


OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVINOSession:
    """`model` run by OpenVINO's CPU plugin, the batch split across its parallel streams.

    The model (BN folded first with ``fold_bn``) goes through `torch.export` into OpenVINO, and
    the conversion is checked in fp32 against PyTorch on two random images (`ExportCheckError`
    when it disagrees, as `export_model`'s check). Then it runs in ``precision`` (OpenVINO's
    inference-precision hint: bf16 uses AMX or AVX-512 bf16 where the CPU has them, and falls back
    to fp32 where it has not; ``inference_precision`` says what it chose).

    A call splits its batch into ``streams`` equal chunks (the last one padded) that run at once,
    each on its own OpenVINO stream (its own cores, in one process). ``streams=None`` takes
    OpenVINO's own choice for throughput (``PERFORMANCE_HINT=THROUGHPUT``: one stream per core on
    2 Xeon cores with AMX, where a ResNet-50 batch of 16 then runs as two chunks of 8; 0.99-1.04×
    the speed of one batch on both cores in interleaved comparisons, 2026-11-24); ``streams=1`` is
    one batch on all cores. Each chunk size is compiled once, on first use. Takes and returns torch
    tensors (fp32 NCHW in, fp32 out); not for calls from several threads at once.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], *, precision: str = "bf16",
                 streams: int | None = None, threads: int | None = None,
                 fold_bn: bool = True) -> None:
        (ov,) = require("openvino", extra="openvino", purpose="the OpenVINO backend")
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(OPENVINO_PRECISIONS)}; "
                             f"got {precision!r}")
        if streams is not None and streams < 1:
            raise ValueError(f"streams must be >= 1 (or None for OpenVINO's choice), got {streams}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        model = copy.deepcopy(model).cpu().float().eval()
        self.input_size = tuple(int(v) for v in input_size)
        x = torch.randn((2, *self.input_size), generator=torch.Generator().manual_seed(0))
        if fold_bn:
            model = fold_batchnorm(model, x)
        with torch.no_grad():
            reference = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's internal pytree notice
            program = torch.export.export(model, (x,), dynamic_shapes=_batch_dim(True))
            self._model = ov.convert_model(program)
        self._core = ov.Core()
        self.version = ov.__version__
        self.threads = threads or torch.get_num_threads()
        base = {"INFERENCE_NUM_THREADS": self.threads}

        check = self._core.compile_model(self._reshaped(2), "CPU",
                                         {**base, "INFERENCE_PRECISION_HINT": "f32"})
        diff, scale = _max_diff(self._outputs(check.create_infer_request().infer({0: x.numpy()})),
                                reference)
        if not diff <= CHECK_TOLERANCE * max(1.0, scale):
            raise ExportCheckError(
                f"OpenVINO {self.version}'s conversion differs from PyTorch by up to {diff:.3g} "
                f"(output scale {scale:.3g}) in fp32; run this model with another backend")

        self._config = {**base, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                        "PERFORMANCE_HINT": "THROUGHPUT"}
        self._requests: dict[int, list] = {}
        # One image compiled with the requested settings tells what OpenVINO chose.
        probe = self._core.compile_model(self._reshaped(1), "CPU", {
            **self._config, **({} if streams is None else {"NUM_STREAMS": streams})})
        self.streams = streams or int(probe.get_property("NUM_STREAMS"))
        self._config["NUM_STREAMS"] = self.streams
        chosen = probe.get_property("INFERENCE_PRECISION_HINT")
        names = {v: k for k, v in OPENVINO_PRECISIONS.items()}
        self.inference_precision = names.get(chosen.get_type_name(), chosen.get_type_name())

    def _reshaped(self, batch: int):
        m = self._model.clone()
        m.reshape([batch, *self.input_size])
        return m

    def _compiled(self, batch: int) -> list:
        """One infer request per stream of the model compiled for chunks of `batch` images."""
        if batch not in self._requests:
            compiled = self._core.compile_model(self._reshaped(batch), "CPU", self._config)
            self._requests[batch] = [compiled.create_infer_request() for _ in range(self.streams)]
        return self._requests[batch]

    @staticmethod
    def _outputs(result) -> list:
        return [result[key] for key in result.keys()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_size or len(x) == 0:
            shape = ", ".join(map(str, self.input_size))
            raise ValueError(f"expected a batch of shape (N, {shape}) with N >= 1, got "
                             f"{tuple(x.shape)}; the session was made for that input size")
        n = len(x)
        x = x.detach().cpu().float().contiguous()
        size = -(-n // min(self.streams, n))  # ceil: at most `streams` chunks of equal size
        chunks = list(x.split(size))
        if len(chunks[-1]) < size:
            chunks[-1] = torch.cat([chunks[-1], chunks[-1].new_zeros(size - len(chunks[-1]),
                                                                     *self.input_size)])
        requests = self._compiled(size)[:len(chunks)]
        for request, chunk in zip(requests, chunks):
            request.start_async({0: chunk.numpy()}, share_inputs=True)
        for request in requests:
            request.wait()
        outs = [torch.from_numpy(np.concatenate([r.get_output_tensor(i).data for r in requests])[:n])
                for i in range(len(requests[0].model_outputs))]
        return outs[0] if len(outs) == 1 else outs


def default_export_path(source: str | Path, format: str) -> Path:
    """Beside the model file (or inside the run folder): ``model.onnx``, ``model.pt2``, …"""
    source = Path(source)
    base = source / "model" if source.is_dir() else source.with_suffix("")
    return base.with_name(base.name + SUFFIXES[format])


def _resolve(model_or_path) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(model_or_path, nn.Module):
        return model_or_path, {}
    from .checkpoint import load_model

    return load_model(model_or_path)


def _input_size(model: nn.Module, meta: dict, input_size) -> tuple[int, int, int]:
    chans = getattr(model, "in_chans", 3)
    if input_size is None and meta.get("image_size"):
        input_size = meta["image_size"]
    if input_size is None and getattr(model, "reslab_name", None):
        from .models.registry import _spec

        input_size = _spec(model.reslab_name).input_size[1:]
    if input_size is None:
        raise ValueError("cannot tell the input size of this model; pass input_size=(C, H, W)")
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        size = (chans, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) or (H, W) with positive sizes; got {input_size}")
    return size


def _output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return ["logits"]
    return [f"features{i}" for i in range(len(tree_leaves(out)))]


def _batch_dim(dynamic: bool):
    # min=1: the example batch is 2 so that export does not specialise the size-1 case.
    return ({0: torch.export.Dim("batch", min=1)},) if dynamic else None


def _write_onnx(model, x, tmp: Path, dynamic: bool, opset: int | None, meta: dict):
    # onnxscript: the exporter needs it; onnxruntime: checks what it wrote
    ort, _ = require("onnxruntime", "onnxscript", extra="onnx", purpose="ONNX export")

    kwargs = {"opset_version": opset} if opset else {}
    # The exporter logs that torchvision's detection ops are unavailable (reslab uses none) and
    # emits an internal pytree FutureWarning; neither concerns the user.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model, (x,), None, dynamo=True, dynamic_shapes=_batch_dim(dynamic),
                input_names=["input"], output_names=_output_names(model, x), verbose=False,
                **kwargs,
            )
    finally:
        registration.setLevel(level)
    props = program.model.metadata_props
    props["reslab"] = json.dumps(meta)
    if getattr(model, "reslab_name", None):
        props["model"] = model.reslab_name
    program.save(str(tmp))

    def runner(path: Path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"input": x.numpy()})

    return runner, f"onnxruntime {ort.__version__}"


def _write_torchscript(model, x, tmp: Path, dynamic: bool, opset, meta: dict):
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still the format many C++ deployments load;
        # the input-shape checks read shapes as Python values, which the tracer warns about.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"reslab.json": json.dumps(meta)})

    def runner(path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path))
        return lambda x: loaded(x)

    return runner, "torch.jit.load"


def _write_exported_program(model, x, tmp: Path, dynamic: bool, opset, meta: dict):
    program = torch.export.export(model, (x,), dynamic_shapes=_batch_dim(dynamic))
    with open(tmp, "wb") as f:  # a file object: the temporary name does not end in .pt2
        torch.export.save(program, f, extra_files={"reslab.json": json.dumps(meta)})

    def runner(path: Path):
        with open(path, "rb") as f:  # a file object loads whatever the file is called
            loaded = torch.export.load(f).module()
        return lambda x: loaded(x)

    return runner, "torch.export.load"
