"""Run folders and checkpoints written by an earlier release keep working.

tests/fixtures/release-0.1.0/ is a run folder (last.pt, config.toml, metrics.csv) that release
0.1.0 wrote (commit 0e6e387): `mnist-cnn train --recipe seed --epochs 1 --train-limit 512 --deterministic --device cpu`,
on the real MNIST files. expected.json holds what its network gave then on a fixed input."""

import json
import shutil
from pathlib import Path

import torch

import mnist_cnn
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main

RELEASE = Path(__file__).with_name("fixtures") / "release-0.1.0"


def fixed_input() -> torch.Tensor:
    """(4, 1, 28, 28) in [0, 1], as expected.json's "input" says."""
    return (torch.arange(4 * 28 * 28, dtype=torch.float32).reshape(4, 1, 28, 28) % 97) / 96


def test_a_checkpoint_of_the_last_release_loads_and_predicts_what_it_did():
    expected = json.loads((RELEASE / "expected.json").read_text())
    model = mnist_cnn.load(RELEASE / "last.pt")
    with torch.no_grad():
        got = model(fixed_input())
    assert torch.allclose(got, torch.tensor(expected["log_probs"]), atol=1e-5)
    assert model.config.recipe == "seed" and model.classes[7] == "7"


def test_a_run_folder_of_the_last_release_evaluates_plots_and_exports(synthetic_dir, tmp_path, capsys):
    run = tmp_path / "old-run"
    shutil.copytree(RELEASE, run)
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.epoch == 1 and ckpt.partial is None and len(ckpt.metrics) == 1
    assert main(["evaluate", str(run / "last.pt"), "--data-dir", str(synthetic_dir), "--no-verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] > 0
    card = (run / "MODEL_CARD.md").read_text()  # evaluate gave the old run a card, with what it has
    assert "## Evaluation results" in card and "| 9 |" in card and "(epoch 1, the last trained" in card
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").stat().st_size > 0
    out = tmp_path / "old.safetensors"
    assert (
        main(
            [
                "export",
                str(run / "last.pt"),
                "--format",
                "safetensors",
                "--out",
                str(out),
                "--check",
                "8",
                "--data-dir",
                str(synthetic_dir),
                "--no-verify",
            ]
        )
        == 0
    )
    assert torch.allclose(mnist_cnn.load(out)(fixed_input()), mnist_cnn.load(run / "last.pt")(fixed_input()))
    # finished: --resume has nothing to do, and says so
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished" in capsys.readouterr().out
