"""TensorBoard logs (run.tensorboard), read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mnist_cnn.cli import main
from mnist_cnn.training.tensorboard import SCALARS


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_the_scalars_equal_metrics_csv_and_samples_and_hparams_are_there(synthetic_dir, tmp_path):
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
                "3",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--no-verify",
                "--no-progress",
                "--tensorboard",
                "--set",
                "val_size=100",
            ]
        )
        == 0
    )
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    acc = events(out)
    tags = acc.Tags()
    assert set(tags["scalars"]) >= set(SCALARS.values())
    for key, tag in SCALARS.items():
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows]
        # event files hold float32, metrics.csv 6 significant digits
        assert np.allclose([e.value for e in logged], [float(r[key]) for r in rows], rtol=1e-5, atol=1e-7), tag
    assert tags["images"] == ["samples"]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = start.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(1e-3) and hparams["recipe"].string_value == "seed"
    assert hparams["batch_size"].number_value == 32 and hparams["augment.interpolation"].string_value == "nearest"
    assert acc.Scalars("final/test_acc")[0].value == pytest.approx(float(rows[-1]["test_acc"]), rel=1e-5)


def test_a_resumed_run_continues_its_curves(synthetic_dir, tmp_path):
    import signal

    from mnist_cnn.training import loop as train_module

    out = tmp_path / "run"
    real = train_module.evaluate_split
    calls = {"n": 0}

    def stop_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    args = ["--data-dir", str(synthetic_dir), "--no-verify", "--no-progress"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "evaluate_split", stop_after_first_epoch)
        assert (
            main(
                [
                    "train",
                    *args,
                    "--out",
                    str(out),
                    "--epochs",
                    "3",
                    "--batch-size",
                    "32",
                    "--device",
                    "cpu",
                    "--set",
                    "run.tensorboard=true",
                ]
            )
            == 130
        )
    assert [e.step for e in events(out).Scalars("accuracy/test")] == [1]
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert [e.step for e in events(out).Scalars("accuracy/test")] == [1, 2, 3]


def test_a_run_with_event_files_that_fails_before_its_checkpoint_leaves_no_folder(synthetic_dir, tmp_path, monkeypatch):
    """TensorBoard's writer makes its files itself: the run removes them with its own."""
    import torch

    from mnist_cnn.training import loop as train_module

    monkeypatch.setattr(train_module, "nll", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(synthetic_dir), "--out", str(out), "--epochs", "1", "--no-verify"]
    assert main([*args, "--no-progress", "--tensorboard"]) == 3
    assert not out.exists()
