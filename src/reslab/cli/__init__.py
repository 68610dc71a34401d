"""The `reslab` command: a thin layer that parses arguments and calls the public Python API.

Each subcommand lives in its own module of this package with three names:
``HELP`` (one line), ``configure(parser)`` (adds its arguments) and ``run(args) -> int``.
No logic lives only here: every command calls a function a Python user can call too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reslab.extras import MissingExtraError

# (command, module) in the order `reslab --help` lists them.
COMMANDS = [
    ("models", "models"),
    ("train", "train"),
    ("eval", "evaluate"),
    ("predict", "predict"),
    ("demo", "demo"),
    ("experiment", "experiment"),
    ("bench", "bench"),
    ("export", "export"),
    ("convert", "convert"),
]


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reslab", description="Residual networks: models, training, the papers' experiments."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, module_name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module_name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(command, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    dist = sys.modules.get("reslab.train.dist")  # not imported: no process group was opened
    if dist is not None:
        dist.exit_without_finalizing(code)  # does not return where a process group was opened
    return code


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from reslab import __version__

        print(__version__)
        return 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        if args.command != "bench":  # bench chooses with --allocator, for both sides alike
            from reslab.runtime import tune_allocator_from_env

            tune_allocator_from_env()
        return int(args.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, MissingExtraError) as e:
        print(f"reslab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reslab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
