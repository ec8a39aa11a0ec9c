"""Repeated runs of one recipe over several seeds, and honest statistics of them.

    seeds = parse_seeds("0-4")               # [0, 1, 2, 3, 4]; also "0,3,7" or "0-2,9"
    code = run_seeds(cfg, seeds)             # OUT/seed-N/ per seed, then OUT/seeds.csv + summary

With run.together (--together) the seeds train stacked in one model
(training.stack); otherwise one after another. Either way each has its own folder.

The statistic is the FINAL epoch's test accuracy of each run -- never the best
epoch picked on the test set. Running the same command again with the same
--out continues: finished seeds are kept, an interrupted one is resumed, and a
folder that holds a run with other settings is refused, never silently counted.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import signal
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from mnist_cnn.checkpoint import LAST_FILE, Checkpoint, load_checkpoint
from mnist_cnn.config import MAX_SEED, Config, to_dict
from mnist_cnn.device import pick_device, resolve_precision
from mnist_cnn.errors import ConfigError, OutputError
from mnist_cnn.files import LOCK_FILE, FolderLock, atomic_write
from mnist_cnn.networks.reference import canonical, locate
from mnist_cnn.say import NOTICE, say
from mnist_cnn.training.card import has_card_sources, write_card
from mnist_cnn.training.distill import resolve_teachers
from mnist_cnn.training.distributed import from_environment
from mnist_cnn.training.run import OnEpoch, StopSignal, resume_run, stack_configs, start_run, train_run, train_stack
from mnist_cnn.training.rundir import default_run_dir
from mnist_cnn.training.tensorboard import flat

MAX_SEEDS = 1000
BASE_FILES = ("seeds.csv", "seeds-summary.json")  # what --seeds writes into its folder besides seed-N/
# Fields that say where and how a run is watched, not what it computes: a seed folder
# that differs from the request only in these is the same run.
NO_EFFECT = {
    "recipe",
    "about",
    "eval_batch_size",
    "run.out",
    "run.device",
    "run.progress",
    "run.threads",
    "run.data_dir",
    "run.verify",
}
# Fields that follow from the device and the mode, not from the recipe: precision "auto" resolves per
# device (bf16 on a GPU, fp32 on an AVX2 CPU), and a stack trains in fp32 without channels_last. The
# device may differ between invocations, and seeds may continue alone after a stack: the folder is still
# the same run. Its config records what it ran with (the first session's precision and layout, which a
# resumed run keeps, and together = "no" once it continues alone). A value the user asks for by name
# (--precision bf16, --set run.channels_last=false) is no longer the device's choice: it must match.
FOLLOW_THE_DEVICE = {"run.precision", "run.channels_last", "run.together"}
NAMED_MUST_MATCH = {"run.precision", "run.channels_last"}  # of those, what changes the numbers when named


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)  # ASCII digits only (\d takes any script's)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"--seeds {text!r}: use a list and ranges like 0-4 or 0,3,7")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last > MAX_SEED:
            raise ConfigError(f"--seeds {text!r}: a seed is at most {MAX_SEED} (2**63 - 1)")
        if last - first + 1 + len(seeds) > MAX_SEEDS:  # before the range is made: 0-999999999999 fails at once
            raise ConfigError(f"--seeds {text!r}: at most {MAX_SEEDS} seeds")
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct")
    return seeds


def differences(stored: Config, asked: Config, named: frozenset[str] = frozenset()) -> list[str]:
    """'key stored -> asked' for every field that can change a run's results; `named`: the fields the
    user set by name, which must match even where the device would choose."""
    a, b = flat(to_dict(stored)), flat(to_dict(asked))
    ignored = NO_EFFECT | (FOLLOW_THE_DEVICE - (named & NAMED_MUST_MATCH))
    return [f"{k} {a[k]!r} -> {b.get(k)!r}" for k in sorted(a) if k not in ignored and a[k] != b.get(k)]


def check_same_run(ckpt: Checkpoint, one: Config, run: Path, named: frozenset[str] = frozenset()) -> None:
    """Refuse a seed folder whose stored config asks for another run than `one`."""
    changed = differences(ckpt.config, one, named)
    if changed:
        raise ConfigError(
            f"{run} holds a run with other settings ({'; '.join(changed)}); "
            "use another --out, or the same settings to continue it"
        )


def seed_config(cfg: Config, seed: int, run: Path) -> Config:
    """The config of one seed's run, precision resolved as start_run() will record it."""
    one = copy.deepcopy(cfg)
    one.run.seed, one.run.out = seed, str(run)
    one.run.precision = resolve_precision(one.run.precision, pick_device(one.run.device))
    one.run.together = "no"
    return one


