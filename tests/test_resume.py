"""Resume exactly, stop cleanly on signals, keep the last good checkpoint."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mnist_cnn
from conftest import training_setup, write_synthetic
from mnist_cnn.checkpoint import VERSION, load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.config import load_config
from mnist_cnn.files import LOCK_FILE
from mnist_cnn.training import loop as train_module
from mnist_cnn.training.loop import fit_one
from mnist_cnn.training.rundir import RunDir
from mnist_cnn.training.state import restore_state, state_checkpoint

CPU = torch.device("cpu")
EPOCHS = 4


@pytest.fixture(scope="module")
def data_small(tmp_path_factory) -> Path:
    """1,500 synthetic training images (24 steps of 64 an epoch): a few epochs take a few seconds,
    and a signal sent 0.1 s after an epoch's end still lands inside the next one."""
    folder = tmp_path_factory.mktemp("mnist3k")
    write_synthetic(folder, n_train=1500, n_test=200)
    return folder


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mnist_cnn",
        "train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--device",
        "cpu",
        "--no-verify",
        "--no-progress",
        "--deterministic",
        "--seed",
        "3",
        *extra,
    ]


def resume_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "mnist_cnn", "train", "--resume", str(out), "--no-progress"]


def rows(run: Path) -> list[list[str]]:
    """metrics.csv rows without the seconds column (wall time differs run to run)."""
    lines = (run / "metrics.csv").read_text().splitlines()
    drop = lines[0].split(",").index("seconds")
    return [[v for i, v in enumerate(line.split(",")) if i != drop] for line in lines]


