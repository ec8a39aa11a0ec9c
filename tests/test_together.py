"""--seeds --together yes: seeds trained as one stacked model, each keeping a run folder of its own."""

import csv
import os
import signal

import pytest
import torch

from conftest import EXACT_TOL
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.config import load_config
from mnist_cnn.training.seeds import stacks
from mnist_cnn.training.stack import StackStep

# What the stack computes differently from one network: vmap runs each convolution as one grouped
# convolution over the seeds, which sums in another order. The equivalence test runs in float64 (the
# `float64` fixture), where after 38 Adam steps that leaves the weights within 1e-13 of each alone
# (measured max 9e-14 on an AVX2 AMD EPYC); in fp32 the same order change moves them by 1.5e-6 on
# AVX-512 kernels and 2e-3 on AVX2 ones. A real difference -- one seed's batch, augmentation,
# BatchNorm statistics or optimizer state mixed up with another's -- moves them by ~1e-2 after a single
# step. Two kinds of tensor are compared more loosely: the bias of a convolution followed by BatchNorm
# has a true gradient of exactly zero (BatchNorm subtracts it again), so its gradient is rounding
# noise, which Adam divides by its own size (measured max 2e-10 after 38 steps); and the running
# means, which follow those biases. Neither changes what the network computes in training.
NOISE_TOL = 1e-8
NO_DROPOUT = ["--precision", "fp32", "--set", "run.channels_last=false", "--set", "model_args={dropout=0.0}"]


def seeds_cmd(data, out, together, seeds="0-1", epochs=2, *extra):
    return [
        "train",
        "--seeds",
        seeds,
        "--together",
        together,
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-verify",
        "--no-progress",
        "--deterministic",
        *extra,
    ]


def weights(path):
    ckpt = load_checkpoint(path)
    return ckpt.model, ckpt


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def noise_driven(weights: dict) -> set[str]:
    """The biases of convolutions that BatchNorm follows (layer N.0 then N.1) and those BatchNorms' running means."""
    means = {k for k in weights if k.endswith(".1.running_mean")}
    return means | {k.replace(".1.running_mean", ".0.bias") for k in means} & weights.keys()


def comparable(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if k not in noise_driven(weights)}


@pytest.mark.numerics
def test_seeds_trained_together_equal_the_seeds_trained_alone(synthetic_dir, tmp_path, capsys, float64):
    """Without dropout (whose masks the stack draws for all seeds at once), two seeds stacked for
    38 steps (2 epochs of 19) end with the weights, BatchNorm statistics and metrics of each alone."""
    assert main(seeds_cmd(synthetic_dir, tmp_path / "alone", "no", "0-1", 2, *NO_DROPOUT)) == 0
    assert main(seeds_cmd(synthetic_dir, tmp_path / "stack", "yes", "0-1", 2, *NO_DROPOUT)) == 0
    assert "training 2 seeds together (0, 1)" in capsys.readouterr().out
    for seed in (0, 1):
        alone, a = weights(tmp_path / "alone" / f"seed-{seed}" / "last.pt")
        stacked, b = weights(tmp_path / "stack" / f"seed-{seed}" / "last.pt")
        assert len(noise_driven(alone)) == 12  # six conv + BatchNorm pairs in the seed network
        assert alone["features.0.0.weight"].dtype == stacked["features.0.0.weight"].dtype == torch.float64
        assert max_difference(comparable(alone), comparable(stacked)) < EXACT_TOL
        assert max_difference(alone, stacked) < NOISE_TOL
        assert alone["features.0.1.num_batches_tracked"] == stacked["features.0.1.num_batches_tracked"] == 38
        for ra, rb in zip(a.metrics, b.metrics):
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=EXACT_TOL)
            assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=EXACT_TOL)
        # each seed's own Adam state, as alone
        for sa, sb in zip(a.optimizer["state"].values(), b.optimizer["state"].values()):
            assert (sa["exp_avg"] - sb["exp_avg"]).abs().max() < EXACT_TOL
    other, _ = weights(tmp_path / "stack" / "seed-1" / "last.pt")
    assert max_difference(weights(tmp_path / "stack" / "seed-0" / "last.pt")[0], other) > 1e-2  # not one seed twice


