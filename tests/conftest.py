"""Shared fixtures: small synthetic MNIST-format data sets, and the real one when present."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import select
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_cnn.data.datasets import FILES
from mnist_cnn.data.idx import IdxFile

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
# Two computations claimed to be the same, run in float64 (the `float64` fixture), agree to ~1e-12 on
# every CPU kind; a real difference (another batch, a lost step, mixed-up state) is > 1e-4.
EXACT_TOL = 1e-9
SERVER_START_S = 60  # torch import and model load; minutes under heavy load are a failure


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> IDX bytes (magic 0x0000080N, big-endian dims, data)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


def synthetic_digits(n: int, seed: int = 0, noise: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and labels that a CNN can learn in an epoch or two:
    class c is a bright bar whose row and length depend on c, plus jitter and
    background noise in [0, noise)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, max(noise, 1), size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        row = 4 + 2 * int(c) + int(rng.integers(-1, 2))
        left = 4 + int(rng.integers(-2, 3))
        images[i, row : row + 2, left : left + 10 + int(c)] = 255
        if c % 2:
            images[i, 6:22, 22:24] = 200  # odd digits also get a vertical stroke
    return images, labels


def write_synthetic(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True) -> dict[str, IdxFile]:
    """Write the four files; returns a checksum table for them, shaped like data.FILES."""
    folder.mkdir(parents=True, exist_ok=True)
    train = synthetic_digits(n_train, seed=0)
    test = synthetic_digits(n_test, seed=1)
    arrays = {"train_images": train[0], "train_labels": train[1], "test_images": test[0], "test_labels": test[1]}
    table = {}
    for key, array in arrays.items():
        spec = FILES[key]
        write_idx(folder / (spec.name + (".gz" if gz else "")), array, gz=gz)
        table[key] = IdxFile(spec.name, array.shape, hashlib.sha256(idx_bytes(array)).hexdigest())
    return table


def checkpoint_file(path: Path) -> dict:
    """A checkpoint file's dict as torch.load gives it (what a crafted file is made from); the tool's
    own code reads it through mnist_cnn.checkpoint only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def sigterm_at_the_next_evaluation(monkeypatch) -> None:
    """SIGTERM this process when the training loop next evaluates (that evaluation still runs), once."""
    import signal

    from mnist_cnn.training import loop

    real_evaluate = loop.evaluate_split

    def evaluate_then_interrupt(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(loop, "evaluate_split", real_evaluate)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_split", evaluate_then_interrupt)


def mnist_with(table: dict[str, IdxFile]):
    """MNIST with another checksum table (that of synthetic files)."""
    import dataclasses

    from mnist_cnn.data.datasets import MNIST

    return dataclasses.replace(MNIST, files=table)


@pytest.fixture(autouse=True)
def torch_globals_restored():
    """In-process runs with run.deterministic switch torch's deterministic algorithms on for the
    process; the next test starts as torch does, whatever order the tests run in."""
    deterministic, dtype = torch.are_deterministic_algorithms_enabled(), torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_default_dtype(dtype)


@pytest.fixture
def float64():
    """Compute in float64 for the duration of a test: networks are built, and images enter
    (inputs.to_unit), in torch's default float dtype. Where a test claims that two computations are
    the same, float64 leaves ~1e-12 of kernel noise on any CPU, while fp32's noise depends on the
    kernels the CPU gets (AMX, AVX-512, AVX2): ~1e-6 on one, ~1e-3 after an epoch on another."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(before)


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist"
    write_synthetic(folder)
    return folder


def real_mnist_dir() -> Path | None:
    if os.environ.get("MNIST_CNN_TESTS_SYNTHETIC_ONLY"):  # to run the suite as a machine without MNIST would
        return None
    for candidate in (os.environ.get("MNIST_CNN_DATA"), SHARED_MNIST):
        if candidate and all(
            (Path(candidate) / (spec.name + ".gz")).is_file() or (Path(candidate) / spec.name).is_file()
            for spec in FILES.values()
        ):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_dir() -> Path:
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip("real MNIST not found ($MNIST_CNN_DATA or ../shared/data/mnist)")
    return folder


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """One epoch of the seed recipe on the full real training set (about 11 s here),
    shared by the tests that need a model that really reads digits."""
    folder = real_mnist_dir()
    if folder is None:
        pytest.skip("real MNIST not found ($MNIST_CNN_DATA or ../shared/data/mnist)")
    from mnist_cnn.cli import main

    out = tmp_path_factory.mktemp("real") / "run"
    assert (
        main(
            ["train", "--data-dir", str(folder), "--out", str(out), "--epochs", "1", "--device", "cpu", "--no-progress"]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of two quick epochs on synthetic data."""
    from mnist_cnn.cli import main

    data = tmp_path_factory.mktemp("synthetic") / "mnist"
    write_synthetic(data)
    out = data.parent / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(data),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--no-progress",
                "--no-verify",
            ]
        )
        == 0
    )
    return data, out


def training_setup(folder: Path, cfg, device=None):
    """(data on the device, fresh TrainState) for `cfg` on the IDX files in `folder`, seeded."""
    import torch

    from mnist_cnn.data.splits import load_dataset, to_device
    from mnist_cnn.device import seed_everything
    from mnist_cnn.networks.reference import create, locate
    from mnist_cnn.training.state import build_state

    device = device or torch.device("cpu")
    data = to_device(
        load_dataset(folder, verify=False, download_missing=False),
        device,
        cfg.run.train_limit,
        cfg.val_size,
        cfg.batch_size,
    )
    seed_everything(cfg.run.seed)
    model = create(locate(cfg.model), data.num_classes, cfg.model_args)
    return data, build_state(model, cfg, device, data.steps_per_epoch(cfg.batch_size))


@contextlib.contextmanager
def served(checkpoint: Path, workdir: Path, *extra: str):
    """`mnist-cnn serve CHECKPOINT --port 0` in a subprocess, as a user starts it, with its
    working and temporary folders in `workdir`; yields its base URL, stops it afterwards."""
    env = {**os.environ, "TMPDIR": str(workdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", str(checkpoint), "--port", "0", *extra],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], SERVER_START_S)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"http://\S+/", line)
        assert match, f"the server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(0).rstrip("/")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server(synthetic_run, tmp_path_factory):
    """(base URL, checkpoint, the server's empty working/temporary folder) of one `serve` that
    test_serve.py and test_openapi.py share (the fuzzer's requests must leave that folder empty too)."""
    workdir = tmp_path_factory.mktemp("serve-cwd")
    checkpoint = synthetic_run[1] / "last.pt"
    with served(checkpoint, workdir) as url:
        yield url, checkpoint, workdir


def signal_when(proc: subprocess.Popen, ready, signum: int, target=None, timeout_s: float = 300) -> tuple[str, str]:
    """Wait until ready() (the process still running), send `signum` to it (or to the pid target()
    returns then), and return its (stdout, stderr)."""
    import time

    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(target() if target else proc.pid, signum)
        return proc.communicate(timeout=timeout_s)
    finally:
        proc.kill()
