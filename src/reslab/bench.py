"""`reslab bench`: reslab's fast paths against a plain PyTorch baseline and the machine's peak.

Every run measures three things in the same process, so the ratios are side by side:

1. the **baseline**: the same architecture written plainly, as a user would (`PlainResNet` below,
   torchvision-style code), run eager in fp32 and NCHW; it loads the very weights of the reslab
   model (the module names are the same), and the two are checked to compute the same function;
2. **reslab**: the model through its fast path (channels_last, bf16, BN folding, compile,
   reslab's fused BN-ReLU kernel and the multi-tensor optimizer for training; for inference
   also ONNX Runtime or OpenVINO, see `fast_path`);
3. the machine's **peak**: the FLOP/s of a large matmul in fp32 and bf16, the better of
   `torch.matmul` and the same matmul as a 1×1 convolution (`matmul_rates`).

Baseline, reslab and peak repeats are interleaved (A B C A B C ...) so that drifting machine
speed hits them all: the ratios and the fraction of the peak compare measurements taken together.
Each measurement also counts the process's minor page faults per call: an eager model run with
glibc's default allocator maps and zeroes its large activations afresh on every call (see
`reslab.runtime`), and `allocator="tuned"` measures both sides without that cost.
Achieved FLOP/s = MACs × 2 × images/s for inference, × 3 of that for training (forward + the two
backward matmuls), reported as a fraction of the peak of the precision used.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .inference import BACKENDS, available_backends, check_backend, fast_path  # noqa: F401 (re-exported)
from .models import complexity, create_model, model_info
from .runtime import ALLOCATORS, allocator_tuned, minor_faults, tune_allocator

# ---------------------------------------------------------------------------------------------
# Peak: large matmul FLOP/s
# ---------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int | None = None,
                repeats: int = 5) -> float:
    """FLOP/s of an n×n×n matmul (2n³ FLOPs) in `dtype` on `device`: the better of the two
    libraries PyTorch has for it (`matmul_rates`)."""
    return max(matmul_rates(dtype, device, n, repeats).values())


def matmul_rates(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int | None = None,
                 repeats: int = 5) -> dict[str, float]:
    """Median FLOP/s of the same n×n×n matmul done two ways: `torch.matmul` (the BLAS: MKL or
    OpenBLAS on CPU, cuBLAS on GPU) and a 1×1 convolution over an n-pixel channels-last image
    (oneDNN on CPU, cuDNN on GPU), the library the models' convolutions run in. They can differ
    by 2×: on AMD CPUs MKL's fp32 GEMM runs its AVX2 code while oneDNN uses AVX-512."""
    ways, flops = _matmul_calls(dtype, device, n)
    iters = 20 if device.startswith("cuda") else 4
    with torch.inference_mode():
        m = _interleaved(ways, dict.fromkeys(ways, flops), warmup=1, repeats=repeats, iters=iters,
                         device=device)
    return {k: v.images_per_sec for k, v in m.items()}


def _matmul_calls(dtype: torch.dtype, device: str, n: int | None
                  ) -> tuple[dict[str, Callable[[], None]], int]:
    """`matmul_rates`' two ways of doing the n×n×n matmul, and the FLOPs of one call."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    image, weight = as_conv1x1(a, b)
    return {"matmul": lambda: a @ b, "conv1x1": lambda: F.conv2d(image, weight)}, 2 * n**3


def as_conv1x1(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, weight) with `F.conv2d(image, weight)[0, :, 0, :].t() == a @ b`: a's rows become
    the pixels of a 1×m channels-last image, b's columns the 1×1 filters."""
    m, k = a.shape
    image = a.t().reshape(1, k, 1, m).contiguous(memory_format=torch.channels_last)
    weight = b.t().reshape(b.shape[1], k, 1, 1).contiguous(memory_format=torch.channels_last)
    return image, weight


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Baseline: ResNet written plainly (eager, fp32, NCHW), same module names as reslab/torchvision
# ---------------------------------------------------------------------------------------------


