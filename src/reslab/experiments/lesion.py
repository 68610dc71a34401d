"""Lesion study and path view of a trained ResNet (Veit, Wilber & Belongie 2016).

Veit et al. unravel a ResNet of n residual units into 2ⁿ paths: writing each unit as
y_i = y_{i−1} + F_i(y_{i−1}) and expanding, every subset of units is one path, so the number of
paths through exactly k residual branches is C(n, k) and path lengths follow Binomial(n, ½).
Three consequences are measured here, each on the same trained network:

(a) deleting one unit at test time (y_i = y_{i−1}: the residual branch removed, the shortcut
    kept; ``unit.lesioned = True``) barely hurts a ResNet — except at the downsampling units,
    whose shortcut is not an identity — while it breaks a plain net (to chance);
(b) deleting k random units raises the error smoothly with k, like removing members of an
    ensemble;
(c) the gradient magnitude of a path falls exponentially with its length, so, weighted by the
    number of paths of each length, almost all the gradient comes from short "effective" paths
    (5–17 of 54 units in Veit et al.'s 110-layer net).

The gradient per path length is measured as Veit et al. describe it: forward a batch through
the whole net, then in the backward pass choose k units at random, propagate only through the
residual branch of those k and only through the shortcut of the other n − k, and read the
gradient's norm at the input of the first unit (`PathGradients`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetBundle, InMemoryDataset, normalize
from ..models import create_model, list_models
from ..models.resnet import ResidualUnit
from . import ExperimentConfig, ExperimentResult
from .report import save_figure
from .common import Trained, dataset, train_cached
from .responses import is_downsampling
from ..train import evaluate_model

# small studies the ResNet-56 / plain-56 that `degradation` trains at that scale (cached, so no
# extra training; the 110-layer pair would add ~10 minutes of training on 2 CPU cores and each
# of its ~650 lesioned evaluations costs twice as much); paper: Veit et al.'s 110 layers.
MODEL = {"demo": "resnet56", "small": "resnet56", "paper": "resnet110"}
TRIALS = {"demo": 10, "small": 10, "paper": 20}
# Path-gradient samples per path length (Veit et al. draw 1,000; a few dozen give the trend).
PATH_SAMPLES = {"demo": 24, "small": 32, "paper": 100}
PATH_BATCHES, PATH_BATCH_SIZE = 4, 64
# The share of the total gradient the "effective paths" hold.
EFFECTIVE_MASS = 0.9
# A deletion that moves the error less than this fraction of the way from the full model's
# error to chance "barely hurts"; one that moves it more than HALF_WAY "collapses" the net.
LITTLE, HALF_WAY = 0.1, 0.5
# The error curve over k is "smooth" if no step up exceeds SMOOTH_STEP × the average step and
# no step falls back by more than SMOOTH_DROP of the whole rise.
SMOOTH_STEP, SMOOTH_DROP = 2.0, 0.1


# ----------------------------------------------------------------------------- paths

def path_length_distribution(n: int) -> list[float]:
    """P(length = k) = C(n, k) / 2ⁿ for k = 0 … n: the unraveled view's Binomial(n, ½).

    Exact integer arithmetic, then one correctly rounded division, so it holds for n in the
    thousands (ResNet-1202 has 600 units) where C(n, k) and 2ⁿ overflow a float.
    """
    if n < 0:
        raise ValueError(f"the number of units must be >= 0, got {n}")
    total = 2**n
    return [math.comb(n, k) / total for k in range(n + 1)]


def effective_range(weights: Sequence[float], mass: float = EFFECTIVE_MASS) -> tuple[int, int]:
    """The shortest interval [a, b] of indices whose weights hold at least `mass` of the total.

    Among intervals of equal length the one holding the most weight wins (then the lowest a).
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    total = math.fsum(weights)
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative with a positive sum")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w / total)
    best: tuple[int, float, int] | None = None  # (length, -held, a)
    for a in range(len(weights)):
        for b in range(a, len(weights)):
            held = prefix[b + 1] - prefix[a]
            if held >= mass - 1e-12:
                key = (b - a, -held, a)
                if best is None or key < best:
                    best = key
                break  # a longer interval from the same a is never shorter
    assert best is not None  # the whole range holds everything
    return best[2], best[2] + best[0]


