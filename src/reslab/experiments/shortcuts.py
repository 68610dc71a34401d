"""Shortcut options A/B/C (He et al. 2015, Table 3) and the shortcut variants of He et al. 2016
(Identity Mappings, Fig. 2 / Table 1), all on one CIFAR ResNet depth.

He et al. 2015, Sec. 3.3: where a unit changes the number of channels, the shortcut either
zero-pads the extra channels (A, no parameters), projects with a 1×1 conv there only (B), or
projects on every shortcut (C). On ImageNet ResNet-34 (top-1, 10-crop) A/B/C give 25.03 / 24.52 /
24.19 %: projections help a little, not enough to be "essential for addressing the degradation".

He et al. 2016, Sec. 3: a unit x_{l+1} = h(x_l) + F(x_l) with a modified shortcut h no longer
passes ∂L/∂x_L straight back (Eq. 5 gains a factor Π λ_i or the gates'), and the paper finds every
modification worse than the identity on ResNet-110 / CIFAR-10 — with *higher training error*,
including the gated and 1×1-conv shortcuts whose solution space contains the identity's, so the
trouble is optimisation, not representation. Here each case is the CIFAR ResNet with the
``shortcut=`` / ``shortcut_variant=`` model options (or its plain twin for λ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ExperimentConfig, ExperimentResult
from .report import save_figure
from .common import dataset
from .preact import (cifar_depth, error_columns, params, plot_curves, ranking, schedule_text,
                     sort_key, test_images, train_seeds)

# ResNet-20 at the demo scale: eleven cases, ten trainings (option A is the identity network and
# the 1×1-conv shortcut is option C's), ~5 s each on 2 CPU cores, within the ~90 s demo budget.
DEPTH = {"demo": 20, "small": 56, "paper": 110}
OPTIONS = "options A/B/C"
VARIANTS = "shortcut variants"
FAIL = "fail (>20%)"  # [R2] Table 1: "fail" means a test error above 20%
# How much higher a case's final training error must be than the identity's (percentage points)
# for the findings to call its optimisation hampered: on the 1,437 digits that is ~14 images, more
# than the epoch-to-epoch jitter of the running training error at the end of the schedule.
HAMPER_MARGIN = 1.0


@dataclass(frozen=True)
class Case:
    key: str  # the name cfg.options["cases"] selects it by
    study: str  # OPTIONS or VARIANTS
    label: str
    on_shortcut: str  # what multiplies / replaces the shortcut (the paper's Table 1 columns)
    on_residual: str
    paper: float | None  # the paper's error %, None for "fail"
    kwargs: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # λ = 0 on the shortcut: the plain twin

    def model(self, depth: int) -> str:
        return f"plain{depth}" if self.plain else f"resnet{depth}"


CASES = (
    # He et al. 2015, Table 3: ImageNet ResNet-34, top-1 error, 10-crop.
    Case("A", OPTIONS, "option A: zero-padding", "identity / zero-pad", "1", 25.03),
    Case("B", OPTIONS, "option B: projection where channels grow", "1×1 conv on increase", "1",
         24.52, {"shortcut": "B"}),
    Case("C", OPTIONS, "option C: projection everywhere", "1×1 conv", "1", 24.19,
         {"shortcut": "C"}),
    # He et al. 2016, Table 1: ResNet-110, CIFAR-10 test error (median of 5 runs).
    Case("identity", VARIANTS, "original (identity)", "1", "1", 6.61),
    Case("plain", VARIANTS, "constant scaling λ=0 (plain net)", "0", "1", None, plain=True),
    Case("scaling_shortcut", VARIANTS, "constant scaling", "0.5", "1", None,
         {"shortcut_variant": "scaling", "shortcut_scale": 0.5, "residual_scale": 1.0}),
    Case("scaling", VARIANTS, "constant scaling", "0.5", "0.5", 12.35,
         {"shortcut_variant": "scaling", "shortcut_scale": 0.5, "residual_scale": 0.5}),
    Case("exclusive_gating_0", VARIANTS, "exclusive gating, b_g=0", "1−g(x)", "g(x)", None,
         {"shortcut_variant": "exclusive_gating", "gate_bias": 0.0}),
    Case("exclusive_gating", VARIANTS, "exclusive gating, b_g=−6", "1−g(x)", "g(x)", 8.70,
         {"shortcut_variant": "exclusive_gating", "gate_bias": -6.0}),
    Case("shortcut_gating_0", VARIANTS, "shortcut-only gating, b_g=0", "1−g(x)", "1", 12.86,
         {"shortcut_variant": "shortcut_gating", "gate_bias": 0.0}),
    Case("shortcut_gating", VARIANTS, "shortcut-only gating, b_g=−6", "1−g(x)", "1", 6.91,
         {"shortcut_variant": "shortcut_gating", "gate_bias": -6.0}),
    # The 1×1-conv shortcut (Fig. 2e, conv + BN on every shortcut) builds exactly option C's
    # network — same modules, same initialisation — so it is trained once for both rows.
    Case("conv1x1", VARIANTS, "1×1 conv shortcut", "1×1 conv", "1", 12.22, {"shortcut": "C"}),
    Case("dropout", VARIANTS, "dropout shortcut, p=0.5", "dropout 0.5", "1", None,
         {"shortcut_variant": "dropout", "shortcut_dropout": 0.5}),
)
# Cases whose solution space contains the identity shortcut's (a 1×1 conv can be the identity; a
# gate can saturate open): higher training error there cannot be a lack of representational power.
SUPERSETS = ("conv1x1", "exclusive_gating", "shortcut_gating_0", "shortcut_gating")

REFERENCE = (
    "He et al. 2015 (arXiv:1512.03385) Table 3, ImageNet val, ResNet-34 top-1 / top-5 error % "
    "(10-crop): A 25.03 / 7.76, B 24.52 / 7.46, C 24.19 / 7.40 — 'projection shortcuts are not "
    "essential for addressing the degradation problem', so the paper keeps A or B. "
    "He et al. 2016 (arXiv:1603.05027) Table 1, ResNet-110 on CIFAR-10, test error % (median of 5 "
    "runs; 'fail' = above 20%): original 6.61; constant scaling 0/1 (a plain net) fail, 0.5/1 "
    "fail, 0.5/0.5 12.35; exclusive gating b_g = 0…−5 fail, −6 8.70, −7 9.81; shortcut-only gating "
    "b_g = 0 12.86, −6 6.91; 1×1 conv shortcut 12.22; dropout shortcut (0.5) fail. The paper reads "
    "the higher *training* loss of these cases (its Fig. 3) as optimisation difficulty: the "
    "gating and 1×1-conv shortcuts can represent the identity yet train worse."
)


def cases(cfg: ExperimentConfig) -> list[Case]:
    """The cases to run: all, or the keys named in ``cfg.options["cases"]`` (in table order)."""
    wanted = cfg.options.get("cases")
    keys = [c.key for c in CASES]
    if wanted is None:
        return list(CASES)
    bad = sorted(set(wanted) - set(keys))
    if bad or not wanted:
        raise ValueError(f"unknown shortcut case(s) {', '.join(bad) or '(none given)'}; choose "
                         f"from {', '.join(keys)}")
    return [c for c in CASES if c.key in wanted]


def run(cfg: ExperimentConfig) -> ExperimentResult:
    """Train every case on one CIFAR ResNet depth (``cfg.options["depth"]``) and tabulate."""
    depth = cifar_depth(cfg, DEPTH, plain=True)
    rows, curves, some = [], {}, None
    for case in cases(cfg):
        runs = train_seeds(cfg, case.model(depth), case.kwargs)
        some = some or runs
        if case.study == VARIANTS:
            curves[f"{case.label} ({case.on_shortcut} · s, {case.on_residual} · F)"] = runs
        rows.append({
            "study": case.study, "case": case.label, "key": case.key,
            "on shortcut": case.on_shortcut, "on F": case.on_residual,
            "network": case.model(depth) + "".join(f" {k}={v}" for k, v in case.kwargs.items()),
            "params": params(runs), **error_columns(runs),
            "paper (%)": FAIL if case.paper is None else case.paper,
        })
    n_test = test_images(some)
    figures = [_plot_bars(rows, cfg, depth)]
    if curves:
        figures.append(plot_curves(cfg, curves, "shortcut_variants_curves.png",
                                   f"Shortcut variants on ResNet-{depth} ({cfg.dataset})"))
    config = some[0].config
    return ExperimentResult(
        "shortcuts", f"Shortcut options A/B/C and shortcut variants on ResNet-{depth}",
        rows, findings(rows, n_test), figures, reference=REFERENCE,
        notes=[
            f"Every case is `resnet{depth}` (or `plain{depth}` for λ = 0) with the options in the "
            f"'network' column, trained with the `{cfg.scale}` recipe "
            f"({schedule_text(some[0])}, lr {config.lr}, "
            f"{len(dataset(config).train.labels)} training images) on {cfg.dataset}, "
            f"{cfg.seeds} seed(s)."
            + (f" The demo uses ResNet-{depth} so that its trainings fit the ~90 s demo budget "
               "on 2 CPU cores." if cfg.scale == "demo" else ""),
            "Option A and the original (identity) unit are the same network, and so are option C "
            "and the 1×1-conv shortcut (conv + BN on every shortcut): each pair is trained once "
            "and appears in both studies.",
            "The options' paper column is ImageNet ResNet-34 top-1 (10-crop), the variants' "
            f"ResNet-110 on CIFAR-10; on {cfg.dataset} only the orderings compare.",
            f"The test set has {n_test} images (one image = {100 / n_test:.2f} points). "
            f"'Hampered' optimisation below means a final training error more than "
            f"{HAMPER_MARGIN:g} point above the identity's.",
        ],
    )


# ----------------------------------------------------------------------------- findings

def findings(rows: list[dict[str, Any]], n_test: int) -> list[str]:
    """What the table shows about the two papers' claims, computed from `rows`."""
    by = {r["key"]: r for r in rows}
    out = []
    if all(k in by for k in "ABC"):
        out += _options_findings(by["A"], by["B"], by["C"], n_test)
    variants = [r for r in rows if r["study"] == VARIANTS and r["key"] != "identity"]
    if "identity" in by and variants:
        out += _variant_findings(by["identity"], variants)
    diverged = [r["case"] for r in rows if r["diverged"]]
    if diverged:
        out.append("Training diverged for " + ", ".join(diverged) + " (errors missing, ranked "
                   "last).")
    return out


