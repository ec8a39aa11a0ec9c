"""Several seeds one after another vs stacked into one model, same number of steps.

    python benchmarks/seeds_throughput.py [--seeds 8] [--steps 100] [--device cpu] [--data-dir DIR]

Both in fp32 (bf16 autocast inside vmap fails in BatchNorm in torch 2.13).

(a) one after another: for each seed, the trainer's own train_one_epoch over
    --steps batches of 64 (its augmentation, channels_last, fused Adam);
(b) together: the seeds' weights stacked with torch.func.stack_module_state and one
    vmap-ed forward/backward per step over (seeds, 64, 1, 28, 28): each seed its own
    batch order, augmentation draws, dropout masks and BatchNorm statistics, one
    fused Adam over the stacked weights (Adam is element-wise, so that is each
    seed's own Adam).

Both are timed after one untimed warm-up pass. Prints both and, last,
`ratio: X.XX` = (a)'s wall time / (b)'s. This measures whether stacking pays on
a device; `mnist-cnn train --seeds` runs the seeds one after another.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from mnist_cnn.augment import augment_batch
from mnist_cnn.config import load_config
from mnist_cnn.data import load_mnist, resolve_data_dir, to_device
from mnist_cnn.device import describe, pick_device, seed_everything, synchronize
from mnist_cnn.inputs import MNIST_NORM, as_log_probs, normalize
from mnist_cnn.networks import create, locate
from mnist_cnn.training import EpochProgress, StepSettings, build_state, epoch_order, rng_key, train_one_epoch

BATCH = 64


def one_after_another(cfg, data, seeds: list[int], device: torch.device) -> float:
    """Seconds for every seed's --steps steps with the trainer's own loop."""
    start = time.perf_counter()
    for seed in seeds:
        cfg.run.seed = seed
        seed_everything(seed)
        state = build_state(create(locate(cfg.model), data.num_classes), cfg, device, data.steps_per_epoch(BATCH))
        train_one_epoch(state, data.train_images, data.train_labels, StepSettings.from_config(cfg), EpochProgress(1))
    synchronize(device)
    return time.perf_counter() - start


def together(cfg, data, seeds: list[int], device: torch.device) -> float:
    """Seconds for the same steps with all seeds stacked into one vmap-ed model."""
    models = []
    for seed in seeds:
        seed_everything(seed)
        models.append(create(locate(cfg.model), data.num_classes).to(device).train())
    params, buffers = stack_module_state(models)  # {name: (seeds, ...)}, updated in place below
    base = copy.deepcopy(models[0]).to("meta")  # the structure only

    def loss_of(p, b, x, y):  # one seed: x (64, 1, 28, 28), y (64,)
        return F.nll_loss(as_log_probs(functional_call(base, (p, b), (x,))), y)

    step_fn = vmap(grad_and_value(loss_of), randomness="different")  # each seed its own dropout masks
    weights = list(params.values())
    optimizer = torch.optim.Adam(weights, lr=cfg.optim.lr, fused=True)
    n, steps = data.train_images.shape[0], data.steps_per_epoch(BATCH)
    orders = [epoch_order(n, seed, 1, device) for seed in seeds]
    rng = torch.Generator(device)
    start = time.perf_counter()
    for step in range(steps):
        xs, ys = [], []
        for seed, order in zip(seeds, orders):
            rng.manual_seed(rng_key(seed, 1, step, 0))
            idx = order[step * BATCH:(step + 1) * BATCH]
            xs.append(normalize(augment_batch(data.train_images[idx], cfg.augment, rng), MNIST_NORM))
            ys.append(data.train_labels[idx])
        x, y = torch.stack(xs), torch.stack(ys)  # (seeds, 64, 1, 28, 28), (seeds, 64)
        grads, _ = step_fn(params, buffers, x, y)
        for w, g in zip(weights, grads.values()):
            w.grad = g
        optimizer.step()
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
    # fp32 for both: bf16 autocast inside vmap fails in BatchNorm in torch 2.13 ("expected scalar type
    # BFloat16 but found Float"), and (a) in bf16 against (b) in fp32 would compare precisions, not stacking
    cfg = load_config("seed", {"run.device": args.device, "run.progress": False, "run.precision": "fp32"})
    mnist = load_mnist(resolve_data_dir(args.data_dir, None, "mnist"), verify=not args.no_verify)
    data = to_device(mnist, device, args.steps * BATCH, 0, BATCH)
    seeds = list(range(args.seeds))
    one_after_another(cfg, data, seeds[:1], device)  # warm-up: first-call allocations and kernels
    together(cfg, data, seeds[:2], device)
    a = one_after_another(cfg, data, seeds, device)
    b = together(cfg, data, seeds, device)
    images = args.seeds * args.steps * BATCH
    print(f"device {describe(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.seeds} seeds x {args.steps} steps of {BATCH}; fp32")
    print(f"(a) one after another (the trainer's loop)  {a:7.2f} s  {images / a:8,.0f} images/s")
    print(f"(b) together (stacked, vmap)                 {b:7.2f} s  {images / b:8,.0f} images/s")
    print(f"ratio: {a / b:.2f}")


if __name__ == "__main__":
    main()
