import json

import pytest

from reslab.train import RECIPES, TrainConfig


def test_defaults_are_he_et_al_cifar_hyperparameters():
    c = TrainConfig()
    assert (c.batch_size, c.lr, c.momentum, c.weight_decay, c.schedule, c.lr_decay) == \
        (128, 0.1, 0.9, 1e-4, "step", 0.1)
    assert c.milestones == (0.5, 0.75) and c.milestone_unit == "fraction"


def test_paper_recipe_is_the_iteration_schedule_of_section_4_2():
    c = TrainConfig.from_recipe("paper")
    assert (c.batch_size, c.lr, c.steps, c.milestones, c.milestone_unit) == \
        (128, 0.1, 64000, (32000.0, 48000.0), "step")
    assert (c.error_warmup, c.error_warmup_lr, c.error_warmup_threshold) == ("auto", 0.01, 0.8)
    assert c.epochs_or_default() is None  # the budget is in iterations


def test_densenet_recipe_is_huang_et_al():
    c = TrainConfig.from_recipe("densenet", data="cifar10")
    assert (c.batch_size, c.nesterov, c.milestones, c.epochs_or_default()) == (64, True, (0.5, 0.75), 300)


def test_recipe_epochs_depend_on_the_dataset():
    assert TrainConfig.from_recipe("default", data="digits").epochs_or_default() == RECIPES["default"].epochs["digits"]
    assert TrainConfig.from_recipe("default", data="cifar10").epochs_or_default() == 164


def test_overrides_win_and_an_explicit_epoch_budget_replaces_the_recipe_steps():
    c = TrainConfig.from_recipe("paper", epochs=7, lr=0.05)
    assert (c.steps, c.epochs, c.lr, c.recipe) == (None, 7, 0.05, "paper")
    assert TrainConfig.from_recipe("densenet", steps=10).epochs_or_default() is None


def test_json_round_trip_gives_an_equal_config():
    c = TrainConfig.from_recipe("fast", model_kwargs={"shortcut": "B"}, milestones=(1, 2),
                                milestone_unit="epoch")
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize("field, value, message", [
    ("lr", -0.1, "lr must be greater than 0"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("batch_size", 0, "batch_size must be at least 1"),
    ("precision", "fp8", "precision must be one of fp32, bf16, fp16; got 'fp8'"),
    ("schedule", "linear", "schedule must be one of step, cosine, onecycle, constant"),
    ("milestones", (0.75, 0.5), "milestones must increase"),
    ("milestones", (0.5, 2.0), "fraction milestones lie strictly between 0 and 1"),
    ("ema_decay", 1.0, "ema_decay must be below 1"),
    ("recipe", "fastest", "unknown recipe 'fastest'"),
])
def test_bad_values_are_rejected_with_the_field_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_unknown_field_in_overrides_is_an_error():
    with pytest.raises(ValueError, match="TrainConfig has no field 'learning_rate'"):
        TrainConfig.from_recipe("default", learning_rate=0.1)
