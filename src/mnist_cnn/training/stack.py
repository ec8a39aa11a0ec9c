"""Several seeds of one recipe trained as ONE stacked model: a vmap-ed forward/backward per step.

    stack = Stack(states)                            # TrainStates built as for separate runs
    for rows in fit_together(stack, data, cfgs):     # each epoch: one metrics row per seed
        ...                                          # the caller checkpoints each seed's state

A 16k-parameter network at batch 64 leaves most of a GPU idle; stacked, S seeds
take one kernel where each took its own. Each seed keeps its own batch order,
augmentation draws, BatchNorm statistics, optimizer state and schedule: the
seeds' weights and buffers become views of stacked (S, ...) tensors, so every
seed's TrainState stays an ordinary one whose checkpoint resumes, evaluates and
exports like a run trained alone. What differs from training alone:

- dropout masks are drawn for the whole stack from one generator keyed by the
  first seed (vmap's randomness="different"), so seed k trained with others is
  another sample than seed k alone; without dropout the weights agree to float
  rounding (tests/test_together.py);
- the step runs in fp32 without channels_last: bf16 autocast inside vmap fails
  in BatchNorm (torch 2.13), so the seeds' configs record precision fp32.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterator

import torch
from torch.func import functional_call, grad_and_value, vmap

from mnist_cnn.config import Config
from mnist_cnn.data.augment import Draws, apply_draws, draw
from mnist_cnn.data.idx import Mnist
from mnist_cnn.data.inputs import as_log_probs, normalize, to_unit
from mnist_cnn.errors import Diverged, TrainingError, first_line
from mnist_cnn.training.loop import (
    AUGMENT_STREAM,
    DROPOUT_STREAM,
    LOG_EVERY,
    EpochProgress,
    StepSettings,
    TrainState,
    end_epoch,
    epoch_order,
    never,
    nll,
    plain_network,
    rng_key,
)


class Stack:
    """The seeds' networks as stacked tensors: params and buffers {name: (S, ...)}, of which
    each seed's own module holds views, so its optimizer, EMA and checkpoint see its slice."""

    def __init__(self, states: list[TrainState], smoothing: float) -> None:
        self.states = states
        models = [plain_network(s.model) for s in states]
        self.base = copy.deepcopy(models[0]).to("meta")  # the structure; weights come from params/buffers
        self.params = stacked([dict(m.named_parameters()) for m in models])
        self.buffers = stacked([dict(m.named_buffers()) for m in models])
        self.named = [list(m.named_parameters()) for m in models]  # each seed's (name, parameter), in order

        def loss_of(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor):  # one seed: (B, 1, 28, 28)
            out = as_log_probs(functional_call(self.base, (params, buffers), (x,)))  # (B, classes)
            return nll(out, y, smoothing), out

        # each seed its own dropout masks; in-place BatchNorm updates land in each seed's buffers
        self.step_fn = vmap(grad_and_value(loss_of, has_aux=True), randomness="different")

    def __len__(self) -> int:
        return len(self.states)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        """Each seed's optimizer step, schedule and weight average on its slice of the gradients."""
        for i, (state, named) in enumerate(zip(self.states, self.named)):
            for name, p in named:
                p.grad = grads[name][i]
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
            if state.ema is not None:
                state.ema.update(plain_network(state.model), state.scheduler.last_epoch)


