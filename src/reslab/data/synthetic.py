"""Synthetic images of any shape and class count, for benchmarks and tests that need no files.

Every class gets a random uint8 template; an image is the rounded mean of its class template
and uniform noise. So the task is learnable (training loss falls, which tests and benchmarks
can rely on) while nothing about it is real. Images, templates and labels come from a
`torch.Generator` seeded with `seed`, so the same arguments give the same data.
`val_split=True` draws a separate validation set (of `num_test` images) in place of the test
set: the images are i.i.d., so a held-out draw is what a held-out part of the training set
would be.
"""

from __future__ import annotations

import torch

from .base import AugmentSpec, DataError, DatasetBundle, InMemoryDataset, channel_stats, limit_dataset


def _draw(templates: torch.Tensor, n: int, g: torch.Generator) -> InMemoryDataset:
    labels = torch.randint(len(templates), (n,), generator=g)
    noise = torch.randint(256, (n, *templates.shape[1:]), generator=g, dtype=torch.int16)
    images = ((templates[labels].to(torch.int16) + noise + 1) // 2).to(torch.uint8)
    return InMemoryDataset(images, labels)


def load_synthetic(
    *,
    seed: int = 0,
    val_split: bool = False,
    num_train: int = 1000,
    num_test: int = 200,
    image_size: int | tuple[int, int] = 32,
    in_chans: int = 3,
    num_classes: int = 10,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DatasetBundle:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for key, value in (("num_train", num_train), ("num_test", num_test), ("image height", h),
                       ("image width", w), ("in_chans", in_chans), ("num_classes", num_classes)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"synthetic {key} must be a positive integer, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(256, (num_classes, in_chans, h, w), generator=g, dtype=torch.int16)
    train = _draw(templates, num_train, g)
    test = _draw(templates, num_test, g)
    if val_split:
        test = _draw(templates, num_test, g)  # a third draw: neither train nor test
    train, test = limit_dataset(train, train_limit), limit_dataset(test, test_limit)
    mean, std = channel_stats(train.images)
    return DatasetBundle(
        name="synthetic", train=train, test=test, num_classes=num_classes, in_chans=in_chans,
        image_size=(h, w), mean=mean, std=std,
        classes=tuple(f"class_{i}" for i in range(num_classes)),
        augment=AugmentSpec(pad=4, flip=True), in_memory=True,
    )