def assert_same_result(a: Path, b: Path) -> None:
    wa, wb = (torch.load(r / "last.pt", weights_only=True)["model"] for r in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bitwise
    assert rows(a) == rows(b)
    assert len(rows(a)) == EPOCHS + 1


@pytest.fixture(scope="module")
def reference(data_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(train_cmd(data_small, out), check=True, capture_output=True)
    return out


def start_and_wait_for_epoch(cmd: list[str], out: Path, epochs_done: int = 1) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.csv"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > epochs_done:
            return proc
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("training did not reach the first epoch in time")


@pytest.mark.numerics
def test_sigkill_then_resume_gives_bitwise_identical_weights_and_metrics(data_small, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for_epoch(train_cmd(data_small, out), out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pt").epoch
    assert 1 <= killed_at < EPOCHS  # really interrupted
    # no stray files but half-written temp files and the lock file, which no one holds now (flock died with it)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.suffix != ".tmp" and p.name != LOCK_FILE]
    subprocess.run(resume_cmd(out), check=True, capture_output=True)
    assert_same_result(reference, out)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_with_a_checkpoint_and_resumes_exactly(data_small, reference, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start_and_wait_for_epoch(train_cmd(data_small, out), out)
    time.sleep(0.1)  # usually lands inside the next epoch; an epoch boundary is fine too
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert f"resume with: mnist-cnn train --resume {out}" in err
    assert "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch < EPOCHS
    subprocess.run(resume_cmd(out), check=True, capture_output=True)
    assert_same_result(reference, out)


def small_setup(folder: Path):
    cfg = load_config("seed", {"epochs": 2, "batch_size": 50, "run.verify": False, "run.deterministic": True})
    data, state = training_setup(folder, cfg)
    return cfg, data, state


@pytest.mark.numerics
@pytest.mark.parametrize("stop_after, partial_step", [(1, 1), (5, 5), (12, None), (17, 4)])
def test_stop_inside_an_epoch_then_resume_equals_an_uninterrupted_run(synthetic_dir, stop_after, partial_step):
    """12 steps per epoch; should_stop() is asked after every step and after each epoch."""
    cfg, data, state = small_setup(synthetic_dir)
    list(fit_one(state, data, cfg))
    expected = state.model.state_dict()
    expected_rows = [{k: v for k, v in r.items() if k != "seconds"} for r in state.metrics]

    cfg, data, state = small_setup(synthetic_dir)
    calls = iter(range(10_000))
    list(fit_one(state, data, cfg, should_stop=lambda: next(calls) + 1 >= stop_after))
    assert (state.partial.step if state.partial else None) == partial_step
    ckpt = state_checkpoint(state, cfg)
    # a new process would start from scratch: rebuild, restore, continue
    cfg2, data2, fresh = small_setup(synthetic_dir)
    torch.manual_seed(999)  # any RNG left over must not matter
    restore_state(fresh, ckpt, "test")
    list(fit_one(fresh, data2, cfg2))
    for key, value in expected.items():
        assert torch.equal(fresh.model.state_dict()[key], value), key
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in fresh.metrics] == expected_rows


def test_non_finite_loss_keeps_the_last_good_checkpoint(synthetic_dir, tmp_path, monkeypatch, capsys):
    real_nll = train_module.nll
    steps = {"n": 0}

    def nll_that_breaks_in_epoch_2(log_probs, labels, smoothing):
        steps["n"] += 1
        loss = real_nll(log_probs, labels, smoothing)
        return loss * float("nan") if steps["n"] == 19 + 4 else loss  # 19 steps per epoch; step 4 of epoch 2

    monkeypatch.setattr(train_module, "nll", nll_that_breaks_in_epoch_2)
    out = tmp_path / "run"
    code = main(
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
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert err.startswith("error: epoch 2/3: loss became NaN or infinite at step 4") and err.count("\n") == 1
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 1 and ckpt.partial is None
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
    assert len((out / "metrics.csv").read_text().splitlines()) == 2


def test_failure_before_the_first_epoch_leaves_no_run_folder(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "nll", lambda *a: torch.tensor(float("inf"), requires_grad=True))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data-dir",
            str(synthetic_dir),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--no-verify",
            "--no-progress",
        ]
    )
    assert code == 3 and "loss became NaN or infinite at step 1" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_config_flags_and_finishes_politely(synthetic_dir, tmp_path, capsys):
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
                "cpu",
                "--no-verify",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["train", "--resume", str(out), "--epochs", "5", "--seed", "0"]) == 2
    assert "--resume continues with the run's own config; drop --seed" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 0
    assert "already finished all 1 epochs" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no last.pt" in capsys.readouterr().err


def test_checkpoint_holds_plain_values_loadable_with_weights_only(synthetic_dir):
    cfg, data, state = small_setup(synthetic_dir)
    list(fit_one(state, data, cfg))
    path = synthetic_dir / "c.pt"
    torch.save(state_checkpoint(state, cfg).to_dict(), path)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) >= {"config", "model", "optimizer", "scheduler", "epoch", "metrics", "partial"}
    assert "rng" not in ckpt  # every draw derives from (seed, epoch, step): no generator state to carry
    assert ckpt["config"]["model"] == "seed" and ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    assert ckpt["version"] == VERSION and ckpt["mnist_cnn"] == mnist_cnn.__version__
    os.remove(path)


def old_rng_entry() -> dict:
    """The "rng" entry that checkpoints carried before every draw derived from (seed, epoch, step):
    each generator's state, here from a machine with two CUDA devices."""
    np_state = np.random.RandomState(7).get_state()
    return {
        "torch": torch.Generator().manual_seed(7).get_state(),
        "cuda": [torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.Random(7).getstate()],
    }


def test_an_old_checkpoint_with_rng_state_resumes_exactly_on_a_machine_with_fewer_gpus(
    synthetic_dir, tmp_path, monkeypatch
):
    """Its "rng" entry is ignored: restoring sets no generator (setting two CUDA devices' states
    fails on a machine with one), and the resumed run still equals an uninterrupted one."""
    cfg, data, state = small_setup(synthetic_dir)
    list(fit_one(state, data, cfg))
    expected = state.model.state_dict()

    cfg, data, state = small_setup(synthetic_dir)
    calls = iter(range(10_000))
    list(fit_one(state, data, cfg, should_stop=lambda: next(calls) >= 4))
    old = {**state_checkpoint(state, cfg).to_dict(), "version": 1, "rng": old_rng_entry()}  # format 1, as then
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")  # an old file still reads with weights_only=True
    cfg2, data2, fresh = small_setup(synthetic_dir)
    torch.manual_seed(999)
    before = torch.get_rng_state()

    def one_gpu_only(states):
        raise RuntimeError("CUDA error: invalid device ordinal")

    with monkeypatch.context() as m:  # a CUDA machine with one GPU, whatever this one has
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "set_rng_state_all", one_gpu_only)
        restore_state(fresh, ckpt, "old.pt")
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    list(fit_one(fresh, data2, cfg2))
    for key, value in expected.items():
        assert torch.equal(fresh.model.state_dict()[key], value), key


def test_a_stopped_epoch_is_saved_without_device_specific_rng_state(synthetic_dir):
    """Continuing an epoch needs only its step count: a CPU generator's state could not be
    set into a CUDA generator, so nothing of the kind is stored."""
    cfg, data, state = small_setup(synthetic_dir)
    calls = iter(range(10_000))
    list(fit_one(state, data, cfg, should_stop=lambda: next(calls) >= 4))
    partial = state_checkpoint(state, cfg).to_dict()["partial"]  # as the file holds it
    assert partial["step"] == 5
    assert all(isinstance(v, (int, float)) for v in partial.values()), partial


