"""Throughput and latency of `mnist-cnn serve`: POST /api/predict with MNIST test digits
from concurrent clients on 127.0.0.1.

    python benchmarks/serve.py runs/x/last.pt [--requests 1000] [--clients 8] [--data-dir DIR]

Starts the server as a user does (`mnist-cnn serve CKPT --port 0`, a subprocess),
sends --warmup requests, then --requests more from --clients threads, each on its
own keep-alive connection, and prints requests/s, p50/p99 latency (client side,
request sent to answer read) and the server's own time per request (its
Server-Timing header). The clients run on the same machine, so on a small CPU
they take part of the time they measure.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import torch
from PIL import Image

from mnist_cnn.data import load_split, resolve_data_dir
from mnist_cnn.device import describe

BOUNDARY = uuid.uuid4().hex
START_S = 120  # the server's start: torch import and model load


def form(png: bytes, name: str) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_digits(data_dir: str | None, n: int, verify: bool) -> tuple[list[bytes], list[int]]:
    """The first n MNIST test digits as multipart bodies of PNG files, and their labels."""
    images, labels = load_split(resolve_data_dir(data_dir, None, "mnist"), "test", verify)
    bodies = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i % len(images)].numpy()).save(buf, format="PNG")
        bodies.append(form(buf.getvalue(), f"test-{i}.png"))
    return bodies, [int(labels[i % len(labels)]) for i in range(n)]


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "mnist_cnn", "serve", checkpoint, "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    deadline = threading.Timer(START_S, proc.kill)
    deadline.start()
    line = proc.stdout.readline()
    deadline.cancel()
    match = re.search(r"http://([\d.]+):(\d+)/", line)
    if not match:
        proc.kill()
        sys.exit(f"error: the server did not start ({line.strip() or 'no output'})")
    return proc, match.group(1), int(match.group(2))


def client(host: str, port: int, jobs: list[int], bodies: list[bytes], out: dict) -> None:
    """Send the requests `jobs` (indices into bodies) one after another on one connection."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for i in jobs:
        t0 = time.perf_counter()
        conn.request("POST", "/api/predict", body=bodies[i], headers=headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
        out[i] = (time.perf_counter() - t0, response.status, answer.get("digit"),
                  float(response.getheader("Server-Timing", "dur=nan").split("dur=")[1]))
    conn.close()


def run(host: str, port: int, bodies: list[bytes], clients: int) -> tuple[float, dict]:
    """Wall seconds and {index: (latency s, status, digit, server ms)} for all bodies."""
    out: dict = {}
    threads = [threading.Thread(target=client, args=(host, port, list(range(c, len(bodies), clients)), bodies, out))
               for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt checkpoint or a .safetensors export")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--data-dir", help="MNIST test files (default: $MNIST_CNN_DATA or the cache)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check (your own IDX files)")
    args = parser.parse_args()
    bodies, labels = test_digits(args.data_dir, args.requests, not args.no_verify)
    proc, host, port = start_server(args.checkpoint)
    try:
        run(host, port, bodies[:args.warmup], args.clients)
        wall, out = run(host, port, bodies, args.clients)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latency_ms = np.array([out[i][0] for i in range(len(bodies))]) * 1000
    ok = sum(out[i][1] == 200 for i in out)
    right = sum(out[i][2] == labels[i] for i in out)
    print(f"machine: {describe(torch.device('cpu'))}, {os.cpu_count()} cores (server and clients share them)")
    print(f"{len(bodies)} POST /api/predict, {args.clients} concurrent clients on {host}: "
          f"{ok} answered 200, {right} read as their label")
    print(f"throughput: {len(bodies) / wall:,.0f} requests/s ({wall:.2f} s)")
    print(f"latency: p50 {np.percentile(latency_ms, 50):.2f} ms, p99 {np.percentile(latency_ms, 99):.2f} ms; "
          f"server time p50 {statistics.median(out[i][3] for i in out):.2f} ms")


if __name__ == "__main__":
    main()
