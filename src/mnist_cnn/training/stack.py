"""Several seeds of one recipe trained as ONE stacked model: a vmap-ed forward/backward per step.

    step = StackStep(states, [StepSettings.from_config(cfg) for cfg in cfgs])  # states built as for separate runs
    for rows in fit(step, data, cfgs):    # training.loop: each epoch, one metrics row per seed
        ...                               # the caller checkpoints each seed's state

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

With a teacher (training.distill), one teacher forward per step covers every
seed's batch: (S * B) images in one call.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch.func import functional_call, grad_and_value, vmap

from mnist_cnn.checkpoint import unwrap
from mnist_cnn.errors import TrainingError, first_line
from mnist_cnn.training.distill import Teacher
from mnist_cnn.training.loop import StepSettings, batch_loss
from mnist_cnn.training.state import TrainState


class StackStep:
    """The seeds' networks as stacked tensors: params and buffers {name: (S, ...)}, of which
    each seed's own module holds views, so its optimizer, EMA and checkpoint see its slice."""

    stacked = True

    def __init__(self, states: list[TrainState], settings: list[StepSettings], teacher: Teacher | None = None) -> None:
        self.states, self.settings, self.teacher = states, settings, teacher
        models = [unwrap(s.model) for s in states]
        self.base = copy.deepcopy(models[0]).to("meta")  # the structure; weights come from params/buffers
        self.params = stacked([dict(m.named_parameters()) for m in models])
        self.buffers = stacked([dict(m.named_buffers()) for m in models])
        self.named = [list(m.named_parameters()) for m in models]  # each seed's (name, parameter), in order
        # inside vmap: fp32 (bf16 autocast fails in BatchNorm there) and no channels_last
        self.loss_settings = dataclasses.replace(settings[0], precision="fp32", channels_last=False)

        def loss_of(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
            soft: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor]:  # one seed: x (B, 1, 28, 28), y (B,), soft (B, classes) or None
            net = lambda x: functional_call(self.base, (params, buffers), (x,))  # noqa: E731  # this seed's weights
            return batch_loss(net, x, y, self.loss_settings, soft)

        # each seed its own dropout masks; in-place BatchNorm updates land in each seed's buffers
        in_dims = (0, 0, 0, 0, 0 if teacher is not None else None)
        self.grads_of = vmap(grad_and_value(loss_of, has_aux=True), in_dims=in_dims, randomness="different")

    def train(self) -> None:
        self.base.train()
        for state in self.states:
            state.model.train()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        soft = None
        if self.teacher is not None:  # one forward for all seeds' batches: (S * B, ...) -> (S, B, classes)
            soft = self.teacher.probs(x.flatten(0, 1), self.loss_settings.precision).view(*y.shape, -1)
        try:
            grads, (_, out) = self.grads_of(self.params, self.buffers, x, y, soft)  # out (S, B, classes)
        except RuntimeError as e:  # a network vmap cannot batch: .item(), data-dependent branches, ...
            raise TrainingError(
                f"the seeds cannot be trained stacked (torch.func.vmap: {first_line(e)}); "
                "train them one after another with --together no"
            ) from None
        for i, (state, named) in enumerate(zip(self.states, self.named)):
            for name, p in named:
                p.grad = grads[name][i]
            state.update()
        out = out.detach()
        plain = -out.gather(2, y.unsqueeze(2)).squeeze(2).mean(1)  # (S,) plain NLL
        return out, plain


def stacked(named: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: (S, ...)} from S modules' {name: tensor}; each module's tensor becomes a view of its slice."""
    out = {name: torch.stack([n[name].detach() for n in named]) for name in named[0]}
    for i, n in enumerate(named):
        for name, t in n.items():
            t.data = out[name][i]
    return out


def same_point(states: list[TrainState]) -> bool:
    """Whether the seeds stand at the same epoch and step, as a stack must."""

    def point(s: TrainState) -> tuple[int, int]:
        return (s.epoch, s.partial.step if s.partial is not None else 0)

    return len({point(s) for s in states}) == 1
