"""predict: people's images made MNIST-like, then classified; bad images refused."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_cnn.checkpoint import load_model_file, make_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.config import load_config
from mnist_cnn.data.splits import load_split
from mnist_cnn.inference.evaluate import predict_log_probs
from mnist_cnn.inference.predict import preprocess
from mnist_cnn.networks.builtin import build_model

N_DIGITS = 20


@pytest.fixture(scope="module")
def digits(real_run, real_dir) -> tuple[np.ndarray, np.ndarray]:
    """N_DIGITS test digits that the one-epoch model classifies correctly on the tensor path."""
    images, labels = load_split(real_dir, "test")
    model, cfg, _ = load_model_file(real_run / "last.pt")
    pred = predict_log_probs(model, images[:200], 200).argmax(1)
    right = (pred == labels[:200].long()).nonzero().flatten()[:N_DIGITS]
    return images[right].numpy(), labels[right].numpy()


def predict_json(ckpt: Path, paths: list[Path], capsys, *extra: str) -> list[dict]:
    assert main(["predict", str(ckpt), *map(str, paths), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_saved_test_digits_are_predicted_as_their_labels(real_run, digits, tmp_path, capsys):
    images, labels = digits
    paths = []
    for i, a in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(a).save(paths[-1])
    out = tmp_path / "pre"
    results = predict_json(real_run / "last.pt", paths, capsys, "--save-preprocessed", str(out))
    assert [r["digit"] for r in results] == labels.tolist()
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for r in results:
        assert [t["digit"] for t in r["top3"]][0] == r["digit"] and len(r["top3"]) == 3
        assert r["probability"] == r["top3"][0]["probability"] >= r["top3"][1]["probability"]
    # an image that already looks like MNIST goes through unchanged
    for i, a in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:03d}_digit{i}.png")), a)


def on_paper(a: np.ndarray, offset: tuple[int, int]) -> Image.Image:
    """The digit dark on white, three times larger, off-centre on a 200x150 RGB canvas."""
    big = Image.fromarray(255 - a).resize((84, 84), Image.BILINEAR).convert("RGB")
    canvas = Image.new("RGB", (200, 150), (255, 255, 255))
    canvas.paste(big, offset)
    return canvas


def test_dark_on_white_larger_off_centre_digit_gives_the_same_prediction(real_run, digits, tmp_path, capsys):
    """Metric: mean absolute difference between the preprocessed 28x28 and the
    original, on a 0..1 scale: at most 0.10 for every digit, at most 0.05 on average."""
    images, labels = digits
    paths, mads = [], []
    for i, a in enumerate(images):
        img = on_paper(a, (10 + 5 * i, 60 - 3 * i))
        paths.append(tmp_path / f"paper{i}.png")
        img.save(paths[-1])
        mads.append(np.abs(preprocess(img) - a / 255.0).mean())
    results = predict_json(real_run / "last.pt", paths, capsys)
    assert [r["digit"] for r in results] == labels.tolist()
    assert max(mads) <= 0.10 and np.mean(mads) <= 0.05


@pytest.mark.parametrize("kind", ["L.bmp", "RGB.jpg", "P.gif", "RGBA.png", "LA.png", "P-transparent.png"])
def test_every_mode_and_format_is_understood(real_run, digits, tmp_path, capsys, kind):
    a, label = digits[0][0], int(digits[1][0])
    paper = on_paper(a, (50, 30))  # dark ink on white
    mode, ext = kind.split(".")
    if mode == "RGBA":  # dark ink on a transparent background: alpha over white
        img = paper.convert("RGBA")
        img.putalpha(Image.fromarray(np.where(np.asarray(paper.convert("L")) > 250, 0, 255).astype(np.uint8)))
    elif mode == "LA":
        img = paper.convert("LA")
    elif mode == "P-transparent":
        img = paper.convert("P")
        img.info["transparency"] = 255  # whichever palette index, it is composited over white
    else:
        img = paper.convert(mode)
    path = tmp_path / f"digit.{ext}"
    img.save(path)
    assert predict_json(real_run / "last.pt", [path], capsys)[0]["digit"] == label


@pytest.fixture
def untrained(tmp_path) -> Path:
    path = tmp_path / "untrained.pt"
    torch.save(make_checkpoint(build_model("seed"), load_config("seed")).to_dict(), path)
    return path


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (the pixel data is not needed to test the limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p.write_text("not an image"), p)[1], "not an image PIL can read"),
        (lambda p: png_with_size(p, 0, 0), "not an image PIL can read|cannot decode|too small"),
        (lambda p: Image.new("L", (1, 1), 255).save(p, format="PNG") or p, "1x1 is too small"),
        (lambda p: png_with_size(p, 20_000, 20_000), "larger than the 40,000,000-pixel limit"),
        (lambda p: Image.new("RGB", (64, 48), (255, 255, 255)).save(p, format="PNG") or p, "no ink found"),
        (lambda p: Image.new("L", (28, 28), 0).save(p, format="PNG") or p, "no ink found"),
        (lambda p: (p.write_bytes(png_bytes()[:60]), p)[1], "cannot decode image"),
    ],
)
def test_bad_images_are_one_line_errors(untrained, tmp_path, capsys, make, message):
    path = make(tmp_path / "bad.png")
    assert main(["predict", str(untrained), str(path), "--save-preprocessed", str(tmp_path / "pre")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not (tmp_path / "pre").exists()  # nothing written for a failed command


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_missing_image_file(untrained, tmp_path, capsys):
    assert main(["predict", str(untrained), str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such image file" in capsys.readouterr().err
