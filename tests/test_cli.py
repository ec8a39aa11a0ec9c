"""A small dry run of every command, and the one-line errors, from the command line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from mnist_cnn.cli import main

FAST = ["--epochs", "2", "--batch-size", "32", "--device", "cpu", "--no-verify", "--no-progress"]


def train(tmp_path, data_dir, *extra) -> tuple[int, str]:
    out = tmp_path / "run"
    return main(["train", "--data-dir", str(data_dir), "--out", str(out), *FAST, *extra]), out


def test_train_writes_a_complete_run_folder(tmp_path, synthetic_dir, capsys):
    code, out = train(tmp_path, synthetic_dir)
    assert code == 0
    printed = capsys.readouterr().out
    assert "epoch   1/2" in printed and "epoch   2/2" in printed and "final test accuracy" in printed
    for name in (
        "config.toml",
        "metrics.csv",
        "last.pt",
        "curves.png",
        "samples.png",
        "summary.txt",
        "environment.json",
        "evaluation.json",
        "MODEL_CARD.md",
    ):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 32 and config["run"]["out"] == str(out)
    env = json.loads((out / "environment.json").read_text())
    assert {"torch", "git_revision", "device", "python"} <= set(env)
    assert "Total params: 16,426" in (out / "summary.txt").read_text()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_best_checkpoint_is_the_epoch_with_the_best_validation_accuracy(tmp_path, synthetic_dir, monkeypatch):
    """best.pt is what the epoch with the highest val_acc in metrics.csv saved, the later one on a tie
    (best_on_validation's >=): its epoch, its weights, its metrics rows. The validation accuracies are
    scripted, [0.9, 0.9, 0.5], so that the best epoch is neither the first nor the last, on any CPU."""
    from mnist_cnn.training import loop
    from mnist_cnn.training.rundir import RunDir

    val_size, scripted = 100, iter([0.9, 0.9, 0.5])
    real_evaluate, real_save_last = loop.evaluate_split, RunDir.save_last

    def evaluate_split(model, images, labels, cfg, world):
        result = real_evaluate(model, images, labels, cfg, world)
        return {**result, "accuracy": next(scripted)} if labels.numel() == val_size else result

    saved = tmp_path / "each-epoch"  # what last.pt held after each epoch
    saved.mkdir()

    def save_last(run, ckpt):
        real_save_last(run, ckpt)
        shutil.copy(run.file("last.pt"), saved / f"epoch-{ckpt.epoch}.pt")

    monkeypatch.setattr(loop, "evaluate_split", evaluate_split)
    monkeypatch.setattr(RunDir, "save_last", save_last)
    code, out = train(tmp_path, synthetic_dir, "--epochs", "3", "--train-limit", "320", "--set", f"val_size={val_size}")
    assert code == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-3:] == ["seconds", "val_loss", "val_acc"]
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == [0.9, 0.9, 0.5]
    best = max(range(len(accs)), key=lambda i: (accs[i], i)) + 1  # 1-based; the later epoch on a tie
    assert best == 2
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["epoch"] == best
    assert [m["epoch"] for m in ckpt["metrics"]] == [int(r["epoch"]) for r in rows[:best]]
    assert [m["val_acc"] for m in ckpt["metrics"]] == accs[:best]
    then = torch.load(saved / f"epoch-{best}.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model"].keys() == then["model"].keys()
    assert all(torch.equal(ckpt["model"][k], then["model"][k]) for k in then["model"])
    assert not all(torch.equal(ckpt["model"][k], last["model"][k]) for k in last["model"])  # epochs differ


def test_evaluate_prints_json_matching_the_final_epoch(synthetic_run, capsys):
    data, out = synthetic_run
    capsys.readouterr()
    assert main(["evaluate", str(out / "last.pt"), "--data-dir", str(data), "--no-verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    assert result["n"] == 200
    assert result["accuracy"] == pytest.approx(float(final["test_acc"]), rel=5e-6)  # the csv's six digits
    assert result["loss"] == pytest.approx(float(final["test_loss"]), rel=1e-4)


def test_summary_prints_16426_parameters(capsys):
    assert main(["summary"]) == 0
    text = capsys.readouterr().out
    assert "Total params: 16,426" in text and "16x26x26" in text


def test_plot_redraws_curves_from_metrics(tmp_path, synthetic_run):
    """The figure training drew, byte for byte, from metrics.csv alone; another metrics.csv, another figure."""
    out = tmp_path / "run"
    shutil.copytree(synthetic_run[1], out)
    drawn = (out / "curves.png").read_bytes()
    assert drawn[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "curves.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "curves.png").read_bytes() == drawn
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rows[0]["train_acc"] = str(1 - float(rows[0]["train_acc"]))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["plot", str(out)]) == 0
    assert (out / "curves.png").read_bytes() != drawn


def test_recipes_lists_every_recipe_with_its_model_size_and_epochs(capsys):
    from mnist_cnn.config import list_recipes, load_config
    from mnist_cnn.networks.reference import config_network_size

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    columns = set()
    for line in lines:
        cfg = load_config(line.split()[0])
        assert line.split()[1:3] == [cfg.dataset, cfg.model]
        assert f"{config_network_size(cfg.model, cfg.dataset, cfg.model_args):,} parameters" in line
        assert f"{cfg.epochs} epochs" in line and cfg.about in line
        columns.add(line.index(f" {cfg.dataset} "))
    assert len(columns) == 1  # the data sets in one column, after names of any length (teacher-fashion)


def test_existing_run_folder_is_not_overwritten(tmp_path, synthetic_run, capsys):
    synthetic_dir, run = synthetic_run
    shutil.copytree(run, tmp_path / "run")  # a finished run, where train() writes
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    code, _ = train(tmp_path, synthetic_dir)
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert {"metrics.csv", "last.pt", "config.toml"} <= set(before)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "error: epochs must be > 0"),
        (["train", "--model", "nope"], "error: unknown model 'nope'"),
        (["train", "--recipe", "nope"], "error: unknown recipe 'nope'"),
        (["train", "--set", "optim.lr=fast"], "error: optim.lr must be float, got str"),
        (["evaluate", "no-such.pt"], "error: no-such.pt: no such checkpoint file"),
        (["plot", "no-such-run"], "error: no-such-run/metrics.csv: not found"),
        (["summary", "--model", "nope"], "error: unknown model 'nope'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no run folder, no figures, nothing


def test_module_entry_point_gives_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "train", "--epochs", "-1"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: epochs must be > 0, got -1\n"  # one line: no traceback
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_batch_larger_than_the_data_is_refused_before_anything_is_written(tmp_path, synthetic_dir, capsys):
    code, out = train(tmp_path, synthetic_dir, "--batch-size", "1000")
    assert code == 2
    assert "batch_size 1000 is larger than the 600 training images" in capsys.readouterr().err
    assert not out.exists()


def test_debug_shows_the_traceback_instead():
    from mnist_cnn.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "--epochs", "0"])


def test_a_reader_that_leaves_early_ends_the_command_quietly(monkeypatch, capsys):
    # `mnist-cnn recipes | head -1`: the pipe's reader is gone, so writing raises BrokenPipeError
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = os.fdopen(write_end, "w", buffering=1)  # line-buffered: the first line already fails
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main(["recipes"]) == 141  # 128 + SIGPIPE, as a shell reports it
    finally:
        monkeypatch.undo()
        closed.close()
    assert capsys.readouterr().err == ""  # no traceback, no error line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_leaves_no_folder(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--device",
                "cuda",
                "--no-verify",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' asked for, but this torch sees no CUDA GPU; use --device cpu" in err
    assert not out.exists()


def test_sync_bn_without_torchrun_is_one_line_and_leaves_no_folder(tmp_path, synthetic_dir, capsys):
    code, out = train(tmp_path, synthetic_dir, "--set", "run.sync_bn=true")
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.sync_bn needs torchrun with more than one process" in err
    assert not out.exists()


def test_serve_without_the_web_extra_says_which_extra(synthetic_run, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_starlette(name, *args, **kwargs):
        if name == "server" or name.endswith(".server") or name.startswith(("starlette", "uvicorn")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "mnist_cnn.serving.app", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_starlette)
    assert main(["serve", str(synthetic_run[1] / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serve needs the web extra: pip install 'mnist-cnn[web]'" in err


def test_version_is_pyprojects_and_the_changelogs_latest(capsys):
    """`mnist-cnn --version`, mnist_cnn.__version__, pyproject.toml and CHANGELOG.md's newest entry agree."""
    import re
    import tomllib

    import mnist_cnn
    from conftest import REPO

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mnist-cnn {declared}" and mnist_cnn.__version__ == declared
    newest = re.search(r"^## (\S+) - \d{4}-\d{2}-\d{2}$", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == declared


def test_help_names_every_built_in_network_and_precision(capsys):
    from mnist_cnn.config import CHOICES
    from mnist_cnn.networks.builtin import MODELS

    for command in ("train", "summary", "check"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert all(name in text for name in MODELS), command
    main_help = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(p in " ".join(main_help.split()) for p in CHOICES["run.precision"])
    assert "--tensorboard" in main_help
