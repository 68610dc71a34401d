"""Per-layer gradient norms of plain, residual, pre-activation, highway and dense networks.

The gradient argument for shortcuts (He et al. 2016, Eq. 5; the seeds' posts 001/003): with
identity shortcuts x_L = x_l + Σ_{i=l}^{L-1} F(x_i), so

    ∂L/∂x_l = ∂L/∂x_L · (1 + ∂/∂x_l Σ F(x_i)),

and the term ∂L/∂x_L reaches every earlier unit unchanged, where a plain stack multiplies L − l
Jacobians that can shrink or blow the gradient up. A highway layer scales that direct term by its
carry gate 1 − T(x) (Srivastava et al. 2015, Sec. 2); a DenseNet layer's output is read directly
by every later layer of its block (Huang et al. 2017, Eq. 2).

For every network this experiment measures, per unit l (in forward order), averaged over a few
training batches in training mode (batch-norm on batch statistics, as in a training step):

- ‖∂L/∂W_l‖: the L2 norm of the gradient of all conv weights of the unit (a highway unit's gate
  conv and a projection shortcut included);
- ‖∂L/∂x_l‖: the L2 norm of the gradient at the unit's input. A dense layer's input is the list
  of all earlier feature maps of its block; its x_l is the newest of them (the previous layer's
  output, or the block's input for the first layer), the counterpart of a ResNet unit's input.

at initialisation and after training with the scale's recipe (the trained models are shared with
the other experiments through `train_cached`).
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write_text
from ..data import DatasetBundle, InMemoryDataset, normalize
from ..models import create_model, list_models, model_info
from . import ExperimentConfig, ExperimentResult
from .common import dataset, seeds, train_cached
from .report import csv_text, save_figure

DEPTH = {"demo": 56, "small": 56, "paper": 110}
# DenseNet-BC-100 (k = 12): 48 dense layers, between the 27 and 54 units of ResNet-56/110, and
# on digits it trains in half the time of DenseNet-40 (k = 12), whose 3×3 convs over wide
# concatenations are slow on a CPU (measured: 38 s vs 81 s for the demo recipe).
DENSENET = "densenet_bc100_k12"
CHECKPOINTS = ("init", "trained")


@dataclass(frozen=True)
class Network:
    label: str  # e.g. "plain-56", the name used in the table, findings and plot
    model: str  # the registered model name
    kwargs: dict  # model constructor overrides


def networks(cfg: ExperimentConfig) -> list[Network]:
    """The five networks of one depth: plain, ResNet, pre-act ResNet, highway and a DenseNet.

    ``cfg.options``: ``depth`` (a CIFAR depth 6n+2), ``densenet`` (a registered CIFAR DenseNet
    name) and ``densenet_kwargs`` (e.g. a smaller ``growth_rate`` for tests).
    """
    depth = int(cfg.options.get("depth", DEPTH[cfg.scale]))
    names = set(list_models())
    for family in ("plain", "resnet", "highway"):
        if f"{family}{depth}" not in names:
            raise ValueError(
                f"no registered {family}{depth}; gradients needs a depth with plain, ResNet and "
                "highway models: 20, 32, 44, 56 or 110")
    dense = cfg.options.get("densenet", DENSENET)
    if dense not in names or not model_info(dense).family.startswith("densenet"):
        raise ValueError(f"{dense!r} is not a registered DenseNet; choose one of "
                         f"{', '.join(list_models(family='densenet_cifar'))}")
    # A registered pre-act net at this depth, else the ResNet with full pre-activation units.
    preact = (Network(f"pre-act-{depth}", f"preact_resnet{depth}", {})
              if f"preact_resnet{depth}" in names
              else Network(f"pre-act-{depth}", f"resnet{depth}", {"unit": "full_preact"}))
    dense_label = ("DenseNet-BC-" if "_bc" in dense else "DenseNet-") + str(model_info(dense).depth)
    return [
        Network(f"plain-{depth}", f"plain{depth}", {}),
        Network(f"ResNet-{depth}", f"resnet{depth}", {}),
        preact,
        Network(f"highway-{depth}", f"highway{depth}", {}),
        Network(dense_label, dense, dict(cfg.options.get("densenet_kwargs", {}))),
    ]


# ----------------------------------------------------------------------------- measuring

def unit_names(model: nn.Module) -> list[str]:
    """The module path of every unit of `model.units()`, in the same order."""
    path = {id(m): name for name, m in model.named_modules()}
    return [path[id(u)] for u in model.units()]


def unit_stage(name: str) -> int:
    """The stage (ResNet ``layerN``, DenseNet ``denseblockN``) a unit's module path lies in."""
    return int(re.search(r"(?:layer|denseblock)(\d+)", name).group(1))


