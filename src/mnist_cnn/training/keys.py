"""Randomness derived, never carried: every draw of training comes from a key of (seed, epoch[, step, stream]).

    order = epoch_order(n, seed, epoch, device)                     # (n,) the epoch's permutation
    draws = step_draws(b, cfg.augment, seed, epoch, step, device)   # one step's augmentation draws
    torch.manual_seed(rng_key(seed, epoch, step, DROPOUT_STREAM))   # one step's dropout masks

A run stopped mid-epoch therefore continues from its step count alone, on any device, and
the default step (training.loop) and the compiled one (training.graph), which draws its
whole epoch up front, make the same draws.
"""

from __future__ import annotations

import torch

from mnist_cnn.config import AugmentConfig
from mnist_cnn.data.augment import Draws, draw

SEED_STRIDE = 1_000_003  # a prime larger than any step count: (seed, epoch, step) keys never collide
AUGMENT_STREAM, DROPOUT_STREAM = 0, 1  # separate streams, so dropout masks never mirror augmentation draws


def rng_key(*parts: int) -> int:
    """(seed, epoch[, step, stream]) -> one 63-bit generator seed, distinct for each combination."""
    key = 0
    for part in parts:
        key = (key * SEED_STRIDE + part) % 2**63
    return key


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's permutation of n indices, drawn on the CPU so that it is the same on any device."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(rng_key(seed, epoch))).to(device)


def step_draws(n: int, cfg: AugmentConfig, seed: int, epoch: int, step: int, device: torch.device) -> Draws:
    """The augmentation draws of one seed's n images at (epoch, step), on `device`."""
    g = torch.Generator(device).manual_seed(rng_key(seed, epoch, step, AUGMENT_STREAM))
    return draw(n, cfg, g, device)
