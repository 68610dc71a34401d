"""The papers' science as commands: `reslab experiment NAME [--scale demo|small|paper]`.

Each experiment is a small module with one function, ``run(cfg: ExperimentConfig) ->
ExperimentResult``: it trains/measures what it needs, returns its table (rows of plain values),
its figures and the findings it computes from the table. `report.write_report` turns that into
``results.csv``, ``results.json``, the PNGs and ``report.md`` in the experiment's folder.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCALES = ("demo", "small", "paper")
EXPERIMENTS = {
    "degradation": "plain vs residual nets at increasing depth (He et al. 2015, Fig. 1/6)",
    "gradients": "per-layer gradient norms of plain, residual, pre-act, highway and dense nets",
    "responses": "std of the residual responses per layer (He et al. 2015, Fig. 7)",
    "lesion": "delete blocks at test time; path lengths and gradient per path (Veit et al. 2016)",
    "preact": "the five residual-unit variants (He et al. 2016, Table 2)",
    "shortcuts": "options A/B/C and the shortcut variants (He et al. 2015 Table 3, 2016 Table 1)",
    "highway": "highway vs residual vs plain at equal depth, with gate statistics",
    "complexity": "basic vs bottleneck blocks and whole networks: params, MACs, memory, CPU time",
    "densenet": "DenseNet vs ResNet: accuracy against parameters and MACs",
}
# The dataset each scale trains on unless --data says otherwise.
DEFAULT_DATA = {"demo": "digits", "small": "cifar10", "paper": "cifar10"}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    scale: str = "demo"
    data: str | None = None  # None: DEFAULT_DATA[scale]
    data_dir: str | None = None
    out: str = "experiments"
    seeds: int = 1
    device: str = "cpu"
    # Tests shrink every budget with this factor (1.0 = the scale's own budget).
    budget: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in EXPERIMENTS and self.name != "all":
            raise ValueError(
                f"unknown experiment {self.name!r}; choose one of {', '.join(EXPERIMENTS)} or all"
            )
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {self.scale!r}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")

    @property
    def dataset(self) -> str:
        return self.data or DEFAULT_DATA[self.scale]

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.name


@dataclass
class ExperimentResult:
    name: str
    title: str
    rows: list[dict[str, Any]]  # the table: one dict per row, plain values
    findings: list[str]  # statements computed from `rows`
    figures: list[Path] = field(default_factory=list)
    reference: str = ""  # what the paper reports, for the report's context
    notes: list[str] = field(default_factory=list)  # settings and caveats
    extra_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0


def run_experiment(cfg: ExperimentConfig) -> ExperimentResult:
    """Run one experiment and write its folder (results.csv/json, figures, report.md)."""
    from .report import write_report

    module = importlib.import_module(f"{__name__}.{cfg.name}")
    cfg.folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = module.run(cfg)
    result.seconds = time.perf_counter() - start
    write_report(result, cfg)
    return result


def run_all(cfg: ExperimentConfig) -> list[ExperimentResult]:
    """Every experiment in turn, then index.md / index.html linking the reports."""
    from .report import write_index

    results = [run_experiment(replace(cfg, name=name)) for name in EXPERIMENTS]
    write_index(results, cfg)
    return results
