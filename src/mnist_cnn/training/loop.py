"""The one epoch loop, for a single network and for a stack of seeds alike.

    step = NetworkStep(state, StepSettings.from_config(cfg, world))   # one network (DDP under torchrun)
    step = StackStep(states, settings)                                 # or S seeds as one (training.stack)
    step = GraphStep(state, cfg, settings, steps_per_epoch)            # or the whole step compiled (training.graph)
    for rows in fit(step, data, cfgs):   # each epoch: one metrics row per seed (one for a single run)
        ...                              # the caller saves, prints, plots

No printing policy and no files here: the caller decides what to do with the rows
and the states, and draws progress from the on_log callback.

Randomness is derived, never carried: each seed's epoch order from (seed, epoch),
each step's augmentation and dropout draws from (seed, epoch, step). A run stopped
mid-epoch therefore continues from its step count alone, on any device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.checkpoint import unwrap
from mnist_cnn.config import AugmentConfig, Config, DistillConfig
from mnist_cnn.data.augment import Draws, apply_draws, draw
from mnist_cnn.data.contract import MNIST_NORM, as_log_probs, normalize, to_unit
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.splits import Splits
from mnist_cnn.device import autocast, synchronize
from mnist_cnn.errors import Diverged
from mnist_cnn.inference.evaluate import confusion_matrix, predict_log_probs
from mnist_cnn.training.distill import Teacher, distill_loss
from mnist_cnn.training.distributed import World, share_buffers
from mnist_cnn.training.state import EpochProgress, TrainState

LOG_EVERY = 50  # steps between on_log calls (each one syncs with the device)
SEED_STRIDE = 1_000_003  # a prime larger than any step count: (seed, epoch, step) keys never collide
AUGMENT_STREAM, DROPOUT_STREAM = 0, 1  # separate streams, so dropout masks never mirror augmentation draws

OnLog = Callable[[EpochProgress, int], None]  # (the epoch so far, summed over seeds; steps in the epoch)


def rng_key(*parts: int) -> int:
    """(seed, epoch[, step, stream]) -> one 63-bit generator seed, distinct for each combination."""
    key = 0
    for part in parts:
        key = (key * SEED_STRIDE + part) % 2**63
    return key


def never() -> bool:
    return False


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step needs from a seed's config."""

    batch_size: int
    augment: AugmentConfig
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (already resolved from auto)
    channels_last: bool = False
    label_smoothing: float = 0.0
    norm: tuple[float, float] = MNIST_NORM  # the data set's (mean, std)
    world: World = World()  # the processes of a torchrun run (one without torchrun)
    distill: DistillConfig = field(default_factory=DistillConfig)  # used when the step has a teacher

    @classmethod
    def from_config(cls, cfg: Config, world: World = World()) -> StepSettings:
        ds = get_dataset(cfg.dataset)
        return cls(
            cfg.batch_size,
            cfg.augment,
            cfg.run.seed,
            cfg.run.precision,
            cfg.run.channels_last,
            cfg.optim.label_smoothing,
            (ds.mean, ds.std),
            world,
            cfg.distill,
        )


class Trains(Protocol):
    """What fit() needs of any step: S seeds' states (S = 1 for a single run) and settings."""

    states: list[TrainState]
    settings: list[StepSettings]
    stacked: bool  # S seeds as one model (training.stack), even when S = 1

    def train(self) -> None:
        """Put the networks in training mode."""


class Step(Trains, Protocol):
    """One optimizer step of S seeds' networks on their own batches; train_epoch() runs the epoch."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (S, b, 1, 28, 28) normalized, y (S, b): forward, backward, optimizer step, schedule, average.
        b is this process's share of the global `batch`. Returns (S, b, classes) log-probabilities
        and each seed's plain mean NLL (S,), both detached."""
        ...


def nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean NLL; with smoothing s, (1 - s) NLL + s * mean over classes of -log p."""
    loss = F.nll_loss(log_probs, labels)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
    return loss


class NetworkStep:
    """One network trained alone: autograd, bf16 autocast, channels_last, DistributedDataParallel;
    with a teacher, its softened outputs on the same batch join the loss (training.distill)."""

    stacked = False

    def __init__(self, state: TrainState, settings: StepSettings, teacher: Teacher | None = None) -> None:
        self.states, self.settings, self.teacher = [state], [settings], teacher

    def train(self) -> None:
        self.states[0].model.train()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        state, s, world = self.states[0], self.settings[0], self.settings[0].world
        x, y = x[0], y[0]  # (b, 1, 28, 28), (b,)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, s.precision):
            out = as_log_probs(state.model(x))  # (b, classes) fp32 log-probabilities, whatever the network returns
        loss = nll(out, y, s.label_smoothing)
        if self.teacher is not None:
            loss = distill_loss(out, loss, self.teacher.probs(x, s.precision), s.distill)
        if world.active:  # DDP averages over processes: weight by share so that it is the global batch's mean
            loss = loss * (y.shape[0] * world.size / batch)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        state.optimizer.step()
        state.after_step()
        mixed = s.label_smoothing or world.active or self.teacher is not None  # loss is not the plain NLL
        plain = F.nll_loss(out.detach(), y) if mixed else loss.detach()
        return out.detach().unsqueeze(0), plain.reshape(1)


@runtime_checkable
class OwnsEpoch(Trains, Protocol):
    """A step that runs the whole epoch itself (training.graph.GraphStep draws the epoch up front)
    and puts back what it changed in the networks when fit() ends (close)."""

    def close(self) -> None: ...

    def train_epoch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        progress: list[EpochProgress],
        on_log: OnLog | None,
        should_stop: Callable[[], bool],
    ) -> list[EpochProgress]: ...


class NonFiniteLoss(Exception):
    def __init__(self, seed: int, step: int) -> None:
        super().__init__(seed, step)
        self.seed, self.step = seed, step  # index into the stack; 1-based step


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's permutation of n indices, drawn on the CPU so that it is the same on any device."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(rng_key(seed, epoch))).to(device)


def augmented(images: torch.Tensor, settings: list[StepSettings], epoch: int, step: int) -> torch.Tensor:
    """(S * b, 28, 28) uint8, each seed's b images in turn -> (S * b, 1, 28, 28) in [0, 1], every seed's
    share warped with the draws of its own (seed, epoch, step) key (the seeds share one augment config)."""
    cfg = settings[0].augment
    if not cfg.enabled:
        return to_unit(images)
    n = images.shape[0] // len(settings)
    parts = []
    for s in settings:
        g = torch.Generator(images.device).manual_seed(rng_key(s.seed, epoch, step, AUGMENT_STREAM))
        parts.append(draw(n, cfg, g, images.device))
    return apply_draws(images, cfg, Draws.cat(parts))


class RunningSums:
    """Each seed's loss, correct and seen counts over an epoch, kept on the device (S,) so that a step
    never waits for the host; and the first step whose loss was not finite."""

    def __init__(self, progress: list[EpochProgress], world: World, device: torch.device) -> None:
        self.progress, self.world, self.device = progress, world, device
        base = 1 if world.main else 0  # process 0 also carries what `progress` already counted
        self.loss = torch.tensor([p.loss_sum * base for p in progress], device=device)  # (S,)
        self.correct = torch.tensor([p.correct * base for p in progress], device=device, dtype=torch.long)
        self.seen = torch.tensor([p.seen * base for p in progress], device=device, dtype=torch.long)
        self.first_bad = torch.full((len(progress),), -1, device=device, dtype=torch.long)
        self.lrs = [p.lr for p in progress]  # the optimizers' learning rates at the epoch's first step

    def add(self, step: int, out: torch.Tensor, plain: torch.Tensor, y: torch.Tensor) -> None:
        """One step's (S, b, classes) log-probabilities, (S,) plain NLL and (S, b) labels."""
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(plain), step, self.first_bad)
        self.loss += plain * y.shape[1]
        self.correct += (out.argmax(2) == y).sum(1)
        self.seen += y.shape[1]

    def check(self, step: int) -> None:
        """NonFiniteLoss on every process when any seed's loss was not finite on any process (one host sync)."""
        bad = [(i, f + 1) for i, f in enumerate(self.first_bad.tolist()) if f >= 0]
        if self.world.any(bool(bad), self.device):
            raise NonFiniteLoss(*(bad[0] if bad else (0, step)))

    def so_far(self, step: int) -> list[EpochProgress]:
        """Each seed's epoch so far, summed over the processes (one host sync)."""
        loss, correct, seen = self.world.sum(self.loss, self.correct, self.seen)
        rows = zip(loss.tolist(), correct.tolist(), seen.tolist(), self.progress, self.lrs)
        return [EpochProgress(p.epoch, step, total, c, n, p.seconds, lr) for total, c, n, p, lr in rows]

    def total(self, step: int) -> EpochProgress:
        """The seeds' sums together, for the progress bar."""
        parts = self.so_far(step)
        return EpochProgress(
            parts[0].epoch,
            step,
            sum(p.loss_sum for p in parts),
            sum(p.correct for p in parts),
            sum(p.seen for p in parts),
        )


