"""A data set's splits as tensors, from its folder to the training device.

    data_dir = resolve_data_dir(None)         # --data-dir, $MNIST_CNN_DATA or the cache
    mnist = load_dataset(data_dir)            # downloads what is missing, then verifies
    mnist.train_images                        # (60000, 28, 28) uint8
    data = to_device(mnist, device, val_size=5000)   # on the device, validation split carved out

Images and labels must agree in count and labels lie in 0..classes-1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_cnn.data.datasets import MNIST, Dataset
from mnist_cnn.data.download import download
from mnist_cnn.data.idx import NUM_CLASSES, IdxFile, find_file, load_idx, missing_files
from mnist_cnn.errors import ConfigError, DataError

VAL_SPLIT_SEED = 12345  # fixed, so every run and seed holds out the same validation images


@dataclass
class Splits:
    """The data set as tensors: uint8 images; labels uint8 as read, int64 once on the
    training device (to_device), where a validation split may be carved out."""

    train_images: torch.Tensor  # (N, 28, 28) uint8
    train_labels: torch.Tensor  # (N,)
    test_images: torch.Tensor | None  # (M, 28, 28) uint8; None when the run never reads the test set (tune)
    test_labels: torch.Tensor | None  # (M,)
    num_classes: int = NUM_CLASSES  # the data set's, not the labels' maximum: it flows into the model
    val_images: torch.Tensor | None = None  # (V, 28, 28) uint8, carved from the training set
    val_labels: torch.Tensor | None = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_images.shape[0] / batch_size)


def to_device(
    mnist: Splits, device: torch.device, train_limit: int = 0, val_size: int = 0, batch_size: int = 1
) -> Splits:
    """The data set on `device`: the first train_limit training images (0 = all), of which
    the last val_size of a fixed permutation are held out for validation."""
    images, labels = mnist.train_images, mnist.train_labels
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    val_images = val_labels = None
    if val_size:
        if val_size >= images.shape[0]:
            raise ConfigError(f"val_size {val_size} leaves no training images (there are {images.shape[0]})")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        keep, held = order[:-val_size].sort().values, order[-val_size:].sort().values
        val_images, val_labels = images[held].to(device), labels[held].long().to(device)
        images, labels = images[keep], labels[keep]
    if batch_size > images.shape[0]:
        raise ConfigError(f"batch_size {batch_size} is larger than the {images.shape[0]} training images")
    test_images = None if mnist.test_images is None else mnist.test_images.to(device)
    test_labels = None if mnist.test_labels is None else mnist.test_labels.long().to(device)
    return Splits(
        images.to(device), labels.long().to(device), test_images, test_labels, mnist.num_classes, val_images, val_labels
    )


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None, recorded: str | os.PathLike[str] | None = None, dataset: str = "mnist"
) -> Path:
    """--data-dir, else $MNIST_CNN_DATA (MNIST only), else `recorded` (the folder a checkpoint's
    run trained from) when it still exists, else the cache: $XDG_CACHE_HOME/mnist-cnn or
    ~/.cache/mnist-cnn for MNIST, a sub-folder named after the data set for the others."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("MNIST_CNN_DATA") and dataset == MNIST.name:  # the variable names MNIST's folder
        return Path(os.environ["MNIST_CNN_DATA"]).expanduser()
    if recorded and Path(recorded).expanduser().is_dir():
        return Path(recorded).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist-cnn"
    return cache if dataset == MNIST.name else cache / dataset


def split_files(split: str, files: dict[str, IdxFile]) -> dict[str, IdxFile]:
    """The two entries of `files` that make up "train" or "test"."""
    return {key: files[key] for key in (f"{split}_images", f"{split}_labels")}


def has_split(data_dir: Path, split: str, dataset: Dataset = MNIST) -> bool:
    return not missing_files(data_dir, split_files(split, dataset.files))


def load_split(
    data_dir: Path,
    split: str,
    verify: bool = True,
    dataset: Dataset = MNIST,
    download_missing: bool = False,
    mirrors: tuple[str, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 28, 28) uint8, labels (N,) int64 from 0) of "train" or "test"; reads (and,
    when asked, downloads) only that split's two files."""
    files = split_files(split, dataset.files)
    if download_missing and missing_files(data_dir, files):
        download(data_dir, mirrors, dataset=dataset, only=files)
    img_spec, lbl_spec = files[f"{split}_images"], files[f"{split}_labels"]
    paths = []
    for spec in (img_spec, lbl_spec):
        path = find_file(data_dir, spec)
        if path is None:
            raise DataError(
                f"{data_dir / spec.name}.gz not found: run `mnist-cnn download --dataset {dataset.name} "
                f"--data-dir {data_dir}`, or copy the four {dataset.name} files (.gz or raw) there"
            )
        paths.append(path)
    images = load_idx(paths[0], img_spec, verify)
    labels = load_idx(paths[1], lbl_spec, verify)
    if labels.dim() == 2:  # QMNIST: one row of metadata per image, the class in column 0
        labels = labels[:, 0]
    labels = labels.long() - dataset.label_offset
    if dataset.transposed:  # EMNIST: stored column by column
        images = images.transpose(1, 2).contiguous()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < dataset.num_classes:
        bad = int(labels.max()) if int(labels.max()) >= dataset.num_classes else int(labels.min())
        raise DataError(
            f"{paths[1]}: label {bad + dataset.label_offset} is not one of the "
            f"{dataset.num_classes} classes of {dataset.name}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{paths[0]}: holds no images")
    return images, labels


def load_dataset(
    data_dir: Path,
    verify: bool = True,
    download_missing: bool = True,
    mirrors: tuple[str, ...] | None = None,
    dataset: Dataset = MNIST,
    test: bool = True,
) -> Splits:
    """Both splits of `dataset` (MNIST unless told otherwise); test=False: the training split only,
    the test files not even opened."""
    train_images, train_labels = load_split(data_dir, "train", verify, dataset, download_missing, mirrors)
    test_images = test_labels = None
    if test:
        test_images, test_labels = load_split(data_dir, "test", verify, dataset, download_missing, mirrors)
    return Splits(train_images, train_labels, test_images, test_labels, dataset.num_classes)
