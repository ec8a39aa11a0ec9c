"""One run across processes with torchrun and DistributedDataParallel.

    torchrun --nproc-per-node 2 -m mnist_cnn train --device cpu ...     # gloo on the CPU
    torchrun --nproc-per-node 8 -m mnist_cnn train --device cuda ...    # NCCL, one GPU per process

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; without
them (a plain `mnist-cnn train`) everything here is a no-op for one process.

The global batch stays cfg.batch_size: every rank draws the same permutation
and the same augmentation of the whole batch, then trains on its contiguous
share of it. Each rank's loss is its share's summed NLL over the global batch
size times the world size, so DDP's gradient average is exactly the gradient
of the global batch's mean loss. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mnist_cnn.errors import ConfigError, TrainingError, first_line


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a batch of n (shares differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Element-wise sums over the ranks (the tensors themselves when alone)."""
        if not self.active:
            return list(values)
        flat = torch.cat([v.double().reshape(-1) for v in values])  # one all-reduce for all of them
        collective(dist.all_reduce, flat)
        parts = flat.split([v.numel() for v in values])
        return [f.to(v.dtype).reshape(v.shape) for f, v in zip(parts, values)]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one: a stop is taken at the same step everywhere."""
        if not self.active:
            return flag
        t = torch.tensor(int(flag), device=device)
        collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled: for checkpoints and small settings)."""
        if not self.active:
            return obj
        box = [obj]
        collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            collective(dist.barrier)


class PeerLost(TrainingError):
    """Another process of the run died or left: the run cannot go on."""


def lost_peer(error: BaseException) -> bool:
    """Whether an exception from a collective (or from DDP's gradient all-reduce) means a peer is gone."""
    text = str(error)
    return isinstance(error, (PeerLost, dist.DistError)) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed")
    )


def collective(fn, *args, **kwargs):
    """A collective call; a peer that died turns into a one-line PeerLost."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        raise PeerLost(first_line(e)) from None


def from_environment() -> World:
    """The World torchrun describes in the environment (one process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (once): gloo for the CPU, NCCL for CUDA, one GPU per local rank.
    Returns the device this process trains on."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo for CPU tensors (and the pickled objects of `broadcast`), NCCL for CUDA ones
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return device


def stop(world: World, clean: bool) -> None:
    """Leave the process group; after a clean run, all together (a process that leaves while
    another is still writing makes gloo abort that one)."""
    if world.active and dist.is_initialized():
        if clean:
            world.barrier()
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int, n_train: int) -> None:
    """The global batch must split evenly, and the epoch's last, shorter batch must leave every rank an image."""
    if not world.active:
        return
    if batch_size % world.size:
        raise ConfigError(
            f"batch_size {batch_size} does not divide evenly over {world.size} processes; "
            f"use a multiple of {world.size}"
        )
    last = n_train % batch_size or batch_size
    if last < world.size:
        raise ConfigError(
            f"the epoch's last batch has {last} images, fewer than the {world.size} processes; "
            "change --batch-size or --train-limit"
        )


def wrap(model: nn.Module, world: World, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP around the model. BatchNorm keeps per-rank batch statistics unless sync_bn (CUDA only);
    DDP hands rank 0's running statistics to every rank before each forward."""
    if not world.active:
        if sync_bn:
            raise ConfigError("run.sync_bn needs torchrun with more than one process")
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("run.sync_bn is for CUDA only: torch's SyncBatchNorm has no CPU implementation")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def share_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: what is evaluated and
    checkpointed is then one model, rank 0's, everywhere."""
    if world.active:
        for b in model.buffers():
            collective(dist.broadcast, b, src=0)
