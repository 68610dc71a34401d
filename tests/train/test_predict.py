"""evaluate(path) and predict(path, images) on a tiny trained run."""

import pytest
import torch
from PIL import Image

from reslab.checkpoint import read_meta
from reslab.data import load_dataset
from reslab.train import evaluate, predict, train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("run")
    train(tiny(out=str(out), epochs=2))
    return out


def test_evaluate_a_run_reproduces_its_best_checkpoint_metric(run):
    r = evaluate(run, test_limit=100)  # the run evaluated on these 100 images
    assert r.count == 100
    assert r.top1_error == read_meta(run / "checkpoints" / "best.safetensors")["test_top1_error"]


def test_evaluate_a_model_file_defaults_to_its_dataset(run):
    r = evaluate(run / "checkpoints" / "last.safetensors", tta="10crop")
    assert (r.count, r.tta) == (360, "10crop") and 0 <= r.top1_error <= 1


def test_evaluate_on_an_incompatible_dataset_says_so(run):
    with pytest.raises(ValueError, match="the model takes 1-channel images of 10 classes \\(digits\\) "
                                         "but synthetic has 3-channel images"):
        evaluate(run, data="synthetic")


def test_predict_ranks_classes_by_probability(run, tmp_path):
    digits = load_dataset("digits")
    paths = []
    for i in range(3):  # RGB and larger than 8x8: predict converts and resizes
        img = Image.fromarray(digits.test.images[i, 0].numpy()).convert("RGB").resize((32, 32))
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    preds = predict(run, paths, top=10)
    assert [p.path for p in preds] == [str(p) for p in paths]
    for p in preds:
        probs = [v for _, v in p.top]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert sorted(c for c, _ in p.top) == [str(d) for d in range(10)]
    assert len(predict(run, paths[:1])[0].top) == 5


def test_predict_matches_the_model_on_the_original_pixels(run, tmp_path):
    from reslab.data import normalize
    from reslab.train import load_for_eval

    digits = load_dataset("digits")
    x = digits.test.images[:1]
    Image.fromarray(x[0, 0].numpy()).save(tmp_path / "d.png")  # exact 8×8 grayscale
    model, meta = load_for_eval(run)
    with torch.no_grad():
        expected = torch.softmax(model(normalize(x, meta["mean"], meta["std"])), -1)[0]
    top = predict(run, [tmp_path / "d.png"], top=1)[0].top[0]
    assert top == (str(int(expected.argmax())), pytest.approx(float(expected.max()), abs=1e-6))


def test_predict_reports_unreadable_images(run, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*x.png as an image"):
        predict(run, [tmp_path / "x.png"])
    with pytest.raises(FileNotFoundError, match="no such image: .*missing.png"):
        predict(run, [tmp_path / "missing.png"])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_evaluate_through_an_inference_backend_gives_the_models_result(run, backend):
    # fp32 with BN folded: only rounding differs, so no test image changes class and the loss
    # agrees closely; the flip views go through the backend too.
    ref = evaluate(run, tta="flip")
    got = evaluate(run, tta="flip", backend=backend, batch_size=100)  # a 60-image last batch
    assert (got.count, got.tta) == (ref.count, "flip") == (360, "flip")
    assert (got.top1_error, got.top5_error) == (ref.top1_error, ref.top5_error)
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)


def test_evaluate_in_bf16_through_openvino(run):
    ref = evaluate(run)
    got = evaluate(run, backend="openvino", precision="bf16")
    assert got.count == 360 and abs(got.top1_error - ref.top1_error) <= 0.02


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="onnxruntime", precision="bf16"),
     "the onnxruntime backend runs the fp32 ONNX export; use precision fp32 with it, or backend "
     "openvino for bf16"),
    (dict(backend="tensorrt"), "backend must be one of torch, onnxruntime, openvino; got 'tensorrt'"),
])
def test_evaluate_refuses_a_backend_it_cannot_honour(run, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(run, test_limit=10, **kwargs)


def test_predict_through_openvino_matches_the_model(run, tmp_path):
    digits = load_dataset("digits")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(digits.test.images[i, 0].numpy()).save(paths[-1])
    ref = predict(run, paths, top=3)
    got = predict(run, paths, top=3, backend="openvino")
    for r, g in zip(ref, got):
        assert [c for c, _ in g.top] == [c for c, _ in r.top]
        assert [v for _, v in g.top] == pytest.approx([v for _, v in r.top], abs=1e-5)
    # bf16 by autocast on the torch backend: the same classes ranked first
    assert [p.top[0][0] for p in predict(run, paths, precision="bf16")] == [p.top[0][0] for p in ref]
