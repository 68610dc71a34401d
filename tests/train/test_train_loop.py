"""fit/train/resume: run folder, exact resume, signals, divergence, warm-up, EMA."""

import json
import os
import signal

import pytest
import torch

from reslab.checkpoint import load_model, load_state_dict_file, read_meta
from reslab.train import (Callback, StopTraining, TrainingDiverged, build_model, fit, load_data,
                          read_metrics, resolve_config, resume, train)
from reslab.train.runs import EpochMetrics


def weights(run_dir):
    return load_state_dict_file(run_dir / "checkpoints" / "last.safetensors")


def test_train_writes_a_complete_run_folder(tmp_path, tiny):
    out = tmp_path / "run"
    result = train(tiny(out=str(out), tensorboard=True))
    assert result.status == "completed" and (result.steps, result.epochs) == (9, 3)
    doc = json.loads((out / "config.json").read_text())
    assert doc["config"]["num_classes"] == 10 and doc["config"]["in_chans"] == 1  # from the dataset
    assert doc["config"]["epochs"] == 3 and doc["config"]["pad"] == 1 and doc["config"]["device"] == "cpu"
    assert doc["dataset"]["train_size"] == 192 and len(doc["dataset"]["mean"]) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [3, 6, 9]
    assert set(rows[0]) == {"epoch", "step", "train_loss", "train_error", "test_loss", "test_top1_error",
                            "test_top5_error", "lr", "images_per_sec", "wall_time"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    model, meta = load_model(out)  # best.safetensors rebuilds itself from its metadata
    assert meta["classes"] == [str(d) for d in range(10)] and meta["image_size"] == [8, 8]
    assert read_meta(out / "checkpoints" / "last.safetensors")["step"] == 9
    assert result.best_top1_error == min(r["test_top1_error"] for r in rows)


def test_a_second_train_into_the_same_folder_is_refused(tmp_path, tiny):
    train(tiny(out=str(tmp_path), epochs=1))
    with pytest.raises(ValueError, match="already holds a run; continue it with `reslab train --resume"):
        train(tiny(out=str(tmp_path), epochs=1))


@pytest.mark.parametrize("more", [{}, {"freeze_bn_scale": True, "bn_shift_lr": 16.0, "flip": True,
                                  "alternate_flip": True}],
                         ids=["plain", "frozen-bn-scales-fast-shifts-alternating-flip"])
def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(tmp_path, tiny, stop_at_step, more):
    # Stop mid-epoch (step 4 of 3-step epochs) with EMA, cutout and label smoothing on, so the
    # optimizer, EMA, augmentation generator and partial epoch sums all have to be restored; with
    # `more`, also the optimizer's group of BN shifts with its lr_scale, the frozen scales, and
    # the second epoch's alternating flips (each image's, from the run's seed).
    cfg = dict(ema_decay=0.9, cutout=3, label_smoothing=0.1, recipe="fast", precision="fp32", **more)
    full = train(tiny(out=str(tmp_path / "a"), **cfg))
    part = train(tiny(out=str(tmp_path / "b"), **cfg), callbacks=[stop_at_step(4)])
    assert (part.status, part.steps, part.epochs) == ("stopped", 4, 1)
    rest = resume(tmp_path / "b")
    assert (rest.status, rest.steps) == ("completed", 9)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(full.eval_model.state_dict().values(), rest.eval_model.state_dict().values()):
        assert torch.equal(x, y)  # the EMA too
    same = ("epoch", "step", "train_loss", "train_error", "test_loss", "test_top1_error", "lr")
    assert [[getattr(m, k) for k in same] for m in read_metrics(tmp_path / "a")] == \
        [[getattr(m, k) for k in same] for m in read_metrics(tmp_path / "b")]


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path, tiny):
    class Terminate(Callback):
        def on_step_end(self, state):
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny(out=str(tmp_path)), callbacks=[Terminate()])
    assert (result.status, result.signal, result.steps) == ("interrupted", signal.SIGTERM, 2)
    assert read_meta(tmp_path / "checkpoints" / "last.safetensors")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert resume(tmp_path).steps == 9


