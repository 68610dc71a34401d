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
    p.add_argument("--compile", action="store_true", help="torch.compile the reslab model")
    p.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="(train) BN and ReLU as separate PyTorch ops instead of reslab's fused CPU kernel")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="(train) torch.compile mode; reduce-overhead replays CUDA graphs on a GPU")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="(infer) run reslab's model with PyTorch, ONNX Runtime (fp32) or OpenVINO")
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    from reslab.bench import bench_infer, bench_train

    for flag in ("batch", "repeats", "iters", "peak_size", "streams"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.checkpoint and args.mode != "infer":
        raise ValueError("--checkpoint applies to `reslab bench infer`")
    common = dict(precision=args.precision, channels_last=args.channels_last,
                  compile=args.compile, image_size=args.image_size, device=args.device,
                  warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                  peak_n=args.peak_size, allocator=args.allocator)
    if args.mode == "train":
        result = bench_train(args.model or "resnet20", batch=args.batch or 128,
                             compile_mode=args.compile_mode, fused_kernels=args.fused_kernels,
                             **common)
    else:
        model, in_chans = args.model, 3
        if args.checkpoint:
            from reslab.checkpoint import read_meta, resolve_model_file

            meta = read_meta(resolve_model_file(args.checkpoint))
            model = model or meta["model"]
            in_chans = meta.get("model_kwargs", {}).get("in_chans") or 3
            if args.image_size is None and meta.get("image_size"):
                common["image_size"] = int(meta["image_size"][-1])
        result = bench_infer(model or "resnet50", batch=args.batch or 16, fold_bn=args.fold_bn,
                             backend=args.backend, streams=args.streams,
                             checkpoint=args.checkpoint,
                             data_dir=args.data_dir, in_chans=in_chans, **common)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print_result(result)
    return 0


def print_result(r) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"reslab bench {r.mode}: {r.model}, batch {r.batch}, "
                    f"{'×'.join(map(str, r.input_size))}, {r.device}")
    for c in ("", "images/s (median)", "min–max", "ratio", "page faults/call"):
        t.add_column(c, justify="right" if c else "left")

    def faults(m) -> str:
        return "n/a" if m.page_faults_per_call is None else f"{m.page_faults_per_call:,.0f}"

    t.add_row("baseline (eager fp32 NCHW)", f"{r.baseline.images_per_sec:.1f}",
              f"{r.baseline.spread[0]:.1f}–{r.baseline.spread[1]:.1f}", "1.00×", faults(r.baseline))
    settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
    t.add_row(f"reslab ({settings})", f"{r.reslab.images_per_sec:.1f}",
              f"{r.reslab.spread[0]:.1f}–{r.reslab.spread[1]:.1f}", f"{r.speedup:.2f}×",
              faults(r.reslab))
    console = Console()
    console.print(t)
    ways = "; ".join(f"{p} " + ", ".join(f"{w} {v / 1e9:.0f}" for w, v in rates.items())
                     for p, rates in r.peak_detail.items())
    console.print(
        f"peak matmul: fp32 {r.peak_flops['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{r.peak_flops['bf16'] / 1e9:.0f} GFLOP/s (best of {ways}); reslab achieves "
        f"{r.achieved_flops / 1e9:.0f} GFLOP/s = {100 * r.fraction_of_peak:.0f}% of the "
        f"{'bf16' if r.settings['precision'] != 'fp32' else 'fp32'} peak "
        f"({r.macs_per_image / 1e6:.1f} MMACs/image)"
    )
    for k, v in r.checks.items():
        console.print(f"check {k}: {v}")
