"""`mnist-cnn tune`: hyperparameter search with Optuna, on a validation split only.

    mnist-cnn tune --recipe best --study s1 --trials 40            # sqlite:///runs/tune/s1.db
    mnist-cnn tune --recipe best --study s1 --storage postgresql://user@host/db   # on every worker
    mnist-cnn tune --study s1 --report                             # best trials, importances, best.toml

Every trial is an ordinary run in runs/tune/STUDY/trial-NNNN/ (config.toml,
metrics.csv, last.pt: evaluate, plot and --resume work on it), trained with
run.test = false so that the test files are never opened, and scored by its
final-epoch validation accuracy; with --val-seeds K, K runs in trial-NNNN/seed-N/
scored by their mean, whose standard error the report weighs differences against.
Each epoch's validation accuracy goes to Optuna's pruner, which stops hopeless trials. A trial whose loss diverges
(NaN) is marked failed, its reason in the user attribute fail_reason, and the
worker goes on. Several workers share a study through Optuna's own RDB storage;
the first --trials trials by number that were not stopped (Ctrl-C, a killed
worker: Optuna's heartbeat finds those, see tuning.workers) are the ones that
run, and a worker whose next trial is beyond them waits while other workers'
trials run. With --max-params N a trial whose network has more parameters is
pruned before it trains (TPE learns to avoid the region) and does not count
towards --trials. Each trial stores its config in the study, so
the report's best.toml comes from the storage alone, wherever it runs.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_cnn.config import Config, load_config, set_value, to_dict, validate
from mnist_cnn.errors import ConfigError, Diverged, MnistCnnError, first_line
from mnist_cnn.say import say
from mnist_cnn.tuning.attrs import (
    BASELINE,
    EPOCHS,
    FAIL_REASON,
    OVER_LIMIT,
    PARAMETERS,
    RUN_DIR,
    SECONDS,
    SKIPPED,
    STATE_REASON,
    TRIAL_CONFIG,
    VAL_ACC,
    VAL_ACCS,
    VAL_LOSS,
    VAL_SEM,
)

if TYPE_CHECKING:  # optional dependencies (the tune extra), imported where they are used
    import optuna

TUNE_DIR = Path("runs") / "tune"
DEFAULT_SPACE = {  # what moved the seed network's accuracy in the hand-run trials (docs/guide/tuning.md)
    "optim.lr": {"low": 5e-4, "high": 8e-3, "log": True},
    "optim.schedule": ["step", "onecycle", "cosine"],
    "optim.label_smoothing": {"low": 0.0, "high": 0.1},
    "optim.ema": [0.0, 0.99, 0.999],
    "augment.max_rotation": {"low": 5.0, "high": 20.0},
    "augment.zoom_p": {"low": 0.0, "high": 0.5},
    "augment.max_shift": {"low": 0.0, "high": 3.0},
}
METRIC_NAME = "validation accuracy"  # the objective, as Optuna Dashboard labels its plots
OVER_LIMIT_IN_A_ROW = 100  # a worker gives up when the space seems to hold no network within --max-params
PRUNER_WARMUP_EPOCHS = 2  # default --prune-after: no pruning on the first epochs, every schedule starts slow
OPEN_ATTEMPTS = 5  # workers started together race to create the storage's tables


def continue_hint(name: str) -> str:
    return f"run the same command to continue study {name!r}"


class Interrupted(MnistCnnError):
    """A trial's run was stopped by SIGINT / SIGTERM; said: its stop line is printed already."""

    def __init__(self, code: int, said: bool = False) -> None:
        super().__init__("stopped")
        self.exit_code, self.said = code, said


