import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.data import InMemoryDataset
from reslab.train import DistContext, evaluate_model
from reslab.train.evaluate import _views

# Four images, six classes. Image i carries its index in pixel (0, 0, 0); the model looks the
# logits up in this table, so every number below is known exactly.
LOGITS = torch.tensor([
    [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 hit
    [3.0, 2.0, 0.0, 0.0, 0.0, 0.0],   # label 1: second -> top-1 miss, top-5 hit
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],   # label 5: sixth -> top-5 miss
    [0.0, 0.0, 0.0, 0.0, 0.0, 9.0],   # label 5: top-1 hit
])
LABELS = torch.tensor([0, 1, 5, 5])


class Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(LOGITS.clone())

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].round().long()]


def dataset() -> InMemoryDataset:
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(4, dtype=torch.uint8)
    return InMemoryDataset(images, LABELS.clone())


NORM = dict(mean=(0.0,), std=(1 / 255,))  # normalisation gives back the raw pixel values


def test_loss_top1_and_top5_error_are_exact():
    r = evaluate_model(Lookup(), dataset(), **NORM)
    assert (r.top1_error, r.top5_error, r.count) == (0.5, 0.25, 4)
    assert r.loss == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), abs=1e-6)


def test_batch_size_does_not_change_the_result():
    one = evaluate_model(Lookup(), dataset(), batch_size=1, **NORM)
    all_ = evaluate_model(Lookup(), dataset(), batch_size=512, **NORM)
    assert (one.top1_error, one.top5_error, one.count) == (all_.top1_error, all_.top5_error, all_.count)
    assert one.loss == pytest.approx(all_.loss, rel=1e-12)


def test_flip_tta_of_a_mirror_symmetric_view_changes_nothing():
    class Symmetric(Lookup):
        def forward(self, x):  # reads pixel (0,0) and (0,W-1) alike
            return self.table[torch.maximum(x[:, 0, 0, 0], x[:, 0, 0, -1]).round().long()]

    none = evaluate_model(Symmetric(), dataset(), **NORM)
    flip = evaluate_model(Symmetric(), dataset(), tta="flip", **NORM)
    assert (flip.top1_error, flip.top5_error, flip.tta) == (none.top1_error, none.top5_error, "flip")
    assert flip.loss == pytest.approx(none.loss, abs=1e-6)


def test_tta_averages_probabilities_over_the_views():
    # Two views with logits a and b: the score is log((softmax(a) + softmax(b)) / 2).
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    x[0, 0, 0, 0] = 1  # flipped, pixel (0,0) becomes 0
    ds = InMemoryDataset(x, torch.tensor([1]))
    r = evaluate_model(Lookup(), ds, tta="flip", **NORM)
    p = (LOGITS[1].softmax(0) + LOGITS[0].softmax(0)) / 2
    assert r.loss == pytest.approx(-math.log(p[1].item()), abs=1e-6)


def test_ten_crop_views_of_in_memory_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 8, 8)
    views = _views(x, "10crop", pad=1)
    assert views.shape == (2, 10, 3, 8, 8)
    assert torch.equal(views[:, 4], x)  # the centre crop of the padded image is the image
    assert torch.equal(views[:, 9], x.flip(-1))


def test_flip_translate_views_are_the_image_and_two_reflected_shifts_with_their_mirrors():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 6, 7)
    views = _views(x, "flip-translate", pad=4)
    assert views.shape == (2, 6, 3, 6, 7)
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)  # oracle
    down_right, up_left = padded[..., :6, :7], padded[..., 2:, 2:]
    for i, view in enumerate([x, down_right, up_left]):
        assert torch.equal(views[:, 2 * i], view)
        assert torch.equal(views[:, 2 * i + 1], view.flip(-1))


def test_flip_translate_needs_room_to_shift():
    with pytest.raises(ValueError, match=r"shifts images by one pixel; got \(1, 5\) images"):
        _views(torch.zeros(2, 3, 1, 5, dtype=torch.uint8), "flip-translate", 0)


def test_views_from_a_ten_crop_dataset_need_tta_10crop():
    with pytest.raises(ValueError, match="yields 10 views per image but tta='none'"):
        _views(torch.zeros(2, 10, 3, 4, 4, dtype=torch.uint8), "none", 0)


def test_unknown_tta_is_rejected():
    with pytest.raises(ValueError, match="tta must be one of none, flip, flip-translate, 10crop; got 'five'"):
        evaluate_model(Lookup(), dataset(), tta="five", **NORM)


def test_a_plain_function_is_evaluated_like_the_module():
    # What `reslab eval --backend openvino` passes: a CPU function from batch to logits.
    model = Lookup()
    ref = evaluate_model(model, dataset(), tta="flip", **NORM)
    got = evaluate_model(lambda x: model(x).detach(), dataset(), tta="flip", **NORM)
    assert got == ref
    with pytest.raises(ValueError, match="precision='bf16' is autocast, for a torch module"):
        evaluate_model(lambda x: model(x), dataset(), precision="bf16", **NORM)


def test_eval_mode_is_used_and_train_mode_restored():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 6))
    model.train()
    before = model[1].running_mean.clone()
    evaluate_model(model, dataset(), **NORM)
    assert model.training and torch.equal(model[1].running_mean, before)


def test_ranks_evaluate_disjoint_shards_that_sum_to_the_whole():
    class Collect(DistContext):
        def all_reduce_sum(self, t):
            return t  # what this rank contributes

    shards = [evaluate_model(Lookup(), dataset(), dist=Collect(rank=r, world_size=3), **NORM) for r in range(3)]
    assert [s.count for s in shards] == [2, 1, 1]
    wrong = sum(s.top1_error * s.count for s in shards)
    assert wrong == 2  # the two top-1 misses, each counted once
