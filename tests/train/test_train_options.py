"""Settings for fast (GPU) training, tested on the CPU: eval_tta, compile_mode, and the
augmentation generator that lives on the data's device (and a resume across device kinds)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import reslab.train.loop as loop
import reslab.train.step as step_module
from reslab.cli import build_parser, main
from reslab.data import AugmentSpec, mean_colour
from reslab.train import (TrainConfig, build_model, fit, load_data, make_optimizer,
                          make_train_step, resolve_config, resume, train)
from reslab.train.config import COMPILE_MODES, TTA
from reslab.train.evaluate import evaluate_model
from reslab.train.progress import Reporter


class FakeCompile:
    """Stands in for torch.compile: records its calls and returns a module counting forwards."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.forwards = 0

    def __call__(self, model, **kwargs):
        self.calls.append(kwargs)
        fake = self

        class Compiled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, x):
                fake.forwards += 1
                return self.inner(x)

        return Compiled()


@pytest.fixture
def fake_compile(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(step_module.torch, "compile", fake)
    return fake


class Messages(Reporter):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


@pytest.fixture
def augment_generators(monkeypatch):
    """Every generator the loop hands augment_batch, with its state before the draw."""
    seen: list[tuple[torch.Generator, torch.Tensor]] = []
    real = loop.augment_batch

    def spy(x, spec, generator=None, flip=None):
        seen.append((generator, generator.get_state().clone()))
        return real(x, spec, generator, flip)

    monkeypatch.setattr(loop, "augment_batch", spy)
    return seen


# ----------------------------------------------------------------------------- config values

@pytest.mark.parametrize("field, value, message", [
    ("eval_tta", "5crop", "eval_tta must be one of none, flip, flip-translate, 10crop; got '5crop'"),
    ("compile_mode", "fast", "compile_mode must be one of default, reduce-overhead, max-autotune, "
                             "max-autotune-no-cudagraphs; got 'fast'"),
])
def test_bad_eval_tta_and_compile_mode_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_eval_tta_and_compile_mode_values_are_accepted_and_round_trip():
    assert (TrainConfig().eval_tta, TrainConfig().compile_mode) == ("none", "default")
    assert COMPILE_MODES == ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    for tta in TTA:
        assert TrainConfig(eval_tta=tta).eval_tta == tta
    for mode in COMPILE_MODES:
        c = TrainConfig(compile=True, compile_mode=mode)
        assert TrainConfig.from_dict(json.loads(c.to_json())) == c


def test_train_command_has_the_flags():
    args = build_parser().parse_args(["train", "--eval-tta", "flip", "--compile-mode", "reduce-overhead"])
    assert (args.eval_tta, args.compile_mode) == ("flip", "reduce-overhead")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--compile-mode", "fastest"])


# ----------------------------------------------------------------------------- eval_tta

@pytest.mark.parametrize("tta", ["flip", "flip-translate", "10crop"])
def test_the_runs_evaluation_uses_eval_tta(tiny, tta):
    cfg = tiny(epochs=1, eval_tta=tta)
    data = load_data(cfg)
    cfg = resolve_config(cfg, data)
    result = fit(build_model(cfg), data, cfg)
    m = result.final
    kw = dict(mean=data.mean, std=data.std, batch_size=cfg.eval_batch_size)
    with_tta = evaluate_model(result.eval_model, data.test, tta=tta, pad=cfg.pad, **kw)
    plain = evaluate_model(result.eval_model, data.test, tta="none", **kw)
    assert with_tta.count == 100
    assert m.test_top1_error == with_tta.top1_error and m.test_top5_error == with_tta.top5_error
    assert m.test_loss == pytest.approx(with_tta.loss, rel=1e-9)
    assert m.test_loss != pytest.approx(plain.loss, rel=1e-9)  # not the untransformed evaluation
    assert result.best_top1_error == with_tta.top1_error


# ----------------------------------------------------------------------------- compile_mode

@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_make_train_step_passes_the_mode_to_torch_compile(fake_compile, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    step = make_train_step(model, make_optimizer(model, TrainConfig()), compile=True, compile_mode=mode)
    assert len(fake_compile.calls) == 1
    assert fake_compile.calls[0]["mode"] == mode and fake_compile.calls[0]["dynamic"] is False
    out = step(torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,)))
    assert fake_compile.forwards == 1 and torch.isfinite(out.loss)


def test_make_train_step_without_compile_never_compiles(fake_compile):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    step = make_train_step(model, make_optimizer(model, TrainConfig()), compile_mode="max-autotune")
    step(torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 0]))
    assert fake_compile.calls == [] and fake_compile.forwards == 0


