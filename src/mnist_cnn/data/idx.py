"""MNIST on disk: find, download, validate and parse the four IDX files.

    data_dir = resolve_data_dir(None)         # --data-dir, $MNIST_CNN_DATA or the cache
    mnist = load_dataset(data_dir)              # downloads what is missing, then verifies
    mnist.train_images                        # (60000, 28, 28) uint8
    mnist.train_labels                        # (60000,) uint8
    data = to_device(mnist, device, val_size=5000)   # on the device, validation split carved out

Every load checks that no file is larger than its entry in the table says (so
a gzip bomb stops there), the magic number, the dimensions, that images and labels
agree in count, that labels are 0..9 and (unless verify=False, for your own
IDX data) the SHA-256 of the decompressed bytes against FILES below. A problem
is one DataError whose message names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from mnist_cnn.errors import ConfigError, DataError
from mnist_cnn.files import atomic_path, atomic_write

log = logging.getLogger("mnist_cnn")

IMAGE_SIZE = 28
NUM_CLASSES = 10
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST uses
IDX_INT32 = 0x0C  # IDX type code for big-endian int32 (QMNIST's labels)
# The IDX files of the MNIST family by number of dimensions: (type code, bytes per element).
IDX_LAYOUTS = {1: (IDX_UBYTE, 1), 3: (IDX_UBYTE, 1), 2: (IDX_INT32, 4)}  # labels, images, QMNIST's label rows
MAX_OWN_IDX_BYTES = 1 << 30  # --no-verify: your own IDX file, decompressed; still no gzip bomb
VAL_SPLIT_SEED = 12345  # fixed, so every run and seed holds out the same validation images
DOWNLOAD_TIMEOUT_S = 30.0  # per connect/read; a mirror that hangs longer is skipped
DOWNLOAD_DEADLINE_S = 600.0  # per file, whatever the mirror trickles
CHUNK = 1 << 20

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Beside an IDX file (NAME.sha256, NAME.gz.sha256): the SHA-256 of its decompressed bytes, recorded
# where no published checksum covers the file as it is: at extraction from a verified archive, else at its first load.
SIDECAR = ".sha256"


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without ".gz"
    shape: tuple[int, ...]  # official shape
    sha256: str | None = None  # of the decompressed bytes, so it does not depend on the gzip wrapper
    md5: str | None = None  # else: of the .gz file as its publishers list it (torchvision's table)
    # neither: a member of a verified archive, checked against the SHA-256 recorded at extraction


@dataclass(frozen=True)
class Archive:
    """One download that holds the IDX files (EMNIST's zip)."""

    name: str  # file name on the mirrors
    md5: str  # as its publishers list it
    folder: str  # the members' folder inside it


@dataclass(frozen=True)
class Dataset:
    """An MNIST-format data set: its files, where to get them, and what its labels mean.
    datasets.py holds the table; MNIST, the default, is here."""

    name: str
    files: dict[str, IdxFile]  # "train_images", "train_labels", "test_images", "test_labels" -> IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: float  # of the training images scaled to [0, 1]: the normalization
    std: float
    label_offset: int = 0  # subtracted from the stored labels (EMNIST letters count from 1)
    transposed: bool = False  # EMNIST stores each image transposed
    archive: Archive | None = None
    preprocessing: str = "handwriting"  # how `predict` prepares people's images: handwriting | object
    licence: str = ""
    source: str = ""  # the publisher's page

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# Checksums are data: checked on every load, not only after a download.
FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte", (60000, 28, 28), "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte", (60000,), "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte", (10000, 28, 28), "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte", (10000,), "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}


MNIST = Dataset(
    "mnist",
    FILES,
    MIRRORS,
    tuple(str(d) for d in range(10)),
    0.1307,
    0.3081,
    licence="CC BY-SA 3.0",
    source="Yann LeCun, Corinna Cortes, Christopher J.C. Burges",
)


@dataclass
class Splits:
    """The data set as tensors: uint8 images; labels uint8 as read, int64 once on the
    training device (to_device), where a validation split may be carved out."""

    train_images: torch.Tensor  # (N, 28, 28) uint8
    train_labels: torch.Tensor  # (N,)
    test_images: torch.Tensor | None  # (M, 28, 28) uint8; None when the run never reads the test set (tune)
    test_labels: torch.Tensor | None  # (M,)
    num_classes: int = NUM_CLASSES  # the data set's, not the labels' maximum: it flows into the model
    val_images: torch.Tensor | None = None  # (V, 28, 28) uint8, carved from the training set
    val_labels: torch.Tensor | None = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_images.shape[0] / batch_size)


