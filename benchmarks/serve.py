"""Throughput and latency of `mnist-cnn serve`: POST /api/predict with MNIST test digits
from concurrent clients on 127.0.0.1.

    python benchmarks/serve.py runs/x/last.pt [--requests 1000] [--clients 8] [--large 8] [--data-dir DIR]
                               [--refused 10] [--bodies 200]

Starts the server as a user does (`mnist-cnn serve CKPT --port 0`, a subprocess),
sends --warmup requests, then --requests more from --clients threads, each on its
own keep-alive connection, and prints requests/s, p50/p95/p99 latency (client side,
request sent to answer read), the 503s (no work slot free in time) and the
server's own time per request (its Server-Timing header). With --large N, N more
clients then upload at once one picture each at predict's pixel limit (a few
hundred kB of PNG that decode to 40 Mpx): how many are answered and how many
refused with 503, their latency, and the server's peak memory before and after
(Linux). With --refused N, one client first sends N 12-megapixel photos of a
blank page one after another (each refused 400, no ink): the server's memory
(VmRSS) before and after, which a refusal that kept its arrays would grow by
~150 MB each. With --bodies M, M clients then send at once one body each of the
maximum size (noise, refused 400 once read, or 503 unread when the budget for
bodies stays full): the server's peak memory (VmHWM) during that.
The peak is restarted before each part (/proc/PID/clear_refs). The clients run
on the same machine, so on a small CPU they take part of the time they measure.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

from mnist_cnn.data.splits import load_split, resolve_data_dir
from mnist_cnn.device import describe
from mnist_cnn.inference.predict import MAX_PIXELS
from mnist_cnn.serving.limits import BODY_LIMIT, SLOT_WAIT_S, WORK_SLOTS

BOUNDARY = uuid.uuid4().hex
START_S = 120  # the server's start: torch import and model load
ANSWER_S = 300  # a client gives up on an answer after this long (8 unbounded 40 Mpx uploads took 60 s on 2 cores)
PAGE = (4000, 3000)  # a 12 Mpx phone photo
PAPER, GRAIN = 235, 2.0  # the blank page's gray level and its sensor noise: far below predict's MIN_CONTRAST


def form(png: bytes, name: str) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def test_digits(data_dir: str | None, n: int, verify: bool) -> tuple[list[bytes], list[int]]:
    """The first n MNIST test digits as multipart bodies of PNG files, and their labels."""
    images, labels = load_split(resolve_data_dir(data_dir, None, "mnist"), "test", verify)
    bodies = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i % len(images)].numpy()).save(buf, format="PNG")
        bodies.append(form(buf.getvalue(), f"test-{i}.png"))
    return bodies, [int(labels[i % len(labels)]) for i in range(n)]


def large_picture() -> tuple[bytes, str]:
    """A multipart body of one RGB PNG, square, at MAX_PIXELS: a thick "1" on white, as a
    photo of a sheet of paper, and its description."""
    side = math.isqrt(MAX_PIXELS)
    img = Image.new("RGB", (side, side), "white")
    ImageDraw.Draw(img).line(
        [(side // 2, side // 6), (side // 2 + side // 30, 5 * side // 6)], fill="black", width=side // 20
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return form(buf.getvalue(), "large.png"), f"{side}x{side} RGB PNG ({len(buf.getvalue()) / 1e3:,.0f} kB)"


def blank_page() -> tuple[bytes, str]:
    """A multipart body of one JPEG photo of a blank page, which predict refuses (no ink), and its description."""
    noise = np.random.default_rng(0).normal(0, GRAIN, (PAGE[1], PAGE[0], 3))  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(PAPER + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return form(
        buf.getvalue(), "page.jpg"
    ), f"{PAGE[0]}x{PAGE[1]} JPEG of a blank page ({len(buf.getvalue()) / 1e3:,.0f} kB)"


def full_body() -> bytes:
    """A multipart body of exactly BODY_LIMIT bytes: noise, refused 400 (not an image) once read whole."""
    size = BODY_LIMIT - len(form(b"", "noise.png"))
    return form(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes(), "noise.png")


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A figure of /proc/PID/status in MB: VmHWM (peak resident memory) or VmRSS (now); NaN where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return math.nan


def restart_peak(pid: int) -> None:
    """VmHWM starts again from the present resident size (Linux 4.0+), so each part's peak is its own."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # another system, or not allowed: the peaks then run on from the earlier parts
        pass


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", checkpoint, "--port", "0"], stdout=subprocess.PIPE, text=True
    )
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
    conn = http.client.HTTPConnection(host, port, timeout=ANSWER_S)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    for i in jobs:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/api/predict", body=bodies[i], headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())  # a 503 (no slot in time) has no digit and no Server-Timing
        except OSError:  # no answer within ANSWER_S, or the connection dropped: counted, and a new connection
            out[i] = (time.perf_counter() - t0, None, None, math.nan)
            conn.close()
            continue
        out[i] = (
            time.perf_counter() - t0,
            response.status,
            answer.get("digit"),
            float(response.getheader("Server-Timing", "dur=nan").split("dur=")[1]),
        )
    conn.close()


