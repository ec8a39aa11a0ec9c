"""The MNIST family: the table, each loader's format quirks on synthetic files served from
127.0.0.1, and Fashion-MNIST for real (train, evaluate, predict with class names, export)."""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import hashlib
import http.server
import json
import os
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, idx_bytes, real_mnist_dir, synthetic_digits
from mnist_cnn.cli import main
from mnist_cnn.data.datasets import DATASETS, EMNIST_LETTERS, FASHION_MNIST, KMNIST, MNIST, QMNIST, get_dataset
from mnist_cnn.data.download import download
from mnist_cnn.data.splits import load_dataset, load_split, resolve_data_dir
from mnist_cnn.errors import ConfigError, DataError
from mnist_cnn.inference.predict import preprocess

SHARED_FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"


def real_fashion_dir() -> Path | None:
    if real_mnist_dir() is None:  # MNIST_CNN_TESTS_SYNTHETIC_ONLY or no shared data at all
        return None
    ok = all((SHARED_FASHION / (f.name + ".gz")).is_file() for f in FASHION_MNIST.files.values())
    return SHARED_FASHION if ok else None


needs_fashion = pytest.mark.skipif(real_fashion_dir() is None, reason="Fashion-MNIST not in ../shared/data")


def idx_int32(array: np.ndarray) -> bytes:
    """int32 IDX (type 0x0C), as QMNIST's label files."""
    header = struct.pack(">HBB", 0, 0x0C, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=">i4").tobytes()


@pytest.fixture
def serve(tmp_path):
    """serve(folder) -> a mirror URL on 127.0.0.1 that serves the folder's files."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a: None
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_every_dataset_declares_files_checksums_classes_and_constants():
    assert list(DATASETS) == ["mnist", "fashion-mnist", "kmnist", "qmnist", "emnist-digits", "emnist-letters"]
    for ds in DATASETS.values():
        assert set(ds.files) == {"train_images", "train_labels", "test_images", "test_labels"}
        assert ds.mirrors and len(set(ds.classes)) == ds.num_classes >= 10
        assert 0 < ds.mean < 1 and 0 < ds.std < 1 and ds.licence
        for spec in ds.files.values():
            assert spec.sha256 or spec.md5 or ds.archive is not None, (ds.name, spec.name)
        assert ds.archive is None or len(ds.archive.md5) == 32
    assert FASHION_MNIST.classes[9] == "Ankle boot" and EMNIST_LETTERS.num_classes == 26
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; known: mnist, fashion-mnist"):
        get_dataset("cifar")


def test_mnist_cnn_data_names_only_the_mnist_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_CNN_DATA", str(tmp_path / "mnist"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "mnist"
    assert resolve_data_dir(None, dataset="kmnist") == tmp_path / "cache" / "mnist-cnn" / "kmnist"


def published(folder: Path, ds, arrays: dict[str, np.ndarray], writer=idx_bytes):
    """Write arrays as ds's .gz files into folder; return ds with the MD5s of those files."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, spec in ds.files.items():
        raw = (idx_int32 if arrays[key].dtype == np.int32 else writer)(arrays[key])
        blob = gzip.compress(raw, mtime=0)
        (folder / (spec.name + ".gz")).write_bytes(blob)
        files[key] = dataclasses.replace(spec, shape=arrays[key].shape, sha256=None, md5=hashlib.md5(blob).hexdigest())
    return dataclasses.replace(ds, files=files)


def test_kmnist_downloads_verifies_md5_and_loads(serve, tmp_path, caplog):
    (train, train_y), (test, test_y) = synthetic_digits(60, 0), synthetic_digits(20, 1)
    source = tmp_path / "mirror"
    ds = published(
        source, KMNIST, {"train_images": train, "train_labels": train_y, "test_images": test, "test_labels": test_y}
    )
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for f in source.iterdir():  # same names, other bytes: must fail the MD5 and be skipped
        (bad / f.name).write_bytes(gzip.compress(gzip.decompress(f.read_bytes()), mtime=1))
    ds = dataclasses.replace(ds, mirrors=(serve(bad), serve(source)))
    target = tmp_path / "kmnist"
    assert len(download(target, dataset=ds)) == 4
    assert "wrong bytes" in caplog.text
    data = load_dataset(target, download_missing=False, dataset=ds)
    assert torch.equal(data.train_images, torch.from_numpy(train)) and data.num_classes == 10
    (target / (ds.files["test_labels"].name + ".gz")).write_bytes(gzip.compress(idx_bytes(test_y), mtime=7))
    with pytest.raises(DataError, match="MD5 mismatch"):
        load_split(target, "test", dataset=ds)


