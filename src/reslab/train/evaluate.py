"""Evaluation: loss and top-1/top-5 error of a model on a dataset, with test-time augmentation.

Test-time augmentation averages the softmax probabilities of several views of each image:
``flip`` (the image and its mirror), ``flip-translate`` (those two, and both shifted by one
pixel down-right and up-left with the border reflected: the 6 views of airbench's test-time
augmentation, Jordan 2024; 0.2-0.5 points over ``flip`` for reslab's CIFAR-10 ResNet-9 runs),
``10crop`` (the four corners and the centre of the padded image and their mirrors; for folder
datasets the 10 crops of the resized image, the multi-view test of Krizhevsky et al. 2012 used
for He et al. 2015, Table 3). The loss is the negative log of the averaged probability of the
true class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import InMemoryDataset, batches, normalize, ten_crop
from ..data.augment import reflect_index
from .config import TTA
from .dist import DistContext
from .step import autocast


@dataclass(frozen=True)
class EvalResult:
    """Errors are fractions; `count` images were evaluated."""

    loss: float
    top1_error: float
    top5_error: float
    count: int
    tta: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_model(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    dataset: InMemoryDataset | torch.utils.data.Dataset,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: str = "none",
    pad: int = 4,
    workers: int = 0,
    dist: DistContext | None = None,
) -> EvalResult:
    """Loss, top-1 and top-5 error of `model` (in eval mode) on `dataset`.

    `model` is a module, or any function from a normalised image batch to logits that runs on
    the CPU (an inference fast path from `reslab.fast_path`: ONNX Runtime, OpenVINO; `precision`
    is then the function's own business and must stay fp32 here). In-memory datasets are moved to
    the model's device and batched there; other datasets go through a DataLoader with `workers`
    processes. `pad` is the zero padding of the in-memory 10-crop (use the dataset's training
    `pad`, 4 for CIFAR). The model's train/eval mode is restored afterwards. With `dist`, each rank evaluates every world_size-th image and the sums
    are all-reduced, so every rank returns the same result.
    """
    if tta not in TTA:
        raise ValueError(f"tta must be one of {', '.join(TTA)}; got {tta!r}")
    dist = dist or DistContext()
    module = isinstance(model, nn.Module)
    if not module and precision != "fp32":
        raise ValueError(f"precision={precision!r} is autocast, for a torch module; a fast path "
                         "computes in the precision it was built with: pass precision='fp32'")
    device = next(model.parameters()).device if module else torch.device("cpu")
    was_training = module and model.training
    if module:
        model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 wrong, top5 wrong, n
    try:
        for x, y in _eval_batches(dataset, batch_size, device, workers, dist):
            views = _views(x, tta, pad)  # (N, V, C, H, W) uint8
            n, v = views.shape[:2]
            inp = normalize(views.flatten(0, 1), mean, std, channels_last=channels_last)
            with autocast(precision, device.type):
                logits = model(inp)
            logits = logits.float().view(n, v, -1)
            # log of the mean probability over views; for one view exactly log_softmax.
            log_p = torch.logsumexp(F.log_softmax(logits, -1), dim=1) - math.log(v)
            k = min(5, log_p.shape[-1])
            topk = log_p.topk(k, dim=-1).indices
            hit = topk == y[:, None]
            sums += torch.stack([
                F.nll_loss(log_p.double(), y, reduction="sum"),
                (~hit[:, 0]).sum().double(),
                (~hit.any(1)).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=device),
            ])
    finally:
        if module:
            model.train(was_training)
    loss, top1, top5, count = dist.all_reduce_sum(sums).tolist()
    if count == 0:
        raise ValueError("the evaluation dataset is empty")
    return EvalResult(loss / count, top1 / count, top5 / count, int(count), tta)


def _eval_batches(
    dataset: Any, batch_size: int, device: torch.device, workers: int, dist: DistContext
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, InMemoryDataset):
        # Every world_size-th image, without the padding `batches` adds for training: each
        # image is counted exactly once over all ranks.
        ds = dataset.to(device)
        if dist.world_size > 1:
            ds = ds.subset(torch.arange(dist.rank, len(ds), dist.world_size))
        yield from batches(ds, batch_size, shuffle=False)
        return
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices) if dist.world_size > 1 else dataset,
        batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _views(x: torch.Tensor, tta: str, pad: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, V, C, H, W) test views; a (N, 10, C, H, W) batch (a folder
    dataset built with tta='10crop') already holds its views."""
    if x.dim() == 5:
        if tta != "10crop":
            raise ValueError(f"the dataset yields {x.shape[1]} views per image but tta={tta!r}; "
                             "load it without tta or evaluate with tta='10crop'")
        return x
    if tta == "none":
        return x[:, None]
    if tta == "flip":
        return torch.stack([x, x.flip(-1)], dim=1)
    if tta == "flip-translate":
        if min(x.shape[-2:]) < 2:
            raise ValueError("tta='flip-translate' shifts images by one pixel; got "
                             f"{tuple(x.shape[-2:])} images")
        views = [x, _translate(x, 1), _translate(x, -1)]
        return torch.stack([v for view in views for v in (view, view.flip(-1))], dim=1)
    h = x.shape[-2]
    return ten_crop(F.pad(x, (pad, pad, pad, pad)), h) if pad else ten_crop(x, h)


def _translate(x: torch.Tensor, d: int) -> torch.Tensor:
    """(..., H, W) -> output pixel (i, j) = x[i - d, j - d], reflecting at the border (the image
    moves d pixels down and right; the rows and columns it uncovers mirror the ones inside)."""
    h, w = x.shape[-2:]
    rows = reflect_index(torch.arange(h, device=x.device) - d, h)
    cols = reflect_index(torch.arange(w, device=x.device) - d, w)
    return x.index_select(-2, rows).index_select(-1, cols)


def load_for_eval(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A model file or run folder -> (model in eval mode on `device`, its metadata).

    The metadata holds the preprocessing the model was trained with (mean, std, image_size,
    classes, dataset); a file without it cannot be evaluated faithfully, so it is an error.
    """
    from ..checkpoint import load_model

    model, meta = load_model(path, map_location=device)
    missing = [k for k in ("mean", "std", "image_size", "classes") if k not in meta]
    if missing:
        raise ValueError(
            f"{path} lacks the preprocessing metadata {', '.join(missing)}; evaluate a model "
            "file written by `reslab train` (checkpoints/*.safetensors) or its run folder"
        )
    return model.eval(), meta
