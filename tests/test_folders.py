"""predict over folders, a bad file costing only itself; evaluate on a labelled folder of your own."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_digits
from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.cli import main
from mnist_cnn.data.splits import load_split
from mnist_cnn.inference.evaluate import predict_log_probs
from mnist_cnn.inference.image_files import image_paths

N_EVAL = 300  # MNIST test digits saved as PNG for evaluate --images


def digits_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(synthetic_digits(n, seed=seed)[0]):
        paths.append(folder / f"d{i:02d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture
def messy(tmp_path) -> tuple[Path, list[str]]:
    """A folder with good images (one in a sub-folder), a text file, a fake and a truncated PNG;
    and the paths predict tries, in their (sorted) order."""
    root = tmp_path / "mine"
    digits_folder(root, 3)
    digits_folder(root / "more", 2, seed=1)
    (root / "notes.txt").write_text("not an image")
    (root / "fake.png").write_text("not an image either")
    (root / "cut.png").write_bytes((root / "d00.png").read_bytes()[:70])
    return root, image_paths([str(root)])[0]


def test_a_folder_is_searched_recursively_in_sorted_order(messy):
    root, paths = messy
    assert [Path(p).relative_to(root).as_posix() for p in paths] == [
        "cut.png",
        "d00.png",
        "d01.png",
        "d02.png",
        "fake.png",
        "more/d00.png",
        "more/d01.png",
    ]
    assert image_paths([str(root)])[1] == [str(root / "notes.txt")]  # skipped: not an image by extension


def test_every_good_image_is_answered_and_each_bad_one_reported(synthetic_run, messy, tmp_path, capsys):
    root, paths = messy
    checkpoint = synthetic_run[1] / "last.pt"
    explicit = tmp_path / "stray.txt"
    explicit.write_text("given by name, so it is tried")
    code = main(["predict", str(checkpoint), str(root), str(explicit), "--json", "--csv", str(tmp_path / "a.csv")])
    captured = capsys.readouterr()
    assert code == 2
    answers = json.loads(captured.out)
    assert [a["image"] for a in answers] == paths + [str(explicit)]  # input order, errors in their place
    bad = {a["image"]: a["error"] for a in answers if "error" in a}
    assert set(bad) == {str(root / "cut.png"), str(root / "fake.png"), str(explicit)}
    assert "cannot decode image" in bad[str(root / "cut.png")] and "not an image" in bad[str(explicit)]
    good = [a for a in answers if "error" not in a]
    assert len(good) == 5 and all(0 <= a["digit"] <= 9 and len(a["top3"]) == 3 for a in good)
    err = captured.err.splitlines()
    assert [line for line in err if line.startswith("error: ")] == [f"error: {bad[p]}" for p in bad]
    assert "skipped 1 file(s)" in captured.err and "3 of 8 images could not be read" in captured.err
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [a["image"] for a in answers]
    assert [r["error"] != "" for r in rows] == ["error" in a for a in answers]


def test_jsonl_and_text_stream_one_line_per_image(synthetic_run, messy, capsys):
    root, paths = messy
    checkpoint = synthetic_run[1] / "last.pt"
    assert main(["predict", str(checkpoint), str(root), "--jsonl"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["image"] for line in lines] == paths
    assert main(["predict", str(checkpoint), str(root / "more")]) == 0  # all good: exit 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(str(root / "more" / "d00.png") + ": ")


def test_a_folder_without_images_is_an_error(synthetic_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(synthetic_run[1] / "last.pt"), str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: no images in {tmp_path / 'empty'}")


@pytest.mark.numerics
def test_batched_answers_equal_one_image_at_a_time(synthetic_run, tmp_path, capsys):
    checkpoint = synthetic_run[1] / "last.pt"
    paths = digits_folder(tmp_path / "d", 12, seed=4)
    assert main(["predict", str(checkpoint), str(tmp_path / "d"), "--json"]) == 0
    together = json.loads(capsys.readouterr().out)
    for path, answer in zip(paths, together):
        assert main(["predict", str(checkpoint), str(path), "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)[0]
        assert alone["digit"] == answer["digit"]
        assert alone["probability"] == pytest.approx(answer["probability"], abs=1e-5)


@pytest.fixture(scope="module")
def labelled(real_run, real_dir, tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """N_EVAL MNIST test digits as PNG in class sub-folders; (folder, their images, labels)."""
    images, labels = load_split(real_dir, "test")
    images, labels = images[:N_EVAL], labels[:N_EVAL]
    root = tmp_path_factory.mktemp("labelled") / "digits"
    for i, (a, y) in enumerate(zip(images, labels)):
        (root / str(int(y))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.numpy()).save(root / str(int(y)) / f"{i:04d}.png")
    return root, images, labels


def test_evaluate_on_a_labelled_folder_equals_evaluate_on_the_same_idx_images(real_run, labelled, tmp_path, capsys):
    root, images, labels = labelled
    (root / "3" / "broken.png").write_text("unreadable")
    checkpoint = real_run / "last.pt"
    assert main(["evaluate", str(checkpoint), "--images", str(root), "--json", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads(capsys.readouterr().out)
    model, cfg, _ = load_model_file(checkpoint)
    expected = int((predict_log_probs(model, images, 1000).argmax(1) == labels).sum()) / N_EVAL
    assert report["n"] == N_EVAL and report["accuracy"] == expected
    assert [u["image"] for u in report["unreadable"]] == [str(root / "3" / "broken.png")]
    assert len(report["per_class"]) == 10 and np.array(report["confusion"]).sum() == N_EVAL
    assert {p.name for p in (tmp_path / "ev").iterdir()} == {"confusion.png", "mistakes.png", "evaluation.json"}
    (root / "3" / "broken.png").unlink()


def test_a_sub_folder_that_is_not_a_class_is_a_one_line_error(real_run, labelled, capsys):
    root, _, _ = labelled
    (root / "eleven").mkdir()
    try:
        assert main(["evaluate", str(real_run / "last.pt"), "--images", str(root)]) == 2
    finally:
        (root / "eleven").rmdir()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sub-folder(s) eleven are not mnist classes" in err
