"""What training carries from step to step: network, optimizer, schedule, weight average,
epochs done and the unfinished one; and how it goes into a checkpoint and comes back.

    state = build_state(model, cfg, device, steps_per_epoch)   # a fresh run
    restore_state(state, load_checkpoint(path), path)           # or where last.pt left off
    ckpt = state_checkpoint(state, cfg)                         # what run folders save

No generator state: every random draw derives from (seed, epoch, step), so a run
resumes from its step count alone, on any device (older checkpoints' "rng" is ignored).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from mnist_cnn.checkpoint import Checkpoint, EpochProgress, NetworkRecord, load_weights, unwrap, weights_of
from mnist_cnn.config import Config, OptimConfig
from mnist_cnn.errors import CheckpointError
from mnist_cnn.training.distributed import World, wrap

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
    def update(self, model: nn.Module, steps: int | torch.Tensor) -> None:
        """After the optimizer's `steps`-th step (1-based): a number, or a (1,) int64 tensor on the device
        in a step that must not wait for the host (training.graph)."""
        params: list[torch.Tensor] = list(model.parameters())
        weight = self.weight(steps, params[0].dtype)  # a 0-d tensor weight: its overload is missing from torch's stub
        torch._foreach_lerp_(list(self.model.parameters()), params, weight)  # type: ignore[arg-type]
        self.copy_buffers(model)

    def weight(self, steps: int | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
        """1 - d after `steps` steps: how far the average moves toward the weights; computed on the device,
        as a 0-d tensor of the weights' dtype, when `steps` is a tensor."""
        if isinstance(steps, torch.Tensor):
            k = steps.to(torch.float64)[0]
            return (1 - torch.clamp((1 + k) / (EMA_WARMUP + k), max=self.decay)).to(dtype)
        return 1 - min(self.decay, (1 + steps) / (EMA_WARMUP + steps))

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0  # epochs completed
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch
    partial: EpochProgress | None = None  # set when the run stopped inside epoch `epoch + 1`
    network: NetworkRecord = field(default_factory=NetworkRecord)  # for the checkpoint
    ema: WeightAverage | None = None  # optim.ema > 0: what is evaluated and saved as the model
    test_confusion: torch.Tensor | None = None  # (classes, classes) of the latest test evaluation; not saved

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated, checkpointed as "model" and exported: the average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    def update(self, loss: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> None:
        """What every kind of step does with a batch's loss: the gradient (by autograd from `loss`; the
        stack's come from torch.func, set on the parameters), the optimizer's step, the schedule and the
        weight average. `steps`: the optimizer steps taken, counted on the device by a step whose schedule
        lives there too (training.graph); otherwise the host's LambdaLR steps and counts them."""
        if loss is not None:
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if steps is None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.model), self.scheduler.last_epoch if steps is None else steps)

    def begun(self, epoch: int) -> EpochProgress:
        """Where `epoch` stands: what an interrupted run had done of it, or its start."""
        return self.partial if self.partial is not None and self.partial.epoch == epoch else EpochProgress(epoch)


def make_optimizer(model: nn.Module, cfg: OptimConfig, graphed: bool = False) -> torch.optim.Optimizer:
    """graphed (run.compile = step): the learning rate is a device tensor that the step itself sets, and
    Adam's step count stays on the device (capturable), so that a step never needs the host."""
    # The fused kernels update all parameters in one call, which made steps faster on the CPU.
    lr: float | torch.Tensor = cfg.lr
    if graphed:
        lr = torch.tensor(cfg.lr, dtype=torch.float64, device=next(model.parameters()).device)
    return OPTIMIZERS[cfg.name](model.parameters(), lr, cfg, graphed)


def adam(params: Iterable[nn.Parameter], lr: float | torch.Tensor, cfg: OptimConfig, graphed: bool) -> Optimizer:
    """Adam; weight_decay adds decay * w to the gradient (L2), which Adam's scaling then weakens."""
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=graphed)


def adamw(params: Iterable[nn.Parameter], lr: float | torch.Tensor, cfg: OptimConfig, graphed: bool) -> Optimizer:
    """AdamW (Loshchilov and Hutter): the weight decay applied to the weights apart from the gradient."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=graphed)


def sgd(params: Iterable[nn.Parameter], lr: float | torch.Tensor, cfg: OptimConfig, graphed: bool) -> Optimizer:
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=True
    )


# optim.name -> the optimizer; a new one is a function here and its name in config.CHOICES["optim.name"]
# (tests/test_train.py holds the two together)
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], float | torch.Tensor, OptimConfig, bool], Optimizer]] = {
    "adam": adam,
    "adamw": adamw,
    "sgd": sgd,
}


def step_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The seed's StepLR: gamma once every step_size epochs, as a staircase over steps."""
    return float(cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size))


