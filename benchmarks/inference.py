"""Inference speed of the seed network: batch-1 latency and batch-1024 throughput.

    python benchmarks/inference.py [--checkpoint runs/x/last.pt] [--device cpu] [--compile]

Backends: eager torch (NCHW and channels_last), torch.compile (with --compile;
its compile time is printed separately) and ONNX Runtime, fp32 and int8 (when
the `export` extra is installed; int8 is `export --quantize int8`'s scheme,
calibrated here on random images: speed does not depend on the ranges, accuracy
does, so take accuracy from the export's report). Inputs are float32 images in
[0, 1]; every backend includes the normalization. Latency is the median over
--repeats calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mnist_cnn.checkpoint import load_model_file, make_checkpoint
from mnist_cnn.config import load_config
from mnist_cnn.data.contract import Normalized
from mnist_cnn.device import describe, pick_device
from mnist_cnn.inference.export import metadata, write_onnx
from mnist_cnn.inference.quantize import quantize_onnx
from mnist_cnn.networks.builtin import build_model

BIG = 1024
CALIBRATION = 1000  # random images the int8 row's ranges come from, as many as export --quantize takes


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds per call after a few warm-up calls."""
    for _ in range(5):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a trained model (speed does not depend on the weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200, help="timed batch-1 calls (batch 1024: a tenth)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the machine to FILE (docs/models.md)")
    args = parser.parse_args()
    device = pick_device(args.device)
    if args.checkpoint:
        model, cfg, ckpt = load_model_file(args.checkpoint)
    else:
        model, cfg = build_model("seed"), load_config("seed")
        ckpt = make_checkpoint(model, cfg)
    wrapped = Normalized(model).eval().to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    one = torch.rand(1, 1, 28, 28, device=device)
    big = torch.rand(BIG, 1, 28, 28, device=device)
    rows = []

    def torch_row(name: str, module: torch.nn.Module, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x1, xb = one.contiguous(memory_format=fmt), big.contiguous(memory_format=fmt)
        with torch.inference_mode():
            lat = timed(lambda: module(x1), args.repeats, sync)
            thr = BIG / timed(lambda: module(xb), max(5, args.repeats // 10), sync)
        rows.append((name, lat, thr))

    torch_row("torch eager (NCHW)", wrapped, False)
    torch_row("torch eager (channels_last)", wrapped.to(memory_format=torch.channels_last), True)
    wrapped = wrapped.to(memory_format=torch.contiguous_format)
    if args.compile:
        compiled = torch.compile(wrapped, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(one), compiled(big)
        sync()
        print(f"torch.compile: {time.perf_counter() - start:.1f} s to compile (batch 1 and {BIG})")
        torch_row("torch.compile", compiled, False)
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path, int8 = Path(d) / "model.onnx", Path(d) / "model.int8.onnx"
            write_onnx(Normalized(model).eval().cpu(), path, metadata(cfg, ckpt))
            calibration = np.random.default_rng(0).random((CALIBRATION, 1, 28, 28), dtype=np.float32)
            quantize_onnx(path, int8, calibration)
            sessions = {
                precision: ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
                for precision, file in (("", path), (", int8", int8))
            }
        n1, nb = one.cpu().numpy(), big.cpu().numpy()
        for precision, session in sessions.items():
            lat = timed(lambda: session.run(None, {"images": n1}), args.repeats, lambda: None)
            thr = BIG / timed(lambda: session.run(None, {"images": nb}), max(5, args.repeats // 10), lambda: None)
            rows.append((f"ONNX Runtime {ort.__version__} (CPU{precision})", lat, thr))
    except ImportError:
        print("onnxruntime not installed: pip install 'mnist-cnn[export]' for its row")
    name = describe(device) + ("" if device.type == "cuda" else f", {os.cpu_count()} cores")
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 unless named")
    print(f"{'backend':<36} {'batch-1 latency':>16} {f'batch-{BIG} images/s':>20}")
    for backend, lat, thr in rows:
        print(f"{backend:<36} {1000 * lat:>13.3f} ms {thr:>20,.0f}")
    if args.json:
        table = [{"backend": b, "latency_ms": 1000 * lat, "images_per_s": thr} for b, lat, thr in rows]
        record = {"machine": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": table}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
