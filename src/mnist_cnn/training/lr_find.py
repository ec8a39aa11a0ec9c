"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017):
train a fresh copy of the recipe's network for a few hundred steps while the learning rate grows
exponentially, and read a good rate off the smoothed loss.

    found = range_test(cfg, data, device)      # LrFind: lrs, losses, smoothed, suggestion, reason
    found.suggestion                            # the rate of steepest descent of the smoothed loss

The steps are the recipe's own (its optimizer, augmentation, precision, label smoothing and data, the
validation split held out), from weights initialized by the recipe's seed; nothing is saved and no
network of the caller's is touched. The test set is never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mnist_cnn.config import Config
from mnist_cnn.data.contract import normalize
from mnist_cnn.data.splits import Splits
from mnist_cnn.device import seed_everything
from mnist_cnn.errors import TrainingError
from mnist_cnn.training.loop import NetworkStep, StepSettings, augmented, epoch_order
from mnist_cnn.training.run import new_network
from mnist_cnn.training.state import build_state

START_LR = 1e-7  # far below any useful rate: the loss does not move yet
END_LR = 10.0  # far above: the loss diverges well before it
STEPS = 300  # fastai's and torch-lr-finder's default is 100; more steps, a smoother curve (about 10 s on a CPU)
SMOOTHING = 0.95  # the loss's exponential moving average (bias-corrected; torch-lr-finder's 0.05 of each new loss)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest
SKIP_START, SKIP_END = 10, 5  # points left out of the slope: the first are noise, the last diverge


@dataclass
class LrFind:
    """What the range test found: the rates tried, the raw and smoothed loss at each, and the suggestion."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the plain NLL of each step's batch
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan  # the rate of steepest descent of the smoothed loss
    lowest: float = math.nan  # the rate where the smoothed loss was lowest
    reason: str = ""  # how the suggestion was read, in one sentence

    def as_dict(self) -> dict:
        return {
            "suggestion": self.suggestion,
            "lowest": self.lowest,
            "reason": self.reason,
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
        }


def rates(start: float, end: float, steps: int) -> list[float]:
    """steps rates from start to end, evenly spaced on a log scale."""
    return [start * (end / start) ** (i / max(1, steps - 1)) for i in range(steps)]


def range_test(
    cfg: Config, data: Splits, device: torch.device, start: float = START_LR, end: float = END_LR, steps: int = STEPS
) -> LrFind:
    """Smith's range test of cfg's recipe on data's training images (see the module's docstring)."""
    seed_everything(cfg.run.seed, cfg.run.deterministic)  # the weights a run of the recipe starts from
    _, model = new_network(cfg, data, device)
    per_epoch = data.steps_per_epoch(cfg.batch_size)
    state = build_state(model, cfg, device, per_epoch)
    settings = StepSettings.from_config(cfg)
    step_fn = NetworkStep(state, settings)
    step_fn.train()
    found = LrFind()
    average, best = 0.0, math.inf
    images, labels = data.train_images, data.train_labels
    for i, lr in enumerate(rates(start, end, steps)):
        epoch, step = 1 + i // per_epoch, i % per_epoch
        order = epoch_order(images.shape[0], cfg.run.seed, epoch, images.device)
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = normalize(augmented(images[idx], [settings], epoch, step), settings.norm)  # (b, 1, 28, 28)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        _, plain = step_fn(x.unsqueeze(0), labels[idx].unsqueeze(0), idx.shape[0])
        loss = float(plain[0])
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smooth = average / (1 - SMOOTHING ** (i + 1))  # bias-corrected: the first values are not pulled to 0
        found.lrs.append(lr)
        found.losses.append(loss)
        found.smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > DIVERGED * best:
            break
    suggest(found)
    return found


def suggest(found: LrFind) -> None:
    """The suggestion and its reason: the steepest descent of the smoothed loss against log(lr), among
    the points between the noisy first ones and the diverging last ones."""
    n = len(found.smoothed)
    if n < SKIP_START + SKIP_END + 3:
        where = f" (at lr {found.lrs[-1]:.2g})" if found.lrs else ""
        raise TrainingError(f"the loss diverged after {n} of the range test's steps{where}: lower its start rate")
    logs = np.log10(found.lrs)
    slope = np.gradient(np.asarray(found.smoothed), logs)  # loss per decade of learning rate
    window = slice(SKIP_START, n - SKIP_END)
    at = SKIP_START + int(np.argmin(slope[window]))
    low = int(np.argmin(found.smoothed))
    found.suggestion, found.lowest = found.lrs[at], found.lrs[low]
    found.reason = (
        f"steepest descent of the smoothed loss at lr {found.suggestion:.2e} ({slope[at]:.3f} per decade); "
        f"the loss was lowest at {found.lowest:.2e} (loss {found.smoothed[low]:.3f}) and the test stopped "
        f"at {found.lrs[-1]:.2e} after {n} steps"
    )
