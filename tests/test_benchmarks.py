"""The benchmark scripts run end to end on a few batches (their figures come from real runs, not tests)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_train_throughput_prints_both_pipelines_and_the_ratio():
    out = run("train_throughput.py", "--batches", "3", "--warmup", "1", "--repeats", "1", "--workers", "0",
              "--also", "run.precision=fp32")
    assert "(a) per-sample PIL + DataLoader(0 workers)" in out
    assert "(b) mnist_cnn, recipe seed" in out and "(b) with run.precision=fp32" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio: \d+\.\d\d", last), last
    assert float(last.split()[1]) > 0


def test_inference_prints_latency_and_throughput():
    out = run("inference.py", "--repeats", "3")
    assert "torch eager (NCHW)" in out and "torch eager (channels_last)" in out
    assert "ONNX Runtime" in out
    assert re.search(r"\d+\.\d{3} ms\s+[\d,]+", out)