def to_device(
    mnist: Splits, device: torch.device, train_limit: int = 0, val_size: int = 0, batch_size: int = 1
) -> Splits:
    """The data set on `device`: the first train_limit training images (0 = all), of which
    the last val_size of a fixed permutation are held out for validation."""
    images, labels = mnist.train_images, mnist.train_labels
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    val_images = val_labels = None
    if val_size:
        if val_size >= images.shape[0]:
            raise ConfigError(f"val_size {val_size} leaves no training images (there are {images.shape[0]})")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        keep, held = order[:-val_size].sort().values, order[-val_size:].sort().values
        val_images, val_labels = images[held].to(device), labels[held].long().to(device)
        images, labels = images[keep], labels[keep]
    if batch_size > images.shape[0]:
        raise ConfigError(f"batch_size {batch_size} is larger than the {images.shape[0]} training images")
    test_images = None if mnist.test_images is None else mnist.test_images.to(device)
    test_labels = None if mnist.test_labels is None else mnist.test_labels.long().to(device)
    return Splits(
        images.to(device), labels.long().to(device), test_images, test_labels, mnist.num_classes, val_images, val_labels
    )


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None, recorded: str | os.PathLike[str] | None = None, dataset: str = "mnist"
) -> Path:
    """--data-dir, else $MNIST_CNN_DATA (MNIST only), else `recorded` (the folder a checkpoint's
    run trained from) when it still exists, else the cache: $XDG_CACHE_HOME/mnist-cnn or
    ~/.cache/mnist-cnn for MNIST, a sub-folder named after the data set for the others."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MNIST_CNN_DATA") and dataset == MNIST.name:  # the variable names MNIST's folder
        return Path(os.environ["MNIST_CNN_DATA"]).expanduser()
    if recorded and Path(recorded).expanduser().is_dir():
        return Path(recorded).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-cnn"
    return cache if dataset == MNIST.name else cache / dataset


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
    the MD5 of the .gz, since only the .gz can be checked against it."""
    for name in (spec.name + ".gz", spec.name) if spec.md5 else (spec.name, spec.name + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


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
        what, digest, expected = "MD5", _md5(path), spec.md5
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


def split_files(split: str, files: dict[str, IdxFile]) -> dict[str, IdxFile]:
    """The two entries of `files` that make up "train" or "test"."""
    return {key: files[key] for key in (f"{split}_images", f"{split}_labels")}


def has_split(data_dir: Path, split: str, dataset: Dataset = MNIST) -> bool:
    return not missing_files(data_dir, split_files(split, dataset.files))


def load_split(
    data_dir: Path,
    split: str,
    verify: bool = True,
    dataset: Dataset = MNIST,
    download_missing: bool = False,
    mirrors: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) int64 from 0) of "train" or "test"; reads (and,
    when asked, downloads) only that split's two files."""
    files = split_files(split, dataset.files)
    if download_missing and missing_files(data_dir, files):
        download(data_dir, mirrors, dataset=dataset, only=files)
    img_spec, lbl_spec = files[f"{split}_images"], files[f"{split}_labels"]
    paths = []
    for spec in (img_spec, lbl_spec):
        path = find_file(data_dir, spec)
        if path is None:
            raise DataError(
                f"{data_dir / spec.name}.gz not found: run `mnist-cnn download --dataset {dataset.name} "
                f"--data-dir {data_dir}`, or copy the four {dataset.name} files (.gz or raw) there"
            )
        paths.append(path)
    images = load_idx(paths[0], img_spec, verify)
    labels = load_idx(paths[1], lbl_spec, verify)
    if labels.dim() == 2:  # QMNIST: one row of metadata per image, the class in column 0
        labels = labels[:, 0]
    labels = labels.long() - dataset.label_offset
    if dataset.transposed:  # EMNIST: stored column by column
        images = images.transpose(1, 2).contiguous()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < dataset.num_classes:
        bad = int(labels.max()) if int(labels.max()) >= dataset.num_classes else int(labels.min())
        raise DataError(
            f"{paths[1]}: label {bad + dataset.label_offset} is not one of the "
            f"{dataset.num_classes} classes of {dataset.name}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{paths[0]}: holds no images")
    return images, labels


def missing_files(data_dir: Path, files: dict[str, IdxFile]) -> list[IdxFile]:
    return [spec for spec in files.values() if find_file(data_dir, spec) is None]


def load_dataset(
    data_dir: Path,
    verify: bool = True,
    download_missing: bool = True,
    mirrors: tuple[str, ...] | None = None,
    dataset: Dataset = MNIST,
    test: bool = True,
) -> Splits:
    """Both splits of `dataset` (MNIST unless told otherwise); test=False: the training split only,
    the test files not even opened."""
    train_images, train_labels = load_split(data_dir, "train", verify, dataset, download_missing, mirrors)
    test_images = test_labels = None
    if test:
        test_images, test_labels = load_split(data_dir, "test", verify, dataset, download_missing, mirrors)
    return Splits(train_images, train_labels, test_images, test_labels, dataset.num_classes)


