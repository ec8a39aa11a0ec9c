"""The optional runtimes of exports, imported when used, and an ONNX file run on a batch:

    ort = require("onnxruntime")              # ExportError naming the extra when it is not installed
    log_probs = run_onnx(path, images)        # (N, 1, 28, 28) float32 in [0, 1] -> (N, classes)

Shared by the exporter (inference.export) and the int8 quantizer (inference.quantize).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np

from mnist_cnn.data.contract import Normalized
from mnist_cnn.errors import ExportError

RUN_BATCH = 1000  # images per forward when checking: the whole test split at once is ~2 GB of activations for vgg


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install 'mnist-cnn[export]'") from None


def run_onnx(path: Path, images: np.ndarray, wrapped: Normalized | None = None) -> np.ndarray:
    """(N, 1, 28, 28) float32 images in [0, 1] -> (N, classes) log-probabilities, RUN_BATCH at a time."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = [
        session.run(["log_probs"], {"images": images[i : i + RUN_BATCH]})[0] for i in range(0, len(images), RUN_BATCH)
    ]
    return np.concatenate(chunks)
