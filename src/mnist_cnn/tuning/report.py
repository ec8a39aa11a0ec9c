"""`mnist-cnn tune --report`: what a study found, from its storage alone, so it runs anywhere that
reaches the storage, with or without the trials' run folders.

    report(Study("s1", ...))   # best trials, failed ones and why, importances, plots, runs/tune/s1/best.toml
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_cnn.config import Config, dump_toml, from_dict, validate
from mnist_cnn.errors import CheckpointError, ConfigError
from mnist_cnn.tuning.attrs import BASELINE, FAIL_REASON, OVER_LIMIT, RUN_DIR, SKIPPED, TRIAL_CONFIG, VAL_ACCS, VAL_SEM
from mnist_cnn.tuning.study import Study, open_study

if TYPE_CHECKING:  # optional dependencies (the tune extra), imported where they are used
    import optuna
    from matplotlib.axes import Axes

log = logging.getLogger("mnist_cnn")


def report(spec: Study, top: int = 5) -> int:
    """Best trials, trials that failed in training and why, parameter importances, optimization
    history and importances as PNGs, and the best trial's config as a recipe (spec.folder/best.toml),
    all from the study's storage: it runs anywhere that reaches it."""
    import optuna
    from optuna.trial import TrialState

    study = open_study(spec, create=False)
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    reasons = [t for t in failed if FAIL_REASON in t.user_attrs]  # the others were stopped or killed
    if not done:
        raise ConfigError(
            f"study {spec.name!r} has no completed trial yet"
            + (
                f" ({len(reasons)} failed in training, e.g. trial {reasons[0].number}: "
                f"{reasons[0].user_attrs[FAIL_REASON]})"
                if reasons
                else ""
            )
        )
    ranked = sorted(done, key=lambda t: -t.value)
    print(tally(spec.name, len(done), study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)), len(failed)))
    for t in ranked[:top]:
        print(f"  trial {t.number:>4}  val acc {100 * t.value:6.2f}%{error_text(t)}  {params_text(t)}")
    print(f"  {noise_text(ranked)}")
    for t in (t for t in ranked if t.user_attrs.get(BASELINE)):
        print(
            f"  baseline: trial {t.number} (the recipe unchanged) val acc {100 * t.value:.2f}%, "
            f"rank {ranked.index(t) + 1} of {len(ranked)}"
        )
    for t in reasons[:top]:
        print(f"  trial {t.number:>4}  failed: {t.user_attrs[FAIL_REASON]}  {params_text(t)}")
    if len(reasons) > top:
        print(f"  ... and {len(reasons) - top} more failed in training")
    importances = {}
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as e:
            log.warning("no parameter importances: %s", e)
    for key, value in importances.items():
        print(f"  importance {key:<28} {value:.3f}")
    folder = Path(spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_plots(study, folder, bool(importances))
    best = ranked[0]
    path = folder / "best.toml"
    path.write_text(best_recipe(trial_config(best), spec.name, best.number, best.value))
    print(
        f"wrote {folder / 'history.png'}"
        + (f", {folder / 'importances.png'}" if importances else "")
        + f", {path} (train it with: mnist-cnn train --recipe {path})"
    )
    return 0


def tally(name: str, completed: int, pruned: list, failed: int) -> str:
    """The report's first line. Optuna records a trial over --max-params, and one skipped (the study
    held its --trials, or --timeout passed while it waited), as pruned: neither trained, so each is
    counted as what it is."""
    over = sum(OVER_LIMIT in t.user_attrs for t in pruned)
    skipped = sum(SKIPPED in t.user_attrs for t in pruned)
    untrained = [f"{over} more over --max-params, not trained"] if over else []
    untrained += [f"{skipped} more skipped, not trained"] if skipped else []
    return f"study {name}: {completed} completed, {len(pruned) - over - skipped} pruned, {failed} failed" + (
        f" ({'; '.join(untrained)})" if untrained else ""
    )


NOISE_ERRORS = 2.0  # a difference under this many standard errors (of the difference) is noise


def error_text(trial) -> str:
    sem = trial.user_attrs.get(VAL_SEM)
    return "" if sem is None else f" ± {100 * sem:.2f} ({len(trial.user_attrs[VAL_ACCS])} seeds)"


def within_noise(best, other) -> bool:
    """Whether other's mean is within NOISE_ERRORS standard errors of the difference from best's."""
    a, b = best.user_attrs.get(VAL_SEM), other.user_attrs.get(VAL_SEM)
    if a is None or b is None:
        return False
    return best.value - other.value < NOISE_ERRORS * math.hypot(a, b)


def noise_text(ranked: list) -> str:
    """Which trials the best one does not beat beyond noise; trials of one seed (no standard error)
    are not judged, and a study of them only is told how to know."""
    best, others = ranked[0], ranked[1:]
    if VAL_SEM not in best.user_attrs:
        if not any(VAL_SEM in t.user_attrs for t in others):
            return (
                "one seed per trial: a difference of ~0.1 points may be noise (--val-seeds K scores each trial "
                "on K seeds, with a standard error)"
            )
        return f"the best trial, {best.number}, ran one seed: no standard error to judge the others against"
    tied = [t.number for t in others if within_noise(best, t)]
    unjudged = [t.number for t in others if VAL_SEM not in t.user_attrs]
    if tied:
        text = (
            f"within noise of trial {best.number} (difference < {NOISE_ERRORS:g} standard errors): "
            f"trial{'s' if len(tied) > 1 else ''} {', '.join(map(str, tied))}"
        )
    else:
        text = f"trial {best.number} is ahead of every other trial by more than {NOISE_ERRORS:g} standard errors"
    if unjudged:
        text += f"; not judged (one seed): trial{'s' if len(unjudged) > 1 else ''} {', '.join(map(str, unjudged))}"
    return text


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(trial) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in sorted(trial.params.items()))


