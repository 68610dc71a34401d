"""Checkpoints are atomic: a failure mid-write leaves the previous files, and the run resumes."""

import pytest
import torch

import reslab.train.runs as runs
from reslab.checkpoint import load_state_dict_file, read_meta
from reslab.train import Callback, resume, train


class Boom(RuntimeError):
    pass


def failing_save(real, fail_on_call: int):
    """torch.save that writes half a file and dies on its `fail_on_call`-th call."""
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise Boom("disk full")
        return real(obj, f, *args, **kwargs)

    return save


def test_a_failed_state_write_leaves_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    train(tiny(out=str(tmp_path), epochs=1))
    ckpt = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    monkeypatch.setattr(runs.torch, "save", failing_save(torch.save, 1))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(Boom):
        runs.save_checkpoint(runs.RunFiles(tmp_path), model, {"model": "x"}, {"step": 99, "epoch": 9})
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no temp file left either


def test_a_failed_model_file_write_leaves_the_previous_one(tmp_path, tiny, monkeypatch):
    train(tiny(out=str(tmp_path), epochs=1))
    last = tmp_path / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x00" * 10)
        raise Boom("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(Boom):
        runs.save_model(last, torch.nn.Linear(2, 2), {"model": "x"})
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.safetensors", "last.safetensors",
                                                             "last.state.pt"]


def test_a_crash_while_checkpointing_loses_nothing_and_resume_is_exact(tmp_path, tiny, monkeypatch):
    full = train(tiny(out=str(tmp_path / "a")))
    # The second checkpoint (end of epoch 2, step 6) dies half-written: the process "crashes".
    monkeypatch.setattr(runs.torch, "save", failing_save(torch.save, 2))
    with pytest.raises(Boom):
        train(tiny(out=str(tmp_path / "b")))
    monkeypatch.undo()
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["step"] == 3  # the epoch-1 checkpoint survived intact
    rest = resume(tmp_path / "b")
    assert rest.steps == full.steps == 9
    a = load_state_dict_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_state_dict_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_file_loads_without_unpickling_code(tmp_path, tiny):
    train(tiny(out=str(tmp_path), epochs=1))
    state = torch.load(tmp_path / "checkpoints" / "last.state.pt", weights_only=True)
    assert {"model", "optimizer", "rng", "step", "epoch", "history"} <= set(state)
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["augment"], torch.Tensor)
    assert read_meta(tmp_path / "checkpoints" / "last.safetensors")["step"] == state["step"] == 3


def test_best_checkpoint_holds_the_best_evaluated_weights(tmp_path, tiny):
    errors = []

    class Record(Callback):
        def on_epoch_end(self, state, metrics):
            errors.append(metrics.test_top1_error)

    train(tiny(out=str(tmp_path)), callbacks=[Record()])
    meta = read_meta(tmp_path / "checkpoints" / "best.safetensors")
    assert meta["test_top1_error"] == min(errors)
    assert meta["epoch"] == errors.index(min(errors)) + 1


def test_every_file_of_a_run_gets_the_usual_permissions(tmp_path, tiny):
    # Atomic writes go through a 0600 temporary file (and safetensors replaces the one it is
    # given); the finished files are readable as any file the user creates (umask applied).
    import os
    import stat

    old = os.umask(0o022)
    try:
        train(tiny(out=str(tmp_path / "run"), epochs=1))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"best.safetensors", "last.safetensors", "last.state.pt",
                                       "config.json", "metrics.jsonl"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: "0o644" for p in files}
