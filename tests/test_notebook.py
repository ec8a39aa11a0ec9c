"""notebooks/: committed without outputs, and the walkthrough runs top to bottom on the real MNIST."""

from __future__ import annotations

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # the training cell: about a minute on a 2-core CPU


def test_there_is_a_walkthrough():
    assert [p.name for p in NOTEBOOKS] == ["walkthrough.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_hold_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


@pytest.mark.realdata
def test_the_walkthrough_runs_top_to_bottom(real_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MNIST_CNN_DATA", str(real_dir))  # the kernel inherits the environment
    nb = nbformat.read(REPO / "notebooks" / "walkthrough.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises on any cell's error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "final-epoch test accuracy" in text and "largest difference between ONNX Runtime and torch" in text
    assert "seven.png: 7" in text
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "seed.onnx").is_file()