def cosine_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def onecycle_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Linear up to the peak (optim.warmup of the run), then linear down to zero."""
    peak = max(1, round(cfg.warmup * total_steps))
    if step < peak:
        return (step + 1) / peak
    return max(0.0, (total_steps - step) / max(1, total_steps - peak))


def constant_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    return 1.0


# optim.schedule -> the multiplier of optim.lr at each step; a new schedule is a function here and its name
# in config.CHOICES["optim.schedule"] (tests/test_train.py holds the two together)
SCHEDULES: dict[str, Callable[[int, OptimConfig, int, int], float]] = {
    "step": step_factor,
    "onecycle": onecycle_factor,
    "cosine": cosine_factor,
    "constant": constant_factor,
}


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based). Every schedule is
    per step, so the seed's per-epoch StepLR is the same staircase expressed in steps.
    The scheduler also asks for step == total_steps once, after the last step."""
    return SCHEDULES[cfg.schedule](step, cfg, steps_per_epoch, total_steps)


def build_state(
    model: nn.Module, cfg: Config, device: torch.device, steps_per_epoch: int, world: World = World()
) -> TrainState:
    """Optimizer and schedule around `model` (built by networks.reference.create), moved to
    `device`; wrapped in DistributedDataParallel under torchrun."""
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing in torch's stub
    ema = WeightAverage(model, cfg.optim.ema) if cfg.optim.ema else None  # of the plain network, before wrappers
    model = wrap(model, world, device, cfg.run.sync_bn)
    optimizer = make_optimizer(model, cfg.optim, graphed=cfg.run.compile == "step")
    if cfg.run.compile == "model":
        model = torch.compile(model)  # type: ignore[assignment]  # checkpoints unwrap it
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, steps_per_epoch, total)
    )
    return TrainState(model, optimizer, scheduler, ema=ema)


def state_checkpoint(state: TrainState, cfg: Config) -> Checkpoint:
    """ "model" holds what is evaluated (the weight average with optim.ema), "train_model" then
    the trained weights that resume continues from."""
    return Checkpoint(
        config=cfg,
        model=weights_of(state.evaluated),
        network=state.network,
        epoch=state.epoch,
        metrics=list(state.metrics),
        optimizer=state.optimizer.state_dict(),
        scheduler=state.scheduler.state_dict(),
        partial=dataclasses.replace(state.partial) if state.partial is not None else None,
        train_model=weights_of(state.model) if state.ema is not None else None,
    )


def restore_state(state: TrainState, ckpt: Checkpoint, source: str) -> None:
    """Put a freshly built TrainState where the checkpoint left off."""
    load_weights(unwrap(state.model), ckpt.train_model or ckpt.model, source)
    if state.ema is not None:
        load_weights(state.ema.model, ckpt.model, source)
    if ckpt.optimizer is None or ckpt.scheduler is None:
        raise CheckpointError(f"{source}: training state is incomplete (no optimizer or schedule state)")
    try:
        kinds = [(g["lr"], g.get("capturable")) for g in state.optimizer.param_groups]
        state.optimizer.load_state_dict(ckpt.optimizer)
        keep_group_kinds(state.optimizer, kinds)
        state.scheduler.load_state_dict(ckpt.scheduler)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: training state is incomplete or corrupt ({e})") from None
    state.network = ckpt.network
    state.epoch = ckpt.trained
    state.metrics = list(ckpt.metrics)
    state.partial = ckpt.partial


def keep_group_kinds(optimizer: torch.optim.Optimizer, kinds: list[tuple[Any, Any]]) -> None:
    """A checkpoint's param groups bring their own learning-rate type (a tensor after run.compile = step)
    and `capturable` flag; keep this optimizer's, so that either kind of run resumes the other's."""
    for group, (lr, capturable) in zip(optimizer.param_groups, kinds):
        for key in ("lr", "initial_lr"):
            if key in group:
                value = float(group[key])
                group[key] = lr.new_tensor(value) if isinstance(lr, torch.Tensor) else value
        if capturable is not None:
            group["capturable"] = capturable