def download(
    data_dir: Path,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    dataset: Dataset = MNIST,
    only: dict[str, IdxFile] | None = None,
) -> list[Path]:
    """Fetch every missing file of `dataset` (or of `only`), verify it, and only then give it its
    final name. A data set that comes as one archive is fetched whole, verified, and the
    missing members extracted."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data folder {data_dir}: {e.strerror}") from None
    mirrors = mirrors or dataset.mirrors
    missing = missing_files(data_dir, only or dataset.files)
    source = dataset.archive
    if source is not None and missing:
        archive = data_dir / source.name
        if not (archive.is_file() and _md5(archive) == source.md5):
            _download_one(data_dir, source.name, mirrors, timeout, partial(_check_md5, expected=source.md5))
        return [_extract(archive, source.folder, spec, data_dir) for spec in missing]
    return [
        _download_one(data_dir, spec.name + ".gz", mirrors, timeout, partial(_verify_download, spec=spec))
        for spec in missing
    ]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    if _md5(path) != expected:
        raise _SkipMirror(f"wrong bytes (MD5 {_md5(path)[:12]}..., expected {expected[:12]}...)")


def _extract(archive: Path, folder: str, spec: IdxFile, data_dir: Path) -> Path:
    """One member of a verified archive -> data_dir, with the SHA-256 of its decompressed
    bytes recorded beside it, so that every later load can check it."""
    target = data_dir / (spec.name + ".gz")
    try:
        with zipfile.ZipFile(archive) as z:
            member = z.read(folder + spec.name + ".gz")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(
            f"{archive}: cannot extract {spec.name}.gz ({e}); delete it and run `mnist-cnn download`"
        ) from None
    digest = hashlib.sha256(gzip.decompress(member)).hexdigest()
    atomic_write(target, lambda f: f.write(member))
    atomic_write(data_dir / (target.name + SIDECAR), lambda f: f.write(digest.encode()))
    log.info("extracted %s from %s", target.name, archive.name)
    return target


def _download_one(
    data_dir: Path, name: str, mirrors: tuple[str, ...], timeout: float, verify: Callable[[Path], None]
) -> Path:
    """mirror + name for each mirror in turn, until one gives a file that verify() accepts."""
    target = data_dir / name
    failures = []
    for mirror in mirrors:
        url = mirror + name
        try:
            with atomic_path(target) as tmp:  # renamed into place only once verified
                with open(tmp, "wb") as out:
                    _fetch(url, out, timeout)
                verify(tmp)
            log.info("downloaded %s", url)
            return target
        except _SkipMirror as e:
            log.warning("skipping %s: %s", url, e)
            failures.append(f"{url}: {e}")
        except OSError as e:  # writing, not the network: another mirror would not help
            if e.errno == errno.ENOSPC:
                raise DataError(
                    f"disk full while downloading {name} into {data_dir}: "
                    "free some space and run `mnist-cnn download` again"
                ) from None
            raise DataError(f"cannot write to data folder {data_dir}: {e.strerror}") from None
    raise DataError(
        f"could not download {name} from any mirror ({len(failures)} tried). "
        f"Without network, copy the data set's files (.gz or raw) into {data_dir} "
        "or point --data-dir at a folder that has them"
    )


class _SkipMirror(Exception):
    pass


def _fetch(url: str, out: BinaryIO, timeout: float) -> None:
    """Copy url into the open file `out`. Every network failure, at any point of the
    transfer, becomes _SkipMirror; a failure to write (disk full) is the caller's."""
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    with _network():
        resp = urllib.request.urlopen(url, timeout=timeout)
    with resp:
        ctype = resp.headers.get("Content-Type", "")
        if "html" in ctype.lower():
            raise _SkipMirror(f"answered an HTML page ({ctype})")
        while True:
            with _network():
                chunk = resp.read(CHUNK)
            if not chunk:
                return
            out.write(chunk)
            if time.monotonic() > deadline:
                raise _SkipMirror(f"took longer than {DOWNLOAD_DEADLINE_S:.0f} s")


@contextlib.contextmanager
def _network() -> Iterator[None]:
    """Network errors inside the block -> _SkipMirror with a short reason."""
    try:
        yield
    except urllib.error.HTTPError as e:
        raise _SkipMirror(f"HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise _SkipMirror(f"unreachable ({e.reason})") from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # resets, timeouts, SSL, bad responses
        raise _SkipMirror(f"{type(e).__name__}: {e}") from None


def _verify_download(path: Path, spec: IdxFile) -> None:
    try:
        load_idx(path, spec, verify=spec.sha256 is not None or spec.md5 is not None, gz=True)
    except DataError as e:
        raise _SkipMirror(f"wrong bytes ({str(e).split(': ', 1)[-1][:80]})") from None