def train_seed(one: Config, run: Path, named: frozenset[str], again: str) -> tuple[int, list[dict]]:
    """Train, resume or reuse one seed's run folder; (exit code, its metrics rows).
    A folder is reused only when its stored config asks for the same run, and counts
    as finished when its checkpoint says so. again: how the user continues them all."""
    last = run / LAST_FILE
    if not last.is_file():
        alone = copy.deepcopy(one)
        alone.run.together = "no"  # a seed of a stack that starts on its own: its config says what ran
        code = start_run(alone, again)
        return code, (load_checkpoint(last).metrics if code == 0 else [])
    ckpt = load_checkpoint(last)
    check_same_run(ckpt, one, run, named)
    if ckpt.trained < one.epochs or ckpt.partial:
        # the network is the one the user names (the stored config must equal theirs): trusted as in training
        code = resume_run(run, one.run.device, one.run.progress, one.run.data_dir or None, True, again)
        if code != 0:
            return code, []
        ckpt = load_checkpoint(last)
    return 0, ckpt.metrics


def stacks(cfg: Config, seeds: list[int]) -> bool:
    """Whether --seeds trains the seeds together: run.together, auto = on CUDA (stacked, 8 seeds took
    less time than one after another there) and not on the CPU (where they took longer); auto never
    stacks a run.compile = "step" run, which trains one network at a time."""
    if cfg.run.together == "auto":
        return len(seeds) > 1 and cfg.run.compile != "step" and pick_device(cfg.run.device).type == "cuda"
    return cfg.run.together == "yes"


def where_it_stands(one: Config, run: Path, named: frozenset[str]) -> tuple[int, int] | None:
    """(epoch, step) where a seed's folder stopped: (0, 0) for none yet, None when finished.
    A folder holding another run is refused, as train_seed refuses it."""
    last = run / LAST_FILE
    if not last.is_file():
        return (0, 0)
    ckpt = load_checkpoint(last)
    check_same_run(ckpt, one, run, named)
    if ckpt.trained >= one.epochs and not ckpt.partial:
        return None
    return (ckpt.trained, ckpt.partial.step if ckpt.partial else 0)


def train_together(configs: list[Config], named: frozenset[str], again: str) -> int:
    """Train the unfinished seeds stacked when they all stand at the same point (all new, or all
    stopped together); otherwise leave them to run_seeds' loop, one after another."""
    pending = [(one, point) for one in configs if (point := where_it_stands(one, Path(one.run.out), named)) is not None]
    if not pending:
        return 0
    if len({point for _, point in pending}) > 1:
        say(
            "the unfinished seeds stopped at different points: continuing them one after another",
            NOTICE,
        )
        return 0
    return train_stack([one for one, _ in pending], resume=pending[0][1] != (0, 0), again=again)


def run_seeds(cfg: Config, seeds: list[int], named: Iterable[str] = ()) -> int:
    """The seeds of cfg, each in cfg.run.out/seed-N/, then seeds.csv and seeds-summary.json there.
    named: the config keys the user gave by name (a seed folder must match those exactly). The
    folder is held (files.FolderLock) throughout: a second --seeds on it is refused."""
    if from_environment().active:
        raise ConfigError("--seeds runs one process per seed; under torchrun, train one seed per command")
    base = Path(cfg.run.out) if cfg.run.out else default_run_dir()
    with held_base(base):
        return seeds_in(cfg, seeds, base, frozenset(named))


@contextmanager
def held_base(base: Path) -> Iterator[None]:
    """The --seeds folder, made if new and locked; one that holds anything but seed folders and the
    summaries is refused (it is someone else's). A folder made here and still empty at the end (the
    seeds were refused before any started) is removed again."""
    made = not base.exists()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {base}: {e.strerror}") from None
    try:
        with FolderLock.take(base):
            other = sorted(
                n
                for n in os.listdir(base)
                if n != LOCK_FILE and n not in BASE_FILES and not re.fullmatch(r"seed-\d+", n)
            )
            if other:
                raise OutputError(
                    f"{base} holds files that are not a --seeds run's ({', '.join(other[:3])}); choose another --out"
                )
            yield
    finally:
        if made and base.is_dir() and not any(base.iterdir()):
            base.rmdir()