def train_epoch(
    step_fn: Step,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: list[EpochProgress],
    on_log: OnLog | None = None,
    should_stop: Callable[[], bool] = never,
) -> list[EpochProgress]:
    """One pass over each seed's permutation of the (N, 28, 28) uint8 images, from the step where all of
    them stand. Returns each seed's progress; `step` is short of the epoch's steps only when
    should_stop() said so. Sums accumulate on the device and are read (one host sync) every LOG_EVERY
    steps, where the first non-finite loss raises NonFiniteLoss and on_log gets the seeds' sums."""
    settings, world, device = step_fn.settings, step_fn.settings[0].world, images.device
    batch, n_seeds = settings[0].batch_size, len(settings)
    epoch, step = progress[0].epoch, progress[0].step
    step_fn.train()
    perms = torch.stack([epoch_order(images.shape[0], s.seed, epoch, device) for s in settings])  # (S, N)
    steps = math.ceil(perms.shape[1] / batch)
    sums = RunningSums(progress, world, device)
    while step < steps:
        idx = perms[:, step * batch : (step + 1) * batch]  # (S, B)
        b = idx.shape[1]
        # the whole batch is augmented as one process would, then each process takes its share
        x = normalize(augmented(images[idx.flatten()], settings, epoch, step), settings[0].norm)
        x = x.view(n_seeds, b, *x.shape[1:])  # (S, B, 1, 28, 28)
        y = labels[idx]  # (S, B)
        if world.active:
            share = world.shard(b)
            x, y = x[:, share], y[:, share]  # (S, B / processes, ...)
        # each process its own dropout masks; process 0 draws what a single process would
        torch.manual_seed(rng_key(settings[0].seed, epoch, step, DROPOUT_STREAM + 2 * world.rank))
        if step == 0:
            sums.lrs = [state.optimizer.param_groups[0]["lr"] for state in step_fn.states]
        out, plain = step_fn(x, y, b)  # (S, b, classes), (S,)
        sums.add(step, out, plain, y)
        step += 1
        if logged(sums, step, steps, on_log, should_stop):
            break
    return sums.so_far(step)


def logged(sums: RunningSums, step: int, steps: int, on_log: OnLog | None, should_stop: Callable[[], bool]) -> bool:
    """After `step` of `steps`: every LOG_EVERY steps, at the epoch's end and on a stop, check the sums
    (one host sync) and call on_log. True when should_stop() says to end the epoch here."""
    stop = should_stop()  # under torchrun, the same answer on every process
    if step % LOG_EVERY == 0 or step == steps or stop:
        sums.check(step)  # every process raises, or none
        if on_log is not None:
            on_log(sums.total(step), steps)
    return stop


def fit(
    step_fn: Step | OwnsEpoch,
    data: Splits,
    cfgs: list[Config],
    on_log: OnLog | None = None,
    should_stop: Callable[[], bool] = never,
) -> Iterator[list[dict[str, Any]]]:
    """Train the step's seeds from where they stand (all at the same point) to the last epoch;
    each epoch yields the seeds' metrics rows.

    The states are updated in place before each yield, so the caller can checkpoint them.
    When should_stop() turns true the current step finishes, each state's `partial` records
    the unfinished epoch and the iteration ends. A row's seconds are the seed's share of the
    training time plus its own evaluation, so stacked seeds' seconds add up to the wall time.
    """
    try:
        yield from epochs_of(step_fn, data, cfgs, on_log, should_stop)
    finally:
        if isinstance(step_fn, OwnsEpoch):
            step_fn.close()


