"""Batch augmentation, normalisation, batching/sharding and 10-crop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reslab.data import (
    AugmentSpec, DataError, InMemoryDataset, alternating_flips, augment_batch, batches, center_crop,
    mean_colour, normalize, ten_crop,
)


def images(n: int = 16, c: int = 3, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    # Values 1..255 so a zero in the output can only come from padding or cutout.
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_dtype_and_is_deterministic():
    x = images()
    spec = AugmentSpec(pad=2, flip=True, cutout=3)
    a, b = augment_batch(x, spec, gen(5)), augment_batch(x, spec, gen(5))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, spec, gen(6)))


def test_crops_are_translations_of_the_zero_padded_image():
    x, p = images(n=32), 2
    out = augment_batch(x, AugmentSpec(pad=p, flip=False), gen(0))
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    offsets = []
    for n in range(len(x)):
        found = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(out[n], padded[n, :, dy : dy + h, dx : dx + w])]
        assert len(found) == 1, f"sample {n} is not a crop of its padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 5  # offsets are drawn per sample, not once per batch


def test_flip_mirrors_a_random_subset_of_samples():
    x = images(n=64)
    out = augment_batch(x, AugmentSpec(pad=0, flip=True), gen(1))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_a_given_flip_mirrors_exactly_those_samples_and_draws_nothing_for_them():
    x = images(n=8)
    flip = torch.tensor([True, False] * 4)
    out = augment_batch(x, AugmentSpec(pad=0, flip=True), gen(1), flip)
    assert torch.equal(out, torch.where(flip[:, None, None, None], x.flip(-1), x))
    g1, g2 = gen(3), gen(3)  # crops and cutout come out as without a given flip, only the flip moves
    spec = AugmentSpec(pad=2, flip=True, cutout=3)
    a, b = augment_batch(x, spec, g1, flip), augment_batch(x, AugmentSpec(pad=2, flip=False, cutout=3), g2)
    assert torch.equal(a[~flip], b[~flip])


@pytest.mark.parametrize("flip, spec, message", [
    (torch.ones(3, dtype=torch.bool), AugmentSpec(flip=True), "flip must be 8 booleans"),
    (torch.ones(8), AugmentSpec(flip=True), "flip must be 8 booleans"),
    (torch.ones(8, dtype=torch.bool), AugmentSpec(flip=False), "spec.flip=False"),
])
def test_a_bad_given_flip_is_rejected(flip, spec, message):
    with pytest.raises(DataError, match=message):
        augment_batch(images(n=8), spec, gen(0), flip)


def test_alternating_flips_mirror_half_first_then_every_image_every_other_epoch():
    epochs = [alternating_flips(11, e, gen(5)) for e in range(4)]
    assert int(epochs[0].sum()) == 6  # a random half (rounded up), not a coin per image
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0])
    assert torch.equal(epochs[3], epochs[1])
    assert not torch.equal(epochs[0], alternating_flips(11, 0, gen(6)))  # the half is seeded
    assert epochs[0].tolist() != [True] * 6 + [False] * 5


def test_batches_can_carry_their_dataset_indices():
    ds = InMemoryDataset(images(n=10), torch.arange(10) * 3)
    for imgs, labels, index in batches(ds, 4, shuffle=True, generator=gen(7), with_index=True):
        assert torch.equal(labels, index * 3) and torch.equal(imgs, ds.images[index])


def test_crop_and_flip_together_are_a_mirrored_translation():
    x, p = images(n=32), 1
    out = augment_batch(x, AugmentSpec(pad=p, flip=True), gen(2))
    padded = F.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    views = {(dy, dx, f) for dy in range(3) for dx in range(3) for f in (0, 1)}
    for n in range(len(x)):
        matches = [v for v in views
                   if torch.equal(out[n], padded[n, :, v[0] : v[0] + h, v[1] : v[1] + w].flip(-1) if v[2]
                                  else padded[n, :, v[0] : v[0] + h, v[1] : v[1] + w])]
        assert len(matches) == 1


def test_cutout_zeroes_one_square_per_sample_clipped_at_the_border():
    x = images(n=64, h=12, w=12)
    out = augment_batch(x, AugmentSpec(pad=0, flip=False, cutout=4), gen(3))
    full_squares = 0
    for o, i in zip(out, x):
        cut = o == 0
        assert torch.equal(o[~cut], i[~cut])
        assert torch.equal(cut[0], cut[1]) and torch.equal(cut[1], cut[2])  # same square in every channel
        rows, cols = cut[0].any(1).nonzero().flatten(), cut[0].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert int(cut[0].sum()) == len(rows) * len(cols)  # a rectangle, not scattered pixels
        assert rows.max() - rows.min() + 1 == len(rows)
        full_squares += len(rows) == 4 and len(cols) == 4
    assert full_squares > 10


def test_reflect_padding_crops_translations_of_the_mirrored_image():
    x, p = images(n=32), 3
    out = augment_batch(x, AugmentSpec(pad=p, flip=True, pad_mode="reflect"), gen(4))
    # The oracle: F.pad's reflect mode (on floats: it has no uint8 kernel).
    padded = F.pad(x.float(), (p, p, p, p), mode="reflect").to(torch.uint8)
    h, w = x.shape[-2:]
    offsets = set()
    for n in range(len(x)):
        found = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)
                 if torch.equal(out[n], padded[n, :, dy : dy + h, dx : dx + w].flip(-1) if f
                                else padded[n, :, dy : dy + h, dx : dx + w])]
        assert len(found) == 1, f"sample {n} is not a (mirrored) crop of its reflect-padded image"
        offsets.add(found[0])
    assert len(offsets) > 5


def test_mean_padding_and_cutout_paint_the_fill_colour():
    x, p, fill = images(n=32), 2, (7, 8, 9)
    out = augment_batch(x, AugmentSpec(pad=p, flip=False, pad_mode="mean", fill=fill), gen(0))
    h, w = x.shape[-2:]
    padded = torch.stack([F.pad(x[:, c], (p, p, p, p), value=fill[c]) for c in range(3)], 1)
    for n in range(len(x)):
        assert any(torch.equal(out[n], padded[n, :, dy : dy + h, dx : dx + w])
                   for dy in range(2 * p + 1) for dx in range(2 * p + 1))
    cut = augment_batch(x, AugmentSpec(pad=0, flip=False, cutout=4, fill=fill), gen(3))
    changed = (cut != x).any(1)  # (N, H, W): the painted squares
    assert changed.any(1).any(1).all()  # every sample got its square
    for c in range(3):
        assert (cut[:, c][changed] == fill[c]).all()


def test_zero_padding_ignores_the_fill_colour_and_draws_as_before():
    # The fill only colours cutout and mean padding: a zero-padded crop is the same with or without it.
    x = images(n=32)
    a = augment_batch(x, AugmentSpec(pad=2, flip=True), gen(9))
    b = augment_batch(x, AugmentSpec(pad=2, flip=True, fill=(50, 60, 70)), gen(9))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pad_mode="wrap"), "pad_mode must be one of zero, mean, reflect; got 'wrap'"),
    (dict(pad_mode="mean"), r"pad_mode='mean' needs the fill colour"),
    (dict(fill=(0, 256, 0)), r"fill is a uint8 colour \(values 0..255 per channel\)"),
])
def test_bad_augment_specs_are_rejected(kwargs, message):
    with pytest.raises(DataError, match=message):
        AugmentSpec(**kwargs)


def test_fill_and_reflect_padding_must_fit_the_images():
    x = images(h=4, w=4)
    with pytest.raises(DataError, match=r"images have 3 channels but the augmentation's fill colour "
                                        r"has 1 values"):
        augment_batch(x, AugmentSpec(cutout=2, fill=(5,)))
    with pytest.raises(DataError, match=r"reflect padding of 4 pixels needs images larger than 4x4, got 4x4"):
        augment_batch(x, AugmentSpec(pad=4, pad_mode="reflect"))


def test_mean_colour_is_the_nearest_uint8():
    assert mean_colour((0.49125, 0.48209, 0.446521)) == (125, 123, 114)
    assert mean_colour((0.0, 1.0, 1.2)) == (0, 255, 255)


def test_nothing_to_do_returns_the_batch_itself():
    x = images()
    assert augment_batch(x, AugmentSpec(pad=0, flip=False), gen(0)) is x


def test_augment_rejects_float_input():
    with pytest.raises(DataError, match="uint8"):
        augment_batch(torch.zeros(2, 3, 4, 4), AugmentSpec())


def test_normalize_matches_the_formula():
    x = images(n=4)
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64)[:, None, None]
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    half = normalize(x, mean, std, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, atol=4e-3, rtol=0)


def test_normalize_channels_last_and_ten_crop_batches():
    x = images(n=2)
    assert normalize(x, [0.5] * 3, [0.5] * 3, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    crops = ten_crop(x, 6)  # (N, 10, C, S, S)
    torch.testing.assert_close(normalize(crops, [0.5] * 3, [0.5] * 3)[:, 3], normalize(crops[:, 3], [0.5] * 3, [0.5] * 3))


def test_normalize_rejects_a_channel_mismatch():
    with pytest.raises(DataError, match="images have 3 channels but mean has 1"):
        normalize(images(n=1), (0.5,), (0.5,))


def test_batches_cover_the_epoch_in_order_without_shuffle():
    ds = InMemoryDataset(images(n=10), torch.arange(10))
    got = list(batches(ds, 4, shuffle=False))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(got[1][0], ds.images[4:8])
    assert [len(b[1]) for b in batches(ds, 4, shuffle=False, drop_last=True)] == [4, 4]


def test_shuffled_batches_are_a_seeded_permutation():
    ds = InMemoryDataset(images(n=10), torch.arange(10))
    first = torch.cat([b[1] for b in batches(ds, 3, shuffle=True, generator=gen(7))])
    again = torch.cat([b[1] for b in batches(ds, 3, shuffle=True, generator=gen(7))])
    assert torch.equal(first, again) and sorted(first.tolist()) == list(range(10))
    assert first.tolist() != list(range(10))
    for imgs, labels in batches(ds, 3, shuffle=True, generator=gen(7)):
        assert torch.equal(imgs, ds.images[labels])  # images travel with their labels


def shard(n: int, world: int, **kw) -> list[list[int]]:
    ds = InMemoryDataset(images(n=n, h=2, w=2), torch.arange(n))
    return [torch.cat([b[1] for b in batches(ds, 2, shuffle=True, generator=gen(11), rank=r, world_size=world, **kw)]).tolist()
            for r in range(world)]


def test_ranks_get_disjoint_shards_that_cover_the_dataset():
    parts = shard(12, 3)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(sum(parts, [])) == list(range(12))


def test_uneven_shards_are_padded_to_equal_size_and_still_cover_everything():
    parts = shard(10, 4)
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    flat = sum(parts, [])
    assert set(flat) == set(range(10)) and len(flat) - len(set(flat)) == 2
    dropped = shard(10, 4, drop_last=True)
    assert [len(p) for p in dropped] == [2, 2, 2, 2] and len(set(sum(dropped, []))) == 8


def test_batches_reject_a_bad_rank():
    ds = InMemoryDataset(images(n=4), torch.arange(4))
    with pytest.raises(DataError, match="need 0 <= rank < world_size, got rank=2, world_size=2"):
        next(batches(ds, 2, shuffle=False, rank=2, world_size=2))


def test_ten_crop_is_four_corners_center_and_their_flips():
    x = images(n=2, h=9, w=11)
    crops = ten_crop(x, 5)
    assert crops.shape == (2, 10, 3, 5, 5)
    assert torch.equal(crops[:, 0], x[..., :5, :5])
    assert torch.equal(crops[:, 1], x[..., :5, 6:])
    assert torch.equal(crops[:, 2], x[..., 4:, :5])
    assert torch.equal(crops[:, 3], x[..., 4:, 6:])
    assert torch.equal(crops[:, 4], x[..., 2:7, 3:8]) and torch.equal(crops[:, 4], center_crop(x, 5))
    assert torch.equal(crops[:, 5:], crops[:, :5].flip(-1))


def test_ten_crop_larger_than_the_image_is_an_error():
    with pytest.raises(DataError, match="cannot take a 9x9 crop of a 8x10 image"):
        ten_crop(images(n=1), 9)
