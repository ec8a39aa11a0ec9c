"""Bad checkpoints and fuzzed IDX files, crafted exports and files that are not files: only the
project's own errors, one line each, before anything is allocated or waited on."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import threading
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
from mnist_cnn.config import load_config, to_dict
from mnist_cnn.data.idx import IdxFile, idx_size, load_idx, parse_idx
from mnist_cnn.data.splits import load_split
from mnist_cnn.errors import DataError
from mnist_cnn.inference.evaluate import predict_log_probs
from mnist_cnn.networks.builtin import build_model


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    torch.save(make_checkpoint(build_model("seed"), load_config("seed")).to_dict(), path)
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
    ckpt = make_checkpoint(build_model("tiny"), load_config("seed", {"model": "tiny"})).to_dict()
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
    path.write_bytes(b"\x80\x02J\x00")  # a pickle cut inside an int: torch.load raised struct.error
    assert "not a readable checkpoint" in evaluate_error(path, synthetic_dir, capsys)


def test_a_checkpoint_of_a_registered_model_is_rebuilt_from_its_config(tmp_path, synthetic_dir, capsys):
    model = build_model("tiny").eval()
    path = tmp_path / "tiny.pt"
    torch.save(make_checkpoint(model, load_config("seed", {"model": "tiny"})).to_dict(), path)
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


# --- crafted checkpoints and exports: refused before allocating, in one line (issue 34) ------------------------


CAP_BYTES = 2 << 30  # more than any test here needs; a 200,000,000-class head alone would need 32 GB


@contextlib.contextmanager
def allocations_capped():
    """Within the block, any allocation past CAP_BYTES more than the process holds fails at once
    (RLIMIT_AS): a regression that builds a crafted checkpoint's giant network fails the test
    rather than filling the memory of a machine shared with other jobs."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    cap = held + CAP_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def address_space_capped():
    with allocations_capped():
        yield


def crafted(tmp_path: Path, edit, model: str = "seed") -> Path:
    """A checkpoint of an untrained `model`, its file's dict changed by edit(ckpt), saved as tmp_path/crafted.pt."""
    ckpt = make_checkpoint(build_model(model), load_config("seed", {"model": model})).to_dict()
    edit(ckpt)
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    return path


def predict_error(path: Path, image: Path, capsys) -> str:
    """`predict CHECKPOINT IMAGE` on a refused checkpoint: exit 2, one line, nothing written."""
    before = sorted(path.parent.iterdir())
    code = main(["predict", str(path), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(path.parent.iterdir()) == before
    return err


@pytest.fixture
def digit_png(tmp_path) -> Path:
    path = tmp_path / "images" / "seven.png"
    path.parent.mkdir()
    from PIL import Image

    Image.fromarray(synthetic_digits(1)[0][0]).save(path)
    return path


def test_a_stored_num_classes_past_its_bound_is_refused_before_allocating(
    tmp_path, digit_png, capsys, address_space_capped
):
    """200,000,000 classes: a Linear(40, 2e8) head of 32 GB. The bound is named."""
    path = crafted(tmp_path, lambda c: c["network"].update(num_classes=200_000_000))
    err = predict_error(path, digit_png, capsys)
    assert "num_classes must be 1..1,000 (MAX_CLASSES), got 200000000" in err


@pytest.mark.parametrize(
    "model, model_args, bound",
    [
        ("vgg", {"w3": 100_000}, "past the bound of 100,000,000 (MAX_PARAMETERS)"),  # 9e10 conv weights
        ("family", {"d1": 10**9, "w1": 1}, "more than 2,000 parameter tensors (MAX_PARAMETER_TENSORS)"),
    ],
)
def test_model_args_that_build_a_giant_network_are_refused_before_allocating(
    tmp_path, digit_png, capsys, address_space_capped, model, model_args, bound
):
    path = crafted(tmp_path, lambda c: c["config"].update(model_args=model_args), model)
    assert bound in predict_error(path, digit_png, capsys)


def test_integer_weights_are_refused_not_run_as_a_network_that_says_ten_percent(tmp_path, digit_png, capsys):
    def to_int(ckpt):
        ckpt["model"] = {k: v.round().long() if v.is_floating_point() else v for k, v in ckpt["model"].items()}

    err = predict_error(crafted(tmp_path, to_int), digit_png, capsys)
    assert "weights must be floating point: features.0.0.weight is torch.int64 (and 41 more)" in err


def test_missing_and_unexpected_weights_are_named_in_one_line(tmp_path, digit_png, capsys):
    def rename(ckpt):
        ckpt["model"]["head.4.scale"] = ckpt["model"].pop("head.4.bias")
        del ckpt["model"]["head.4.weight"]

    err = predict_error(crafted(tmp_path, rename), digit_png, capsys)
    assert (
        "weights do not fit model SeedNet: 2 missing (head.4.weight, head.4.bias), 1 unexpected (head.4.scale)" in err
    )
    path = crafted(tmp_path, lambda c: c["model"].update({"head.4.bias": torch.zeros(7)}))
    assert "head.4.bias is 7 in the file, 10 in the model" in predict_error(path, digit_png, capsys)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(network="seed"), "its 'network' entry is a str, not a table"),
        (lambda c: c["network"].update(num_classes="10"), "its num_classes '10' is not a whole number"),
        (lambda c: c["network"].update(num_classes=float("inf")), "its num_classes inf is not a whole number"),
        (lambda c: c["network"].update(sha256=7), "its network sha256 7 is not a string"),
        (lambda c: c.pop("model"), "its 'model' entry is missing"),
        (lambda c: c.update(model=[1, 2]), "its 'model' entry is a list, not a table"),
        (lambda c: c.update(epoch="3"), "its 'epoch' entry is a str, not a whole number"),
        (lambda c: c.update(metrics=[1.0]), "its metrics are not a list of rows"),
        (lambda c: c.update(metrics=[{"test_acc": "0.99"}]), "its metrics hold '0.99', not a number"),
        (lambda c: c.update(version=torch.zeros(0)), "checkpoint format tensor([]) is not supported"),
        (lambda c: c.update(version=3), "checkpoint format 3 is not supported (this mnist-cnn reads formats 1 to 2"),
        (lambda c: c.update(mnist_cnn=None), "its 'mnist_cnn' entry is a NoneType, not a string"),
        (lambda c: c.update(partial={"epoch": 1, "rng": 5}), "its unfinished epoch {'epoch': 1, 'rng': 5} is not"),
        (lambda c: c.update(partial={"epoch": float("inf")}), "its unfinished epoch {'epoch': inf} is not readable"),
        (lambda c: c.update(version=1, partial=[]), "its 'partial' entry is a list, not a table"),
        (lambda c: c["config"].update(model=torch.zeros(2, 1)), "model must be str, got Tensor tensor([[0.], [0.]])"),
    ],
)
def test_a_checkpoint_with_entries_of_the_wrong_kind_is_one_line(tmp_path, digit_png, capsys, edit, message):
    """What test_properties found: each of these was an AttributeError, ValueError, OverflowError,
    KeyError or (serve's /api/model) TypeError with a traceback."""
    assert message in predict_error(crafted(tmp_path, edit), digit_png, capsys)


