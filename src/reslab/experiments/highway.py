"""Highway vs residual vs plain networks at equal depth, and what the trained gates do.

A highway layer computes y = H(x)·T(x) + x·(1 − T(x)) (Srivastava et al. 2015, Eq. 3 with
C = 1 − T); a ResNet unit is the gate-free y = F(x) + x and a plain unit y = F(x). The three
networks here share everything else (reslab's highway nets are the CIFAR ResNet layout with a
3×3 gate conv per unit, see `reslab.models.highway`), so their errors differ only by how the two
paths are combined. The transform gate starts biased towards carrying (b_T = −1/−2/−3 for depths
≈ 10/20/30 and beyond, [H] Sec. 2); after training, the mean of T(x) per layer over the test set
says how much each layer transforms (T) versus carries its input through (1 − T).
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from ..data import InMemoryDataset, normalize
from ..models import create_model, list_models
from ..models.highway import HighwayUnit
from . import ExperimentConfig, ExperimentResult
from .common import Trained, dataset, seeds, train_cached
from .report import mean_std, save_figure

DEPTHS = {"demo": (20, 56), "small": (20, 56), "paper": (20, 56, 110)}
FAMILIES = ("plain", "resnet", "highway")
# Gate values below / above these count as nearly closed (the layer carries) / nearly open.
CLOSED, OPEN = 0.1, 0.9
# Mean gate values closer than this count as unchanged (init vs trained, first vs last layers).
SAME = 0.02
# Training errors closer than this (percentage points) count as equal: on the 1,437 training
# digits that is 7 images, too few to call one depth better than the other.
NOISE_POINTS = 0.5
# He et al. 2015, Table 6: CIFAR-10 test error (%) of the ResNets with these exact layouts.
PAPER_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
               "resnet110": 6.43}


def depths(cfg: ExperimentConfig) -> tuple[int, ...]:
    values = tuple(int(d) for d in cfg.options.get("depths", DEPTHS[cfg.scale]))
    names = set(list_models())
    missing = [f"{f}{d}" for d in values for f in FAMILIES if f"{f}{d}" not in names]
    if not values or missing:
        raise ValueError(
            f"highway compares plain, resnet and highway nets of each depth; no registered "
            f"{', '.join(missing) or 'depth'}: use depths from 20, 32, 44, 56, 110")
    return values


# ----------------------------------------------------------------------------- gate statistics

@torch.no_grad()
def gate_statistics(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 256
                    ) -> list[dict[str, float]]:
    """Per highway unit (forward order): mean T(x) and the fractions of gate values below
    `CLOSED` and above `OPEN`, over every channel, position and image of `images` (uint8).

    Reads T through each unit's ``gate_out`` hook in eval mode; the model's mode is restored.
    """
    units = [u for u in model.modules() if isinstance(u, HighwayUnit)]
    if not units:
        raise ValueError(f"{type(model).__name__} has no highway units whose gates to read")
    sums = torch.zeros(len(units), 4, dtype=torch.float64)  # ΣT, #closed, #open, count

    def reader(i: int):
        def hook(module: nn.Module, inputs, t: torch.Tensor) -> None:
            t = t.detach().float()
            sums[i] += torch.tensor([t.sum().item(), (t < CLOSED).sum().item(),
                                     (t > OPEN).sum().item(), t.numel()], dtype=torch.float64)
        return hook

    handles = [u.gate_out.register_forward_hook(reader(i)) for i, u in enumerate(units)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            model(normalize(images[start:start + batch_size].to(device), mean, std))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [{"mean T": s[0] / s[3], "closed": s[1] / s[3], "open": s[2] / s[3]}
            for s in sums.tolist()]


# ----------------------------------------------------------------------------- the experiment

def run(cfg: ExperimentConfig) -> ExperimentResult:
    rows, curves, gate_rows, notes = [], {}, [], []
    for depth in depths(cfg):
        for family in FAMILIES:
            name = f"{family}{depth}"
            runs = [train_cached(cfg, name, seed=s) for s in seeds(cfg)]
            done = [t for t in runs if not t.diverged and t.history]
            if len(done) < len(runs):
                notes.append(f"{name}: {len(runs) - len(done)} of {len(runs)} run(s) diverged "
                             "and are left out of its errors.")
            rows.append(_row(name, family, depth, runs, done, cfg.seeds))
            if done:
                curves[name] = done
            if family == "highway" and done:
                gate_rows += _gate_rows(name, done)
    figures = [_plot_curves(curves, cfg)]
    if gate_rows:
        figures.append(_plot_gates(gate_rows, cfg))
    bundle_note = ""
    if curves:
        config = next(iter(curves.values()))[0].config
        bundle = dataset(config)
        bundle_note = (f"{len(bundle.train)} training / {len(bundle.test)} test images of "
                       f"{config.data}, {config.epochs} epoch(s) at lr {config.lr}")
    return ExperimentResult(
        "highway", "Highway vs residual vs plain networks, and the trained gates",
        rows, findings(rows, gate_rows), figures,
        reference=(
            "Srivastava et al. 2015: conv highway nets trained on CIFAR-10 in one stage reach "
            "7.54% error (7.72 ± 0.16 over 5 runs) with 19 layers and 2.3M parameters, 8.80% "
            "with 32 layers (Table 2; quoted in He et al. 2015, Table 6, beside ResNet-20/56/110 "
            "at 8.75/6.97/6.43%). Gates start with b_T = −1, −2, −3 for depths ≈ 10, 20, 30 so "
            "that the net first carries its input; in a trained 50-layer net, setting T = 0 layer "
            "by layer shows MNIST using only the first ~15 layers while CIFAR-100 uses most "
            "of them (Sec. 4.2)."),
        notes=[
            f"Each net trained with the scale's recipe ({bundle_note}); the plain and ResNet "
            "models are the ones `degradation` trains (shared through the model cache).",
            f"Errors are the last epoch's; mean over {cfg.seeds} seed(s). Gate statistics: "
            f"T(x) read at every channel and position of every test image (eval mode); "
            f"'nearly closed' T < {CLOSED} (≥ {1 - CLOSED:.0%} carried), 'nearly open' "
            f"T > {OPEN}; 'init' is the same net at its initial weights.",
            *notes,
        ],
        extra_tables={"Gate statistics per highway layer (test set)": gate_rows},
    )


def _row(name: str, family: str, depth: int, runs: list[Trained], done: list[Trained],
         n_seeds: int) -> dict:
    train = [100 * t.final.train_error for t in done]
    test = [100 * t.final.test_top1_error for t in done]
    row = {
        "model": name, "family": family, "depth": depth,
        "params": sum(p.numel() for p in runs[0].model.parameters()),
        "train error (%)": mean_std(train)[0] if train else math.nan,
        "test error (%)": mean_std(test)[0] if test else math.nan,
    }
    if n_seeds > 1:
        row["train error std"] = mean_std(train)[1] if train else math.nan
        row["test error std"] = mean_std(test)[1] if test else math.nan
    row["paper CIFAR-10 error (%)"] = PAPER_ERROR.get(name, math.nan)
    row["seconds"] = statistics.fmean(t.seconds for t in runs)
    row["diverged"] = len(done) < len(runs)
    return row


def _gate_rows(name: str, done: list[Trained]) -> list[dict]:
    """Per layer: gate statistics of the trained nets and of the same nets at initialisation."""
    trained, initial = [], []
    for t in done:
        bundle, config = dataset(t.config), t.config
        if not isinstance(bundle.test, InMemoryDataset):
            raise ValueError(f"the gate statistics read an in-memory test set (digits, cifar10, "
                             f"cifar100, synthetic); {bundle.name!r} is read from files")
        images = bundle.test.images
        trained.append(gate_statistics(t.model, images, bundle.mean, bundle.std))
        torch.manual_seed(config.seed)  # the weights this run started from
        init = create_model(config.model, num_classes=config.num_classes,
                            in_chans=config.in_chans, **config.model_kwargs)
        initial.append(gate_statistics(init, images, bundle.mean, bundle.std))
    units = [u for u in done[0].model.modules() if isinstance(u, HighwayUnit)]
    rows = []
    for i, unit in enumerate(units):
        def avg(stats: list[list[dict]], key: str) -> float:
            return statistics.fmean(s[i][key] for s in stats)

        rows.append({
            "model": name, "unit": i + 1, "downsampling": not isinstance(unit.carry, nn.Identity),
            "gate bias init": unit.gate_bias_init,
            "mean T init": avg(initial, "mean T"), "mean T": avg(trained, "mean T"),
            "carry 1−T": 1 - avg(trained, "mean T"),
            "nearly closed (%)": 100 * avg(trained, "closed"),
            "nearly open (%)": 100 * avg(trained, "open"),
        })
    return rows


def findings(rows: list[dict], gate_rows: list[dict]) -> list[str]:
    """Statements computed from the error table and the per-layer gate table."""
    out = []
    by = {r["model"]: r for r in rows}
    all_depths = sorted({r["depth"] for r in rows})
    for d in all_depths:
        errs = {f: by[f"{f}{d}"]["train error (%)"] for f in FAMILIES if f"{f}{d}" in by}
        tests = {f: by[f"{f}{d}"]["test error (%)"] for f in FAMILIES if f"{f}{d}" in by}
        valid = [f for f in errs if not math.isnan(errs[f])]
        if not valid:
            continue
        best = min(errs[f] for f in valid)
        lowest = [f for f in valid if errs[f] == best]
        out.append(
            f"Depth {d}: final training error " + ", ".join(
                f"{f} {errs[f]:.2f}%" for f in FAMILIES if f in errs) +
            " (test " + ", ".join(f"{f} {tests[f]:.2f}%" for f in FAMILIES if f in tests) +
            f"); lowest training error: {' and '.join(lowest)}"
            + (" (tied)." if len(lowest) > 1 else "."))
    if len(all_depths) > 1:
        lo, hi = all_depths[0], all_depths[-1]
        for f in FAMILIES:
            a, b = by.get(f"{f}{lo}"), by.get(f"{f}{hi}")
            if not a or not b:
                continue
            shallow, deep = a["train error (%)"], b["train error (%)"]
            if math.isnan(shallow) or math.isnan(deep):
                continue
            delta = deep - shallow
            verdict = ("trains about equally at both depths" if abs(delta) < NOISE_POINTS
                       else "degrades with depth" if delta > 0 else "does not degrade with depth")
            out.append(f"{f}: {hi} layers reach {deep:.2f}% training error vs {shallow:.2f}% at "
                       f"{lo} layers ({delta:+.2f} points): it {verdict} here.")
    for model in dict.fromkeys(g["model"] for g in gate_rows):
        layers = [g for g in gate_rows if g["model"] == model]
        means = [g["mean T"] for g in layers]
        carrying = sum(m < 0.5 for m in means)
        closed = statistics.fmean(g["nearly closed (%)"] for g in layers)
        opened = statistics.fmean(g["nearly open (%)"] for g in layers)
        most = max(layers, key=lambda g: g["mean T"])
        out.append(
            f"{model}: averaged over layers and test images T = {statistics.fmean(means):.3f}, "
            f"i.e. the layers carry {1 - statistics.fmean(means):.1%} of their input; {carrying} "
            f"of {len(layers)} layers carry mostly (mean T < 0.5); {closed:.1f}% of gate values "
            f"are nearly closed (T < {CLOSED}) and {opened:.1f}% nearly open (T > {OPEN}); the "
            f"layer that transforms most is unit {most['unit']} (T = {most['mean T']:.3f}).")
        twin = by.get(model.replace("highway", "resnet"))
        gap = by[model]["train error (%)"] - twin["train error (%)"] if twin and model in by \
            else math.nan
        if gap >= NOISE_POINTS:
            out.append(
                f"{model} ends {gap:.2f} points of training error above its ResNet twin while "
                f"its gates pass on average T = {statistics.fmean(means):.3f} of each transform "
                "H(x) — and the same fraction of the gradient to H, since ∂y/∂H = T — which is "
                "consistent with its transform branches learning more slowly than the "
                "ResNet's residual branches.")
        moves = [g["mean T"] - g["mean T init"] for g in layers]
        biggest = max(range(len(layers)), key=lambda i: abs(moves[i]))
        g = layers[biggest]
        near = max(abs(m) for m in moves) < SAME
        out.append(
            f"{model}: the gates start at mean T = "
            f"{statistics.fmean(x['mean T init'] for x in layers):.3f} (b_T = "
            f"{layers[0]['gate bias init']:g}); after training the mean per-layer change is "
            f"{statistics.fmean(abs(m) for m in moves):.3f} and the largest {moves[biggest]:+.3f} "
            f"(unit {g['unit']}: {g['mean T init']:.3f} → {g['mean T']:.3f}): the gates "
            + ("stayed near" if near else "moved away from") + " their initial bias.")
        if len(layers) >= 3:
            third = len(layers) // 3
            first, last = statistics.fmean(means[:third]), statistics.fmean(means[-third:])
            trend = ("the first and last layers transform about equally" if abs(last - first) < SAME
                     else f"the {'later' if last > first else 'earlier'} layers transform more")
            out.append(f"{model}: the first third of the layers average T = {first:.3f}, the "
                       f"last third {last:.3f}: {trend} (difference {last - first:+.3f}).")
    return out


# ----------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(x: float | None) -> float:
    """An epoch's metric, NaN where it was not measured (test error between evaluations)."""
    return math.nan if x is None else x