def downsampling_units(model: nn.Module) -> list[bool]:
    """Per unit: whether it is where the feature map shrinks (and the channels grow)."""
    out = []
    stages = [unit_stage(n) for n in unit_names(model)]
    for i, unit in enumerate(model.units()):
        if hasattr(unit, "carry"):  # highway: the carry path is the option-A map there
            out.append(not isinstance(unit.carry, nn.Identity))
        elif hasattr(unit, "downsample"):  # residual and plain units (option A, B or C map)
            out.append(unit.downsample is not None)
        else:  # DenseNet: the first layer of blocks 2… reads the output of a transition
            out.append(stages[i] > 1 and (i == 0 or stages[i - 1] != stages[i]))
    return out


def gradient_norms(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[list[float], list[float]]:
    """(‖∂L/∂W_l‖, ‖∂L/∂x_l‖) per unit of `model.units()`, each the mean over `batches`.

    L is the mean cross-entropy of a batch, computed in training mode on a copy of the model
    (so the caller's batch-norm statistics and gradients stay as they were).
    """
    net = copy.deepcopy(model).float().train()
    units = net.units()
    if not units:
        raise ValueError(f"{type(model).__name__} has no units() to measure")
    convs = [[m for m in u.modules() if isinstance(m, nn.Conv2d)] for u in units]
    grad_x: list[float | None] = [None] * len(units)

    def capture(i: int):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0][-1] if isinstance(args[0], (list, tuple)) else args[0]
            # The hook fires once the gradient of every use of x has been summed.
            x.register_hook(lambda g: grad_x.__setitem__(i, float(g.float().norm())))
        return pre_hook

    handles = [u.register_forward_pre_hook(capture(i)) for i, u in enumerate(units)]
    device = next(net.parameters()).device
    sums_w, sums_x = [0.0] * len(units), [0.0] * len(units)
    # Plain deep stacks produce denormal floats, which slow a CPU down ~10×; flushing them to
    # zero changes no norm printed here.
    torch.set_flush_denormal(True)
    try:
        for x, y in batches:
            net.zero_grad(set_to_none=True)
            grad_x[:] = [None] * len(units)
            F.cross_entropy(net(x.to(device)), y.to(device)).backward()
            for i, cs in enumerate(convs):
                sums_w[i] += math.sqrt(sum(float(c.weight.grad.float().norm()) ** 2 for c in cs))
                if grad_x[i] is None:
                    raise RuntimeError(f"no gradient reached the input of unit {i + 1}")
                sums_x[i] += grad_x[i]
    finally:
        torch.set_flush_denormal(False)
        for h in handles:
            h.remove()
    n = len(batches)
    return [s / n for s in sums_w], [s / n for s in sums_x]


