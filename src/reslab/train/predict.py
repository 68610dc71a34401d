"""Evaluate a trained model file on a dataset, and classify image files with it.

Both read the preprocessing from the model file's metadata (written by `reslab train`): the
mean/std the model was trained with, its input size and channels, and the class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..data import DatasetBundle, center_crop, load_dataset, normalize
from .evaluate import EvalResult, evaluate_model, load_for_eval
from .runs import read_config
from .step import autocast


def evaluate(
    path: str | Path,
    *,
    data: str | None = None,
    data_dir: str | Path | None = None,
    val_split: bool | None = None,
    tta: str = "none",
    batch_size: int = 512,
    device: str = "cpu",
    precision: str = "fp32",
    backend: str = "torch",
    test_limit: int | None = None,
    workers: int = 4,
) -> EvalResult:
    """Top-1/top-5 error and loss of a model file or run folder on a dataset's test split.

    Dataset settings not given default to the run's (when `path` is a run folder) or to the
    dataset named in the model file. The images are normalised with the model's own mean/std.
    `backend` "torch" runs the model as trained (`precision` by autocast); "onnxruntime" and
    "openvino" run its inference fast path (`reslab.fast_path`, on the CPU) in `precision`.
    """
    model, meta, bundle = load_test_data(path, data=data, data_dir=data_dir, val_split=val_split,
                                         tta=tta, device=device, test_limit=test_limit)
    run, precision = _runner(model, backend, precision, (bundle.in_chans, *bundle.image_size))
    return evaluate_model(
        run, bundle.test, mean=meta["mean"], std=meta["std"], batch_size=batch_size,
        precision=precision, tta=tta, pad=bundle.augment.pad, workers=workers,
    )


def _runner(model: torch.nn.Module, backend: str, precision: str,
            input_size: tuple[int, ...]) -> tuple[Any, str]:
    """(what to call on a normalised batch, the autocast precision to call it under): the model
    itself for backend "torch", else its fast path built for `precision` (called in fp32)."""
    from ..inference import check_backend, fast_path

    check_backend(backend)
    if backend == "torch":
        return model, precision
    if backend == "onnxruntime" and precision != "fp32":
        raise ValueError(f"the onnxruntime backend runs the fp32 ONNX export; use precision fp32 "
                         f"with it, or backend openvino for {precision}")
    return fast_path(model, tuple(int(v) for v in input_size), backend=backend,
                     precision=precision), "fp32"


def load_test_data(
    path: str | Path,
    *,
    data: str | None = None,
    data_dir: str | Path | None = None,
    val_split: bool | None = None,
    tta: str = "none",
    device: str = "cpu",
    test_limit: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], DatasetBundle]:
    """(model in eval mode, its metadata, the dataset it is evaluated on) for a model file or
    run folder; dataset settings not given default to the run's or the model file's."""
    model, meta = load_for_eval(path, device)
    run = _run_config(path)
    name = data or (run.data if run else meta.get("dataset"))
    if name is None:
        raise ValueError(f"{path} does not say which dataset it was trained on; pass --data")
    same = run is not None and name == run.data
    options: dict[str, Any] = dict(run.data_options) if same else {}
    if tta == "10crop" and name == "folder":
        options["tta"] = "10crop"  # the folder dataset crops the resized image itself
    bundle = load_dataset(
        name,
        data_dir=data_dir if data_dir is not None else (run.data_dir if same else None),
        val_split=val_split if val_split is not None else (run.val_split if same else False),
        seed=run.seed if same else 0,
        test_limit=test_limit,
        **options,
    )
    _check_compatible(meta, bundle.in_chans, bundle.num_classes, name)
    return model, meta, bundle


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


@torch.no_grad()
def predict(path: str | Path, images: Sequence[str | Path], *, top: int = 5,
            device: str = "cpu", precision: str = "fp32",
            backend: str = "torch") -> list[Prediction]:
    """The `top` most probable classes of each image file, with their softmax probabilities.

    Each image is decoded with Pillow, converted to the model's channels (grayscale for
    1-channel models), resized to its input size (shorter side to 256/224 of the size and a
    centre crop for ImageNet-size inputs, a plain resize for small images) and normalised with
    the training mean/std. `precision` and `backend` as for `evaluate`.
    """
    model, meta = load_for_eval(path, device)
    in_chans = int(meta["model_kwargs"].get("in_chans", 3))
    size = tuple(meta["image_size"])
    run, precision = _runner(model, backend, precision, (in_chans, *size))
    batch = torch.stack([_load_image(p, in_chans, size) for p in images]).to(device)
    with autocast(precision, batch.device.type):
        logits = run(normalize(batch, meta["mean"], meta["std"]))
    probs = torch.softmax(logits.float(), dim=-1)
    k = min(top, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    classes = meta["classes"]
    return [
        Prediction(str(p), [(classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())])
        for p, vs, ix in zip(images, values, indices)
    ]


def _load_image(path: str | Path, in_chans: int, size: tuple[int, int]) -> torch.Tensor:
    if in_chans not in (1, 3):
        raise ValueError(f"predict handles 1- and 3-channel models; this one takes {in_chans} channels")
    try:
        with Image.open(path) as raw:
            img = raw.convert("L" if in_chans == 1 else "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); pass a JPEG, PNG or other file "
                         "Pillow can decode") from None
    h, w = size
    if min(h, w) >= 64:
        # ImageNet-style evaluation view: shorter side to 256/224 of the crop, centre crop.
        short = round(min(h, w) * 256 / 224)
        scale = short / min(img.size)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                         Image.BILINEAR)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = x.view(img.height, img.width, in_chans).permute(2, 0, 1)
        return center_crop(x, (h, w)).contiguous()
    img = img.resize((w, h), Image.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return x.view(h, w, in_chans).permute(2, 0, 1).contiguous()


def _run_config(path: str | Path):
    """The TrainConfig of a run folder (or of the run a checkpoints/ file sits in), else None."""
    p = Path(path)
    for folder in (p, p.parent.parent) if p.is_file() else (p,):
        if (folder / "config.json").exists():
            return read_config(folder)[0]
    return None


def _check_compatible(meta: dict, in_chans: int, num_classes: int, name: str) -> None:
    """Channels and classes must match; another image size is allowed (the nets pool globally)."""
    kw = meta.get("model_kwargs", {})
    if (kw.get("in_chans"), kw.get("num_classes")) != (in_chans, num_classes):
        raise ValueError(
            f"the model takes {kw.get('in_chans')}-channel images of {kw.get('num_classes')} "
            f"classes ({meta.get('dataset')}) but {name} has {in_chans}-channel images of "
            f"{num_classes} classes; evaluate it on the dataset it was trained on"
        )
