"""torchrun with 2 processes on the CPU (gloo): DDP equals its single-process emulation,
the CLI writes one run folder, and a run that loses a process resumes and finishes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import signal_when, write_synthetic
from ddp_worker import OVERRIDES
from mnist_cnn.config import load_config
from mnist_cnn.data.contract import MNIST_NORM, normalize, to_unit
from mnist_cnn.data.splits import load_dataset, to_device
from mnist_cnn.device import seed_everything
from mnist_cnn.networks.reference import create, locate
from mnist_cnn.training.loop import epoch_order
from mnist_cnn.training.state import build_state

WORKER = Path(__file__).with_name("ddp_worker.py")
PROCESSES = 2
EPOCHS_TO_INTERRUPT = 15  # about 0.2 s each: time to interrupt the run after its first epoch
# Both sides run in float64 and add the same numbers in another order (gloo's all-reduce, the
# emulation's sum): measured max difference 2e-15 after 10 SGD steps on an AVX2 AMD EPYC; in fp32 it was
# ~1e-6 and depends on the CPU's kernels. A real difference (BatchNorm statistics over the whole batch
# instead of each shard) is > 1e-3.
TOLERANCE = 1e-9


def torchrun(*args: str, cwd: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --standalone --nproc-per-node 2 ...` (a free port on localhost), one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "mnist"
    write_synthetic(folder, n_train=600, n_test=200)
    return folder


def emulate_one_epoch(folder: Path, shards: int = PROCESSES) -> dict[str, torch.Tensor]:
    """The DDP epoch in one process: each step's batch split in two contiguous shards, each shard's
    forward with its own BatchNorm batch statistics, the two gradients averaged, one Adam step.
    Running statistics are shard 0's alone, as DDP hands rank 0's buffers to every process."""
    cfg = load_config("seed", OVERRIDES)
    cpu = torch.device("cpu")
    data = to_device(load_dataset(folder, verify=False), cpu, cfg.run.train_limit, 0, cfg.batch_size)
    seed_everything(cfg.run.seed)
    state = build_state(
        create(locate(cfg.model), data.num_classes, cfg.model_args), cfg, cpu, data.steps_per_epoch(cfg.batch_size)
    )
    model, optimizer = state.model, state.optimizer
    model.train()
    perm = epoch_order(data.train_images.shape[0], cfg.run.seed, 1, cpu)
    for idx in perm.split(cfg.batch_size):
        x = normalize(to_unit(data.train_images[idx]), MNIST_NORM)  # no augmentation: [0, 1], normalized
        y = data.train_labels[idx]
        optimizer.zero_grad(set_to_none=True)
        kept = {k: b.clone() for k, b in model.named_buffers()}
        for rank, (xs, ys) in enumerate(zip(x.tensor_split(shards), y.tensor_split(shards))):
            if rank:  # only shard 0 moves the running statistics
                saved = {k: b.clone() for k, b in model.named_buffers()}
                for k, b in model.named_buffers():
                    b.copy_(kept[k])
            loss = F.nll_loss(F.log_softmax(model(xs.contiguous(memory_format=torch.channels_last)), 1), ys)
            (loss * ys.shape[0] * shards / idx.numel() / shards).backward()  # DDP: mean over processes
            if rank:
                for k, b in model.named_buffers():
                    b.copy_(saved[k])
        optimizer.step()
        state.scheduler.step()
    return model.state_dict()


@pytest.mark.numerics
def test_two_process_ddp_equals_its_single_process_emulation(data_dir, tmp_path, float64):
    out = tmp_path / "ddp.pt"
    proc = torchrun(str(WORKER), str(data_dir), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    emulated = emulate_one_epoch(data_dir)
    assert ddp.keys() == emulated.keys()
    assert ddp["features.0.0.weight"].dtype == emulated["features.0.0.weight"].dtype == torch.float64
    for key in ddp:
        assert torch.allclose(ddp[key], emulated[key], atol=TOLERANCE, rtol=0), key
    # not trivially: one process over the whole batch (BatchNorm statistics over 32 images, not 16) differs
    whole = emulate_one_epoch(data_dir, shards=1)
    assert max((ddp[k].double() - whole[k].double()).abs().max() for k in ddp) > 1e-3


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def first_epoch_done(run: Path) -> bool:
    return (run / "metrics.csv").exists() and len(rows(run)) >= 1


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-f", "-P", str(launcher.pid), "mnist_cnn"], capture_output=True, text=True)
    pids = sorted(int(p) for p in found.stdout.split())
    assert len(pids) == PROCESSES, found
    return pids


TRAIN = ["-m", "mnist_cnn", "train", "--device", "cpu", "--batch-size", "32", "--no-verify", "--no-progress"]


def test_the_cli_under_torchrun_writes_one_run_folder_in_line_with_one_process(data_dir, tmp_path):
    proc = torchrun(*TRAIN, "--data-dir", str(data_dir), "--epochs", "2", "--out", "ddp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        proc.stdout.count("training seed") == 1
        and "2 processes (cpu, DistributedDataParallel over gloo)" in proc.stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    assert {"last.pt", "metrics.csv", "config.toml", "curves.png"} <= {p.name for p in (tmp_path / "ddp").iterdir()}
    single = subprocess.run(
        [sys.executable, *TRAIN, "--data-dir", str(data_dir), "--epochs", "2", "--out", "one"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr
    ddp, one = rows(tmp_path / "ddp"), rows(tmp_path / "one")
    assert len(ddp) == len(one) == 2
    # the synthetic digits are easy: both learn them; the two runs differ only in BatchNorm's batch and dropout
    assert float(ddp[-1]["test_acc"]) >= 0.8 and abs(float(ddp[-1]["test_acc"]) - float(one[-1]["test_acc"])) <= 0.05
    assert float(ddp[-1]["train_loss"]) < float(ddp[0]["train_loss"])


def test_a_batch_that_does_not_split_evenly_is_refused(data_dir, tmp_path):
    proc = torchrun(
        *TRAIN[:-4],
        "--batch-size",
        "33",
        "--no-verify",
        "--no-progress",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--out",
        "odd",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "error: batch_size 33 does not divide evenly over 2 processes; use a multiple of 2" in proc.stderr
    assert not (tmp_path / "odd").exists()


def test_a_run_that_loses_a_process_resumes_and_finishes(data_dir, tmp_path):
    """Kill process 1 in the middle of epoch 2: torchrun stops the run; --resume under torchrun
    continues from the last checkpoint and finishes all epochs."""
    epochs = EPOCHS_TO_INTERRUPT
    proc = torchrun(
        *TRAIN,
        "--data-dir",
        str(data_dir),
        "--epochs",
        str(epochs),
        "--out",
        "run",
        "--set",
        "run.threads=1",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = signal_when(
        proc, lambda: first_epoch_done(tmp_path / "run"), signal.SIGKILL, target=lambda: worker_pids(proc)[-1]
    )
    assert proc.returncode != 0
    assert "error: another process of this run stopped (" in err
    assert "continue from the last checkpoint (epoch " in err and "-m mnist_cnn train --resume run" in err
    done = len(rows(tmp_path / "run"))
    assert done < epochs, "the run finished before a process could be killed"
    resumed = torchrun("-m", "mnist_cnn", "train", "--resume", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run after epoch {done}" in resumed.stdout
    assert [int(r["epoch"]) for r in rows(tmp_path / "run")] == list(range(1, epochs + 1))
    assert "final test accuracy" in resumed.stdout


def test_sigterm_to_the_launcher_stops_every_process_at_one_checkpoint(data_dir, tmp_path):
    """torchrun passes SIGTERM to both processes: they stop at the same step, process 0 saves
    it, and the run continues from there, here in one process (the global batch is the same)."""
    epochs = EPOCHS_TO_INTERRUPT
    proc = torchrun(
        *TRAIN,
        "--data-dir",
        str(data_dir),
        "--epochs",
        str(epochs),
        "--out",
        "run",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = signal_when(proc, lambda: first_epoch_done(tmp_path / "run"), signal.SIGTERM)
    assert err.count("stopped by SIGTERM after epoch ") == 1, err[-3000:]
    assert "resume with: torchrun --nproc-per-node 2 -m mnist_cnn train --resume run" in err
    resumed = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "train", "--resume", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resuming run after epoch ")
    assert [int(r["epoch"]) for r in rows(tmp_path / "run")] == list(range(1, epochs + 1))
