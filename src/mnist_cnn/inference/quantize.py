"""int8 ONNX: ONNX Runtime's static quantization of a checked fp32 export, and what it costs.

    quantize_onnx(Path("fp32.onnx"), Path("int8.onnx"), calibration)   # (M, 1, 28, 28) float32 in [0, 1]
    figures = write_int8(fp32, out, calibration, test_images, test_labels, fp32_log_probs)
    figures["int8_accuracy"], figures["agree"]   # `out` holds a file only if the check below passed

The scheme, and why (measured on the 20-epoch seed, tiny and fashion networks, docs/guide/inference.md):
- QDQ format (QuantizeLinear/DequantizeLinear around float ops): ONNX Runtime fuses the pairs into
  QLinearConv / QGemm on the CPU and any ONNX runtime can still read the graph.
- ORT's pre-processing first (symbolic shape inference, graph optimizations that fold a BatchNorm the
  exporter left into its convolution): ranges are then calibrated on the folded convolutions.
- Weights int8, symmetric, one scale per output channel: BatchNorm folded into a convolution scales each
  channel by its own gamma / sqrt(var), so one scale per tensor would be set by the widest channel.
- Activations uint8 with MinMax ranges from the calibration images, which are training images, never test
  images. uint8 activations with int8 weights are what ORT advises for x86 CPUs (int8 x int8 gave the same
  figures here). No reduce_range (7-bit weights): it doubled the fp32/int8 disagreements on fashion; CPUs
  without VNNI may saturate int16 sums with 8-bit weights, so re-measure on such a machine.
- The input normalization (Sub, Div) and the final LogSoftmax stay fp32 (ORT does not quantize them), and
  so does the classifier's output: the last Gemm writes fp32 logits (int8 logits moved tiny's
  log-probabilities by up to 2.4, fp32 logits by 0.5; inner Gemms are still quantized as the next
  layer's input).

The check: the int8 file's accuracy on the test set must be at least the fp32 graph's minus
MAX_ACCURACY_DROP; otherwise ExportError, and the caller's atomic_path leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mnist_cnn.errors import ExportError
from mnist_cnn.inference.runtimes import require, run_onnx

MAX_ACCURACY_DROP = 0.005  # of test accuracy (half a point) an int8 export may lose against its fp32 graph
# Calibration images per ORT run. ORT keeps every intermediate output of all of them until it computes the
# ranges (~110 MB for the seed network's 1,000): its CalibMaxIntermediateOutputs, meant to merge ranges as
# it goes, discards the outputs unmerged in onnxruntime 1.32 ("No data is collected"), so it is not set.
CALIBRATION_BATCH = 100
PER_CHANNEL = True
SCHEME = (
    "ONNX Runtime static quantization, QDQ: int8 weights (symmetric, per output channel), uint8 activations "
    "(MinMax ranges over the calibration images); normalization, classifier logits and log-softmax in fp32"
)


class CalibrationImages:
    """The calibration data reader ORT's quantize_static asks for (duck-typed, as ORT allows): the images
    in batches of CALIBRATION_BATCH, then None."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images  # (M, 1, 28, 28) float32 in [0, 1]
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {"images": batch}


@contextmanager
def no_root_logging_setup() -> Iterator[None]:
    """ORT's quantizer reports through logging.warning() on the root logger, which configures the root
    logger for the whole process when it has no handler. A NullHandler for the call keeps the process
    as it was (a program that set up logging still gets ORT's messages)."""
    root = logging.getLogger()
    handler = logging.NullHandler() if not root.handlers else None
    if handler is not None:
        root.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)


def logits_op(path: Path) -> str | None:
    """The op type that computes the logits (the input of the final LogSoftmax), if the graph has one."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    softmax = [n for n in graph.node if n.op_type == "LogSoftmax" and n.output[0] == graph.output[0].name]
    producers = [n.op_type for n in graph.node if softmax and softmax[0].input[0] in n.output]
    return producers[0] if producers else None


def quantize_onnx(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Write the int8 (QDQ) version of the fp32 ONNX file `fp32` to `out`, its activation ranges
    calibrated on `calibration`: (M, 1, 28, 28) float32 training images in [0, 1]."""
    q = require("onnxruntime.quantization")
    pre_process = require("onnxruntime.quantization.shape_inference").quant_pre_process
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-quantize-") as folder, no_root_logging_setup():
        prepared = Path(folder) / "prepared.onnx"
        pre_process(str(fp32), str(prepared))
        # a Linear head (Gemm) writes fp32 logits; a Gemm inside the network is still quantized, as the
        # next layer's input
        options = {"OpTypesToExcludeOutputQuantization": ["Gemm"]} if logits_op(prepared) == "Gemm" else {}
        q.quantize_static(
            str(prepared),
            str(out),
            CalibrationImages(calibration),
            quant_format=q.QuantFormat.QDQ,
            per_channel=PER_CHANNEL,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
            extra_options=options,
        )


def add_metadata(path: Path, meta: dict[str, str]) -> None:
    """Add (or replace) string key/values of an ONNX file's metadata; the graph is untouched."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def write_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    fp32_log_probs: np.ndarray,
) -> dict[str, Any]:
    """Quantize the checked fp32 file `fp32` into `out` (calibrated on `calibration`, training images), run
    `out` on the test `images` ((N, 1, 28, 28) in [0, 1]) and compare with the fp32 graph's
    `fp32_log_probs` ((N, classes)) and the `labels` ((N,)). ExportError when int8 loses more than
    MAX_ACCURACY_DROP of accuracy. Returns the figures of report["quantized"] but fp32_bytes."""
    quantize_onnx(fp32, out, calibration)
    add_metadata(out, {"quantization": f"{SCHEME}; calibrated on {len(calibration)} training images"})
    int8_pred = run_onnx(out, images).argmax(1)  # (N,)
    fp32_pred = fp32_log_probs.argmax(1)
    n = len(labels)
    fp32_accuracy = int((fp32_pred == labels).sum()) / n
    int8_accuracy = int((int8_pred == labels).sum()) / n
    if int8_accuracy < fp32_accuracy - MAX_ACCURACY_DROP:
        raise ExportError(
            f"int8 export loses too much: test accuracy {100 * int8_accuracy:.2f}% against the fp32 graph's "
            f"{100 * fp32_accuracy:.2f}% on {n:,} images (at most {100 * MAX_ACCURACY_DROP:.2f} points); "
            "nothing written"
        )
    return {
        "n": n,
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "agree": int((int8_pred == fp32_pred).sum()),
        "int8_bytes": os.path.getsize(out),
        "calibration": len(calibration),
        "max_accuracy_drop": MAX_ACCURACY_DROP,
        "scheme": SCHEME,
        "onnxruntime": require("onnxruntime").__version__,
    }
