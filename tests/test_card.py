"""MODEL_CARD.md beside every run and export: a YAML header the Hub reads, and figures that are
the run's own files' (metrics.csv, evaluation.json, seeds-summary.json), never measured again."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import tomllib
from pathlib import Path

import pytest
import yaml

import mnist_cnn
from mnist_cnn.cli import main
from mnist_cnn.training.card import seeds_summary, write_card
from mnist_cnn.training.rundir import read_metrics


def parse(card: Path) -> tuple[dict, str]:
    """(the YAML header, the markdown body) of a model card."""
    text = card.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table(body: str) -> list[list[str]]:
    """The per-class table's rows."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in body.splitlines()
        if re.match(r"\| \S+ \| \d\.\d{4} \|", line)
    ]


def test_a_finished_run_has_a_card_whose_figures_are_its_files(synthetic_run):
    data, run = synthetic_run
    meta, body = parse(run / "MODEL_CARD.md")
    final = read_metrics(run / "metrics.csv")[-1]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert meta["library_name"] == "mnist-cnn" and meta["datasets"] == ["mnist"] and meta["metrics"] == ["accuracy"]
    assert {"image-classification", "pytorch", "mnist-cnn", "seed"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    # metrics.csv holds six significant digits (f"{v:.6g}": off by at most 5e-6 of the value)
    assert result["metrics"][0]["value"] == final["test_acc"] == pytest.approx(evaluation["accuracy"], rel=5e-6)
    assert evaluation["loss"] == pytest.approx(final["test_loss"], rel=1e-5) and evaluation["images"].endswith(
        "final epoch 2 of training"
    )
    assert sum(c["support"] for c in evaluation["per_class"]) == evaluation["n"] == 200  # the synthetic test set
    assert table(body) == [
        [c["name"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", str(c["support"])] for c in evaluation["per_class"]
    ]
    assert f"accuracy {100 * final['test_acc']:.2f}%, mean loss {final['test_loss']:.4f}" in body
    assert "`seed` (16,426 parameters)" in body and "2 epochs in" in body
    toml_block = body.split("```toml\n", 1)[1].split("```", 1)[0]
    assert tomllib.loads(toml_block) == tomllib.loads((run / "config.toml").read_text())
    for section in ("Model details", "Intended use and limits", "Training data and procedure", "How to use"):
        assert f"## {section}" in body
    # the final epoch's counts are those of an evaluation of the saved model, made afresh
    fresh = mnist_cnn.evaluate(run / "last.pt", data_dir=data, verify=False)
    assert fresh["confusion"] == evaluation["confusion"]


def test_an_export_carries_the_card_with_its_own_parity_check(synthetic_run, tmp_path, capsys):
    """(The ONNX export's card, and its ONNX Runtime lines run as written: tests/test_export.py.)"""
    data, run = synthetic_run
    dist = tmp_path / "dist"
    dist.mkdir()
    report = mnist_cnn.export(run / "last.pt", "safetensors", dist / "m.safetensors", data_dir=data, verify=False)
    card = dist / "m.safetensors.MODEL_CARD.md"
    assert report["card"] == str(card)
    meta, body = parse(card)
    assert meta == parse(run / "MODEL_CARD.md")[0]
    assert (
        f"`m.safetensors` (safetensors), checked against the torch model when it was written: largest "
        f"|exported - torch| log-probability {report['max_abs_diff']:.3g} over {report['n']} test images" in body
    )
    assert 'mnist_cnn.load("m.safetensors")' in body  # predict, serve and load take it
    assert mnist_cnn.load(dist / "m.safetensors").classes == tuple(str(d) for d in range(10))
    safetensors = ["--format", "safetensors", "--out", str(dist / "n.safetensors"), "--data-dir", str(data)]
    assert main(["export", str(run / "last.pt"), *safetensors, "--no-verify"]) == 0
    assert f"model card {dist / 'n.safetensors.MODEL_CARD.md'}" in capsys.readouterr().out
    assert "`m.safetensors`" in card.read_text()  # a second export into the folder has a card of its own
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    moved = mnist_cnn.export(mine / "last.pt", "safetensors", dist / "c.safetensors", data_dir=data, verify=False)
    assert len(table(parse(Path(moved["card"]))[1])) == 10  # a run folder that moved keeps its per-class table
    shutil.copy(mine / "last.pt", mine / "best.pt")  # not the checkpoint the run's card describes
    other = mnist_cnn.export(mine / "best.pt", "safetensors", dist / "b.safetensors", data_dir=data, verify=False)
    assert "card" not in other and not (dist / "b.safetensors.MODEL_CARD.md").exists()


def test_evaluate_into_the_run_folder_rewrites_its_card(synthetic_run, tmp_path, capsys):
    """A run folder from before cards: `mnist-cnn evaluate` writes evaluation.json and the card; the
    evaluation of another checkpoint written there does not become the card's table."""
    data, run = synthetic_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / "MODEL_CARD.md").unlink()
    (old / "evaluation.json").unlink()
    assert main(["evaluate", str(old / "last.pt"), "--data-dir", str(data), "--no-verify"]) == 0
    meta, body = parse(old / "MODEL_CARD.md")
    assert "Per class, on mnist test images (evaluation.json)" in body and len(table(body)) == 10
    written = json.loads((old / "evaluation.json").read_text())
    assert (written["checkpoint"], written["images"]) == ("last.pt", "mnist test images")
    shutil.copy(old / "last.pt", tmp_path / "best.pt")
    assert main(["evaluate", str(tmp_path / "best.pt"), "--data-dir", str(data), "--out", str(old), "--no-verify"]) == 0
    assert json.loads((old / "evaluation.json").read_text())["checkpoint"] == str((tmp_path / "best.pt").resolve())
    assert "Per class" not in parse(old / "MODEL_CARD.md")[1]


def test_a_card_reads_only_a_seeds_summary_that_names_the_run_and_came_after_it(synthetic_run, tmp_path):
    _, run = synthetic_run
    seed = tmp_path / "group" / "seed-3"
    shutil.copytree(run, seed)
    summary = {"runs": 1, "split": "test", "seeds": [3], "final_test_acc_mean": 0.5, "final_test_acc_std": 0.0}
    summary |= {"final_test_acc_min": 0.5, "final_test_acc_max": 0.5}
    (tmp_path / "group" / "seeds-summary.json").write_text(json.dumps(summary))
    assert seeds_summary(seed) == summary
    os.utime(seed / "metrics.csv", (time.time() + 60,) * 2)  # the run finished after that summary
    assert seeds_summary(seed) is None
    os.utime(seed / "metrics.csv", (time.time() - 60,) * 2)
    (tmp_path / "group" / "seeds-summary.json").write_text(json.dumps({**summary, "seeds": [0, 1]}))
    assert seeds_summary(seed) is None  # another group's


def test_a_damaged_run_folder_gets_a_warning_and_no_card(synthetic_run, tmp_path, caplog):
    _, run = synthetic_run
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "MODEL_CARD.md").unlink()
    (broken / "config.toml").write_text("model = [unclosed\n")
    assert write_card(broken) is None and not (broken / "MODEL_CARD.md").exists()
    (message,) = [r.getMessage() for r in caplog.records if "model card" in r.getMessage()]
    assert message.startswith(f"no model card for {broken}: ") and "\n" not in message
