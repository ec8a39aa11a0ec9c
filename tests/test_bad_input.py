"""Bad checkpoints and fuzzed IDX files: only the project's own errors, one line each."""

from __future__ import annotations

import gzip
import json
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import idx_bytes, synthetic_digits, write_idx
from mnist_cnn.checkpoint import make_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.config import load_config
from mnist_cnn.data.idx import IdxFile, idx_size, load_idx, parse_idx
from mnist_cnn.data.splits import load_split
from mnist_cnn.errors import DataError
from mnist_cnn.inference.evaluate import predict_log_probs
from mnist_cnn.networks.builtin import build_model


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    torch.save(make_checkpoint(build_model("seed"), load_config("seed")), path)
    return path


def evaluate_error(path: Path, data_dir: Path, capsys) -> str:
    """Runs evaluate on a bad checkpoint: exit 2, one line, and no figure or report written."""
    before = sorted(path.parent.iterdir())
    code = main(["evaluate", str(path), "--data-dir", str(data_dir), "--no-verify", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(path.parent.iterdir()) == before
    return err


def test_corrupt_checkpoint(tmp_path, synthetic_dir, capsys):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not a readable checkpoint" in evaluate_error(path, synthetic_dir, capsys)


def test_truncated_checkpoint(good_checkpoint, tmp_path, synthetic_dir, capsys):
    path = tmp_path / "truncated.pt"
    path.write_bytes(good_checkpoint.read_bytes()[:30_000])
    assert "not a readable checkpoint (corrupt or truncated?)" in evaluate_error(path, synthetic_dir, capsys)


def test_checkpoint_of_another_model(tmp_path, synthetic_dir, capsys):
    ckpt = make_checkpoint(build_model("tiny"), load_config("seed", {"model": "tiny"}))
    ckpt["config"]["model"] = "seed"  # says seed, holds tiny's weights
    path = tmp_path / "other.pt"
    torch.save(ckpt, path)
    assert "weights do not fit model SeedNet" in evaluate_error(path, synthetic_dir, capsys)


@pytest.mark.parametrize("content", [{"weights": torch.zeros(3)}, [1, 2, 3], "just text"])
def test_file_that_is_not_a_checkpoint(tmp_path, synthetic_dir, capsys, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    assert "not an mnist-cnn checkpoint" in evaluate_error(path, synthetic_dir, capsys)
    path.write_text("epoch,lr\n1,0.1\n")
    assert "not a readable checkpoint" in evaluate_error(path, synthetic_dir, capsys)


def test_a_checkpoint_of_a_registered_model_is_rebuilt_from_its_config(tmp_path, synthetic_dir, capsys):
    model = build_model("tiny").eval()
    path = tmp_path / "tiny.pt"
    torch.save(make_checkpoint(model, load_config("seed", {"model": "tiny"})), path)
    assert main(["evaluate", str(path), "--data-dir", str(synthetic_dir), "--no-verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    images, labels = load_split(synthetic_dir, "test", verify=False)
    expected = predict_log_probs(model, images, 1000).argmax(1)
    assert report["accuracy"] == pytest.approx((expected == labels.long()).float().mean().item())


def test_gzip_bomb_is_refused_before_it_fills_memory(tmp_path):
    """Reading stops one byte past the entry's size (800 bytes for one image), not at the end of 64 MiB."""
    path = tmp_path / "bomb.gz"
    spec = IdxFile("bomb", (1, 28, 28), "")
    with gzip.open(path, "wb", compresslevel=1) as f:
        chunk = bytes(1 << 20)
        for _ in range(64):
            f.write(chunk)
    with pytest.raises(DataError, match=f"decompresses to more than {idx_size(spec):,} bytes"):
        load_idx(path, spec, verify=True)  # refused on its size, before any checksum


def test_your_own_idx_data_may_be_larger_than_the_published_set_but_not_a_bomb(tmp_path, monkeypatch):
    """--no-verify: a file with more images than its entry loads; past MAX_OWN_IDX_BYTES it is refused."""
    from mnist_cnn.data import idx as data

    images = np.zeros((3, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "own.gz", images)
    spec = IdxFile("own", (2, 28, 28), "")  # the entry says 2 images
    assert load_idx(path, spec, verify=False).shape == (3, 28, 28)
    with pytest.raises(DataError, match="decompresses to more than"):
        load_idx(path, spec, verify=True)
    monkeypatch.setattr(data, "MAX_OWN_IDX_BYTES", 100)
    with pytest.raises(DataError, match="decompresses to more than"):
        load_idx(path, spec, verify=False)


# --- property-based: arbitrary bytes and arbitrary edits of a valid file -----------------

VALID = idx_bytes(synthetic_digits(8)[0])  # 8 images: 6,288 bytes
SPEC = IdxFile("fuzz", (8, 28, 28), "0" * 64)
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_data_error(raw):
    try:
        parse_idx(raw, "fuzz")
    except DataError:
        pass


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    gz=st.booleans(),
    verify=st.booleans(),
)
def test_edited_valid_files_load_or_raise_only_data_error(edits, cut, gz, verify):
    raw = bytearray(VALID)
    for pos, value in edits:
        raw[pos] = value
    raw = bytes(raw[:cut] if cut is not None else raw)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("fuzz.gz" if gz else "fuzz")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        try:
            out = load_idx(path, SPEC, verify=verify)
        except DataError:
            return
        assert not verify  # the placeholder checksum can never match
        assert out.dtype == torch.uint8 and out.dim() == 3


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_edited_gzip_streams_raise_only_data_error(edits, cut):
    stream = bytearray(gzip.compress(VALID))
    for pos, value in edits:
        stream[pos % len(stream)] = value
    stream = bytes(stream[:cut] if cut is not None else stream)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.gz"
        path.write_bytes(stream)
        try:
            load_idx(path, SPEC, verify=False)
        except DataError:
            pass
