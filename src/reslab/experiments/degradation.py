"""The degradation problem: plain vs residual nets of increasing depth (He et al. 2015, Fig. 1/6).

He et al. observe that a deeper *plain* network (stacked conv-BN-ReLU layers) reaches a higher
*training* error than a shallower one — not overfitting, an optimisation difficulty — while the
residual twin of the same depth, y = F(x) + x (Eq. 1), trains better the deeper it is. On
CIFAR-10 (Fig. 6) plain-20/32/44/56 get worse with depth (plain-110 stays above 60% error) and
ResNet-20/32/44/56/110 reach 8.75/7.51/7.17/6.97/6.43% test error (Table 6).

Here each plainN / resnetN pair (the CIFAR layout: 6n+2 layers, 16-32-64 channels, option A, so
twins have identical parameters) is trained with the scale's recipe through the shared model
cache; `responses` and `lesion` study the same trained networks.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..models import list_models
from . import ExperimentConfig, ExperimentResult
from .common import Trained, dataset, seeds, train_cached
from .report import mean_std, save_figure

DEPTHS = {"demo": (20, 32, 44, 56), "small": (20, 32, 44, 56), "paper": (20, 32, 44, 56, 110)}
FAMILIES = ("plain", "resnet")
# Differences in error (percentage points) below this count as "about equal": a few images of
# a small training set.
SAME_POINTS = 0.5
# He et al. 2015, Table 6: CIFAR-10 test error (%) of the option-A CIFAR ResNets.
PAPER_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
               "resnet110": 6.43}


def cifar_depths(cfg: ExperimentConfig, defaults: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The depths to study: ``cfg.options["depths"]`` or the scale's default, sorted.

    Each depth must have both a registered plain and residual CIFAR net (20, 32, 44, 56, 110).
    """
    raw = cfg.options["depths"] if "depths" in cfg.options else defaults[cfg.scale]
    try:
        values = tuple(sorted({int(d) for d in raw}))
    except (TypeError, ValueError):
        raise ValueError(f"options['depths'] must be a list of integers, got {raw!r}") from None
    names = set(list_models())
    bad = [d for d in values if f"plain{d}" not in names or f"resnet{d}" not in names]
    if not values or bad:
        raise ValueError(
            f"{cfg.name} compares plainN with resnetN; depth(s) {bad or 'none given'} have no "
            "registered pair: use depths from 20, 32, 44, 56, 110")
    return values


def train_runs(cfg: ExperimentConfig, name: str) -> tuple[list[Trained], list[Trained]]:
    """(all runs, runs that finished) of `name` for every seed, through the model cache."""
    runs = [train_cached(cfg, name, seed=s) for s in seeds(cfg)]
    return runs, [t for t in runs if not t.diverged and t.history]


# ----------------------------------------------------------------------------- the experiment

def run(cfg: ExperimentConfig) -> ExperimentResult:
    rows, notes = [], []
    curves: dict[tuple[str, int], list[Trained]] = {}
    for family in FAMILIES:
        for depth in cifar_depths(cfg, DEPTHS):
            name = f"{family}{depth}"
            runs, done = train_runs(cfg, name)
            if len(done) < len(runs):
                notes.append(f"{name}: {len(runs) - len(done)} of {len(runs)} run(s) diverged "
                             "and are left out of its errors and curves.")
            rows.append(_row(name, family, depth, runs, done, cfg.seeds))
            if done:
                curves[family, depth] = done
    config = runs[0].config  # every run shares the recipe and data; only the model differs
    bundle = dataset(config)
    figures = [_plot(curves, cfg)]
    return ExperimentResult(
        "degradation", "Degradation: plain vs residual networks of increasing depth",
        rows, findings(rows, cfg.dataset), figures,
        reference=(
            "He et al. 2015, Fig. 6 (CIFAR-10; dashed: training error, bold: test error): the "
            "plain nets get worse with depth, in training error too (plain-56 above plain-20, "
            "Fig. 1; plain-110 above 60% and not shown), while ResNet-20/32/44/56/110 reach "
            "8.75/7.51/7.17/6.97/6.43% test error (Table 6; 110: best of 5, mean 6.61 ± 0.16) "
            "with 0.27/0.46/0.66/0.85/1.7M parameters; the deeper ResNets also have lower "
            "training error."),
        notes=[
            f"Each net trained once per seed with the scale's recipe ({len(bundle.train)} "
            f"training / {len(bundle.test)} test images of {config.data}, "
            + (f"{config.epochs} epoch(s)" if config.steps is None else f"{config.steps} steps")
            + f" at lr {config.lr}, batch {config.batch_size}); plainN and resnetN share the "
            "CIFAR layout and option-A shortcuts, so each pair has identical parameters.",
            "Training error is the running error over each epoch's augmented mini-batches "
            "(as in the paper's curves); test error is evaluated after each epoch. 'final' is "
            f"the last epoch, 'best' the lowest test error seen; mean over {cfg.seeds} seed(s)"
            + (" (± columns: std over seeds)." if cfg.seeds > 1 else "."),
            f"Differences under {SAME_POINTS} points count as 'about equal' in the statements.",
            *notes,
        ],
    )


