"""`reslab eval CHECKPOINT_OR_RUN [--data D] [--tta T] [--precision P] [--backend B] [--json]`."""

from __future__ import annotations

import argparse
import json
import time

HELP = "evaluate a model file or run folder: top-1/top-5 error and loss on a test set"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.data import DATASETS
    from reslab.train import PRECISIONS, TTA

    p.add_argument("path", metavar="CHECKPOINT_OR_RUN", help="a .safetensors model file or a run folder")
    p.add_argument("--data", choices=DATASETS,
                   help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="where the dataset files are (default: the run's)")
    p.add_argument("--val-split", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate on the held-out validation split (default: as the run did)")
    p.add_argument("--tta", choices=TTA, default="none",
                   help="test-time augmentation: average over the flip, the flip and two "
                   "one-pixel translations (6 views), or the 10 crops")
    p.add_argument("--test-limit", type=_positive, help="evaluate on at most this many images")
    p.add_argument("--batch-size", type=_positive, default=512)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_backend_option(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (folder datasets)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from reslab.train import evaluate

    start = time.perf_counter()
    r = evaluate(args.path, data=args.data, data_dir=args.data_dir, val_split=args.val_split,
                 tta=args.tta, batch_size=args.batch_size, device=args.device,
                 precision=args.precision, backend=args.backend, test_limit=args.test_limit,
                 workers=args.workers)
    seconds = time.perf_counter() - start  # loading and building the fast path included
    if args.json:
        print(json.dumps({"path": str(args.path), **r.as_dict(), "backend": args.backend,
                          "precision": args.precision, "seconds": seconds}))
    else:
        print(f"{args.path}: top-1 error {100 * r.top1_error:.2f}% (accuracy "
              f"{100 * (1 - r.top1_error):.2f}%), top-5 error {100 * r.top5_error:.2f}%, "
              f"loss {r.loss:.4f} on {r.count} images (tta {r.tta}; {args.backend} "
              f"{args.precision}, {seconds:.1f} s)")
    return 0


def add_backend_option(p: argparse.ArgumentParser) -> None:
    from reslab.inference import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: the model as trained (--precision by autocast); onnxruntime "
                        "(fp32) or openvino: its inference fast path on the CPU, BN folded "
                        "(`reslab bench infer --backend all` says which is fastest here)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value
