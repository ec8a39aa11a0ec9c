"""How far the inductor-compiled training step (run.compile = "step") lands from the same step run eagerly.

    python benchmarks/graph_step_check.py [--dtype float64] [--epochs 2] [--images 200]

Trains the seed network with the `best` recipe's step (one-cycle Adam, label smoothing, scale and
elastic warps) plus a weight average, from the same initial weights, on random images: once with
training.graph.GraphStep run eagerly, once compiled by torch.compile's inductor. The suite compares
the traced graphs without code generation (tests/test_graph.py, backend aot_eager) because
inductor's C++ compile takes minutes on a 2-core CPU; this prints the figure for inductor itself:
the largest weight difference, apart from and including the conv biases that BatchNorm cancels
(their gradient is rounding noise, which Adam scales up to a step of the learning rate's size).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mnist_cnn.config import load_config
from mnist_cnn.data.splits import Splits
from mnist_cnn.networks.builtin import build_model
from mnist_cnn.training.graph import GraphStep
from mnist_cnn.training.loop import StepSettings, fit
from mnist_cnn.training.state import TrainState, build_state

CPU = torch.device("cpu")


def train(images: int, epochs: int, compiled: bool) -> tuple[TrainState, list[float], float]:
    cfg = load_config(
        "best",
        {"run.device": "cpu", "run.precision": "fp32", "run.channels_last": False, "run.compile": "step"},
    )
    cfg.epochs, cfg.optim.ema = epochs, 0.99
    g = torch.Generator().manual_seed(0)
    data = Splits(
        torch.randint(0, 256, (images, 28, 28), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (images,), generator=g),
        None,
        None,
    )
    torch.manual_seed(0)
    steps = data.steps_per_epoch(cfg.batch_size)
    state = build_state(build_model("seed"), cfg, CPU, steps)
    start = time.perf_counter()
    rows = fit(GraphStep(state, cfg, StepSettings.from_config(cfg), steps, compiled=compiled), data, [cfg])
    losses = [r[0]["train_loss"] for r in rows]
    return state, losses, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=200, help="random training images (200: 4 steps, the last short)")
    args = parser.parse_args()
    torch.set_default_dtype(getattr(torch, args.dtype))
    eager, eager_losses, _ = train(args.images, args.epochs, compiled=False)
    compiled, compiled_losses, seconds = train(args.images, args.epochs, compiled=True)
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    noise = {k for k in a if k.endswith(".0.bias") or k.endswith(".1.running_mean")}
    rest = max((a[k].double() - b[k].double()).abs().max().item() for k in a if k not in noise)
    every = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    ema_a, ema_b = eager.evaluated.state_dict(), compiled.evaluated.state_dict()
    ema = max((ema_a[k].double() - ema_b[k].double()).abs().max().item() for k in ema_a if k not in noise)
    loss = max(abs(x - y) / abs(x) for x, y in zip(eager_losses, compiled_losses))
    print(f"torch {torch.__version__}, {args.dtype}, seed network, {args.epochs} epochs of {args.images} images")
    print(f"compiled run (inductor, compile included): {seconds:.1f} s")
    print(f"max |compiled - eager| weight: {rest:.3g} (conv biases before BatchNorm and their means: {every:.3g})")
    print(f"max |compiled - eager| weight average: {ema:.3g}; train loss, relative: {loss:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
