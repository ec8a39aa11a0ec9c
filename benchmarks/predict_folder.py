"""Images/s of `predict` on a folder of PNG digits: batched (a thread pool decodes and
preprocesses, one forward per batch) vs one image at a time.

    python benchmarks/predict_folder.py runs/x/last.pt [--images 1000] [--data-dir DIR]

Writes the first --images MNIST test digits as PNG files into a temporary folder,
then times folders.predict_many over them (the code `mnist-cnn predict DIR` runs,
without process start-up and printing): (a) batch 1, one thread; (b) the defaults.
Each is the best of --repeats passes. Also prints how many answers match the labels.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.splits import load_split, resolve_data_dir
from mnist_cnn.device import describe
from mnist_cnn.inference.image_files import BATCH, WORKERS, image_paths, predict_many


def timed(model, paths: list[str], dataset, batch: int, workers: int, repeats: int) -> tuple[float, list[int]]:
    """Best seconds over `repeats` passes, and the predicted classes."""
    best, digits = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        digits = [int(item.log_probs.argmax()) for item in predict_many(model, paths, dataset, batch, workers)]
        best = min(best, time.perf_counter() - start)
    return best, digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    model, cfg, _ = load_model_file(args.checkpoint)
    dataset = get_dataset(cfg.dataset)
    images, labels = load_split(
        resolve_data_dir(args.data_dir, cfg.run.data_dir, dataset.name), "test", not args.no_verify, dataset
    )
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.images):
            Image.fromarray(images[i].numpy()).save(Path(folder) / f"{i:05d}.png")
        paths = image_paths([folder])[0]
        one, _ = timed(model, paths, dataset, 1, 1, args.repeats)
        batched, digits = timed(model, paths, dataset, BATCH, WORKERS, args.repeats)
    right = sum(d == int(y) for d, y in zip(digits, labels[: args.images]))
    print(
        f"machine: {describe(torch.device('cpu'))}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(paths)} PNG digits, best of {args.repeats}"
    )
    print(f"(a) one image at a time              {one:6.2f} s  {len(paths) / one:8,.0f} images/s")
    print(f"(b) batches of {BATCH}, {WORKERS} decode threads  {batched:6.2f} s  {len(paths) / batched:8,.0f} images/s")
    print(f"{right}/{len(paths)} read as their label; speed-up {one / batched:.2f}x")


if __name__ == "__main__":
    main()