def _original_units(model: nn.Module) -> list[ResidualUnit]:
    units = list(model.units())
    for u in units:
        if u.unit != "original" or u.variant != "identity" or not u.has_shortcut:
            raise ValueError(
                "path gradients need original residual units with identity-variant shortcuts "
                f"(y = ReLU(s(x) + F(x)), He et al. 2015); {type(model).__name__} has "
                f"unit={u.unit!r}, shortcut_variant={u.variant!r}, shortcut={u.has_shortcut}")
    return units


class PathGradients:
    """One forward pass of a batch; then ∂L/∂x₀ along any single path (Veit et al. 2016, Sec. 5).

    Every unit computes y = ReLU(s(x) + F(x)). Its two one-branch copies
    ReLU(s(x).detach() + F(x)) and ReLU(s(x) + F(x).detach()) have the same value, but
    autograd sends the gradient only through the residual branch or only through the
    shortcut. Each unit's input is a separate leaf, so a path is a chain of per-unit
    vector-Jacobian products and the forward pass is shared by every path. Since the backward
    pass is linear, the gradients of all 2ⁿ paths sum exactly to the full gradient.

    The loss is the cross-entropy summed over the batch, so row i of a gradient is
    ∂ℓ_i/∂x₀ of image i alone (eval mode: BN uses its running statistics and does not mix the
    images). x₀ is the first unit's input (after the stem, which every path shares).
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.units = _original_units(model)
        self.inputs: list[torch.Tensor] = []
        self.residual_only: list[torch.Tensor] = []
        self.shortcut_only: list[torch.Tensor] = []
        model.eval()
        # Only ∂/∂x is wanted: a graph built without parameter edges backpropagates far faster
        # on a CPU (measured, one thread, a 16-channel unit on 64 digits: 1 ms instead of
        # 27 ms), so the weights are frozen while it is built.
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            self._build(model, images, labels)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _build(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.enable_grad():
            x = model.stem(images).detach()
            for unit in self.units:
                x = x.detach().requires_grad_()
                f = unit.residual_out(unit.residual(x))
                s = x if unit.downsample is None else unit.downsample(x)
                self.inputs.append(x)
                self.residual_only.append(torch.relu(s.detach() + f))
                self.shortcut_only.append(torch.relu(s + f.detach()))
                x = self.residual_only[-1]
            top = x.detach().requires_grad_()
            self.logits = model.forward_head(top)
            loss = F.cross_entropy(self.logits, labels, reduction="sum")
            (self.top_grad,) = torch.autograd.grad(loss, top)

    def __len__(self) -> int:
        return len(self.units)

    def gradient(self, through_residual: Sequence[bool]) -> torch.Tensor:
        """∂L/∂x₀ along the path through the residual branches marked True (shortcuts elsewhere)."""
        if len(through_residual) != len(self.units):
            raise ValueError(f"need one flag per unit ({len(self.units)}), "
                             f"got {len(through_residual)}")
        g = self.top_grad
        for i in reversed(range(len(self.units))):
            out = self.residual_only[i] if through_residual[i] else self.shortcut_only[i]
            (g,) = torch.autograd.grad(out, self.inputs[i], g, retain_graph=True)
        return g


def gradient_per_length(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        mean: Sequence[float], std: Sequence[float], *, samples: int,
                        batches: int = PATH_BATCHES, batch_size: int = PATH_BATCH_SIZE,
                        seed: int = 0) -> tuple[list[float], list[float]]:
    """(mean, std) over samples of the per-image gradient norm ‖∂ℓ/∂x₀‖ for paths of length k.

    `batches` random batches of `batch_size` uint8 `images` are drawn (and normalised with
    `mean`/`std`), and each path length k = 0 … n gets `samples` paths (k units chosen
    uniformly at random), spread evenly over the batches.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(_original_units(model))
    device = next(model.parameters()).device
    values: list[list[float]] = [[] for _ in range(n + 1)]
    per_batch = math.ceil(samples / batches)
    for b in range(batches):
        idx = torch.randperm(len(images), generator=gen)[:batch_size]
        paths = PathGradients(model, normalize(images[idx].to(device), mean, std),
                              labels[idx].to(device))
        for k in range(n + 1):
            for _ in range(min(per_batch, samples - b * per_batch)):
                mask = [False] * n
                for i in torch.randperm(n, generator=gen)[:k].tolist():
                    mask[i] = True
                g = paths.gradient(mask)
                values[k].append(float(g.flatten(1).norm(dim=1).mean()))
    return ([statistics.fmean(v) for v in values],
            [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])


