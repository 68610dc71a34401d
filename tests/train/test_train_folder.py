"""Training and evaluating on an image folder (DataLoader path) and on synthetic data."""

import numpy as np
import torch
import pytest
from PIL import Image

from reslab.train import TrainConfig, evaluate, resume, train, Callback, StopTraining
from reslab.checkpoint import load_state_dict_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.jpg")
    return root


def folder_config(root, out, **kw) -> TrainConfig:
    return TrainConfig.from_recipe(
        "default", model="resnet20", data="folder", data_dir=str(root), out=str(out),
        data_options={"image_size": 32, "resize": 36}, batch_size=4, epochs=2, workers=0,
        progress="none", deterministic=True, **kw)


def test_folder_training_uses_the_dataloader_and_writes_a_run(folder, tmp_path):
    result = train(folder_config(folder, tmp_path / "run"))
    assert (result.steps, result.epochs) == (6, 2)  # 12 images / batch 4
    assert result.final.test_top1_error is not None
    r = evaluate(tmp_path / "run", tta="10crop", workers=0)
    assert (r.count, r.tta) == (4, "10crop")


def test_folder_run_resumes_mid_epoch_to_the_same_sample_order(folder, tmp_path):
    # Folder augmentation happens in the dataset (per-sample torch RNG); with workers=0 it draws
    # from the restored global RNG, so the resumed run is exact here too.
    class StopAt(Callback):
        def on_step_end(self, state):
            if state.step == 4:
                raise StopTraining

    train(folder_config(folder, tmp_path / "a"))
    train(folder_config(folder, tmp_path / "b"), callbacks=[StopAt()])
    resume(tmp_path / "b")
    a = load_state_dict_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_synthetic_data_of_any_shape(tmp_path):
    cfg = TrainConfig.from_recipe("fast", model="resnet20", data="synthetic", out=str(tmp_path),
                                  data_options={"image_size": 12, "in_chans": 2, "num_classes": 3,
                                                "num_train": 64, "num_test": 16},
                                  batch_size=32, epochs=1, progress="none")
    result = train(cfg)
    assert (result.config.in_chans, result.config.num_classes, result.steps) == (2, 3, 2)


def test_training_refuses_a_10crop_evaluation_of_a_folder_dataset(folder, tmp_path):
    # Its test images are already cropped to the model's size: the 10 "crops" would be the image
    # and its mirror five times over. `reslab eval --tta 10crop` is the way (tested above).
    with pytest.raises(ValueError, match=r"--eval-tta 10crop during training needs an in-memory "
                                         r"dataset .*not 'folder'.*reslab eval RUN --tta 10crop"):
        train(folder_config(folder, tmp_path / "run", eval_tta="10crop"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_run_fits_its_whitening_to_the_same_training_crops_every_time(folder, tmp_path,
                                                                               monkeypatch):
    from reslab.models.layers import PatchWhitening

    seen = []
    fit = PatchWhitening.fit

    def recording_fit(self, images, *args, **kwargs):
        seen.append(images.clone())
        return fit(self, images, *args, **kwargs)

    monkeypatch.setattr(PatchWhitening, "fit", recording_fit)
    weights = []
    for run in ("a", "b"):
        cfg = folder_config(folder, tmp_path / run).replace(
            epochs=1, model="resnet9", model_kwargs={"widths": (8, 8, 16, 16), "whiten": 2})
        train(cfg)
        saved = load_state_dict_file(tmp_path / run / "checkpoints" / "last.safetensors")
        assert bool(saved["whiten.fitted"])
        weights.append(saved["whiten.weight"])
    assert [tuple(x.shape) for x in seen] == [(12, 3, 32, 32)] * 2  # every training image, cropped
    assert torch.equal(seen[0], seen[1]) and torch.equal(weights[0], weights[1])
    assert abs(seen[0].mean().item()) < 1.0  # normalised, not raw 0-255 pixels
