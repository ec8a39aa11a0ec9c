"""Training: fit() runs epochs of train_one_epoch() + evaluate(). (mnist_cnn.train is the API function.)

    data = to_device(mnist, device, cfg.run.train_limit, cfg.val_size, cfg.batch_size)  # data.py
    state = build_state(create(locate(cfg.model), data.num_classes), cfg, device, data.steps_per_epoch(cfg.batch_size))
    for row in fit(state, data, cfg, device):         # one metrics row per epoch
        ...                                           # the caller saves, prints, plots

No printing policy and no files here: the caller decides what to do with each
row and with `state`, and draws progress from the on_log callback.

Randomness is derived, never carried: the epoch's order from (seed, epoch), each
step's augmentation and dropout draws from (seed, epoch, step). A run stopped
mid-epoch therefore continues from its step count alone, on any device.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.config import AugmentConfig, Config, OptimConfig
from mnist_cnn.data.augment import augment_batch
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.idx import Mnist
from mnist_cnn.data.inputs import MNIST_NORM, as_log_probs, normalize
from mnist_cnn.device import autocast, synchronize
from mnist_cnn.errors import Diverged
from mnist_cnn.inference.evaluate import predict_log_probs
from mnist_cnn.training.distributed import World, share_buffers, wrap

LOG_EVERY = 50  # steps between on_log calls (each one syncs with the device)
SEED_STRIDE = 1_000_003  # a prime larger than any step count: (seed, epoch, step) keys never collide
AUGMENT_STREAM, DROPOUT_STREAM = 0, 1  # separate streams, so dropout masks never mirror augmentation draws


def rng_key(*parts: int) -> int:
    """(seed, epoch[, step, stream]) -> one 63-bit generator seed, distinct for each combination."""
    key = 0
    for part in parts:
        key = (key * SEED_STRIDE + part) % 2**63
    return key


def never() -> bool:
    return False


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # The fused kernels update all parameters in one call, which made steps faster on the CPU.
    if cfg.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, fused=True)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based). Every schedule is
    per step, so the seed's per-epoch StepLR is the same staircase expressed in steps.
    The scheduler also asks for step == total_steps once, after the last step."""
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if cfg.schedule == "onecycle":  # linear up to the peak, then linear down to zero
        peak = max(1, round(cfg.warmup * total_steps))
        if step < peak:
            return (step + 1) / peak
        return max(0.0, (total_steps - step) / max(1, total_steps - peak))
    return 1.0


@dataclass
class EpochProgress:
    """How far an epoch got: enough to continue it exactly after an interruption."""

    epoch: int
    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their plain NLL
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # time spent on it so far
    lr: float | None = None  # the learning rate the optimizer used for the epoch's first step


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # epochs completed
    metrics: list[dict] = field(default_factory=list)  # one row per completed epoch
    partial: EpochProgress | None = None  # set when the run stopped inside epoch `epoch + 1`
    network: dict = field(default_factory=dict)  # num_classes and source SHA-256, for the checkpoint
    ema: "WeightAverage | None" = None  # optim.ema > 0: what is evaluated and saved as the model

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated, checkpointed as "model" and exported: the average when there is one."""
        return self.ema.model if self.ema is not None else self.model


EMA_WARMUP = 10  # the average's decay after k steps is min(decay, (1 + k) / (EMA_WARMUP + k))


class WeightAverage:
    """An exponential moving average of a network's weights, updated after every optimizer step:
    avg = d * avg + (1 - d) * weights; buffers (BatchNorm statistics) are the network's own.

    d = min(decay, (1 + k) / (10 + k)) after k steps (the warm-up of TensorFlow's and timm's
    averages): with a fixed 0.9995 the average would still be mostly the random initial weights
    for the first thousands of steps, scored against the trained network's BatchNorm statistics
    (validation accuracy 10-27% in the first epochs of a tune trial), so the pruner would drop it.
    k is the optimizer's step count, so a resumed run continues the same sequence."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int) -> None:
        """After the optimizer's `steps`-th step (1-based)."""
        decay = min(self.decay, (1 + steps) / (EMA_WARMUP + steps))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        self.copy_buffers(model)

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step needs from the config."""

    batch_size: int
    augment: AugmentConfig
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (already resolved from auto)
    channels_last: bool = False
    label_smoothing: float = 0.0
    norm: tuple[float, float] = MNIST_NORM  # the data set's (mean, std)
    world: World = World()  # the processes of a torchrun run (one without torchrun)

    @classmethod
    def from_config(cls, cfg: Config, world: World = World()) -> "StepSettings":
        ds = get_dataset(cfg.dataset)
        return cls(cfg.batch_size, cfg.augment, cfg.run.seed, cfg.run.precision, cfg.run.channels_last,
                   cfg.optim.label_smoothing, (ds.mean, ds.std), world)


def build_state(model: nn.Module, cfg: Config, device: torch.device, steps_per_epoch: int,
                world: World = World()) -> TrainState:
    """Optimizer and schedule around `model` (built by networks.create), moved to `device`;
    wrapped in DistributedDataParallel under torchrun."""
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = WeightAverage(model, cfg.optim.ema) if cfg.optim.ema else None  # of the plain network, before wrappers
    model = wrap(model, world, device, cfg.run.sync_bn)
    optimizer = make_optimizer(model, cfg.optim)
    if cfg.run.compile:
        model = torch.compile(model)  # checkpoints unwrap it (checkpoint.unwrap)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, steps_per_epoch, total))
    return TrainState(model, optimizer, scheduler, ema=ema)


def nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean NLL; with smoothing s, (1 - s) NLL + s * mean over classes of -log p."""
    loss = F.nll_loss(log_probs, labels)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
    return loss


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's permutation of n indices, drawn on the CPU so that it is the same on any device."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(rng_key(seed, epoch))).to(device)


