"""TensorBoard logs of a run (`--set run.tensorboard=true`): event files in the run folder itself,
so that `tensorboard --logdir runs` names each run by its folder:

    loss/train, loss/test, loss/val, accuracy/train, accuracy/test, accuracy/val, lr   per epoch
    samples                                        the augmented training images, as samples.png
    hparams                                        the config, with the final accuracies as metrics

`tensorboard --logdir runs` then shows every run side by side. Written with the
tensorboard package's own writer (torch.utils.tensorboard).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mnist_cnn.config import Config
from mnist_cnn.errors import ConfigError

SCALARS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "val_acc": "accuracy/val",
    "lr": "lr",
}


class TensorBoardLog:
    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "run.tensorboard needs the tensorboard package: pip install 'mnist-cnn[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir))

    def epoch(self, row: dict) -> None:
        for key, tag in SCALARS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def samples(self, images: torch.Tensor) -> None:
        """(N, 1, 28, 28) augmented training images in [0, 1]."""
        self.writer.add_images("samples", images, 0)

    def finish(self, cfg: Config, final: dict) -> None:
        """The config as hparams (nested keys dotted), the final epoch's accuracies as their metrics."""
        metrics = {f"final/{key}": final[key] for key in ("test_acc", "val_acc", "train_acc") if key in final}
        hparams = {key: shown(value) for key, value in flat(dataclasses.asdict(cfg)).items()}
        self.writer.add_hparams(hparams, metrics, run_name=".")
        self.close()

    def close(self) -> None:
        self.writer.close()


def flat(values: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; an empty table has no keys, so it leaves none.
    (training.seeds compares configs with it too.)"""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shown(value: object) -> bool | int | float | str:
    """A config value as TensorBoard's hparams can show it: a string unless it is a bool or a number."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)
