"""The five residual-unit variants of He et al. 2016 (Identity Mappings, Fig. 4 / Table 2).

A residual unit computes x_{l+1} = f(h(x_l) + F(x_l)); the paper's Eq. (4)-(5) argument needs both
h and f to be identities, so that x_L = x_l + Σ F(x_i) and ∂L/∂x_l carries the term ∂L/∂x_L
unchanged. The variants move BN and ReLU around the addition to test that:

(a) original: conv-BN-ReLU-conv-BN, addition, ReLU (f = ReLU);
(b) BN after addition: the last BN moves after the addition, so it alters the shortcut signal;
(c) ReLU before addition: F ends in ReLU, so F(x) ≥ 0 and the residual can only grow the signal;
(d) ReLU-only pre-activation: ReLU-conv-BN-ReLU-conv-BN, nothing after the addition;
(e) full pre-activation: BN-ReLU-conv-BN-ReLU-conv, nothing after the addition (f = identity).

The paper's ResNet-110 CIFAR-10 test errors (median of 5 runs) are 6.61 / 8.17 / 7.84 / 6.71 /
6.37 %. Here every variant is the same CIFAR ResNet (``unit=`` model option) trained with the
scale's recipe; the table puts the measured errors beside the paper's.

This module also holds what the shortcuts experiment shares with it: the depth check
(`cifar_depth`), training one network per seed (`train_seeds`), the table's error cells
(`error_columns`), orderings (`ranking`, `sort_key`) and the training-curve figure (`plot_curves`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import ExperimentConfig, ExperimentResult
from .common import Trained, dataset, seeds, train_cached
from .report import mean_std, pm

# The demo depth is the deepest whose five trainings fit the ~90 s demo budget on 2 CPU cores
# (ResNet-56: ~15 s each on digits). Its (a) and (e) networks carry the model options other
# experiments use for ResNet-56 ({} and unit=full_preact), so `experiment all` may find them in
# the model cache.
DEPTH = {"demo": 56, "small": 56, "paper": 110}


@dataclass(frozen=True)
class Variant:
    letter: str  # (a)…(e), as in the paper's Fig. 4
    unit: str  # the `unit=` option of the CIFAR ResNets
    description: str
    paper_110: float  # [R2] Table 2, ResNet-110, CIFAR-10 test error %
    paper_164: float  # [R2] Table 2, ResNet-164

    @property
    def model_kwargs(self) -> dict[str, Any]:
        # The original unit is the models' default: no override, so the cache key is the one
        # every other experiment training this ResNet uses.
        return {} if self.unit == "original" else {"unit": self.unit}


VARIANTS = (
    Variant("(a)", "original", "original: conv-BN-ReLU-conv-BN, add, ReLU", 6.61, 5.93),
    Variant("(b)", "bn_after_add", "BN after addition", 8.17, 6.50),
    Variant("(c)", "relu_before_add", "ReLU before addition", 7.84, 6.14),
    Variant("(d)", "relu_preact", "ReLU-only pre-activation", 6.71, 5.91),
    Variant("(e)", "full_preact", "full pre-activation: BN-ReLU-conv ×2, add", 6.37, 5.46),
)

REFERENCE = (
    "He et al. 2016 (Identity Mappings, arXiv:1603.05027) Table 2, CIFAR-10 test error % "
    "(median of 5 runs): ResNet-110 — (a) original 6.61, (b) BN after addition 8.17, (c) ReLU "
    "before addition 7.84, (d) ReLU-only pre-activation 6.71, (e) full pre-activation 6.37; "
    "ResNet-164 (bottleneck) — 5.93 / 6.50 / 6.14 / 5.91 / 5.46. BN after addition also has a "
    "training loss that is harder to reduce early in training (the paper's Fig. 6 left: the BN on "
    "the shortcut path impedes information propagation); ReLU "
    "before addition makes F(x) non-negative, which limits its representational ability."
)


# ----------------------------------------------------------------------------- shared helpers

def cifar_depth(cfg: ExperimentConfig, default: dict[str, int], *, plain: bool = False) -> int:
    """``cfg.options["depth"]`` (or the scale's default), checked to be a registered CIFAR ResNet
    depth (and, with `plain`, one whose plain twin exists too)."""
    from ..models import list_models
    from ..models.resnet import CIFAR_DEPTHS

    depth = int(cfg.options.get("depth", default[cfg.scale]))
    names = set(list_models())
    ok = [d for d in CIFAR_DEPTHS
          if f"resnet{d}" in names and (not plain or f"plain{d}" in names)]
    if depth not in ok:
        raise ValueError(f"depth {depth} is not a CIFAR ResNet depth here; use one of "
                         f"{', '.join(map(str, ok))}")
    return depth


def train_seeds(cfg: ExperimentConfig, model: str, model_kwargs: dict[str, Any]) -> list[Trained]:
    """`model` trained with the scale's recipe once per seed (through the shared model cache)."""
    return [train_cached(cfg, model, seed=s, model_kwargs=model_kwargs) for s in seeds(cfg)]


def final_errors(runs: list[Trained]) -> tuple[list[float], list[float]]:
    """(final training errors, final test errors) in %, one per seed; NaN for a diverged run."""
    train, test = [], []
    for t in runs:
        last = t.final
        ok = not t.diverged and last is not None and last.test_top1_error is not None
        train.append(100 * last.train_error if ok else math.nan)
        test.append(100 * last.test_top1_error if ok else math.nan)
    return train, test


def error_columns(runs: list[Trained]) -> dict[str, Any]:
    """The table's error cells: means over seeds, and 'mean ± std' text when there are several."""
    train, test = final_errors(runs)
    cells: dict[str, Any] = {
        "early train error (%)": _mean(early_train_errors(runs)),
        "train error (%)": _mean(train),
        "test error (%)": _mean(test),
    }
    if len(runs) > 1:
        cells["test error, mean ± std (%)"] = pm(test)
        cells["test error std (%)"] = mean_std(test)[1]
    cells["diverged"] = sum(t.diverged for t in runs)
    return cells


def early_train_errors(runs: list[Trained]) -> list[float]:
    """Per seed, the mean training error (%) over the first quarter of the epochs (at least one):
    how fast a network starts to fit, where the paper sees a hampered shortcut (Fig. 6 left)."""
    out = []
    for t in runs:
        if t.diverged or not t.history:
            out.append(math.nan)
            continue
        first = t.history[: max(1, len(t.history) // 4)]
        out.append(100 * statistics.fmean(h.train_error for h in first))
    return out


def schedule_text(t: Trained) -> str:
    n = t.config.epochs_or_default()
    return f"{t.config.steps} steps" if n is None else f"{n} epoch" + ("s" if n != 1 else "")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def params(runs: list[Trained]) -> int:
    return sum(p.numel() for p in runs[0].model.parameters())


def test_images(runs: list[Trained]) -> int:
    """How many images the test error is measured on (one image = 100/N percentage points)."""
    return len(dataset(runs[0].config).test.labels)


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank; NaN (a diverged run) ranks last."""
    key = [sort_key(v) for v in values]
    order = sorted(range(len(key)), key=lambda i: key[i])
    out = [0.0] * len(key)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and key[order[j + 1]] == key[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two lists (Pearson's r of their average ranks)."""
    ra, rb = ranks(a), ranks(b)
    if len(set(ra)) < 2 or len(set(rb)) < 2:
        return math.nan  # all tied: no ordering to correlate
    return statistics.correlation(ra, rb)


def ranking(rows: list[dict[str, Any]], column: str, name: Callable[[dict], str]) -> str:
    """'x 1.00% < y 2.00% = z 2.00%' for rows already sorted by `column`."""
    text = ""
    for i, r in enumerate(rows):
        if i:
            text += " = " if r[column] == rows[i - 1][column] else " < "
        value = r[column]
        text += f"{name(r)} " + ("diverged" if math.isnan(value) else f"{value:.2f}%")
    return text


def sort_key(value: float) -> float:
    """Sort key for an error: NaN (a diverged run) after every number."""
    return math.inf if math.isnan(value) else value


def _finite(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def plot_curves(cfg: ExperimentConfig, curves: dict[str, list[Trained]], filename: str,
                title: str) -> Path:
    """Training (left) and test (right) top-1 error per epoch, the mean over seeds, per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    for label, runs in curves.items():
        histories = [t.history for t in runs if t.history]
        if not histories:
            continue  # every seed diverged: nothing to draw
        epochs = min(len(h) for h in histories)
        x = [histories[0][e].epoch for e in range(epochs)]
        train = [statistics.fmean(100 * h[e].train_error for h in histories) for e in range(epochs)]
        line, = axes[0].plot(x, train, label=label)
        tested = [e for e in range(epochs)
                  if all(h[e].test_top1_error is not None for h in histories)]
        test = [statistics.fmean(100 * h[e].test_top1_error for h in histories) for e in tested]
        axes[1].plot([x[e] for e in tested], test, color=line.get_color())
    for ax, what in zip(axes, ("training error (%)", "test error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    # Below the panels, so the legend hides no curve.
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = 3 if len(labels) <= 6 else 2
    legend_rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.set_size_inches(11, 4.2 + 0.22 * legend_rows)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / (4.2 + 0.22 * legend_rows) + 0.01, 1, 1))
    path = cfg.folder / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the experiment

def run(cfg: ExperimentConfig) -> ExperimentResult:
    """Train the five unit variants on one depth (``cfg.options["depth"]``, a CIFAR 6n+2 depth;
    ``cfg.options["units"]`` may pick a subset of the unit names) and tabulate their errors."""
    depth = cifar_depth(cfg, DEPTH)
    model = f"resnet{depth}"
    wanted = cfg.options.get("units")
    known = [v.unit for v in VARIANTS]
    if wanted is not None and (bad := sorted(set(wanted) - set(known))):
        raise ValueError(f"unknown unit variant(s) {', '.join(bad)}; choose from {', '.join(known)}")
    variants = [v for v in VARIANTS if wanted is None or v.unit in wanted]
    if not variants:
        raise ValueError(f"options['units'] is empty; name at least one of {', '.join(known)}")

    rows, curves = [], {}
    for v in variants:
        runs = train_seeds(cfg, model, v.model_kwargs)
        curves[f"{v.letter} {v.unit}"] = runs
        rows.append({
            "variant": v.letter, "unit": v.unit, "description": v.description,
            "params": params(runs), **error_columns(runs),
            "paper ResNet-110 (%)": v.paper_110,
        })
    some = next(iter(curves.values()))
    n_test, first = test_images(some), some[0]
    figure = plot_curves(cfg, curves, "preact_curves.png",
                         f"Residual-unit variants on ResNet-{depth} ({cfg.dataset})")
    return ExperimentResult(
        "preact", f"Residual-unit variants (a)–(e) on ResNet-{depth} (He et al. 2016, Table 2)",
        rows, findings(rows, n_test), [figure], reference=REFERENCE,
        notes=[
            f"Every variant is `{model}` with the `unit=` option, trained with the `{cfg.scale}` "
            f"recipe ({schedule_text(first)}, lr {first.config.lr}, "
            f"{len(dataset(first.config).train.labels)} training images) on {cfg.dataset}, "
            f"{cfg.seeds} seed(s); errors are final-epoch top-1 errors, the training error being "
            "the running average over the last epoch (augmented images, BN in training mode).",
            f"The test set has {n_test} images, so one image is {100 / n_test:.2f} percentage "
            "points: at the demo scale, gaps of a few images are within seed-to-seed noise.",
            f"The paper's column is ResNet-110 on CIFAR-10; ResNet-{depth} on {cfg.dataset} is "
            "compared by ranking, not by value.",
        ],
    )


def findings(rows: list[dict[str, Any]], n_test: int) -> list[str]:
    """What the table shows about the paper's three claims, computed from `rows`."""
    by = {r["unit"]: r for r in rows}
    out = []
    measured = sorted(rows, key=lambda r: sort_key(r["test error (%)"]))
    paper = sorted(rows, key=lambda r: r["paper ResNet-110 (%)"])
    rho = spearman([r["test error (%)"] for r in rows], [r["paper ResNet-110 (%)"] for r in rows])
    same = sum(a["unit"] == b["unit"] for a, b in zip(measured, paper))
    out.append(
        "Ranking by test error here: " + ranking(
            measured, "test error (%)", lambda r: f"{r['variant']} {r['unit']}")
        + "; the paper's ResNet-110 ranking: " + ranking(
            paper, "paper ResNet-110 (%)", lambda r: r["variant"])
        + f". {same} of {len(rows)} places agree (Spearman ρ = {rho:.2f})."
    )
    gap = _finite(r["test error (%)"] for r in rows)
    if len(gap) > 1:
        spread = max(gap) - min(gap)
        out.append(
            f"Best and worst variant differ by {spread:.2f} percentage points, "
            f"{round(spread * n_test / 100)} of {n_test} test images"
            + (_noise(rows, spread) if "test error std (%)" in rows[0] else
               " (one seed: no estimate of the seed-to-seed noise; run with --seeds 3).")
        )
    if "full_preact" in by and len(rows) > 1:
        e = by["full_preact"]["test error (%)"]
        best = min(rows, key=lambda r: sort_key(r["test error (%)"]))
        tied = [r for r in rows if r["test error (%)"] == best["test error (%)"]]
        if best["test error (%)"] == e and len(tied) == 1:
            out.append(f"Full pre-activation (e) has the lowest test error ({e:.2f}%), as in the "
                       "paper (6.37% against 6.61% for the original unit).")
        elif best["test error (%)"] == e:
            out.append(f"Full pre-activation (e) ties for the lowest test error ({e:.2f}%) with "
                       + ", ".join(f"{r['variant']} {r['unit']}" for r in tied
                                   if r["unit"] != "full_preact")
                       + "; in the paper it is best alone.")
        else:
            out.append(f"Full pre-activation (e) is not the best here: {best['variant']} "
                       f"{best['unit']} has {best['test error (%)']:.2f}% against its {e:.2f}% "
                       "(in the paper (e) is best).")
    if "bn_after_add" in by and len(rows) > 1:
        out.append(_worst_sentence(rows, "test error (%)", "test error")
                   + "; in the paper it is the worst of the five (8.17%).")
        out.append(_worst_sentence(rows, "early train error (%)",
                                   "training error over the first quarter of the epochs")
                   + "; in the paper BN after the addition alters the shortcut signal and its "
                     "training loss is the hardest to reduce early in training (Fig. 6 left).")
        out.append(_worst_sentence(rows, "train error (%)", "final training error") + ".")
    diverged = [f"{r['variant']} {r['unit']}" for r in rows if r.get("diverged")]
    if diverged:
        out.append("Training diverged for " + ", ".join(diverged) + "; their errors are missing.")
    return out


def _worst_sentence(rows: list[dict[str, Any]], column: str, what: str) -> str:
    b = next(r for r in rows if r["unit"] == "bn_after_add")
    worst = max(rows, key=lambda r: sort_key(r[column]))
    tied = [r for r in rows if r[column] == worst[column]]
    if b[column] == worst[column] and len(tied) == 1:
        return f"BN after addition (b) has the highest {what} ({b[column]:.2f}%)"
    if b[column] == worst[column]:
        return f"BN after addition (b) ties for the highest {what} ({b[column]:.2f}%)"
    return (f"BN after addition (b) is not the worst in {what} ({b[column]:.2f}%): "
            f"{worst['variant']} {worst['unit']} is higher ({worst[column]:.2f}%)")


def _noise(rows: list[dict[str, Any]], spread: float) -> str:
    std = statistics.fmean(r["test error std (%)"] for r in rows)
    if spread > 2 * std:
        return f"; more than twice the mean seed-to-seed std ({std:.2f} points)."
    return f"; no more than twice the mean seed-to-seed std ({std:.2f} points): within the noise."
