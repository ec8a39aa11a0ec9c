"""Every checkpoint format this project ever wrote still loads, evaluates and resumes.

tests/fixtures/checkpoints/RELEASE/ is a run folder that release's own code wrote (README.md there has
the command and commits): all are format 1, with the config in the shape each release had. Only
mnist_cnn.checkpoint reads them; it migrates format 1 to the current format, and a resumed run
writes the current one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mnist_cnn
from conftest import checkpoint_file, mnist_with, write_synthetic
from mnist_cnn.checkpoint import FORMAT, FORMAT_1_WRITER, LAST_FILE, VERSION, Checkpoint, load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.data import datasets
from mnist_cnn.training.rundir import read_metrics

FIXTURES = Path(__file__).with_name("fixtures") / "checkpoints"
RELEASES = ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0"]
RECORDED = 0.9379  # the test accuracy each release recorded: README.md there


def test_there_is_a_fixture_for_every_release_before_this_one():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == RELEASES
    for release in RELEASES:
        raw = checkpoint_file(FIXTURES / release / LAST_FILE)
        assert raw["format"] == FORMAT and raw["version"] == 1  # each is the older format, not today's
    shapes = {release: checkpoint_file(FIXTURES / release / LAST_FILE)["config"] for release in RELEASES}
    assert "distill" not in shapes["0.1.0"] and all("distill" in shapes[r] for r in RELEASES[1:])
    assert [shapes[r]["run"]["compile"] for r in RELEASES] == [
        False,
        False,
        False,
        False,
        "no",
    ]  # a flag, then a choice
    assert not any("lr_found" in shapes[r]["optim"] for r in RELEASES)


@pytest.mark.parametrize("release", RELEASES)
def test_a_releases_checkpoint_loads_as_this_versions_typed_checkpoint(release):
    ckpt = load_checkpoint(FIXTURES / release / LAST_FILE)
    assert isinstance(ckpt, Checkpoint) and ckpt.written_by == FORMAT_1_WRITER
    assert ckpt.config.recipe == "seed" and ckpt.config.run.compile == "no" and ckpt.config.distill.teachers == []
    assert ckpt.config.optim.lr_found == "" and ckpt.config.run.train_limit == 6400
    assert ckpt.epoch == 1 and ckpt.finished and ckpt.partial is None
    assert ckpt.network.num_classes == 10 and ckpt.network.sha256 is None
    assert ckpt.optimizer is not None and ckpt.scheduler is not None and ckpt.train_model is None
    (row,) = read_metrics(FIXTURES / release / "metrics.csv")  # metrics.csv keeps six significant digits
    assert ckpt.final.keys() == row.keys() and all(ckpt.final[k] == pytest.approx(row[k], rel=5e-6) for k in row)
    assert ckpt.final["test_acc"] == RECORDED


@pytest.mark.numerics  # computed then on one CPU's kernels, now on another's: .ci/run reruns it under AVX2
@pytest.mark.parametrize("release", RELEASES)
def test_a_releases_checkpoint_evaluates_to_the_accuracy_it_recorded(release, real_dir, tmp_path):
    """On the full real test set, in fp32 (what evaluate computes and what these runs evaluated in)."""
    report = mnist_cnn.evaluate(FIXTURES / release / LAST_FILE, data_dir=real_dir, device="cpu")
    assert report["n"] == 10_000 and report["accuracy"] == RECORDED


@pytest.mark.parametrize("release", RELEASES)
def test_a_releases_run_folder_resumes_and_then_holds_the_current_format(release, tmp_path, monkeypatch, capsys):
    """One more epoch (`train --resume RUN --epochs 2`), on synthetic files that stand in for MNIST
    (the folder's config verifies the data: the stand-in's checksums are MNIST's here)."""
    run = tmp_path / release
    shutil.copytree(FIXTURES / release, run)
    data = tmp_path / "mnist"
    monkeypatch.setitem(datasets.DATASETS, "mnist", mnist_with(write_synthetic(data)))
    before = load_checkpoint(run / LAST_FILE)
    args = ["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(data), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert f"{run}: 1 of now 2 epochs trained" in capsys.readouterr().out
    after = load_checkpoint(run / LAST_FILE)
    raw = checkpoint_file(run / LAST_FILE)
    assert raw["version"] == VERSION and after.written_by == mnist_cnn.__version__
    assert after.epoch == 2 and after.finished and after.config.epochs == 2
    assert after.metrics[0] == before.metrics[0] and len(after.metrics) == 2  # the release's epoch, then ours
    assert len(read_metrics(run / "metrics.csv")) == 2
    sessions = json.loads((run / "environment.json").read_text())
    assert [s["git_revision"][:7] for s in sessions["earlier"]] == [README_COMMITS[release]]


README_COMMITS = {"0.1.0": "0e6e387", "0.2.0": "d3388a2", "0.3.0": "81aab84", "0.4.0": "79a78af", "0.5.0": "3b002e0"}


def test_the_fixtures_readme_names_the_commits_the_folders_record():
    text = (FIXTURES / "README.md").read_text()
    for release, commit in README_COMMITS.items():
        assert f"| {release}   | `{commit}` | 1 " in text
        env = json.loads((FIXTURES / release / "environment.json").read_text())
        assert env["git_revision"].startswith(commit)
