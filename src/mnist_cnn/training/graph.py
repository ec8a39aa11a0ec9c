"""The whole training step as one function over fixed tensors: run.compile = "step".

    step = one_step(state, cfg, settings, steps_per_epoch, teacher)  # a GraphStep when cfg says "step"
    for rows in fit(step, data, [cfg]):                                # training.loop runs its epochs

Each epoch starts (`GraphStep.epoch`, called by training.loop.train_epoch) by drawing
everything random up front, on the device, into buffers that keep their addresses from
epoch to epoch (EpochInputs): the batch order (steps, B), the augmentation draws
(steps, B, ...) and one dropout key per step. The step itself (`GraphStep.step`) then
reads its row through a step counter that lives on the device, gathers, augments and
normalizes its batch, and does what every step does (training.loop.module_loss,
TrainState.update, RunningSums.add: forward, loss, backward, the optimizer, the weight
average, the epoch's running sums) with no host sync and no generator reseeding. That is
what torch.compile takes whole and what a CUDA graph can replay. After each call one
device-side copy sets the next step's learning rate from a table indexed by the
device-side optimizer step (`schedule`: outside the compiled function, see there).

The draws stay keyed by (seed, epoch, step): the augmentation draws are those of the
default path (training.keys.step_draws), so a run resumes exactly from its step count.
Dropout is the one draw that differs: nn.Dropout takes torch's global generator, which a
step may not reseed, so this path swaps each nn.Dropout for KeyedDropout, whose mask is
a counter-based hash of the step's key (rng_key(seed, epoch, step, DROPOUT_STREAM)) and
of the element's index: the same on every device, compiled or not. Other dropout modules
are refused; randomness inside a network's own forward (F.dropout) cannot be seen and is
torch.compile's. When the epochs end, the network gets its nn.Dropout modules back.

On the CPU the compiled step measured no faster than eager (docs/performance.md); the
point is the GPU, where a step of a few hundred tiny kernels is bound by launches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mnist_cnn.checkpoint import unwrap
from mnist_cnn.config import Config
from mnist_cnn.data.augment import Draws, apply_draws
from mnist_cnn.data.contract import normalize, to_unit
from mnist_cnn.errors import ConfigError, TrainingError
from mnist_cnn.training.distill import Teacher
from mnist_cnn.training.keys import DROPOUT_STREAM, epoch_order, rng_key, step_draws
from mnist_cnn.training.loop import NetworkStep, StepSettings, TakeStep, module_loss
from mnist_cnn.training.state import TrainState, lr_factor
from mnist_cnn.training.sums import RunningSums

MASK32 = 0xFFFFFFFF
XOR_SHIFT = 16  # half of 32 bits: each round folds the high half into the low one
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows.
HASH_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)
BACKEND = "inductor"  # torch.compile's; the tests' "aot_eager" traces the same graphs without generating code
UNIFORM_BITS = 24  # float32 holds 24-bit integers exactly: u = h / 2**24 in [0, 1)


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 values in [0, 2**32)."""
    for m in HASH_MULTIPLIERS:
        h = h ^ (h >> XOR_SHIFT)
        h = (h * m) & MASK32
    return h ^ (h >> XOR_SHIFT)


def keyed_uniform(key: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """n uniforms in [0, 1) (float32), a pure function of the int64 key (a 0-d or (1,) tensor), the
    stream and the index: no generator state, so eager, compiled and any device agree bitwise."""
    index = torch.arange(n, device=key.device, dtype=torch.int64)  # (n,)
    h = mix32(index ^ (key & MASK32))
    h = mix32(h ^ ((key >> 32) & MASK32))
    h = mix32(h ^ stream)
    return (h >> (32 - UNIFORM_BITS)).to(torch.float32) * 2.0**-UNIFORM_BITS


class KeyedDropout(nn.Module):
    """nn.Dropout whose mask comes from keyed_uniform(self.key, ...): the step writes the key."""

    def __init__(self, p: float, stream: int) -> None:
        super().__init__()
        self.p, self.stream = p, stream
        self.register_buffer("key", torch.zeros(1, dtype=torch.int64), persistent=False)  # not in checkpoints
        self.key: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:  # as nn.Dropout: all dropped, not 0 / 0
            return torch.zeros_like(x)
        keep = keyed_uniform(self.key, x.numel(), self.stream).view(x.shape) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def use_keyed_dropout(model: nn.Module) -> list[KeyedDropout]:
    """Swap each nn.Dropout of the network for a KeyedDropout (stream = its order); ConfigError for
    other dropout modules, whose draws this path could not key."""
    swapped: list[KeyedDropout] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd) and type(module) is not nn.Dropout:
            raise ConfigError(f"run.compile = step keys nn.Dropout only; {name} is {type(module).__name__}")
        if type(module) is nn.Dropout:
            parent_name, _, attr = name.rpartition(".")
            keyed = KeyedDropout(module.p, len(swapped))
            keyed.key = keyed.key.to(next(model.parameters()).device)
            setattr(model.get_submodule(parent_name), attr, keyed)
            swapped.append(keyed)
    return swapped


