"""The one epoch loop and the step's arithmetic, for a single network, a stack of seeds and the compiled step alike.

    step = NetworkStep(state, StepSettings.from_config(cfg, world))   # one network (DDP under torchrun)
    step = StackStep(states, settings)                                 # or S seeds as one (training.stack)
    step = GraphStep(state, cfg, settings, steps_per_epoch)            # or the whole step compiled (training.graph)
    for rows in fit(step, data, cfgs):   # each epoch: one metrics row per seed (one for a single run)
        ...                              # the caller saves, prints, plots

Every kind of step computes its loss with batch_loss() (log-probabilities, NLL with label
smoothing, the distillation term) and applies it with TrainState.update() (gradient, optimizer,
schedule, weight average); they differ only in how the gradient is taken (autograd or
torch.func's vmap), eager or compiled, where the batch comes from (Batches here, or the
compiled step's epoch drawn up front) and what DDP needs. No printing policy and no files
here: the caller decides what to do with the rows and the states, and draws progress from
the on_log callback.

Each seed's epoch order and each step's augmentation and dropout draws come from keys of
(seed, epoch, step) (training.keys): a run stopped mid-epoch continues from its step count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.checkpoint import EpochProgress, unwrap
from mnist_cnn.config import AugmentConfig, Config, DistillConfig
from mnist_cnn.data.augment import Draws, apply_draws
from mnist_cnn.data.contract import MNIST_NORM, as_log_probs, normalize, to_unit
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.splits import Splits
from mnist_cnn.device import autocast, synchronize
from mnist_cnn.errors import ConfigError, Diverged
from mnist_cnn.inference.evaluate import confusion_matrix, predict_log_probs, summarize
from mnist_cnn.training.distill import Teacher, distill_loss
from mnist_cnn.training.distributed import World, share_buffers
from mnist_cnn.training.keys import DROPOUT_STREAM, rng_key, step_draws
from mnist_cnn.training.keys import epoch_order as epoch_order  # re-exported: lr_find and the tests take it from here
from mnist_cnn.training.state import TrainState
from mnist_cnn.training.sums import NonFiniteLoss, RunningSums

LOG_EVERY = 50  # steps between on_log calls (each one syncs with the device)

OnLog = Callable[[EpochProgress, int], None]  # (the epoch so far, summed over seeds; steps in the epoch)


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
    """One optimizer step of S seeds' networks on the batches that Batches makes for them."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (S, b, 1, 28, 28) normalized, y (S, b): forward, backward, optimizer step, schedule, average.
        b is this process's share of the global `batch`. Returns (S, b, classes) log-probabilities
        and each seed's plain mean NLL (S,), both detached."""
        ...


TakeStep = Callable[[int, RunningSums], None]  # (step of the epoch, the epoch's sums): one optimizer step


@runtime_checkable
class OwnsEpoch(Trains, Protocol):
    """A step that makes its epoch's inputs itself (training.graph.GraphStep draws the whole epoch up
    front, on the device) and puts back what it changed in the networks when fit() ends (close)."""

    def close(self) -> None: ...

    def epoch(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, first: int) -> TakeStep:
        """Ready `epoch` over the (N, 28, 28) uint8 images from its step `first`; returns what takes a step."""
        ...


def nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean NLL; with smoothing s, (1 - s) NLL + s * mean over classes of -log p."""
    loss = F.nll_loss(log_probs, labels)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
    return loss


def batch_loss(
    net: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    s: StepSettings,
    soft: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's loss of one network's batch: x (b, 1, 28, 28) normalized (channels_last where s asks),
    y (b,), soft (b, classes) a teacher's probabilities or None. Returns the loss to minimize -- the NLL
    with s's label smoothing, and with a teacher the distillation term -- and the (b, classes) fp32
    log-probabilities, whatever the network returns (log_softmax inside bf16 autocast, as the seed's did)."""
    with autocast(x.device, s.precision):
        out = as_log_probs(net(x))
    loss = nll(out, y, s.label_smoothing)
    if soft is not None:
        loss = distill_loss(out, loss, soft, s.distill)
    return loss, out


