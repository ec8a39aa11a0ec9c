"""Runs start to finish: data -> fit() -> run folder(s), with resume and signals. One lifecycle
for a network trained alone (under torchrun, each process's part of it) and for stacked seeds.

    code = start_run(cfg)                  # a new run folder; returns the exit code
    code = resume_run(Path("runs/x"))      # continue from runs/x/last.pt
    code = train_stack(stack_configs(cfg, [0, 1, 2], Path("runs/s")))   # seeds stacked, a folder each

SIGINT / SIGTERM only set a flag: the current step finishes, last.pt records
where the run stopped (mid-epoch included) and the exit code is 130 / 143.
`--resume` then continues bitwise-exactly on the CPU with --deterministic.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from mnist_cnn.checkpoint import (
    LAST_FILE,
    Checkpoint,
    EpochProgress,
    NetworkRecord,
    load_checkpoint,
    model_from_checkpoint,
)
from mnist_cnn.config import Config
from mnist_cnn.data.augment import augment_batch
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.data.splits import Splits, load_dataset, resolve_data_dir, to_device
from mnist_cnn.device import pick_device, resolve_precision, seed_everything, set_threads
from mnist_cnn.errors import (
    CheckpointError,
    ConfigError,
    Diverged,
    MnistCnnError,
    OutputError,
    TrainingError,
    first_line,
)
from mnist_cnn.networks.builtin import count_parameters
from mnist_cnn.networks.reference import SOURCE_COPY, Network, canonical, check_contract, create, locate
from mnist_cnn.networks.summary import describe, summary_text, totals
from mnist_cnn.plots import draw_curves, draw_samples
from mnist_cnn.say import NOTICE, say
from mnist_cnn.training import distributed
from mnist_cnn.training.card import final_evaluation, write_card
from mnist_cnn.training.distill import Teacher, load_teacher
from mnist_cnn.training.distributed import World
from mnist_cnn.training.graph import one_step
from mnist_cnn.training.loop import OwnsEpoch, Step, StepSettings, fit
from mnist_cnn.training.rundir import RunDir, default_run_dir, read_metrics
from mnist_cnn.training.stack import StackStep, same_point
from mnist_cnn.training.state import TrainState, build_state, restore_state, state_checkpoint
from mnist_cnn.training.tensorboard import TensorBoardLog

SAMPLE_GRID = 32  # augmented training images shown in samples.png
OnEpoch = Callable[[list[dict[str, Any]]], bool]  # each run's metrics row of the epoch just saved -> go on?


def format_row(row: dict, epochs: int) -> str:
    text = (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.1e}  "
        f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%  "
    )
    if "test_acc" in row:
        text += f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}%  "
    if "val_acc" in row:
        text += f"val acc {100 * row['val_acc']:6.2f}%  "
    return text + f"{row['seconds']:6.1f} s"


def in_notebook() -> bool:
    """Whether tqdm.auto chose its notebook widget (a Jupyter kernel with ipywidgets)."""
    from tqdm.notebook import tqdm_notebook

    return issubclass(tqdm, tqdm_notebook)


class EpochBar:
    """A tqdm bar per epoch, fed by fit()'s on_log callback (hidden when disabled or not a terminal)."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.bar: tqdm[Any] | None = None

    def __call__(self, progress: EpochProgress, steps: int) -> None:
        bar = self.bar
        if bar is None:
            # in a terminal, or as a notebook widget (a notebook's output is no terminal, so say so)
            shown = False if in_notebook() else None
            bar = self.bar = tqdm(
                total=steps,
                initial=0,
                desc=f"epoch {progress.epoch}/{self.epochs}",
                leave=False,
                disable=not self.enabled or shown,
                dynamic_ncols=True,
            )
        bar.set_postfix(
            loss=f"{progress.loss_sum / progress.seen:.4f}",
            acc=f"{progress.correct / progress.seen:.4f}",
            refresh=False,
        )
        bar.update(progress.step - bar.n)
        if progress.step == steps:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopSignal:
    """While active, SIGINT/SIGTERM set a flag instead of killing the process.
    A second signal aborts at once (files stay whole: every write is atomic).
    Nested inside another StopSignal (--seeds around each run), a caught signal is
    handed to the outer one on exit, so a run that finished anyway still stops the loop.
    Python lets only the main thread set handlers: in another thread (a notebook's worker,
    a web app's) nothing is installed and the run cannot be stopped by a signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        outer = getattr(self._previous.get(self.signum), "__self__", None)
        if isinstance(outer, StopSignal) and outer.signum is None:
            outer.signum = self.signum

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None


def load_data(cfg: Config, device: torch.device) -> Splits:
    dataset = get_dataset(cfg.dataset)
    data_dir = resolve_data_dir(cfg.run.data_dir or None, dataset=dataset.name)
    cfg.run.data_dir = str(data_dir.resolve())  # absolute: evaluate and export find it from anywhere
    return to_device(
        load_dataset(data_dir, verify=cfg.run.verify, dataset=dataset, test=cfg.run.test),
        device,
        cfg.run.train_limit,
        cfg.val_size,
        cfg.batch_size,
    )


def prepare(cfg: Config, world: World) -> tuple[torch.device, Splits]:
    """Device, threads, seeds and data: the same for a new run and a resumed one, and on every
    process of a torchrun run (whose process group this joins)."""
    device = distributed.start(world, pick_device(cfg.run.device))
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed, cfg.run.deterministic)  # the same initial weights on every process
    data = load_data(cfg, device)
    distributed.check_batch(world, cfg.batch_size, data.train_images.shape[0])
    return device, data


@dataclass
class Outcome:
    """How a run ended: the exit code (0 finished, 128 + signal when stopped), its folder and
    its final TrainState (weights, metrics rows)."""

    code: int
    run_dir: Path
    state: TrainState


def start_run(cfg: Config, again: str | None = None) -> int:
    return train_run(cfg, again=again).code


def train_run(
    cfg: Config, on_epoch: Callable[[dict[str, Any]], bool] | None = None, again: str | None = None
) -> Outcome:
    """A new run of `cfg`, start to finish: what `mnist-cnn train`, mnist_cnn.train() and each
    tune trial run. on_epoch(row) after each epoch's checkpoint: False ends the run there (tune's pruner).
    again: how to continue it when stopped, if not `train --resume FOLDER` (a seed of --seeds)."""
    world = distributed.from_environment()
    outcome = None
    try:
        if cfg.run.together == "yes":  # a stack's seeds start in train_stack; their config records it
            raise ConfigError("run.together = yes says how --seeds trains its seeds; a single run trains alone")
        if cfg.run.compile == "step" and world.active:
            raise ConfigError("run.compile = step trains in one process; under torchrun use run.compile = no")
        device, data = prepare(cfg, world)
        teacher = load_teacher(cfg, device, data.num_classes)  # before the run folder: a bad teacher leaves none
        each = None if on_epoch is None else lambda rows: on_epoch(rows[0])
        life = Lifecycle([cfg], device, data, world, stacked=False, teacher=teacher, again=again)
        code, states = start(life, each)
        outcome = Outcome(code, Path(cfg.run.out), states[0])
        return outcome
    finally:
        distributed.stop(world, clean=outcome is not None)


def train_stack(
    cfgs: list[Config], resume: bool = False, on_epoch: OnEpoch | None = None, again: str | None = None
) -> int:
    """The seeds of `cfgs` (configs that differ in run.seed and run.out only: stack_configs) trained
    stacked, each in its own run folder, from scratch or (resume) from their folders' last.pt, all
    stopped at the same point. What `train --seeds --together yes` runs, and `tune --val-seeds`
    (on_epoch: the seeds' rows after each epoch; False ends them there)."""
    if distributed.from_environment().active:  # each rank would train the whole stack into the same folders
        raise ConfigError("stacked seeds train in one process; under torchrun, train one seed per command")
    first = cfgs[0]
    if first.run.compile == "step":
        raise ConfigError("run.compile = step trains one network at a time; with it, use --together no")
    device, data = prepare(first, World())
    teacher = load_teacher(first, device, data.num_classes)  # one for the stack: one forward per step
    for cfg in cfgs[1:]:
        cfg.run.data_dir = first.run.data_dir
        cfg.distill = copy.deepcopy(first.distill)
    life = Lifecycle(cfgs, device, data, World(), stacked=True, teacher=teacher, again=again)
    if not resume:
        return start(life, on_epoch)[0]
    runs: list[RunDir] = []
    try:
        states = []
        for cfg in cfgs:
            runs.append(RunDir.open(Path(cfg.run.out)))
            last = runs[-1].file(LAST_FILE)
            ckpt = load_checkpoint(last)
            model, _ = model_from_checkpoint(ckpt, str(last), last.parent, trust_code=True)  # --seeds named it
            states.append(life.resumed_state(model, ckpt, cfg, str(last)))
        say(f"resuming {seeds_text(len(cfgs))} together after {describe_progress(states[0])} on {device}")
        return life.train(list(runs), states, on_epoch)
    finally:
        for run in runs:
            run.close()


def stack_configs(cfg: Config, seeds: list[int], base: Path) -> list[Config]:
    """One config per seed as the stack trains it: fp32 without channels_last (see training.stack)."""
    out = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.run.seed, one.run.out = seed, str(base / f"seed-{seed}")
        one.run.precision, one.run.channels_last, one.run.together = "fp32", False, "yes"
        out.append(one)
    return out


def seeds_text(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def start(life: Lifecycle, on_epoch: OnEpoch | None = None) -> tuple[int, list[TrainState]]:
    """New runs of life's configs: networks initialized from their seeds, run folders made, then trained.
    A run folder that never got a checkpoint is removed again, whatever stopped it."""
    cfgs, data, world = life.cfgs, life.data, life.world
    created: list[RunDir] = []
    try:
        states, runs = [], []
        for cfg in cfgs:
            seed_everything(cfg.run.seed, cfg.run.deterministic)  # each seed's weights as a run of its own draws them
            net, model = new_network(cfg, data, life.device)
            run = None
            if world.main:  # only process 0 writes; the others learn the folder's name from it
                run = RunDir.create(Path(cfg.run.out)) if cfg.run.out else RunDir.create_unique(default_run_dir())
                created.append(run)
            cfg.run.out = world.broadcast(str(run.path) if run else None)
            state = build_state(model, cfg, life.device, data.steps_per_epoch(cfg.batch_size), world)
            state.network = network_record(net, model, data.num_classes)
            if run is not None:
                write_start(run, cfg, net, model, data, life.device)
            states.append(state)
            runs.append(run)
        first = cfgs[0]
        if life.stacked:
            say(
                f"training {seeds_text(len(cfgs))} together ({', '.join(str(c.run.seed) for c in cfgs)}) of "
                f"{first.model} ({count_parameters(states[0].model):,} parameters each), recipe {first.recipe}, "
                f"{data.train_images.shape[0]:,} images, {first.epochs} epochs on {life.device} (fp32, stacked)",
            )
        elif world.main:
            say(
                f"training {first.model} ({count_parameters(states[0].model):,} parameters) on {first.dataset}, "
                f"recipe {first.recipe}, {data.train_images.shape[0]:,} images, {first.epochs} epochs on "
                f"{describe_processes(life.device, world)} ({first.run.precision}) -> {first.run.out}",
            )
        return life.train(runs, states, on_epoch), states
    except BaseException:  # our errors, bugs and a second Ctrl-C alike
        for made in created:
            if not made.file(LAST_FILE).exists():
                made.abandon()  # nothing finished: leave no half-made run folder behind
        raise
    finally:
        for made in created:
            made.close()


def new_network(cfg: Config, data: Splits, device: torch.device) -> tuple[Network, nn.Module]:
    """The config's network, freshly initialized from the global seed, checked before any run folder
    exists; cfg records what runs (precision resolved, a file reference made absolute)."""
    cfg.run.precision = resolve_precision(cfg.run.precision, device)  # config.toml records what ran
    if cfg.run.together == "auto":
        cfg.run.together = "no"  # a run of its own; training.seeds decides for --seeds
    cfg.model = canonical(cfg.model)  # a file reference made absolute: it must resolve from anywhere
    net = locate(cfg.model)
    model = create(net, data.num_classes, cfg.model_args).to(device)
    check_contract(model, data.num_classes, device, cfg.model)
    return net, model


def network_record(net: Network, model: nn.Module, num_classes: int) -> NetworkRecord:
    """The checkpoint's record of its network (never code): classes and the source's SHA-256; for a network
    handed over as a Python object also how (instance, class, factory) and its size and reach, which
    `compare` cannot measure without the class."""
    if net.kind is None:
        return NetworkRecord(num_classes, net.sha256)
    size = totals(model, describe(model))
    return NetworkRecord(
        num_classes,
        net.sha256,
        given=net.kind,
        parameters=size["params"],
        macs=size["macs"],
        receptive_field=size["rf_last_feature_map"],
    )


def write_start(run: RunDir, cfg: Config, net: Network, model: nn.Module, data: Splits, device: torch.device) -> None:
    """A new run folder's first files: config, environment, summary, samples, the network's source."""
    if net.source is not None:
        run.copy_source(net.source, SOURCE_COPY)
    elif net.source_text is not None:  # a network object's class: its source as inspect read it
        run.write_text(SOURCE_COPY, net.source_text)
    run.write_start(cfg, device, summary_text(model, f"{cfg.model} (recipe {cfg.recipe})"))
    write_samples(run, data, cfg)


def describe_processes(device: torch.device, world: World) -> str:
    if not world.active:
        return str(device)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return f"{world.size} processes ({device.type}, DistributedDataParallel over {backend})"


def resume_run(
    run_dir: Path,
    device_name: str | None = None,
    progress: bool | None = None,
    data_dir: str | None = None,
    trust_code: bool = False,
    again: str | None = None,
    epochs: int | None = None,
) -> int:
    """Continue run_dir from its last.pt. Only where it runs may change: the device, the
    progress bar, where the data lives and, under torchrun, the number of processes; none
    of them changes what is trained on. A user network's file, named by the run folder,
    is imported only with trust_code (a folder may come from anyone). The folder is held
    (files.FolderLock) until the run ends: a second writer is refused. epochs: the run's new
    length, for a schedule that does not depend on it (extended())."""
    world = distributed.from_environment()
    code = None
    run = None
    try:
        if world.main:
            if not Path(run_dir).is_dir():
                raise CheckpointError(f"{run_dir} holds no last.pt: nothing to resume")
            run = RunDir.open(Path(run_dir))
        code = resume_in(
            run or RunDir(Path(run_dir)), device_name, progress, data_dir, world, trust_code, again, epochs
        )
        return code
    finally:
        if run is not None:
            run.close()
        distributed.stop(world, clean=code is not None)


def resume_in(
    run: RunDir,
    device_name: str | None,
    progress: bool | None,
    data_dir: str | None,
    world: World,
    trust_code: bool = False,
    again: str | None = None,
    epochs: int | None = None,
) -> int:
    run_dir = run.path
    source = str(run.file(LAST_FILE))
    if world.active:  # process 0 reads the checkpoint and hands it to the others: no shared disk needed
        distributed.start(world, pick_device(device_name or "auto"))
        ckpt = world.broadcast(read_resumable(run, run_dir) if world.main else None)
    else:
        ckpt = read_resumable(run, run_dir)
    cfg = ckpt.config
    cfg.run.device = device_name or cfg.run.device
    cfg.run.progress = cfg.run.progress if progress is None else progress
    cfg.run.data_dir = data_dir or cfg.run.data_dir
    if epochs is not None and epochs != cfg.epochs:
        extend(cfg, ckpt, epochs, run_dir)
        if world.main:
            say(f"{run_dir}: {ckpt.epoch} of now {epochs} epochs trained")
    if ckpt.finished:
        if world.main:
            say(f"{run_dir} already finished all {cfg.epochs} epochs; nothing to do")
        return 0
    # first: a network whose code the run folder names is refused before anything is read or written
    model, _ = model_from_checkpoint(ckpt, source, run.path, trust_code)
    device, data = prepare(cfg, world)
    teacher = load_teacher(cfg, device, data.num_classes)  # the same file as when the run started, or an error
    life = Lifecycle([cfg], device, data, world, stacked=False, teacher=teacher, again=again)
    state = life.resumed_state(model, ckpt, cfg, source)
    cfg.run.together = "no"  # a seed of a stack continuing alone: its config says what runs from here
    if world.main:  # where this session runs (data folder, device, threads) in the folder's files
        run.write_config(cfg)
        run.write_environment(device)
        say(f"resuming {run.path} after {describe_progress(state)} on {describe_processes(device, world)}")
    return life.train([run if world.main else None], [state])


LENGTH_SCHEDULES = ("onecycle", "cosine")  # laid out over the run's length: another length changes the past


def extend(cfg: Config, ckpt: Checkpoint, epochs: int, run_dir: Path) -> None:
    """cfg.epochs = epochs (`train --resume RUN --epochs N`): more epochs for a finished run, or another
    length for an unfinished one, where the schedule does not depend on the length (step, constant).
    onecycle and cosine are laid out over the length: a new one would change the learning rates of the
    epochs already trained, so those are refused (start a new run with --epochs N)."""
    done = ckpt.trained + (1 if ckpt.partial else 0)  # a stopped epoch is begun: it must end
    if epochs < max(done, 1):
        raise ConfigError(f"--epochs {epochs}: {run_dir} has trained {ckpt.epoch} epochs already")
    if cfg.optim.schedule in LENGTH_SCHEDULES:
        raise ConfigError(
            f"--epochs {epochs}: {run_dir}'s {cfg.optim.schedule} schedule is laid out over its {cfg.epochs} "
            f"epochs, and another length would change the learning rate of the epochs it trained; "
            f"start a new run with --epochs {epochs}"
        )
    cfg.epochs = epochs


def read_resumable(run: RunDir, run_dir: Path) -> Checkpoint:
    if not run.file(LAST_FILE).is_file():
        raise CheckpointError(f"{run_dir} holds no {LAST_FILE}: nothing to resume")
    return load_checkpoint(run.file(LAST_FILE))


@dataclass
class Lifecycle:
    """Runs that train together: one network alone (under torchrun, this process's part of it)
    or a stack of seeds, each with its own run folder, on one device and one copy of the data."""

    cfgs: list[Config]
    device: torch.device
    data: Splits
    world: World
    stacked: bool
    teacher: Teacher | None = None  # distillation's teachers, shared by the stack's seeds
    again: str | None = None  # how to continue after a stop when not `train --resume FOLDER` (--seeds' command)

    def resumed_state(self, model: nn.Module, ckpt: Checkpoint, cfg: Config, source: str) -> TrainState:
        """A run's state where its checkpoint left off."""
        state = build_state(
            model.to(self.device), cfg, self.device, self.data.steps_per_epoch(cfg.batch_size), self.world
        )
        restore_state(state, ckpt, source)
        return state

    def step(self, states: list[TrainState]) -> Step | OwnsEpoch:
        settings = [StepSettings.from_config(cfg, self.world) for cfg in self.cfgs]
        if self.stacked:
            return StackStep(states, settings, self.teacher)
        steps = self.data.steps_per_epoch(self.cfgs[0].batch_size)
        return one_step(states[0], self.cfgs[0], settings[0], steps, self.teacher)

    def train(
        self,
        runs: list[RunDir | None],
        states: list[TrainState],
        on_epoch: OnEpoch | None = None,
    ) -> int:
        """Epochs until done or stopped; each run's checkpoint after each epoch and on a stop signal.
        A run is None on the processes of a torchrun run other than 0, which write nothing.
        on_epoch(rows) after each epoch's checkpoints, one row per run: False ends the runs there.
        A loss that diverged or a write that failed (a full disk) ends the runs with a TrainingError
        that says what is true of their checkpoints."""
        try:
            return self.epochs(runs, states, on_epoch)
        except (Diverged, OutputError) as e:
            raise self.failed(runs[0], e) from None

    def epochs(self, runs: list[RunDir | None], states: list[TrainState], on_epoch: OnEpoch | None) -> int:
        assert same_point(states), "the seeds of a stack must stand at the same epoch and step"
        cfgs, world, device = self.cfgs, self.world, self.device
        start = time.perf_counter()
        bar = EpochBar(cfgs[0].epochs, cfgs[0].run.progress and world.main)
        boards = [
            TensorBoardLog(run.path) if run is not None and cfg.run.tensorboard else None
            for run, cfg in zip(runs, cfgs)
        ]
        for board, cfg in zip(boards, cfgs):
            if board is not None and states[0].epoch == 0 and states[0].partial is None:
                board.samples(sample_grid(self.data, cfg)[0])
        ended_early = False  # on_epoch said so
        with StopSignal() as stop:

            def should_stop() -> bool:  # under torchrun: when any process was signalled, all stop at this step
                return world.any(stop.requested(), device)

            try:
                for rows in fit(self.step(states), self.data, cfgs, on_log=bar, should_stop=should_stop):
                    self.end_epoch(runs, states, rows, boards)
                    if on_epoch is not None and not on_epoch(rows):
                        ended_early = True
                        break
            except (RuntimeError, distributed.PeerLost) as e:  # a collective, or DDP's all-reduce in backward()
                if not world.active or not distributed.lost_peer(e):
                    raise
                where = runs[0].path if runs[0] is not None else cfgs[0].run.out  # the folder as it is now
                raise TrainingError(
                    f"another process of this run stopped ({first_line(e)}); "
                    f"continue from the last checkpoint ({describe_progress(states[0], saved=True)}) "
                    f"with: {resume_command(world)} --resume {where}"
                ) from None
            finally:
                bar.close()
                finished = states[0].partial is None and states[0].epoch >= cfgs[0].epochs
                for board in boards:
                    if board is not None and not finished:
                        board.close()
            if not finished and not ended_early:  # otherwise fit() only ends early on a stop signal
                return self.stopped(runs, states, stop.signum or signal.SIGTERM)
        self.finish(runs, states, boards if finished else [None] * len(boards), time.perf_counter() - start)
        return 0

    def end_epoch(
        self,
        runs: list[RunDir | None],
        states: list[TrainState],
        rows: list[dict[str, Any]],
        boards: list[TensorBoardLog | None],
    ) -> None:
        """Each run's checkpoint, line and TensorBoard scalars for the epoch just done."""
        for run, state, cfg, row, board in zip(runs, states, self.cfgs, rows, boards):
            if run is not None:
                run.end_epoch(state_checkpoint(state, cfg), best=best_on_validation(state.metrics))
                seed = f"seed {cfg.run.seed:>3}  " if self.stacked else ""
                say(seed + format_row(row, cfg.epochs))
            if board is not None:
                board.epoch(row)
        self.world.barrier()  # no process runs ahead of the checkpoint

    def stopped(self, runs: list[RunDir | None], states: list[TrainState], signum: int) -> int:
        """Checkpoint where a stop signal left the runs; the exit code 128 + signal."""
        for run, state, cfg in zip(runs, states, self.cfgs):
            if run is not None and state.partial is not None:
                run.save_last(state_checkpoint(state, cfg))
        self.world.barrier()
        if self.world.main:
            say(
                f"stopped by {signal.Signals(signum).name} after {describe_progress(states[0])}; "
                f"{self.continue_hint(runs[0])}",
                NOTICE,
            )
        return 128 + signum

    def continue_hint(self, run: RunDir | None) -> str:
        """How to continue these runs: `again` (--seeds: its command with its --out), else the command
        that resumes the folder by name."""
        if self.again is not None:
            return self.again
        if self.stacked:  # tune --val-seeds: the study's command names its folders
            return "run the same command again to continue"
        where = run.path if run is not None else self.cfgs[0].run.out
        return f"resume with: {resume_command(self.world)} --resume {where}"

    def failed(self, run: RunDir | None, error: MnistCnnError) -> TrainingError:
        """The error that ends the runs, with what is true of their checkpoints (exit code 3)."""
        if run is None:  # a torchrun process other than 0 writes nothing
            return error if isinstance(error, TrainingError) else TrainingError(str(error))
        saved = run.file(LAST_FILE).is_file()
        if self.stacked:
            note = "the seeds' last checkpoints are intact" if saved else "no checkpoint was written"
        else:
            note = run.checkpoint_note()
        if isinstance(error, Diverged):
            return Diverged(f"{error}; {note}")
        then = f", then {self.continue_hint(run)}" if saved else ""
        return TrainingError(f"{error}; {note}; make room{then}")

    def finish(
        self, runs: list[RunDir | None], states: list[TrainState], boards: list[TensorBoardLog | None], wall: float
    ) -> None:
        """Curves, TensorBoard's summary and the closing line of runs that trained to their last epoch
        (or that on_epoch ended)."""
        for run, state, cfg, board in zip(runs, states, self.cfgs, boards):
            if run is None:
                continue
            run.save_figure("curves.png", lambda f, run=run: draw_curves(read_metrics(run.file("metrics.csv")), f))
            if state.test_confusion is not None and "test_acc" in state.metrics[-1]:
                confusion = state.test_confusion.cpu()
                run.write_evaluation(final_evaluation(confusion, state.metrics[-1], cfg.dataset, run.file(LAST_FILE)))
            write_card(run.path)
            if board is not None:
                board.finish(cfg, state.metrics[-1])
        if self.stacked:
            say(
                f"{seeds_text(len(states))} together: wall {wall:.1f} s ({wall / len(states):.1f} s per seed)",
            )
        elif runs[0] is not None:
            final = states[0].metrics[-1]
            split = "test" if "test_acc" in final else "validation"
            say(
                f"final {split} accuracy {100 * final.get('test_acc', final.get('val_acc', math.nan)):.2f}% "
                f"(epoch {final['epoch']}), wall {wall:.1f} s; run folder {runs[0].path}"
            )


def resume_command(world: World) -> str:
    if world.active:
        return f"torchrun --nproc-per-node {world.size} -m mnist_cnn train"
    return "mnist-cnn train"


def describe_progress(state: TrainState, saved: bool = False) -> str:
    """Where training stands; saved=True: where the last checkpoint stands (an epoch's end)."""
    text = f"epoch {state.epoch}"
    if state.partial is not None and not saved:
        text += f" and {state.partial.step} steps of epoch {state.partial.epoch}"
    return text


def best_on_validation(rows: list[dict]) -> bool:
    """Whether the latest epoch has the best validation accuracy so far. Never the
    test set: with no validation split there is no "best" checkpoint."""
    if "val_acc" not in rows[-1]:
        return False
    return rows[-1]["val_acc"] >= max(r["val_acc"] for r in rows)


def sample_grid(data: Splits, cfg: Config) -> tuple[torch.Tensor, list[str]]:
    """SAMPLE_GRID augmented training images as the model sees them, before normalization:
    (N, 1, 28, 28) in [0, 1], and their class names."""
    g = torch.Generator(data.train_images.device).manual_seed(cfg.run.seed)  # not the training RNG
    x = augment_batch(data.train_images[:SAMPLE_GRID], cfg.augment, g)
    classes = get_dataset(cfg.dataset).classes
    return x.cpu(), [classes[int(y)] for y in data.train_labels[:SAMPLE_GRID]]


def write_samples(run: RunDir, data: Splits, cfg: Config) -> None:
    """samples.png: the sample grid."""
    x, names = sample_grid(data, cfg)
    run.save_figure(
        "samples.png",
        lambda f: draw_samples(x, names, f, title=f"augmented training samples ({cfg.dataset}, recipe {cfg.recipe})"),
    )