def use_plain_dropout(model: nn.Module) -> None:
    """Put nn.Dropout back where use_keyed_dropout swapped it: the trained network is an ordinary one."""
    for name, module in list(model.named_modules()):
        if isinstance(module, KeyedDropout):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, nn.Dropout(module.p))


def one_step(
    state: TrainState, cfg: Config, settings: StepSettings, steps_per_epoch: int, teacher: Teacher | None = None
) -> NetworkStep | GraphStep:
    """The step that trains one network as cfg.run.compile says: the whole step compiled, or the default one."""
    if cfg.run.compile == "step":
        return GraphStep(state, cfg, settings, steps_per_epoch, teacher)
    return NetworkStep(state, settings, teacher)


def padded(t: torch.Tensor, size: int) -> torch.Tensor:
    """(n, ...) -> (size, ...), zeros (False) after the n rows: the last, short batch's draws in a full row."""
    if t.shape[0] == size:
        return t
    return torch.cat([t, t.new_zeros((size - t.shape[0], *t.shape[1:]))])


def by_step(column: tuple[torch.Tensor | None, ...], batch: int) -> torch.Tensor | None:
    """One field of each step's Draws -> (steps, batch, ...), or None when the field is off."""
    if column[0] is None:
        return None
    return torch.stack([padded(t, batch) for t in column if t is not None])


def as_draws(fields: list[torch.Tensor | None]) -> Draws:
    """Draws from its fields in order; the first three are always drawn."""
    angle, scale, shift, flip, field = fields
    assert angle is not None and scale is not None and shift is not None
    return Draws(angle, scale, shift, flip, field)


@dataclass
class EpochInputs:
    """An epoch's batch order (steps, B), augmentation draws (steps, B, ...) and dropout keys (steps,),
    allocated once and refilled in place each epoch (fixed addresses, for a captured graph)."""

    order: torch.Tensor
    draws: Draws | None
    dropout_keys: torch.Tensor

    @staticmethod
    def drawn(n: int, s: StepSettings, epoch: int, device: torch.device) -> EpochInputs:
        """Every random number of an epoch over n images, each step's from its own (seed, epoch, step) key,
        so the augmentation is what training.loop.augmented draws step by step."""
        batch = s.batch_size
        steps = math.ceil(n / batch)
        order = padded(epoch_order(n, s.seed, epoch, device), steps * batch).view(steps, batch)
        draws = None
        if s.augment.enabled:
            rows = [step_draws(min(batch, n - k * batch), s.augment, s.seed, epoch, k, device) for k in range(steps)]
            draws = as_draws([by_step(column, batch) for column in zip(*rows)])
        # one process only (GraphStep refuses torchrun): the key of process 0 in training.loop
        keys = torch.tensor([rng_key(s.seed, epoch, step, DROPOUT_STREAM) for step in range(steps)], dtype=torch.int64)
        return EpochInputs(order, draws, keys.to(device))

    def fill(self, other: EpochInputs) -> None:
        self.order.copy_(other.order)
        self.dropout_keys.copy_(other.dropout_keys)
        if self.draws is not None and other.draws is not None:
            for mine, theirs in zip(self.draws, other.draws):
                if mine is not None and theirs is not None:
                    mine.copy_(theirs)