def qmnist_rows(y: np.ndarray) -> np.ndarray:
    """QMNIST's (N, 8) int32 label rows: class, NIST writer, ..."""
    return np.stack(
        [y.astype(np.int32), np.arange(len(y), dtype=np.int32) + 1000, *[np.full(len(y), 7, np.int32)] * 6], axis=1
    )


def test_qmnist_labels_are_int32_rows_with_the_class_in_column_0(serve, tmp_path):
    (train, train_y), (test, test_y) = synthetic_digits(60, 0), synthetic_digits(30, 1)
    rows = qmnist_rows
    source = tmp_path / "mirror"
    ds = published(
        source,
        QMNIST,
        {"train_images": train, "train_labels": rows(train_y), "test_images": test, "test_labels": rows(test_y)},
    )
    ds = dataclasses.replace(ds, mirrors=(serve(source),))
    images, labels = load_split(tmp_path / "qmnist", "test", dataset=ds, download_missing=True)
    assert labels.tolist() == test_y.tolist() and images.shape == (30, 28, 28)
    assert QMNIST.files["test_images"].shape[0] == 60000  # the test file holds 60,000 images


def emnist_zip(path: Path, ds, arrays: dict[str, np.ndarray]) -> str:
    """EMNIST's layout: one zip, members under gzip/, images stored transposed."""
    with zipfile.ZipFile(path, "w") as z:
        for key, spec in ds.files.items():
            a = arrays[key].transpose(0, 2, 1) if key.endswith("images") else arrays[key]
            z.writestr(ds.archive.folder + spec.name + ".gz", gzip.compress(idx_bytes(a), mtime=0))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_emnist_letters_come_from_one_verified_zip_transposed_and_counted_from_1(serve, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (52, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(52) % 26 + 1).astype(np.uint8),  # letters: 1..26
        "test_images": rng.integers(0, 256, (26, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(26) + 1).astype(np.uint8),
    }
    source = tmp_path / "mirror"
    source.mkdir()
    md5 = emnist_zip(source / "gzip.zip", EMNIST_LETTERS, arrays)
    ds = dataclasses.replace(
        EMNIST_LETTERS,
        mirrors=(serve(source),),
        archive=dataclasses.replace(EMNIST_LETTERS.archive, md5=md5),
        files={k: dataclasses.replace(v, shape=arrays[k].shape) for k, v in EMNIST_LETTERS.files.items()},
    )
    target = tmp_path / "emnist"
    data = load_dataset(target, dataset=ds)  # downloads the zip, checks its MD5, extracts four members
    assert torch.equal(data.train_images, torch.from_numpy(arrays["train_images"]))  # transposed back
    assert data.test_labels.tolist() == list(range(26)) and data.num_classes == 26
    member = target / (ds.files["test_images"].name + ".gz")
    assert (target / (member.name + ".sha256")).is_file()
    member.write_bytes(gzip.compress(idx_bytes(arrays["test_images"][::-1].copy()), mtime=0))  # tampered
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_split(target, "test", dataset=ds)
    broken = dataclasses.replace(ds, archive=dataclasses.replace(ds.archive, md5="0" * 32))
    with pytest.raises(DataError, match="could not download gzip.zip from any mirror"):
        download(tmp_path / "other", dataset=broken)


def small_set(name: str) -> tuple:
    """(ds with its entries' shapes made those of small synthetic arrays, the arrays as read,
    the raw IDX bytes of each file as the set stores it: QMNIST's labels as int32 rows,
    EMNIST's images transposed, letters counted from 1)."""
    ds = get_dataset(name)
    (train, train_y), (test, test_y) = synthetic_digits(60, 0), synthetic_digits(20, 1)
    arrays = {"train_images": train, "train_labels": train_y, "test_images": test, "test_labels": test_y}
    stored = {}
    for key, a in arrays.items():
        if key.endswith("labels"):
            stored[key] = idx_int32(qmnist_rows(a)) if ds is QMNIST else idx_bytes(a + ds.label_offset)
        else:
            stored[key] = idx_bytes(a.transpose(0, 2, 1) if ds.transposed else a)
    shapes = {key: (len(a), 8) if ds is QMNIST and key.endswith("labels") else a.shape for key, a in arrays.items()}
    ds = dataclasses.replace(ds, files={k: dataclasses.replace(v, shape=shapes[k]) for k, v in ds.files.items()})
    return ds, arrays, stored


@pytest.mark.parametrize("name", ["kmnist", "qmnist", "emnist-digits", "emnist-letters"])
def test_raw_files_no_published_checksum_covers_are_checked_by_shape_then_by_their_recorded_sha256(
    name, tmp_path, caplog
):
    """KMNIST and QMNIST publish the MD5 of the .gz, EMNIST only that of its zip: a raw file
    must have exactly the published shape, and its SHA-256 is recorded at its first load."""
    ds, arrays, stored = small_set(name)
    folder = tmp_path / name
    folder.mkdir()
    for key, spec in ds.files.items():
        (folder / spec.name).write_bytes(stored[key])
    data = load_dataset(folder, download_missing=False, dataset=ds)
    assert torch.equal(data.train_images, torch.from_numpy(arrays["train_images"]))
    assert data.test_labels.tolist() == arrays["test_labels"].tolist()
    for key, spec in ds.files.items():
        assert (folder / (spec.name + ".sha256")).read_text() == hashlib.sha256(stored[key]).hexdigest()
        assert f"{spec.name}: no published checksum covers it as it is" in caplog.text
    caplog.clear()
    load_dataset(folder, download_missing=False, dataset=ds)  # against the records, without a word
    assert caplog.text == ""

    images = folder / ds.files["test_images"].name
    edited = bytearray(stored["test_images"])
    edited[-1] ^= 0xFF  # one pixel, the same size and shape
    images.write_bytes(edited)
    with pytest.raises(DataError, match=r"SHA-256 mismatch .* as recorded in \S*-images-idx3-ubyte.sha256\)") as info:
        load_split(folder, "test", dataset=ds)
    assert str(info.value).startswith(f"{images}: ") and "\n" not in str(info.value)
    assert f"delete it and {images.name}.sha256 and run `mnist-cnn download`" in str(info.value)

    train = folder / ds.files["train_images"].name  # no record yet, and not the published shape
    (folder / (train.name + ".sha256")).unlink()
    train.write_bytes(idx_bytes(arrays["train_images"][:59]))
    with pytest.raises(DataError, match=r"shape 59x28x28 is not the published 60x28x28") as info:
        load_split(folder, "train", dataset=ds)
    assert str(info.value).startswith(f"{train}: ") and "\n" not in str(info.value)
    assert not (folder / (train.name + ".sha256")).exists()


def test_a_raw_file_in_a_read_only_folder_is_checked_by_shape_and_says_so(tmp_path, caplog, monkeypatch):
    from mnist_cnn.data import idx as data_module

    def read_only(path, write):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(data_module, "atomic_write", read_only)
    ds, arrays, stored = small_set("kmnist")
    for key in ("test_images", "test_labels"):
        (tmp_path / ds.files[key].name).write_bytes(stored[key])
    images, _ = load_split(tmp_path, "test", dataset=ds)
    assert torch.equal(images, torch.from_numpy(arrays["test_images"]))
    assert "cannot be recorded (Read-only file system), so only its shape is checked" in caplog.text
    assert not list(tmp_path.glob("*.sha256"))


def test_where_the_published_md5_is_of_the_gz_the_gz_is_read_and_checked_before_a_raw_copy(tmp_path):
    """torchvision keeps both forms in KMNIST/raw: the .gz is the one its MD5 can check."""
    ds, arrays, stored = small_set("kmnist")
    folder = tmp_path / "kmnist"
    ds = published(folder, ds, arrays)
    for key, spec in ds.files.items():
        (folder / spec.name).write_bytes(stored[key])
    data = load_dataset(folder, download_missing=False, dataset=ds)
    assert torch.equal(data.test_images, torch.from_numpy(arrays["test_images"]))
    assert not list(folder.glob("*.sha256"))  # checked against the MD5s, nothing recorded
    gz = folder / (ds.files["test_labels"].name + ".gz")
    gz.write_bytes(gzip.compress(stored["test_labels"], mtime=7))  # the same labels, other gzip bytes
    with pytest.raises(DataError, match="MD5 mismatch"):
        load_split(folder, "test", dataset=ds)


def test_an_emnist_member_decompressed_after_extraction_is_checked_against_the_extraction_record(
    serve, tmp_path, caplog
):
    ds, arrays, _ = small_set("emnist-digits")
    source = tmp_path / "mirror"
    source.mkdir()
    md5 = emnist_zip(source / "gzip.zip", ds, arrays)
    ds = dataclasses.replace(ds, mirrors=(serve(source),), archive=dataclasses.replace(ds.archive, md5=md5))
    target = tmp_path / "emnist"
    download(target, dataset=ds)
    member = target / (ds.files["train_images"].name + ".gz")
    raw = target / ds.files["train_images"].name
    raw.write_bytes(gzip.decompress(member.read_bytes()))  # as `gunzip` leaves it, beside NAME.gz.sha256
    member.unlink()
    images, _ = load_split(target, "train", dataset=ds)
    assert torch.equal(images, torch.from_numpy(arrays["train_images"]))
    assert "no published checksum" not in caplog.text and not (target / (raw.name + ".sha256")).exists()
    raw.write_bytes(idx_bytes(arrays["train_images"][::-1].transpose(0, 2, 1).copy()))  # tampered
    with pytest.raises(DataError, match=r"SHA-256 mismatch .*recorded in .*train-images-idx3-ubyte.gz.sha256"):
        load_split(target, "train", dataset=ds)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_normalization_constants_are_the_training_sets_own(name):
    folder = real_mnist_dir() if name == "mnist" else real_fashion_dir()
    if folder is None:
        pytest.skip(f"{name} not present here")
    ds = get_dataset(name)
    images, _ = load_split(folder, "train", dataset=ds)
    x = images.double().div(255)
    assert ds.mean == pytest.approx(x.mean().item(), abs=5e-4)
    assert ds.std == pytest.approx(x.std().item(), abs=5e-4)


FASHION_TRAIN_LIMIT = 20_000  # a third of the training set: the test checks names, not accuracy


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> Path:
    """One epoch of the fashion recipe on the first FASHION_TRAIN_LIMIT images of the real Fashion-MNIST
    training set (all 60,000 are read and verified); evaluated below on the whole test set."""
    folder = real_fashion_dir()
    if folder is None:
        pytest.skip("Fashion-MNIST not in ../shared/data")
    out = tmp_path_factory.mktemp("fashion") / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "fashion",
                "--data-dir",
                str(folder),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--train-limit",
                str(FASHION_TRAIN_LIMIT),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@needs_fashion
def test_fashion_trains_and_every_command_speaks_its_class_names(fashion_run, tmp_path, capsys):
    folder = real_fashion_dir()
    final = float((fashion_run / "metrics.csv").read_text().splitlines()[-1].split(",")[5])
    assert final > 0.75  # one epoch: far above the 10% of chance
    capsys.readouterr()
    assert main(["evaluate", str(fashion_run / "last.pt"), "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "Ankle boot" in text and "T-shirt/top" in text and "/10000)" in text
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["dataset"] == "fashion-mnist" and report["per_class"][9]["name"] == "Ankle boot"
    images, labels = load_split(folder, "test", dataset=FASHION_MNIST)
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"item{i}.png")
        Image.fromarray(images[i].numpy()).save(paths[-1])
    assert main(["predict", str(fashion_run / "last.pt"), *map(str, paths), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert all(r["label"] == FASHION_MNIST.classes[r["digit"]] for r in results)
    assert sum(r["digit"] == int(y) for r, y in zip(results, labels[:10])) >= 7
    out = tmp_path / "f.onnx"
    assert main(["export", str(fashion_run / "last.pt"), "--format", "onnx", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == "test images"  # found from the run's record
    onnx = pytest.importorskip("onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["dataset"] == "fashion-mnist" and meta["classes"].split(",")[9] == "Ankle boot"
    assert (meta["normalization_mean"], meta["normalization_std"]) == ("0.286", "0.353")


@needs_fashion
def test_fashion_preprocessing_undoes_a_product_photo_layout():
    """A Fashion-MNIST item 3x larger, dark on white, off-centre on a wide canvas (a product
    photo) comes back to within a small mean difference of the original 28x28."""
    images, _ = load_split(real_fashion_dir(), "test", dataset=FASHION_MNIST)
    diffs = []
    for a in images[:20].numpy():
        assert np.allclose(preprocess(Image.fromarray(a), kind="object"), a / 255.0, atol=1e-6)  # 28x28 as is
        big = Image.fromarray(255 - a).resize((84, 84), Image.LANCZOS)
        photo = Image.new("L", (200, 150), 255)
        photo.paste(big, (90, 40))
        back = preprocess(photo.convert("RGB"), kind="object")
        diffs.append(np.abs(back - a / 255.0).mean())
    assert max(diffs) < 0.15 and float(np.mean(diffs)) < 0.07, diffs  # measured: 0.125 and 0.056


def test_an_unknown_dataset_is_a_one_line_error(capsys, tmp_path):
    assert main(["train", "--dataset", "cifar10", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'cifar10'") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert MNIST.name in err
