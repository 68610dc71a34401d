"""`reslab demo [--out DIR] [--epochs N]`: plain vs residual nets on the embedded digits."""

from __future__ import annotations

import argparse

from .evaluate import _positive

HELP = "the degradation problem in a minute: plain-20/56 vs ResNet-20/56 on the embedded digits"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.train.demo import EPOCHS

    p.add_argument("--out", default="demo", help="folder for degradation.png, summary.md, results.json")
    p.add_argument("--epochs", type=_positive, default=EPOCHS, help=f"epochs per model ({EPOCHS})")
    p.add_argument("--train-limit", type=_positive,
                   help="train on at most this many images (for a quicker look)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from reslab.train.demo import run_demo

    run_demo(args.out, epochs=args.epochs, train_limit=args.train_limit, seed=args.seed)
    return 0
