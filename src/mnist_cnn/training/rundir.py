"""The run folder: the one place that writes a run's files.

    run = RunDir.create(Path("runs/x"))        # a new or empty folder, locked; refuses anything else
    run.write_start(cfg, device, summary_text)
    run.end_epoch(ckpt)                         # last.pt, then metrics.csv from its rows
    run.save_figure("curves.png", draw)         # figures drawn from those files
    run.close()                                 # another process may write it now

Layout: config.toml, environment.json, summary.txt, samples.png, metrics.csv,
last.pt, best.pt (only with a validation split), curves.png. Every file is
written to a temp file and renamed, so a crash never leaves half a file; the
one exception is TensorBoard's event files (training.tensorboard, run.tensorboard), which
TensorBoard's own writer appends to in place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from mnist_cnn.checkpoint import BEST_FILE, LAST_FILE, Checkpoint
from mnist_cnn.config import Config, dump_toml
from mnist_cnn.device import describe
from mnist_cnn.errors import MnistCnnError, OutputError
from mnist_cnn.files import LOCK_FILE, FolderLock, atomic_write

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
TEST_COLUMNS = ["test_loss", "test_acc"]  # absent when the run never reads the test set (run.test = false)
VAL_COLUMNS = ["val_loss", "val_acc"]  # present only when the run holds out a validation split
RUN_FILES = ("metrics.csv", LAST_FILE)  # a folder with either already holds a run
# every file a run folder may hold (with evaluate's and the card): an export is never written over one
RUN_LAYOUT = (
    "config.toml",
    "environment.json",
    "summary.txt",
    "samples.png",
    "metrics.csv",
    LAST_FILE,
    BEST_FILE,
    "curves.png",
    "evaluation.json",
    "confusion.png",
    "mistakes.png",
    "MODEL_CARD.md",
    "network_source.py",
)
FILES_NAMED = 3  # of a folder's files, in the message that refuses it
TENSORBOARD_FILES = "events.out.tfevents.*"  # TensorBoard's writer names its files so, in the run folder
MAX_SAME_NAME = 1000  # default run folders started in the same second: runs/<time>, runs/<time>-2, ...


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def git_revision() -> str:
    """Commit of the source tree this code runs from, with '+dirty' if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    import numpy

    from mnist_cnn.version import __version__

    return {
        "mnist_cnn": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": str(device),
        "device_name": describe(device),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def metrics_csv(rows: list[dict]) -> str:
    columns = METRIC_COLUMNS + (VAL_COLUMNS if rows and "val_acc" in rows[0] else [])
    if rows and "test_acc" not in rows[0]:
        columns = [c for c in columns if c not in TEST_COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv -> rows with numbers parsed; a malformed file is a one-line error."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        parsed = [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in rows]
    except FileNotFoundError:
        raise MnistCnnError(f"{path}: not found; is this a run folder?") from None
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as e:
        raise MnistCnnError(f"{path}: not a metrics file written by mnist-cnn ({e})") from None
    missing = [c for c in METRIC_COLUMNS if rows and c not in rows[0] and c not in TEST_COLUMNS]
    if missing or not rows:
        raise MnistCnnError(f"{path}: no epochs, or missing columns {missing}")
    return parsed


@contextmanager
def held(folder: Path) -> Iterator["RunDir"]:
    """A folder held for writing a few files (evaluate's report, plot's curves): made when missing,
    and removed again if it is still empty at the end (the work failed before writing)."""
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write into {folder}: {e.strerror}") from None
    run = RunDir.open(folder)
    try:
        yield run
    finally:
        run.close()
        if made and not any(folder.iterdir()):
            folder.rmdir()


class RunDir:
    """A run folder held by this process: an OS lock (files.FolderLock) from create()/open() until
    close(), so a second writer -- train, --resume, a seed of --seeds, a tune trial, evaluate --
    is refused, naming this process's PID. A new run takes only a new or empty folder."""

    def __init__(self, path: Path, created: bool = False, lock: FolderLock | None = None) -> None:
        self.path = Path(path)
        self.created = created  # made by this process: abandon() may remove it
        self.lock = lock
        self.written: list[Path] = []  # files this process created (not replaced): abandon() removes these

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        """A new run in `path`: a folder made now, or an empty one; a folder holding a run or anything
        else is refused in one line."""
        path = Path(path)
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            if not path.is_dir():
                raise OutputError(f"{path} is a file; give --out a folder") from None
            created = False
            if not any((path / name).exists() for name in RUN_FILES):  # not a run's: before the lock file,
                cls(path).check_empty()  # so that a folder of someone else's gets nothing written
        except OSError as e:
            raise OutputError(f"cannot create run folder {path}: {e.strerror}") from None
        run = cls(path, created, FolderLock.take(path))
        try:
            run.check_empty()
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def create_unique(cls, path: Path) -> "RunDir":
        """A new folder at `path`, or at path-2, path-3, ... when another run (started in
        the same second, say) already took it. mkdir is atomic, so two processes never share one."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create run folder {path}: {e.strerror}") from None
        for n in range(1, MAX_SAME_NAME + 1):
            candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"cannot create run folder {candidate}: {e.strerror}") from None
            return cls(candidate, True, FolderLock.take(candidate))
        raise MnistCnnError(f"{path} and {MAX_SAME_NAME - 1} numbered variants exist already; choose --out")

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run folder, held for writing (--resume, evaluate, plot)."""
        path = Path(path)
        if not path.is_dir():
            raise MnistCnnError(f"{path}: no such run folder")
        return cls(path, False, FolderLock.take(path))

    def check_empty(self) -> None:
        names = sorted(name for name in os.listdir(self.path) if name != LOCK_FILE)
        if any(name in RUN_FILES for name in names):
            raise OutputError(
                f"{self.path} already holds a run; use --resume {self.path} to continue it, or choose another --out"
            )
        if names:
            shown = ", ".join(names[:FILES_NAMED]) + (", ..." if len(names) > FILES_NAMED else "")
            raise OutputError(
                f"{self.path} holds files that are not a run ({shown}); a new run needs a new or empty "
                "folder: choose another --out"
            )

    def close(self) -> None:
        """Let go of the folder: another process may write it now."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file(self, name: str) -> Path:
        return self.path / name

    def _write(self, name: str, write) -> None:
        path = self.file(name)
        new = not path.exists()
        atomic_write(path, write)
        if new:
            self.written.append(path)

    def write_config(self, cfg: Config) -> None:
        self._write("config.toml", lambda f: f.write(dump_toml(cfg).encode()))

    def write_start(self, cfg: Config, device: torch.device, summary: str) -> None:
        self.write_config(cfg)
        self.write_environment(device)
        self._write("summary.txt", lambda f: f.write(summary.encode()))

    def write_environment(self, device: torch.device) -> None:
        """environment.json: this session's; a resumed run keeps the earlier sessions' under "earlier"."""
        env = environment(device)
        try:
            before = json.loads(self.file("environment.json").read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            env["earlier"] = [*before.pop("earlier", []), before]
        text = json.dumps(env, indent=2) + "\n"
        self._write("environment.json", lambda f: f.write(text.encode()))

    def write_text(self, name: str, text: str) -> None:
        self._write(name, lambda f: f.write(text.encode()))

    def copy_source(self, source: Path, name: str) -> None:
        """A copy of the network's source file: the checkpoint records only its reference."""
        data = Path(source).read_bytes()
        self._write(name, lambda f: f.write(data))

    def _save_checkpoint(self, name: str, ckpt: Checkpoint) -> None:
        # serialized in memory first: torch.save into a file on a full disk fails with an unreadable
        # RuntimeError, a plain write with ENOSPC (files.atomic_path says it in one line)
        buf = io.BytesIO()
        ckpt.write(buf)
        self._write(name, lambda f: f.write(buf.getbuffer()))

    def save_last(self, ckpt: Checkpoint) -> None:
        self._save_checkpoint(LAST_FILE, ckpt)

    def end_epoch(self, ckpt: Checkpoint, best: bool = False) -> None:
        """Checkpoint first, then the metrics it holds: metrics.csv never runs ahead of last.pt."""
        self.save_last(ckpt)
        if best:
            self._save_checkpoint(BEST_FILE, ckpt)
        text = metrics_csv(ckpt.metrics)
        self._write("metrics.csv", lambda f: f.write(text.encode()))

    def save_figure(self, name: str, draw) -> None:
        self._write(name, draw)

    def write_evaluation(self, report: dict[str, Any]) -> None:
        """evaluation.json: what `mnist-cnn evaluate` writes, here from the final epoch's own test pass."""
        text = json.dumps(report, indent=1)
        self._write("evaluation.json", lambda f: f.write(text.encode()))

    def checkpoint_note(self) -> str:
        """What a message about this run's checkpoint may truthfully say."""
        if self.file(LAST_FILE).is_file():
            return f"its last checkpoint, {self.file(LAST_FILE)}, is intact"
        return "no checkpoint was written"

    def abandon(self) -> None:
        """Remove what this process created (a run that never finished an epoch): its files, TensorBoard's
        event files (the folder was empty when the run took it), and the folder if this process made it."""
        made = [*self.written, *self.path.glob(TENSORBOARD_FILES)]
        for path in made:
            path.unlink(missing_ok=True)
        if self.created and self.path.is_dir() and not any(n != LOCK_FILE for n in os.listdir(self.path)):
            self.close()
            try:
                self.path.rmdir()
            except OSError:  # another process took the folder the moment the lock was gone: it is theirs now
                pass