def export_of(tmp_path: Path, weights: dict[str, torch.Tensor], **meta: str) -> Path:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    metadata = {"config": json.dumps(to_dict(load_config("seed"))), "num_classes": "10", **meta}
    safetensors_torch.save_file(weights, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"num_classes": "ten"}, "its metadata num_classes 'ten' is not a number"),
        ({"num_classes": "200000000"}, "num_classes must be 1..1,000 (MAX_CLASSES), got 200000000"),
        ({"final_test_accuracy": "high"}, "its metadata final_test_accuracy 'high' is not a number"),
        ({"epochs_trained": "1.5"}, "its metadata epochs_trained '1.5' is not a number"),
        ({"epochs_trained": "-3"}, "its metadata epochs_trained -3 is negative"),
        ({"config": "[" * 5000 + "]" * 5000}, "not a safetensors export of mnist-cnn"),
    ],
)
def test_a_safetensors_export_with_crafted_metadata_is_one_line(tmp_path, digit_png, capsys, meta, message):
    weights = dict(build_model("seed").state_dict())
    assert message in predict_error(export_of(tmp_path, weights, **meta), digit_png, capsys)


def test_a_safetensors_export_that_does_not_say_its_epochs_says_so_everywhere(tmp_path, synthetic_dir, capsys):
    """An export without epochs_trained (as hand-made ones are): not known, not 0. It serves as a teacher
    (an export is of what was trained), /api/model says null, and a re-export writes it as unknown."""
    from mnist_cnn.checkpoint import load_model_file, metadata
    from mnist_cnn.data.datasets import get_dataset
    from mnist_cnn.serving.app import describe_model

    model, cfg, ckpt = load_model_file(export_of(tmp_path, dict(build_model("seed").state_dict())))
    assert ckpt.epoch is None and ckpt.finished
    assert describe_model(model, cfg, ckpt, get_dataset("mnist"), "model.safetensors")["epochs"] is None
    assert metadata(ckpt)["epochs_trained"] == ""
    args = ["--data-dir", str(synthetic_dir), "--no-verify", "--epochs", "1", "--train-limit", "64", "--no-progress"]
    assert main(["train", *args, "--teacher", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "s")]) == 0


def test_a_safetensors_export_of_integer_weights_is_refused(tmp_path, digit_png, capsys):
    weights = {k: (v * 100).to(torch.int32) for k, v in build_model("seed").state_dict().items()}
    err = predict_error(export_of(tmp_path, weights), digit_png, capsys)
    assert "weights must be floating point: features.0.0.weight is torch.int32" in err


# --- things that are not regular files: refused at once, never waited on ---------------------------------------

WAIT_S = 30  # a refusal takes well under a second; a FIFO that is opened waits for a writer forever


def finishes(call, fifo: Path) -> bool:
    """Whether call() returns within WAIT_S; if not, the FIFO gets a writer, which lets it end."""
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(WAIT_S)
    if worker.is_alive():
        with open(fifo, "wb"):  # the reader blocked in open() gets its writer, then end of file
            pass
        worker.join(WAIT_S)
        return False
    return True


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_given_as_an_image_is_refused_without_waiting(tmp_path, good_checkpoint, capsys):
    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    codes = []
    assert finishes(lambda: codes.append(main(["predict", str(good_checkpoint), str(fifo)])), fifo)
    assert codes == [2]
    assert capsys.readouterr().err == f"error: {fifo}: not an image file but a FIFO\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_given_as_a_checkpoint_is_refused_without_waiting(tmp_path, digit_png, capsys):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    codes = []
    assert finishes(lambda: codes.append(main(["predict", str(fifo), str(digit_png)])), fifo)
    assert codes == [2]
    assert capsys.readouterr().err == f"error: {fifo}: not a checkpoint file but a FIFO\n"
