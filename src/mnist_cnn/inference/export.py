"""Export a trained model; every export checks itself against torch.

    report = export(model, cfg, ckpt, "onnx", Path("seed.onnx"), check_images)
    report["max_abs_diff"], report["argmax_equal"]   # the file is kept only if both hold

ONNX and TorchScript take `images`: float32 (N, 1, 28, 28) in [0, 1] (the
normalization is inside the graph) and return `log_probs` (N, 10). After
writing, the file is loaded back (onnxruntime / torch.jit.load) and run on
the check images; if the largest absolute difference from torch exceeds
TOLERANCE or any argmax differs, the file is deleted and ExportError raised.
safetensors holds the weights and, as metadata, the config; predict and
evaluate accept it. quantize="int8" (ONNX only) writes the fp32 graph to a temp
folder, checks it as above, and quantizes it (inference/quantize.py); the int8
file is kept only if its test accuracy is within quantize.MAX_ACCURACY_DROP of
the fp32 graph's. Needs the `export` extra: pip install 'mnist-cnn[export]'.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_cnn.checkpoint import Checkpoint, read_safetensors, unwrap
from mnist_cnn.checkpoint import metadata as checkpoint_metadata
from mnist_cnn.config import Config
from mnist_cnn.data.contract import Normalized, to_unit
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.idx import IMAGE_SIZE
from mnist_cnn.errors import ExportError
from mnist_cnn.files import atomic_path
from mnist_cnn.inference.runtimes import RUN_BATCH, require, run_onnx

TOLERANCE = 1e-4  # max |exported - torch| over the log-probabilities
ONNX_OPSET = 18
FORMATS = ("onnx", "torchscript", "safetensors")


def metadata(cfg: Config, ckpt: Checkpoint) -> dict[str, str]:
    """String key/values stored with the exported file: what describes the data and the files' tensors,
    then the checkpoint's own fields (checkpoint.metadata, which read_safetensors reads back)."""
    dataset = get_dataset(cfg.dataset)
    num_classes = ckpt.network.num_classes
    return {
        "dataset": dataset.name,
        "classes": ",".join(dataset.classes),
        "input": f"images: float32 [N,1,{IMAGE_SIZE},{IMAGE_SIZE}] in [0,1], white on black (normalized inside)",
        "output": f"log_probs: float32 [N,{num_classes}]",
        "normalization_mean": str(dataset.mean),
        "normalization_std": str(dataset.std),
        "model": cfg.model,
        "recipe": cfg.recipe,
        **checkpoint_metadata(ckpt),
    }


def write_onnx(wrapped: Normalized, path: Path, meta: dict[str, str]) -> None:
    onnx = require("onnx")
    require("onnxscript")  # torch's exporter needs it
    example = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    # The exporter logs a warning for each torchvision op it cannot register; we use none.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["log_probs"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        # The exporter's per-node debugging record (stack traces and source paths of the machine that
        # exported, fx node dumps): a third of the seed network's file, and nothing ONNX Runtime reads.
        del node.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def write_torchscript(wrapped: Normalized, path: Path, meta: dict[str, str]) -> None:
    scripted = torch.jit.trace(wrapped, torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE))
    torch.jit.save(scripted, str(path), _extra_files={"metadata.json": json.dumps(meta)})


def run_torchscript(path: Path, images: np.ndarray, wrapped: Normalized) -> np.ndarray:
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(torch.from_numpy(images)).numpy()


def write_safetensors(wrapped: Normalized, path: Path, meta: dict[str, str]) -> None:
    st = require("safetensors.torch")
    weights = {k: v.contiguous() for k, v in wrapped.model.state_dict().items()}
    st.save_file(weights, str(path), metadata=meta)


def run_safetensors(path: Path, images: np.ndarray, wrapped: Normalized) -> np.ndarray:
    """The file's weights, loaded into a fresh copy of the network and run. (`predict` and
    `evaluate` rebuild the network from the metadata's config, as load_model_file does.)"""
    written = read_safetensors(path)  # what predict and evaluate read: the metadata's fields and config too
    fresh = copy.deepcopy(wrapped)
    fresh.model.load_state_dict(written.model)
    with torch.no_grad():
        return fresh.eval()(torch.from_numpy(images)).numpy()


