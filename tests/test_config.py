"""Typed config: recipes, overrides, and the errors for bad values."""

import pytest

from mnist_cnn.config import Config, dump_toml, list_recipes, load_config, parse_override
from mnist_cnn.errors import ConfigError


def test_seed_recipe_is_the_seed_notebooks():
    cfg = load_config("seed")
    assert (cfg.model, cfg.epochs, cfg.batch_size) == ("seed", 20, 64)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule) == ("adam", 1e-3, "step")
    assert (cfg.optim.step_size, cfg.optim.gamma) == (15, 0.1)
    assert (cfg.augment.zoom_p, cfg.augment.zoom_crop, cfg.augment.max_rotation) == (0.1, 22, 15.0)
    assert cfg.val_size == 0
    assert "seed" in list_recipes()


def test_overrides_are_applied_and_checked():
    cfg = load_config("seed", {"epochs": 3, "optim.lr": 2e-3, "run.device": "cpu"})
    assert (cfg.epochs, cfg.optim.lr, cfg.run.device) == (3, 2e-3, "cpu")
    assert load_config("seed", {"optim.lr": 1}).optim.lr == 1.0  # an int is a fine float


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, "unknown config key epoch"),
        ({"optim.learning_rate": 1.0}, "unknown config key optim.learning_rate"),
        ({"optim": 1}, "unknown config key optim"),
        ({"epochs": "ten"}, "epochs must be int, got str"),
        ({"epochs": 2.5}, "epochs must be int"),
        ({"epochs": True}, "epochs must be int, got bool"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"optim.lr": 0.0}, "optim.lr must be > 0"),
        ({"optim.lr": -1e-3}, "optim.lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"optim.name": "lion"}, "optim.name must be one of adam, sgd"),
        ({"augment.zoom_p": 1.5}, r"augment.zoom_p must be in \[0, 1\]"),
        ({"run.device": "tpu"}, "run.device must be auto, cpu or cuda"),
    ],
)
def test_bad_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("seed", overrides)


def test_unknown_recipe_and_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known: .*seed"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [1, 2\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("[optim]\nlr = 0.01\nmomentun = 0.9\n")
    with pytest.raises(ConfigError, match="unknown config key optim.momentun"):
        load_config(str(typo))


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config("seed", {"epochs": 7, "run.out": 'runs/a "quoted" dir', "optim.label_smoothing": 0.05})
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(str(path)) == cfg


def test_parse_override_reads_toml_values_and_bare_strings():
    assert parse_override("optim.lr=2e-3") == ("optim.lr", 2e-3)
    assert parse_override("epochs=5") == ("epochs", 5)
    assert parse_override("run.deterministic=true") == ("run.deterministic", True)
    assert parse_override("model=seed") == ("model", "seed")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_override("epochs")


def test_defaults_equal_the_seed_recipe_apart_from_its_description():
    cfg = load_config("seed")
    assert cfg.about and cfg.recipe == "seed"
    cfg.about = ""
    assert cfg == Config()


def test_recipes_keep_their_promised_budgets():
    from mnist_cnn.networks.builtin import build_model, count_parameters

    assert {"seed", "fast", "best", "tiny"} <= set(list_recipes())
    fast, best, tiny = load_config("fast"), load_config("best"), load_config("tiny")
    assert fast.model == "seed" and fast.epochs <= 5
    assert count_parameters(build_model(best.model)) <= 16_500 and best.epochs <= 20
    assert count_parameters(build_model(tiny.model)) <= 8_000 and tiny.epochs <= 15
    fashion = load_config("fashion")
    assert fashion.dataset == "fashion-mnist" and count_parameters(build_model(fashion.model)) <= 16_500
    for cfg in (fast, best, tiny, fashion):
        assert cfg.val_size == 0  # tuned on a validation split; the published runs train on all 60,000


def test_the_teacher_recipe_is_best_on_a_larger_network_that_never_sees_the_validation_split():
    """The published teacher run was trained as `--recipe best --model vgg --set model_args.w1=16 ...
    --set val_size=10000`: the same config under another name."""
    from mnist_cnn.config import to_dict
    from mnist_cnn.networks.reference import config_network_size

    teacher = load_config("teacher")
    same = load_config(
        "best",
        {"model": "vgg", "model_args.w1": 16, "model_args.w2": 32, "model_args.w3": 64, "val_size": 10_000},
    )
    a, b = to_dict(teacher), to_dict(same)
    for key in ("recipe", "about"):
        a.pop(key), b.pop(key)
    assert a == b
    assert config_network_size(teacher.model, teacher.dataset, teacher.model_args) == 72_666


def test_the_fashion_teacher_is_the_teacher_with_the_fashion_recipes_augmentation():
    """The published Fashion-MNIST teacher run was trained as `--recipe teacher --dataset fashion-mnist` with
    the augmentation set to mirroring only: the same config as the teacher-fashion recipe, but for its name."""
    from mnist_cnn.config import to_dict

    flips = {f"augment.{k}": 0.0 for k in ("zoom_p", "max_rotation", "max_shift", "max_scale", "elastic")}
    same = load_config("teacher", {"dataset": "fashion-mnist", **flips, "augment.hflip_p": 0.5})
    a, b = to_dict(load_config("teacher-fashion")), to_dict(same)
    for key in ("recipe", "about"):
        a.pop(key), b.pop(key)
    assert a == b
    assert to_dict(load_config("fashion"))["augment"] == a["augment"] | {"interpolation": "nearest"}
