"""DenseNet vs ResNet: test error against parameters and multiply-adds.

Huang et al. 2017 (Sec. 4.3, Fig. 4, Table 2) argue that dense connectivity is more parameter-
efficient: DenseNet-BC-100 (k = 12, 0.8M parameters) reaches 4.51% on CIFAR-10+ where ResNet-110
(1.7M) reaches 6.43%. This experiment trains ResNets and DenseNets with one recipe on the
experiment's data, counts their parameters and MACs at the data's input size with
`reslab.complexity`, and places the measured errors beside the paper's CIFAR-10+ numbers.
"""

from __future__ import annotations

import math
import statistics

from ..models import complexity, list_models, model_info
from . import ExperimentConfig, ExperimentResult
from .common import Trained, dataset, seeds, train_cached
from .report import mean_std, save_figure

# densenet100_k12 (7M parameters, 1.8 GMACs at 32×32) and the larger nets take far longer than
# a demo's minute on a CPU; the small scale adds ResNet-110 and DenseNet-100 (k = 12).
MODELS = {
    "demo": ("resnet20", "resnet56", "densenet40_k12", "densenet_bc100_k12"),
    "small": ("resnet20", "resnet56", "resnet110", "densenet40_k12", "densenet_bc100_k12",
              "densenet100_k12"),
    "paper": ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "densenet40_k12",
              "densenet100_k12", "densenet_bc100_k12", "densenet_bc250_k24"),
}
# CIFAR-10 test error (%) with standard augmentation: He et al. 2015 Table 6 (ResNets) and
# Huang et al. 2017 Table 2, C10+ column (DenseNets).
PAPER_ERROR = {
    "resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43,
    "resnet1202": 7.93, "densenet40_k12": 5.24, "densenet100_k12": 4.10,
    "densenet100_k24": 3.74, "densenet_bc100_k12": 4.51, "densenet_bc250_k24": 3.62,
    "densenet_bc190_k40": 3.46,
}


def family(model: str) -> str:
    return "DenseNet" if model.startswith("densenet") else "ResNet"


def models(cfg: ExperimentConfig) -> tuple[str, ...]:
    names = tuple(cfg.options.get("models", MODELS[cfg.scale]))
    known = set(list_models())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; see `reslab models`")
    if {family(n) for n in names} != {"ResNet", "DenseNet"}:
        raise ValueError(f"densenet compares ResNets with DenseNets; got only {', '.join(names)}")
    return names


def run(cfg: ExperimentConfig) -> ExperimentResult:
    rows, notes = [], []
    test_size = 0
    overrides = cfg.options.get("model_kwargs", {})  # per model name, e.g. for tiny tests
    for name in models(cfg):
        runs = [train_cached(cfg, name, seed=s, model_kwargs=overrides.get(name))
                for s in seeds(cfg)]
        done = [t for t in runs if not t.diverged and t.history]
        if len(done) < len(runs):
            notes.append(f"{name}: {len(runs) - len(done)} of {len(runs)} run(s) diverged and "
                         "are left out of its errors.")
        bundle = dataset(runs[0].config)
        test_size = len(bundle.test)
        rows.append(_row(name, runs, done, (bundle.in_chans, *bundle.image_size), cfg.seeds))
    config = runs[0].config
    return ExperimentResult(
        "densenet", "DenseNet vs ResNet: test error against parameters and multiply-adds",
        rows, findings(rows, test_size), [_plot(rows, cfg)],
        reference=(
            "Huang et al. 2017, Table 2 (CIFAR-10 with augmentation, C10+): DenseNet (k=12) "
            "depth 40, 1.0M parameters: 5.24%; depth 100, 7.0M: 4.10%; DenseNet-BC (k=12) depth "
            "100, 0.8M: 4.51%; DenseNet-BC (k=24) depth 250, 15.3M: 3.62%. He et al. 2015, "
            "Table 6: ResNet-20/32/44/56/110 (0.27M–1.7M): 8.75/7.51/7.17/6.97/6.43%. Sec. 4.3: "
            "DenseNet-BC-100 matches the 1001-layer pre-act ResNet (10.2M) with 90% fewer "
            "parameters. The 'paper' columns below give these numbers (parameters and MACs for "
            "CIFAR-10's 3×32×32 input) beside the measured ones."),
        notes=[
            f"All models trained with the same recipe ({config.data}, {config.epochs} epochs, "
            f"lr {config.lr}, batch {config.batch_size}), not the papers' (DenseNet: batch 64, "
            "300 epochs, Nesterov); errors are the last epoch's, mean over "
            f"{cfg.seeds} seed(s), on {test_size} test images (one image = "
            f"{100 / max(test_size, 1):.2f} points).",
            "params and MACs are `reslab.complexity` of the trained model at the data's input "
            "size (MACs: every Conv2d/Linear multiply-add); seconds: training wall time, recorded "
            "when the model was trained (a model from the cache keeps its own, measured under "
            "whatever else the machine was running then).",
            "Left out of the demo: densenet100_k12 (7.0M parameters, 1.8 GMACs at 32×32, about "
            "6× densenet40_k12's cost) and the larger DenseNets, which do not train within a "
            "demo's minute on a CPU; the small and paper scales include them.",
            *notes,
        ],
    )