class PlainBasicBlock(nn.Module):
    def __init__(self, in_ch: int, ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.pad = 0
        self.downsample = None
        if stride != 1 or in_ch != ch:
            if shortcut == "A":
                self.pad, self.stride = ch - in_ch, stride
            else:
                self.downsample = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=False),
                                                nn.BatchNorm2d(ch))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        elif self.pad:
            identity = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu(out + identity)


class PlainBottleneck(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int, shortcut: str) -> None:
        super().__init__()
        out_ch = width * 4
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PlainResNet(nn.Module):
    """The straightforward implementation a user would write (He et al. 2015, Table 1 / Sec. 4.2)."""

    def __init__(self, layers, bottleneck: bool, widths, cifar: bool, shortcut: str,
                 num_classes: int, in_chans: int) -> None:
        super().__init__()
        stem = widths[0] if cifar else 64
        if cifar:
            self.conv1 = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        block = PlainBottleneck if bottleneck else PlainBasicBlock
        in_ch = stem
        for i, (n, w) in enumerate(zip(layers, widths), 1):
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, w, 2 if i > 1 and j == 0 else 1, shortcut))
                in_ch = w * (4 if bottleneck else 1)
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def baseline_for(model: nn.Module) -> nn.Module:
    """A `PlainResNet` with `model`'s architecture and weights (original-unit ResNets only)."""
    from .models.resnet import Bottleneck, ResNet

    if not isinstance(model, ResNet) or model.unit != "original" or model.shortcut not in "AB":
        raise ValueError(
            "the plain baseline exists for ResNets with the original unit and shortcut A or B "
            f"(resnet18…152, resnet20…1202); got {getattr(model, 'reslab_name', type(model).__name__)}"
        )
    units = [len(getattr(model, f"layer{i}")) for i in range(1, model.num_stages + 1)]
    bottleneck = isinstance(model.units()[0], Bottleneck)
    widths = [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, model.num_stages + 1)]
    base = PlainResNet(units, bottleneck, widths, cifar=not hasattr(model, "maxpool"),
                       shortcut=model.shortcut, num_classes=model.fc.out_features,
                       in_chans=model.in_chans)
    base.load_state_dict(model.state_dict(), strict=True)
    return base


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    label: str
    images_per_sec: float  # median over repeats
    spread: tuple[float, float]  # min, max over repeats
    repeats: list[float] = field(default_factory=list)
    page_faults_per_call: float | None = None  # minor faults per timed call (None: not counted)


def _interleaved(fns: dict[str, Callable[[], None]], per_call: dict[str, float], *, warmup: int,
                 repeats: int, iters: int, device: str,
                 settle: dict[str, int] | None = None) -> dict[str, Measurement]:
    """Each function's rate (`per_call` units — images, FLOPs — per second), their timed repeats
    interleaved (A B C A B C ...) so that drifting machine speed hits all alike. `settle`: untimed
    calls of a function before each of its timed blocks (for a steady-state rate)."""
    settle = settle or {}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    rates: dict[str, list[float]] = {k: [] for k in fns}
    counted = minor_faults() is not None  # whether this OS counts page faults at all
    faults = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for label, fn in fns.items():
            for _ in range(settle.get(label, 0)):
                fn()
            _sync(device)
            f0 = minor_faults()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            rates[label].append(per_call[label] * iters / (time.perf_counter() - t))
            if counted:
                faults[label] += minor_faults() - f0
    calls = repeats * iters
    return {k: Measurement(k, statistics.median(v), (min(v), max(v)), v,
                           faults[k] / calls if counted else None)
            for k, v in rates.items()}