def module_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: StepSettings, teacher: Teacher | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_loss() of a network module (the single and the compiled step) and its teacher on the same x,
    (b, 1, 28, 28). Returns the loss, the detached (b, classes) log-probabilities and the plain mean NLL
    (0-d) that the metrics count: the loss itself where it is that (no smoothing, no teacher)."""
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    soft = None if teacher is None else teacher.probs(x, s.precision)
    loss, out = batch_loss(model, x, y, s, soft)
    out = out.detach()
    plain = F.nll_loss(out, y) if s.label_smoothing or soft is not None else loss.detach()
    return loss, out, plain


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
        loss, out, plain = module_loss(state.model, x, y, s, self.teacher)
        if world.active:  # DDP averages over processes: weight by share so that it is the global batch's mean
            loss = loss * (y.shape[0] * world.size / batch)
        state.update(loss)
        return out.unsqueeze(0), plain.reshape(1)


def augmented(images: torch.Tensor, settings: list[StepSettings], epoch: int, step: int) -> torch.Tensor:
    """(S * b, 28, 28) uint8, each seed's b images in turn -> (S * b, 1, 28, 28) in [0, 1], every seed's
    share warped with the draws of its own (seed, epoch, step) key (the seeds share one augment config)."""
    cfg = settings[0].augment
    if not cfg.enabled:
        return to_unit(images)
    n = images.shape[0] // len(settings)
    draws = [step_draws(n, cfg, s.seed, epoch, step, images.device) for s in settings]
    return apply_draws(images, cfg, Draws.cat(draws))


class Batches:
    """An epoch of a Step: each step's batch gathered from each seed's epoch order, augmented with the
    step's draws, normalized and shared out over the processes, then the step taken on it."""

    def __init__(self, step_fn: Step, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        self.step_fn, self.images, self.labels, self.epoch = step_fn, images, labels, epoch
        n, device = images.shape[0], images.device
        self.perms = torch.stack([epoch_order(n, s.seed, epoch, device) for s in step_fn.settings])  # (S, N)

    def __call__(self, step: int, sums: RunningSums) -> None:
        settings, world = self.step_fn.settings, self.step_fn.settings[0].world
        batch = settings[0].batch_size
        idx = self.perms[:, step * batch : (step + 1) * batch]  # (S, B)
        b = idx.shape[1]
        # the whole batch is augmented as one process would, then each process takes its share
        x = normalize(augmented(self.images[idx.flatten()], settings, self.epoch, step), settings[0].norm)
        x = x.view(len(settings), b, *x.shape[1:])  # (S, B, 1, 28, 28)
        y = self.labels[idx]  # (S, B)
        if world.active:
            share = world.shard(b)
            x, y = x[:, share], y[:, share]  # (S, B / processes, ...)
        # each process its own dropout masks; process 0 draws what a single process would
        torch.manual_seed(rng_key(settings[0].seed, self.epoch, step, DROPOUT_STREAM + 2 * world.rank))
        out, plain = self.step_fn(x, y, b)  # (S, b, classes), (S,)
        sums.add(step, out, plain, y)


def train_epoch(
    step_fn: Step | OwnsEpoch,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: list[EpochProgress],
    on_log: OnLog | None = None,
    should_stop: Callable[[], bool] = never,
) -> list[EpochProgress]:
    """One pass over each seed's permutation of the (N, 28, 28) uint8 images, from the step where all of
    them stand, by any kind of step. Returns each seed's progress; `step` is short of the epoch's steps
    only when should_stop() said so. Sums accumulate on the device and are read (one host sync) every
    LOG_EVERY steps, where the first non-finite loss raises NonFiniteLoss and on_log gets the seeds' sums."""
    settings, states = step_fn.settings, step_fn.states
    epoch, step = progress[0].epoch, progress[0].step
    steps = math.ceil(images.shape[0] / settings[0].batch_size)
    step_fn.train()
    if isinstance(step_fn, OwnsEpoch):
        take = step_fn.epoch(images, labels, epoch, step)
    else:
        take = Batches(step_fn, images, labels, epoch)
    sums = RunningSums(progress, settings[0].world, images.device)
    while step < steps:
        if step == 0:  # a tensor in the compiled step: one host sync an epoch
            sums.lrs = [float(state.optimizer.param_groups[0]["lr"]) for state in states]
        take(step, sums)
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
    """fit() for one network with the default step: its metrics row per epoch. The compiled step
    (run.compile = step) builds on this module, so it is fit(training.graph.one_step(...), ...)."""
    if cfg.run.compile == "step":
        raise ConfigError("fit_one trains with the default step; for run.compile = step use fit(graph.one_step(...))")
    step = NetworkStep(state, StepSettings.from_config(cfg, world), teacher)
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
    """inference.evaluate.summarize() of the (N, 28, 28) images -- mean NLL, accuracy, n -- and the
    (classes, classes) confusion counts, each process evaluating its share."""
    share = world.shard(images.shape[0])
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # no collectives
    ds = get_dataset(cfg.dataset)
    log_probs = predict_log_probs(plain, images[share], cfg.eval_batch_size, cfg.run.channels_last, (ds.mean, ds.std))
    y = labels[share].long()
    part = summarize(log_probs, y)  # this process's share: all of them without torchrun
    part["confusion"] = confusion_matrix(log_probs.argmax(1), y, log_probs.shape[1]).to(log_probs.device)  # (C, C)
    if not world.active:
        return part
    # Back to the share's sums, to add them over the processes: the NLL sum in its own dtype, float32,
    # comes back exactly (the float64 mean's rounding lies far below float32's spacing).
    loss_sum = torch.tensor(part["loss"] * part["n"], dtype=log_probs.dtype, device=log_probs.device)
    correct = torch.tensor(round(part["accuracy"] * part["n"]), device=log_probs.device)
    loss_sum, correct, confusion = world.sum(loss_sum, correct, part["confusion"])
    n = labels.numel()
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "n": n, "confusion": confusion}