@dataclass(frozen=True)
class Param:
    """One searched config field: a float or int range (log or not), or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None, "a range: parse_space gives it both ends"
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def parse_space(table: dict[str, Any], base: Config) -> list[Param]:
    """TOML {key: {low, high[, log]} | [choices]} -> Params, each value checked against the config."""
    params = []
    for key, spec in table.items():
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"search space: {key} has no choices")
            for value in spec:
                checked(base, key, value)
            params.append(Param(key, choices=tuple(spec)))
            continue
        if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise ConfigError(
                f"search space: {key} must be {{ low = ..., high = ...[, log = true] }} or a list of choices"
            )
        low, high, log_scale = spec["low"], spec["high"], bool(spec.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise ConfigError(f"search space: {key} needs numbers low < high, got low = {low!r}, high = {high!r}")
        if log_scale and low <= 0:
            raise ConfigError(f"search space: {key} has log = true, so low must be > 0 (got {low})")
        checked(base, key, high)
        probe = checked(base, key, low)
        integer = isinstance(current_value(probe, key), int) and isinstance(low, int) and isinstance(high, int)
        params.append(Param(key, float(low), float(high), log_scale, integer))
    return params


def checked(base: Config, key: str, value: Any) -> Config:
    """base with key = value, checked as a recipe would be (unknown key, wrong type, out of range)."""
    probe = copy.deepcopy(base)
    set_value(probe, key, value)
    validate(probe)
    return probe


def current_value(cfg: Config, key: str) -> Any:
    target: Any = cfg  # a config section, or the model_args table
    *parents, name = key.split(".")
    for part in parents:
        target = getattr(target, part) if part != "model_args" else target.model_args
    return target[name] if isinstance(target, dict) else getattr(target, name)


def baseline_values(base: Config, space: list[Param]) -> dict[str, Any]:
    """The recipe's own value of every searched key: with --baseline, a trial of the study runs
    the recipe unchanged, so the report says on the same device whether the search beat it."""
    values = {}
    for p in space:
        value = recipe_value(base, p.key)
        inside = value in p.choices if p.choices is not None else p.low <= value <= p.high
        if not inside:
            raise ConfigError(f"--baseline: the recipe's {p.key} = {value!r} is outside the search space")
        values[p.key] = value
    return values


def recipe_value(cfg: Config, key: str) -> Any:
    """current_value, with a model argument the recipe leaves out read from the constructor's default."""
    if not key.startswith("model_args.") or key.removeprefix("model_args.") in cfg.model_args:
        return current_value(cfg, key)
    import inspect

    from mnist_cnn.networks.reference import locate

    name = key.removeprefix("model_args.")
    param = inspect.signature(locate(cfg.model).cls).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        raise ConfigError(f"--baseline: the recipe does not set {key} and {cfg.model} has no default for it")
    return param.default


def read_space(path: str | None, base: Config) -> list[Param]:
    if path is None:
        return parse_space(DEFAULT_SPACE, base)
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"search space file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"search space file {path}: {e}") from None
    if not table:
        raise ConfigError(f"search space file {path} is empty")
    return parse_space(table, base)


@dataclass
class Study:
    """What `tune` runs: the recipe and overrides of every trial, the space, where it all goes."""

    name: str
    recipe: str
    overrides: dict[str, Any]
    space: list[Param]
    storage: str
    folder: Path  # runs/tune/NAME: one trial-NNNN run folder per trial
    trials: int
    startup_trials: int = 5  # trials before the TPE sampler and the median pruner act
    max_params: int | None = None  # trials with a larger network are pruned untrained, not counted
    baseline: dict[str, Any] | None = None  # the recipe's own values: enqueued as a trial of its own
    prune_after: int = PRUNER_WARMUP_EPOCHS  # epochs every trial runs before the pruner may stop it
    val_seeds: int = 1  # seeds per trial: its score is their mean validation accuracy


def default_storage(name: str) -> str:
    return f"sqlite:///{TUNE_DIR / name}.db"