def _measure(model_fns: dict[str, Callable[[], None]], batch: int, *, peak_n: int | None,
             device: str, **timing) -> tuple[dict[str, Measurement], dict[str, float],
                                             dict[str, dict[str, float]]]:
    """Baseline and reslab (images/s), and the peak of each precision with the rates it is the
    best of (FLOP/s), all in one interleaved loop: a machine whose speed drifts (this project's
    2-core machines read the bf16 peak anywhere from 2.25 to 2.75 TFLOP/s within minutes) moves
    the model and its peak together, and the fraction of the peak stays put. Each timed block
    follows one untimed call of its own function, so that every rate is a steady state whatever
    ran before: right after a model's calls the first matmul runs on cold caches (12% slower on the
    AMX machine), and right after ONNX Runtime's calls its thread pool still spins on the cores
    (OpenVINO timed next ran at 240 img/s instead of 280-290, ResNet-50 batch 16, 2026-11-24)."""
    fns, per_call = dict(model_fns), dict.fromkeys(model_fns, batch)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ways, flops = _matmul_calls(dtype, device, peak_n)
        for way, fn in ways.items():
            fns[f"{precision} {way}"], per_call[f"{precision} {way}"] = fn, flops
    m = _interleaved(fns, per_call, device=device, settle=dict.fromkeys(fns, 1), **timing)
    detail = {p: {way: m.pop(f"{p} {way}").images_per_sec for way in ("matmul", "conv1x1")}
              for p in ("fp32", "bf16")}
    return m, {k: max(v.values()) for k, v in detail.items()}, detail


def _set_allocator(allocator: str) -> None:
    """Put the process in the allocator state the bench was asked to measure."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}; got {allocator!r}")
    if allocator == "tuned" and not tune_allocator():
        raise ValueError("allocator='tuned' needs glibc (Linux): its malloc cannot be tuned here; "
                         "measure with allocator='system', or preload jemalloc/tcmalloc instead")
    if allocator == "system" and allocator_tuned():
        raise ValueError("this process has already tuned its allocator (reslab.tune_allocator), "
                         "so glibc's defaults cannot be measured in it: use allocator='tuned', or "
                         "run the system-allocator bench in a fresh process")


@dataclass
class BenchResult:
    mode: str
    model: str
    batch: int
    input_size: tuple[int, int, int]
    device: str
    settings: dict
    macs_per_image: int
    baseline: Measurement
    reslab: Measurement
    speedup: float
    peak_flops: dict[str, float]
    achieved_flops: float
    fraction_of_peak: float
    checks: dict
    peak_detail: dict[str, dict[str, float]] = field(default_factory=dict)  # matmul_rates

    def to_dict(self) -> dict:
        return asdict(self)


def peak_precision(precision: str) -> str:
    """Which matmul peak a model computing in `precision` is a fraction of: bf16's for bf16 and
    fp16 (the low-precision units), fp32's for fp32."""
    return "fp32" if precision == "fp32" else "bf16"


def _input_size(name: str, image_size: int | None, in_chans: int) -> tuple[int, int, int]:
    native = model_info(name).input_size
    size = image_size or native[1]
    return (in_chans, size, size)


@dataclass
class Agreement:
    """How the fast path's predictions compare with the fp32 model's on a real test set."""

    dataset: str
    images: int
    top1_agreement: float  # fraction of images where both predict the same class
    fp32_top1_error: float
    fast_top1_error: float


def agreement(path: str, fast_kwargs: dict, *, data_dir: str | None = None, device: str = "cpu",
              batch: int = 500, limit: int | None = None) -> Agreement:
    """Run a trained model file/run folder in fp32 and through `fast_path(model, **fast_kwargs)`
    over its test set (in-memory datasets), and count how often the top-1 predictions agree."""
    from .data import InMemoryDataset, normalize
    from .train.predict import load_test_data

    model, meta, bundle = load_test_data(path, data_dir=data_dir, device=device, test_limit=limit)
    if not isinstance(bundle.test, InMemoryDataset):
        raise ValueError(f"the agreement check needs an in-memory dataset (digits, cifar10, "
                         f"cifar100); {path} was trained on {bundle.name}")
    fast = fast_path(model, tuple(bundle.test.images.shape[1:]), **fast_kwargs)
    same = wrong_ref = wrong_fast = 0
    with torch.inference_mode():
        for i in range(0, len(bundle.test), batch):
            x = normalize(bundle.test.images[i:i + batch].to(device), meta["mean"], meta["std"])
            y = bundle.test.labels[i:i + batch].to(device)
            ref, got = model(x).argmax(1), fast(x).argmax(1)
            same += int((ref == got).sum())
            wrong_ref += int((ref != y).sum())
            wrong_fast += int((got != y).sum())
    n = len(bundle.test)
    return Agreement(bundle.name, n, same / n, wrong_ref / n, wrong_fast / n)


