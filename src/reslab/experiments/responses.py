"""Layer responses: the std of every residual branch's output (He et al. 2015, Sec. 4.2, Fig. 7).

If the optimal functions are close to identities, a residual unit y = F(x) + x only needs a
small F. He et al. test this by the standard deviation of the layer responses on the CIFAR-10
test set: "ResNets have generally smaller responses than their plain counterparts", and "the
deeper ResNet has smaller magnitudes of responses" — an individual layer modifies the signal
less the more layers there are.

Measured here: for each unit, the std of F(x) after its last BN and before the addition (the
``residual_out`` hook of `reslab.models.resnet.ResidualUnit`); a plain unit has the same
position, just before its final ReLU. The std is taken over every value (image, channel,
position) of the whole test set. The networks are the ones `degradation` trains (same names and
recipe, so the model cache serves them).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data import normalize
from ..models.resnet import ResidualUnit
from ..train import resolve_config
from . import ExperimentConfig, ExperimentResult
from .common import Trained, _key, dataset, training_config
from .degradation import FAMILIES, cifar_depths, train_runs
from .report import mean_std, save_figure

DEPTHS = {"demo": (20, 56), "small": (20, 56, 110), "paper": (20, 56, 110)}
# At demo scale plain-110 and ResNet-110 are added only if training them fits this many
# seconds (estimated from the measured training time of the deepest pair trained before).
DEMO_DEEPEST = 110
DEMO_EXTRA_SECONDS = 90.0
# Mean responses within this relative difference count as "about the same".
SAME_RATIO = 0.1
# A test error within this many points of chance marks a network that did not train.
AT_CHANCE_POINTS = 2.0


# ----------------------------------------------------------------------------- measurement

def is_downsampling(unit: ResidualUnit) -> bool:
    """A unit that changes the feature map's shape (a stride, or more channels out than in):
    Veit et al.'s "downsampling modules", whose shortcut cannot be an identity."""
    convs = [getattr(unit, f"conv{i}") for i in range(1, unit.depth + 1)]
    return (any(c.stride != (1, 1) for c in convs)
            or convs[0].in_channels != convs[-1].out_channels)


@torch.no_grad()
def response_stds(model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float], labels: torch.Tensor | None = None,
                  batch_size: int = 512) -> tuple[list[float], float]:
    """(std of each unit's residual response in forward order, top-1 error in [0, 1]).

    `images` are uint8 (N, C, H, W); the std pools every value of every image (population
    std, accumulated in float64 over batches). The error is NaN without `labels`. The model
    runs in eval mode (BN with its running statistics, as at test time); its mode is restored.
    """
    units = list(model.units())
    if not units:
        raise ValueError(f"{type(model).__name__} has no residual units whose responses to read")
    sums = torch.zeros(len(units), 3, dtype=torch.float64)  # Σx, Σx², count

    def reader(i: int):
        def hook(module: nn.Module, inputs, out: torch.Tensor) -> None:
            v = out.detach().double()
            sums[i, 0] += v.sum().cpu()
            sums[i, 1] += v.square().sum().cpu()
            sums[i, 2] += v.numel()
        return hook

    handles = [u.residual_out.register_forward_hook(reader(i)) for i, u in enumerate(units)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device), mean, std)
            logits = model(x)
            if labels is not None:
                y = labels[start:start + batch_size].to(device)
                wrong += int((logits.argmax(1) != y).sum())
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    mean_v = sums[:, 0] / sums[:, 2]
    var = (sums[:, 1] / sums[:, 2] - mean_v.square()).clamp_min(0)
    error = wrong / len(images) if labels is not None else math.nan
    return var.sqrt().tolist(), error


def last_bn_scale(model: nn.Module) -> float:
    """Mean |γ| of the BN that ends each unit's branch, over all units and channels.

    The response F(x) leaves that BN, so its std is set by γ (and β): He et al.'s small
    responses are small γ, which weight decay and training pull away from their initial 1.
    """
    scales = torch.cat([u.last_norm().weight.detach().abs().flatten() for u in model.units()])
    return float(scales.mean())