def stacked(named: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: (S, ...)} from S modules' {name: tensor}; each module's tensor becomes a view of its slice."""
    out = {name: torch.stack([n[name].detach() for n in named]) for name in named[0]}
    for i, n in enumerate(named):
        for name, t in n.items():
            t.data = out[name][i]
    return out


def seed_draws(n: int, settings: list[StepSettings], epoch: int, step: int, device: torch.device) -> Draws:
    """The augmentation draws of every seed's batch, each from that seed's own (seed, epoch, step) key."""
    parts = []
    for s in settings:
        g = torch.Generator(device).manual_seed(rng_key(s.seed, epoch, step, AUGMENT_STREAM))
        parts.append(draw(n, s.augment, g, device))
    return Draws.cat(parts)


def train_epoch_together(stack: Stack, images: torch.Tensor, labels: torch.Tensor, settings: list[StepSettings],
                         progress: list[EpochProgress],
                         on_log: Callable[[EpochProgress, int], None] | None = None,
                         should_stop: Callable[[], bool] = never) -> list[EpochProgress]:
    """train_one_epoch for the stack: one pass over each seed's own permutation of the (N, 28, 28) images,
    from the step where all of them stand. on_log gets the seeds' sums (the bar shows their mean)."""
    s0, n_seeds, device = settings[0], len(stack), images.device
    epoch, step = progress[0].epoch, progress[0].step
    perms = torch.stack([epoch_order(images.shape[0], s.seed, epoch, device) for s in settings])  # (S, N)
    steps = math.ceil(perms.shape[1] / s0.batch_size)
    loss_sum = torch.tensor([p.loss_sum for p in progress], device=device)  # (S,)
    correct = torch.tensor([p.correct for p in progress], device=device, dtype=torch.long)
    seen = torch.tensor([p.seen for p in progress], device=device, dtype=torch.long)
    first_bad = torch.full((n_seeds,), -1, device=device, dtype=torch.long)
    lrs = [p.lr for p in progress]

    def so_far(step: int) -> list[EpochProgress]:
        return [EpochProgress(epoch, step, float(loss), int(c), int(n), p.seconds, lr)
                for loss, c, n, p, lr in zip(loss_sum.tolist(), correct.tolist(), seen.tolist(), progress, lrs)]

    while step < steps:
        idx = perms[:, step * s0.batch_size:(step + 1) * s0.batch_size]  # (S, B)
        b = idx.shape[1]
        batch = images[idx.flatten()]  # (S * B, 28, 28)
        if s0.augment.enabled:
            x = apply_draws(batch, s0.augment, seed_draws(b, settings, epoch, step, device))
        else:
            x = to_unit(batch)
        x = normalize(x, s0.norm).view(n_seeds, b, *x.shape[1:])  # (S, B, 1, 28, 28)
        y = labels[idx]  # (S, B)
        torch.manual_seed(rng_key(s0.seed, epoch, step, DROPOUT_STREAM))
        try:
            grads, (loss, out) = stack.step_fn(stack.params, stack.buffers, x, y)  # loss (S,), out (S, B, classes)
        except RuntimeError as e:  # a network vmap cannot batch: .item(), data-dependent branches, ...
            raise TrainingError(f"the seeds cannot be trained stacked (torch.func.vmap: {first_line(e)}); "
                                "train them one after another with --together no") from None
        if step == 0:
            lrs = [st.optimizer.param_groups[0]["lr"] for st in stack.states]
        stack.step(grads)
        plain = -out.detach().gather(2, y.unsqueeze(2)).squeeze(2).mean(1)  # (S,) plain NLL
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(plain), step, first_bad)
        loss_sum += plain * b
        correct += (out.detach().argmax(2) == y).sum(1)
        seen += b
        step += 1
        stop = should_stop()
        if step % LOG_EVERY == 0 or step == steps or stop:
            bad = [(s.seed, f + 1) for s, f in zip(settings, first_bad.tolist()) if f >= 0]  # one host sync
            if bad:
                raise Diverged(f"epoch {epoch}: seed {bad[0][0]}'s loss became NaN or infinite at step "
                                    f"{bad[0][1]}; lower the learning rate (the last checkpoints are from "
                                    "before this epoch)")
            if on_log is not None:
                parts = so_far(step)
                on_log(EpochProgress(epoch, step, sum(p.loss_sum for p in parts), sum(p.correct for p in parts),
                                     sum(p.seen for p in parts)), steps)
        if stop:
            break
    return so_far(step)


def fit_together(stack: Stack, data: Mnist, cfgs: list[Config],
                 on_log: Callable[[EpochProgress, int], None] | None = None,
                 should_stop: Callable[[], bool] = never) -> Iterator[list[dict]]:
    """fit() for the stack: from where the seeds stand (all at the same point) to the last epoch;
    each epoch yields the seeds' metrics rows. A row's seconds are the seed's share of the stacked
    training time plus its own evaluation, so the seeds' seconds add up to the wall time."""
    settings = [StepSettings.from_config(cfg) for cfg in cfgs]
    states, epochs = stack.states, cfgs[0].epochs
    steps = data.steps_per_epoch(cfgs[0].batch_size)
    for epoch in range(states[0].epoch + 1, epochs + 1):
        begun = [s.partial if s.partial is not None and s.partial.epoch == epoch else EpochProgress(epoch)
                 for s in states]
        start = time.perf_counter()
        done = train_epoch_together(stack, data.train_images, data.train_labels, settings, begun, on_log,
                                    should_stop)
        share = (time.perf_counter() - start) / len(stack)
        for d in done:
            d.seconds += share
        if done[0].step < steps:
            for state, d in zip(states, done):
                state.partial = d
            return
        rows = []
        for state, d, cfg in zip(states, done, cfgs):
            state.partial = None
            rows.append(end_epoch(state, d, data, cfg, settings[0].world))
        yield rows
        if should_stop():
            return


def same_point(states: list[TrainState]) -> bool:
    """Whether the seeds stand at the same epoch and step, as a stack must."""
    def point(s: TrainState) -> tuple[int, int]:
        return (s.epoch, s.partial.step if s.partial is not None else 0)
    return len({point(s) for s in states}) == 1