def bench_infer(name: str = "resnet50", *, backend: str = "torch", **kwargs) -> BenchResult:
    """Inference images/s of reslab's optimised model against the eager fp32 baseline: one
    backend's result of `bench_backends` (whose arguments it takes)."""
    return bench_backends(name, backends=(backend,), **kwargs)[0]


def bench_backends(name: str = "resnet50", *, backends: Sequence[str] | None = None,
                   batch: int = 16, precision: str = "bf16", channels_last: bool = True,
                   fold_bn: bool = True, compile: bool = False, streams: int | None = None,
                   image_size: int | None = None, in_chans: int = 3,
                   model_kwargs: dict | None = None,
                   device: str = "cpu", warmup: int = 2, repeats: int = 5, iters: int = 3,
                   peak_n: int | None = None, checkpoint: str | None = None,
                   data_dir: str | None = None, allocator: str = "system") -> list[BenchResult]:
    """Inference images/s of the model through each backend's fast path against the eager fp32
    baseline, all timed in one interleaved loop with the peak: which backend is fastest for this
    model, batch and machine, measured side by side (one result per backend, in the order given;
    they share the baseline and the peak). `backends=None` takes every `available_backends()`.

    `compile` applies to the torch backend and `streams` to OpenVINO's (see `fast_path`).
    `model_kwargs` go to `create_model` (a trained model's architecture options). With
    `checkpoint` (a trained model file or run folder) each fast path is also compared with fp32
    on the model's test set (`checks["test_set"]`). `allocator` is "system" (glibc's defaults, as
    a plain script runs) or "tuned" (both sides with `reslab.tune_allocator`)."""
    backends = tuple(available_backends(device) if backends is None else backends)
    if not backends:
        raise ValueError("backends is empty; name at least one of " + ", ".join(BACKENDS))
    for b in backends:
        check_backend(b)
    if len(set(backends)) < len(backends):
        raise ValueError(f"each backend once, please; got {', '.join(backends)}")
    _set_allocator(allocator)
    torch.manual_seed(0)
    model_kwargs = {"in_chans": in_chans, **(model_kwargs or {})}
    model = create_model(name, **model_kwargs).eval().to(device)
    size = _input_size(name, image_size, model_kwargs["in_chans"])
    base = baseline_for(model).eval().to(device)
    x = torch.randn(batch, *size, device=device)
    # PyTorch's fast path takes channels-last input; the other runtimes read NCHW arrays.
    xf = x.to(memory_format=torch.channels_last) if channels_last else x

    calls = {"baseline": partial(base, x)}
    fast_kwargs, settings, checks, computes_in = {}, {}, {}, {}
    with torch.inference_mode():
        ref = base(x)
        reslab_fp32 = bool(torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4))
    alone = len(backends) == 1  # a lone backend gets every option, and refuses what it can't use
    for b in backends:
        kw = fast_kwargs[b] = dict(
            precision=precision, channels_last=channels_last, fold_bn=fold_bn,
            compile=compile and (alone or b == "torch"), backend=b,
            streams=streams if alone or b == "openvino" else None)
        run = fast_path(model, size, **kw)
        calls[b] = partial(run, xf if b == "torch" else x)
        # What each computes in decides the peak it is measured against.
        computes_in[b], extra = precision, {}
        if b == "openvino":  # what it chose: the streams, and bf16 only where the CPU has it
            kw["streams"] = run.streams
            computes_in[b] = run.inference_precision
            extra = dict(inference_precision=computes_in[b], openvino=run.version)
        elif b == "onnxruntime":  # runs the fp32 export whatever `precision` says
            computes_in[b] = "fp32"
            extra = dict(inference_precision="fp32")
        settings[b] = dict(kw, allocator=allocator, threads=torch.get_num_threads(), **extra,
                           model_kwargs=model_kwargs)
        with torch.inference_mode():
            got = calls[b]().float()
        checks[b] = {
            "baseline_equals_reslab_fp32": reslab_fp32,
            "random_input_top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((got - ref).abs().max()),
        }

    with torch.inference_mode():
        m, peaks, peak_detail = _measure(calls, batch, peak_n=peak_n, device=device,
                                         warmup=warmup, repeats=repeats, iters=iters)
    calls.clear()  # the sessions go before the test-set checks build their own
    macs = complexity(model, size).macs
    results = []
    for b in backends:
        if checkpoint is not None:
            checks[b]["test_set"] = asdict(agreement(checkpoint, fast_kwargs[b], data_dir=data_dir,
                                                     device=device))
        achieved = 2 * macs * m[b].images_per_sec
        peak = peaks[peak_precision(computes_in[b])]
        m[b].label = "reslab"
        results.append(BenchResult(
            "infer", name, batch, size, device, settings[b], macs, m["baseline"], m[b],
            m[b].images_per_sec / m["baseline"].images_per_sec, peaks, achieved, achieved / peak,
            checks[b], peak_detail,
        ))
    return results


