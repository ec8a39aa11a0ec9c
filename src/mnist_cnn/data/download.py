"""Fetching a data set's files from its mirrors: verified as they arrive, written atomically,
with a deadline per file; archives (EMNIST) are extracted and their members' SHA-256 recorded."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import BinaryIO

from mnist_cnn.data.datasets import MNIST, Dataset
from mnist_cnn.data.idx import CHUNK, SIDECAR, IdxFile, check_folder, file_md5, load_idx, missing_files
from mnist_cnn.errors import DataError
from mnist_cnn.files import atomic_path, atomic_write

log = logging.getLogger("mnist_cnn")
DOWNLOAD_TIMEOUT_S = 30.0  # per connect/read; a mirror that hangs longer is skipped
DOWNLOAD_DEADLINE_S = 600.0  # per file, whatever the mirror trickles


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
    check_folder(data_dir)  # a file where the folder should be: said as such, not as mkdir's "File exists"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data folder {data_dir}: {e.strerror}") from None
    mirrors = mirrors or dataset.mirrors
    missing = missing_files(data_dir, only or dataset.files)
    source = dataset.archive
    if source is not None and missing:
        archive = data_dir / source.name
        if not (archive.is_file() and file_md5(archive) == source.md5):
            _download_one(data_dir, source.name, mirrors, timeout, partial(_check_md5, expected=source.md5))
        return [_extract(archive, source.folder, spec, data_dir) for spec in missing]
    return [
        _download_one(data_dir, spec.name + ".gz", mirrors, timeout, partial(_verify_download, spec=spec))
        for spec in missing
    ]


def _check_md5(path: Path, expected: str) -> None:
    if file_md5(path) != expected:
        raise _SkipMirror(f"wrong bytes (MD5 {file_md5(path)[:12]}..., expected {expected[:12]}...)")


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
            # the write's own errors are said inside the block: atomic_path would make them its OutputError
            with atomic_path(target) as tmp, _writing(name, data_dir):  # renamed into place only once verified
                with open(tmp, "wb") as out:
                    _fetch(url, out, timeout)
                verify(tmp)
            log.info("downloaded %s", url)
            return target
        except _SkipMirror as e:
            log.warning("skipping %s: %s", url, e)
            failures.append(f"{url}: {e}")
    raise DataError(
        f"could not download {name} from any mirror ({len(failures)} tried). "
        f"Without network, copy the data set's files (.gz or raw) into {data_dir} "
        "or point --data-dir at a folder that has them"
    )


@contextlib.contextmanager
def _writing(name: str, data_dir: Path) -> Iterator[None]:
    """An OSError in the block is the disk's, not the network's (_fetch makes those _SkipMirror):
    a DataError, since another mirror would not help."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DataError(
                f"disk full while downloading {name} into {data_dir}: "
                "free some space and run `mnist-cnn download` again"
            ) from None
        raise DataError(f"cannot write to data folder {data_dir}: {e.strerror}") from None


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
