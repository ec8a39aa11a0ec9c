"""Trained models shipped inside the package: `pretrained:NAME` wherever a checkpoint is taken.

    mnist-cnn predict pretrained:seed photo.jpg          # nothing trained, nothing downloaded
    model = mnist_cnn.load("pretrained:fashion")
    resolve("pretrained:tiny")                           # -> the .pt file in this folder
    listing()                                            # name, data set, parameters, accuracy, size, ...

Each NAME.pt is a weights-only checkpoint (config, weights, metrics: no optimizer, no code), stripped
from a run of the project's own recipe command by tools/ship_pretrained.py; NAME.MODEL_CARD.md is that
run's model card, and index.toml says for each which command, commit and machine made it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from mnist_cnn.errors import CheckpointError

PREFIX = "pretrained:"
FOLDER = Path(__file__).resolve().parent
INDEX = FOLDER / "index.toml"  # per model: data set, recipe, the commands, commit and machine that made it


def index() -> dict[str, dict[str, Any]]:
    return tomllib.loads(INDEX.read_text())


def names() -> list[str]:
    return sorted(index())


def is_pretrained(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith(PREFIX)


def resolve(path: str | os.PathLike[str]) -> Path:
    """`pretrained:NAME` -> the shipped file; any other path as it is."""
    if not is_pretrained(path):
        return Path(path)
    name = str(path)[len(PREFIX) :]
    if name not in index():
        raise CheckpointError(f"no pretrained model {name!r}; the package holds {', '.join(names())}")
    return FOLDER / f"{name}.pt"


def card(name: str) -> Path:
    return FOLDER / f"{name}.MODEL_CARD.md"
