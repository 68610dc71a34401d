"""Batch tensor operations for in-memory datasets: augmentation, normalisation, batching, 10-crop.

Everything here works on whole uint8 batches on the tensor's own device, with no Python loop
over images, so a GPU-resident CIFAR epoch never goes back to the host (the airbench approach).
Random choices come from an optional `torch.Generator`, so a batch is reproducible from its
generator's state.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .base import AugmentSpec, DataError, InMemoryDataset


def augment_batch(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop of the padded image, horizontal flip and cutout, per sample.

    He et al. 2015, Sec. 4.2: pad `spec.pad` pixels on each side and take a random crop of the
    original size, or its mirror image. Crop, flip and padding are one gather: output pixel
    (i, j) of sample n reads source row dy[n] - p + i and column dx[n] - p + j (W-1-j when
    flipped); a source index outside the image is mirrored back into it (``reflect``) or reads
    the padding colour (``zero``: black, ``mean``: `spec.fill`). Cutout (DeVries & Taylor
    2017) paints a `spec.cutout`-sided square centred at a uniform random pixel, clipped at the
    border, in `spec.fill` (black when empty). `x` is uint8 (N, C, H, W); the result has the same
    shape and dtype (it is `x` itself when `spec` does nothing). Draws, in this order: dy, dx,
    flip, cutout centre. A given `flip` (N booleans: which samples to mirror, as
    `alternating_flips` makes them) replaces the flip draw; `spec.flip` must be on.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise DataError(f"augment_batch expects uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if flip is not None and (not spec.flip or flip.shape != (len(x),) or flip.dtype != torch.bool):
        raise DataError(f"flip must be {len(x)} booleans for a batch of {len(x)} with spec.flip on; "
                        f"got {flip.dtype} {tuple(flip.shape)} with spec.flip={spec.flip}")
    if not spec.enabled or len(x) == 0:
        return x
    n, c, h, w = x.shape
    p = spec.pad
    if spec.fill and len(spec.fill) != c:
        raise DataError(f"images have {c} channels but the augmentation's fill colour has "
                        f"{len(spec.fill)} values {spec.fill}; use the dataset's mean_colour(mean)")
    if spec.pad_mode == "reflect" and p >= min(h, w):
        raise DataError(f"reflect padding of {p} pixels needs images larger than {p}x{p}, got {h}x{w}; "
                        "use a smaller pad or pad_mode 'zero'/'mean'")
    fill = None
    if spec.cutout or spec.pad_mode == "mean":
        # The colour as a (1, C, 1, 1) tensor made by fill kernels on the batch's device: no
        # host-to-device copy per step on a GPU. Only built when something is painted with it.
        fill = torch.cat([torch.full((1, 1, 1, 1), v, dtype=torch.uint8, device=x.device)
                          for v in spec.fill or (0,) * c], dim=1)

    def randint(high: int) -> torch.Tensor:
        # Draw where the generator lives (a CPU generator may drive a GPU batch), then move.
        device = generator.device if generator is not None else x.device
        return torch.randint(high, (n,), generator=generator, device=device).to(x.device)

    out = x
    if p or spec.flip:
        zeros = torch.zeros(n, dtype=torch.int64, device=x.device)
        dy = randint(2 * p + 1) if p else zeros
        dx = randint(2 * p + 1) if p else zeros
        if flip is None:
            flip = randint(2).bool() if spec.flip else zeros.bool()
        flip = flip.to(x.device)
        rows = dy[:, None] - p + torch.arange(h, device=x.device)  # (N, H), source rows
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = dx[:, None] - p + torch.where(flip[:, None], w - 1 - cols, cols)  # (N, W)
        if spec.pad_mode == "reflect":
            rows, cols = reflect_index(rows, h), reflect_index(cols, w)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        out = x[batch, chans, rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
        if p and spec.pad_mode != "reflect":
            inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            out = torch.where(inside[:, None], out, fill if spec.pad_mode == "mean" else 0)
    if spec.cutout:
        cy, cx = randint(h), randint(w)
        top, left = cy - spec.cutout // 2, cx - spec.cutout // 2
        ys = torch.arange(h, device=x.device)
        xs = torch.arange(w, device=x.device)
        in_rows = (ys >= top[:, None]) & (ys < top[:, None] + spec.cutout)  # (N, H)
        in_cols = (xs >= left[:, None]) & (xs < left[:, None] + spec.cutout)  # (N, W)
        out = torch.where((in_rows[:, :, None] & in_cols[:, None, :])[:, None], fill, out)
    return out


def alternating_flips(n: int, epoch: int, generator: torch.Generator,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Which of `n` samples to mirror in `epoch` (0-based) under airbench's alternating flip
    (Jordan 2024, Sec. 3.6): a random half in epoch 0 (drawn from `generator`, which must be in
    the same state every epoch: the draw fixes each sample's parity), then each sample exactly
    in the epochs where the first one did not mirror it. Index the result by dataset index."""
    first = torch.randperm(n, generator=generator, device=generator.device) < (n + 1) // 2
    return (first ^ bool(epoch % 2)).to(device if device is not None else first.device)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n-1), 2(n-1)] mirrored into [0, n-1] about the first and last pixel (no
    repeat of the edge pixel: numpy's and F.pad's 'reflect')."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 images -> `dtype` tensor (x/255 - mean) / std, channels at dim -3.

    The arithmetic runs in float32 as one multiply-add (x * 1/(255 std) - mean/std) and is cast
    to `dtype` at the end, so half-precision output loses nothing extra. Works for (C, H, W),
    (N, C, H, W) and (N, 10, C, H, W) 10-crop batches.
    """
    if x.dtype != torch.uint8 or x.dim() < 3:
        raise DataError(f"normalize expects uint8 images (..., C, H, W), got {x.dtype} {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1)
    c = x.shape[-3]
    if len(mean_t) != c or len(std_t) != c:
        raise DataError(
            f"images have {c} channels but mean has {len(mean_t)} and std {len(std_t)} values; "
            "use the mean/std of the dataset the images come from"
        )
    if bool((std_t <= 0).any()):
        raise DataError(f"std must be positive, got {std_t.tolist()}")
    scale = (1.0 / (255.0 * std_t)).reshape(c, 1, 1)
    shift = (-mean_t / std_t).reshape(c, 1, 1)
    out = torch.addcmul(shift, x.to(torch.float32), scale).to(dtype)
    if channels_last:
        if out.dim() != 4:
            raise DataError(f"channels_last needs (N, C, H, W), got shape {tuple(out.shape)}")
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def batches(
    ds: InMemoryDataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    with_index: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of (uint8 images, int64 labels) batches, sliced on the dataset's device; with
    `with_index` each batch also carries its samples' dataset indices (a third tensor).

    With `world_size > 1`, every rank must pass a generator in the same state: all ranks then
    draw the same permutation and rank r takes positions r, r + world_size, ... of it. When the
    dataset does not divide evenly, the permutation is extended with its own first elements (so
    every sample is seen and every rank gets the same number of samples and batches, which
    distributed training needs to stay in step); with `drop_last` the tail is cut off instead.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    n = len(ds)
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: n - n % world_size]
        elif n % world_size:
            extra = world_size - n % world_size
            order = torch.cat([order, order.repeat(extra // max(n, 1) + 1)[:extra]])
        order = order[rank::world_size]
    order = order.to(ds.images.device)
    count = len(order)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield (ds.images[index], ds.labels[index]) + ((index,) if with_index else ())


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The central `size` crop of (..., H, W); the offset is floor((H - size) / 2)."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    _check_crop(h, w, th, tw)
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, 10, C, size, size): the 4 corner crops and the centre crop, then the
    horizontal flips of those five, in that order.

    The multi-view test of Krizhevsky et al. 2012 used for the 10-crop ImageNet numbers of
    He et al. 2015 (Table 3). Crop 4 is exactly `center_crop(x, size)`.
    """
    if x.dim() != 4:
        raise DataError(f"ten_crop expects (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    _check_crop(h, w, size, size)
    crops = [
        x[..., :size, :size],
        x[..., :size, w - size :],
        x[..., h - size :, :size],
        x[..., h - size :, w - size :],
        center_crop(x, size),
    ]
    five = torch.stack(crops, dim=1)
    return torch.cat([five, five.flip(-1)], dim=1)


def _check_crop(h: int, w: int, th: int, tw: int) -> None:
    if th > h or tw > w or th < 1 or tw < 1:
        raise DataError(f"cannot take a {th}x{tw} crop of a {h}x{w} image")
