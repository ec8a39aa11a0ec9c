"""Figures, drawn from what a run wrote (metrics rows, an evaluation report) or
from a batch of images. Each function draws into an open binary file.

    rows = read_metrics(run / "metrics.csv")
    with open(run / "curves.png", "wb") as f:
        draw_curves(rows, f)
"""

from __future__ import annotations

from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

DPI = 110


def _save(fig, f: BinaryIO) -> None:
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def draw_curves(rows: list[dict], f: BinaryIO) -> None:
    """Train/test (and validation, when present) loss and accuracy per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    splits = [("train", "train"), ("test", "test")] + ([("val", "validation")] if "val_acc" in rows[0] else [])
    for key, label in splits:
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in rows], marker=".", label=label)
        ax_acc.plot(epochs, [100 * r[f"{key}_acc"] for r in rows], marker=".", label=label)
    ax_loss.set(title="loss (mean NLL per image)", xlabel="epoch", yscale="log")
    ax_acc.set(title="accuracy (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, f)


def draw_samples(images: torch.Tensor, labels: torch.Tensor, f: BinaryIO, title: str = "",
                 columns: int = 8) -> None:
    """A grid of (N, 1, 28, 28) or (N, 28, 28) images, each titled with its label."""
    images = images.detach().float().cpu().reshape(-1, 28, 28)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.35), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray")
            ax.set_title(str(int(labels[i])), fontsize=9)
    if title:
        fig.suptitle(title)
    _save(fig, f)