def include_deepest(seconds: Sequence[float], depth: int, cached: bool,
                    budget_s: float = DEMO_EXTRA_SECONDS) -> tuple[bool, float]:
    """(train the 110-layer pair?, its estimated seconds) at demo scale.

    Training time grows about linearly with depth, so the pair costs the measured training
    `seconds` of the deepest pair already trained (of `depth` layers) × 110/depth; models
    already in the cache cost nothing; with no measured time there is no estimate (inf).
    """
    if not cached and not seconds:
        return False, math.inf
    estimate = 0.0 if cached else sum(seconds) * DEMO_DEEPEST / depth
    return estimate <= budget_s, estimate


def _cached(cfg: ExperimentConfig, name: str, seed: int) -> bool:
    config = training_config(cfg, name, seed=seed)
    config = resolve_config(config, dataset(config))
    return (Path(cfg.out) / "_models" / _key(config) / "history.json").exists()


# ----------------------------------------------------------------------------- the experiment

def run(cfg: ExperimentConfig) -> ExperimentResult:
    notes: list[str] = []
    depths = list(cifar_depths(cfg, DEPTHS))
    trained: dict[tuple[str, int], list[Trained]] = {}
    for depth in depths:
        for family in FAMILIES:
            runs, done = train_runs(cfg, f"{family}{depth}")
            if len(done) < len(runs):
                notes.append(f"{family}{depth}: {len(runs) - len(done)} run(s) diverged and are "
                             "left out.")
            if done:
                trained[family, depth] = done
    if cfg.scale == "demo" and "depths" not in cfg.options and DEMO_DEEPEST not in depths:
        # The 110-layer pair is worth showing only if it fits the demo's time.
        deepest = max(d for _, d in trained) if trained else depths[-1]
        seconds = [t.seconds for f in FAMILIES for t in trained.get((f, deepest), [])]
        cached = all(_cached(cfg, f"{f}{DEMO_DEEPEST}", s)
                     for f in FAMILIES for s in range(cfg.seeds))
        take, estimate = include_deepest(seconds, deepest, cached)
        basis = (f"the measured {sum(seconds):.0f} s of the {deepest}-layer pair × "
                 f"{DEMO_DEEPEST}/{deepest}")
        if take:
            for family in FAMILIES:
                _, done = train_runs(cfg, f"{family}{DEMO_DEEPEST}")
                if done:
                    trained[family, DEMO_DEEPEST] = done
            depths.append(DEMO_DEEPEST)
            notes.append("plain-110 and ResNet-110 are included: "
                         + ("they were already in the model cache." if cached else
                            f"training them was estimated at {estimate:.0f} s ({basis}), "
                            f"within the demo's {DEMO_EXTRA_SECONDS:.0f} s."))
        else:
            notes.append(
                f"plain-110 and ResNet-110 are left out at demo scale: training them would take "
                f"an estimated {estimate:.0f} s ({basis}), over the demo's "
                f"{DEMO_EXTRA_SECONDS:.0f} s; use --scale small, or options['depths'] = "
                "[20, 56, 110].")

    per_unit: dict[str, list[float]] = {}
    downsampling: dict[str, list[bool]] = {}
    rows = []
    for (family, depth), runs in sorted(trained.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = f"{family}{depth}"
        bundle = dataset(runs[0].config)
        measured = [response_stds(t.model, bundle.test.images, bundle.mean, bundle.std,
                                  bundle.test.labels) for t in runs]
        stds = [statistics.fmean(m[0][i] for m in measured) for i in range(len(measured[0][0]))]
        per_unit[name] = stds
        downsampling[name] = [is_downsampling(u) for u in runs[0].model.units()]
        row = {"model": name, "family": family, "depth": depth, "units": len(stds),
               "mean std": statistics.fmean(stds)}
        if cfg.seeds > 1:
            row["mean std ±"] = mean_std(statistics.fmean(m[0]) for m in measured)[1]
        row.update({"max std": max(stds), "min std": min(stds), "first unit std": stds[0],
                    "last unit std": stds[-1],
                    "last BN scale (mean abs γ)":
                        statistics.fmean(last_bn_scale(t.model) for t in runs),
                    "test error (%)": 100 * statistics.fmean(m[1] for m in measured)})
        rows.append(row)
    if not rows:
        raise RuntimeError("every run diverged: no trained network whose responses to measure")

    config = next(iter(trained.values()))[0].config
    bundle = dataset(config)
    notes = [
        f"Responses over the {len(bundle.test)} test images of {config.data}, eval mode; the "
        "networks are degradation's (same recipe, through the model cache)"
        + (f"; per-unit stds averaged over {cfg.seeds} seeds." if cfg.seeds > 1 else "."),
        "One response per unit: F(x) after its last BN, before the addition (for plain nets: "
        "before the unit's final ReLU). The paper's Fig. 7 also plots the first 3×3 layer of "
        "each unit (after BN, before ReLU); here only the branch output that meets the "
        "shortcut is measured.",
        "The response leaves a BN, so its std tracks that BN's scale γ; the 'last BN scale' "
        "column shows how far training moved the scales from their initial 1.",
        *notes,
    ]
    return ExperimentResult(
        "responses", "Responses: std of the residual branches' outputs (He et al. 2015, Fig. 7)",
        rows, findings(rows, per_unit, downsampling, chance=100 * (1 - 1 / config.num_classes)),
        [_plot(per_unit, cfg)],
        reference=(
            "He et al. 2015, Sec. 4.2 and Fig. 7 (CIFAR-10, plain and ResNet-20/56/110): "
            "\"ResNets have generally smaller responses than their plain counterparts\", "
            "supporting that the residual functions are closer to zero than non-residual ones; "
            "\"the deeper ResNet has smaller magnitudes of responses\": an individual layer "
            "of a deeper ResNet tends to modify the signal less. The paper gives the curves "
            "only, no table."),
        notes=notes,
        extra_tables={"Response std per unit (forward order; ↓ marks downsampling units)":
                      _unit_table(per_unit, downsampling)},
    )


def _unit_table(per_unit: dict[str, list[float]], downsampling: dict[str, list[bool]]
                ) -> list[dict]:
    """One row per unit index, one column per model; twins of one depth share a ↓ column."""
    longest = max(len(v) for v in per_unit.values())
    rows = []
    for i in range(longest):
        row: dict = {"unit": i + 1}
        for model, stds in per_unit.items():
            marks = f"↓ ({len(stds)} units)"
            row[model] = stds[i] if i < len(stds) else ""
            row[marks] = downsampling[model][i] if i < len(stds) else ""
        rows.append(row)
    return rows


def findings(rows: list[dict], per_unit: dict[str, list[float]],
             downsampling: dict[str, list[bool]], chance: float | None = None) -> list[str]:
    """Statements computed from the per-model table and the per-unit responses (ratios within
    `SAME_RATIO` of 1 count as "about the same"). With `chance` (the error of guessing, %),
    networks whose test error is within `AT_CHANCE_POINTS` of it are called untrained."""
    by = {r["model"]: r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    out = []
    broken = [] if chance is None else [
        r for r in rows if r["test error (%)"] >= chance - AT_CHANCE_POINTS]
    if broken:
        one = len(broken) == 1
        out.append(", ".join(f"{r['model']} ({r['test error (%)']:.2f}%)" for r in broken)
                   + f" {'errs' if one else 'err'} at chance ({chance:.0f}%): "
                   + ("it did not train, so its responses describe" if one else
                      "they did not train, so their responses describe")
                   + " a broken network.")
    for d in depths:
        plain, res = f"plain{d}", f"resnet{d}"
        if plain not in per_unit or res not in per_unit:
            continue
        p, r = per_unit[plain], per_unit[res]
        smaller = sum(a < b for a, b in zip(r, p))
        ratio = by[res]["mean std"] / by[plain]["mean std"]
        if ratio < 1 - SAME_RATIO:
            verdict = "residual functions are closer to zero, as in the paper."
        elif ratio <= 1 + SAME_RATIO:
            verdict = (f"about the same size (within {SAME_RATIO:.0%}): the paper's smaller "
                       "residual responses do not show clearly in this run.")
        else:
            verdict = "the ResNet's responses are NOT smaller than the plain net's in this run."
        out.append(
            f"Depth {d}: the ResNet's responses average {by[res]['mean std']:.3f}, "
            f"{ratio:.2f}× the plain net's {by[plain]['mean std']:.3f}; smaller in {smaller} of "
            f"{len(r)} units — {verdict}")
    res_rows = [by[f"resnet{d}"] for d in depths if f"resnet{d}" in by]
    if len(res_rows) >= 2:
        means = [r["mean std"] for r in res_rows]
        if all(b < a for a, b in zip(means, means[1:])) and means[-1] < (1 - SAME_RATIO) * means[0]:
            verdict = ("deeper ResNets have smaller responses, as in the paper (each unit "
                       "modifies the signal less).")
        elif all(abs(m / means[0] - 1) <= SAME_RATIO for m in means):
            verdict = (f"about the same at every depth (within {SAME_RATIO:.0%}): the paper's "
                       "shrinking with depth does not show in this run.")
        else:
            verdict = "the responses do not fall with every increase in depth in this run."
        out.append("Mean response per unit of " + ", ".join(
            f"ResNet-{r['depth']} {r['mean std']:.3f}" for r in res_rows) + ": " + verdict)
    for r in res_rows:
        name = r["model"]
        stds, down = per_unit[name], downsampling[name]
        d_vals = [s for s, k in zip(stds, down) if k]
        o_vals = [s for s, k in zip(stds, down) if not k]
        if d_vals and o_vals:
            big = statistics.fmean(d_vals) / statistics.fmean(o_vals)
            out.append(
                f"{name}: its {len(d_vals)} downsampling units respond with mean std "
                f"{statistics.fmean(d_vals):.3f}, {big:.2f}× the other units' "
                f"{statistics.fmean(o_vals):.3f}" + (
                    ": larger, as their option-A shortcut only zero-pads the new channels and "
                    "the branch must supply them." if big > 1 + SAME_RATIO else
                    f": about the same (within {SAME_RATIO:.0%})." if big >= 1 - SAME_RATIO
                    else ": smaller."))
    scale = "last BN scale (mean abs γ)"
    trained = [r for r in rows if r not in broken]
    if trained and all(scale in r for r in trained):
        lo, hi = min(r[scale] for r in trained), max(r[scale] for r in trained)
        out.append(
            f"The scales γ of the BNs that end the branches average {lo:.3f}–{hi:.3f} across "
            f"the {'trained ' if broken else ''}networks (initially 1): " + (
                f"training left them within {SAME_RATIO:.0%} of 1, so these responses mostly "
                "show BN's normalisation, not learnt small residuals."
                if max(abs(lo - 1), abs(hi - 1)) <= SAME_RATIO else
                "training moved them, and the responses follow."))
    return out


# ----------------------------------------------------------------------------- figure

def _plot(per_unit: dict[str, list[float]], cfg: ExperimentConfig) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 7))
    depths = sorted({int(m.removeprefix("plain").removeprefix("resnet")) for m in per_unit})
    colors = dict(zip(depths, ("tab:orange", "tab:blue", "tab:red", "tab:green", "tab:purple")))
    for model, stds in per_unit.items():
        plain = model.startswith("plain")
        depth = int(model.removeprefix("plain").removeprefix("resnet"))
        style = dict(color=colors[depth], linestyle="--" if plain else "-", marker=".",
                     label=f"{'plain' if plain else 'ResNet'}-{depth}")
        xs = range(1, len(stds) + 1)
        axes[0].plot(xs, stds, **style)
        axes[1].plot(xs, sorted(stds, reverse=True), **style)
    axes[0].set_xlabel("unit index (original order)")
    axes[1].set_xlabel("unit index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std of the response")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle("Std of each unit's response F(x) on the test set — He et al. 2015, Fig. 7")
    return save_figure(fig, cfg.folder / "responses.png")
