"""The learning-rate range test: exponential ramp, smoothed loss, stop on divergence, a suggested rate
with its reason, the curve drawn; `train --lr auto` trains with the suggestion and records it."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
import torch

import mnist_cnn
from mnist_cnn.cli import main
from mnist_cnn.files import written_by_us
from mnist_cnn.training.lr_find import SKIP_END, SKIP_START, LrFind, rates, suggest


def test_rates_grow_exponentially_from_start_to_end():
    lrs = rates(1e-6, 1.0, 61)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.1)  # 60 steps over 6 decades


def test_the_suggestion_is_where_the_loss_falls_fastest():
    """A loss that falls like a logistic step centred on 1e-3 (per decade of lr) has its steepest descent there."""
    lrs = rates(1e-7, 10.0, 200)
    smoothed = [2.3 - 2.0 / (1 + math.exp(-3 * (math.log10(lr) + 3))) for lr in lrs]
    found = LrFind(lrs=lrs, losses=smoothed, smoothed=smoothed)
    suggest(found)
    assert found.suggestion == pytest.approx(1e-3, rel=0.1)
    assert found.reason.startswith(f"steepest descent of the smoothed loss at lr {found.suggestion:.2e}")
    too_short = LrFind(lrs=lrs[: SKIP_START + SKIP_END], losses=smoothed[:15], smoothed=smoothed[:15])
    with pytest.raises(mnist_cnn.errors.TrainingError, match="diverged after 15 of the range test's steps"):
        suggest(too_short)


def quick(synthetic_dir) -> list[str]:
    return ["--data-dir", str(synthetic_dir), "--no-verify", "--batch-size", "32", "--device", "cpu"]


def test_lr_find_on_a_recipe_ramps_stops_on_divergence_and_draws(synthetic_dir, tmp_path, capsys):
    before = torch.get_rng_state()
    found = mnist_cnn.lr_find(
        "seed",
        {"run.verify": False},
        steps=120,
        data_dir=str(synthetic_dir),
        batch_size=32,
        device="cpu",
        plot=tmp_path / "lr.png",
    )
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator untouched
    n = len(found.lrs)
    assert 30 <= n <= 120 and found.lrs == rates(1e-7, 10.0, 120)[:n]
    assert all(math.isfinite(v) for v in found.smoothed)
    if n < 120:  # stopped on divergence: the last smoothed loss is over DIVERGED times the lowest
        assert found.smoothed[-1] > 4 * min(found.smoothed)
    assert found.lrs[SKIP_START] <= found.suggestion <= found.lrs[n - SKIP_END - 1]
    assert written_by_us(tmp_path / "lr.png")
    assert main(["lr-find", *quick(synthetic_dir), "--steps", "120", "--json", "--no-plot"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suggestion"] == found.suggestion and printed["reason"] == found.reason  # same seed, same test


def test_lr_find_leaves_a_figure_of_the_users_alone(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr-find.png").write_bytes(b"mine")
    assert main(["lr-find", *quick(synthetic_dir), "--steps", "40"]) == 2
    assert "lr-find.png exists and was not written by mnist-cnn" in capsys.readouterr().err
    assert (tmp_path / "lr-find.png").read_bytes() == b"mine"
    assert (
        main(["lr-find", *quick(synthetic_dir), "--steps", "20", "--start-lr", "1", "--end-lr", "0.1", "--no-plot"])
        == 2
    )
    assert "0 < start rate < end rate" in capsys.readouterr().err


def test_train_lr_auto_trains_with_the_suggestion_and_records_it(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", *quick(synthetic_dir), "--epochs", "1", "--no-progress", "--lr", "auto", "--out", str(out)]) == 0
    )
    said = capsys.readouterr().out
    found = mnist_cnn.lr_find("seed", {"run.verify": False}, data_dir=str(synthetic_dir), batch_size=32, device="cpu")
    rate = float(f"{found.suggestion:.3g}")
    assert f"--lr auto: {rate:.3g} (steepest descent" in said
    recorded = tomllib.loads((out / "config.toml").read_text())["optim"]
    assert recorded["lr"] == rate and recorded["lr_found"] == found.reason
    with pytest.raises(SystemExit) as bad:  # argparse: usage and one line, exit 2
        main(["train", *quick(synthetic_dir), "--lr", "fast"])
    assert bad.value.code == 2 and "argument --lr: a number or auto, not 'fast'" in capsys.readouterr().err


def test_lr_find_takes_your_own_module_and_leaves_it_untouched(synthetic_dir):
    from torch import nn

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    net = Small()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    common = dict(steps=40, data_dir=str(synthetic_dir), batch_size=32, device="cpu")
    found = mnist_cnn.lr_find("seed", {"run.verify": False}, model=net, **common)
    assert len(found.lrs) > 20 and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert mnist_cnn.lr_find("seed", {"run.verify": False}, model=Small, **common).lrs  # the class: built seeded