def epochs_of(
    step_fn: Step | OwnsEpoch,
    data: Splits,
    cfgs: list[Config],
    on_log: OnLog | None,
    should_stop: Callable[[], bool],
) -> Iterator[list[dict[str, Any]]]:
    """fit()'s epochs."""
    states, world, epochs = step_fn.states, step_fn.settings[0].world, cfgs[0].epochs
    steps = data.steps_per_epoch(cfgs[0].batch_size)
    for epoch in range(states[0].epoch + 1, epochs + 1):
        begun = [state.begun(epoch) for state in states]
        start = time.perf_counter()
        try:
            if isinstance(step_fn, OwnsEpoch):
                done = step_fn.train_epoch(data.train_images, data.train_labels, begun, on_log, should_stop)
            else:
                done = train_epoch(step_fn, data.train_images, data.train_labels, begun, on_log, should_stop)
        except NonFiniteLoss as e:
            alone = not step_fn.stacked  # a stack names the seed, even a stack of one
            who = "loss" if alone else f"seed {cfgs[e.seed].run.seed}'s loss"
            raise Diverged(  # the run's lifecycle adds what is true of its checkpoint
                f"epoch {epoch}/{epochs}: {who} became NaN or infinite at step {e.step}; lower the learning rate"
            ) from None
        share = (time.perf_counter() - start) / len(states)
        for d in done:
            d.seconds += share
        if done[0].step < steps:
            for state, d in zip(states, done):
                state.partial = d
            return
        rows = []
        for state, d, cfg in zip(states, done, cfgs):
            state.partial = None
            rows.append(end_epoch(state, d, data, cfg, world))
        yield rows
        if should_stop():
            return


def fit_one(
    state: TrainState,
    data: Splits,
    cfg: Config,
    on_log: OnLog | None = None,
    should_stop: Callable[[], bool] = never,
    world: World = World(),
    teacher: Teacher | None = None,
) -> Iterator[dict[str, Any]]:
    """fit() for one network: its metrics row per epoch."""
    from mnist_cnn.training.graph import one_step  # graph builds on this module

    step = one_step(state, cfg, StepSettings.from_config(cfg, world), data.steps_per_epoch(cfg.batch_size), teacher)
    for rows in fit(step, data, [cfg], on_log, should_stop):
        yield rows[0]


def end_epoch(state: TrainState, done: EpochProgress, data: Splits, cfg: Config, world: World) -> dict[str, Any]:
    """The finished epoch's metrics row, evaluation included; `state` records it."""
    row: dict[str, Any] = {
        "epoch": done.epoch,
        "lr": done.lr,
        "train_loss": done.loss_sum / done.seen,
        "train_acc": done.correct / done.seen,
    }
    start = time.perf_counter()
    # Evaluation is fp32 whatever the training precision (see predict_log_probs), and split
    # over the processes under torchrun, all of them holding rank 0's BatchNorm statistics.
    share_buffers(state.model, world)
    if state.ema is not None:
        state.ema.copy_buffers(unwrap(state.model))  # rank 0's, like the network's
    if data.test_images is not None and data.test_labels is not None:
        test = evaluate_split(state.evaluated, data.test_images, data.test_labels, cfg, world)
        row.update(test_loss=test["loss"], test_acc=test["accuracy"])
        state.test_confusion = test["confusion"]  # the final epoch's becomes evaluation.json
    if data.val_images is not None and data.val_labels is not None:
        val = evaluate_split(state.evaluated, data.val_images, data.val_labels, cfg, world)
        row.update(val_loss=val["loss"], val_acc=val["accuracy"])
    synchronize(data.train_images.device)
    row["seconds"] = done.seconds + time.perf_counter() - start
    state.epoch = done.epoch
    state.metrics.append(row)
    return row


def evaluate_split(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config, world: World
) -> dict[str, Any]:
    """Mean NLL, accuracy and the (classes, classes) confusion counts of the (N, 28, 28) images,
    each process evaluating its share."""
    share = world.shard(images.shape[0])
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # no collectives
    ds = get_dataset(cfg.dataset)
    log_probs = predict_log_probs(plain, images[share], cfg.eval_batch_size, cfg.run.channels_last, (ds.mean, ds.std))
    y = labels[share].long()
    pred = log_probs.argmax(1)
    confusion = confusion_matrix(pred, y, log_probs.shape[1]).to(pred.device)  # (C, C), summed with the rest
    loss, correct, confusion = world.sum(F.nll_loss(log_probs, y, reduction="sum"), (pred == y).sum(), confusion)
    n = labels.numel()
    return {"loss": loss.item() / n, "accuracy": correct.item() / n, "n": n, "confusion": confusion}
