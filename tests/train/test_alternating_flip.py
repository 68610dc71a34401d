"""Alternating flip (TrainConfig.alternate_flip) in training runs: which images the loop mirrors in
each epoch, and the refusals. The flip sets themselves are tested in tests/data/test_augment.py,
resume with the trainer's other settings in test_train_loop.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reslab.cli import build_parser
from reslab.data import load_dataset
from reslab.train import train
from reslab.train.loop import resolve_config


def test_each_image_is_mirrored_in_every_other_epoch(tmp_path, tiny, monkeypatch):
    import reslab.train.loop as loop

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (uint8 batch, flips) per step
    original = loop.augment_batch

    def record(x, spec, generator=None, flip=None):
        seen.append((x.clone(), flip))
        return original(x, spec, generator, flip)

    monkeypatch.setattr(loop, "augment_batch", record)
    train(tiny(out=str(tmp_path), epochs=4, flip=True, alternate_flip=True))  # 4 epochs × 3 steps × 64
    assert len(seen) == 12 and all(f is not None and f.dtype == torch.bool for _, f in seen)
    flips: list[dict[bytes, bool]] = [{} for _ in range(4)]
    for step, (x, f) in enumerate(seen):
        for image, flipped in zip(x, f.tolist()):
            flips[step // 3][image.numpy().tobytes()] = flipped
    assert all(len(epoch) == 192 for epoch in flips)  # every image once per epoch, all distinct
    assert sum(flips[0].values()) == 96  # half of them in the first epoch
    for image, first in flips[0].items():
        assert [flips[e][image] for e in range(4)] == [first, not first, first, not first]


def test_alternate_flip_is_refused_without_flipping_or_with_a_folder_dataset(tiny):
    digits = load_dataset("digits")
    with pytest.raises(ValueError, match="--alternate-flip decides which images to flip, but "
                                         "flipping is off"):
        resolve_config(tiny(alternate_flip=True, flip=False), digits)
    folder = dataclasses.replace(digits, name="folder", in_memory=False)  # what resolve_config reads
    with pytest.raises(ValueError, match="--alternate-flip needs an in-memory dataset .*'folder'"):
        resolve_config(tiny(alternate_flip=True), folder)


def test_train_command_has_the_flag():
    assert build_parser().parse_args(["train", "--alternate-flip"]).alternate_flip is True
    assert build_parser().parse_args(["train", "--no-alternate-flip"]).alternate_flip is False
