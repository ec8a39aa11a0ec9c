"""Several seeds one after another vs stacked into one model (train --seeds --together), same steps.

    python benchmarks/seeds_throughput.py [--seeds 8] [--steps 100] [--device cpu] [--data-dir DIR]

(a) one after another: for each seed, the trainer's own train_epoch over
    --steps batches of 64, as `--together no` runs it: the recipe's precision
    (auto: bf16 where native) and channels_last;
(a32) the same in fp32 without channels_last: what the stack computes, so that
    (a32) / (b) is what stacking alone gains;
(b) together: the same train_epoch over a StackStep (training.stack), the seeds'
    weights stacked, one vmap-ed forward/backward per step (fp32: bf16 autocast
    inside vmap fails in BatchNorm in torch 2.13), each seed its own batch order,
    augmentation draws, BatchNorm statistics and Adam.

Each is timed after an untimed warm-up. Prints the three and, last,
`ratio: X.XX` = (a)'s wall time / (b)'s: what --together yes gains over --together no.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mnist_cnn.checkpoint import EpochProgress
from mnist_cnn.config import load_config
from mnist_cnn.data.splits import load_dataset, resolve_data_dir, to_device
from mnist_cnn.device import describe, pick_device, resolve_precision, seed_everything, synchronize
from mnist_cnn.networks.reference import create, locate
from mnist_cnn.training.loop import NetworkStep, StepSettings, train_epoch
from mnist_cnn.training.stack import StackStep
from mnist_cnn.training.state import build_state

BATCH = 64


def states_of(cfg, data, seeds: list[int], device: torch.device):
    out = []
    for seed in seeds:
        cfg.run.seed = seed
        seed_everything(seed)
        out.append(build_state(create(locate(cfg.model), data.num_classes), cfg, device, data.steps_per_epoch(BATCH)))
    return out


def one_after_another(cfg, data, seeds: list[int], device: torch.device) -> float:
    """Seconds for every seed's --steps steps with the trainer's own loop."""
    start = time.perf_counter()
    for seed, state in zip(seeds, states_of(cfg, data, seeds, device)):
        cfg.run.seed = seed
        train_epoch(
            NetworkStep(state, StepSettings.from_config(cfg)), data.train_images, data.train_labels, [EpochProgress(1)]
        )
    synchronize(device)
    return time.perf_counter() - start


def together(cfg, data, seeds: list[int], device: torch.device) -> float:
    """Seconds for the same steps with all seeds stacked, as train --seeds --together yes runs them."""
    start = time.perf_counter()
    states = states_of(cfg, data, seeds, device)
    settings = []
    for seed in seeds:
        cfg.run.seed = seed
        settings.append(StepSettings.from_config(cfg))
    train_epoch(StackStep(states, settings), data.train_images, data.train_labels, [EpochProgress(1) for _ in seeds])
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="training steps of 64 images per seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    cfg = load_config("seed", {"run.device": args.device, "run.progress": False})
    cfg.run.precision = resolve_precision(cfg.run.precision, device)
    fp32 = copy.deepcopy(cfg)
    fp32.run.precision, fp32.run.channels_last = "fp32", False
    mnist = load_dataset(resolve_data_dir(args.data_dir, None, "mnist"), verify=not args.no_verify)
    data = to_device(mnist, device, args.steps * BATCH, 0, BATCH)
    seeds = list(range(args.seeds))
    one_after_another(cfg, data, seeds[:1], device)  # warm-up: first-call allocations and kernels
    one_after_another(fp32, data, seeds[:1], device)
    together(fp32, data, seeds[:2], device)
    a = one_after_another(cfg, data, seeds, device)
    a32 = one_after_another(fp32, data, seeds, device)
    b = together(fp32, data, seeds, device)
    images = args.seeds * args.steps * BATCH
    print(
        f"device {describe(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.seeds} seeds x {args.steps} steps of {BATCH}"
    )
    print(
        f"(a)   one after another, {cfg.run.precision}{', channels_last' if cfg.run.channels_last else ''}"
        f"  {a:7.2f} s  {images / a:8,.0f} images/s"
    )
    print(f"(a32) one after another, fp32            {a32:7.2f} s  {images / a32:8,.0f} images/s")
    print(f"(b)   together (stacked, vmap), fp32     {b:7.2f} s  {images / b:8,.0f} images/s")
    print(f"stacking alone (a32 / b): {a32 / b:.2f}")
    print(f"ratio: {a / b:.2f}")


if __name__ == "__main__":
    main()
