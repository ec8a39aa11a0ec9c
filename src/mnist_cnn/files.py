"""Safe file writing: a temp file in the same folder, renamed over the target only
when it is complete, so a reader never sees half a file.

    atomic_write(Path("runs/x/metrics.csv"), lambda f: f.write(text.encode()))
    with atomic_path(Path("model.onnx")) as tmp:   # for writers that want a path
        write_onnx(model, tmp); check(tmp)          # an exception here leaves nothing behind
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def default_file_mode() -> int:
    """0666 minus the process umask: the mode open() would have given a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed over it when the block ends normally and
    deleted when it raises (or is interrupted)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; the final file should look normal
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, flush + fsync, then rename over it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
