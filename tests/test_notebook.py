"""notebooks/: committed without outputs, and the walkthrough runs top to bottom on the real MNIST:
a network written in a cell, its learning rate, a short run of it, the reload, and answers on arrays."""

from __future__ import annotations

import json
import tomllib

import nbformat
import pytest
import torch
from torch import nn

import mnist_cnn
from conftest import REPO
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.data.splits import load_split
from mnist_cnn.training.rundir import read_metrics

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
WALKTHROUGH = REPO / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600  # the whole notebook takes about 25 s on a 2-core CPU; minutes under heavy load are a failure
NET_CELL = "class Net(nn.Module):"
SHOWN = 12  # test images the notebook predicts
TEST_IMAGES = 10_000
ONE_IMAGE = 1 / TEST_IMAGES  # train's evaluation and evaluate's may differ by float32 rounding: one image at most
# Appended to the executed copy: what the notebook left in its kernel, as JSON (a NameError names what is missing).
PROBE = """
import json
print(json.dumps({
    "suggestion": found.suggestion,
    "reason": found.reason,
    "lr": run.config.optim.lr,
    "run_dir": str(run.run_dir.resolve()),
    "parameters": sum(p.numel() for p in Net().parameters()),
    "reloaded_is_net": type(model.model) is Net,
    "digits": [a["digit"] for a in answers],
    "names": [a["image"] for a in answers],
    "labels": [int(label) for label in y],
    "batch": [str(x.dtype), list(x.shape)],
    "argmax": run.model(torch.from_numpy(x)).argmax(1).tolist(),
    "accuracy": report["accuracy"],
    "n": report["n"],
    "before": {k: str(v) for k, v in before.items()},
    "after": {k: str(v) for k, v in after.items()},
    "deterministic_now": torch.are_deterministic_algorithms_enabled(),
}))
"""


def test_there_is_a_walkthrough():
    assert [p.name for p in NOTEBOOKS] == ["walkthrough.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_hold_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


def cell_net(nb) -> type[nn.Module]:
    """The notebook's own network, from the one code cell that defines it (as its kernel does)."""
    cells = [c.source for c in nb.cells if c.cell_type == "code" and NET_CELL in c.source]
    assert len(cells) == 1, f"one code cell must define {NET_CELL}"
    namespace: dict = {"__name__": "__main__", "torch": torch, "nn": nn}
    exec(compile(cells[0], "<cell>", "exec"), namespace)  # noqa: S102 (the repository's own notebook)
    return namespace["Net"]


@pytest.mark.realdata
def test_the_walkthrough_trains_its_own_network_and_answers_on_arrays(real_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MNIST_CNN_DATA", str(real_dir))  # the kernel inherits the environment
    # One torch thread: on a shared 2-core machine two spinning OpenMP threads sometimes take 10x as long.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    Net = cell_net(nb)  # noqa: N806 (a class, as the notebook names it)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises on any cell's error
    outputs = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"]
    kernel = json.loads(outputs[-1])
    text = "\n".join(outputs[:-1])

    # the range test: a suggestion read off the curve, the curve drawn, the rate trained with
    assert 1e-7 < kernel["suggestion"] < 10 and "steepest descent" in kernel["reason"]
    assert (tmp_path / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert kernel["lr"] == float(f"{kernel['suggestion']:.2g}")

    # the run folder: the cell's class, by reference, trained on the settings the notebook gave
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and str(runs[0].resolve()) == kernel["run_dir"]
    run = runs[0]
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["model"] == "object:__main__.Net" and config["recipe"] == "fast" and config["epochs"] == 2
    assert config["run"]["train_limit"] == 10_000 and config["run"]["deterministic"] is True
    assert config["optim"]["lr"] == kernel["lr"]
    network = load_checkpoint(run / "last.pt").network
    assert network.given == "class" and network.parameters == kernel["parameters"]
    assert network.parameters == sum(p.numel() for p in Net().parameters())
    metrics = read_metrics(run / "metrics.csv")
    assert [row["epoch"] for row in metrics] == [1, 2] and metrics[-1]["test_acc"] > 0.9

    # torch's process settings: deterministic for the run, as they were in the kernel before and after
    assert kernel["before"] == kernel["after"] and kernel["deterministic_now"] is False
    assert "deterministic algorithms  before False" in text

    # the reload: without the class a one-line error that says how, with it the notebook's Net, same weights
    assert "without the class:" in text and "mnist_cnn.load(path, model=Net)" in text
    assert kernel["reloaded_is_net"] and "reloaded weights bitwise equal to train's: True" in text

    # predict on a uint8 array: N answers, in order, the network's own argmax
    assert kernel["batch"] == ["uint8", [SHOWN, 28, 28]] and kernel["names"] == [f"[{i}]" for i in range(SHOWN)]
    assert kernel["digits"] == kernel["argmax"]
    assert sum(d == label for d, label in zip(kernel["digits"], kernel["labels"])) >= SHOWN - 2
    images, labels = load_split(real_dir, "test")
    assert kernel["labels"] == labels[:SHOWN].tolist()
    ours = mnist_cnn.load(run / "last.pt", model=Net)  # the cell's class, here: the same answers
    assert [a["digit"] for a in mnist_cnn.predict(ours, images[:SHOWN].numpy())] == kernel["digits"]

    # evaluate on arrays with labels: the whole test set, the run's own last test accuracy, its report on disk
    assert kernel["n"] == TEST_IMAGES
    assert kernel["accuracy"] == pytest.approx(metrics[-1]["test_acc"], abs=ONE_IMAGE + 1e-9)
    written = json.loads((run / "arrays" / "evaluation.json").read_text())
    assert written["accuracy"] == kernel["accuracy"] and written["images"] == f"{TEST_IMAGES:,} in-memory images"
    assert (run / "arrays" / "mistakes.png").is_file() and (run / "curves.png").is_file()
