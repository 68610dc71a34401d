"""`reslab predict CHECKPOINT_OR_RUN IMAGE... [--top K] [--precision P] [--backend B] [--json]`."""

from __future__ import annotations

import argparse
import json

from .evaluate import _positive, add_backend_option

HELP = "classify image files with a trained model: the top-5 classes with probabilities"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.train import PRECISIONS

    p.add_argument("path", metavar="CHECKPOINT_OR_RUN", help="a .safetensors model file or a run folder")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top", type=_positive, default=5, help="how many classes to show (5)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_backend_option(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from reslab.train import predict

    preds = predict(args.path, args.images, top=args.top, device=args.device,
                    precision=args.precision, backend=args.backend)
    if args.json:
        print(json.dumps([{"image": p.path, "top": [{"class": c, "probability": v} for c, v in p.top]}
                          for p in preds]))
        return 0
    for p in preds:
        print(p.path)
        for rank, (cls, prob) in enumerate(p.top, 1):
            print(f"  {rank}. {cls:<20} {100 * prob:6.2f}%")
    return 0
