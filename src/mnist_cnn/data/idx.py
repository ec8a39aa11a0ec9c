"""The IDX file format of the MNIST family: parse, bound, verify.

    images = load_idx(path, spec, verify=True)   # (N, 28, 28) uint8, checked against spec

Every load checks that no file is larger than its entry says (so a gzip bomb stops there),
the magic number, the dimensions and (unless verify=False, for your own IDX data) the SHA-256
of the decompressed bytes; a file no published checksum covers records its own at its first
load (NAME.sha256 beside it). A problem is one DataError naming the file and what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.errors import DataError
from mnist_cnn.files import atomic_write, file_kind

log = logging.getLogger("mnist_cnn")
IMAGE_SIZE = 28
NUM_CLASSES = 10
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST uses
IDX_INT32 = 0x0C  # IDX type code for big-endian int32 (QMNIST's labels)
# The IDX files of the MNIST family by number of dimensions: (type code, bytes per element).
IDX_LAYOUTS = {1: (IDX_UBYTE, 1), 3: (IDX_UBYTE, 1), 2: (IDX_INT32, 4)}  # labels, images, QMNIST's label rows
MAX_OWN_IDX_BYTES = 1 << 30  # --no-verify: your own IDX file, decompressed; still no gzip bomb
# Beside an IDX file (NAME.sha256, NAME.gz.sha256): the SHA-256 of its decompressed bytes, recorded
# where no published checksum covers the file as it is: at extraction from a verified archive, else at its first load.
CHUNK = 1 << 20  # bytes read at a time while hashing a file
SIDECAR = ".sha256"


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without ".gz"
    shape: tuple[int, ...]  # official shape
    sha256: str | None = None  # of the decompressed bytes, so it does not depend on the gzip wrapper
    md5: str | None = None  # else: of the .gz file as its publishers list it (torchvision's table)


def parse_idx(raw: bytes, source: str) -> torch.Tensor:
    """Decompressed IDX bytes -> uint8 tensor of the shape the header states."""
    if len(raw) < 4:
        raise DataError(f"{source}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or IDX_LAYOUTS.get(ndim, (None,))[0] != dtype:
        raise DataError(
            f"{source}: wrong magic number 0x{raw[:4].hex()} (expected 0x00000801 for labels, "
            "0x00000803 for images or 0x00000c02 for QMNIST labels): not an MNIST-format IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: header cut short ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header + math.prod(dims) * IDX_LAYOUTS[ndim][1]
    if len(raw) != expected:
        raise DataError(
            f"{source}: {len(raw) - header} data bytes but the header {dims} needs "
            f"{expected - header}: the file is truncated or corrupt; delete it and run `mnist-cnn download`"
        )
    if dtype == IDX_INT32:  # big-endian on disk
        return torch.from_numpy(np.frombuffer(raw, dtype=">i4", offset=header).astype(np.int64)).reshape(dims)
    if expected == header:
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(dims)  # one copy, not two


def idx_size(spec: IdxFile) -> int:
    """The bytes of the entry's file once decompressed: magic, one 4-byte size per dimension,
    then the data at its element width (QMNIST's (N, 8) label rows are int32)."""
    return 4 + 4 * len(spec.shape) + math.prod(spec.shape) * IDX_LAYOUTS[len(spec.shape)][1]


def read_bytes(path: Path, spec: IdxFile, gz: bool | None = None, limit: int | None = None) -> bytes:
    """The decompressed bytes of an IDX file: gzip when `gz` (default: the name ends in .gz).
    Anything larger than `limit` (default: what its entry says, idx_size) is not that file and is
    refused before it fills memory, however well it compresses."""
    gz = path.suffix == ".gz" if gz is None else gz
    limit = idx_size(spec) if limit is None else limit
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: file is empty; delete it and run `mnist-cnn download`")
        if not gz:
            if size > limit:
                raise DataError(f"{path}: {size:,} bytes, more than the {limit:,} of {_described(spec)}: not that file")
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            raw = f.read(limit + 1)
    except (gzip.BadGzipFile, OSError, EOFError, zlib.error) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        what = "truncated" if isinstance(e, EOFError) else "not a valid gzip file"
        raise DataError(f"{path}: {what} ({e}); delete it and run `mnist-cnn download`") from None
    if len(raw) > limit:
        raise DataError(
            f"{path}: decompresses to more than {limit:,} bytes, the size of {_described(spec)}: not that file"
        )
    return raw


def _described(spec: IdxFile) -> str:
    return f"{spec.name} ({_shape(spec.shape)})"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def find_file(data_dir: Path, spec: IdxFile) -> Path | None:
    """The entry's file in data_dir, raw or .gz; the .gz first where the published checksum is
    the MD5 of the .gz, since only the .gz can be checked against it. A data_dir that cannot be
    read, or is not a folder, is a DataError: not "missing" files that a download would not fix."""
    check_folder(data_dir)
    for name in (spec.name + ".gz", spec.name) if spec.md5 else (spec.name, spec.name + ".gz"):
        try:
            if (data_dir / name).is_file():
                return data_dir / name
        except OSError as e:  # is_file() is False for a missing file; this is the folder refusing to be read
            raise DataError(f"{data_dir}: cannot read the data folder ({e.strerror})") from None
    return None


def check_folder(data_dir: Path) -> None:
    """Nothing when data_dir is a folder or does not exist yet (a download makes it); else a DataError."""
    try:
        mode = data_dir.stat().st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise DataError(
            f"{data_dir}: cannot be the data folder: a file is where one of its parent folders should be"
        ) from None
    except OSError as e:
        raise DataError(f"{data_dir}: cannot read the data folder ({e.strerror})") from None
    if not stat.S_ISDIR(mode):
        raise DataError(f"{data_dir}: not a folder but {file_kind(mode)}; the data folder holds the data set's files")


def load_idx(path: Path, spec: IdxFile, verify: bool, gz: bool | None = None) -> torch.Tensor:
    gz = path.suffix == ".gz" if gz is None else gz
    # your own IDX data (--no-verify) may hold more images than the published set: a looser bound
    raw = read_bytes(path, spec, gz, None if verify else max(idx_size(spec), MAX_OWN_IDX_BYTES))
    tensor = parse_idx(raw, str(path))
    if tensor.dim() != len(spec.shape):
        kind = "images" if len(spec.shape) == 3 else "labels"
        raise DataError(f"{path}: has {tensor.dim()} dimensions, expected {kind} with {len(spec.shape)}")
    if verify:
        verify_file(path, raw, spec, gz, tuple(tensor.shape))
    return tensor


def verify_file(path: Path, raw: bytes, spec: IdxFile, gz: bool, shape: tuple[int, ...]) -> None:
    """The file's checksum against the table: the SHA-256 of the decompressed bytes where it is
    known, else the MD5 of a .gz as published, else (a raw KMNIST or QMNIST file; EMNIST) the
    SHA-256 recorded beside it (SIDECAR). Where there is no record yet, the file must have
    exactly its published shape, and its SHA-256 is recorded for every later load."""
    where = also = ""
    if spec.sha256:
        what, digest, expected = "SHA-256", hashlib.sha256(raw).hexdigest(), spec.sha256
    elif spec.md5 and gz:
        what, digest, expected = "MD5", file_md5(path), spec.md5
    else:
        what, digest = "SHA-256", hashlib.sha256(raw).hexdigest()
        record = next((r for r in _records(path, spec) if r.is_file()), None)
        if record is None:
            _record_first_load(path, spec, shape, digest)
            return
        expected, where, also = _read_record(path, record), f" as recorded in {record.name}", f" and {record.name}"
    if digest != expected:
        raise DataError(
            f"{path}: {what} mismatch (got {digest[:12]}..., expected {expected[:12]}...{where}): "
            f"the file is corrupt or not the official one; delete it{also} and run `mnist-cnn download` "
            "(or pass --no-verify for your own IDX data)"
        )


def _records(path: Path, spec: IdxFile) -> list[Path]:
    """Where the SHA-256 of the entry's decompressed bytes may be recorded: beside this file,
    then beside its other form (a member extracted as .gz, since decompressed)."""
    names = [path.name] + [n for n in (spec.name, spec.name + ".gz") if n != path.name]
    return [path.with_name(n + SIDECAR) for n in names]


def _read_record(path: Path, record: Path) -> str:
    try:
        return record.read_text().strip()
    except OSError as e:
        raise DataError(f"{path}: cannot read its recorded SHA-256 {record.name} ({e.strerror})") from None


def _record_first_load(path: Path, spec: IdxFile, shape: tuple[int, ...], digest: str) -> None:
    """A file that no published checksum covers as it is: checked by its shape, then its
    SHA-256 recorded beside it, so that a later change to it is caught."""
    if shape != spec.shape:
        raise DataError(
            f"{path}: shape {_shape(shape)} is not the published {_shape(spec.shape)}, and no published checksum "
            "covers this file as it is; use the published file, or pass --no-verify for your own IDX data"
        )
    why = "the published MD5 is of the .gz" if spec.md5 else "only the archive's MD5 is published"
    record = path.with_name(path.name + SIDECAR)
    try:
        atomic_write(record, lambda f: f.write(digest.encode()))
    except OSError as e:
        log.warning(
            "%s: no published checksum covers it as it is (%s); it has the published shape, and its "
            "SHA-256 cannot be recorded (%s), so only its shape is checked",
            path,
            why,
            e.strerror,
        )
        return
    log.warning(
        "%s: no published checksum covers it as it is (%s); it has the published shape, and its SHA-256 "
        "is now recorded in %s: later loads check against that",
        path,
        why,
        record.name,
    )


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def missing_files(data_dir: Path, files: dict[str, IdxFile]) -> list[IdxFile]:
    return [spec for spec in files.values() if find_file(data_dir, spec) is None]
