"""Many images at once: files and folders in, answers out as they are ready, a bad file
costing only itself.

    for item in predict_many(model, image_paths(["a.png", "my_digits/"]), dataset):
        item.path, item.digit, item.probs, item.error      # in input order, batch by batch

Images are decoded and preprocessed (inference.predict.load_digit) by a small thread pool,
PIL releasing the GIL while it decodes; each batch of them is one forward pass.
A labelled folder (one sub-folder per class) gives the images and labels that
`evaluate --images` reports on.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from mnist_cnn.data.datasets import Dataset
from mnist_cnn.errors import ConfigError, ImageError
from mnist_cnn.files import regular_file
from mnist_cnn.inference.predict import load_digit, predict_log_probs_of

log = logging.getLogger("mnist_cnn")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
BATCH = 256  # images per forward pass
WORKERS = 4  # decode + preprocess threads: PIL's decoders release the GIL


@dataclass
class Item:
    """One input's outcome: its (28, 28) input and class log-probabilities, or the error message."""

    path: str
    digit: np.ndarray | None = None
    log_probs: torch.Tensor | None = None  # (classes,)
    error: str | None = None

    @property
    def probs(self) -> torch.Tensor:
        assert self.log_probs is not None, f"{self.path}: not predicted"
        return self.log_probs.exp()


def digits_of(items: list[Item]) -> list[np.ndarray]:
    """The (28, 28) inputs of items that were decoded without an error."""
    digits = [item.digit for item in items if item.digit is not None]
    assert len(digits) == len(items), "an item without an error has its digit"
    return digits


def predicted(item: Item) -> tuple[np.ndarray, torch.Tensor]:
    """(input, log-probabilities) of an item that was decoded and run through the network."""
    assert item.digit is not None and item.log_probs is not None, f"{item.path}: not predicted"
    return item.digit, item.log_probs


def image_paths(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(paths to try, files skipped) for files and folders as given. A folder contributes its
    images by extension, recursively, in sorted order; what it holds besides is skipped (and
    listed). A file given by name is always tried, whatever its extension."""
    paths: list[str] = []
    skipped: list[str] = []
    for given in inputs:
        folder = Path(given)
        if not folder.is_dir():
            paths.append(given)
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            (paths if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(str(path))
    return paths, skipped


def decode(path: str, kind: str) -> Item:
    try:
        regular_file(path, ImageError, "image file")
        return Item(path, digit=load_digit(path, kind))
    except ImageError as e:
        return Item(path, error=str(e))


def predict_many(
    model: nn.Module, paths: list[str], dataset: Dataset, batch: int = BATCH, workers: int = WORKERS
) -> Iterator[Item]:
    """Every path's Item, in order, one batch at a time (decoded in a thread pool, one forward each)."""
    norm = (dataset.mean, dataset.std)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch):
            items = list(pool.map(lambda p: decode(p, dataset.preprocessing), paths[start : start + batch]))
            good = [item for item in items if item.error is None]
            if good:
                for item, out in zip(good, predict_log_probs_of(model, digits_of(good), norm)):
                    item.log_probs = out
            yield from items


def class_folders(folder: Path, dataset: Dataset) -> list[tuple[int, Path]]:
    """(class index, sub-folder) for each sub-folder of a labelled folder, named by the class's
    name or index; anything else is a one-line ConfigError."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (--images wants one sub-folder per class)")
    by_name = {name: i for i, name in enumerate(dataset.classes)} | {str(i): i for i in range(dataset.num_classes)}
    subs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subs if p.name not in by_name]
    if unknown:
        shown = ", ".join(dataset.classes) if dataset.num_classes <= 12 else f"0-{dataset.num_classes - 1}"
        raise ConfigError(
            f"{folder}: sub-folder(s) {', '.join(unknown)} are not {dataset.name} classes "
            f"(expected names or indices: {shown})"
        )
    if not subs:
        raise ConfigError(f"{folder}: no class sub-folders (expected one per class, e.g. {folder}/0/)")
    return [(by_name[p.name], p) for p in subs]


def labelled_images(folder: Path, dataset: Dataset) -> tuple[list[str], list[int], list[str]]:
    """(image paths, their class indices, files skipped) of a folder with one sub-folder per class."""
    paths, labels, skipped = [], [], []
    for label, sub in class_folders(folder, dataset):
        found, other = image_paths([str(sub)])
        paths += found
        labels += [label] * len(found)
        skipped += other
    if not paths:
        raise ConfigError(f"{folder}: no images in its class sub-folders")
    return paths, labels, skipped


def evaluate_folder(
    model: nn.Module, folder: Path, dataset: Dataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(log-probabilities, labels, the 28x28 inputs as uint8, report extras) of a labelled folder.
    Unreadable images are listed on stderr and in the report, not fatal."""
    paths, labels, skipped = labelled_images(folder, dataset)
    items = list(predict_many(model, paths, dataset))
    unreadable = [{"image": item.path, "error": item.error} for item in items if item.error is not None]
    for bad in unreadable:
        log.warning("not counted: %s", bad["error"])
    good = [(item, label) for item, label in zip(items, labels) if item.error is None]
    if not good:
        raise ImageError(f"{folder}: none of its {len(paths)} images could be read")
    done = [predicted(item) for item, _ in good]
    log_probs = torch.stack([out for _, out in done])  # (N, classes)
    inputs = torch.from_numpy(np.stack([np.round(digit * 255) for digit, _ in done]).astype(np.uint8))
    extra = {"images": str(folder), "unreadable": unreadable, "skipped": skipped}
    return log_probs, torch.tensor([label for _, label in good]), inputs, extra
