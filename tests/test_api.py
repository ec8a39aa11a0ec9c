"""The Python API: the same runs, reports and answers as the CLI, and the CLI's errors as exceptions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mnist_cnn
from conftest import synthetic_digits
from mnist_cnn.cli import main
from mnist_cnn.data.contract import Normalized
from mnist_cnn.errors import CheckpointError, ConfigError, ImageError


@pytest.mark.numerics
def test_train_returns_the_run_and_its_model(synthetic_dir, tmp_path):
    run = mnist_cnn.train(
        epochs=2,
        batch_size=32,
        data_dir=str(synthetic_dir),
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        overrides={"run.verify": False, "optim.label_smoothing": 0.05},
    )
    assert run.finished and run.run_dir == tmp_path / "run" and run.checkpoint == run.run_dir / "last.pt"
    assert [r["epoch"] for r in run.metrics] == [1, 2] and run.checkpoint.is_file()
    assert run.config.optim.label_smoothing == 0.05
    with open(run.run_dir / "metrics.csv") as f:
        assert len(f.read().splitlines()) == 3  # header + 2 rows: the same run folder as the CLI writes
    loaded = mnist_cnn.load(run.checkpoint)
    assert isinstance(loaded, Normalized) and not loaded.training and loaded.classes == tuple("0123456789")
    x = torch.rand(5, 1, 28, 28)
    out = loaded(x)
    assert out.shape == (5, 10) and torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(run.model(x), out, atol=1e-6)  # the returned model is the checkpoint's


def test_evaluate_is_the_clis_json(synthetic_run, tmp_path, capsys):
    data, run_dir = synthetic_run
    report = mnist_cnn.evaluate(run_dir / "last.pt", data_dir=data, device="cpu", verify=False)
    assert (
        main(
            [
                "evaluate",
                str(run_dir / "last.pt"),
                "--data-dir",
                str(data),
                "--no-verify",
                "--json",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ev"),  # not into the session's shared run folder
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    model = mnist_cnn.load(run_dir / "last.pt")
    assert mnist_cnn.evaluate(model, data_dir=data, verify=False)["accuracy"] == report["accuracy"]
    raw = model.model.train()  # a caller's own module, in training mode: evaluated in eval mode, then handed back
    assert mnist_cnn.evaluate(raw, data_dir=data, verify=False)["accuracy"] == report["accuracy"]
    assert raw.training and next(raw.parameters()).device.type == "cpu"
    assert mnist_cnn.predict(raw, [synthetic_digits(1, seed=5)[0][0]])[0]["digit"] in range(10)
    assert raw.training


def test_predict_takes_paths_pil_images_and_arrays(synthetic_run, tmp_path, capsys):
    _, run_dir = synthetic_run
    digits = synthetic_digits(3, seed=2)[0]
    paths = []
    for i, a in enumerate(digits):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    by_path = mnist_cnn.predict(run_dir / "last.pt", paths)
    assert main(["predict", str(run_dir / "last.pt"), *map(str, paths), "--json"]) == 0
    assert by_path == json.loads(capsys.readouterr().out)
    model = mnist_cnn.load(run_dir / "last.pt")
    by_pil = mnist_cnn.predict(model, [Image.open(p) for p in paths])
    by_array = mnist_cnn.predict(model, [a for a in digits])
    by_float = mnist_cnn.predict(model, [a.astype(np.float32) / 255 for a in digits])
    for answers in (by_pil, by_array, by_float):
        assert [a["image"] for a in answers] == ["[0]", "[1]", "[2]"]
        assert [a["digit"] for a in answers] == [a["digit"] for a in by_path]
        assert [a["probability"] for a in answers] == pytest.approx([a["probability"] for a in by_path], abs=1e-5)
    blank = mnist_cnn.predict(model, [np.zeros((28, 28), np.uint8)])
    assert blank == [{"image": "[0]", "error": "[0]: no ink found (the image is blank or has almost no contrast)"}]


def test_errors_are_the_projects_exceptions_not_system_exit(tmp_path):
    with pytest.raises(ConfigError, match="unknown keyword"):
        mnist_cnn.train(epoch=3)
    with pytest.raises(ConfigError, match="unknown config key"):
        mnist_cnn.train(overrides={"optim.learning_rate": 1e-3})
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        mnist_cnn.load(tmp_path / "nope.pt")
    with pytest.raises(ImageError, match="no images in"):
        mnist_cnn.predict(torch.nn.Linear(1, 1), [str(tmp_path)])
