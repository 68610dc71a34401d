"""`reslab export CHECKPOINT_OR_RUN --format onnx|torchscript|exported-program`: deployable files."""

from __future__ import annotations

import argparse

HELP = "export a model file or run to ONNX / TorchScript / ExportedProgram, checked against PyTorch"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.export import FORMATS

    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a reslab model file (.safetensors) or a run folder")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", default=None,
                   help="output path (default: beside the model file, e.g. model.onnx)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="symbolic batch dimension (default: a batch-1 file)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm into the preceding convs (same outputs, fewer ops)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", default=None,
                   help="example input: H W or C H W (default: the size the model was trained at)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")


def run(args: argparse.Namespace) -> int:
    from reslab.export import ExportCheckError, default_export_path, export_model

    if args.input_size is not None and len(args.input_size) not in (2, 3):
        raise ValueError(f"--input-size takes H W or C H W, got {len(args.input_size)} numbers")
    out = args.out or default_export_path(args.checkpoint, args.format)
    try:
        r = export_model(args.checkpoint, out, format=args.format, input_size=args.input_size,
                         dynamic_batch=args.dynamic_batch, fold_bn=args.fold_bn, opset=args.opset)
    except ExportCheckError as e:
        print(f"reslab export: check failed: {e}")
        return 1
    folded = f", {r.folded_pairs} BatchNorms folded" if r.fold_bn else ""
    print(f"wrote {r.path} ({r.format}, {r.size_bytes / 1e6:.1f} MB, input "
          f"{'N' if r.dynamic_batch else '1'}×{'×'.join(map(str, r.input_size))}{folded})")
    print(f"checked with {r.checked_with} at batch {', '.join(map(str, r.checked_batch_sizes))}: "
          f"max abs diff vs PyTorch {r.max_abs_diff:.3g} (largest output {r.output_scale:.3g})")
    return 0
