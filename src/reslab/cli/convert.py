"""`reslab convert SRC --to DST`: torchvision / Keras weights into a reslab model file + card."""

from __future__ import annotations

import argparse

HELP = "convert torchvision (.pth) or Keras (.h5/.weights.h5/.keras) weights to a reslab model file"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.convert import SOURCES

    p.add_argument("src", metavar="SRC", help="the weights to convert")
    p.add_argument("--to", dest="dst", required=True, metavar="DST",
                   help="the reslab model file to write (*.safetensors); the card goes to DST.json")
    p.add_argument("--model", default=None,
                   help="reslab model name (default: recognised from the weights)")
    p.add_argument("--from", dest="source", choices=SOURCES, default=None,
                   help="source library (default: from SRC's suffix)")


def run(args: argparse.Namespace) -> int:
    from reslab.convert import convert

    r = convert(args.src, args.dst, model=args.model, source=args.source)
    card = r.card
    print(f"wrote {r.path} ({card['model']}, {card['num_classes']} classes, "
          f"{card['params']:,} parameters) from {card['source']['architecture']}")
    print(f"model card {r.card_path}; weights sha256 {r.sha256}")
    pre = card["preprocessing"]
    print(f"preprocessing ({pre['name']}): {pre['input']}, mean {pre['mean']}, std "
          f"{[round(s, 6) for s in pre['std']]}")
    return 0
