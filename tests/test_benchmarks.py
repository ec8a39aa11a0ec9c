"""The benchmark scripts run end to end on a few batches (their figures come from real runs, not tests)."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_train_throughput_prints_both_pipelines_and_the_ratio():
    out = run(
        "train_throughput.py",
        "--batches",
        "3",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--workers",
        "0",
        "--also",
        "run.precision=fp32",
    )
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


def test_serve_prints_throughput_and_latency_of_every_request(synthetic_run):
    data, run_dir = synthetic_run
    out = run(
        "serve.py",
        str(run_dir / "last.pt"),
        "--requests",
        "24",
        "--clients",
        "4",
        "--warmup",
        "4",
        "--large",
        "1",
        "--data-dir",
        str(data),
        "--no-verify",
    )
    assert "24 POST /api/predict, 4 concurrent clients on 127.0.0.1: 24 answered 200, 0 refused 503" in out
    assert re.search(r"throughput: [\d,]+ requests/s", out)
    assert re.search(
        r"latency: p50 \d+\.\d\d ms, p95 \d+\.\d\d ms, p99 \d+\.\d\d ms; "
        r"server time p50 \d+\.\d\d ms",
        out,
    )
    # one picture at predict's pixel limit: answered, and the server's peak memory reported
    assert re.search(
        r"1 clients at once, one \d+x\d+ RGB PNG \([\d,]+ kB\) each, 40 Mpx decoded: "
        r"1 answered 200, 0 refused 503",
        out,
    )
    assert re.search(r"server peak memory [\d,]+ MB before, [\d,]+ MB after", out)


def test_seeds_throughput_times_both_ways_and_prints_the_ratio(synthetic_run):
    data, _ = synthetic_run
    out = run("seeds_throughput.py", "--seeds", "2", "--steps", "3", "--data-dir", str(data), "--no-verify")
    assert "2 seeds x 3 steps of 64" in out
    assert "(a)   one after another" in out and "(b)   together (stacked, vmap)" in out
    assert "stacking alone (a32 / b): " in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio: \d+\.\d\d", last) and float(last.split()[1]) > 0, last


def test_predict_folder_prints_both_ways_and_the_speed_up(synthetic_run):
    data, run_dir = synthetic_run
    out = run(
        "predict_folder.py",
        str(run_dir / "last.pt"),
        "--images",
        "20",
        "--repeats",
        "1",
        "--data-dir",
        str(data),
        "--no-verify",
    )
    assert "20 PNG digits, best of 1" in out and "(a) one image at a time" in out and "(b) batches of 256" in out
    assert re.search(r"\d+/20 read as their label; speed-up \d+\.\d\dx", out)


def test_the_per_sample_pipeline_defaults_to_the_seeds_loader_settings(monkeypatch):
    """(a) is the seed's pipeline: 2 DataLoader workers whatever the machine, pinned memory on CUDA."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py"])
    images, labels = torch.zeros(128, 28, 28, dtype=torch.uint8), torch.zeros(128, dtype=torch.uint8)
    assert bench.SEED_WORKERS == 2
    assert "default 2 as in the seed" in run("train_throughput.py", "--help")
    cuda = bench.seed_loader(images, labels, bench.SEED_WORKERS, torch.device("cuda"))
    cpu = bench.seed_loader(images, labels, bench.SEED_WORKERS, torch.device("cpu"))
    assert (cuda.num_workers, cuda.pin_memory, cuda.batch_size) == (2, True, 64)
    assert (cpu.num_workers, cpu.pin_memory) == (2, False)


def test_the_gpu_script_runs_on_a_cpu(synthetic_run, tmp_path):
    """benchmarks/gpu.sh, the one command behind the GPU figures of docs/performance.md, tried on the CPU with tiny
    settings on the synthetic digits: every step runs and exits 0 (on a GPU machine the same steps
    time the real thing)."""
    import os

    data, _ = synthetic_run
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DEVICE": "cpu",
        "QUICK": "--epochs 1 --train-limit 320",
        "STEPS": "2",
        "SEEDS": "0-1",
        "NO_VERIFY": "1",
        "RUNS": str(tmp_path / "runs"),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), str(data), str(tmp_path / "logs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, proc.stderr
    exits = re.findall(r"== ([\w-]+): exit (\d+)", proc.stdout)
    assert "== cuda-tests: skipped on the CPU" in proc.stdout
    assert [name for name, _ in exits] == [
        "torchrun",
        "seed-recipe",
        "seeds-throughput",
        "five-seeds-together",
    ]
    assert all(code == "0" for _, code in exits), proc.stdout
    five = (tmp_path / "logs" / "five-seeds-together.log").read_text()
    assert "2 seeds of recipe seed (seed): final-epoch test accuracy" in five
