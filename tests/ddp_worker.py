"""Run by tests/test_distributed.py under torchrun: one epoch of DDP training on the IDX files in
argv[1], augmentation and dropout off, in float64 (so that it can be compared with its emulation to
~1e-12 on any CPU); process 0 saves the weights and buffers to argv[2]."""

import sys
from pathlib import Path

import torch

from mnist_cnn.checkpoint import EpochProgress, unwrap
from mnist_cnn.data.splits import load_dataset, to_device
from mnist_cnn.device import seed_everything
from mnist_cnn.networks.reference import create, locate
from mnist_cnn.training import distributed
from mnist_cnn.training.loop import NetworkStep, StepSettings, train_epoch
from mnist_cnn.training.state import build_state

# the settings tests/test_distributed.py emulates in one process
OVERRIDES = {
    "batch_size": 32,
    "run.precision": "fp32",
    "run.device": "cpu",
    "run.train_limit": 320,
    "augment.zoom_p": 0.0,
    "augment.max_rotation": 0.0,
    "model_args": {"dropout": 0.0},
    # SGD, not Adam: Adam turns last-bit differences of near-zero gradients into steps of lr
    "optim.name": "sgd",
    "optim.lr": 0.05,
    "optim.momentum": 0.9,
}


def main() -> None:
    from mnist_cnn.config import load_config

    cfg = load_config("seed", OVERRIDES)
    torch.set_default_dtype(torch.float64)  # the network is built, and images enter, in float64
    world = distributed.from_environment()
    device = distributed.start(world, torch.device("cpu"))
    data = to_device(load_dataset(Path(sys.argv[1]), verify=False), device, cfg.run.train_limit, 0, cfg.batch_size)
    seed_everything(cfg.run.seed)
    model = create(locate(cfg.model), data.num_classes, cfg.model_args)
    state = build_state(model, cfg, device, data.steps_per_epoch(cfg.batch_size), world)
    train_epoch(
        NetworkStep(state, StepSettings.from_config(cfg, world)),
        data.train_images,
        data.train_labels,
        [EpochProgress(1)],
    )
    if world.main:
        torch.save(unwrap(state.model).state_dict(), sys.argv[2])
    distributed.stop(world, clean=True)


if __name__ == "__main__":
    main()