def storage_url(url: str) -> str:
    """postgresql:// as users write it, with the psycopg (3) driver SQLAlchemy needs named."""
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def masked(url: str) -> str:
    """The storage URL as messages show it, its password as ***: postgresql://user:***@host/db
    (SQLAlchemy's render_as_string(hide_password=True)), since error lines end up in logs and CI
    output. Not a URL at all: a ConfigError that does not echo it, for it may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(
            "the storage is not a database URL: use sqlite:///FILE.db or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"
        ) from None


def open_study(spec: Study, create: bool = True):
    """The study in spec.storage: created if need be, with the heartbeat that finds dead workers'
    trials (tuning.workers), or (create=False, for the report) only read."""
    import warnings

    import optuna

    from mnist_cnn.tuning.workers import heartbeat_seconds

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # plots, heartbeat
    shown = masked(spec.storage)
    heartbeat = heartbeat_seconds() if create else None  # checked before anything is written
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return open_once(spec, shown, heartbeat)
        except RaceLost:
            time.sleep(0.2 * (attempt + 1))
    return open_once(spec, shown, heartbeat)


class RaceLost(Exception):
    """Another worker was creating the same tables or study at the same moment."""


def open_once(spec: Study, shown: str, heartbeat: int | None):
    """The study in spec.storage, created with a heartbeat every `heartbeat` s, or (None) loaded;
    its errors as ConfigErrors that name the storage as `shown`."""
    import optuna

    from mnist_cnn.tuning.workers import HeartbeatStorage

    storage = storage_url(spec.storage)
    try:
        if heartbeat is None:
            return optuna.load_study(study_name=spec.name, storage=storage)
        Path(spec.folder).mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=spec.name,
            storage=HeartbeatStorage(storage, heartbeat),
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(n_startup_trials=spec.startup_trials),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.prune_after),
        )
        if study.metric_names is None:  # the dashboard's name for the objective ("Objective 0" otherwise)
            study.set_metric_names([METRIC_NAME])
        return study
    except KeyError:
        raise ConfigError(f"no study {spec.name!r} in {shown}") from None
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"storage {shown}: {e} (postgresql:// needs: pip install 'psycopg[binary]')") from None
    except Exception as e:  # SQLAlchemy's errors: unreachable server, bad URL, wrong password
        if any(s in str(e) for s in ("already exists", "duplicate key", "UNIQUE constraint", "database is locked")):
            raise RaceLost from e  # workers started together: the other one created it, try again
        if type(e).__module__.startswith(("sqlalchemy", "optuna")):
            reason = first_line(e, 200).replace(storage, shown).replace(spec.storage, shown)  # were it quoted
            raise ConfigError(f"storage {shown}: {reason}") from None
        raise


class Objective:
    """One trial of the study: its place among the --trials, its values from the space, its config,
    the run, the pruner each epoch. Counts the trials in a row whose network was over --max-params
    (study.stop() after too many). `deadline` (time.monotonic()): --timeout, for a worker that waits."""

    def __init__(self, spec: Study, study: optuna.Study, deadline: float | None = None) -> None:
        self.spec, self.study, self.deadline = spec, study, deadline
        self.over_in_a_row = 0
        self.lost: int | None = None  # the trial another worker failed under this one, as a dead worker's

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from mnist_cnn.networks.reference import canonical, config_network_size
        from mnist_cnn.training.distill import resolve_teachers
        from mnist_cnn.tuning.workers import leftover_error

        spec = self.spec
        skipped = self.take_place(trial)
        if skipped is not None:
            trial.set_user_attr(SKIPPED, skipped.removeprefix("skipped: "))
            trial.set_user_attr(STATE_REASON, skipped)
            self.study.stop()
            raise optuna.TrialPruned()
        values = {p.key: p.suggest(trial) for p in spec.space}
        out = spec.folder / f"trial-{trial.number:04d}"
        cfg = load_config(spec.recipe, {**spec.overrides, **values, "run.out": str(out), "run.test": False})
        size = config_network_size(cfg.model, cfg.dataset, cfg.model_args)
        trial.set_user_attr(PARAMETERS, size)
        if self.too_large(trial, size):
            raise optuna.TrialPruned()
        if out.exists():  # made since run() looked, by another study of this name: not this trial's to write
            trial.set_user_attr(STATE_REASON, f"failed: its run folder {out} holds another study's trial")
            raise leftover_error(spec.folder, [out.name], spec.name, masked(spec.storage))
        trial.set_user_attr(RUN_DIR, str(out))
        cfg.model = canonical(cfg.model)  # a file network's path made absolute, as train_run records it
        resolve_teachers(cfg)  # each teacher's file by absolute path, with its sha256, as the run records it
        trial.set_user_attr(TRIAL_CONFIG, to_dict(cfg))
        try:
            return self.train(trial, cfg)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale by another worker: run() says so
            self.lost = trial.number
            raise

    def take_place(self, trial: optuna.Trial) -> str | None:
        """None when `trial` is one of the study's --trials; else why it is skipped. While other workers'
        running trials hold the places before it, the worker waits: should one of them be stopped, or
        its worker die (Optuna's fail_stale_trials finds it), this trial takes its place."""
        import optuna

        from mnist_cnn.training.run import StopSignal
        from mnist_cnn.tuning.workers import FULL, RUN, WAIT_POLL_S, place

        waiting = False
        with StopSignal() as stop:
            while True:
                verdict = place(self.study.get_trials(deepcopy=False), trial.number, self.spec.trials)
                if verdict == RUN:
                    return None
                if verdict == FULL:
                    return "skipped: the study already holds its --trials"
                if stop.requested():
                    trial.set_user_attr(STATE_REASON, "stopped by a signal while it waited for a place")
                    raise Interrupted(128 + (stop.signum or 0))
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    return "skipped: --timeout passed while it waited for other workers' trials"
                if not waiting:
                    self.say_it_waits(trial)
                    waiting = True
                time.sleep(WAIT_POLL_S)
                optuna.storages.fail_stale_trials(self.study)

    def say_it_waits(self, trial: optuna.Trial) -> None:
        """Which trials the worker waits for, and why, on its output and in the trial's state_reason."""
        from optuna.trial import TrialState

        from mnist_cnn.tuning.workers import GRACE_BEATS, ahead, heartbeat_seconds

        budget, trials = self.spec.trials, self.study.get_trials(deepcopy=False)
        places = ahead(trials, budget)
        others = [t.number for t in trials if t.number in places and t.state == TrialState.RUNNING]
        text = (
            f"waiting: the rest of --trials {budget} is held by running trial{'s' if len(others) > 1 else ''} "
            f"{', '.join(map(str, others))}; this one takes the place of one that is stopped or whose worker "
            f"sends no heartbeat for {GRACE_BEATS * heartbeat_seconds()} s"
        )
        trial.set_user_attr(STATE_REASON, text)
        say(f"trial {trial.number}: {text}")

    def too_large(self, trial: optuna.Trial, size: int) -> bool:
        """Whether the trial's network, of `size` parameters, is over --max-params (then it is not trained,
        nor counted)."""
        if self.spec.max_params is None:
            return False
        if size <= self.spec.max_params:
            self.over_in_a_row = 0
            return False
        trial.set_user_attr(OVER_LIMIT, size)
        trial.set_user_attr(STATE_REASON, f"not trained: {size:,} parameters > --max-params {self.spec.max_params:,}")
        say(
            f"trial {trial.number}: {size:,} parameters > --max-params {self.spec.max_params:,}: not trained",
        )
        self.over_in_a_row += 1
        if self.over_in_a_row >= OVER_LIMIT_IN_A_ROW:
            self.study.stop()  # and run() says why
        return True

    def train(self, trial: optuna.Trial, cfg: Config) -> float:
        """The trial's run(s), reported to the pruner after each epoch: the mean final validation accuracy
        of its --val-seeds seeds (their standard error in the user attribute val_acc_sem). What a person
        looks for in Optuna Dashboard goes into user attributes: seconds, epochs, the final validation
        accuracy and loss, and why a trial ended as it did (state_reason)."""
        import optuna

        pruned = []

        def on_epoch(rows: list[dict[str, Any]]) -> bool:
            epoch = rows[0]["epoch"]
            value = statistics.fmean(r["val_acc"] for r in rows)
            trial.report(value, epoch)
            if epoch < cfg.epochs and trial.should_prune():  # a finished trial counts as finished
                pruned.append((epoch, value))
                return False
            return True

        from mnist_cnn.training.seeds import scored_seeds

        start = time.perf_counter()
        try:
            again = f"trial {trial.number} is marked failed; {continue_hint(self.spec.name)}"
            code, finals = scored_seeds(cfg, self.spec.val_seeds, on_epoch, again)
        except Diverged as e:  # the loss diverged: this point of the space failed, the next may not
            trial.set_user_attr(FAIL_REASON, str(e))
            trial.set_user_attr(STATE_REASON, f"failed: {e}")
            trial.set_user_attr(SECONDS, round(time.perf_counter() - start, 1))
            say(f"trial {trial.number}: failed: {e}")
            return float("nan")  # Optuna marks the trial failed; catch=(Diverged,) would log a traceback
        trial.set_user_attr(SECONDS, round(time.perf_counter() - start, 1))
        if code != 0:  # a signal stopped it
            trial.set_user_attr(STATE_REASON, f"stopped by a signal (exit code {code})")
            raise Interrupted(code, said=True)  # training's stop line gave the study's hint
        if pruned:
            epoch, value = pruned[0]
            trial.set_user_attr(EPOCHS, epoch)
            trial.set_user_attr(
                STATE_REASON,
                f"pruned after epoch {epoch}: validation accuracy {100 * value:.2f}%; the median pruner "
                "found its best so far below the median of the finished trials at that epoch",
            )
            say(f"trial {trial.number}: pruned after epoch {epoch}")
            raise optuna.TrialPruned()
        return self.finish(trial, cfg, finals)

    def finish(self, trial: optuna.Trial, cfg: Config, finals: list[dict[str, Any]]) -> float:
        """A trial that trained all its epochs: its score, the mean final validation accuracy."""
        accs = [row["val_acc"] for row in finals]
        value = statistics.fmean(accs)
        trial.set_user_attr(EPOCHS, cfg.epochs)
        trial.set_user_attr(VAL_ACC, value)
        trial.set_user_attr(VAL_LOSS, statistics.fmean(row["val_loss"] for row in finals))
        text = f"final validation accuracy {100 * value:.2f}%"
        if len(accs) > 1:
            sem = standard_error(accs)
            trial.set_user_attr(VAL_ACCS, accs)
            trial.set_user_attr(VAL_SEM, sem)
            text += f" ± {100 * sem:.2f} (standard error over {len(accs)} seeds)"
        trial.set_user_attr(STATE_REASON, f"trained {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}")
        say(f"trial {trial.number}: {text}")
        return value


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values))


