"""`reslab experiment NAME [--scale demo|small|paper]`: the papers' claims, measured."""

from __future__ import annotations

import argparse

HELP = "run one of the papers' experiments (or all) and write tables, figures and a report"


def configure(p: argparse.ArgumentParser) -> None:
    from reslab.experiments import EXPERIMENTS, SCALES

    p.add_argument("name", choices=[*EXPERIMENTS, "all"], metavar="NAME",
                   help="one of: " + ", ".join([*EXPERIMENTS, "all"]))
    p.add_argument("--scale", choices=SCALES, default="demo",
                   help="demo: digits, minutes on a CPU; small: CIFAR-10 subsets and short "
                        "schedules; paper: the papers' depths and recipes (hours, for a GPU)")
    p.add_argument("--data", default=None, help="dataset (default: digits for demo, else cifar10)")
    p.add_argument("--data-dir", default=None, help="where CIFAR/folder data lives")
    p.add_argument("--out", default="experiments", help="output folder (one subfolder per experiment)")
    p.add_argument("--seeds", type=int, default=1, help="runs per setting, reported as mean ± std")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from reslab.experiments import ExperimentConfig, run_all, run_experiment
    from reslab.experiments.report import markdown_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ExperimentConfig(args.name, scale=args.scale, data=args.data, data_dir=args.data_dir,
                           out=args.out, seeds=args.seeds, device=device)
    console = Console()
    results = run_all(cfg) if args.name == "all" else [run_experiment(cfg)]
    for r in results:
        console.rule(r.title)
        console.print(markdown_table(r.rows), markup=False)
        for f in r.findings:
            console.print(f"• {f}", markup=False)
        console.print(f"→ {cfg.folder.parent / r.name / 'report.md'} ({r.seconds:.0f} s)",
                      markup=False)
    if args.name == "all":
        console.print(f"index: {cfg.out}/index.md and {cfg.out}/index.html", markup=False)
    return 0
