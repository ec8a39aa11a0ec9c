"""The Python API is a good citizen in someone else's process: torch's process-wide settings, the
global generators and the signal handlers are as the caller had them after train(), evaluate(), ...,
whether the call returns or raises; and train() runs from a thread."""

from __future__ import annotations

import os
import random
import signal
import threading

import numpy as np
import pytest
import torch

import mnist_cnn
from mnist_cnn.errors import Diverged
from mnist_cnn.training import loop as train_module


def settings() -> dict:
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "benchmark": torch.backends.cudnn.benchmark,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        same = (
            torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b) if key == "numpy_rng" else a == b
        )
        assert same, key


def quick(synthetic_dir, tmp_path, **extra):
    return dict(
        data_dir=str(synthetic_dir),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=32,
        device="cpu",
        progress=False,
        overrides={"run.verify": False, "run.deterministic": True, "run.threads": 1, **extra},
    )


def test_train_and_evaluate_leave_torchs_settings_and_generators_as_they_were(synthetic_dir, tmp_path):
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    before = settings()
    assert not before["deterministic"] and before["threads"] != 1  # what train() will change for itself
    args = quick(synthetic_dir, tmp_path)
    run = mnist_cnn.train("seed", args.pop("overrides"), **args)
    assert run.finished
    assert_same(before, settings())
    mnist_cnn.evaluate(run.checkpoint, data_dir=str(synthetic_dir), verify=False)
    assert_same(before, settings())


def test_a_train_that_fails_leaves_them_too(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "nll", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    before = settings()
    args = quick(synthetic_dir, tmp_path)
    with pytest.raises(Diverged):
        mnist_cnn.train("seed", args.pop("overrides"), **args)
    assert_same(before, settings())


def test_train_runs_in_a_thread_where_no_signal_handler_can_be_set(synthetic_dir, tmp_path):
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    outcome: dict = {}

    def work():
        try:
            args = quick(synthetic_dir, tmp_path)
            outcome["run"] = mnist_cnn.train("seed", args.pop("overrides"), **args)
        except BaseException as e:  # what the thread met, for the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["run"].finished and outcome["run"].checkpoint.is_file()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_what_the_library_says_goes_through_logging_and_progress_false_prints_nothing(
    synthetic_dir, tmp_path, capsys, caplog
):
    import logging

    args = quick(synthetic_dir, tmp_path)
    overrides = args.pop("overrides")
    args["progress"] = True
    root = logging.getLogger()
    pytests = root.handlers[:]
    root.handlers[:] = []  # as in a notebook where nobody set up logging (pytest's capture is a root handler)
    try:
        mnist_cnn.train("seed", overrides, **{**args, "out": str(tmp_path / "a")})
        out = capsys.readouterr().out
        assert "epoch   1/1" in out and out.startswith("training seed")  # printed
        mnist_cnn.train("seed", overrides, **{**args, "out": str(tmp_path / "b"), "progress": False})
        assert capsys.readouterr() == ("", "")  # progress=False: nothing at all
    finally:
        root.handlers[:] = pytests
    with caplog.at_level(logging.INFO, logger="mnist_cnn.say"):  # a caller's logging gets the records
        mnist_cnn.train("seed", overrides, **{**args, "out": str(tmp_path / "c")})
    assert any(r.getMessage().startswith("epoch   1/1") for r in caplog.records)