def _row(name: str, runs: list[Trained], done: list[Trained], input_size: tuple[int, ...],
         n_seeds: int) -> dict:
    c = complexity(runs[0].model, input_size)
    info = model_info(name)
    test = [100 * t.final.test_top1_error for t in done]
    train = [100 * t.final.train_error for t in done]
    row = {
        "model": name, "family": family(name), "depth": info.depth,
        "params": c.params, "MMACs": c.macs / 1e6,
        "test error (%)": mean_std(test)[0] if test else math.nan,
    }
    if n_seeds > 1:
        row["test error std"] = mean_std(test)[1] if test else math.nan
    row.update({
        "train error (%)": mean_std(train)[0] if train else math.nan,
        "seconds": statistics.fmean(t.seconds for t in runs),
        "paper C10+ error (%)": PAPER_ERROR.get(name, math.nan),
        "paper params": info.params, "paper MMACs @32×32": info.macs / 1e6,
    })
    return row


def dominates(a: dict, b: dict, cost: str) -> bool:
    """a is at least as cheap as b in `cost` and has lower test error."""
    return a[cost] <= b[cost] and a["test error (%)"] < b["test error (%)"]


def pareto(rows: list[dict], cost: str) -> list[dict]:
    """The rows no other row dominates in (cost, test error), cheapest first."""
    ok = [r for r in rows if not math.isnan(r["test error (%)"])]
    front = [r for r in ok if not any(dominates(o, r, cost) for o in ok if o is not r)]
    return sorted(front, key=lambda r: r[cost])