class GraphStep:
    """One network's training step as one function (`step`), compiled whole by torch.compile unless
    `compiled` is False (the same computation run eagerly, which the tests compare it with).

    Everything the step reads or writes is a tensor of fixed shape at a fixed address: the epoch's
    EpochInputs, `pos` (the step within the epoch) and `done` (optimizer steps taken) on the device,
    the optimizer's tensor learning rate, the weight average and the running sums. The last, short
    batch of an epoch (60,000 = 937 x 64 + 32) is a second shape, hence a second compiled graph."""

    stacked = False

    def __init__(
        self,
        state: TrainState,
        cfg: Config,
        settings: StepSettings,
        steps_per_epoch: int,
        teacher: Teacher | None = None,
        compiled: bool = True,
    ) -> None:
        if settings.world.active:
            raise ConfigError("run.compile = step trains in one process; under torchrun use run.compile = no")
        lr = state.optimizer.param_groups[0]["lr"]
        if not isinstance(lr, torch.Tensor):
            raise TrainingError("run.compile = step needs the optimizer that build_state makes for it (a tensor lr)")
        self.states, self.settings, self.teacher, self.lr = [state], [settings], teacher, lr
        self.dropouts = use_keyed_dropout(unwrap(state.model))
        if state.ema is not None:  # the same modules, so that the two networks' buffers pair up
            use_keyed_dropout(state.ema.model)
        device = lr.device
        total = steps_per_epoch * cfg.epochs
        base = float(state.optimizer.param_groups[0]["initial_lr"])
        # LambdaLR's own arithmetic (base * factor, in doubles), one entry per optimizer step and one after the last
        self.lr_host = [base * lr_factor(k, cfg.optim, steps_per_epoch, total) for k in range(total + 1)]
        self.lr_table = torch.tensor(self.lr_host, dtype=torch.float64, device=device)  # (total + 1,)
        state.scheduler.base_lrs = [float(b) for b in state.scheduler.base_lrs]  # LambdaLR copied the tensor lr
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)  # (1,) the step within the epoch
        self.done = torch.zeros(1, dtype=torch.int64, device=device)  # (1,) optimizer steps taken
        self.inputs: EpochInputs | None = None
        self.images = self.labels = torch.empty(0)
        self.run: Callable[..., None] = torch.compile(self.step, backend=BACKEND) if compiled else self.step

    def train(self) -> None:
        self.states[0].model.train()

    def close(self) -> None:
        """After the last epoch or a stop: the networks get their nn.Dropout back."""
        state = self.states[0]
        use_plain_dropout(unwrap(state.model))
        if state.ema is not None:
            use_plain_dropout(state.ema.model)

    def epoch(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, first: int) -> TakeStep:
        """The epoch's draws over the (N, 28, 28) uint8 images made up front, into the buffers a captured
        graph reads, and the device's counters set to step `first`; returns what takes each step."""
        self.images, self.labels = images, labels
        fresh = EpochInputs.drawn(images.shape[0], self.settings[0], epoch, images.device)
        if self.inputs is None or self.inputs.order.shape != fresh.order.shape:
            self.inputs = fresh
        else:
            self.inputs.fill(fresh)  # keep the addresses a captured graph reads
        taken = self.states[0].scheduler.last_epoch  # optimizer steps so far, on the host
        self.pos.fill_(first)
        self.done.fill_(taken)
        self.lr.fill_(self.lr_host[taken])
        return self.take

    def take(self, step: int, sums: RunningSums) -> None:
        """Step `step` of the epoch: one call of the (compiled) step on its b images, b < B only for the
        last; then the next learning rate, and the host's LambdaLR where a checkpoint reads it."""
        batch = self.settings[0].batch_size
        self.run(min(batch, self.images.shape[0] - step * batch), sums)
        self.schedule()
        self.host_schedule(self.states[0].scheduler.last_epoch + 1)

    def host_schedule(self, taken: int) -> None:
        """Bring the host-side LambdaLR to where `taken` eager steps would have left it (checkpoints save it):
        host arithmetic only, no sync."""
        scheduler = self.states[0].scheduler
        scheduler.last_epoch, scheduler._step_count = taken, taken + 1
        scheduler._last_lr = [self.lr_host[taken]]

    def step(self, b: int, sums: RunningSums) -> None:
        """Step `pos` of the epoch on its b images; the sums (1,) grow in place."""
        state, s, inputs = self.states[0], self.settings[0], self.inputs
        assert inputs is not None
        idx = inputs.order.index_select(0, self.pos)[0, :b]  # (b,) image indices
        x = normalize(self.augmented(self.images[idx], b), s.norm)  # (b, 1, 28, 28)
        y = self.labels[idx]  # (b,)
        key = inputs.dropout_keys.index_select(0, self.pos)  # (1,)
        for dropout in self.dropouts:
            dropout.key.copy_(key)
        loss, out, plain = module_loss(state.model, x, y, s, self.teacher)
        self.done.add_(1)
        state.update(loss, self.done)
        sums.add(self.pos, out.unsqueeze(0), plain.reshape(1), y.unsqueeze(0))
        self.pos.add_(1)

    def schedule(self) -> None:
        """The next step's learning rate, what LambdaLR.step() would set: one device-side copy, made
        outside the compiled step because under torch.compile (2.13) the compiled optimizer read a stale
        learning rate when the same compiled function wrote it (4e-3 off after 3 steps, docs/performance.md)."""
        self.lr.copy_(self.lr_table.index_select(0, self.done)[0])

    def augmented(self, images: torch.Tensor, b: int) -> torch.Tensor:
        """(b, 28, 28) uint8 -> (b, 1, 28, 28) in [0, 1], warped with the step's row of the epoch's draws."""
        s, inputs = self.settings[0], self.inputs
        assert inputs is not None
        if inputs.draws is None:
            return to_unit(images)
        row = [None if t is None else t.index_select(0, self.pos)[0, :b] for t in inputs.draws]
        return apply_draws(images, s.augment, as_draws(row))