WRITERS = {
    "onnx": (write_onnx, run_onnx),
    "torchscript": (write_torchscript, run_torchscript),
    "safetensors": (write_safetensors, run_safetensors),
}


def torch_log_probs(wrapped: Normalized, images: np.ndarray) -> np.ndarray:
    """What every export is compared with: torch's (N, classes) log-probabilities, RUN_BATCH at a time."""
    with torch.no_grad():
        chunks = [
            wrapped(torch.from_numpy(images[i : i + RUN_BATCH])).numpy() for i in range(0, len(images), RUN_BATCH)
        ]
    return np.concatenate(chunks)


def check_parity(fmt: str, got: np.ndarray, expected: np.ndarray) -> tuple[float, bool]:
    """(max |exported - torch|, every argmax equal); ExportError when either fails."""
    diff = float(np.abs(got - expected).max())
    same = bool((got.argmax(1) == expected.argmax(1)).all())
    if not (diff <= TOLERANCE and same):
        raise ExportError(
            f"{fmt} export does not match torch on {len(got)} images "
            f"(max |diff| {diff:.2e}, tolerance {TOLERANCE:.0e}; argmax equal: {same}); "
            "nothing written"
        )
    return diff, same


@dataclass
class Int8:
    """What an int8 export needs besides the model: the images its activation ranges are calibrated on
    ((M, 28, 28) uint8, training split) and the labels of the check images (the whole test split)."""

    calibration: torch.Tensor
    labels: torch.Tensor


def export(
    model: nn.Module,
    cfg: Config,
    ckpt: Checkpoint,
    fmt: str,
    out: Path,
    check_images: torch.Tensor,
    int8: Int8 | None = None,
) -> dict[str, Any]:
    """Write `out` in `fmt`, run it on check_images ((N, 28, 28) uint8) and compare with torch.
    With `int8` (onnx only): quantized, calibrated on int8.calibration, and compared with fp32 on
    check_images and int8.labels (the whole test split)."""
    if int8 is not None and fmt != "onnx":
        raise ExportError(f"an int8 export is an ONNX file, not {fmt}")
    if fmt not in WRITERS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    write, run = WRITERS[fmt]
    dataset = get_dataset(cfg.dataset)
    wrapped = Normalized(unwrap(model).cpu().float(), (dataset.mean, dataset.std)).eval()
    images = to_unit(check_images).numpy()  # (N, 1, 28, 28) in [0, 1]
    expected = torch_log_probs(wrapped, images)
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"folder {out.parent} does not exist")
    report: dict[str, Any] = {"format": fmt, "file": str(out), "n": len(images), "tolerance": TOLERANCE}
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated and its ONNX exporter warns about its own
        # internals; neither is actionable for the user of this command.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        if int8 is None:
            with atomic_path(out) as tmp:  # kept only if the check passes
                write(wrapped, tmp, metadata(cfg, ckpt))
                report["max_abs_diff"], report["argmax_equal"] = check_parity(fmt, run(tmp, images, wrapped), expected)
            return report
        from mnist_cnn.inference.quantize import write_int8  # imports onnxruntime.quantization: only when asked

        with tempfile.TemporaryDirectory(prefix="mnist-cnn-int8-") as folder:
            fp32 = Path(folder) / "fp32.onnx"  # what --format onnx writes, checked like it
            write(wrapped, fp32, metadata(cfg, ckpt))
            fp32_log_probs = run(fp32, images, wrapped)
            report["max_abs_diff"], report["argmax_equal"] = check_parity(fmt, fp32_log_probs, expected)
            with atomic_path(out) as tmp:  # kept only if the int8 check passes
                calibration, labels = to_unit(int8.calibration).numpy(), int8.labels.numpy()
                quantized = write_int8(fp32, tmp, calibration, images, labels, fp32_log_probs)
            quantized["fp32_bytes"] = os.path.getsize(fp32)
    report["quantized"] = quantized
    return report