def fastest(results: Sequence[BenchResult]) -> BenchResult:
    """Of `bench_backends`' results, the one whose fast path ran the most images per second."""
    return max(results, key=lambda r: r.reslab.images_per_sec)


def bench_train(name: str = "resnet20", *, batch: int = 128, precision: str = "bf16",
                channels_last: bool = True, compile: bool = False, compile_mode: str = "default",
                fused_kernels: bool = True,
                image_size: int | None = None, in_chans: int = 3, device: str = "cpu",
                warmup: int = 2, repeats: int = 5,
                iters: int = 3, peak_n: int | None = None,
                allocator: str = "system") -> BenchResult:
    """Training images/s (forward, backward, SGD step) of reslab's step against the baseline's;
    `allocator` as for `bench_infer`."""
    from .train.step import fast_sgd_kwargs, make_train_step

    _set_allocator(allocator)
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans).to(device)
    size = _input_size(name, image_size, in_chans)
    base = baseline_for(model).to(device)
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, model.fc.out_features, (batch,), device=device)

    base_opt = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def baseline_step() -> None:
        base_opt.zero_grad()
        F.cross_entropy(base(x), y).backward()
        base_opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                          **fast_sgd_kwargs(device))
    step = make_train_step(model, opt, precision=precision, channels_last=channels_last,
                           compile=compile, compile_mode=compile_mode, fused_kernels=fused_kernels)
    xf = x.to(memory_format=torch.channels_last) if channels_last else x
    m, peaks, peak_detail = _measure({"baseline": baseline_step, "reslab": lambda: step(xf, y)},
                                     batch, peak_n=peak_n, device=device, warmup=warmup,
                                     repeats=repeats, iters=iters)
    macs = complexity(model, size).macs
    achieved = 3 * 2 * macs * m["reslab"].images_per_sec
    peak = peaks[peak_precision(precision)]
    return BenchResult(
        "train", name, batch, size, device,
        dict(precision=precision, channels_last=channels_last, compile=compile,
             compile_mode=compile_mode if compile else None,
             # what make_train_step switched on (it decides: CPU, kernels built, model has a
             # module they stand in for)
             fused_kernels=any(getattr(m, s, False) for m in model.modules() for s in kernels.SWITCHES),
             allocator=allocator, threads=torch.get_num_threads()),
        macs, m["baseline"], m["reslab"], m["reslab"].images_per_sec / m["baseline"].images_per_sec,
        peaks, achieved, achieved / peak, {}, peak_detail,
    )