def run(host: str, port: int, bodies: list[bytes], clients: int) -> tuple[float, dict]:
    """Wall seconds and {index: (latency s, status, digit, server ms)} for all bodies."""
    out: dict = {}
    threads = [
        threading.Thread(target=client, args=(host, port, list(range(c, len(bodies), clients)), bodies, out))
        for c in range(clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def percentiles_ms(out: dict, qs: tuple[int, ...]) -> str:
    latency_ms = np.array([out[i][0] for i in out]) * 1000
    return ", ".join(f"p{q} {np.percentile(latency_ms, q):.2f} ms" for q in qs)


def tally(out: dict) -> str:
    """How the requests in `out` were answered, by status: "3 answered 400, 197 answered 503"."""
    counts = Counter(out[i][1] for i in out)
    return ", ".join(
        f"{n} {'unanswered' if code is None else f'answered {code}'}" for code, n in sorted(counts.items(), key=str)
    )


def statuses(out: dict) -> str:
    """How the requests in `out` were answered: 200, 503 (no work slot in time), or not at all."""
    ok, busy, lost = (sum(out[i][1] == status for i in out) for status in (200, 503, None))
    return f"{ok} answered 200, {busy} refused 503, {lost} unanswered"


def bodies_part(pid: int, host: str, port: int, clients: int) -> str:
    """`clients` clients at once send one maximum-size body each: the server's peak memory meanwhile."""
    body = full_body()
    restart_peak(pid)
    start_mb = memory_mb(pid, "VmRSS")
    wall, out = run(host, port, [body] * clients, clients)
    return (
        f"{clients} clients at once, one {BODY_LIMIT / 2**20:g} MB body each (noise): {tally(out)} in {wall:.2f} s; "
        f"server memory {start_mb:,.0f} MB at the start, peak {memory_mb(pid):,.0f} MB"
    )


def refused_part(pid: int, host: str, port: int, uploads: int) -> str:
    """`uploads` photos of a blank page, one after another, each refused: the server's memory before and after."""
    page, about = blank_page()
    before_mb = memory_mb(pid, "VmRSS")
    wall, out = run(host, port, [page] * uploads, 1)
    return (
        f"{uploads} uploads one after another of a {about}: {tally(out)} in {wall:.2f} s; "
        f"server memory (RSS) {before_mb:,.0f} MB before, {memory_mb(pid, 'VmRSS'):,.0f} MB after"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt checkpoint or a .safetensors export")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--refused", type=int, default=0, metavar="N", help="then N 12-megapixel blank pages, one after another"
    )
    parser.add_argument(
        "--bodies", type=int, default=0, metavar="M", help="then M clients at once send a 10 MB body each"
    )
    parser.add_argument(
        "--large", type=int, default=0, metavar="N", help="then N clients at once upload one 40-megapixel picture each"
    )
    parser.add_argument("--data-dir", help="MNIST test files (default: $MNIST_CNN_DATA or the cache)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check (your own IDX files)")
    args = parser.parse_args()
    bodies, labels = test_digits(args.data_dir, args.requests, not args.no_verify)
    proc, host, port = start_server(args.checkpoint)
    large, large_about = large_picture() if args.large else (b"", "")
    parts = []
    try:
        run(host, port, bodies[: args.warmup], args.clients)
        wall, out = run(host, port, bodies, args.clients)
        peak_before = memory_mb(proc.pid)
        if args.refused:
            parts.append(refused_part(proc.pid, host, port, args.refused))
        if args.bodies:
            parts.append(bodies_part(proc.pid, host, port, args.bodies))
        if args.large:
            restart_peak(proc.pid)
            large_wall, large_out = run(host, port, [large] * args.large, args.large)
            peak_after = memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    right = sum(out[i][2] == labels[i] for i in out)
    server_ms = [out[i][3] for i in out if out[i][1] == 200] or [math.nan]
    print(
        f"machine: {describe(torch.device('cpu'))}, {os.cpu_count()} cores (server and clients share them); "
        f"server: {WORK_SLOTS} work slots, {SLOT_WAIT_S:g} s wait for one"
    )
    print(
        f"{len(bodies)} POST /api/predict, {args.clients} concurrent clients on {host}: "
        f"{statuses(out)}, {right} read as their label"
    )
    print(f"throughput: {len(bodies) / wall:,.0f} requests/s ({wall:.2f} s)")
    print(f"latency: {percentiles_ms(out, (50, 95, 99))}; server time p50 {statistics.median(server_ms):.2f} ms")
    for line in parts:
        print(line)
    if args.large:
        print(
            f"{args.large} clients at once, one {large_about} each, {MAX_PIXELS / 1e6:g} Mpx decoded: "
            f"{statuses(large_out)} in {large_wall:.2f} s"
        )
        print(
            f"latency: {percentiles_ms(large_out, (50, 95))}; "
            f"server peak memory {peak_before:,.0f} MB before, {peak_after:,.0f} MB after"
        )


if __name__ == "__main__":
    main()
