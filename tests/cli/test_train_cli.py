"""`reslab train / eval / predict / demo`: outputs and error messages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from reslab.cli import main

TINY = ["--model", "resnet20", "--data", "digits", "--train-limit", "64", "--test-limit", "50",
        "--batch-size", "32", "--progress", "plain"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_prints_epoch_lines_and_a_summary(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "0.05", "--schedule", "cosine",
                 "--model-kwargs", "shortcut=B", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/2  step 2  train loss" in text and "epoch 2/2  step 4" in text
    assert f"resnet20 on digits: completed after 2 epochs (4 steps" in text and str(out) in text
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["lr"], cfg["schedule"], cfg["model_kwargs"], cfg["recipe"]) == (0.05, "cosine", {"shortcut": "B"}, "default")


def test_eval_prints_errors_and_json(run_dir, capsys):
    assert main(["eval", str(run_dir), "--test-limit", "50"]) == 0
    assert "top-1 error" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--json", "--tta", "flip"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"path", "loss", "top1_error", "top5_error", "count", "tta", "backend",
                      "precision", "seconds"}
    assert (r["count"], r["tta"], r["backend"], r["precision"]) == (360, "flip", "torch", "fp32")
    assert r["seconds"] > 0
    assert main(["eval", str(run_dir), "--json", "--backend", "openvino", "--test-limit", "50"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["count"], r["backend"]) == (50, "openvino")
    assert main(["eval", str(run_dir), "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    assert "the onnxruntime backend runs the fp32 ONNX export" in capsys.readouterr().err


def test_predict_prints_the_top5_classes(run_dir, tmp_path, capsys):
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    assert main(["predict", str(run_dir), str(tmp_path / "grey.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("grey.png") and len(lines) == 6 and lines[1].lstrip().startswith("1. ")
    assert main(["predict", str(run_dir), str(tmp_path / "grey.png"), "--json", "--top", "2"]) == 0
    (p,) = json.loads(capsys.readouterr().out)
    assert len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"]
    assert main(["predict", str(run_dir), str(tmp_path / "grey.png"), "--json", "--top", "2",
                 "--backend", "onnxruntime"]) == 0
    (q,) = json.loads(capsys.readouterr().out)
    assert [c["class"] for c in q["top"]] == [c["class"] for c in p["top"]]


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "argument --lr: must be greater than 0, got -1"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["--data", "mnist"], "argument --data: invalid choice: 'mnist'"),
    (["--model-kwargs", "shortcut"], "argument --model-kwargs: expected KEY=VALUE, got 'shortcut'"),
])
def test_bad_flag_values_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_model_lists_close_names(tmp_path, capsys):
    assert main(["train", *TINY, "--model", "resnet21", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "reslab train: error: unknown model 'resnet21'; closest registered names: resnet32, resnet20" in err
    assert not (tmp_path / "x").exists()


def test_missing_dataset_says_where_it_looked(tmp_path, capsys):
    assert main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"cifar10 not found in {tmp_path}" in err and "--download" in err


def test_resume_with_a_changed_setting_is_refused(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--batch-size", "64"]) == 2
    assert "batch_size cannot change" in capsys.readouterr().err


def test_training_into_an_existing_run_is_refused(run_dir, capsys):
    assert main(["train", *TINY, "--out", str(run_dir)]) == 2
    assert f"{run_dir} already holds a run; continue it with `reslab train --resume {run_dir}`" in capsys.readouterr().err


def test_eval_of_a_missing_path(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint or run folder" in capsys.readouterr().err


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-limit", "40"]) == 0
    assert "plain-56 ends with" in capsys.readouterr().out.replace("\n", " ")
    assert (tmp_path / "degradation.png").exists()


def test_sigterm_from_outside_checkpoints_and_exits_143(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reslab", "train", *TINY, "--epochs", "10000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    state = out / "checkpoints" / "last.state.pt"
    deadline = time.monotonic() + 60
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM" in text and f"reslab train --resume {out}" in text
    assert "Traceback" not in text
    from reslab.checkpoint import read_meta

    assert read_meta(out / "checkpoints" / "last.safetensors")["step"] >= 2
