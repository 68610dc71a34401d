"""Write an experiment's results: CSV/JSON table, markdown report, and the index of all reports."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Iterable

import torch

from ..checkpoint import atomic_write_text
from . import EXPERIMENTS, ExperimentConfig, ExperimentResult


def fmt(value: Any) -> str:
    """Table cell text: floats to 4 significant digits, everything else as is."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = list(values)
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def pm(values: Iterable[float], digits: int = 2) -> str:
    """'mean ± std' over seeds (just the value for one seed)."""
    v = list(values)
    m, s = mean_std(v)
    return f"{m:.{digits}f}" if len(v) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _environment() -> str:
    threads = torch.get_num_threads()
    return (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{threads} threads")


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi, the size every report uses) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: ExperimentResult, cfg: ExperimentConfig) -> Path:
    folder = cfg.folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "results.csv", csv_text(result.rows))
    atomic_write_text(folder / "results.json", json.dumps(
        {"name": result.name, "config": _cfg_dict(cfg), "rows": result.rows,
         "extra_tables": result.extra_tables, "findings": result.findings,
         "seconds": result.seconds}, indent=1, default=str))
    parts = [
        f"# {result.title}\n",
        f"`reslab experiment {cfg.name} --scale {cfg.scale} --data {cfg.dataset} "
        f"--seeds {cfg.seeds}` — {result.seconds:.0f} s on {_environment()}.\n",
        "## What these numbers show\n",
        *[f"- {f}" for f in result.findings],
        "",
        "## Results\n",
        markdown_table(result.rows),
    ]
    for title, rows in result.extra_tables.items():
        parts += [f"### {title}\n", markdown_table(rows)]
    for fig in result.figures:
        parts.append(f"![{fig.stem}]({fig.name})\n")
    if result.reference:
        parts += ["## What the paper reports\n", result.reference, ""]
    if result.notes:
        parts += ["## Settings and caveats\n", *[f"- {n}" for n in result.notes], ""]
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def write_index(results: list[ExperimentResult], cfg: ExperimentConfig) -> tuple[Path, Path]:
    out = Path(cfg.out)
    md = [f"# reslab experiments (--scale {cfg.scale}, data {cfg.dataset})\n",
          "| experiment | what | time | first finding |", "|---|---|---|---|"]
    rows_html = []
    for r in results:
        first = r.findings[0] if r.findings else ""
        md.append(f"| [{r.name}]({r.name}/report.md) | {EXPERIMENTS[r.name]} | "
                  f"{r.seconds:.0f} s | {first} |")
        rows_html.append(
            f"<tr><td><a href='{r.name}/report.md'>{r.name}</a></td>"
            f"<td>{html.escape(EXPERIMENTS[r.name])}</td><td>{r.seconds:.0f} s</td>"
            f"<td>{html.escape(first)}</td></tr>"
            + "".join(f"<tr><td></td><td colspan=3><img src='{r.name}/{f.name}' width=480></td></tr>"
                      for f in r.figures)
        )
    md_path, html_path = out / "index.md", out / "index.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(html_path, (
        "<!doctype html><meta charset=utf-8><title>reslab experiments</title>"
        f"<h1>reslab experiments (--scale {html.escape(cfg.scale)})</h1>"
        "<table border=1 cellpadding=4><tr><th>experiment</th><th>what</th><th>time</th>"
        f"<th>first finding</th></tr>{''.join(rows_html)}</table>\n"))
    return md_path, html_path


def _cfg_dict(cfg: ExperimentConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