def _plot_curves(curves: dict[str, list[Trained]], cfg: ExperimentConfig):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = {"plain": "tab:red", "resnet": "tab:blue", "highway": "tab:green"}
    all_depths = sorted({int("".join(filter(str.isdigit, n))) for n in curves})
    styles = dict(zip(all_depths, ("--", "-", ":", "-.")))
    for name, runs in curves.items():
        family = name.rstrip("0123456789")
        depth = int(name[len(family):])
        epochs = min(len(t.history) for t in runs)
        xs = [runs[0].history[e].epoch for e in range(epochs)]
        for ax, key in zip(axes, ("train_error", "test_top1_error")):
            ys = [100 * statistics.fmean(_value(getattr(t.history[e], key)) for t in runs)
                  for e in range(epochs)]
            ax.plot(xs, ys, styles.get(depth, "-"), color=colors[family], label=name)
    for ax, title in zip(axes, ("training error", "test error")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Plain vs ResNet vs highway (dashed: shallower, solid: deeper)")
    return save_figure(fig, cfg.folder / "curves.png")


def _plot_gates(gate_rows: list[dict], cfg: ExperimentConfig):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(g["model"] for g in gate_rows):
        layers = [g for g in gate_rows if g["model"] == model]
        units = [g["unit"] for g in layers]
        line, = axes[0].plot(units, [g["mean T"] for g in layers], marker=".",
                             label=f"{model} trained")
        axes[0].plot(units, [g["mean T init"] for g in layers], ":", color=line.get_color(),
                     label=f"{model} init")
        axes[1].plot(units, [g["nearly closed (%)"] for g in layers], marker=".",
                     color=line.get_color(), label=f"{model} T < {CLOSED}")
        axes[1].plot(units, [g["nearly open (%)"] for g in layers], "--", marker="x",
                     color=line.get_color(), label=f"{model} T > {OPEN}")
    axes[0].set_ylabel("mean transform gate T(x)")
    axes[1].set_ylabel("gate values (%)")
    for ax in axes:
        ax.set_xlabel("highway unit (1 = nearest the input)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Trained transform gates on the test set (T: transform, 1 − T: carry)")
    return save_figure(fig, cfg.folder / "gates.png")
