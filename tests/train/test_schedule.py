import pytest

from reslab.train import ErrorWarmup, TrainConfig, build_schedule


def lrs(config: TrainConfig, steps_per_epoch: int, total: int, at: list[int]) -> list[float]:
    schedule = build_schedule(config, steps_per_epoch, total)
    return [round(schedule(s), 10) for s in at]


def test_step_schedule_in_epochs():
    c = TrainConfig(lr=0.1, milestones=(2, 4), milestone_unit="epoch")
    assert lrs(c, 10, 60, [0, 19, 20, 39, 40, 59]) == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_paper_schedule_drops_at_32k_and_48k_iterations():
    c = TrainConfig.from_recipe("paper")
    assert lrs(c, 391, 64000, [0, 31999, 32000, 47999, 48000, 63999]) == \
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_step_schedule_in_fractions_of_the_run():
    c = TrainConfig(lr=0.1)  # 0.5 and 0.75 of 100 steps
    assert lrs(c, 10, 100, [49, 50, 74, 75]) == [0.1, 0.01, 0.01, 0.001]


def test_cosine_from_lr_to_min_factor():
    c = TrainConfig(lr=0.1, schedule="cosine")
    assert lrs(c, 10, 101, [0, 50, 100]) == [0.1, 0.05, 0.0]
    c = TrainConfig(lr=0.1, schedule="cosine", min_lr_factor=0.1)
    assert lrs(c, 10, 101, [0, 50, 100]) == [0.1, 0.055, 0.01]


def test_onecycle_ramps_up_linearly_to_the_peak_then_down():
    c = TrainConfig(lr=0.1, schedule="onecycle", onecycle_peak=0.25)
    # last step 100, peak at step 25; start at lr/25
    assert lrs(c, 10, 101, [0, 25, 55, 100]) == [0.004, 0.1, 0.06, 0.0]
    assert lrs(c, 10, 101, [10])[0] == pytest.approx(0.004 + 0.096 * 10 / 25)


def test_linear_warmup_multiplies_the_schedule():
    c = TrainConfig(lr=0.1, schedule="constant", warmup_epochs=1)
    assert lrs(c, 10, 50, [0, 4, 9, 10, 49]) == [0.01, 0.05, 0.1, 0.1, 0.1]
    c = TrainConfig(lr=0.1, schedule="cosine", warmup_epochs=1)  # the cosine starts after it
    assert lrs(c, 10, 51, [9, 10, 30, 50]) == [0.1, 0.1, 0.05, 0.0]


def test_absolute_milestones_after_the_end_are_an_error():
    c = TrainConfig.from_recipe("paper", epochs=10)
    with pytest.raises(ValueError, match=r"milestone\(s\) 32000, 48000 \(step\) fall after the last step \(110\)"):
        build_schedule(c, 11, 110)


def test_error_warmup_holds_the_low_lr_until_smoothed_error_is_below_threshold():
    w = ErrorWarmup(lr=0.01, threshold=0.8)
    assert w.lr_or(0.1) == 0.01
    w.update(0.9)  # smoothed 0.9
    w.update(0.7)  # 0.88
    w.update(0.5)  # 0.842
    w.update(0.5)  # 0.8078
    assert not w.done and w.lr_or(0.1) == 0.01
    w.update(0.5)  # 0.77702 < 0.8
    assert w.done and w.lr_or(0.1) == 0.1
    w.update(0.99)  # once over, the warm-up never comes back
    assert w.done and w.smoothed_error == pytest.approx(0.77702)
