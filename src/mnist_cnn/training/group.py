"""Seeds trained together (together.py), each in its own run folder: what `train --seeds --together yes` runs.

    code = train_group(cfgs)           # new runs; cfgs differ in run.seed and run.out only
    code = train_group(cfgs, resume=True)  # continue their folders, all stopped at the same point

Every seed's folder is what a run of its own writes (config.toml, metrics.csv,
last.pt, curves.png, ...) and its last.pt resumes, evaluates and exports alone.
SIGINT / SIGTERM stop all seeds at the same step, checkpointed; the same
command continues them together.
"""

from __future__ import annotations

import copy
import signal
import sys
import time
from pathlib import Path

import torch

from mnist_cnn.checkpoint import load_checkpoint, model_from_checkpoint, restore_state, state_checkpoint
from mnist_cnn.config import Config
from mnist_cnn.data.idx import Mnist
from mnist_cnn.device import pick_device, seed_everything, set_threads
from mnist_cnn.networks.builtin import count_parameters
from mnist_cnn.plots import draw_curves
from mnist_cnn.training.loop import TrainState, build_state
from mnist_cnn.training.run import (
    EpochBar,
    StopSignal,
    best_on_validation,
    describe_progress,
    format_row,
    load_data,
    new_network,
    sample_grid,
    write_start,
)
from mnist_cnn.training.rundir import RunDir, read_metrics
from mnist_cnn.training.stack import Stack, fit_together, same_point
from mnist_cnn.training.tensorboard import Board


def train_group(cfgs: list[Config], resume: bool = False) -> int:
    """Train the seeds of `cfgs` stacked, from scratch or (resume) from their folders' last.pt."""
    first = cfgs[0]
    device = pick_device(first.run.device)
    set_threads(first.run.threads)
    seed_everything(first.run.seed, first.run.deterministic)
    data = load_data(first, device)
    for cfg in cfgs[1:]:
        cfg.run.data_dir = first.run.data_dir
    created: list[RunDir] = []
    try:
        states = [resumed(cfg, device, data) if resume else fresh(cfg, device, data, created) for cfg in cfgs]
        if resume:
            print(f"resuming {seeds_text(len(cfgs))} together after {describe_progress(states[0])} on {device}",
                  flush=True)
        else:
            print(f"training {seeds_text(len(cfgs))} together ({', '.join(str(c.run.seed) for c in cfgs)}) of "
                  f"{first.model} ({count_parameters(states[0].model):,} parameters each), recipe {first.recipe}, "
                  f"{data.train_images.shape[0]:,} images, {first.epochs} epochs on {device} (fp32, stacked)",
                  flush=True)
        return train_stacked([RunDir(Path(cfg.run.out)) for cfg in cfgs], states, data, cfgs)
    except BaseException:
        for run in created:
            if not run.file("last.pt").exists():
                run.abandon()  # nothing finished: leave no half-made run folder behind
        raise


def seeds_text(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def fresh(cfg: Config, device: torch.device, data: Mnist, runs: list[RunDir]) -> TrainState:
    """A new seed: its weights drawn from its own seed, as a run of its own draws them; its folder appended to runs."""
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    net, model = new_network(cfg, data, device)
    run = RunDir.create(Path(cfg.run.out))
    runs.append(run)
    state = build_state(model, cfg, device, data.steps_per_epoch(cfg.batch_size))
    state.network = {"num_classes": data.num_classes, "sha256": net.sha256}
    write_start(run, cfg, net, model, data, device)
    return state


def resumed(cfg: Config, device: torch.device, data: Mnist) -> TrainState:
    """A seed's state where its last.pt left off."""
    last = Path(cfg.run.out) / "last.pt"
    ckpt = load_checkpoint(last)
    model, _ = model_from_checkpoint(ckpt, str(last), last.parent, trust_code=True)  # the user's --model: seeds.py
    state = build_state(model.to(device), cfg, device, data.steps_per_epoch(cfg.batch_size))
    state.network = ckpt.get("network") or {}
    restore_state(state, ckpt, str(last))
    return state


def train_stacked(runs: list[RunDir], states: list[TrainState], data: Mnist, cfgs: list[Config]) -> int:
    """Epochs of the stack until done or stopped; every seed's checkpoint after each epoch and on a stop."""
    assert same_point(states), "the seeds of a stack must stand at the same epoch and step"
    start, epochs = time.perf_counter(), cfgs[0].epochs
    bar = EpochBar(epochs, cfgs[0].run.progress)
    boards = [Board(run.path) if cfg.run.tensorboard else None for run, cfg in zip(runs, cfgs)]
    for board, cfg in zip(boards, cfgs):
        if board is not None and states[0].epoch == 0 and states[0].partial is None:
            board.samples(sample_grid(data, cfg)[0])
    stack = Stack(states, cfgs[0].optim.label_smoothing)
    with StopSignal() as stop:
        try:
            for rows in fit_together(stack, data, cfgs, on_log=bar, should_stop=stop.requested):
                for run, state, cfg, row, board in zip(runs, states, cfgs, rows, boards):
                    run.end_epoch(state_checkpoint(state, cfg), best=best_on_validation(state.metrics))
                    print(f"seed {cfg.run.seed:>3}  {format_row(row, epochs)}", flush=True)
                    if board is not None:
                        board.epoch(row)
        finally:
            bar.close()
        if states[0].partial is not None or states[0].epoch < epochs:
            for run, state, cfg, board in zip(runs, states, cfgs, boards):
                if state.partial is not None:
                    run.save_last(state_checkpoint(state, cfg))
                if board is not None:
                    board.close()
            signum = stop.signum or signal.SIGTERM
            print(f"stopped by {signal.Signals(signum).name} after {describe_progress(states[0])}; run the same "
                  "command again to continue", file=sys.stderr, flush=True)
            return 128 + signum
    wall = time.perf_counter() - start
    for run, state, cfg, board in zip(runs, states, cfgs, boards):
        run.save_figure("curves.png", lambda f, run=run: draw_curves(read_metrics(run.file("metrics.csv")), f))
        if board is not None:
            board.finish(cfg, state.metrics[-1])
    print(f"{seeds_text(len(states))} together: wall {wall:.1f} s ({wall / len(states):.1f} s per seed)", flush=True)
    return 0


def stack_configs(cfg: Config, seeds: list[int], base: Path) -> list[Config]:
    """One config per seed as the stack trains it: fp32 without channels_last (see together.py)."""
    out = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.run.seed, one.run.out = seed, str(base / f"seed-{seed}")
        one.run.precision, one.run.channels_last, one.run.together = "fp32", False, "yes"
        out.append(one)
    return out