def test_the_training_loop_compiles_with_the_configs_mode(tiny, fake_compile, augment_generators):
    cfg = tiny(epochs=1, compile=True, compile_mode="reduce-overhead")
    data = load_data(cfg)
    cfg = resolve_config(cfg, data)
    result = fit(build_model(cfg), data, cfg)
    assert result.status == "completed" and result.steps == 3
    assert [c["mode"] for c in fake_compile.calls] == ["reduce-overhead"]
    assert fake_compile.forwards == 3  # every training step went through the compiled module
    # The digits set is in memory on the CPU, so the augmentation generator is a CPU one: the
    # same generator for every batch.
    gens = [g for g, _ in augment_generators]
    assert len(gens) == 3 and all(g is gens[0] for g in gens)
    assert gens[0].device.type == "cpu" and gens[0].device == data.train.images.device


@pytest.mark.parametrize("compile_flags, recorded", [
    (["--compile", "--compile-mode", "max-autotune-no-cudagraphs"], "max-autotune-no-cudagraphs"),
    (["--compile"], "default"),
    (["--compile-mode", "reduce-overhead"], None),  # not compiled: no mode to speak of
])
def test_bench_train_records_the_compile_mode(compile_flags, recorded, fake_compile, capsys):
    assert main(["bench", "train", "--model", "resnet20", "--batch", "2", "--repeats", "1",
                 "--iters", "1", "--warmup", "0", "--peak-size", "64", "--precision", "fp32",
                 "--device", "cpu", "--json", *compile_flags]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["compile"] is ("--compile" in compile_flags)
    assert doc["settings"]["compile_mode"] == recorded
    assert [c["mode"] for c in fake_compile.calls] == ([recorded] if recorded else [])


def test_bench_refuses_an_unknown_compile_mode(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "train", "--compile", "--compile-mode", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- augmentation generator

def test_cpu_generator_refuses_a_cuda_generator_state():
    # What restore catches: a CUDA generator's 16-byte state does not fit a CPU generator.
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(torch.zeros(16, dtype=torch.uint8))


def test_resume_of_a_checkpoint_with_another_devices_augment_state_reseeds(tmp_path, tiny,
                                                                           augment_generators,
                                                                           stop_at_step):
    stopped = train(tiny(out=str(tmp_path / "a"), cutout=3), callbacks=[stop_at_step(4)])
    assert (stopped.status, stopped.steps) == ("stopped", 4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    state_file = tmp_path / "b" / "checkpoints" / "last.state.pt"
    state = torch.load(state_file, weights_only=True)
    saved_augment = state["rng"]["augment"]
    assert state["step"] == 4 and saved_augment.numel() > 16  # a CPU generator's state
    state["rng"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator's
    torch.save(state, state_file)

    # The intact checkpoint continues the saved augmentation stream, without a message.
    augment_generators.clear()
    same = Messages()
    resume(tmp_path / "a", reporter=same)
    assert torch.equal(augment_generators[0][1], saved_augment)
    assert not any("augmentation random stream restarts" in t for t in same.messages)

    # The foreign one restarts the stream, seeded by the step, says so, and completes.
    augment_generators.clear()
    moved = Messages()
    result = resume(tmp_path / "b", reporter=moved)
    assert (result.status, result.steps) == ("completed", 9)
    assert len(augment_generators) == 5  # steps 5..9
    assert all(g.device.type == "cpu" for g, _ in augment_generators)
    reseeded = torch.Generator().manual_seed(loop.derive_seed(0, "augment", 4)).get_state()
    assert torch.equal(augment_generators[0][1], reseeded)
    assert any("the augmentation random stream restarts" in t and "another kind of device" in t
               for t in moved.messages)
    assert any(t.startswith("resumed ") and "at step 4" in t for t in moved.messages)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9]


# ----------------------------------------------------------------------------- pad_mode

def test_the_loop_augments_with_the_pad_mode_and_the_datasets_mean_colour(tiny, monkeypatch):
    specs: list[AugmentSpec] = []
    real = loop.augment_batch

    def spy(x, spec, generator=None, flip=None):
        specs.append(spec)
        return real(x, spec, generator, flip)

    monkeypatch.setattr(loop, "augment_batch", spy)
    cfg = tiny(epochs=1, pad_mode="reflect", cutout=2)
    data = load_data(cfg)
    cfg = resolve_config(cfg, data)
    fit(build_model(cfg), data, cfg)
    expected = AugmentSpec(pad=1, flip=False, cutout=2, pad_mode="reflect", fill=mean_colour(data.mean))
    assert len(specs) == 3 and all(s == expected for s in specs)


def test_pad_mode_defaults_to_the_datasets_and_the_fast_recipe_reflects(tiny):
    cfg = tiny()
    assert resolve_config(cfg, load_data(cfg)).pad_mode == "zero"
    assert TrainConfig.from_recipe("fast").pad_mode == "reflect"
    assert build_parser().parse_args(["train", "--pad-mode", "mean"]).pad_mode == "mean"
    with pytest.raises(ValueError, match="pad_mode must be one of zero, mean, reflect; got 'edge'"):
        TrainConfig(pad_mode="edge")
