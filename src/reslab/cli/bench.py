"""`reslab bench train|infer`: images/s against a plain PyTorch baseline and the machine's peak."""

from __future__ import annotations

import argparse
import json

from reslab.bench import BACKENDS
from reslab.runtime import ALLOCATORS
from reslab.train.config import COMPILE_MODES

HELP = "measure training/inference speed against a plain PyTorch baseline and the matmul peak"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=["train", "infer"])
    p.add_argument("--model", default=None, help="registered model (default: resnet20 for train, "
                   "resnet50 for infer)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128 train, 16 infer)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", help="(infer) keep BN")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile reslab's PyTorch model (train; infer: the torch backend)")
    p.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="(train) BN and ReLU as separate PyTorch ops instead of reslab's fused CPU kernel")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="(train) torch.compile mode; reduce-overhead replays CUDA graphs on a GPU")
    p.add_argument("--backend", type=_backends, default=("torch",), metavar="BACKEND[,BACKEND...]",
                   help="(infer) run reslab's model with PyTorch (torch), ONNX Runtime (onnxruntime, "
                        "fp32) or OpenVINO (openvino); several, comma-separated, or `all` (those "
                        "installed) are timed side by side in one run and the fastest is named")
    p.add_argument("--streams", type=int, default=None,
                   help="(infer, openvino) split each batch into this many chunks run at once on "
                        "OpenVINO's CPU streams (default: OpenVINO's choice; 1: one batch on all cores)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: native)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpoint", default=None, metavar="MODEL_FILE_OR_RUN",
                   help="(infer) a trained model: its architecture is benchmarked (unless --model "
                        "says otherwise) and the fast path's predictions are compared with fp32's "
                        "over its test set")
    p.add_argument("--data-dir", default=None, help="(infer --checkpoint) where its dataset is")
    p.add_argument("--peak-size", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--allocator", choices=ALLOCATORS, default="system",
                   help="glibc malloc as a plain script gets it (system, default) or tuned to keep "
                        "freed memory (tuned), for baseline and reslab alike; see reslab.runtime")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _backends(text: str) -> tuple[str, ...]:
    if text == "all":
        return ()  # every available backend (bench_backends decides, knowing the device)
    names = tuple(b.strip() for b in text.split(","))
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown backend {bad[0]!r}: choose from {', '.join(BACKENDS)}, a comma-separated "
            "list of them, or all")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"each backend once, please; got {text!r}")
    return names


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from reslab.bench import bench_backends, bench_train, fastest

    for flag in ("batch", "repeats", "iters", "peak_size", "streams"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.checkpoint and args.mode != "infer":
        raise ValueError("--checkpoint applies to `reslab bench infer`")
    if args.mode == "train" and (args.backend != ("torch",) or args.streams is not None):
        raise ValueError("--backend and --streams apply to `reslab bench infer`; training runs "
                         "in PyTorch")
    common = dict(precision=args.precision, channels_last=args.channels_last,
                  compile=args.compile, image_size=args.image_size, device=args.device,
                  warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                  peak_n=args.peak_size, allocator=args.allocator)
    if args.mode == "train":
        result = bench_train(args.model or "resnet20", batch=args.batch or 128,
                             compile_mode=args.compile_mode, fused_kernels=args.fused_kernels,
                             **common)
    else:
        model, kwargs = args.model, {}
        if args.checkpoint:
            from reslab.checkpoint import read_meta, resolve_model_file

            meta = read_meta(resolve_model_file(args.checkpoint))
            # the trained architecture (its options too) unless --model names another
            kwargs = meta.get("model_kwargs", {}) if model in (None, meta["model"]) else {
                "in_chans": meta.get("model_kwargs", {}).get("in_chans") or 3}
            model = model or meta["model"]
            if args.image_size is None and meta.get("image_size"):
                common["image_size"] = int(meta["image_size"][-1])
        results = bench_backends(model or "resnet50", backends=args.backend or None,
                                 batch=args.batch or 16,
                                 fold_bn=args.fold_bn, streams=args.streams,
                                 checkpoint=args.checkpoint, data_dir=args.data_dir,
                                 model_kwargs=kwargs, **common)
        if len(results) > 1:
            best = fastest(results).settings["backend"]
            if args.json:
                print(json.dumps({"fastest": best, "results": [r.to_dict() for r in results]},
                                 indent=1))
            else:
                print_results(results, best)
            return 0
        result = results[0]
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print_results([result])
    return 0


def computes_in(r) -> str:
    """The peak a result is a fraction of: that of the precision its arithmetic ran in."""
    from reslab.bench import peak_precision

    return peak_precision(r.settings.get("inference_precision", r.settings["precision"]))


def print_results(results: list, fastest: str | None = None) -> None:
    """One table: the shared baseline, then each result's reslab row (several for a run of
    several backends), with its ratio and its fraction of the peak of its precision."""
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    t = Table(title=f"reslab bench {r0.mode}: {r0.model}, batch {r0.batch}, "
                    f"{'×'.join(map(str, r0.input_size))}, {r0.device}")
    for c in ("", "images/s (median)", "min–max", "ratio", "of peak", "page faults/call"):
        t.add_column(c, justify="right" if c else "left")

    def faults(m) -> str:
        return "n/a" if m.page_faults_per_call is None else f"{m.page_faults_per_call:,.0f}"

    t.add_row("baseline (eager fp32 NCHW)", f"{r0.baseline.images_per_sec:.1f}",
              f"{r0.baseline.spread[0]:.1f}–{r0.baseline.spread[1]:.1f}", "1.00×", "",
              faults(r0.baseline))
    for r in results:
        backend = r.settings.get("backend", "torch")
        mark = " [fastest]" if backend == fastest else ""
        t.add_row(f"reslab {backend}{mark}", f"{r.reslab.images_per_sec:.1f}",
                  f"{r.reslab.spread[0]:.1f}–{r.reslab.spread[1]:.1f}", f"{r.speedup:.2f}×",
                  f"{100 * r.fraction_of_peak:.0f}% {computes_in(r)}", faults(r.reslab))
    console = Console()
    console.print(t)
    for r in results:  # below the table, which stays narrow
        console.print(f"reslab {r.settings.get('backend', 'torch')}: "
                      + ", ".join(f"{k}={v}" for k, v in r.settings.items()))
    ways = "; ".join(f"{p} " + ", ".join(f"{w} {v / 1e9:.0f}" for w, v in rates.items())
                     for p, rates in r0.peak_detail.items())
    achieved = ", ".join(
        f"{r.settings.get('backend', 'reslab')} {r.achieved_flops / 1e9:.0f} GFLOP/s = "
        f"{100 * r.fraction_of_peak:.0f}% of the {computes_in(r)} peak" for r in results
    ) if len(results) > 1 else (f"reslab achieves {r0.achieved_flops / 1e9:.0f} GFLOP/s = "
                                f"{100 * r0.fraction_of_peak:.0f}% of the {computes_in(r0)} peak")
    console.print(
        f"peak matmul: fp32 {r0.peak_flops['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{r0.peak_flops['bf16'] / 1e9:.0f} GFLOP/s (best of {ways}); {achieved} "
        f"({r0.macs_per_image / 1e6:.1f} MMACs/image)"
    )
    for r in results:
        prefix = f"{r.settings['backend']} " if len(results) > 1 else ""
        for k, v in r.checks.items():
            console.print(f"check {prefix}{k}: {v}")
    if fastest is not None:
        console.print(f"fastest here: --backend {fastest}")