class NonFiniteLoss(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step  # 1-based


def train_one_epoch(state: TrainState, images: torch.Tensor, labels: torch.Tensor, settings: StepSettings,
                    progress: EpochProgress, on_log: Callable[[EpochProgress, int], None] | None = None,
                    should_stop: Callable[[], bool] = never) -> EpochProgress:
    """One pass over the epoch's permutation of (N, 28, 28) uint8 images, from `progress.step` on.

    Returns the updated progress; `step` is short of the epoch's steps only when
    should_stop() said so. Loss and correct counts accumulate on the device and are
    read (one host sync) every LOG_EVERY steps, where on_log(progress, steps) is called.
    """
    model, optimizer, s, world = state.model, state.optimizer, settings, settings.world
    model.train()
    device = images.device
    perm = epoch_order(images.shape[0], s.seed, progress.epoch, device)
    steps = math.ceil(perm.numel() / s.batch_size)
    augment_rng = torch.Generator(device)
    # sums over the images this process saw; process 0 also carries what `progress` already counted
    base = 1 if world.main else 0
    loss_sum = torch.tensor(progress.loss_sum * base, device=device)
    correct = torch.tensor(progress.correct * base, device=device, dtype=torch.long)
    seen = torch.tensor(progress.seen * base, device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
    step, lr = progress.step, progress.lr

    def so_far(step: int) -> EpochProgress:
        """The epoch so far, summed over the processes (one host sync)."""
        total_loss, total_correct, total_seen = world.sum(loss_sum, correct, seen)
        return EpochProgress(progress.epoch, step, total_loss.item(), int(total_correct.item()),
                             int(total_seen.item()), progress.seconds, lr)

    while step < steps:
        augment_rng.manual_seed(rng_key(s.seed, progress.epoch, step, AUGMENT_STREAM))
        # each process its own dropout masks; process 0 draws what a single process would
        torch.manual_seed(rng_key(s.seed, progress.epoch, step, DROPOUT_STREAM + 2 * world.rank))
        idx = perm[step * s.batch_size:(step + 1) * s.batch_size]
        # the whole batch is augmented as one process would, then each process takes its share
        x = normalize(augment_batch(images[idx], s.augment, augment_rng), s.norm)  # (B, 1, 28, 28)
        y = labels[idx]
        if world.active:
            share = world.shard(idx.numel())
            x, y = x[share], y[share]  # (B / processes, ...)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, s.precision):
            out = as_log_probs(model(x))  # (B, classes) fp32 log-probabilities, whatever the network returns
        loss = nll(out, y, s.label_smoothing)
        if world.active:  # DDP averages over processes: weight by share so that it is the global batch's mean
            loss = loss * (y.shape[0] * world.size / idx.numel())
        if step == 0:
            lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(plain_network(model), state.scheduler.last_epoch)  # last_epoch: steps taken
        plain = F.nll_loss(out.detach(), y) if s.label_smoothing or world.active else loss.detach()  # plain NLL
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(plain), step, first_bad)
        loss_sum += plain * y.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        step += 1
        stop = should_stop()  # under torchrun, the same answer on every process
        if step % LOG_EVERY == 0 or step == steps or stop:
            if world.any(int(first_bad) >= 0, device):  # every process raises, or none
                raise NonFiniteLoss((int(first_bad) if int(first_bad) >= 0 else step - 1) + 1)
            if on_log is not None:
                on_log(so_far(step), steps)
        if stop:
            break
    return so_far(step)


def fit(state: TrainState, data: Mnist, cfg: Config, device: torch.device,
        on_log: Callable[[EpochProgress, int], None] | None = None,
        should_stop: Callable[[], bool] = never, world: World = World()) -> Iterator[dict]:
    """Train from where `state` stands to cfg.epochs; yield each epoch's metrics row.

    `state` is updated in place before each yield, so the caller can checkpoint
    it. When should_stop() turns true the current step finishes, state.partial
    records the unfinished epoch and the iteration ends.
    """
    settings = StepSettings.from_config(cfg, world)
    steps = data.steps_per_epoch(cfg.batch_size)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        resumed = state.partial is not None and state.partial.epoch == epoch
        begun = state.partial if resumed else EpochProgress(epoch)
        start = time.perf_counter()
        try:
            done = train_one_epoch(state, data.train_images, data.train_labels, settings, begun, on_log,
                                   should_stop)
        except NonFiniteLoss as e:
            raise Diverged(f"epoch {epoch}/{cfg.epochs}: loss became NaN or infinite at step {e.step}; "
                                "lower the learning rate (the last checkpoint is from before this epoch)") from None
        done.seconds += time.perf_counter() - start
        if done.step < steps:
            state.partial = done
            return
        state.partial = None
        row = end_epoch(state, done, data, cfg, world)
        yield row
        if should_stop():
            return


def end_epoch(state: TrainState, done: EpochProgress, data: Mnist, cfg: Config, world: World) -> dict:
    """The finished epoch's metrics row, evaluation included; `state` records it."""
    row = {"epoch": done.epoch, "lr": done.lr, "train_loss": done.loss_sum / done.seen,
           "train_acc": done.correct / done.seen}
    start = time.perf_counter()
    # Evaluation is fp32 whatever the training precision (see predict_log_probs), and split
    # over the processes under torchrun, all of them holding rank 0's BatchNorm statistics.
    share_buffers(state.model, world)
    if state.ema is not None:
        state.ema.copy_buffers(plain_network(state.model))  # rank 0's, like the network's
    if data.test_images is not None:
        test = evaluate_split(state.evaluated, data.test_images, data.test_labels, cfg, world)
        row.update(test_loss=test["loss"], test_acc=test["accuracy"])
    if data.val_images is not None:
        val = evaluate_split(state.evaluated, data.val_images, data.val_labels, cfg, world)
        row.update(val_loss=val["loss"], val_acc=val["accuracy"])
    synchronize(data.train_images.device)
    row["seconds"] = done.seconds + time.perf_counter() - start
    state.epoch = done.epoch
    state.metrics.append(row)
    return row


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, world: World) -> dict:
    """Mean NLL and accuracy of the (N, 28, 28) images, each process evaluating its share."""
    share = world.shard(images.shape[0])
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # no collectives
    ds = get_dataset(cfg.dataset)
    log_probs = predict_log_probs(plain, images[share], cfg.eval_batch_size, cfg.run.channels_last, (ds.mean, ds.std))
    y = labels[share].long()
    loss, correct = world.sum(F.nll_loss(log_probs, y, reduction="sum"), (log_probs.argmax(1) == y).sum())
    n = labels.numel()
    return {"loss": loss.item() / n, "accuracy": correct.item() / n, "n": n}


def plain_network(model: nn.Module) -> nn.Module:
    """The network under torch.compile / DDP wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model, "_orig_mod", None) or model.module
    return model