# ----------------------------------------------------------------------------- lesions

@contextlib.contextmanager
def lesioned(model: nn.Module, deleted: Sequence[int]) -> Iterator[nn.Module]:
    """The model with the residual branches of units `deleted` (0-based) removed, restored after."""
    units = list(model.units())
    bad = [i for i in deleted if not 0 <= i < len(units)]
    if bad:
        raise ValueError(f"unit indices {bad} out of range: the model has {len(units)} units")
    try:
        for i in deleted:
            units[i].lesioned = True
        yield model
    finally:
        for u in units:
            u.lesioned = False


def error_rate(model: nn.Module, test: InMemoryDataset, mean: Sequence[float],
               std: Sequence[float], *, precision: str = "fp32", channels_last: bool = False,
               batch_size: int = 512) -> float:
    """Top-1 error (fraction) of `model` in eval mode on the uint8 `test` set.

    It is the training loop's own test evaluation (`evaluate_model`, same batches, precision and
    layout, same top-1 rule), so deleting no unit reproduces the error the training reported to
    the last digit, in bf16 too, where logits tie more often and argmax and top-k may break a tie
    differently. `precision="bf16"` with a channels-last model makes the hundreds of lesioned
    evaluations 3-4x faster on a CPU with AVX-512 bf16.
    """
    return evaluate_model(model, test, mean=mean, std=std, batch_size=batch_size,
                          precision=precision, channels_last=channels_last).top1_error


def random_deletions(n: int, max_deleted: int, trials: int, seed: int = 0) -> list[list[list[int]]]:
    """For k = 0 … max_deleted: `trials` sets of k distinct units (k = 0: one empty set)."""
    gen = torch.Generator().manual_seed(seed)
    return [[[]] if k == 0 else
            [sorted(torch.randperm(n, generator=gen)[:k].tolist()) for _ in range(trials)]
            for k in range(max_deleted + 1)]


def plain_twin(name: str) -> str | None:
    twin = "plain" + name.removeprefix("resnet")
    return twin if twin in set(list_models()) else None


# ----------------------------------------------------------------------------- the experiment

def _model_name(cfg: ExperimentConfig) -> str:
    name = str(cfg.options.get("model", MODEL[cfg.scale]))
    allowed = list_models(family="resnet_cifar")
    if name not in allowed:
        raise ValueError(f"lesion studies a CIFAR ResNet with original units; choose "
                         f"options['model'] from {', '.join(allowed)} (got {name!r})")
    return name


def _option(cfg: ExperimentConfig, key: str, default: int, minimum: int) -> int:
    value = cfg.options.get(key, default)
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"options[{key!r}] must be an integer >= {minimum}, got {value!r}")
    return value