def run(spec: Study, timeout: float | None = None) -> int:
    """Run trials until the study holds spec.trials that count (or `timeout` s passed)."""
    from optuna.trial import TrialState

    from mnist_cnn.tuning.workers import counts, leftover_error, leftover_folders, quiet_failed_trials

    study = open_study(spec)
    leftovers = leftover_folders(study.get_trials(deepcopy=False), spec.folder)
    if leftovers:  # before any trial: another study's run folders are not this one's to write into
        raise leftover_error(spec.folder, leftovers, spec.name, masked(spec.storage))
    if spec.baseline is not None:  # skip_if_exists: each worker asks, the study holds it once
        study.enqueue_trial(spec.baseline, user_attrs={BASELINE: True}, skip_if_exists=True)
    objective = Objective(spec, study, None if timeout is None else time.monotonic() + timeout)

    def stop(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        """optuna's MaxTrialsCallback, counting only the trials that count."""
        if sum(counts(t) for t in study.get_trials(deepcopy=False)) >= spec.trials:
            study.stop()

    try:
        with quiet_failed_trials():
            study.optimize(objective, callbacks=[stop], catch=(), timeout=timeout)
    except Interrupted as e:
        if not e.said:  # stopped while it waited for a place: no training said anything
            say(f"stopped: the waiting trial is marked failed; {continue_hint(spec.name)}")
        return e.exit_code
    except ValueError:  # Optuna cannot tell a trial that another worker failed already
        if objective.lost is None:
            raise
        raise MnistCnnError(
            f"trial {objective.lost} was marked failed by another worker while this one sent no heartbeat "
            f"(suspended, or its machine asleep, past the grace): run the same command to continue study {spec.name!r}"
        ) from None
    if objective.over_in_a_row >= OVER_LIMIT_IN_A_ROW:
        raise ConfigError(
            f"{OVER_LIMIT_IN_A_ROW} trials in a row had networks over --max-params "
            f"{spec.max_params:,}: narrow the space's widths or raise the limit"
        )
    done = [t for t in study.get_trials(deepcopy=False) if counts(t)]
    states = [t.state for t in done]
    best = (
        f"best validation accuracy {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
        if TrialState.COMPLETE in states
        else "no trial completed"
    )
    say(
        f"study {spec.name}: {len(done)} trials done ({states.count(TrialState.PRUNED)} pruned, "
        f"{states.count(TrialState.FAIL)} failed); {best}"
    )
    return 0


def check_budget(trials: int) -> None:
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
