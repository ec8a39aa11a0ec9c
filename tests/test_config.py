"""Typed config: recipes, overrides, and the errors for bad values."""

import re
import tomllib
from pathlib import Path

import pytest

from mnist_cnn.config import Config, dump_toml, list_recipes, load_config, parse_override, set_value
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
        ({"optim.name": "lion"}, "optim.name must be one of adam, adamw, sgd"),
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
    cfg = load_config("seed", {"epochs": 7, "run.data_dir": 'data/a "quoted" dir', "optim.label_smoothing": 0.05})
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(str(path)) == cfg


def test_any_text_and_any_model_args_key_round_trip_through_toml(tmp_path):
    """What test_properties found: json.dumps wrote U+1F600 as a surrogate pair and left DEL raw (both
    invalid TOML), and a model_args key that is not a bare word was written unquoted."""
    cfg = load_config(
        "seed",
        {
            "about": 'a \U0001f600 "digit" \\ tab\t bell\x07 del\x7f',
            "model_args.a key": [[1, 2], ["x"]],
            "model_args.width=": 3,
        },
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("model_args.x=" + "[" * 2000, "arrays or tables nested too deeply to read"),  # was a RecursionError
        ("optim.lr=" + "9" * 400, "optim.lr must be a float, got the integer 999"),  # was an OverflowError
        ("model_args.x=[{a = 1}]", "model_args.x must be a number, string, boolean or list of those, got dict"),
        ("model_args.x=[1979-05-27]", "model_args.x must be a number, string, boolean or list of those, got date"),
        ("model_args={x = {y = 1}}", "model_args.x must be a number, string, boolean or list of those, got dict"),
        ('"optim.l\nr"=1', "unknown config key"),  # a key with a newline: still one line
    ],
)
def test_odd_set_values_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        cfg = load_config("seed")
        set_value(cfg, *parse_override(text.replace("\\n", "\n")))
    assert "\n" not in str(info.value)


def test_a_deeply_nested_recipe_file_is_a_config_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.toml: arrays or tables nested too deeply to read"):
        load_config(str(path))


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


def test_a_runs_config_toml_is_a_recipe_for_a_new_run_in_a_folder_of_its_own(
    synthetic_run, tmp_path, monkeypatch, capsys
):
    """docs/guide/train.md: config.toml "is itself a valid recipe". It records the folder its run wrote;
    a run from it writes runs/<time> (or --out), says so, and leaves the first run as it was."""
    from mnist_cnn.cli import main

    data, first = synthetic_run
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    argv = ["train", "--recipe", str(first / "config.toml"), "--epochs", "1", "--train-limit", "64", "--no-progress"]
    assert main(argv) == 0
    assert f"its run.out {first} is not reused; this run writes a folder of its own" in capsys.readouterr().err
    (second,) = (tmp_path / "runs").iterdir()
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before
    recorded = [tomllib.loads((run / "config.toml").read_text()) for run in (first, second)]
    assert [r["run"].pop("out") for r in recorded] == [str(first), str(Path("runs") / second.name)]
    assert [(r["epochs"], r["run"].pop("train_limit")) for r in recorded] == [(2, 0), (1, 64)]
    recorded[0]["epochs"] = 1
    assert recorded[0] == recorded[1]  # the data folder, --no-verify, batch size 32 and cpu: from the first run


def test_seeds_past_torchs_range_and_infinite_floats_are_one_line_errors(capsys):
    from mnist_cnn.cli import main

    for args, says in (
        (["--seed", str(2**63)], "run.seed must be in 0..9223372036854775807"),
        (["--seed", "-1"], "run.seed must be in 0.."),
        (["--set", "optim.weight_decay=inf"], "weight_decay must be a finite number, got inf"),
        (["--set", "distill.temperature=inf"], "temperature must be a finite number, got inf"),
    ):
        assert main(["train", "--epochs", "1", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