def run(cfg: ExperimentConfig) -> ExperimentResult:
    name = _model_name(cfg)
    twin = plain_twin(name)
    with torch.device("meta"):  # the unit count, to check the options before any training
        n = len(create_model(name).units())
    max_deleted = _option(cfg, "max_deleted", n // 2, 1)
    if max_deleted > n:
        raise ValueError(f"options['max_deleted'] = {max_deleted} exceeds the {n} units of {name}")
    trials = _option(cfg, "trials", TRIALS[cfg.scale], 1)
    samples = _option(cfg, "path_samples", PATH_SAMPLES[cfg.scale], 1)

    seed = 0  # one trained network is studied (seeds would re-train it; deletions vary instead)
    nets: dict[str, Trained] = {"resnet": train_cached(cfg, name, seed=seed)}
    if twin:
        nets["plain"] = train_cached(cfg, twin, seed=seed)
    bundle = dataset(nets["resnet"].config)
    chance = 100 * (1 - 1 / nets["resnet"].config.num_classes)
    resnet = nets["resnet"].model
    down = [is_downsampling(u) for u in resnet.units()]
    stage_of = [s for s in range(1, resnet.num_stages + 1) for _ in getattr(resnet, f"layer{s}")]
    subsets = random_deletions(n, max_deleted, trials)

    rows, k_rows, full = _deletion_tables(nets, bundle, subsets, stage_of, down)
    path_rows = path_table(resnet, bundle, samples)

    figures = [_plot_single(rows, full, chance, name, twin, cfg),
               _plot_k(k_rows, full, chance, name, twin, cfg),
               _plot_paths(path_rows, n, cfg)]
    config = nets["resnet"].config
    return ExperimentResult(
        "lesion", f"Lesion study and paths of {name} (Veit et al. 2016)",
        rows, findings(rows, k_rows, path_rows, full, chance, name, twin), figures,
        reference=(
            "Veit, Wilber & Belongie 2016 (CIFAR-10, 110-layer ResNet = 54 units, vs VGG): "
            "removing the residual branch of one unit leaves the error almost unchanged except "
            "at the downsampling units (a modest rise), while deleting any layer of VGG reduces "
            "it to chance; deleting more units raises the error smoothly (Fig. 5a); path lengths "
            "follow Binomial(54, ½) (mean 27; the '95% of paths' quoted at lengths 19–35 are "
            "98.0% exactly); the gradient magnitude of a path falls exponentially with its "
            "length, and almost all the gradient comes "
            "from paths 5–17 units long, 0.45% of all paths (Fig. 6). Curve values are from "
            "figures only; see paper-numbers.md, section E."),
        notes=[
            f"{name} and {twin or '(no plain twin)'} as trained by `degradation` (seed {seed}, "
            f"the scale's recipe on {config.data}); errors on its {len(bundle.test)} test images, "
            f"eval mode, {config.precision}"
            f"{', channels-last' if config.channels_last else ''} as in training's own test "
            "evaluation. 'Deleting' unit i sets y_i = s(y_{i−1}) (residual branch removed, "
            "shortcut kept: option A's zero padding at downsampling units; for a plain unit the "
            "same parameter-free map), through the unit's final ReLU.",
            f"k random deletions: {trials} random sets of k units per k (the same sets for both "
            f"networks), k = 0 … {max_deleted}; k = 0 is the full model.",
            f"Path gradients: {samples} sampled paths per length over {PATH_BATCHES} random "
            f"batches of {PATH_BATCH_SIZE} training images (no augmentation); the value is the "
            "mean per-image ‖∂ℓ/∂x₀‖ at the first unit's input (Veit et al. sample 1,000 per "
            f"length). Effective paths: the shortest range of lengths holding "
            f"{EFFECTIVE_MASS:.0%} of Σ_k C(n,k)·magnitude_k.",
            *[f"{t.name} diverged in training; its numbers describe the diverged weights."
              for t in nets.values() if t.diverged],
            *([f"One trained network per model (seed 0); --seeds {cfg.seeds} does not apply: "
               "the variation shown is over deleted units and sampled paths."]
              if cfg.seeds > 1 else []),
            f"'Barely hurts': a deletion moves the error less than {LITTLE:.0%} of the way from "
            f"the full model's error to chance ({chance:.0f}%); 'collapses': more than "
            f"{HALF_WAY:.0%} of the way.",
        ],
        extra_tables={"Deleting k random units (test error, %)": k_rows,
                      "Path lengths and the gradient per path length": path_rows},
    )


def _deletion_tables(nets: dict[str, Trained], bundle: DatasetBundle,
                     subsets: list[list[list[int]]], stage_of: list[int], down: list[bool]
                     ) -> tuple[list[dict], list[dict], dict[str, float]]:
    """(a) one unit at a time and (b) k random units, the same unit sets for every network:
    (per-unit rows, per-k rows, each network's undamaged error in %)."""
    full, single, by_k = {}, {}, {}
    for family, t in nets.items():
        model = t.model.eval()
        if t.config.channels_last:
            model.to(memory_format=torch.channels_last)

        def error(deleted: Sequence[int]) -> float:
            with lesioned(model, deleted):
                return 100 * error_rate(model, bundle.test, bundle.mean, bundle.std,
                                        precision=t.config.precision,
                                        channels_last=t.config.channels_last)

        full[family] = error([])
        single[family] = [error([i]) for i in range(len(down))]
        by_k[family] = [[error(deleted) for deleted in sets] for sets in subsets]
    rows = []
    for i in range(len(down)):
        row = {"unit": i + 1, "stage": stage_of[i], "downsampling": down[i]}
        for family in nets:
            row[f"{family} error (%)"] = single[family][i]
            row[f"{family} Δ (points)"] = single[family][i] - full[family]
        rows.append(row)
    k_rows = []
    for k, sets in enumerate(subsets):
        row = {"k": k, "trials": len(sets)}
        for family in nets:
            errs = by_k[family][k]
            row[f"{family} mean (%)"] = statistics.fmean(errs)
            row[f"{family} std"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
        k_rows.append(row)
    return rows, k_rows, full


def path_table(model: nn.Module, bundle: DatasetBundle, samples: int) -> list[dict]:
    """(c) the path-length distribution and (d) the gradient per path length, one row per k.

    The share of the total gradient is C(n, k)·magnitude_k normalised, computed in log space
    so that no C(n, k) is ever turned into a float (it overflows one for n > 1029).
    """
    magnitude, spread = gradient_per_length(model, bundle.train.images, bundle.train.labels,
                                            bundle.mean, bundle.std, samples=samples)
    n = len(magnitude) - 1
    p = path_length_distribution(n)
    logs = [math.log(math.comb(n, k)) + math.log(m) if m > 0 else -math.inf
            for k, m in enumerate(magnitude)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    total = math.fsum(weights)
    return [{"length k": k, "paths C(n,k)": math.comb(n, k), "fraction of paths": p[k],
             "gradient magnitude": magnitude[k], "gradient std": spread[k],
             "share of total gradient": weights[k] / total} for k in range(n + 1)]


def findings(rows: list[dict], k_rows: list[dict], path_rows: list[dict], full: dict[str, float],
             chance: float, name: str, twin: str | None) -> list[str]:
    """Statements computed from the three tables (thresholds: LITTLE, HALF_WAY, SMOOTH_STEP,
    SMOOTH_DROP)."""
    out = []
    n = len(rows)

    def toward_chance(family: str, error: float) -> float:
        """How far a deletion moves the error from the full model's toward chance (0 … 1)."""
        return (error - full[family]) / (chance - full[family])

    other = [r for r in rows if not r["downsampling"]]
    downs = [r for r in rows if r["downsampling"]]
    d_other = [r["resnet Δ (points)"] for r in other]
    for family, label in (("resnet", name), ("plain", twin)):
        if label is not None and full[family] >= chance:
            out.append(f"{label} errs at chance ({full[family]:.2f}%) without any deletion: it "
                       "did not learn, so deleting its units shows nothing about it.")
    if full["resnet"] < chance and other:
        harm = sorted(other, key=lambda r: -r["resnet Δ (points)"])
        barely = [r for r in other if toward_chance("resnet", r["resnet error (%)"]) < LITTLE]
        worst = ", ".join(f"{r['unit']} ({r['resnet Δ (points)']:+.2f})" for r in harm[:3])
        out.append(
            f"Deleting one of the {len(other)} non-downsampling units of {name} (error "
            f"{full['resnet']:.2f}%) raises its error by {statistics.fmean(d_other):+.2f} points "
            f"on average (median {statistics.median(d_other):+.2f}); {len(barely)} of them "
            f"barely hurt (less than {LITTLE:.0%} of the way to chance); the worst are units "
            f"{worst}: " + (
                "no single unit matters much, as Veit et al. find." if len(barely) == len(other)
                else "unlike in Veit et al.'s CIFAR ResNet-110, some single units are essential "
                     "to this network."))
    if full["resnet"] < chance and downs and other:
        d_down = [r["resnet Δ (points)"] for r in downs]
        typical = statistics.median(d_other)
        out.append(
            f"Deleting a downsampling unit ({', '.join(str(r['unit']) for r in downs)}) "
            f"changes it by " + ", ".join(f"{d:+.2f}" for d in d_down) + " points, against a "
            f"median {typical:+.2f} for the other units: " + (
                "the downsampling units matter more, as in the paper (their shortcut is not an "
                "identity)." if statistics.fmean(d_down) > typical else
                "they matter no more than a typical unit in this run."))
    if twin and full["plain"] < chance:
        plain = [r["plain error (%)"] for r in rows]
        mean_plain = statistics.fmean(plain)
        collapse = toward_chance("plain", mean_plain) > HALF_WAY
        out.append(
            f"Deleting one unit of {twin} raises its error from {full['plain']:.2f}% to "
            f"{mean_plain:.2f}% on average (min {min(plain):.2f}%, chance {chance:.0f}%): " + (
                "the plain net collapses toward chance, unlike the ResNet." if collapse else
                "the plain net does not collapse toward chance in this run."))
    for family, label in (("resnet", name), ("plain", twin)):
        if label is None or len(k_rows) < 2 or full[family] >= chance:
            continue
        means = [r[f"{family} mean (%)"] for r in k_rows]
        rise = means[-1] - means[0]
        steps = [b - a for a, b in zip(means, means[1:])]
        k_max = k_rows[-1]["k"]
        if rise <= 0:
            shape = "the error does not rise with k in this run"
        elif min(steps) < -SMOOTH_DROP * rise:
            drop = steps.index(min(steps)) + 1
            shape = (f"it rises, but not monotonically: the mean falls by {-min(steps):.2f} "
                     f"points at k = {drop} (the trials vary, mean std "
                     f"{statistics.fmean(r[f'{family} std'] for r in k_rows[1:]):.1f} points)")
        elif max(steps) > SMOOTH_STEP * rise / len(steps):
            big = steps.index(max(steps)) + 1
            shape = (f"not smoothly: the step to k = {big} carries {max(steps) / rise:.0%} of "
                     "the rise")
        else:
            shape = (f"it rises smoothly: no step is more than {SMOOTH_STEP:g}× the average "
                     f"step, and none falls back more than {SMOOTH_DROP:.0%} of the rise")
        out.append(f"Deleting k random units of {label}: mean error {means[0]:.2f}% at k = 0, "
                   f"{means[1]:.2f}% at k = 1, {means[-1]:.2f}% at k = {k_max}; {shape}.")

    p = [r["fraction of paths"] for r in path_rows]
    lo, hi = effective_range(p)
    out.append(
        f"With n = {n} units there are 2^{n} = "
        + (f"{2**n:,}" if n <= 64 else f"10^{n * math.log10(2):.1f}")
        + " paths, whose lengths follow "
        f"Binomial({n}, ½) (the fractions sum to {math.fsum(p):.6f}; mean {n / 2:g}, std "
        f"{math.sqrt(n) / 2:.2f}); {EFFECTIVE_MASS:.0%} of them are {lo}–{hi} units long.")
    mags = [r["gradient magnitude"] for r in path_rows]
    ks = [r["length k"] for r in path_rows if r["gradient magnitude"] > 0]
    logs = [math.log(r["gradient magnitude"]) for r in path_rows if r["gradient magnitude"] > 0]
    if len(ks) >= 2:
        slope = statistics.linear_regression(ks, logs).slope
        out.append(
            f"The gradient magnitude at the input goes from {mags[0]:.3g} (k = 0, shortcuts "
            f"only) to {mags[-1]:.3g} (k = {n}); a log-linear fit gives a factor "
            f"{math.exp(slope):.3f} per residual branch on the path: " + (
                "it decays exponentially with path length, as Veit et al. find."
                if slope < 0 else "it does not decay with path length in this run."))
    share = [r["share of total gradient"] for r in path_rows]
    a, b = effective_range(share)
    held = math.fsum(p[a:b + 1])
    peak = max(range(len(share)), key=share.__getitem__)
    out.append(
        f"Weighting each length by its number of paths, {EFFECTIVE_MASS:.0%} of the total "
        f"gradient comes from paths {a}–{b} units long (peak at k = {peak}; typical path "
        f"length {n / 2:g}), which are {held:.2%} of all paths: " + (
            "the effective paths are shorter than the typical path, as Veit et al. find "
            "(5–17 of 54 units, 0.45% of paths)." if (a + b) / 2 < n / 2 else
            "the effective paths are not shorter than the typical path in this run."))
    return out


# ----------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, cfg: ExperimentConfig, name: str) -> Path:
    return save_figure(fig, cfg.folder / name)


def _plot_single(rows, full, chance, name, twin, cfg) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    units = [r["unit"] for r in rows]
    for r in rows:
        if r["downsampling"]:
            ax.axvspan(r["unit"] - 0.5, r["unit"] + 0.5, color="0.85", zorder=0)
    ax.plot(units, [r["resnet error (%)"] for r in rows], "o-", color="tab:blue", label=name)
    ax.axhline(full["resnet"], color="tab:blue", linestyle=":", label=f"{name}, no deletion")
    if twin:
        ax.plot(units, [r["plain error (%)"] for r in rows], "s--", color="tab:red", label=twin)
        ax.axhline(full["plain"], color="tab:red", linestyle=":", label=f"{twin}, no deletion")
    ax.axhline(chance, color="k", linewidth=0.8, label="chance")
    ax.set_xlabel("deleted unit (grey: downsampling units)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Deleting one unit at test time (Veit et al. 2016, Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, cfg, "lesion_single.png")


def _plot_k(k_rows, full, chance, name, twin, cfg) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ks = [r["k"] for r in k_rows]
    for family, label, color in (("resnet", name, "tab:blue"), ("plain", twin, "tab:red")):
        if label is None:
            continue
        ax.errorbar(ks, [r[f"{family} mean (%)"] for r in k_rows],
                    yerr=[r[f"{family} std"] for r in k_rows], marker="o", capsize=3,
                    color=color, label=label)
    ax.axhline(chance, color="k", linewidth=0.8, label="chance")
    ax.set_xlabel("number of deleted units k")
    ax.set_ylabel("test error (%), mean ± std")
    ax.set_title("Deleting k random units (Veit et al. 2016, Fig. 5a)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, cfg, "lesion_k.png")


def _plot_paths(path_rows, n, cfg) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ks = [r["length k"] for r in path_rows]
    axes[0].bar(ks, [r["fraction of paths"] for r in path_rows], color="tab:gray")
    axes[0].set_title(f"(a) path lengths: Binomial({n}, ½)")
    axes[0].set_ylabel("fraction of paths")
    # The spread over samples is in the table: on a log axis a std larger than the mean
    # would draw bars to zero.
    axes[1].plot(ks, [r["gradient magnitude"] for r in path_rows], marker="o")
    axes[1].set_yscale("log")
    axes[1].set_title("(b) gradient magnitude of one path")
    axes[1].set_ylabel("‖∂ℓ/∂x₀‖ (mean per image)")
    share = [r["share of total gradient"] for r in path_rows]
    a, b = effective_range(share)
    axes[2].bar(ks, share, color="tab:blue")
    axes[2].axvspan(a - 0.5, b + 0.5, color="tab:orange", alpha=0.2,
                    label=f"{EFFECTIVE_MASS:.0%} of the gradient: {a}–{b}")
    axes[2].set_title("(c) total gradient: count × magnitude")
    axes[2].set_ylabel("share of the total")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("path length k (residual branches on the path)")
        ax.grid(alpha=0.3)
    fig.suptitle("The unraveled view (Veit et al. 2016, Fig. 6)")
    return _save(fig, cfg, "paths.png")