def save_plots(study, folder: Path, with_importances: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    from mnist_cnn.files import atomic_write

    plots: list[tuple[str, Callable[[optuna.Study], Axes]]] = [("history.png", plot_optimization_history)]
    if with_importances:
        plots.append(("importances.png", plot_param_importances))
    for name, plot in plots:
        ax = plot(study)
        fig = ax.figure
        assert isinstance(fig, Figure)  # optuna draws on a figure of its own, not a sub-figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        atomic_write(folder / name, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


def trial_config(trial) -> Config:
    """The config a trial ran, as the study stores it: the recipe, the flags and the trial's parameters.
    A trial run before studies stored it is read from its checkpoint, by the path its worker wrote."""
    if TRIAL_CONFIG in trial.user_attrs:
        try:
            cfg = from_dict(Config, trial.user_attrs[TRIAL_CONFIG])
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"trial {trial.number}'s config in the study: {e}") from None
        return cfg
    from mnist_cnn.checkpoint import LAST_FILE, load_checkpoint

    path = Path(trial.user_attrs[RUN_DIR]) / LAST_FILE
    try:
        return load_checkpoint(path).config
    except CheckpointError as e:
        raise ConfigError(
            f"trial {trial.number} ran before studies stored configs, so best.toml needs its "
            f"checkpoint: {e} (run the report in the folder its worker ran in)"
        ) from None


def best_recipe(cfg: Config, study: str, number: int, value: float) -> str:
    """The trial's config as a recipe: trained on all the training images, test set on again."""
    cfg.run = type(cfg.run)()  # where and how it ran is not part of a recipe
    cfg.val_size = 0
    cfg.recipe = f"{study}-best"
    cfg.about = (
        f"from tune study {study}, trial {number}: validation accuracy {100 * value:.2f}% "
        "(then trained on all training images)"
    )
    return dump_toml(cfg)
