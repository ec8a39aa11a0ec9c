"""An epoch's running figures, kept on the device so that a training step never waits for the host.

    sums = RunningSums(progress, world, device)   # each seed's epoch so far (S seeds)
    sums.add(step, out, plain, y)                 # after each step: no host sync
    sums.check(step)                              # every LOG_EVERY steps: NonFiniteLoss on a NaN loss
    progress = sums.so_far(step)                  # summed over the processes under torchrun

training.loop's epoch loop makes one each epoch and reads it; the steps only add to it.
"""

from __future__ import annotations

import torch

from mnist_cnn.checkpoint import EpochProgress
from mnist_cnn.training.distributed import World


class NonFiniteLoss(Exception):
    def __init__(self, seed: int, step: int) -> None:
        super().__init__(seed, step)
        self.seed, self.step = seed, step  # index into the stack; 1-based step


class RunningSums:
    """Each seed's loss, correct and seen counts over an epoch (S,) and the first step whose loss was not
    finite. Updated in place: the compiled step (training.graph) adds to the same tensors at the same
    addresses, inside the function that torch.compile takes whole."""

    def __init__(self, progress: list[EpochProgress], world: World, device: torch.device) -> None:
        self.progress, self.world, self.device = progress, world, device
        base = 1 if world.main else 0  # process 0 also carries what `progress` already counted
        self.loss = torch.tensor([p.loss_sum * base for p in progress], device=device)  # (S,)
        self.correct = torch.tensor([p.correct * base for p in progress], device=device, dtype=torch.long)
        self.seen = torch.tensor([p.seen * base for p in progress], device=device, dtype=torch.long)
        self.first_bad = torch.full((len(progress),), -1, device=device, dtype=torch.long)
        self.lrs = [p.lr for p in progress]  # the optimizers' learning rates at the epoch's first step

    def add(self, step: int | torch.Tensor, out: torch.Tensor, plain: torch.Tensor, y: torch.Tensor) -> None:
        """One step's (S, b, classes) log-probabilities, (S,) plain NLL and (S, b) labels; `step` (0-based)
        a number, or a (1,) tensor on the device in the compiled step."""
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~torch.isfinite(plain), step, self.first_bad))
        self.loss.add_(plain * y.shape[1])
        self.correct.add_((out.argmax(2) == y).sum(1))
        self.seen.add_(y.shape[1])

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