def _options_findings(a: dict, b: dict, c: dict, n_test: int) -> list[str]:
    out = [
        f"Parameters: option A {a['params']:,}, B {b['params']:,} "
        f"(+{b['params'] - a['params']:,}, {100 * (b['params'] / a['params'] - 1):.1f}%), "
        f"C {c['params']:,} (+{c['params'] - a['params']:,}, "
        f"{100 * (c['params'] / a['params'] - 1):.1f}%)."
    ]
    test = {k: r["test error (%)"] for k, r in zip("ABC", (a, b, c))}
    order = sorted("ABC", key=lambda k: sort_key(test[k]))
    text = ranking([{"k": k, "e": test[k]} for k in order], "e", lambda r: r["k"])
    gap = test["A"] - test["C"]
    if order == ["C", "B", "A"] and len(set(test.values())) == 3:
        verdict = "the paper's order (C < B < A on ImageNet ResNet-34: 24.19 < 24.52 < 25.03)"
    else:
        verdict = "not the paper's C < B < A (24.19 < 24.52 < 25.03 on ImageNet ResNet-34)"
    out.append(
        f"Test error by option: {text} — {verdict}. A − C = {gap:+.2f} points "
        f"({gap * n_test / 100:+.0f} of {n_test} test images) against the paper's +0.84: "
        + ("projections lower the test error here too." if gap > 0 else
           "the projections' extra parameters do not lower the test error here.")
    )
    return out