def seeds_in(cfg: Config, seeds: list[int], base: Path, named: frozenset[str]) -> int:
    again = f"run the same command with --out {base} to continue all the seeds"
    cfg = copy.deepcopy(cfg)
    cfg.model = canonical(cfg.model)  # as the runs record it: a relative file.py:Class continues from anywhere
    # the network you name must be where you say: continuing a seed folder trusts your file, never
    # the folder's copy of it (that runs only with train --resume --trust-code)
    locate(cfg.model)
    resolve_teachers(cfg)  # as the runs record them (absolute path, sha256), so seed folders compare equal
    together = stacks(cfg, seeds)
    if together:
        configs = stack_configs(cfg, seeds, base)
    else:
        configs = [seed_config(cfg, seed, base / f"seed-{seed}") for seed in seeds]
    results = []
    with StopSignal() as stop:  # a signal during one seed's run also ends the loop
        if together:
            code = train_together(configs, named, again)
            if code != 0:
                return code  # stopped by a signal: the summary waits for the rerun
        for seed, one in zip(seeds, configs):
            code, rows = train_seed(one, Path(one.run.out), named, again)
            if code != 0:
                return code  # stopped by a signal: the summary waits for the rerun
            final = rows[-1]
            split = "test" if "test_acc" in final else "val"  # run.test = false: the validation split's
            results.append(
                {
                    "seed": seed,
                    f"final_{split}_acc": final[f"{split}_acc"],
                    f"final_{split}_loss": final[f"{split}_loss"],
                    "final_train_acc": final["train_acc"],
                    "epochs": int(final["epoch"]),
                    "seconds": sum(r["seconds"] for r in rows),
                }
            )
            if stop.signum is not None and seed != seeds[-1]:
                name = signal.Signals(stop.signum).name
                say(
                    f"stopped by {name} after seed {seed}; {again}",
                    NOTICE,
                )
                return 128 + stop.signum
    summary = summarize(results)
    summary.update(recipe=cfg.recipe, model=cfg.model, seeds=seeds, together=together)
    write_results(base, results, summary)
    for folder in (base / f"seed-{r['seed']}" for r in results):  # each seed's card gains the group's summary
        if has_card_sources(folder):  # (a run killed between last.pt and metrics.csv counts by its checkpoint)
            write_card(folder)
    say(format_summary(summary))
    return 0


def summarize(results: list[dict]) -> dict:
    """Statistics of the final epochs' test accuracy, or validation accuracy when the runs never
    read the test set (run.test = false): keys final_test_acc_* or final_val_acc_*."""
    split = "test" if "final_test_acc" in results[0] else "val"
    accs = [r[f"final_{split}_acc"] for r in results]
    secs = [r["seconds"] for r in results]
    return {
        "runs": len(results),
        "split": split,
        f"final_{split}_acc_mean": statistics.fmean(accs),
        # sample std (n - 1); none for one seed (null in the JSON: NaN is not JSON)
        f"final_{split}_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
        f"final_{split}_acc_min": min(accs),
        f"final_{split}_acc_max": max(accs),
        "seconds_mean": statistics.fmean(secs),
    }


def write_results(base: Path, results: list[dict], summary: dict) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(results[0]), lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(base / "seeds.csv", lambda f: f.write(buf.getvalue().encode()))
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(base / "seeds-summary.json", lambda f: f.write(text.encode()))


def format_summary(s: dict) -> str:
    k, name = f"final_{s['split']}_acc", {"test": "test", "val": "validation"}[s["split"]]
    std = "" if s[k + "_std"] is None else f" +- {100 * s[k + '_std']:.2f} (std)"
    return (
        f"{s['runs']} seeds of recipe {s['recipe']} ({s['model']}): final-epoch {name} accuracy "
        f"mean {100 * s[k + '_mean']:.2f}%{std}, "
        f"min {100 * s[k + '_min']:.2f}%, max {100 * s[k + '_max']:.2f}%; "
        f"{s['seconds_mean']:.1f} s per run (training + evaluation)"
    )


def scored_seeds(cfg: Config, k: int, on_epoch: OnEpoch, again: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """`tune --val-seeds k`: (exit code, the final metrics row of k seeds of cfg: run.seed,
    run.seed + 1, ...). One seed: its run folder is cfg.run.out. Several: cfg.run.out/seed-N/ each,
    trained stacked where --seeds would stack them (CUDA), on_epoch seeing all their rows; else one
    after another, on_epoch seeing the first seed's, the others trained only if it let that one finish.
    on_epoch returning False ends the runs (the pruner); the list is then short of k. again: what a stop
    signal's line tells the user to do (the study's command, not `train --resume`)."""
    if k == 1:
        outcome = train_run(cfg, on_epoch=lambda row: on_epoch([row]), again=again)
        return outcome.code, [outcome.state.metrics[-1]]
    base, seeds = Path(cfg.run.out), [cfg.run.seed + i for i in range(k)]
    if stacks(cfg, seeds):
        configs = stack_configs(cfg, seeds, base)
        code = train_stack(configs, on_epoch=on_epoch, again=again)
        return code, [load_checkpoint(Path(c.run.out) / LAST_FILE).final for c in configs]
    finals: list[dict[str, Any]] = []
    for i, seed in enumerate(seeds):
        one = seed_config(cfg, seed, base / f"seed-{seed}")
        outcome = train_run(one, on_epoch=(lambda row: on_epoch([row])) if i == 0 else None, again=again)
        if outcome.code != 0 or outcome.state.epoch < cfg.epochs:  # stopped by a signal, or by on_epoch
            return outcome.code, finals
        finals.append(outcome.state.metrics[-1])
    return 0, finals
