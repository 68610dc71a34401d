"""The lesion experiment: deletions, path-length distribution, gradients per path, findings."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from reslab.experiments import ExperimentConfig, run_experiment
from reslab.experiments.common import dataset, train_cached
from reslab.experiments.lesion import (
    PathGradients, effective_range, error_rate, findings, gradient_per_length, lesioned,
    path_length_distribution, random_deletions,
)
from reslab.data import InMemoryDataset, normalize
from reslab.models.resnet import cifar_resnet
from reslab.train import evaluate_model

TRAIN = {"precision": "fp32", "channels_last": False}
K_TABLE = "Deleting k random units (test error, %)"
PATHS = "Path lengths and the gradient per path length"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cfg = ExperimentConfig("lesion", scale="demo", out=str(tmp_path_factory.mktemp("l")),
                           budget=0.05, options={"model": "resnet20", "trials": 2,
                                                 "max_deleted": 3, "path_samples": 4,
                                                 "train": TRAIN})
    return cfg, run_experiment(cfg)


# ----------------------------------------------------------------------------- the experiment

def test_writes_tables_figures_and_report(result):
    cfg, res = result
    for name in ("results.csv", "results.json", "report.md", "lesion_single.png",
                 "lesion_k.png", "paths.png"):
        assert (cfg.folder / name).stat().st_size > 0, name
    report = (cfg.folder / "report.md").read_text()
    assert K_TABLE in report and PATHS in report and "![paths](paths.png)" in report


def test_one_row_per_unit_with_the_model_s_downsampling_units_marked(result):
    _, res = result
    assert [r["unit"] for r in res.rows] == list(range(1, 10))
    assert [r["stage"] for r in res.rows] == [1] * 3 + [2] * 3 + [3] * 3
    # resnet20: the first unit of stages 2 and 3 strides and zero-pads its shortcut.
    assert [r["downsampling"] for r in res.rows] == [False] * 3 + [True, False, False] * 2


def test_deleting_no_unit_reproduces_the_model_s_error_exactly(result):
    cfg, res = result
    k0 = res.extra_tables[K_TABLE][0]
    assert k0["k"] == 0 and k0["trials"] == 1
    for family, name in (("resnet", "resnet20"), ("plain", "plain20")):
        trained = train_cached(cfg, name)
        bundle = dataset(trained.config)
        full = evaluate_model(trained.model, bundle.test, mean=bundle.mean, std=bundle.std)
        assert k0[f"{family} mean (%)"] == 100 * full.top1_error
        # ... which is the error the training itself reported after its last epoch.
        assert k0[f"{family} mean (%)"] == 100 * trained.history[-1].test_top1_error
        assert k0[f"{family} std"] == 0.0


def test_single_deletion_rows_match_a_direct_lesioned_evaluation(result):
    cfg, res = result
    trained = train_cached(cfg, "resnet20")
    bundle = dataset(trained.config)
    x = normalize(bundle.test.images, bundle.mean, bundle.std)

    def direct_error() -> float:  # written out here, independent of the experiment's code
        with torch.no_grad():
            wrong = (trained.model.eval()(x).argmax(1) != bundle.test.labels).sum()
        return 100 * int(wrong) / len(x)

    full = direct_error()
    for unit in (4, 9):
        with lesioned(trained.model, [unit - 1]):
            expected = direct_error()
        row = res.rows[unit - 1]
        assert row["resnet error (%)"] == expected
        assert row["resnet Δ (points)"] == pytest.approx(expected - full)
    assert not any(u.lesioned for u in trained.model.units())


def test_path_table_is_binomial_and_the_shares_sum_to_one(result):
    _, res = result
    paths = res.extra_tables[PATHS]
    assert [p["length k"] for p in paths] == list(range(10))
    assert [p["paths C(n,k)"] for p in paths] == [math.comb(9, k) for k in range(10)]
    assert math.fsum(p["fraction of paths"] for p in paths) == pytest.approx(1, abs=1e-15)
    assert math.fsum(p["share of total gradient"] for p in paths) == pytest.approx(1)
    shares = [p["paths C(n,k)"] * p["gradient magnitude"] for p in paths]
    assert [p["share of total gradient"] for p in paths] == pytest.approx(
        [s / sum(shares) for s in shares])
    assert all(p["gradient magnitude"] > 0 for p in paths)


def test_findings_follow_from_the_tables(result):
    _, res = result
    k_rows, paths = res.extra_tables[K_TABLE], res.extra_tables[PATHS]
    full = {"resnet": k_rows[0]["resnet mean (%)"], "plain": k_rows[0]["plain mean (%)"]}
    assert res.findings == findings(res.rows, k_rows, paths, full, 90.0, "resnet20", "plain20")
    a, b = effective_range([p["share of total gradient"] for p in paths])
    assert any(f"comes from paths {a}–{b} units long" in f for f in res.findings)
    assert any(f.startswith("With n = 9 units there are 2^9 = 512 paths") for f in res.findings)


def test_the_model_option_must_name_a_cifar_resnet(tmp_path):
    cfg = ExperimentConfig("lesion", out=str(tmp_path), options={"model": "densenet40_k12"})
    with pytest.raises(ValueError, match=r"choose options\['model'\] from .*resnet56"):
        run_experiment(cfg)


@pytest.mark.parametrize("options, message", [
    ({"max_deleted": 10}, r"options\['max_deleted'\] = 10 exceeds the 9 units of resnet20"),
    ({"trials": 0}, r"options\['trials'\] must be an integer >= 1, got 0"),
    ({"path_samples": "many"}, r"options\['path_samples'\] must be an integer >= 1"),
])
def test_bad_options_are_rejected_before_any_training(tmp_path, options, message):
    cfg = ExperimentConfig("lesion", out=str(tmp_path), options={"model": "resnet20", **options})
    with pytest.raises(ValueError, match=message):
        run_experiment(cfg)
    assert not (tmp_path / "_models").exists()


# ----------------------------------------------------------------------------- the pieces

def test_path_lengths_follow_binomial_n_one_half():
    assert path_length_distribution(4) == [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]
    for n in (27, 54, 600, 1500):  # 1500: C(n, k) and 2ⁿ both overflow a float
        p = path_length_distribution(n)
        assert math.fsum(p) == pytest.approx(1, abs=1e-12)
        assert math.fsum(k * q for k, q in enumerate(p)) == pytest.approx(n / 2)
    # Veit et al.'s 54 units: 98.0% of paths are 19–35 long (paper-numbers.md, section E).
    assert math.fsum(path_length_distribution(54)[19:36]) == pytest.approx(0.980, abs=5e-4)


def test_effective_range_is_the_shortest_interval_holding_the_mass():
    assert effective_range([0.0, 0.05, 0.9, 0.05]) == (2, 2)
    assert effective_range([0.25] * 4) == (0, 3)
    assert effective_range([0.25] * 4, mass=0.5) == (0, 1)  # ties: the lowest start
    assert effective_range([1, 3, 3, 1], mass=0.7) == (1, 2)  # unnormalised weights
    assert effective_range([0.1, 0.4, 0.1, 0.4], mass=0.5) == (0, 1)
    with pytest.raises(ValueError, match="mass"):
        effective_range([1.0], mass=0)
    with pytest.raises(ValueError, match="non-negative"):
        effective_range([0.0, 0.0])


def _tiny_resnet():
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_chans=1).eval()  # 3 units, 2 of them downsample
    for m in model.modules():  # non-trivial BN statistics, so eval-mode BN is not an identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_path_gradients_share_the_model_s_forward_pass():
    model = _tiny_resnet()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    paths = PathGradients(model, x, y)
    with torch.no_grad():
        assert torch.equal(paths.logits, model(x))
    assert len(paths) == 3 and all(p.requires_grad for p in model.parameters())


def test_error_rate_in_channels_last_and_bf16_matches_and_keeps_the_model_trainable():
    model = _tiny_resnet().eval()
    gen = torch.Generator().manual_seed(0)
    test = InMemoryDataset(torch.randint(0, 256, (40, 1, 8, 8), generator=gen, dtype=torch.uint8),
                           torch.randint(0, 4, (40,), generator=gen))
    stats = dict(mean=[0.5], std=[0.25])
    x = normalize(test.images, **stats)
    with torch.no_grad():
        reference = float((model(x).argmax(1) != test.labels).float().mean())
    assert error_rate(model, test, **stats, batch_size=16) == pytest.approx(reference)
    model.to(memory_format=torch.channels_last)  # as the experiment does, outside inference mode
    assert error_rate(model, test, **stats, batch_size=16, channels_last=True) == \
        pytest.approx(reference)
    low = error_rate(model, test, **stats, batch_size=16, precision="bf16", channels_last=True)
    assert abs(low - reference) <= 0.1  # bf16 may flip a near-tie or two, not more
    # The path gradients still work on the same model afterwards (no inference tensors).
    assert not any(p.is_inference() for p in model.parameters())
    paths = PathGradients(model, x[:4], test.labels[:4])
    assert paths.gradient([True] * len(paths)).shape == (4, *paths.inputs[0].shape[1:])


def test_the_gradients_of_all_paths_sum_to_the_full_gradient():
    model = _tiny_resnet()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    x0 = model.stem(x).detach().requires_grad_()
    h = x0
    for unit in model.units():
        h = unit(h)
    loss = F.cross_entropy(model.forward_head(h), y, reduction="sum")
    (full,) = torch.autograd.grad(loss, x0)
    paths = PathGradients(model, x, y)
    total = sum(paths.gradient(mask) for mask in itertools.product([False, True], repeat=3))
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)
    # One path alone is only part of it.
    assert not torch.allclose(paths.gradient([True, True, True]), full, rtol=1e-3)


def test_path_gradients_need_original_residual_units():
    model = cifar_resnet(8, unit="full_preact", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="original residual units"):
        PathGradients(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"one flag per unit \(3\)"):
        paths = PathGradients(_tiny_resnet(), torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
        paths.gradient([True])


def test_gradient_per_length_samples_every_length():
    model = _tiny_resnet()
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 4, (20,))
    mean, std = gradient_per_length(model, images, labels, (0.5,), (0.25,), samples=3,
                                    batches=2, batch_size=8)
    assert len(mean) == len(std) == 4 and all(m > 0 for m in mean)
    again = gradient_per_length(model, images, labels, (0.5,), (0.25,), samples=3, batches=2,
                                batch_size=8)
    assert again == (mean, std)  # seeded: reproducible


def test_lesioned_restores_the_units_and_rejects_bad_indices():
    model = _tiny_resnet()
    with lesioned(model, [0, 2]):
        assert [u.lesioned for u in model.units()] == [True, False, True]
    assert not any(u.lesioned for u in model.units())
    with pytest.raises(ValueError, match=r"unit indices \[3\] out of range: the model has 3"):
        with lesioned(model, [3]):
            pass


def test_random_deletions_draw_distinct_units():
    sets = random_deletions(9, 4, trials=5)
    assert sets[0] == [[]]
    for k in range(1, 5):
        assert len(sets[k]) == 5
        assert all(len(set(s)) == k and all(0 <= i < 9 for i in s) for s in sets[k])
    assert random_deletions(9, 4, trials=5) == sets


def _tables(resnet_single, plain_single, resnet_k, plain_k, magnitudes):
    n = len(resnet_single)
    rows = [{"unit": i + 1, "stage": 1, "downsampling": i == 2,
             "resnet error (%)": 10 + r, "resnet Δ (points)": r,
             "plain error (%)": 20 + p, "plain Δ (points)": p}
            for i, (r, p) in enumerate(zip(resnet_single, plain_single))]
    k_rows = [{"k": k, "trials": 3, "resnet mean (%)": r, "resnet std": 1.0,
               "plain mean (%)": p, "plain std": 1.0}
              for k, (r, p) in enumerate(zip(resnet_k, plain_k))]
    counts = [math.comb(n, k) for k in range(n + 1)]
    total = sum(c * m for c, m in zip(counts, magnitudes))
    paths = [{"length k": k, "paths C(n,k)": c, "fraction of paths": c / 2**n,
              "gradient magnitude": m, "gradient std": 0.0, "share of total gradient": c * m / total}
             for k, (c, m) in enumerate(zip(counts, magnitudes))]
    return rows, k_rows, paths, {"resnet": 10.0, "plain": 20.0}


def test_findings_confirm_veit_et_al_when_the_numbers_do():
    rows, k_rows, paths, full = _tables(
        [0.5, 1.0, 6.0, 0.0], [60, 65, 70, 62], [10, 14, 19, 25], [20, 85, 88, 90],
        [1.0, 0.1, 0.01, 0.001, 0.0001])
    out = findings(rows, k_rows, paths, full, 90.0, "resnet8", "plain8")
    assert out[0] == (
        "Deleting one of the 3 non-downsampling units of resnet8 (error 10.00%) raises its "
        "error by +0.50 points on average (median +0.50); 3 of them barely hurt (less than 10% "
        "of the way to chance); the worst are units 2 (+1.00), 1 (+0.50), 4 (+0.00): no single "
        "unit matters much, as Veit et al. find.")
    assert "the downsampling units matter more, as in the paper" in out[1]
    assert out[2].startswith("Deleting one unit of plain8 raises its error from 20.00% to "
                             "84.25% on average") and "collapses toward chance" in out[2]
    assert out[3].endswith("it rises smoothly: no step is more than 2× the average step, and "
                           "none falls back more than 10% of the rise.")
    assert "not smoothly: the step to k = 1 carries 93% of the rise" in out[4]
    assert "a factor 0.100 per residual branch" in out[6] and "decays exponentially" in out[6]
    assert "comes from paths 0–1 units long" in out[7] and "shorter than the typical" in out[7]


def test_findings_say_when_the_lesion_effects_are_absent():
    rows, k_rows, paths, full = _tables(
        [30.0, 1.0, 0.0, 0.0], [1, 2, 0, 1], [10, 40, 20, 50], [20, 21, 20, 22],
        [1.0, 2.0, 4.0, 8.0, 16.0])
    out = findings(rows, k_rows, paths, full, 90.0, "resnet8", "plain8")
    assert "2 of them barely hurt" in out[0] and "some single units are essential" in out[0]
    assert "they matter no more than a typical unit in this run" in out[1]
    assert "does not collapse toward chance in this run" in out[2]
    assert "not monotonically: the mean falls by 20.00 points at k = 2" in out[3]
    assert "mean std 1.0 points" in out[3]
    assert "does not decay with path length in this run" in out[6]
    assert "not shorter than the typical path in this run" in out[7]
