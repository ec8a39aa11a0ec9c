"""How `tune` workers share one study: Optuna's RDB storage with its heartbeat, the --trials budget,
trial folders left by another study of the same name, and Optuna's log of a failed trial.
Imported where a study runs (optuna is the tune extra).

    storage = HeartbeatStorage("sqlite:///runs/tune/s1.db", heartbeat_seconds())
    place(study.get_trials(deepcopy=False), trial.number, budget)   # RUN, FULL or WAIT

A worker killed with kill -9 (or whose machine stops) leaves its trial RUNNING. While a trial runs,
Optuna records its heartbeat every HEARTBEAT_S seconds; one silent for GRACE_BEATS beats is stale,
and Optuna's fail_stale_trials (which every worker runs before each trial, and while it waits)
marks it failed, with its state_reason, so that it gives its place among the --trials back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from mnist_cnn.errors import ConfigError
from mnist_cnn.say import say
from mnist_cnn.tuning.attrs import FAIL_REASON, OVER_LIMIT, RUN_DIR, SKIPPED, STATE_REASON

HEARTBEAT_ENV = "MNIST_CNN_TUNE_HEARTBEAT"  # whole seconds between a running trial's heartbeats (tests: 1)
HEARTBEAT_S = 30  # one row updated per running trial every 30 s: nothing for SQLite or PostgreSQL
# beats a trial may miss before it is failed: a dead worker's trial waits 2 minutes by default, long
# enough that a live worker held up by a busy database (SQLite waits up to 5 s for its lock) keeps its trial
GRACE_BEATS = 4
WAIT_POLL_S = 1.0  # how often a waiting worker looks at the other workers' trials
RUN, FULL, WAIT = "run", "full", "wait"  # place(): where a new trial stands in the budget
TRIAL_FOLDER = re.compile(r"trial-(\d+)")  # runs/tune/STUDY/trial-NNNN
# Optuna's two warnings about a failed trial, the first with the objective's traceback
FAILED_TRIAL_LOG = re.compile(r"Trial \d+ failed with ")
OPTIMIZE_LOGGER = "optuna.study._optimize"  # the logger Optuna writes them to


def heartbeat_seconds() -> int:
    """$MNIST_CNN_TUNE_HEARTBEAT, or HEARTBEAT_S: Optuna takes whole seconds."""
    text = os.environ.get(HEARTBEAT_ENV)
    if text is None:
        return HEARTBEAT_S
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ConfigError(f"{HEARTBEAT_ENV} must be a whole number of seconds, at least 1; got {text!r}")
    return seconds


class HeartbeatStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with its heartbeat on. Optuna fails the stale trials itself (before each
    trial of optimize(), and in fail_stale_trials); a finished trial's attributes are read-only, so
    the reason is written here, where the storage finds them, before they are failed."""

    def __init__(self, url: str, heartbeat: int) -> None:
        self.grace = GRACE_BEATS * heartbeat
        self.reason = f"failed: no heartbeat from its worker for {self.grace} s (killed, or its machine stopped)"
        super().__init__(
            url, heartbeat_interval=heartbeat, grace_period=self.grace, heartbeat_stale_trial_callback=self.said
        )

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        for trial_id in stale:
            with contextlib.suppress(UpdateFinishedTrialError):  # it ended after all, or another worker failed it
                self.set_trial_user_attr(trial_id, STATE_REASON, self.reason)
        return stale

    def said(self, _study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback for each trial it failed as stale: the worker that found it says so."""
        say(f"trial {trial.number}: {self.reason}")


def counts(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts towards --trials: completed, pruned, or failed in training
    (a diverging loss: a space full of them must end too); not a network over --max-params, not a
    trial skipped over the budget, not one stopped by Ctrl-C or a killed worker (its place goes to another)."""
    if trial.state == TrialState.FAIL:
        return FAIL_REASON in trial.user_attrs
    return (
        trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and OVER_LIMIT not in trial.user_attrs
        and SKIPPED not in trial.user_attrs
    )


def ahead(trials: Sequence[FrozenTrial], budget: int) -> list[int]:
    """The numbers of the first `budget` trials that count or are running: the ones that run."""
    return sorted(
        t.number
        for t in trials
        if counts(t) or (t.state == TrialState.RUNNING and not {OVER_LIMIT, SKIPPED} & set(t.user_attrs))
    )[:budget]


def place(trials: Sequence[FrozenTrial], number: int, budget: int) -> str:
    """RUN when trial `number` is among the first `budget` trials by number that count or are running
    (so workers started together run exactly `budget` between them), FULL when `budget` trials count
    already, WAIT when other workers' running trials hold the places before it: should one of them
    be stopped, or its worker die, this one takes its place."""
    if sum(counts(t) for t in trials) >= budget:
        return FULL
    return RUN if number in ahead(trials, budget) else WAIT


def leftover_folders(trials: Sequence[FrozenTrial], folder: Path) -> list[str]:
    """The trial-NNNN folders in `folder` that none of the study's trials made (nor may be making):
    left by another study of the same name, whose storage was deleted or is another one."""
    ours = {t.number for t in trials if RUN_DIR in t.user_attrs or t.state == TrialState.RUNNING}
    found = []
    for path in sorted(Path(folder).glob("trial-*")):
        match = TRIAL_FOLDER.fullmatch(path.name)
        if match and path.is_dir() and int(match.group(1)) not in ours:
            found.append(path.name)
    return found


def leftover_error(folder: Path, names: list[str], study: str, shown: str) -> ConfigError:
    """The one-line refusal of a study whose trials would write into another study's run folders."""
    which = names[0] + (f" and {len(names) - 1} more trial folders" if len(names) > 1 else "")
    return ConfigError(
        f"{folder} holds {which} that study {study!r} in {shown} did not write (left by an earlier study of "
        f"that name, whose storage was deleted or is another one): move {folder} away, or choose another --study"
    )


@contextlib.contextmanager
def quiet_failed_trials() -> Iterator[None]:
    """Optuna's warnings about a failed trial left out while it lasts (the first one carries the
    objective's traceback): the worker says why a trial failed in one line of its own (a diverging
    loss, a signal, a dead worker), and any other error reaches the command line, which prints it
    once: one line for ours, the traceback for a bug."""
    logger = logging.getLogger(OPTIMIZE_LOGGER)

    def keep(record: logging.LogRecord) -> bool:
        return not FAILED_TRIAL_LOG.match(record.getMessage())

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