def _row(name: str, family: str, depth: int, runs: list[Trained], done: list[Trained],
         n_seeds: int) -> dict:
    values = {
        "final train error (%)": [100 * t.final.train_error for t in done],
        "final test error (%)": [100 * t.final.test_top1_error for t in done],
        "best test error (%)": [100 * min(h.test_top1_error for h in t.history
                                          if h.test_top1_error is not None) for t in done],
    }
    row = {"model": name, "family": family, "depth": depth,
           "params": sum(p.numel() for p in runs[0].model.parameters())}
    for column, v in values.items():
        row[column] = mean_std(v)[0] if v else math.nan
        if n_seeds > 1:
            row[column.replace("(%)", "std")] = mean_std(v)[1] if v else math.nan
    row["paper test error (%)"] = PAPER_ERROR.get(name, math.nan)
    row["seconds"] = statistics.fmean(t.seconds for t in runs)
    row["runs"] = len(done)
    return row


def findings(rows: list[dict], data: str = "digits") -> list[str]:
    """Statements computed from the error table (see `SAME_POINTS` for 'about equal')."""
    by = {r["model"]: r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    train = "final train error (%)"

    def error(family: str, depth: int, column: str = train) -> float:
        row = by.get(f"{family}{depth}")
        return math.nan if row is None else row[column]

    out = []
    if len(depths) < 2:
        out.append(f"Only depth {depths[0]} was run: the effect of depth needs two or more "
                   "depths (options['depths']).")
    else:
        lo, hi = depths[0], depths[-1]
        for family, label in (("plain", "plain"), ("resnet", "ResNet")):
            shallow, deep = error(family, lo), error(family, hi)
            if math.isnan(shallow) or math.isnan(deep):
                out.append(f"{label}-{lo} or {label}-{hi} diverged: no comparison of their "
                           "training errors.")
                continue
            delta = deep - shallow
            series = [error(family, d) for d in depths]
            monotone = _trend(series)
            comparison = (f"{label}-{hi}'s final training error ({deep:.2f}%) is "
                          + ("about equal to" if abs(delta) < SAME_POINTS
                             else "higher than" if delta > 0 else "lower than")
                          + f" {label}-{lo}'s ({shallow:.2f}%, {delta:+.2f} points)")
            if family == "plain":
                verdict = ("the deeper plain net trains worse: the degradation problem appears"
                           if delta >= SAME_POINTS else
                           "the degradation did not appear in this run")
            else:
                verdict = ("the deeper ResNet trains better, as in the paper"
                           if delta <= -SAME_POINTS else
                           "the ResNets' training error does not fall with depth in this run")
            out.append(f"{comparison} — {verdict}. Across depths "
                       f"{'/'.join(map(str, depths))} it {monotone} "
                       f"({', '.join(f'{e:.2f}' for e in series)}%).")
    hi = depths[-1]
    p_train, r_train = error("plain", hi), error("resnet", hi)
    p_test, r_test = (error("plain", hi, "final test error (%)"),
                      error("resnet", hi, "final test error (%)"))
    if not any(math.isnan(v) for v in (p_train, r_train, p_test, r_test)):
        gap = p_train - r_train
        out.append(
            f"At depth {hi}, plain minus ResNet: {gap:+.2f} points of training error "
            f"({p_train:.2f}% vs {r_train:.2f}%) and {p_test - r_test:+.2f} points of test error "
            f"({p_test:.2f}% vs {r_test:.2f}%): "
            + ("the shortcuts make the deep net easier to optimise." if gap >= SAME_POINTS else
               "the shortcuts do not lower the training error at this depth in this run."))
    if data == "cifar10":
        pairs = [(r["model"], r["final test error (%)"], r["paper test error (%)"]) for r in rows
                 if not math.isnan(r["paper test error (%)"])
                 and not math.isnan(r["final test error (%)"])]
        if pairs:
            out.append("CIFAR-10 test error measured vs the paper's Table 6: " + ", ".join(
                f"{m} {e:.2f}% vs {p:.2f}%" for m, e, p in pairs) + ".")
    return out


def _trend(series: list[float]) -> str:
    """How a quantity moves with depth, ignoring steps back smaller than `SAME_POINTS`."""
    steps = [b - a for a, b in zip(series, series[1:])]
    if any(math.isnan(s) for s in steps):
        return "has gaps (diverged runs)"
    if all(s > -SAME_POINTS for s in steps) and series[-1] - series[0] >= SAME_POINTS:
        return "rises with depth"
    if all(s < SAME_POINTS for s in steps) and series[0] - series[-1] >= SAME_POINTS:
        return "falls with depth"
    if all(abs(s) < SAME_POINTS for s in steps) and abs(series[-1] - series[0]) < SAME_POINTS:
        return "stays about level with depth"
    return "is not monotone in depth"


# ----------------------------------------------------------------------------- figure

def _plot(curves: dict[tuple[str, int], list[Trained]], cfg: ExperimentConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panel = {"plain": axes[0], "resnet": axes[1]}
    all_depths = sorted({depth for _, depth in curves})
    colors = dict(zip(all_depths, ("tab:orange", "tab:blue", "tab:red", "tab:green",
                                   "tab:purple", "tab:brown")))
    for (family, depth), runs in curves.items():
        epochs = min(len(t.history) for t in runs)
        xs = [runs[0].history[e].epoch for e in range(epochs)]
        for key, style, label in (("test_top1_error", "-", f"{family}-{depth}"),
                                  ("train_error", "--", None)):
            ys = [100 * statistics.fmean(
                math.nan if getattr(t.history[e], key) is None else getattr(t.history[e], key)
                for t in runs) for e in range(epochs)]
            panel[family].plot(xs, ys, style, color=colors.get(depth, "k"), label=label,
                               linewidth=2 if style == "-" else 1, marker=".", markersize=4)
    for family, ax in panel.items():
        ax.set_title(f"{'plain' if family == 'plain' else 'residual'} networks")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Training (dashed) and test (solid) error — He et al. 2015, Fig. 6")
    return save_figure(fig, cfg.folder / "degradation.png")