def test_resume_takes_a_new_data_folder(data_small, reference, tmp_path):
    """Where the data lives does not change results: --resume --data-dir is accepted."""
    out = tmp_path / "run"
    moved = tmp_path / "moved"
    shutil.copytree(data_small, moved)
    proc = start_and_wait_for_epoch(train_cmd(moved, out), out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(moved)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data_small, elsewhere)
    subprocess.run(resume_cmd(out) + ["--data-dir", str(elsewhere)], check=True, capture_output=True)
    assert_same_result(reference, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_stopped_mid_epoch_on_the_cpu_resumes_on_cuda(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    cfg, data, state = small_setup(synthetic_dir)
    calls = iter(range(10_000))
    list(fit_one(state, data, cfg, should_stop=lambda: next(calls) >= 4))
    RunDir.create(out).save_last(state_checkpoint(state, cfg))
    assert main(["train", "--resume", str(out), "--device", "cuda", "--data-dir", str(synthetic_dir)]) == 0
    assert load_checkpoint(out / "last.pt").epoch == 2


def test_a_signal_during_the_last_evaluation_finishes_the_run(synthetic_dir, tmp_path, monkeypatch, capsys):
    real_evaluate = train_module.evaluate_split
    calls = {"n": 0}

    def evaluate_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the last epoch's evaluation (epochs 2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", evaluate_then_interrupt)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data-dir",
            str(synthetic_dir),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--no-verify",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0 and "resume with" not in captured.err
    assert "final test accuracy" in captured.out and (out / "curves.png").is_file()


@pytest.mark.parametrize("where", ["build_state", "summary_text", "write_samples"])
def test_a_bug_before_the_first_epoch_leaves_no_run_folder(synthetic_dir, tmp_path, monkeypatch, where):
    from mnist_cnn.training import run as runner

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(runner, where, broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated bug"):
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
                "cpu",
                "--no-verify",
                "--no-progress",
            ]
        )
    assert not out.exists()


def test_runs_started_in_the_same_second_get_their_own_folders(synthetic_dir, tmp_path, monkeypatch):
    from mnist_cnn.training import run as runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "default_run_dir", lambda: Path("runs") / "20261126-120000")
    cmd = [
        "train",
        "--data-dir",
        str(synthetic_dir),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-verify",
        "--no-progress",
    ]
    assert main(cmd) == 0 and main(cmd) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261126-120000", "20261126-120000-2"]
    for run in (tmp_path / "runs").iterdir():
        assert (run / "last.pt").is_file()


def test_a_second_ctrl_c_aborts_at_once_and_leaves_no_half_made_run(synthetic_dir, tmp_path, monkeypatch, capsys):
    """docs/guide/train.md: the first Ctrl-C lets the step finish; a second one aborts at once (exit 130). Inside the
    first epoch no last.pt exists yet, so nothing of the run folder is left."""
    from mnist_cnn.training import loop as training

    real_augment, calls = training.augmented, []

    def augment_then_two_interrupts(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first: a flag, the step goes on
            os.kill(os.getpid(), signal.SIGINT)  # the second: KeyboardInterrupt here
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(training, "augmented", augment_then_two_interrupts)
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
                "2",
                "--device",
                "cpu",
                "--no-verify",
                "--no-progress",
            ]
        )
        == 130
    )
    assert len(calls) == 3  # not one step more
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.numerics
def test_a_finished_run_extended_with_more_epochs_equals_a_run_of_that_length(data_small, reference, tmp_path, capsys):
    """The step schedule does not depend on the run's length: EPOCHS - 1 epochs, then --resume --epochs
    EPOCHS, train bitwise what EPOCHS epochs train (CPU, deterministic)."""
    out = tmp_path / "run"
    short = train_cmd(data_small, out)
    short[short.index("--epochs") + 1] = str(EPOCHS - 1)
    subprocess.run(short, check=True, capture_output=True)
    assert main(["train", "--resume", str(out), "--epochs", str(EPOCHS), "--no-progress"]) == 0
    assert f"{out}: {EPOCHS - 1} of now {EPOCHS} epochs trained" in capsys.readouterr().out
    assert_same_result(out, reference)
    assert f"epochs = {EPOCHS}" in (out / "config.toml").read_text() and (out / "MODEL_CARD.md").is_file()
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 2
    assert f"--epochs 2: {out} has trained {EPOCHS} epochs already" in capsys.readouterr().err


def test_a_schedule_laid_out_over_the_runs_length_is_not_extended(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(synthetic_dir), "--out", str(out), "--epochs", "1", "--no-progress"]
    assert main([*args, "--no-verify", "--batch-size", "64", "--set", "optim.schedule=onecycle"]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "onecycle schedule is laid out over its 1 epochs" in err and "start a new run with --epochs 3" in err
    assert (out / "last.pt").read_bytes() == before