def findings(rows: list[dict], test_size: int) -> list[str]:
    """Statements computed from the table (`test_size` turns error points into images)."""
    out = []
    ok = [r for r in rows if not math.isnan(r["test error (%)"])]
    dense = [r for r in ok if r["family"] == "DenseNet"]
    res = [r for r in ok if r["family"] == "ResNet"]
    if not dense or not res:
        return ["Not every family has a trained model; nothing to compare."]
    bd, br = (min(f, key=lambda r: r["test error (%)"]) for f in (dense, res))
    gap = br["test error (%)"] - bd["test error (%)"]
    images = round(abs(gap) * test_size / 100)
    out.append(
        f"Best DenseNet {bd['model']}: {bd['test error (%)']:.2f}% test error with "
        f"{bd['params'] / 1e6:.2f}M parameters and {bd['MMACs']:.1f} MMACs; best ResNet "
        f"{br['model']}: {br['test error (%)']:.2f}% with {br['params'] / 1e6:.2f}M and "
        f"{br['MMACs']:.1f} MMACs. The DenseNet is "
        + (f"{gap:.2f} points better" if gap > 0 else f"{-gap:.2f} points worse" if gap < 0
           else "equal") + f" ({images} of {test_size} test images) with "
        f"{bd['params'] / br['params']:.2f}× the parameters and {bd['MMACs'] / br['MMACs']:.2f}× "
        "the MACs.")
    for cost, what in (("params", "parameters"), ("MMACs", "multiply-adds")):
        d_wins = [(d, r) for d in dense for r in res if dominates(d, r, cost)]
        r_wins = [(r, d) for d in dense for r in res if dominates(r, d, cost)]
        front = pareto(ok, cost)
        pairs = "; ".join(
            f"{a['model']} beats {b['model']} by "
            f"{round((b['test error (%)'] - a['test error (%)']) * test_size / 100)} test images"
            for a, b in d_wins + r_wins) or "none"
        verdict = ("DenseNets are the more efficient in " + what if len(d_wins) > len(r_wins) else
                   "ResNets are the more efficient in " + what if len(r_wins) > len(d_wins) else
                   "neither family is more efficient in " + what)
        out.append(
            f"In {what}: {len(d_wins)} DenseNet/ResNet pair(s) where the DenseNet costs no more "
            f"and errs less, {len(r_wins)} the other way round ({pairs}); the error-vs-{what} "
            f"Pareto front is {', '.join(r['model'] for r in front)}: {verdict} here.")
    paper = [r for r in rows if not math.isnan(r["paper C10+ error (%)"])]
    pd = [r for r in paper if r["family"] == "DenseNet"]
    pr = [r for r in paper if r["family"] == "ResNet"]
    if pd and pr:
        a = min(pd, key=lambda r: r["paper params"])
        b = max(pr, key=lambda r: r["paper params"])
        out.append(
            f"For comparison, on CIFAR-10+ the paper's {a['model']} "
            f"({a['paper params'] / 1e6:.2f}M parameters) errs {a['paper C10+ error (%)']:.2f}% "
            f"and {b['model']} "
            f"({b['paper params'] / 1e6:.2f}M) {b['paper C10+ error (%)']:.2f}%; measured here "
            f"the same two err {a['test error (%)']:.2f}% and {b['test error (%)']:.2f}%.")
    sd = statistics.fmean(r["seconds"] / r["MMACs"] for r in dense)
    sr = statistics.fmean(r["seconds"] / r["MMACs"] for r in res)
    out.append(
        f"Training time per MMAC: DenseNets {sd:.2f} s, ResNets {sr:.2f} s on average "
        f"({sd / sr:.2f}×): " + ("a DenseNet's concatenations and many thin layers cost more time "
                                 "than their multiply-adds suggest." if sd > sr else
                                 "the DenseNets are no slower per multiply-add here."))
    return out


def _plot(rows: list[dict], cfg: ExperimentConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("params", "test error (%)", "parameters", f"measured on {cfg.dataset}"),
              ("MMACs", "test error (%)", f"MMACs at the input size of {cfg.dataset}",
               f"measured on {cfg.dataset}"),
              ("paper params", "paper C10+ error (%)", "parameters (CIFAR-10)",
               "paper, CIFAR-10+"))
    markers = {"ResNet": ("o", "tab:blue"), "DenseNet": ("s", "tab:orange")}
    for ax, (x, y, xlabel, title) in zip(axes, panels):
        for fam, (marker, color) in markers.items():
            pts = [r for r in rows if r["family"] == fam and not math.isnan(r[y])]
            ax.scatter([r[x] for r in pts], [r[y] for r in pts], marker=marker, color=color,
                       label=fam)
            for r in pts:
                ax.annotate(r["model"], (r[x], r[y]), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # crowded labels on a short log axis
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("DenseNet vs ResNet: error against cost")
    return save_figure(fig, cfg.folder / "densenet.png")
