"""Training throughput: the seed's per-sample pipeline vs this project's, in one process.

    python benchmarks/train_throughput.py [--batches 300] [--device cpu] [--data-dir DIR]

Both pipelines train the seed network at batch 64 with Adam, augmentation
included, and are timed over the same number of batches after a warm-up:

  (a) the seed's way: a torch DataLoader (shuffle, the seed's 2 workers, pin_memory on CUDA)
      whose Dataset does, per image, what torchvision's MNIST + transforms do
      (PIL image; p=0.1 centre-crop 22 -> resize 28; rotation +-15 deg, fill 0;
      ToTensor; Normalize), re-implemented here so torchvision is not needed;
      the model step in the default NCHW layout with torch's default Adam;
  (b) mnist_cnn: data on the device, one batched affine warp per batch,
      the recipe's run settings (channels_last, fused Adam, precision).

Prints a table and, last, `ratio: X.XX` = (b) / (a) in images per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mnist_cnn.checkpoint import EpochProgress
from mnist_cnn.config import load_config
from mnist_cnn.data.contract import MNIST_MEAN, MNIST_STD
from mnist_cnn.data.splits import load_split, resolve_data_dir
from mnist_cnn.device import describe, pick_device, resolve_precision, set_threads, synchronize
from mnist_cnn.errors import DataError
from mnist_cnn.networks.builtin import build_model
from mnist_cnn.training.graph import GraphStep
from mnist_cnn.training.loop import NetworkStep, StepSettings, train_epoch
from mnist_cnn.training.state import build_state

BATCH = 64
TRAIN_IMAGES = 60_000
SEED_WORKERS = 2  # the seed notebook's DataLoader(num_workers=2)


class PerSampleSeedDataset(Dataset):
    """The seed's torchvision pipeline, step for step, without depending on torchvision:

    MNIST.__getitem__   -> Image.fromarray(img.numpy(), mode="L")
    RandomApply(p=0.1)  -> torch.rand(1) draw; CenterCrop(22) + Resize(28) (PIL bilinear)
    RandomRotation(15)  -> torch.empty(1).uniform_(-15, 15); PIL rotate, NEAREST, fill 0
    ToTensor            -> np.array copy, view (H, W, C), permute, contiguous, float / 255
    Normalize           -> mean/std as tensors, std == 0 check, sub_ / div_
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i].numpy())
        if not 0.1 < torch.rand(1):
            img = img.crop((3, 3, 25, 25)).resize((28, 28), Image.BILINEAR)
        angle = float(torch.empty(1).uniform_(-15.0, 15.0).item())
        img = img.rotate(angle, resample=Image.NEAREST, expand=False, center=None, fillcolor=0)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))
        x = x.view(img.size[1], img.size[0], 1).permute((2, 0, 1)).contiguous().to(torch.float32).div(255)
        mean = torch.as_tensor((MNIST_MEAN,), dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor((MNIST_STD,), dtype=x.dtype).view(-1, 1, 1)
        if (std == 0).any():
            raise ValueError("std evaluated to zero")
        return x.sub_(mean).div_(std), int(self.labels[i])


def seed_loader(images: torch.Tensor, labels: torch.Tensor, workers: int, device: torch.device) -> DataLoader:
    """The seed's DataLoader: shuffled batches of 64, pinned memory when training on CUDA."""
    return DataLoader(
        PerSampleSeedDataset(images, labels),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )


def bench_per_sample(
    images: torch.Tensor, labels: torch.Tensor, batches: int, warmup: int, workers: int, device: torch.device
) -> float:
    model = build_model("seed").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = seed_loader(images, labels, workers, device)
    model.train()
    it = iter(loader)
    start = None
    for step in range(warmup + batches):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        loss = F.nll_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()
    synchronize(device)
    return batches * BATCH / (time.perf_counter() - start)


def bench_ours(
    images: torch.Tensor, labels: torch.Tensor, batches: int, warmup: int, device: torch.device, overrides: dict
) -> tuple[float, float]:
    """(images/s, the warm-up pass's seconds beyond its steady-state time: compiling), the seed recipe's settings."""
    cfg = load_config("seed", {"run.device": str(device), **overrides})
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    images, labels = images.to(device), labels.long().to(device)
    threads = torch.get_num_threads()
    set_threads(cfg.run.threads)
    state = build_state(build_model(cfg.model), cfg, device, steps_per_epoch=batches)
    settings = StepSettings.from_config(cfg)
    graphed = GraphStep(state, cfg, settings, batches) if cfg.run.compile == "step" else None
    timings = []
    # The whole-step graph is specialized to its epoch's shapes (steps, 64): its warm-up is a full-length
    # pass, or the timed one would compile again.
    for n in (batches if graphed is not None else warmup, batches):  # a warm-up "epoch", then the measured one
        synchronize(device)
        start = time.perf_counter()
        x, y, progress = images[: n * BATCH], labels[: n * BATCH], [EpochProgress(n)]
        if graphed is not None:  # the whole step compiled, the epoch's draws made first (training.graph)
            train_epoch(graphed, x, y, progress)
        else:
            train_epoch(NetworkStep(state, settings), x, y, progress)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return batches * BATCH / timings[1], timings[0] - timings[1] * (batches if graphed else warmup) / batches


def load_images(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        images, labels = load_split(resolve_data_dir(data_dir), "train")
        return images.numpy(), labels.numpy(), "MNIST train"
    except DataError:
        rng = np.random.default_rng(0)  # speed does not depend on the pixels
        return (
            rng.integers(0, 256, (TRAIN_IMAGES, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, TRAIN_IMAGES, dtype=np.uint8),
            "random uint8 (MNIST not found)",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--workers",
        type=int,
        default=SEED_WORKERS,
        help=f"DataLoader workers for (a), default {SEED_WORKERS} as in the seed",
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is reported")
    parser.add_argument("--data-dir")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="an extra (b) variant, e.g. run.precision=fp32 (repeatable). Time run.compile=model or "
        "run.compile=step (the whole step, training.graph) in a run of its own: inductor's compile "
        "workers linger and slow what follows",
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    images, labels, source = load_images(args.data_dir)
    variants = {"(b) mnist_cnn, recipe seed": {}}
    for spec in args.also:
        from mnist_cnn.config import parse_override

        variants[f"(b) with {spec}"] = dict(parse_override(kv) for kv in spec.split(","))
    a_runs, b_runs = [], {name: [] for name in variants}
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        a_runs.append(bench_per_sample(images_t, labels_t, args.batches, args.warmup, args.workers, device))
        for name, overrides in variants.items():
            b_runs[name].append(bench_ours(images_t, labels_t, args.batches, args.warmup, device, overrides))
    a = statistics.median(a_runs)
    cfg = load_config("seed", {"run.device": str(device)})
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    name = describe(device) + ("" if device.type == "cuda" else f", {os.cpu_count()} cores")
    print(
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"data: {source}; batch {BATCH}; {args.batches} timed batches after {args.warmup}; "
        f"median of {args.repeats}"
    )
    print(f"(b) settings: precision {cfg.run.precision}, channels_last {cfg.run.channels_last}, fused Adam")
    print(f"{'pipeline':<58} {'images/s':>10} {'s/epoch':>8}")
    print(f"{f'(a) per-sample PIL + DataLoader({args.workers} workers)':<58} {a:>10,.0f} {TRAIN_IMAGES / a:>8.1f}")
    for vname, runs in b_runs.items():
        b = statistics.median(r[0] for r in runs)
        print(f"{vname:<58} {b:>10,.0f} {TRAIN_IMAGES / b:>8.1f}")
        if "compile" in vname:  # the first warm-up pass compiles; the rest of it runs at speed b
            print(f"{'':<4}compile time (first warm-up pass minus its steady-state time): {runs[0][1]:.1f} s")
    print(f"ratio: {statistics.median(r[0] for r in b_runs['(b) mnist_cnn, recipe seed']) / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
