"""Safe file writing: a temp file in the same folder, renamed over the target only
when it is complete, so a reader never sees half a file; one writer per folder; and
never an output over an input or over a file the tool did not write.

    atomic_write(Path("runs/x/metrics.csv"), lambda f: f.write(text.encode()))
    with atomic_path(Path("model.onnx")) as tmp:   # for writers that want a path
        write_onnx(model, tmp); check(tmp)          # an exception here leaves nothing behind
    with FolderLock.take(Path("runs/x")):           # refuses while another process writes runs/x
        ...
    refuse_inputs([Path("out.csv")], [Path("a.png"), Path("b.png")])   # OutputError if out is an input
    refuse_foreign([Path("frontier.png")])          # OutputError if it exists and mnist-cnn did not write it

A write that fails on the disk's side (full, read-only, a folder in the way) is an
OutputError naming the file, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from mnist_cnn.errors import MnistCnnError, OutputError

LOCK_FILE = ".mnist-cnn.lock"  # in a folder while a process writes it; holds that process's PID
SOFTWARE = "mnist-cnn"  # the PNG "Software" text of every figure the tool draws: how it knows its own files
CARD_MARK = f"library_name: {json.dumps(SOFTWARE)}"  # in the front matter of every model card the tool writes
MARK_BYTES = 4096  # how far into a file its mark is looked for
# errors of the disk's side of a write: said in one line, naming the file
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO, errno.EISDIR}


def default_file_mode() -> int:
    """0666 minus the process umask: the mode open() would have given a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def cannot_write(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {error.strerror or error}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed over it when the block ends normally and
    deleted when it raises (or is interrupted)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; the final file should look normal
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise cannot_write(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, flush + fsync, then rename over it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# -- one writer per folder ------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive flock(2) on FOLDER/.mnist-cnn.lock: the kernel drops it when the process dies,
    so a kill -9 leaves no stale lock (the file may stay; nobody holds it). The file holds the
    holder's PID, which a refused writer names. Within one thread a folder may be taken again
    (nested writers of one command); another thread of the same process is refused like a process."""

    _held: dict[Path, "FolderLock"] = {}  # this process's locks, by resolved folder
    _guard = threading.Lock()

    def __init__(self, folder: Path, fd: int, thread: int) -> None:
        self.folder, self.fd, self.thread, self.depth = folder, fd, thread, 1

    @classmethod
    def take(cls, folder: Path) -> "FolderLock":
        key = Path(folder).resolve()
        with cls._guard:
            held = cls._held.get(key)
            if held is not None:
                if held.thread != threading.get_ident():
                    raise OutputError(f"{folder} is being written by another thread of this process")
                held.depth += 1
                return held
            lock = cls(Path(folder), grab(Path(folder)), threading.get_ident())
            cls._held[key] = lock
            return lock

    def release(self) -> None:
        with self._guard:
            self.depth -= 1
            if self.depth > 0:
                return
            self._held.pop(self.folder.resolve(), None)
            (self.folder / LOCK_FILE).unlink(missing_ok=True)  # while still held: no one can be mid-take
            os.close(self.fd)

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def grab(folder: Path) -> int:
    """The locked descriptor of folder's lock file, this PID written in it; OutputError naming the
    holder when another process has it."""
    path = folder / LOCK_FILE
    while True:
        try:  # never through a link, nor into a FIFO: a crafted folder must not make us write elsewhere or wait
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            what = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise OutputError(f"cannot write into {folder}: {path}: {what}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"cannot write into {folder}: {path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise OutputError(
                f"{folder} is being written by {who} (PID in {path}); wait for it to end or choose another folder"
            ) from None
        try:  # a holder that ended unlinks the file: ours may be that unlinked one, so lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


# -- outputs never over inputs, nor over files the tool did not write ------------------------------------------


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links, symlinks), else
    the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_inputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """OutputError when an output would replace one of the command's inputs; before anything is written."""
    inputs = list(inputs)
    for out in outputs:
        for given in inputs:
            if same_file(out, given):
                raise OutputError(f"{out} is one of this command's inputs ({given}); write the output elsewhere")


def written_by_us(path: Path) -> bool:
    """Whether `path` is a file mnist-cnn wrote: a figure with its PNG mark, a model card, an
    evaluation report. Anything else is the user's."""
    try:
        with open(path, "rb") as f:
            head = f.read(MARK_BYTES)
    except OSError:
        return False
    if path.suffix == ".png":
        return png_software(head) == SOFTWARE
    if path.suffix == ".md":
        return CARD_MARK.encode() in head
    if path.suffix == ".json":
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(report, dict) and {"confusion", "per_class", "accuracy"} <= report.keys()
    return False


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_software(data: bytes) -> str | None:
    """The "Software" tEXt of a PNG's first chunks (matplotlib writes it before the pixels)."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"tEXt" and body.startswith(b"Software\x00"):
            return body[len(b"Software\x00") :].decode("latin-1")
        if kind == b"IDAT":
            return None
        at += 12 + length
    return None


def refuse_foreign(outputs: Iterable[Path], hint: str = "") -> None:
    """OutputError when an output the user did not name exists and mnist-cnn did not write it."""
    for out in outputs:
        if out.exists() and not written_by_us(out):
            raise OutputError(f"{out} exists and was not written by mnist-cnn; it is left alone{hint}")


# -- inputs that must be regular files ----------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, for a one-line error about something that should be another kind."""
    kinds = {
        stat.S_ISREG: "a file",
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
    }
    return next((what for test, what in kinds.items() if test(mode)), "something else")


def regular_file(path: str | os.PathLike[str], error: type[MnistCnnError], noun: str) -> None:
    """error(...) unless `path` is a regular file (or a link to one), before anything reads it: a FIFO
    would make a reader wait for a writer forever, a device would be read without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {noun}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not {'an' if noun[0] in 'aeiou' else 'a'} {noun} but {file_kind(mode)}")
