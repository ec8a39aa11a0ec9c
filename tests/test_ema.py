"""optim.ema: an exponential moving average of the weights, evaluated and checkpointed."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.training import loop as train_module
from mnist_cnn.training.state import WeightAverage

ARGS = [
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--no-verify",
    "--no-progress",
    "--deterministic",
    "--set",
    "optim.ema=0.9",
]


def test_the_average_follows_its_formula():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(net, 0.75)
    before = [p.clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(5.0)
    avg.update(net, steps=100)  # past the warm-up: (1 + 100) / (10 + 100) = 0.918 > 0.75
    for b, a, w in zip(before, avg.model.parameters(), net.parameters()):
        assert torch.allclose(a, 0.75 * b + 0.25 * w)
    assert torch.equal(avg.model[1].running_mean, torch.full((2,), 5.0))  # buffers are the network's own


def test_the_average_warms_up():
    """Early on the decay is (1 + k) / (10 + k): after the first step the average is mostly the
    trained weights (d = 2/11), not the random initial ones."""
    net = torch.nn.Linear(3, 2)
    avg = WeightAverage(net, 0.9995)
    before = [p.clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    avg.update(net, steps=1)
    for b, a, w in zip(before, avg.model.parameters(), net.parameters()):
        assert torch.allclose(a, (2 / 11) * b + (9 / 11) * w)


def test_the_checkpoint_holds_the_average_and_evaluate_reproduces_the_logged_accuracy(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(synthetic_dir), "--out", str(out), *ARGS]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert set(ckpt.train_model) == set(ckpt.model)
    assert any(not torch.equal(ckpt.model[k], ckpt.train_model[k]) for k in ckpt.model)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(out / "last.pt"),
                "--data-dir",
                str(synthetic_dir),
                "--no-verify",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["accuracy"] == ckpt.metrics[-1]["test_acc"]


@pytest.mark.numerics
def test_the_python_api_returns_the_average_it_evaluated_and_saved(synthetic_dir, tmp_path):
    import mnist_cnn

    run = mnist_cnn.train(
        epochs=2,
        batch_size=32,
        data_dir=str(synthetic_dir),
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        overrides={"run.verify": False, "optim.ema": 0.9, "run.deterministic": True},
    )
    ckpt = load_checkpoint(run.checkpoint)
    returned = run.model.model.state_dict()  # Normalized(network)
    assert returned.keys() == ckpt.model.keys()
    assert all(torch.equal(returned[k], ckpt.model[k]) for k in returned)  # the average, not the live weights
    assert any(not torch.equal(returned[k], ckpt.train_model[k]) for k in returned)
    x = torch.rand(8, 1, 28, 28)
    # the same weights; the trained copy is channels_last, so other kernels sum in another order
    assert torch.allclose(run.model(x), mnist_cnn.load(run.checkpoint)(x), atol=1e-5)


def test_a_resumed_run_with_ema_ends_with_the_same_weights(synthetic_dir, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", "--data-dir", str(synthetic_dir), "--out", str(whole), *ARGS]) == 0
    real, calls = train_module.evaluate_split, {"n": 0}

    def stop_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", stop_after_first_epoch)
    assert main(["train", "--data-dir", str(synthetic_dir), "--out", str(parts), *ARGS]) == 130
    monkeypatch.setattr(train_module, "evaluate_split", real)
    assert main(["train", "--resume", str(parts), "--no-progress"]) == 0
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(parts / "last.pt")
    for key in ("model", "train_model"):
        for name in getattr(a, key):
            assert torch.equal(getattr(a, key)[name], getattr(b, key)[name]), (key, name)


def test_the_average_counted_on_the_device_is_the_average_counted_on_the_host():
    """The compiled step (training.graph) passes its step count as a device tensor, whose decay is taken
    in float64 there; eager steps pass a number: the same average, bitwise, warm-up and past it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    host, device = WeightAverage(net, 0.99), WeightAverage(net, 0.99)
    for k in (1, 2, 7, 500, 2000):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        host.update(net, steps=k)
        device.update(net, steps=torch.tensor([k]))
        for a, b in zip(host.model.state_dict().values(), device.model.state_dict().values()):
            assert torch.equal(a, b)
    assert not torch.equal(host.model[0].weight, net[0].weight)  # an average, not a copy
