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

from mnist_cnn.data.idx import IMAGE_SIZE

DPI = 110


def _save(fig, f: BinaryIO) -> None:
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def draw_curves(rows: list[dict], f: BinaryIO) -> None:
    """Train/test (and validation, when present) loss and accuracy per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    splits = [
        (key, label)
        for key, label in (("train", "train"), ("test", "test"), ("val", "validation"))
        if f"{key}_acc" in rows[0]
    ]
    for key, label in splits:
        ax_loss.plot(epochs, [r[f"{key}_loss"] for r in rows], marker=".", label=label)
        ax_acc.plot(epochs, [100 * r[f"{key}_acc"] for r in rows], marker=".", label=label)
    ax_loss.set(title="loss (mean NLL per image)", xlabel="epoch", yscale="log")
    ax_acc.set(title="accuracy (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, f)


def draw_samples(images: torch.Tensor, labels: list[str], f: BinaryIO, title: str = "", columns: int = 8) -> None:
    """A grid of (N, 1, 28, 28) or (N, 28, 28) images, each titled with its label (a class name)."""
    images = images.detach().float().cpu().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.35), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray")
            ax.set_title(str(labels[i]), fontsize=9)
    if title:
        fig.suptitle(title)
    _save(fig, f)


def draw_confusion(confusion: list[list[int]], f: BinaryIO, title: str = "", classes: list[str] | None = None) -> None:
    """The C x C confusion matrix (rows: true class, columns: predicted), counts in cells."""
    import numpy as np

    counts = np.asarray(confusion)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # colour the errors only: the diagonal (about 1,000 per class) would wash out the rest
    image = ax.imshow(off, cmap="Reds")
    fig.colorbar(image, ax=ax, label="misclassified images")
    dark = 0.6 * max(int(off.max()), 1)  # cells this red get white text
    for (r, c), n in np.ndenumerate(counts):
        color = "tab:blue" if r == c else ("white" if off[r, c] > dark else "black")
        ax.text(
            c, r, str(n), ha="center", va="center", fontsize=7, color=color, fontweight="bold" if r == c else "normal"
        )
    names = classes or [str(c) for c in range(len(counts))]
    ax.set(
        xticks=range(len(counts)),
        yticks=range(len(counts)),
        xlabel="predicted",
        ylabel="true",
        title=title or "confusion",
    )
    ax.set_xticklabels(names, rotation=90 if max(map(len, names)) > 2 else 0)
    ax.set_yticklabels(names)
    _save(fig, f)


def draw_mistakes(
    images: torch.Tensor,
    true: list[str],
    pred: list[str],
    prob: list[float],
    f: BinaryIO,
    columns: int = 8,
    what: str = "test images",
) -> None:
    """Misclassified images, most confident first, titled 'true -> predicted (p)'."""
    images = images.detach().cpu().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    rows = max(1, (len(images) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray")
            ax.set_title(f"{true[i]}→{pred[i]} ({prob[i]:.2f})", fontsize=8)
    fig.suptitle(f"misclassified {what}, most confident first (true→predicted, probability)")
    _save(fig, f)
