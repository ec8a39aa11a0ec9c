"""The run folder: the one place that writes a run's files.

    run = RunDir.create(Path("runs/x"))        # refuses a folder that already holds a run
    run.write_start(cfg, device, summary_text)
    run.end_epoch(ckpt)                         # last.pt, then metrics.csv from its rows
    run.save_figure("curves.png", draw)         # figures drawn from those files

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
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnist_cnn.config import Config, dump_toml
from mnist_cnn.device import describe
from mnist_cnn.errors import MnistCnnError
from mnist_cnn.files import atomic_write

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
TEST_COLUMNS = ["test_loss", "test_acc"]  # absent when the run never reads the test set (run.test = false)
VAL_COLUMNS = ["val_loss", "val_acc"]  # present only when the run holds out a validation split
RUN_FILES = ("metrics.csv", "last.pt")  # a folder with either already holds a run
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

    from mnist_cnn import __version__

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


class RunDir:
    def __init__(self, path: Path, created: bool = False) -> None:
        self.path = Path(path)
        self.created = created  # made by this process: abandon() may remove it
        self.written: list[Path] = []

    @classmethod
    def create(cls, path: Path) -> "RunDir":
        path = Path(path)
        if any((path / name).exists() for name in RUN_FILES):
            raise MnistCnnError(
                f"{path} already holds a run; use --resume {path} to continue it, or choose another --out"
            )
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MnistCnnError(f"cannot create run folder {path}: {e.strerror}") from None
        return cls(path, created)

    @classmethod
    def create_unique(cls, path: Path) -> "RunDir":
        """A new folder at `path`, or at path-2, path-3, ... when another run (started in
        the same second, say) already took it. mkdir is atomic, so two processes never share one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, MAX_SAME_NAME + 1):
            candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise MnistCnnError(f"cannot create run folder {candidate}: {e.strerror}") from None
            return cls(candidate, created=True)
        raise MnistCnnError(f"{path} and {MAX_SAME_NAME - 1} numbered variants exist already; choose --out")

    def file(self, name: str) -> Path:
        return self.path / name

    def _write(self, name: str, write) -> None:
        atomic_write(self.file(name), write)
        self.written.append(self.file(name))

    def write_config(self, cfg: Config) -> None:
        self._write("config.toml", lambda f: f.write(dump_toml(cfg).encode()))

    def write_start(self, cfg: Config, device: torch.device, summary: str) -> None:
        self.write_config(cfg)
        env = json.dumps(environment(device), indent=2) + "\n"
        self._write("environment.json", lambda f: f.write(env.encode()))
        self._write("summary.txt", lambda f: f.write(summary.encode()))

    def copy_source(self, source: Path, name: str) -> None:
        """A copy of the network's source file: the checkpoint records only its reference."""
        data = Path(source).read_bytes()
        self._write(name, lambda f: f.write(data))

    def save_last(self, ckpt: dict[str, Any]) -> None:
        self._write("last.pt", lambda f: torch.save(ckpt, f))

    def end_epoch(self, ckpt: dict[str, Any], best: bool = False) -> None:
        """Checkpoint first, then the metrics it holds: metrics.csv never runs ahead of last.pt."""
        self.save_last(ckpt)
        if best:
            self._write("best.pt", lambda f: torch.save(ckpt, f))
        text = metrics_csv(ckpt["metrics"])
        self._write("metrics.csv", lambda f: f.write(text.encode()))

    def save_figure(self, name: str, draw) -> None:
        self._write(name, draw)

    def write_evaluation(self, report: dict[str, Any]) -> None:
        """evaluation.json: what `mnist-cnn evaluate` writes, here from the final epoch's own test pass."""
        text = json.dumps(report, indent=1)
        self._write("evaluation.json", lambda f: f.write(text.encode()))

    def abandon(self) -> None:
        """Remove what this process wrote (a run that never finished an epoch)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
