"""Models that ship: the trained checkpoints inside the package, `pretrained:NAME` wherever a checkpoint
is taken, each evaluating to exactly the accuracy its card states, from a fresh install with no run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import mnist_cnn
from conftest import REPO, SHARED_MNIST, served, write_synthetic
from mnist_cnn import pretrained
from mnist_cnn.cli import main
from mnist_cnn.errors import CheckpointError

SHARED = {"mnist": SHARED_MNIST, "fashion-mnist": SHARED_MNIST.parent / "fashion-mnist"}
EXAMPLES = REPO / "docs" / "examples"
MAX_BYTES = 100_000  # the bound on a shipped file


def card_accuracy(name: str) -> float:
    """The final test accuracy the model card's front matter states."""
    text = pretrained.card(name).read_text()
    meta = yaml.safe_load(text.split("---")[1])
    (result,) = meta["model-index"][0]["results"]
    return result["metrics"][0]["value"]


def test_every_shipped_model_is_small_weights_only_and_listed(capsys):
    names = pretrained.names()
    assert {"seed", "tiny"} <= set(names)
    for name in names:
        file = pretrained.resolve(f"pretrained:{name}")
        assert file.stat().st_size < MAX_BYTES
        ckpt = torch.load(file, map_location="cpu", weights_only=True)  # no pickled code can run
        assert ckpt["optimizer"] is None and ckpt["config"]["run"]["data_dir"] == ""  # no path of the trainer's
        assert ckpt["metrics"][-1]["test_acc"] == pretrained.index()[name]["test_accuracy"] == card_accuracy(name)
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(f"pretrained:{name}" in out for name in names)
    assert "16,426 parameters  test accuracy 99.51%" in out
    with pytest.raises(CheckpointError, match="no pretrained model 'huge'; the package holds"):
        mnist_cnn.load("pretrained:huge")


@pytest.mark.realdata
@pytest.mark.parametrize("name", pretrained.names())
def test_each_shipped_model_evaluates_to_exactly_the_accuracy_its_card_states(name):
    dataset = pretrained.index()[name]["dataset"]
    folder = SHARED[dataset]
    if not folder.is_dir():
        pytest.skip(f"{dataset} not found at {folder}")
    report = mnist_cnn.evaluate(f"pretrained:{name}", data_dir=folder, device="cpu")
    assert report["n"] == 10_000 and report["accuracy"] == card_accuracy(name)


def test_a_fresh_install_predicts_the_examples_without_training(tmp_path):
    """The wheel holds the models: unpacked alone, from a folder with no run, nothing downloaded."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO), "-w", tmp_path],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("MNIST_CNN_DATA", None)
    done = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", "pretrained:seed", str(EXAMPLES), "--json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    answers = json.loads(done.stdout)
    for answer in answers:  # the examples are named by their digit: seven.png, pre-two.png, four.jpg, ...
        word = re.sub(r"^pre-", "", Path(answer["image"]).stem)
        assert answer["label"] == str(
            ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(word)
        )
    assert len(answers) == 6 and list(work.iterdir()) == []  # nothing written where it ran
    assert Path(
        subprocess.run(
            [sys.executable, "-c", "import mnist_cnn.pretrained as p; print(p.FOLDER)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ).is_relative_to(site)


def test_serve_and_teacher_take_a_pretrained_model(tmp_path, capsys):
    with served("pretrained:seed", tmp_path) as url:
        with urllib.request.urlopen(f"{url}/api/model") as answer:
            about = json.loads(answer.read())
        with urllib.request.urlopen(f"{url}/") as page:
            assert page.status == 200
    assert about["parameters"] == 16_426 and about["test_accuracy"] == pytest.approx(0.9951)
    data = tmp_path / "mnist"
    write_synthetic(data, n_train=256, n_test=64)
    out = tmp_path / "student"
    args = ["train", "--data-dir", str(data), "--out", str(out), "--epochs", "1", "--no-verify", "--no-progress"]
    assert main([*args, "--model", "tiny", "--teacher", "pretrained:seed", "--device", "cpu"]) == 0
    recorded = torch.load(out / "last.pt", weights_only=True)["config"]["distill"]
    assert recorded["teachers"] == ["pretrained:seed"] and len(recorded["sha256"][0]) == 64  # found on any machine
