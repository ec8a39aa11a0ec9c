"""Every data set of the table at its published size: its four files load, as .gz and raw,
and a file one record larger than its entry says is refused with one line. The files are
zeros (labels: the first class) streamed through gzip, or sparse when raw, so a 188 MB EMNIST
file is under a megabyte here."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import struct
import zlib
from pathlib import Path

import pytest

from mnist_cnn.cli import main
from mnist_cnn.data.datasets import DATASETS
from mnist_cnn.data.splits import load_dataset, load_split
from mnist_cnn.errors import DataError

STREAM_CHUNK = 1 << 24  # bytes handed to zlib at a time: the whole file is never built


def width(shape: tuple[int, ...]) -> int:
    """Bytes per element: 2-D files are QMNIST's int32 label rows, the others unsigned bytes."""
    return 4 if len(shape) == 2 else 1


def idx_header(shape: tuple[int, ...]) -> bytes:
    code = 0x0C if width(shape) == 4 else 0x08
    return struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


@functools.lru_cache(maxsize=None)
def full_gz(shape: tuple[int, ...], fill: int) -> tuple[bytes, str]:
    """(gzip of an IDX file of `shape` whose every element is `fill`, SHA-256 of its
    decompressed bytes); shared by the sets whose files have the same shape."""
    header = idx_header(shape)
    stream = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: the gzip wrapper
    sha = hashlib.sha256(header)
    parts = [stream.compress(header)]
    block = fill.to_bytes(width(shape), "big") * (STREAM_CHUNK // width(shape))
    left = math.prod(shape) * width(shape)
    while left:
        piece = block[: min(left, STREAM_CHUNK)]
        sha.update(piece)
        parts.append(stream.compress(piece))
        left -= len(piece)
    parts.append(stream.flush())
    return b"".join(parts), sha.hexdigest()


def one_more(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One more image, label or label row than the entry has."""
    return (shape[0] + 1, *shape[1:])


def write_full_size(folder: Path, ds):
    """ds's four files at their published shapes in folder, as .gz; returns ds with checksums
    of these files of the kind its table holds (EMNIST: the record beside each, as extracted)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, spec in ds.files.items():
        fill = ds.label_offset if key.endswith("labels") else 0  # a valid class: letters count from 1
        blob, sha = full_gz(spec.shape, fill)
        path = folder / (spec.name + ".gz")
        path.write_bytes(blob)
        if spec.sha256:
            files[key] = dataclasses.replace(spec, sha256=sha)
        elif spec.md5:
            files[key] = dataclasses.replace(spec, md5=hashlib.md5(blob).hexdigest())
        else:
            (folder / (path.name + ".sha256")).write_text(sha)
            files[key] = spec
    return dataclasses.replace(ds, files=files)


def write_raw(path: Path, shape: tuple[int, ...], fill: int) -> None:
    """An uncompressed IDX file of `shape` filled with `fill`; sparse where the fill is 0."""
    with open(path, "wb") as f:
        f.write(idx_header(shape))
        if fill:
            f.write(fill.to_bytes(width(shape), "big") * math.prod(shape))
        else:
            f.truncate(f.tell() + math.prod(shape) * width(shape))


def assert_published_shapes(data, ds) -> None:
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        assert images.shape == ds.files[f"{split}_images"].shape
        assert labels.shape == ds.files[f"{split}_labels"].shape[:1] and int(labels.max()) == 0


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_data_set_loads_at_its_published_size_and_not_one_record_more(name, tmp_path, capsys):
    folder = tmp_path / name
    ds = write_full_size(folder, DATASETS[name])
    assert_published_shapes(load_dataset(folder, download_missing=False, dataset=ds), ds)
    for key, spec in ds.files.items():
        path = folder / (spec.name + ".gz")
        kept = path.read_bytes()
        path.write_bytes(full_gz(one_more(spec.shape), 0)[0])
        if key == "train_images":  # as a user meets it: one line on stderr, exit 2, no run folder
            out = tmp_path / "run"
            assert (
                main(
                    [
                        "train",
                        "--dataset",
                        name,
                        "--data-dir",
                        str(folder),
                        "--out",
                        str(out),
                        "--device",
                        "cpu",
                        "--no-progress",
                    ]
                )
                == 2
            )
            err = capsys.readouterr().err
            assert err.startswith(f"error: {path}: decompresses to more than") and err.count("\n") == 1, err
            assert not out.exists()
        else:
            with pytest.raises(DataError, match=r"decompresses to more than [\d,]+ bytes") as info:
                load_split(folder, key.split("_")[0], dataset=ds)
            assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
        path.write_bytes(kept)

    for key, spec in ds.files.items():  # the same files uncompressed (KMNIST, QMNIST, EMNIST: checked by shape)
        for old in folder.glob(spec.name + ".gz*"):
            old.unlink()
        write_raw(folder / spec.name, spec.shape, ds.label_offset if key.endswith("labels") else 0)
    assert_published_shapes(load_dataset(folder, download_missing=False, dataset=ds), ds)
    for key, spec in ds.files.items():
        raw = folder / spec.name
        write_raw(raw, one_more(spec.shape), 0)  # refused by its size alone, before it is read
        with pytest.raises(DataError, match=r"bytes, more than the [\d,]+ of") as info:
            load_split(folder, key.split("_")[0], dataset=ds)
        assert str(info.value).startswith(f"{raw}: ") and "\n" not in str(info.value)
        write_raw(raw, spec.shape, ds.label_offset if key.endswith("labels") else 0)