def measurement_batches(bundle: DatasetBundle, count: int, batch_size: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed batches of normalised training images (no augmentation), the same for all."""
    train = bundle.train
    if not isinstance(train, InMemoryDataset):
        raise ValueError(f"gradients reads batches of an in-memory dataset (digits, cifar10, "
                         f"cifar100, synthetic); {bundle.name!r} is read from files")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    size = min(batch_size, len(train))
    out = []
    for b in range(count):
        idx = order[(b * size) % len(train):][:size]
        out.append((normalize(train.images[idx], bundle.mean, bundle.std), train.labels[idx]))
    return out


# ----------------------------------------------------------------------------- the experiment

def run(cfg: ExperimentConfig) -> ExperimentResult:
    nets = networks(cfg)
    count = int(cfg.options.get("batches", 4 if cfg.budget >= 1 else 2))
    batch_size = int(cfg.options.get("batch_size", 128))
    per_layer: list[dict] = []
    rows: list[dict] = []
    notes: list[str] = []
    for net in nets:
        # Norms per checkpoint and seed: {checkpoint: [(w, x) per seed]}.
        runs: dict[str, list[tuple[list[float], list[float]]]] = {c: [] for c in CHECKPOINTS}
        errors, seconds, model = [], [], None
        for seed in seeds(cfg):
            trained = train_cached(cfg, net.model, seed=seed, model_kwargs=net.kwargs)
            config = trained.config
            batches = measurement_batches(dataset(config), count, batch_size)
            torch.manual_seed(config.seed)  # the initial weights the trained model started from
            model = create_model(config.model, num_classes=config.num_classes,
                                 in_chans=config.in_chans, **config.model_kwargs)
            runs["init"].append(gradient_norms(model, batches))
            seconds.append(trained.seconds)
            if trained.diverged:
                notes.append(f"{net.label} (seed {seed}) diverged in training; its trained "
                             "gradients are left out.")
                continue
            runs["trained"].append(gradient_norms(trained.model, batches))
            errors.append(100 * trained.final.train_error)
        names, down = unit_names(model), downsampling_units(model)
        for checkpoint, measured in runs.items():
            if not measured:
                continue
            w = [statistics.fmean(v) for v in zip(*(m[0] for m in measured))]
            x = [statistics.fmean(v) for v in zip(*(m[1] for m in measured))]
            for i, name in enumerate(names):
                per_layer.append({
                    "network": net.label, "model": net.model, "checkpoint": checkpoint,
                    "unit": i + 1, "stage": unit_stage(name),
                    "downsampling": down[i],
                    "grad_w": w[i], "grad_x": x[i],
                })
            rows.append(_summary(
                net, checkpoint, w, x, errors if checkpoint == "trained" else [],
                statistics.fmean(seconds), carry_product(model) if checkpoint == "init" else None))

    table_path = cfg.folder / "per_layer.csv"
    cfg.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table_path, csv_text(per_layer))
    return ExperimentResult(
        "gradients", "Gradient norms per layer: plain, residual, pre-act, highway and DenseNet",
        rows, findings(rows), [_plot(per_layer, cfg)],
        reference=(
            "He et al. 2016 (Identity Mappings, Eq. 4–5): with identity shortcuts x_L = x_l + "
            "Σ F(x_i), so ∂L/∂x_l = ∂L/∂x_L·(1 + ∂/∂x_l Σ F): the gradient of the deepest unit "
            "reaches every shallower one directly and is unlikely to vanish, as the seeds' "
            "∂x_L/∂x_l = 1 + ∂F/∂x_l puts it. He et al. 2015 (Sec. 4.1) note that their BN plain "
            "nets do not suffer vanishing gradients ('the backward propagated gradients exhibit "
            "healthy norms with BN'), yet train worse. Srivastava et al. 2015: a highway layer's "
            "Jacobian is I where T = 0, so a negative gate bias starts deep nets near identity."),
        notes=[
            f"‖∂L/∂W_l‖ and ‖∂L/∂x_l‖ are means over {count} fixed training batches of "
            f"{batch_size} images (no augmentation), L = mean cross-entropy, training-mode BN, "
            f"fp32; mean over {cfg.seeds} seed(s). 'init' is the model built with the seed that "
            "the trained model started from.",
            "ratio x_1/x_L = ‖∂L/∂x_1‖ / ‖∂L/∂x_L‖ (first unit's input over the last unit's); "
            "orders = log10 of it (positive: the gradient grows towards the input). spread = "
            "log10(max/min) of the per-layer norms.",
            "Norms sum over every element: each downsampling unit halves the elements per image "
            "(2× the channels on a quarter of the positions), which alone moves a ratio across "
            "two stages by about 2×, far less than the orders of magnitude compared here.",
            "A dense layer's x_l is the newest map of its input list (the previous layer's "
            "output); its gradient includes every later layer of the block that reads it.",
            f"Per-layer numbers: {table_path.name}.",
            *notes,
        ],
    )


def carry_product(model: nn.Module) -> float | None:
    """(1 − σ(b_T)) multiplied over all units but the last of a highway net (None otherwise).

    At initialisation T ≈ σ(b_T), so a gradient that only follows the carry paths from the last
    unit's input back to the first unit's input is scaled by about this much ([H] Sec. 2).
    """
    units = model.units()
    if not all(hasattr(u, "transform_gate") for u in units):
        return None
    carries = [1 - float(torch.sigmoid(u.transform_gate.bias.detach()).mean()) for u in units]
    return math.prod(carries[:-1])


def _summary(net: Network, checkpoint: str, w: list[float], x: list[float],
             errors: list[float], seconds: float, carry: float | None) -> dict:
    ratio = x[0] / x[-1]
    return {
        "network": net.label, "model": net.model, "checkpoint": checkpoint, "units": len(x),
        "grad_x first": x[0], "grad_x last": x[-1], "ratio x_1/x_L": ratio,
        "orders x_1/x_L": math.log10(ratio),
        "spread grad_x (orders)": math.log10(max(x) / min(x)),
        "grad_w first": w[0], "grad_w last": w[-1],
        "spread grad_w (orders)": math.log10(max(w) / min(w)),
        "carry product": math.nan if carry is None else carry,
        "train error (%)": statistics.fmean(errors) if errors else math.nan,
        "train seconds": seconds,
    }


def findings(rows: list[dict]) -> list[str]:
    """Statements about the summary rows: each number in them is read from `rows`."""
    out = []
    by = {(r["network"], r["checkpoint"]): r for r in rows}
    labels = list(dict.fromkeys(r["network"] for r in rows))
    plain = next((n for n in labels if n.startswith("plain")), None)
    resnet = next((n for n in labels if n.startswith("ResNet")), None)
    for checkpoint in CHECKPOINTS:
        present = [n for n in labels if (n, checkpoint) in by]
        if not present:
            continue
        listing = ", ".join(f"{n} {by[n, checkpoint]['ratio x_1/x_L']:.3g}" for n in present)
        out.append(f"{checkpoint.capitalize()}: ‖∂L/∂x_1‖/‖∂L/∂x_L‖ (first unit's input over "
                   f"the last's) is {listing}.")
        if plain and resnet and (plain, checkpoint) in by and (resnet, checkpoint) in by:
            p, r = by[plain, checkpoint], by[resnet, checkpoint]
            po, ro = p["orders x_1/x_L"], r["orders x_1/x_L"]
            direction = "grows" if po > 0 else "shrinks"
            if abs(po) > abs(ro):
                out.append(
                    f"{checkpoint.capitalize()}: from the last unit to the first, {plain}'s input "
                    f"gradient {direction} by {abs(po):.2f} orders of magnitude "
                    f"(×{p['ratio x_1/x_L']:.3g}) "
                    f"while {resnet}'s stays within a factor {10 ** abs(ro):.3g} "
                    f"({abs(ro):.2f} orders): the identity term of ∂x_L/∂x_l = 1 + ∂F/∂x_l keeps "
                    f"the residual net's gradient {10 ** (abs(po) - abs(ro)):.3g}× closer to "
                    "its last unit's.")
            else:
                out.append(
                    f"{checkpoint.capitalize()}: {plain}'s input gradient changes by "
                    f"{abs(po):.2f} orders of magnitude from the last unit to the first, no more "
                    f"than {resnet}'s {abs(ro):.2f}: the vanishing/exploding gradient the identity "
                    "term guards against did not appear in the plain net here.")
        spreads = {n: by[n, checkpoint]["spread grad_w (orders)"] for n in present}
        lo, hi = min(spreads, key=spreads.get), max(spreads, key=spreads.get)
        out.append(
            f"{checkpoint.capitalize()}: the weight-gradient norms ‖∂L/∂W_l‖ spread over "
            f"{spreads[hi]:.2f} orders of magnitude across {hi}'s units (the most) and "
            f"{spreads[lo]:.2f} across {lo}'s (the least).")
    for n in labels:
        row = by.get((n, "init"))
        if row and not math.isnan(row.get("carry product", math.nan)):
            c, r = row["carry product"], row["ratio x_1/x_L"]
            out.append(
                f"{n} at initialisation: x_1/x_L = {r:.3g}, against (1 − σ(b_T))^(n−1) = {c:.3g}, "
                f"the product of the carry factors 1 − T ≈ 1 − σ(b_T) over its {row['units'] - 1} "
                f"carries (measured/predicted = {r / c:.2f}): with the gates nearly shut the "
                "gradient follows the carry path, shrunk a little at every unit.")
    changed = [n for n in labels if (n, "init") in by and (n, "trained") in by]
    if changed:
        moves = {n: by[n, "trained"]["orders x_1/x_L"] - by[n, "init"]["orders x_1/x_L"]
                 for n in changed}
        n = max(moves, key=lambda k: abs(moves[k]))
        least = min(moves, key=lambda k: abs(moves[k]))
        out.append(
            f"Training moved the first-to-last gradient ratio most for {n} "
            f"({by[n, 'init']['ratio x_1/x_L']:.3g} → {by[n, 'trained']['ratio x_1/x_L']:.3g}, "
            f"{moves[n]:+.2f} orders); the least for {least} ({abs(moves[least]):.2f} orders).")
    return out


def _plot(per_layer: list[dict], cfg: ExperimentConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    labels = list(dict.fromkeys(r["network"] for r in per_layer))
    for col, checkpoint in enumerate(CHECKPOINTS):
        for row, (key, what) in enumerate((("grad_x", "‖∂L/∂x_l‖ (unit input)"),
                                           ("grad_w", "‖∂L/∂W_l‖ (unit conv weights)"))):
            ax = axes[row][col]
            for label in labels:
                pts = [r for r in per_layer
                       if r["network"] == label and r["checkpoint"] == checkpoint]
                if pts:
                    ax.plot([r["unit"] for r in pts], [r[key] for r in pts], marker=".",
                            label=label)
            ax.set_yscale("log")
            ax.set_title(f"{what}, {checkpoint}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if row == 1:
                ax.set_xlabel("unit l (1 = nearest the input)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gradient norms per layer (log scale)")
    return save_figure(fig, cfg.folder / "gradients.png")
