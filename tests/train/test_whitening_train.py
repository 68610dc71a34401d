"""Training fits a model's input-whitening layer to the training images once, before the first
step; the filters stay fixed and a resumed run keeps the ones it started with."""

from __future__ import annotations

import pytest
import torch

from reslab.data import normalize
from reslab.models.layers import PatchWhitening
from reslab.train import TrainConfig, resume, train
from reslab.train.loop import load_data
from reslab.checkpoint import load_state_dict_file


def whiten_config(out, **overrides) -> TrainConfig:
    values = dict(model="resnet9", data="synthetic", out=str(out), batch_size=16, epochs=2,
                  model_kwargs={"widths": (8, 8, 16, 16), "whiten": 2}, progress="none",
                  data_options={"image_size": 12, "num_train": 48, "num_test": 16},
                  deterministic=True, precision="fp32", ema_decay=0.9)
    values.update(overrides)
    return TrainConfig.from_recipe("fast", **values)


def test_training_fits_the_whitening_to_the_normalised_training_images_and_keeps_it(tmp_path):
    cfg = whiten_config(tmp_path / "run")
    result = train(cfg)
    data = load_data(result.config)
    expected = PatchWhitening(3).fit(normalize(data.train.images, data.mean, data.std))
    saved = load_state_dict_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert bool(saved["whiten.fitted"])
    torch.testing.assert_close(saved["whiten.weight"], expected.weight, rtol=0, atol=0)
    assert torch.count_nonzero(saved["whiten.bias"]) > 0  # the bias trained
    torch.testing.assert_close(result.eval_model.whiten.weight, expected.weight, rtol=0, atol=0)


def test_a_resumed_run_keeps_its_filters_and_equals_the_uninterrupted_one(tmp_path, stop_at_step,
                                                                          monkeypatch):
    full = train(whiten_config(tmp_path / "a"))
    part = train(whiten_config(tmp_path / "b"), callbacks=[stop_at_step(4)])
    assert (part.status, part.steps) == ("stopped", 4)

    def refit(*args, **kwargs):
        raise AssertionError("a resumed run must not fit its whitening again")

    monkeypatch.setattr(PatchWhitening, "fit", refit)
    rest = resume(tmp_path / "b")
    assert (rest.status, rest.steps) == ("completed", full.steps)
    a = load_state_dict_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_whose_whitening_is_fitted_already_is_trained_as_given(tmp_path):
    from reslab import create_model
    from reslab.train import fit

    cfg = whiten_config(None)
    data = load_data(cfg)
    model = create_model("resnet9", widths=(8, 8, 16, 16), whiten=2)
    model.whiten.fit(torch.randn(4, 3, 12, 12))
    mine = model.whiten.weight.clone()
    fit(model, data, cfg.replace(out=None))
    assert torch.equal(model.whiten.weight, mine)


@pytest.mark.parametrize("fitted", [False, True])
def test_fit_to_data_reports_what_it_fitted(fitted):
    from reslab import create_model
    from reslab.train.loop import fit_to_data

    data = load_data(whiten_config(None))
    model = create_model("resnet9", widths=(8, 8, 16, 16), whiten=2)
    if fitted:
        model.whiten.fitted.fill_(True)
    assert fit_to_data(model, data) == (0 if fitted else 1)
    assert fit_to_data(create_model("resnet20"), data) == 0