def _variant_findings(ident: dict, variants: list[dict]) -> list[str]:
    out = []
    t0, tr0 = ident["test error (%)"], ident["train error (%)"]
    better = [r for r in variants if r["test error (%)"] < t0]
    closest = min(variants, key=lambda r: sort_key(r["test error (%)"]))
    if better:
        out.append(
            f"{len(better)} of {len(variants)} shortcut modifications "
            + ("beats" if len(better) == 1 else "beat")
            + f" the identity shortcut's test error ({t0:.2f}%): " + ", ".join(
                f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F) {r['test error (%)']:.2f}%"
                for r in better)
            + ". In the paper none does (the closest, shortcut-only gating with b_g = −6, "
              "has 6.91% against 6.61%).")
    else:
        out.append(
            f"None of the {len(variants)} shortcut modifications beats the identity shortcut's "
            f"test error ({t0:.2f}%), as in the paper; the closest is {closest['case']} "
            f"({closest['on shortcut']} · s, {closest['on F']} · F) at "
            f"{closest['test error (%)']:.2f}% (paper: shortcut-only gating b_g = −6, 6.91%).")

    hampered = sorted((r for r in variants if not r["train error (%)"] <= tr0 + HAMPER_MARGIN),
                      key=lambda r: -sort_key(r["train error (%)"]))
    fine = [r for r in variants if r not in hampered]
    out.append(
        (f"Hampered optimisation — final training error more than {HAMPER_MARGIN:g} point above "
         f"the identity's {tr0:.2f}%: " + ", ".join(
             f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F) {_pct(r['train error (%)'])}"
             for r in hampered) if hampered else
         f"No modification's final training error is more than {HAMPER_MARGIN:g} point above "
         f"the identity's {tr0:.2f}%")
        + (("; within that margin: " + ", ".join(
            f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F) "
            f"{r['train error (%)']:.2f}%" for r in fine)) if fine else "")
        + ". The paper sees a higher training loss for the modified shortcuts (its Fig. 3) and "
          "reads it as hampered optimisation.")

    supersets = [r for r in variants if r["key"] in SUPERSETS]
    if supersets:
        worse = [r for r in supersets if r in hampered]
        extra = sorted({r["params"] - ident["params"] for r in supersets})
        out.append(
            "The shortcuts that can represent the identity (1×1 conv, gates) have "
            + (f"{extra[0]:,}" if len(extra) == 1 else f"{extra[0]:,}–{extra[-1]:,}")
            + " extra parameters; "
            + (f"{len(worse)} of {len(supersets)} of them still train worse than the identity "
               "(" + ", ".join(f"{r['case']} {_pct(r['train error (%)'])}" for r in worse)
               + "), so the gap is optimisation, not representational power, as the paper argues."
               if worse else
               f"none of the {len(supersets)} trains worse than the identity here, so this run "
               "shows no optimisation penalty for them."))

    fails = [r for r in variants if r["paper (%)"] == FAIL]
    if fails:
        table1 = [ident, *variants]
        worst = sorted(table1, key=lambda r: -sort_key(r["test error (%)"]))[: len(fails)]
        above = [r for r in fails if not r["test error (%)"] <= 20]
        out.append(
            f"The paper's failing cases (test error above 20%) reach here: " + ", ".join(
                f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F) "
                f"{_pct(r['test error (%)'])}" for r in fails)
            + f"; {len(above)} of {len(fails)} exceed 20%, and "
            + (f"they are the {len(fails)} worst of the table."
               if {id(r) for r in worst} == {id(r) for r in fails} else
               f"the {len(fails)} worst cases here are " + ", ".join(
                   f"{r['case']} ({r['on shortcut']} · s, {r['on F']} · F)" for r in worst) + "."))
    return out


def _pct(value: float) -> str:
    return "diverged" if math.isnan(value) else f"{value:.2f}%"


# ----------------------------------------------------------------------------- figure

def _plot_bars(rows: list[dict[str, Any]], cfg: ExperimentConfig, depth: int) -> Path:
    """Final training and test error per case, grouped by study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n({r['on shortcut']} · s, {r['on F']} · F)" if r["study"] == VARIANTS
              else r["case"].replace(": ", "\n") for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(rows)), 4.8))
    width = 0.4
    train = [r["train error (%)"] for r in rows]
    test = [r["test error (%)"] for r in rows]
    ax.bar([i - width / 2 for i in x], train, width, label="final training error")
    ax.bar([i + width / 2 for i in x], test, width, label="test error")
    for i, r in enumerate(rows):
        if r["diverged"]:
            ax.annotate("diverged", (i, 0), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6.5, rotation=45, ha="right")
    ax.set_ylabel("error (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Shortcut options and variants, ResNet-{depth} on {cfg.dataset}")
    return save_figure(fig, cfg.folder / "shortcuts.png")
