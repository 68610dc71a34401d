"""`reslab train --model M --data D [--recipe R] [--out DIR] [any TrainConfig field]`, or
`reslab train --resume RUN_DIR`; under ``torchrun --nproc-per-node=N -m reslab train ...`` the same
command trains data-parallel on N processes (docs/scale-out.md).

Every `TrainConfig` field is a flag of the same name (``--batch-size``, ``--no-flip``, ...), generated
from the dataclass so the CLI can never lag behind it; a flag not given keeps the recipe's value.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import sys
from typing import Any, Callable

HELP = "train a model on a dataset with a paper's recipe or the fast one; write a run folder"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.data import DATASETS
    from reslab.train import RECIPES, TrainConfig

    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue this run folder from its last checkpoint, exactly")
    p.epilog = "recipes: " + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_flags(p, TrainConfig, choices={"recipe": tuple(RECIPES), "data": DATASETS})


def run(args: argparse.Namespace) -> int:
    from reslab.train import TrainConfig, TrainingDiverged, resume, train
    from reslab.train.dist import DistributedError, torchrun_environment

    given = config_overrides(args, TrainConfig)
    env = torchrun_environment()  # None in a single process
    try:
        if args.resume:
            result = resume(args.resume, **given)
        else:
            recipe = given.pop("recipe", "default")
            result = train(TrainConfig.from_recipe(recipe, **given))
    except (TrainingDiverged, DistributedError) as e:
        print(f"reslab train: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        if env is None:
            raise  # `reslab` prints it as a usage error
        # torchrun interleaves every rank's output: say which rank the message comes from.
        print(f"reslab train: error on rank {env.rank} of {env.world_size}: {e}", file=sys.stderr)
        return 2
    last = result.final
    if (env is None or env.is_main) and last is not None and last.test_top1_error is not None:
        print(f"{result.config.model} on {result.config.data}: {result.status} after {result.epochs} "
              f"epochs ({result.steps} steps, {result.wall_time:.1f}s); final test top-1 error "
              f"{100 * last.test_top1_error:.2f}% (accuracy {100 * (1 - last.test_top1_error):.2f}%), "
              f"best {100 * result.best_top1_error:.2f}%; run folder {result.run_dir}")
    if result.status == "interrupted":
        return 128 + (result.signal or 2)  # the shell convention for "ended by signal N"
    return 0


# ----------------------------------------------------------------------------- flags from fields

def add_config_flags(p: argparse.ArgumentParser, cls: type, *, choices: dict[str, tuple] | None = None) -> None:
    """One flag per dataclass field, typed and range-checked from the field's metadata.

    Defaults are suppressed, so the namespace holds only what the user typed.
    """
    choices = choices or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split("|")[0].strip()
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata.get("help"),
                              "dest": f.name}
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind == "dict":
            p.add_argument(flag, nargs="+", metavar="KEY=VALUE", type=_key_value, **kw)
            continue
        if kind.startswith("tuple"):
            p.add_argument(flag, nargs="+", type=float, metavar="N", **kw)
            continue
        allowed = choices.get(f.name) or f.metadata.get("choices")
        if allowed:
            kw["choices"] = allowed
        else:
            kw["metavar"] = f.name.upper()
        p.add_argument(flag, type=_number(kind, f), **kw)


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields the user gave on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = dict(value) if str(f.type).startswith("dict") else value
    return out


def _number(kind: str, f: dataclasses.Field) -> Callable[[str], Any]:
    if kind == "str":
        return str
    convert = {"int": int, "float": float}[kind]
    minimum, exclusive = f.metadata.get("minimum"), f.metadata.get("exclusive")

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind == 'int' else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'greater than' if exclusive else 'at least'} {minimum:g}, got {text}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as a Python literal when it is one (2, 0.5, True, (3, 32, 32))."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value
