"""Safe file writing: a temp file in the same folder, flushed and fsynced, then
renamed over the target, so a reader never sees half a file.

    atomic_write(Path("runs/x/metrics.csv"), lambda f: f.write(text.encode()))
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """0666 minus the process umask: the mode open() would have given a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, flush + fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; the final file should look normal
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
