"""Figures, drawn from what a run wrote (metrics rows, an evaluation report) or
from a batch of images. Each function draws into an open binary file.

    rows = read_metrics(run / "metrics.csv")
    with open(run / "curves.png", "wb") as f:
        draw_curves(rows, f)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mnist_cnn.data.idx import IMAGE_SIZE
from mnist_cnn.files import SOFTWARE

DPI = 110
GRID_GAP = 6  # pixels between the images of a grid
GRID_CAPTION = 14  # pixels above each image for its caption


def _save(fig, f: BinaryIO, tight: bool = True) -> None:
    """PNG into f. tight=False: the figure's own margins, set by its drawer; "tight" draws the figure
    twice (once to measure it), which doubled the time of curves.png, drawn at the end of every run."""
    # the mark says the file is the tool's own: a later run may replace it (files.written_by_us)
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight" if tight else None, metadata={"Software": SOFTWARE})
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
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.91, wspace=0.2)  # room for labels and titles
    _save(fig, f, tight=False)


def draw_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggestion: float, f: BinaryIO) -> None:
    """The range test's loss against the learning rate (log scale), the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss of each step's batch")
    ax.plot(lrs, smoothed, label="smoothed")
    ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggested {suggestion:.2e} (steepest descent)")
    top = max(smoothed[: max(1, len(smoothed) // 10)]) * 1.5  # the start's level: the divergence is off the chart
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (NLL)", ylim=(0, top), title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.91)
    _save(fig, f, tight=False)


def draw_samples(images: torch.Tensor, labels: list[str], f: BinaryIO, title: str = "", columns: int = 8) -> None:
    """A grid of (N, 1, 28, 28) or (N, 28, 28) images, each titled with its label (a class name)."""
    _grid(images, [str(label) for label in labels], f, title, columns, fontsize=9)


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
    captions = [f"{t}→{p} ({q:.2f})" for t, p, q in zip(true, pred, prob)]
    title = f"misclassified {what}, most confident first (true→predicted, probability)"
    _grid(images, captions, f, title, columns, fontsize=8)


def _grid(images: torch.Tensor, captions: list[str], f: BinaryIO, title: str, columns: int, fontsize: int) -> None:
    """(N, [1,] 28, 28) images tiled on ONE canvas, each scaled to its own range as imshow would and
    captioned above: one Axes and one image instead of N subplots (0.8 s -> 0.15 s for 32, and every
    run draws its samples.png)."""
    images = images.detach().float().cpu().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    rows = max(1, (len(images) + columns - 1) // columns)
    cell_w, cell_h = IMAGE_SIZE + GRID_GAP, IMAGE_SIZE + GRID_CAPTION  # pixels per cell, caption above
    canvas = np.full((rows * cell_h, columns * cell_w), np.nan)  # NaN: the background, drawn white
    for i, image in enumerate(images):
        low, high = image.min(), image.max()
        scaled = (image - low) / (high - low) if high > low else torch.zeros_like(image)
        top, left = (i // columns) * cell_h + GRID_CAPTION, (i % columns) * cell_w
        canvas[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE] = scaled.numpy()
    width = columns * 1.2  # inches; the height follows the canvas
    fig, ax = plt.subplots(figsize=(width, width * canvas.shape[0] / canvas.shape[1]))
    ax.imshow(canvas, cmap=plt.get_cmap("gray").with_extremes(bad="white"), vmin=0, vmax=1, interpolation="nearest")
    for i, caption in enumerate(captions[: len(images)]):
        x, y = (i % columns) * cell_w + IMAGE_SIZE / 2, (i // columns) * cell_h + GRID_CAPTION - 2
        ax.text(x, y, caption, ha="center", va="bottom", fontsize=fontsize)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=12)
    _save(fig, f)


def draw_frontier(rows: list[dict], anchors: Mapping[str, Sequence[tuple[str, int, float, str]]], f: BinaryIO) -> None:
    """Final accuracy against parameters (log scale), one panel per data set (accuracies on MNIST and
    on Fashion-MNIST share no axis): each group's mean with its standard deviation and its lowest seed
    (x), and the data set's published figures (label, parameters, accuracy %, source) in grey."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))  # in the order the groups were given
    fig, axes = plt.subplots(1, len(datasets), figsize=(8 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in (r for r in rows if r["dataset"] == dataset):
            label = r["group"] + (" (validation)" if r["split"] != "test" else "")
            bar = ax.errorbar(r["parameters"], r["mean"], yerr=r["std"], fmt="o", capsize=4, label=label)
            ax.plot(r["parameters"], r["min"], "x", color=bar[0].get_color())
        for name, params, acc, _source in anchors.get(dataset, ()):
            ax.plot(params, acc, "s", color="grey")
            ax.annotate(name, (params, acc), textcoords="offset points", xytext=(6, -10), fontsize=8, color="grey")
        ax.set(
            xscale="log",
            xlabel="parameters",
            ylabel=f"final-epoch accuracy on {dataset} (%)",
            title=f"{dataset}: mean ± std over seeds, x = lowest seed",
        )
        ax.grid(alpha=0.3, which="both")
        # below the panel: inside, any spot hides some group's point
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    _save(fig, f)
