"""`reslab models [PATTERN] [--family F]`: the registered models with their measured sizes."""

from __future__ import annotations

import argparse

HELP = "list the registered models with parameters, MACs, input size and paper"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", help="glob pattern, e.g. 'resnet*' or '*preact*'")
    p.add_argument("--family", help="only this family (e.g. resnet, resnet_cifar, densenet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from reslab import list_models, model_info

    names = list_models(args.pattern, family=args.family)
    if not names:
        raise ValueError(
            f"no model matches pattern={args.pattern!r} family={args.family!r}; "
            "run `reslab models` for the full list"
        )
    infos = [model_info(n) for n in names]
    if args.json:
        print(json.dumps([asdict(i) for i in infos], indent=1))
        return 0
    table = Table(title=f"reslab models ({len(infos)})")
    for col, justify in (("name", "left"), ("family", "left"), ("depth", "right"),
                         ("params", "right"), ("MACs", "right"), ("input", "right"),
                         ("paper", "left")):
        table.add_column(col, justify=justify)
    for i in infos:
        table.add_row(
            i.name, i.family, str(i.depth), f"{i.params:,}", _human(i.macs),
            "×".join(map(str, i.input_size)), i.paper,
        )
    Console().print(table)
    return 0


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
