"""The MNIST family: what a data set is (Dataset) and one table of them in MNIST's IDX format.

    ds = get_dataset("fashion-mnist")
    ds.classes[9], ds.num_classes          # "Ankle boot", 10
    mnist = load_dataset(data_dir, dataset=ds)

Each entry declares its files and checksums, mirrors, class names and
normalization constants. Checksums: the SHA-256 of the decompressed bytes where
it is known (MNIST, Fashion-MNIST), else the MD5 that the publishers and
torchvision list for the file as published (KMNIST, QMNIST) or for the archive
(EMNIST, whose members are then checked against the SHA-256 recorded when they
were extracted). A file that no published checksum covers as it is (a raw KMNIST
or QMNIST file, an EMNIST file not extracted here) must have exactly its
published shape at its first load, which records its SHA-256 beside it for every
later load (idx.verify_file). Normalization constants are the training set's mean and std,
recomputed by the tests for every set present on the machine (MNIST and
Fashion-MNIST here); for KMNIST, QMNIST and EMNIST they are the published values.
"""

from __future__ import annotations

from dataclasses import dataclass

from mnist_cnn.data.contract import MNIST_MEAN, MNIST_STD  # QMNIST's images are MNIST's, with more of them
from mnist_cnn.data.idx import IdxFile
from mnist_cnn.errors import ConfigError

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


@dataclass(frozen=True)
class Archive:
    """One download that holds the IDX files (EMNIST's zip)."""

    name: str  # file name on the mirrors
    md5: str  # as its publishers list it
    folder: str  # the members' folder inside it


@dataclass(frozen=True)
class Dataset:
    """An MNIST-format data set: its files, where to get them, and what its labels mean
    (DATASETS below is the table of them)."""

    name: str
    files: dict[str, IdxFile]  # "train_images", "train_labels", "test_images", "test_labels" -> IdxFile
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: float  # of the training images scaled to [0, 1]: the normalization
    std: float
    label_offset: int = 0  # subtracted from the stored labels (EMNIST letters count from 1)
    transposed: bool = False  # EMNIST stores each image transposed
    archive: Archive | None = None
    preprocessing: str = "handwriting"  # how `predict` prepares people's images: handwriting | object
    licence: str = ""
    source: str = ""  # the publisher's page

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# Checksums are data: checked on every load, not only after a download.
FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte", (60000, 28, 28), "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte", (60000,), "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte", (10000, 28, 28), "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte", (10000,), "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}
MNIST = Dataset(
    "mnist",
    FILES,
    MIRRORS,
    tuple(str(d) for d in range(10)),
    MNIST_MEAN,
    MNIST_STD,
    licence="CC BY-SA 3.0",
    source="Yann LeCun, Corinna Cortes, Christopher J.C. Burges",
)


DIGITS = tuple(str(d) for d in range(10))


def idx_files(
    prefix: str,
    train: int,
    test: int,
    label_name: str = "labels-idx1-ubyte",
    label_width: int = 0,
    test_prefix: str = "t10k",
    **checksums: tuple[str, str, str, str],
) -> dict[str, IdxFile]:
    """The four IdxFiles of a set whose names follow MNIST's pattern; `sha256=` or `md5=` gives
    the four checksums in the order train images, train labels, test images, test labels."""
    label_shape = (lambda n: (n, label_width)) if label_width else (lambda n: (n,))
    names = {
        "train_images": (f"{prefix}train-images-idx3-ubyte", (train, 28, 28)),
        "train_labels": (f"{prefix}train-{label_name}", label_shape(train)),
        "test_images": (f"{prefix}{test_prefix}-images-idx3-ubyte", (test, 28, 28)),
        "test_labels": (f"{prefix}{test_prefix}-{label_name}", label_shape(test)),
    }
    kind, sums = next(iter(checksums.items())) if checksums else ("sha256", (None,) * 4)
    return {key: IdxFile(name, shape, **{kind: digest}) for (key, (name, shape)), digest in zip(names.items(), sums)}


FASHION_MNIST = Dataset(
    "fashion-mnist",
    idx_files(
        "",
        60000,
        10000,
        sha256=(  # of the decompressed bytes (shared/data/README.md)
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    0.2860,
    0.3530,
    preprocessing="object",
    licence="MIT",
    source="Zalando Research",
)

KMNIST = Dataset(
    "kmnist",
    idx_files(
        "",
        60000,
        10000,
        md5=(
            "bdb82020997e1d708af4cf47b453dcf7",
            "e144d726b3acfaa3e44228e80efcd344",
            "5c965bf0a639b31b8f53240b1b52f4d7",
            "7320c461ea6c1c855c0b718fb2a4b134",
        ),
    ),
    ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    0.1918,
    0.3483,
    licence="CC BY-SA 4.0",
    source="ROIS-DS Center for Open Data in the Humanities",
)

# QMNIST's labels are (N, 8) int32 rows (class, NIST writer, ...); its test file holds 60,000
# images, of which the first 10,000 are MNIST's test set.
QMNIST = Dataset(
    "qmnist",
    idx_files(
        "qmnist-",
        60000,
        60000,
        label_name="labels-idx2-int",
        label_width=8,
        test_prefix="test",
        md5=(
            "ed72d4157d28c017586c42bc6afe6370",
            "0058f8dd561b90ffdd0f734c6a30e5e4",
            "1394631089c404de565df7b7aeaf9412",
            "5b5b05890a5e13444e108efe57b788aa",
        ),
    ),
    ("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",),
    DIGITS,
    MNIST_MEAN,
    MNIST_STD,
    licence="BSD-style (see the publisher)",
    source="Facebook AI Research (QMNIST)",
)

EMNIST_ARCHIVE = Archive("gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e", "gzip/")
EMNIST_MIRRORS = ("https://biometrics.nist.gov/cs_links/EMNIST/",)

EMNIST_DIGITS = Dataset(
    "emnist-digits",
    idx_files("emnist-digits-", 240000, 40000, test_prefix="test"),
    EMNIST_MIRRORS,
    DIGITS,
    0.1733,
    0.3317,
    transposed=True,
    archive=EMNIST_ARCHIVE,
    licence="NIST Special Database 19 terms",
    source="NIST (Cohen et al., EMNIST)",
)

EMNIST_LETTERS = Dataset(
    "emnist-letters",
    idx_files("emnist-letters-", 124800, 20800, test_prefix="test"),
    EMNIST_MIRRORS,
    tuple("abcdefghijklmnopqrstuvwxyz"),
    0.1722,
    0.3309,
    label_offset=1,
    transposed=True,
    archive=EMNIST_ARCHIVE,
    licence="NIST Special Database 19 terms",
    source="NIST (Cohen et al., EMNIST)",
)

DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST, KMNIST, QMNIST, EMNIST_DIGITS, EMNIST_LETTERS)}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]
