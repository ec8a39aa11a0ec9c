"""Training: fit() runs epochs of train_one_epoch() + evaluate().

    data = to_device(mnist, cfg, device)              # uint8 tensors on the device, once
    state = build_state(cfg, device, data.steps_per_epoch(cfg.batch_size))
    for row in fit(state, data, cfg, device):         # one metrics row per epoch
        ...                                           # the caller saves, prints, plots

No printing policy and no files here: the caller decides what to do with each
row and with `state` (see cli.py and rundir.py).
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .augment import augment_batch
from .config import AugmentConfig, Config, OptimConfig
from .data import Mnist
from .errors import ConfigError, TrainingError
from .evaluate import evaluate
from .models import build_model

LOG_EVERY = 50  # steps between progress-bar updates (each one syncs with the device)
VAL_SPLIT_SEED = 12345  # fixed, so every run and seed holds out the same validation images
SEED_STRIDE = 1_000_003  # spreads (seed, epoch) pairs so no two runs share an epoch's RNG stream


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (emulated bf16 is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the training step; the loss is taken in fp32 outside it."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """The one place that seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Shuffling and augmentation RNG of one epoch, derived from (seed, epoch) alone,
    so an epoch draws the same whether the run was resumed or not."""
    return torch.Generator(device).manual_seed(seed * SEED_STRIDE + epoch)


@dataclass
class DeviceData:
    """The dataset as tensors on the training device: uint8 images, int64 labels."""

    train_images: torch.Tensor  # (N, 28, 28) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, 28, 28) uint8
    test_labels: torch.Tensor  # (M,) int64
    val_images: torch.Tensor | None = None  # (V, 28, 28) uint8, carved from the training set
    val_labels: torch.Tensor | None = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.train_images.shape[0] / batch_size)


def to_device(mnist: Mnist, cfg: Config, device: torch.device) -> DeviceData:
    images, labels = mnist.train_images, mnist.train_labels
    if cfg.run.train_limit:
        images, labels = images[:cfg.run.train_limit], labels[:cfg.run.train_limit]
    val_images = val_labels = None
    if cfg.val_size:
        if cfg.val_size >= images.shape[0]:
            raise ConfigError(f"val_size {cfg.val_size} leaves no training images (there are {images.shape[0]})")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        keep, held = order[:-cfg.val_size].sort().values, order[-cfg.val_size:].sort().values
        val_images, val_labels = images[held].to(device), labels[held].long().to(device)
        images, labels = images[keep], labels[keep]
    if cfg.batch_size > images.shape[0]:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {images.shape[0]} training images")
    return DeviceData(images.to(device), labels.long().to(device),
                      mnist.test_images.to(device), mnist.test_labels.long().to(device),
                      val_images, val_labels)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # The fused kernels update all parameters in one call, which made steps faster on the CPU.
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, fused=True)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based). Every schedule is
    per step, so the seed's per-epoch StepLR is the same staircase expressed in steps."""
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total_steps))
    if cfg.schedule == "onecycle":  # linear up to the peak, then linear down to zero
        peak = max(1, round(cfg.warmup * total_steps))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / (total_steps - peak))
    return 1.0


@dataclass
class EpochProgress:
    """How far an epoch got: enough to continue it exactly after an interruption."""

    epoch: int
    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their loss
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # time spent on it so far
    generator: torch.Tensor | None = None  # the epoch generator's state after `step` steps


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # epochs completed
    metrics: list[dict] = field(default_factory=list)  # one row per completed epoch
    partial: EpochProgress | None = None  # set when the run stopped inside epoch `epoch + 1`


def build_state(cfg: Config, device: torch.device, steps_per_epoch: int) -> TrainState:
    model = build_model(cfg.model).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.optim)
    if cfg.run.compile:
        model = torch.compile(model)  # checkpoints unwrap it (checkpoint.unwrap)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, steps_per_epoch, total))
    return TrainState(model, optimizer, scheduler)


def nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean NLL; with smoothing s, (1 - s) NLL + s * mean over classes of -log p."""
    loss = F.nll_loss(log_probs, labels)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
    return loss


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    batch_size: int, augment: AugmentConfig, generator: torch.Generator,
                    progress: EpochProgress, precision: str = "fp32", channels_last: bool = False,
                    label_smoothing: float = 0.0, show_bar: bool = True, desc: str = "",
                    should_stop: Callable[[], bool] = lambda: False,
                    rank: int = 0, world_size: int = 1) -> EpochProgress:
    """One pass over a fresh permutation of the training set, from `progress.step` on.

    Returns the updated progress; `step` is short of the epoch's steps only when
    should_stop() said so. Loss and correct counts accumulate on the device: no
    host sync per step. A rank takes every world_size-th index of the shared
    permutation (torchrun-ready).
    """
    model.train()
    device = images.device
    perm = torch.randperm(images.shape[0], generator=generator, device=device)[rank::world_size]
    if progress.generator is not None:  # continuing: the augmentation draws pick up where they stopped
        generator.set_state(progress.generator)
    steps = math.ceil(perm.numel() / batch_size)
    loss_sum = torch.tensor(progress.loss_sum, device=device)
    correct = torch.tensor(progress.correct, device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
    seen = progress.seen
    bar = tqdm(total=steps, initial=progress.step, desc=desc, leave=False,
               disable=not show_bar or None, dynamic_ncols=True)
    step = progress.step
    while step < steps:
        idx = perm[step * batch_size:(step + 1) * batch_size]
        x = augment_batch(images[idx], augment, generator)  # (B, 1, 28, 28)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        with autocast(device, precision):
            out = model(x)
        loss = nll(out.float(), y, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        seen += y.shape[0]
        step += 1
        stop = should_stop()
        if step % LOG_EVERY == 0 or step == steps or stop:
            check_finite(first_bad, desc)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            refresh=False)
            bar.update(step - bar.n)
        if stop:
            break
    bar.close()
    return EpochProgress(progress.epoch, step, loss_sum.item(), int(correct.item()), seen,
                         progress.seconds, generator.get_state())


def check_finite(first_bad: torch.Tensor, where: str) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise TrainingError(f"{where}: loss became NaN or infinite at step {bad + 1}; "
                            "lower the learning rate (the last checkpoint is from before this epoch)")


def fit(state: TrainState, data: DeviceData, cfg: Config, device: torch.device,
        progress: bool = True, should_stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Train from where `state` stands to cfg.epochs; yield each epoch's metrics row.

    `state` is updated in place before each yield, so the caller can checkpoint
    it. When should_stop() turns true the current step finishes, state.partial
    records the unfinished epoch and the iteration ends.
    """
    r = cfg.run
    steps = data.steps_per_epoch(cfg.batch_size)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.partial is not None and state.partial.epoch == epoch:
            begun = state.partial  # RNG states were restored with the checkpoint
        else:
            begun = EpochProgress(epoch)
            torch.manual_seed(r.seed * SEED_STRIDE + epoch)  # dropout RNG, also derived per epoch
        generator = epoch_generator(r.seed, epoch, device)
        lr = cfg.optim.lr * lr_factor((epoch - 1) * steps, cfg.optim, steps, steps * cfg.epochs)
        start = time.perf_counter()
        done = train_one_epoch(
            state.model, data.train_images, data.train_labels, state.optimizer, state.scheduler,
            cfg.batch_size, cfg.augment, generator, begun, r.precision, r.channels_last,
            cfg.optim.label_smoothing, show_bar=progress, desc=f"epoch {epoch}/{cfg.epochs}",
            should_stop=should_stop)
        done.seconds += time.perf_counter() - start
        if done.step < steps:
            state.partial = done
            return
        state.partial = None
        row = {"epoch": epoch, "lr": lr, "train_loss": done.loss_sum / done.seen,
               "train_acc": done.correct / done.seen}
        start = time.perf_counter()
        # Evaluation is fp32 whatever the training precision (see predict_log_probs).
        test = evaluate(state.model, data.test_images, data.test_labels, cfg.eval_batch_size,
                        channels_last=r.channels_last)
        row.update(test_loss=test["loss"], test_acc=test["accuracy"])
        if data.val_images is not None:
            val = evaluate(state.model, data.val_images, data.val_labels, cfg.eval_batch_size,
                           channels_last=r.channels_last)
            row.update(val_loss=val["loss"], val_acc=val["accuracy"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["seconds"] = done.seconds + time.perf_counter() - start
        state.epoch = epoch
        state.metrics.append(row)
        yield row
        if should_stop():
            return