def test_nonfinite_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path, tiny):
    class Poison(Callback):
        def on_step_end(self, state):
            if state.step == 4:
                with torch.no_grad():
                    next(state.model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged) as e:
        train(tiny(out=str(tmp_path)), callbacks=[Poison()])
    msg = str(e.value)
    assert "the training loss became nan at step 5 (epoch 2" in msg
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last.safetensors'} (step 3, epoch 1)" in msg
    saved = weights(tmp_path)
    assert read_meta(tmp_path / "checkpoints" / "last.safetensors")["step"] == 3
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


def test_a_huge_learning_rate_diverges_with_a_clear_message(tiny):
    cfg = tiny(lr=1e6, epochs=10)
    data = load_data(cfg)
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf) at step \d+ .*no run folder.*lower --lr"):
        fit(build_model(resolve_config(cfg, data)), data, cfg)


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path, tiny):
    train(tiny(out=str(tmp_path), epochs=1))
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["config"]["model"] = "resnet32"
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="holds weights of model 'resnet20'.*do not fit the model of this run"):
        resume(tmp_path)


def test_resume_refuses_to_change_the_computation(tmp_path, tiny):
    train(tiny(out=str(tmp_path), epochs=1))
    with pytest.raises(ValueError, match="lr cannot change .*only device, threads"):
        resume(tmp_path, lr=0.5, progress="plain")


def test_resume_of_a_folder_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run folder \\(no config.json\\)"):
        resume(tmp_path)


def test_error_warmup_keeps_the_low_lr_until_the_error_drops(tiny):
    data = load_data(tiny())
    never = tiny(error_warmup="on", error_warmup_threshold=0.0, epochs=2)
    history = fit(build_model(resolve_config(never, data)), data, never).history
    assert [m.lr for m in history] == [0.01, 0.01]
    at_once = tiny(error_warmup="on", error_warmup_threshold=1.0, epochs=2, schedule="constant")
    history = fit(build_model(resolve_config(at_once, data)), data, at_once).history
    assert [m.lr for m in history] == [0.1, 0.1]


def test_paper_recipe_warms_up_only_from_110_layers(tiny):
    data = load_data(tiny())
    assert resolve_config(tiny(recipe="paper", model="resnet110"), data).error_warmup == "on"
    assert resolve_config(tiny(recipe="paper", model="resnet56"), data).error_warmup == "off"


def test_model_follows_the_dataset_unless_overridden(tiny):
    data = load_data(tiny())
    assert build_model(resolve_config(tiny(), data)).conv1.in_channels == 1
    model = build_model(resolve_config(tiny(in_chans=3, num_classes=7), data))
    assert (model.conv1.in_channels, model.fc.out_features) == (3, 7)


def test_epoch_end_callback_sees_the_metrics_and_can_stop(tiny):
    seen = []

    class Watch(Callback):
        def on_epoch_end(self, state, metrics):
            seen.append(metrics)
            raise StopTraining

    cfg = tiny()
    data = load_data(cfg)
    result = fit(build_model(resolve_config(cfg, data)), data, cfg, callbacks=[Watch()])
    assert result.status == "stopped" and len(seen) == 1 and isinstance(seen[0], EpochMetrics)
    assert seen[0].step == 3 and 0 <= seen[0].train_error <= 1


def test_resume_may_change_runtime_settings_but_not_the_folder(tmp_path, tiny):
    train(tiny(out=str(tmp_path / "r"), epochs=1))
    with pytest.raises(ValueError, match="out cannot change"):
        resume(tmp_path / "r", out=str(tmp_path / "elsewhere"))
    assert resume(tmp_path / "r", threads=1, progress="none").status == "completed"


def test_progress_bar_reporter_runs_a_whole_fit(tiny, capsys):
    from reslab.train.progress import RichReporter

    cfg = tiny(epochs=2)
    data = load_data(cfg)
    fit(build_model(resolve_config(cfg, data)), data, cfg, reporter=RichReporter())
    out = capsys.readouterr().out
    assert "epoch 1/2  step 3" in out and "epoch 2/2  step 6" in out