def test_each_seed_is_a_run_of_its_own(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "stack"
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-2", 1)) == 0
    rows = list(csv.DictReader(open(out / "seeds.csv")))
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    capsys.readouterr()
    for seed in (0, 1, 2):
        run = out / f"seed-{seed}"
        assert {"config.toml", "metrics.csv", "last.pt", "curves.png", "samples.png"} <= {p.name for p in run.iterdir()}
        assert 'together = "yes"' in (run / "config.toml").read_text()
        ckpt = load_checkpoint(run / "last.pt")
        # a seed's weights were views of the stacked tensors: its checkpoint holds its own slice only
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in ckpt.model.values())
        assert main(["evaluate", str(run / "last.pt"), "--data-dir", str(synthetic_dir), "--no-verify", "--json"]) == 0
        report = capsys.readouterr().out
        assert f'"accuracy": {ckpt.final["test_acc"]}' in report
    assert main(["train", "--resume", str(out / "seed-1")]) == 0  # finished: resumable alone, nothing to do
    assert "already finished" in capsys.readouterr().out


@pytest.mark.numerics
def test_a_stopped_stack_continues_together_to_the_same_weights(synthetic_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM mid-epoch: every seed checkpointed at the same step; the same command continues them
    together and, with --deterministic on the CPU, ends bitwise where an uninterrupted stack ends."""
    assert main(seeds_cmd(synthetic_dir, tmp_path / "whole", "yes", "0-1", 2)) == 0
    real_step, calls = StackStep.__call__, []

    def step_then_signal(self, x, y, batch):
        calls.append(1)
        if len(calls) == 25:  # in the second epoch (19 steps each)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, x, y, batch)

    monkeypatch.setattr(StackStep, "__call__", step_then_signal)
    out = tmp_path / "stopped"
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 2)) == 143
    assert "stopped by SIGTERM after epoch 1 and 6 steps of epoch 2" in capsys.readouterr().err
    for seed in (0, 1):
        assert load_checkpoint(out / f"seed-{seed}" / "last.pt").partial.step == 6
    assert not (out / "seeds.csv").exists()
    monkeypatch.setattr(StackStep, "__call__", real_step)
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 2)) == 0
    assert "resuming 2 seeds together after epoch 1 and 6 steps of epoch 2" in capsys.readouterr().out
    for seed in (0, 1):
        a, ca = weights(tmp_path / "whole" / f"seed-{seed}" / "last.pt")
        b, cb = weights(out / f"seed-{seed}" / "last.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [r["train_loss"] for r in ca.metrics] == [r["train_loss"] for r in cb.metrics]


def test_auto_stacks_on_cuda_only():
    cfg = load_config("seed", {"run.device": "cpu"})
    assert not stacks(cfg, [0, 1])
    cfg.run.together = "yes"
    assert stacks(cfg, [0, 1])
    cfg = load_config("seed", {"run.device": "cuda", "run.together": "auto"}) if torch.cuda.is_available() else None
    if cfg is not None:
        assert stacks(cfg, [0, 1]) and not stacks(cfg, [0])


def test_seeds_alone_record_it(synthetic_dir, tmp_path):
    assert main(seeds_cmd(synthetic_dir, tmp_path / "alone", "auto", "0", 1)) == 0
    assert 'together = "no"' in (tmp_path / "alone" / "seed-0" / "config.toml").read_text()


def test_the_python_api_trains_seeds_together(synthetic_dir, tmp_path):
    import statistics

    import mnist_cnn
    from mnist_cnn.errors import ConfigError

    got = mnist_cnn.train_seeds(
        "seed",
        "0-1",
        together="yes",
        epochs=1,
        batch_size=32,
        device="cpu",
        data_dir=str(synthetic_dir),
        out=str(tmp_path / "api"),
        progress=False,
        overrides={"run.verify": False},
    )
    assert got.finished and [r["seed"] for r in got.results] == [0, 1]
    accs = [r["final_test_acc"] for r in got.results]
    assert got.summary["final_test_acc_mean"] == pytest.approx(statistics.fmean(accs))
    assert got.summary["together"] is True
    assert 'together = "yes"' in (got.out / "seed-1" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="either seed= "):
        mnist_cnn.train_seeds("seed", [0, 1], seed=3)


BRANCHY = """
from torch import nn


class Branchy(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(784, num_classes)

    def forward(self, x):
        if x.sum() > 0:  # a branch on the data: vmap cannot batch it
            x = x * 2
        return self.fc(x.flatten(1))
"""


def test_a_network_vmap_cannot_batch_is_one_line_and_leaves_no_folder(synthetic_dir, tmp_path, capsys):
    net = tmp_path / "branchy.py"
    net.write_text(BRANCHY)
    out = tmp_path / "stack"
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 1, "--model", f"{net}:Branchy")) == 3  # TrainingError
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the seeds cannot be trained stacked (torch.func.vmap: " in err
    assert "--together no" in err
    assert not any((out / f"seed-{s}" / "config.toml").exists() for s in (0, 1))
    assert main(seeds_cmd(synthetic_dir, out, "no", "0-1", 1, "--model", f"{net}:Branchy")) == 0  # alone it trains


def test_seeds_stopped_at_different_points_continue_one_after_another(synthetic_dir, tmp_path, monkeypatch, capsys):
    import shutil

    real_step, calls = StackStep.__call__, []

    def step_then_signal(self, x, y, batch):
        calls.append(1)
        if len(calls) == 25:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, x, y, batch)

    monkeypatch.setattr(StackStep, "__call__", step_then_signal)
    out = tmp_path / "stack"
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 2)) == 143
    monkeypatch.setattr(StackStep, "__call__", real_step)
    shutil.rmtree(out / "seed-1")  # seed 0 stands at epoch 1 + 6 steps, seed 1 at the start
    capsys.readouterr()
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 2)) == 0
    captured = capsys.readouterr()
    assert "stopped at different points: continuing them one after another" in captured.err
    assert f"resuming {out / 'seed-0'} after epoch 1 and 6 steps of epoch 2" in captured.out
    assert len(list(csv.DictReader(open(out / "seeds.csv")))) == 2
    # the configs say what ran: seed 0 continued alone, seed 1 started alone (both in the stack's fp32, NCHW)
    for seed in (0, 1):
        stored = (out / f"seed-{seed}" / "config.toml").read_text()
        assert 'together = "no"' in stored and 'precision = "fp32"' in stored and "channels_last = false" in stored
        assert load_checkpoint(out / f"seed-{seed}" / "last.pt").config.run.together == "no"


def test_seeds_trained_alone_are_kept_when_the_command_stacks_them(synthetic_dir, tmp_path, capsys):
    """A stack forces fp32 and NCHW; folders trained alone (channels_last, auto precision) are the same runs."""
    out = tmp_path / "seeds"
    assert main(seeds_cmd(synthetic_dir, out, "no", "0-1", 1)) == 0
    before = [(out / f"seed-{s}" / "last.pt").read_bytes() for s in (0, 1)]
    capsys.readouterr()
    assert main(seeds_cmd(synthetic_dir, out, "yes", "0-1", 1)) == 0
    assert "holds a run with other settings" not in capsys.readouterr().err
    assert [(out / f"seed-{s}" / "last.pt").read_bytes() for s in (0, 1)] == before


def test_together_yes_on_a_single_run_is_refused(synthetic_dir, tmp_path, capsys):
    cmd = seeds_cmd(synthetic_dir, tmp_path / "x", "no", "0", 1, "--set", "run.together=yes")
    del cmd[1:5]  # no --seeds, no --together
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.together = yes says how --seeds trains its seeds" in err
    assert not (tmp_path / "x").exists()


def test_together_without_seeds_is_refused(synthetic_dir, tmp_path, capsys):
    cmd = seeds_cmd(synthetic_dir, tmp_path / "x", "yes")
    del cmd[1:3]  # no --seeds
    assert main(cmd) == 2
    assert "--together says how --seeds trains its seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_stack_refuses_torchrun_before_anything_is_written(tmp_path, monkeypatch):
    """Called directly under torchrun, every rank would train the whole stack into the same folders."""
    from pathlib import Path

    from mnist_cnn.errors import ConfigError
    from mnist_cnn.training.run import stack_configs, train_stack

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfgs = stack_configs(load_config("seed"), [0, 1], Path(tmp_path / "stack"))
    with pytest.raises(ConfigError, match="under torchrun, train one seed per command"):
        train_stack(cfgs)
    assert not (tmp_path / "stack").exists()
