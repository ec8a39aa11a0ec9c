"""mnist-cnn tune: Optuna studies on SQLite and a real PostgreSQL server, workers in parallel,
pruning, interruption, a worker killed with kill -9, a diverging trial, the report from anywhere; the
test files are never there to be read."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import signal_when, write_synthetic
from mnist_cnn.cli import main
from mnist_cnn.config import RunConfig, load_config
from mnist_cnn.training.rundir import read_metrics
from mnist_cnn.tuning import report as tune_report
from mnist_cnn.tuning import study as tune_module
from mnist_cnn.tuning.workers import GRACE_BEATS, HEARTBEAT_ENV

SPACE = '"optim.lr" = { low = 5e-4, high = 5e-3, log = true }\n"optim.schedule" = ["step", "cosine"]\n'
QUICK = [
    "--epochs",
    "2",
    "--train-limit",
    "400",
    "--val-size",
    "100",
    "--batch-size",
    "32",
    "--no-verify",
    "--no-progress",
    "--device",
    "cpu",
    "--startup-trials",
    "1",
]
# metrics.csv writes each float as f"{v:.6g}" (training.rundir): the value read back is off by at most half
# a unit in its sixth significant digit, and that digit is worth at most 1e-5 of the value read (its first
# digit is at least 1), so by at most 5e-6 of it. A mean of such values (all of one sign) is off by no more.
SIX_DIGITS = 5e-6


def training_files_only(folder: Path) -> Path:
    """`folder` with synthetic training files only (no test files anywhere) and a small space."""
    data = folder / "mnist"
    write_synthetic(data)
    for f in data.glob("t10k-*"):
        f.unlink()
    (folder / "space.toml").write_text(SPACE)
    return folder


@pytest.fixture
def workdir(tmp_path) -> Path:
    return training_files_only(tmp_path)


def tune_here(*args: str) -> int:
    """`mnist-cnn tune` in this process (no interpreter and torch start-up), in the current folder,
    on one thread as tune() runs it: two threads on a busy 2-core machine train many times slower."""
    threads = torch.get_num_threads()
    try:
        return main(["tune", "--data-dir", "mnist", "--space", "space.toml", *QUICK, "--set", "run.threads=1", *args])
    finally:
        torch.set_num_threads(threads)  # the other tests' in-process runs keep torch's default


def tune(workdir: Path, *args: str) -> subprocess.Popen:
    """A `mnist-cnn tune` worker process in `workdir`: for workers side by side and signals."""
    cmd = [sys.executable, "-m", "mnist_cnn", "tune", "--data-dir", "mnist", "--space", "space.toml", *QUICK, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(storage: str, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    return [
        t
        for t in study.get_trials()
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "skipped" not in t.user_attrs
    ]


def two_workers(workdir: Path, storage_args: list[str], trials: int) -> None:
    workers = [tune(workdir, "--study", "s", "--trials", str(trials), *storage_args) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]


def check_exactly(workdir: Path, storage: str, trials: int) -> None:
    done = finished(storage, "s")
    assert len(done) == trials
    assert len({t.number for t in done}) == trials  # no trial twice
    folders = sorted(p.name for p in (workdir / "runs" / "tune" / "s").iterdir())
    assert folders == sorted(f"trial-{t.number:04d}" for t in done)
    for t in done:  # each an ordinary run folder, scored on validation only
        run = workdir / "runs" / "tune" / "s" / f"trial-{t.number:04d}"
        header = (run / "metrics.csv").read_text().splitlines()[0]
        assert "val_acc" in header and "test_acc" not in header and (run / "last.pt").is_file()


def test_two_workers_on_one_sqlite_file_finish_exactly_n_trials(workdir):
    two_workers(workdir, [], trials=3)  # the workers race for the last trials at any N; 3 is quick
    check_exactly(workdir, f"sqlite:///{workdir}/runs/tune/s.db", 3)


def test_a_bad_search_space_is_a_one_line_error(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    cases = {
        '"optim.learning_rate" = { low = 1e-4, high = 1e-2 }': "unknown config key optim.learning_rate",
        '"optim.lr" = { low = 1e-2, high = 1e-4 }': "needs numbers low < high",
        '"optim.lr" = { low = 0.0, high = 1e-2, log = true }': "log = true, so low must be > 0",
        '"optim.schedule" = []': "has no choices",
        '"optim.schedule" = ["step", "sometimes"]': "optim.schedule",
        '"optim.lr" = 0.1': "must be { low = ..., high = ...[, log = true] } or a list",
    }
    for text, message in cases.items():
        (workdir / "bad.toml").write_text(text + "\n")
        assert main(["tune", "--study", "bad", "--space", "bad.toml", "--data-dir", "mnist", "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (text, err)
    assert not (workdir / "runs").exists()  # refused before any study or run folder


def test_pruning_stops_a_hopeless_trial(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/prune.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    (workdir / "space.toml").write_text('"optim.lr" = [1e-3, 1e-9]\n')
    study.enqueue_trial({"optim.lr": 1e-3})
    study.enqueue_trial({"optim.lr": 1e-9})  # learns nothing: below the median from epoch 3 on
    assert tune_here("--study", "s", "--trials", "2", "--storage", storage, "--epochs", "6") == 0, (
        capsys.readouterr().err[-3000:]
    )
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert "trial 1: pruned after epoch " in capsys.readouterr().out
    reason, epochs = trials[1].user_attrs["state_reason"], trials[1].user_attrs["epochs"]  # as the dashboard shows
    assert reason.startswith(f"pruned after epoch {epochs}: validation accuracy ") and epochs == max(
        trials[1].intermediate_values
    )
    rows = (workdir / "runs" / "tune" / "s" / "trial-0001" / "metrics.csv").read_text().splitlines()[1:]
    assert 2 <= len(rows) < 6
    # --prune-after 4: the same hopeless trial runs at least 4 epochs before the pruner may stop it
    study = optuna.create_study(study_name="late", storage=storage, direction="maximize")
    study.enqueue_trial({"optim.lr": 1e-3})
    study.enqueue_trial({"optim.lr": 1e-9})
    assert (
        tune_here("--study", "late", "--trials", "2", "--storage", storage, "--epochs", "6", "--prune-after", "4") == 0
    ), capsys.readouterr().err[-3000:]
    rows = (workdir / "runs" / "tune" / "late" / "trial-0001" / "metrics.csv").read_text().splitlines()[1:]
    assert 4 <= len(rows) < 6


@pytest.mark.parametrize("together", ["no", "yes"])
def test_val_seeds_scores_a_trial_by_its_seeds_mean_with_a_standard_error(workdir, capsys, monkeypatch, together):
    """--val-seeds 3: each trial trains seeds 0, 1, 2 (stacked with run.together = yes, as on CUDA);
    its value is their mean final validation accuracy, its standard error a user attribute, and the
    report ranks by the mean and says which trials are within noise of the best."""
    import statistics

    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/k.db"
    (workdir / "space.toml").write_text('"optim.lr" = [1e-3, 2e-3]\n')
    extra = ["--set", f"run.together={together}", "--set", "model_args={dropout=0.0}"]
    assert tune_here("--study", "k", "--trials", "2", "--storage", storage, "--val-seeds", "3", *extra) == 0, (
        capsys.readouterr().err[-3000:]
    )
    trials = optuna.load_study(study_name="k", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        folder = workdir / "runs" / "tune" / "k" / f"trial-{t.number:04d}"
        accs = [read_metrics(folder / f"seed-{seed}" / "metrics.csv")[-1]["val_acc"] for seed in range(3)]
        assert t.value == pytest.approx(statistics.fmean(accs), rel=SIX_DIGITS)
        assert t.user_attrs["val_accs"] == pytest.approx(accs, rel=SIX_DIGITS)
        # each accuracy (<= 1) is off by <= SIX_DIGITS; a standard deviation of 3 values moves by at most
        # sqrt(3 / 2) times that, so its standard error (/ sqrt(3)) by less than SIX_DIGITS
        assert t.user_attrs["val_acc_sem"] == pytest.approx(statistics.stdev(accs) / 3**0.5, abs=SIX_DIGITS)
        losses = [read_metrics(folder / f"seed-{seed}" / "metrics.csv")[-1]["val_loss"] for seed in range(3)]
        assert t.user_attrs["val_loss"] == pytest.approx(statistics.fmean(losses), rel=SIX_DIGITS)
        assert t.user_attrs["val_acc"] == t.value
    out = capsys.readouterr().out
    assert "(standard error over 3 seeds)" in out
    assert tune_here("--study", "k", "--storage", storage, "--report") == 0
    report = capsys.readouterr().out
    best, worse = sorted(trials, key=lambda t: -t.value)  # as the report ranks them (ties: by number)
    assert f"val acc {100 * best.value:6.2f}% ± {100 * best.user_attrs['val_acc_sem']:.2f} (3 seeds)" in report
    if tune_report.within_noise(best, worse):
        assert f"within noise of trial {best.number} (difference < 2 standard errors): trial {worse.number}" in report
    else:
        assert f"trial {best.number} is ahead of every other trial by more than 2 standard errors" in report


def test_with_val_seeds_the_pruner_watches_the_first_seed_and_a_pruned_trial_trains_no_other(
    workdir, capsys, monkeypatch
):
    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/kp.db"
    study = optuna.create_study(study_name="kp", storage=storage, direction="maximize")
    (workdir / "space.toml").write_text('"optim.lr" = [1e-3, 1e-9]\n')
    study.enqueue_trial({"optim.lr": 1e-3})
    study.enqueue_trial({"optim.lr": 1e-9})  # learns nothing: below the median from epoch 3 on
    args = ("--study", "kp", "--trials", "2", "--storage", storage, "--epochs", "5", "--val-seeds", "2")
    assert tune_here(*args) == 0, capsys.readouterr().err[-3000:]
    trials = optuna.load_study(study_name="kp", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    folder = workdir / "runs" / "tune" / "kp"
    assert (folder / "trial-0000" / "seed-1" / "last.pt").is_file()
    assert (folder / "trial-0001" / "seed-0" / "last.pt").is_file()
    assert not (folder / "trial-0001" / "seed-1").exists()


def test_trials_can_learn_from_a_teacher_that_never_saw_their_validation_split(workdir, capsys, monkeypatch):
    """tune --teacher: every trial distils from the same teacher file, recorded with its digest; a teacher
    that trained on the trials' validation images is refused before any trial runs."""
    from mnist_cnn.training.distill import file_sha256

    monkeypatch.chdir(workdir)
    teach = ["train", "--data-dir", "mnist", "--epochs", "1", "--train-limit", "400", "--batch-size", "32"]
    teach += ["--no-verify", "--no-progress", "--device", "cpu", "--set", "run.test=false"]
    assert main([*teach, "--out", "teacher", "--set", "val_size=100"]) == 0
    assert main([*teach, "--out", "leaky", "--set", "val_size=50"]) == 0
    storage = f"sqlite:///{workdir}/t.db"
    assert tune_here("--study", "leak", "--trials", "1", "--storage", storage, "--teacher", "leaky") == 2
    assert "trained on images of this run's validation split" in capsys.readouterr().err
    assert not (workdir / "t.db").exists() and not (workdir / "runs").exists()  # refused before the study
    assert tune_here("--study", "t", "--trials", "1", "--storage", storage, "--teacher", "teacher") == 0, (
        capsys.readouterr().err[-3000:]
    )
    (trial,) = optuna.load_study(study_name="t", storage=storage).get_trials()
    assert trial.state == TrialState.COMPLETE
    stored = trial.user_attrs["config"]["distill"]
    assert stored["teachers"] == [str(workdir / "teacher" / "last.pt")]
    run = load_config(str(workdir / "runs" / "tune" / "t" / "trial-0000" / "config.toml"))
    assert run.distill.sha256 == stored["sha256"] == [file_sha256(workdir / "teacher" / "last.pt")]


def test_within_noise_compares_the_difference_with_its_standard_error():
    from types import SimpleNamespace as T

    def trial(value, sem):
        return T(value=value, user_attrs={"val_acc_sem": sem, "val_accs": [0.0] * 3})

    best = trial(0.995, 0.0003)
    assert tune_report.within_noise(best, trial(0.9945, 0.0003))  # 0.05 points < 2 x 0.042
    assert not tune_report.within_noise(best, trial(0.993, 0.0003))  # 0.2 points: a real difference
    one_seed = T(value=0.9949, user_attrs={}, number=7)
    assert not tune_report.within_noise(best, one_seed)  # one seed: no error to judge by
    best.number, close = 3, trial(0.9945, 0.0003)
    close.number = 5
    assert tune_report.noise_text([best, close, one_seed]) == (
        "within noise of trial 3 (difference < 2 standard errors): trial 5; not judged (one seed): trial 7"
    )
    assert "ran one seed: no standard error" in tune_report.noise_text([one_seed, best])
    assert tune_report.noise_text([one_seed]).startswith("one seed per trial")


def test_without_a_space_the_default_space_is_searched():
    """docs/guide/tuning.md: the learning rate, schedule, label smoothing, weight average and augmentation strengths."""
    params = tune_module.read_space(None, load_config("seed"))
    assert (
        [p.key for p in params]
        == list(tune_module.DEFAULT_SPACE)
        == [
            "optim.lr",
            "optim.schedule",
            "optim.label_smoothing",
            "optim.ema",
            "augment.max_rotation",
            "augment.zoom_p",
            "augment.max_shift",
        ]
    )


def test_networks_over_max_params_are_pruned_untrained_and_not_counted(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/size.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    (workdir / "space.toml").write_text('"model_args.w3" = [8, 40]\n')
    for w3 in (40, 8, 40, 8):  # (12, 18, 40): 27,834 parameters; (12, 18, 8): 8,378
        study.enqueue_trial({"model_args.w3": w3})
    assert (
        tune_here("--study", "s", "--trials", "2", "--storage", storage, "--set", "model=vgg", "--max-params", "10000")
        == 0
    ), capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE] * 2  # 2 trained, as asked
    assert [t.user_attrs.get("over_max_params") for t in trials] == [27_834, None] * 2
    assert trials[0].user_attrs["state_reason"] == "not trained: 27,834 parameters > --max-params 10,000"
    assert [t.user_attrs["parameters"] for t in trials] == [27_834, 8_378] * 2
    assert "trial 0: 27,834 parameters > --max-params 10,000: not trained" in out
    assert sorted(p.name for p in (workdir / "runs" / "tune" / "s").iterdir()) == ["trial-0001", "trial-0003"]
    assert "2 trials done" in out


def test_a_space_with_no_network_within_max_params_is_a_one_line_error(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(tune_module, "OVER_LIMIT_IN_A_ROW", 3)  # 100 for users: the rule is tested, not the number
    (workdir / "space.toml").write_text('"model_args.w3" = [40, 48]\n')
    assert (
        tune_here("--study", "s", "--trials", "2", "--set", "model=vgg", "--max-params", "10000", "--timeout", "300")
        == 2
    )  # a broken rule ends in a failure, not in a worker that never stops
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 trials in a row had networks over --max-params 10,000" in err, err[-2000:]
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{workdir}/runs/tune/s.db").get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3  # it gave up at the limit, no sooner or later
    assert all(t.user_attrs["over_max_params"] > 10_000 for t in trials)
    assert not any((workdir / "runs" / "tune" / "s").iterdir())  # nothing trained


def test_the_baseline_trial_runs_the_recipe_unchanged_and_the_report_ranks_it(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "space.toml").write_text(
        '"optim.lr" = { low = 5e-4, high = 5e-3, log = true }\n"model_args.w3" = '
        '[16, 24]\n"augment.max_rotation" = { low = 5.0, high = 20.0 }\n'
    )
    for _ in range(2):  # a second worker (here: run) must not enqueue it again
        assert tune_here("--study", "s", "--trials", "2", "--set", "model=vgg", "--baseline") == 0, (
            capsys.readouterr().err[-3000:]
        )
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{workdir}/runs/tune/s.db").get_trials()
    marked = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(marked) == 1 and marked[0].number == 0
    assert marked[0].params == {"optim.lr": 1e-3, "model_args.w3": 24, "augment.max_rotation": 15.0}
    assert len([t for t in trials if "skipped" not in t.user_attrs]) == 2  # the baseline is one of the --trials
    capsys.readouterr()
    assert main(["tune", "--study", "s", "--report"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "baseline: trial 0 (the recipe unchanged) val acc" in out and "of 2" in out
    (workdir / "space.toml").write_text('"optim.lr" = { low = 2e-3, high = 5e-3 }\n')
    assert tune_here("--study", "t", "--baseline") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline: the recipe's optim.lr = 0.001 is outside the search space" in err


DIVERGING_LR = 1e20  # Adam's first step moves every weight by about this much: the loss is NaN at step 2


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Path, str, int, str]:
    """A study asked for 3 trials, run in-process, whose trial 1 diverges; a fourth trial waits in
    the queue: (folder, storage, exit code, the worker's output)."""
    folder = training_files_only(tmp_path_factory.mktemp("diverged"))
    (folder / "space.toml").write_text(
        f'"optim.lr" = [1e-3, 3e-3, {DIVERGING_LR}]\n"optim.schedule" = ["step", "cosine"]\n'
    )
    storage = f"sqlite:///{folder}/s.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for lr, schedule in ((1e-3, "step"), (DIVERGING_LR, "cosine"), (3e-3, "cosine"), (1e-3, "cosine")):
        study.enqueue_trial({"optim.lr": lr, "optim.schedule": schedule})
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(folder)
        code = tune_here("--study", "s", "--trials", "3", "--storage", storage)
    return folder, storage, code, out.getvalue()


def test_a_diverging_trial_fails_with_its_reason_counts_and_the_study_goes_on(diverged):
    folder, storage, code, out = diverged
    assert code == 0, out[-3000:]
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    # the fourth never ran: the failed trial is one of the 3 asked for, or a space of NaNs would never end
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    reason = trials[1].user_attrs["fail_reason"]
    assert reason.startswith("epoch 1/2: loss became NaN or infinite at step "), reason
    assert f"trial 1: failed: {reason}" in out and "trial 2: final validation accuracy" in out
    assert "study s: 3 trials done (0 pruned, 1 failed); best validation accuracy" in out
    trial = folder / "runs" / "tune" / "s" / "trial-0000"  # a trial's card: validation only, the test set unopened
    card = (trial / "MODEL_CARD.md").read_text()
    assert '"split": "validation"' in card and "the test set was not opened" in card
    assert f'"value": {trials[0].value}' in card and not (trial / "evaluation.json").exists()


def test_the_report_needs_only_the_storage_and_shows_why_a_trial_failed(diverged, tmp_path, monkeypatch, capsys):
    folder, storage, _, _ = diverged
    shutil.copy(folder / "s.db", tmp_path / "copy.db")  # another folder, another machine: no run folder there
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--study", "s", "--storage", f"sqlite:///{tmp_path}/copy.db", "--report"]) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert "study s: 2 completed, 0 pruned, 1 failed" in out
    assert "trial    1  failed: epoch 1/2: loss became NaN or infinite" in out and "optim.lr=1e+20" in out
    best = optuna.load_study(study_name="s", storage=storage).best_trial
    cfg = load_config(str(tmp_path / "runs" / "tune" / "s" / "best.toml"))
    # the seed recipe, QUICK's recipe fields and the trial's values; no run settings, no validation split
    expected = load_config("seed", {"epochs": 2, "batch_size": 32, **best.params})
    expected.recipe, expected.about = "s-best", cfg.about
    assert cfg == expected
    assert cfg.about.startswith(f"from tune study s, trial {best.number}: validation accuracy ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: free for the server about to start


def get_json(url: str, timeout_s: float = 60) -> dict:
    """GET url's JSON, retrying while the server starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_optuna_dashboard_reads_the_study_with_its_trials_states_params_and_attributes(
    diverged, tmp_path, monkeypatch, capsys
):
    """The real `optuna-dashboard` on the study's SQLite file, read back through its own HTTP API. The same
    command run once more on the finished study takes the queued trial and records it as skipped."""
    folder, _, _, _ = diverged
    shutil.copy(folder / "s.db", tmp_path / "s.db")  # the dashboard writes its own tables: not into the fixture's
    storage = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.chdir(folder)
    assert tune_here("--study", "s", "--trials", "3", "--storage", storage) == 0, capsys.readouterr().err[-2000:]
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "optuna-dashboard"), storage]
    dashboard = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "s"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    ours = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert detail["objective_names"] == ["validation accuracy"]  # the plots' label, not "Objective 0"
    shown = sorted(detail["trials"], key=lambda t: t["number"])
    assert [t["state"] for t in shown] == ["Complete", "Fail", "Complete", "Pruned"]
    assert [t["state"] for t in shown] == [t.state.name.capitalize() for t in ours]
    for trial, row in zip(ours[:3], shown):
        assert {p["name"]: p["param_external_value"] for p in row["params"]} == {
            k: str(v) for k, v in trial.params.items()
        }
        attrs = {a["key"]: a["value"] for a in row["user_attrs"]}
        assert attrs["run_dir"] == str(Path("runs") / "tune" / "s" / f"trial-{trial.number:04d}")
        assert attrs["parameters"] == "16426" and float(attrs["seconds"]) > 0
        assert [v["step"] for v in row["intermediate_values"]] == list(trial.intermediate_values)
    complete, failed = [{a["key"]: a["value"] for a in row["user_attrs"]} for row in shown[:2]]
    metrics = read_metrics(folder / "runs" / "tune" / "s" / "trial-0000" / "metrics.csv")
    assert float(complete["val_acc"]) == ours[0].value  # the attribute is the float itself, metrics.csv rounds it
    assert float(complete["val_acc"]) == pytest.approx(metrics[-1]["val_acc"], rel=SIX_DIGITS)
    assert float(complete["val_loss"]) == pytest.approx(metrics[-1]["val_loss"], rel=SIX_DIGITS)
    assert complete["state_reason"] == "trained 2 epochs" and complete["epochs"] == "2"
    assert failed["state_reason"] == f"failed: {ours[1].user_attrs['fail_reason']}"
    skipped = {a["key"]: a["value"] for a in shown[3]["user_attrs"]}
    assert skipped["state_reason"] == "skipped: the study already holds its --trials"
    monkeypatch.chdir(tmp_path)  # the report writes runs/tune/s/ here, not into the fixture's folder
    capsys.readouterr()
    assert main(["tune", "--study", "s", "--storage", storage, "--report"]) == 0, capsys.readouterr().err
    # Optuna records the skipped trial as pruned; the report counts it as what it is
    out = capsys.readouterr().out
    assert "study s: 2 completed, 0 pruned, 1 failed (1 more skipped, not trained)\n" in out


def test_a_study_from_before_configs_were_stored_takes_best_toml_from_the_checkpoint(
    diverged, tmp_path, monkeypatch, capsys
):
    run = diverged[0] / "runs" / "tune" / "s" / "trial-0000"  # any trained run folder
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/old.db"
    lr = optuna.distributions.FloatDistribution(5e-4, 5e-3, log=True)
    for name, run_dir in (("old", run), ("moved", tmp_path / "elsewhere")):  # a trial as older versions stored it
        optuna.create_study(study_name=name, storage=storage, direction="maximize").add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": 1e-3},
                distributions={"optim.lr": lr},
                value=0.9,
                user_attrs={"run_dir": str(run_dir)},
            )
        )
    assert main(["tune", "--study", "old", "--storage", storage, "--report"]) == 0, capsys.readouterr().err
    cfg = load_config(str(tmp_path / "runs" / "tune" / "old" / "best.toml"))
    expected = load_config(str(run / "config.toml"))
    expected.run, expected.val_size, expected.recipe, expected.about = RunConfig(), 0, "old-best", cfg.about
    assert cfg == expected
    capsys.readouterr()  # what loading the configs above said: the error below must be all there is
    assert main(["tune", "--study", "moved", "--storage", storage, "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trial 0 ran before studies stored configs" in err and "no such checkpoint" in err


def test_a_storage_password_never_shows_in_an_error(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    for url, shown in (
        (f"postgresql://tuner:s3cret-pw@127.0.0.1:{port}/db", f"tuner:***@127.0.0.1:{port}/db"),
        ("postgresql://tuner:s3cret-pw@127.0.0.1:port/db", "not a database URL"),
    ):
        for report in ([], ["--report"]):
            assert tune_here("--study", "s", "--storage", url, *report) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and shown in err and "s3cret" not in err, err


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, int, str, str]:
    """A worker stopped with SIGINT in its first trial: (folder, exit code, its stdout, its stderr)."""
    folder = training_files_only(tmp_path_factory.mktemp("interrupted"))
    proc = tune(folder, "--study", "s", "--trials", "3", "--epochs", "40")
    out, err = signal_when(
        proc, lambda: (folder / "runs" / "tune" / "s" / "trial-0000" / "metrics.csv").exists(), signal.SIGINT
    )
    return folder, proc.returncode, out, err


def test_an_interrupted_study_continues_and_the_report_writes_a_recipe(interrupted, capsys, monkeypatch):
    workdir, code, out, err = interrupted
    assert code == 130 and f"run the same command to continue study {'s'!r}" in out + err
    # the worker says so itself: Optuna's warning about the failed trial, with its traceback, is left out
    assert "Traceback" not in err and "Trial 0 failed" not in err, err
    storage = f"sqlite:///{workdir}/runs/tune/s.db"
    (stopped,) = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["state_reason"] == (
        "stopped by a signal (exit code 130)"
    )
    monkeypatch.chdir(workdir)  # the same command again, in this process
    assert tune_here("--study", "s", "--trials", "3") == 0, capsys.readouterr().err[-3000:]
    assert len(finished(storage, "s")) == 3  # the stopped trial is not one of them
    capsys.readouterr()
    assert main(["tune", "--study", "s", "--report"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "3 completed" in out and "1 failed" in out and " failed: " not in out  # stopped: no reason listed
    folder = workdir / "runs" / "tune" / "s"
    assert (folder / "history.png").is_file() and (folder / "importances.png").is_file()
    cfg = load_config(str(folder / "best.toml"))  # a recipe train --recipe takes
    assert cfg.val_size == 0 and cfg.run.test and cfg.run.train_limit == 0 and cfg.recipe == "s-best"
    (folder / "trial-0001" / "curves.png").unlink()
    assert main(["plot", str(folder / "trial-0001")]) == 0  # a trial's folder is a run folder
    assert (folder / "trial-0001" / "curves.png").is_file()


def test_a_stopped_worker_says_so_in_one_line_with_one_hint(interrupted):
    _, code, out, err = interrupted
    said = [line for line in (out + err).splitlines() if "stopped" in line or "continue" in line]
    assert code == 130 and len(said) == 1 and "--resume" not in out + err, said
    assert f"run the same command to continue study {'s'!r}" in said[0]


def running(storage: str, name: str) -> bool:
    """Whether the study holds a RUNNING trial (a worker's, in the middle of its training)."""
    with contextlib.suppress(KeyError):  # not created yet
        study = optuna.load_study(study_name=name, storage=storage.replace("postgresql://", "postgresql+psycopg://"))
        return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    return False


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_killed_workers_trial_fails_with_its_reason_and_gives_its_place_back(
    workdir, capsys, monkeypatch, request, backend
):
    """kill -9 leaves a trial RUNNING; its heartbeat stops, and the next worker, waiting for the one place of
    --trials 1 meanwhile, marks it failed after GRACE_BEATS missed beats and runs a trial in its place."""
    monkeypatch.setenv(HEARTBEAT_ENV, "1")  # a beat a second: the dead worker is found after GRACE_BEATS s
    storage = f"sqlite:///{workdir}/s.db" if backend == "sqlite" else request.getfixturevalue("postgres")
    args = ("--study", "s", "--trials", "1", "--storage", storage)
    worker = tune(workdir, *args, "--epochs", "40")  # still training when it is killed
    trial_0 = workdir / "runs" / "tune" / "s" / "trial-0000"
    signal_when(worker, lambda: (trial_0 / "metrics.csv").exists() and running(storage, "s"), signal.SIGKILL)
    assert worker.returncode == -signal.SIGKILL
    monkeypatch.chdir(workdir)  # the same command again (the epochs aside), in this process
    assert tune_here(*args) == 0, capsys.readouterr().err[-3000:]
    dead, new = optuna.load_study(study_name="s", storage=tune_module.storage_url(storage)).get_trials()
    reason = f"failed: no heartbeat from its worker for {GRACE_BEATS} s (killed, or its machine stopped)"
    assert dead.state == TrialState.FAIL and dead.user_attrs["state_reason"] == reason
    assert new.state == TrialState.COMPLETE and new.user_attrs["state_reason"] == "trained 2 epochs"
    out = capsys.readouterr().out
    assert "trial 1: waiting: the rest of --trials 1 is held by running trial 0; " in out
    assert f"trial 0: {reason}" in out and "study s: 1 trials done (0 pruned, 0 failed)" in out


def test_a_trials_place_is_among_the_first_budget_trials_that_count_or_run():
    """workers.place: trials stopped (failed without a fail_reason) give their place to the next one; a
    trial behind running ones waits; a study holding its budget of counted trials is full."""
    from mnist_cnn.tuning.workers import FULL, RUN, WAIT, place

    def trial(number: int, state: TrialState, **attrs) -> optuna.trial.FrozenTrial:
        made = optuna.trial.create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None)
        made.number, made.user_attrs = number, attrs
        return made

    done, stopped, diverged = trial(0, TrialState.COMPLETE), trial(1, TrialState.FAIL), trial(2, TrialState.FAIL)
    diverged.user_attrs["fail_reason"] = "loss became NaN"
    others, mine = trial(3, TrialState.RUNNING), trial(4, TrialState.RUNNING)
    trials = [done, stopped, diverged, others, mine]
    assert place(trials, 4, 4) == RUN  # 0, 2, 3 and 4: the stopped trial 1 holds no place
    assert place(trials, 4, 3) == WAIT  # 0, 2 and the running 3: should 3 stop, 4 takes its place
    trials[3] = trial(3, TrialState.COMPLETE)
    assert place(trials, 4, 3) == FULL


def test_a_waiting_worker_waits_no_longer_than_its_timeout(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/w.db"
    other = optuna.create_study(study_name="w", storage=storage, direction="maximize").ask()  # another worker's
    assert tune_here("--study", "w", "--trials", "1", "--storage", storage, "--timeout", "1") == 0
    assert f"trial 1: waiting: the rest of --trials 1 is held by running trial {other.number}; " in (
        capsys.readouterr().out
    )
    _, waited = optuna.load_study(study_name="w", storage=storage).get_trials()
    assert waited.state == TrialState.PRUNED and waited.user_attrs["state_reason"] == (
        "skipped: --timeout passed while it waited for other workers' trials"
    )
    assert not (workdir / "runs" / "tune" / "w" / "trial-0001").exists()


def test_a_worker_whose_trial_another_failed_as_stale_says_so_in_one_line(workdir, capsys, monkeypatch):
    """A worker suspended past the grace (Ctrl-Z, a sleeping machine) finds on waking that another worker
    failed its trial as a dead worker's: Optuna cannot record the trial's end, and the worker says why."""
    import threading

    monkeypatch.chdir(workdir)
    storage = f"sqlite:///{workdir}/l.db"
    first_epoch = workdir / "runs" / "tune" / "l" / "trial-0000" / "metrics.csv"

    def fail_it_as_stale() -> None:  # what another worker's fail_stale_trials does
        deadline = time.monotonic() + 300
        while not first_epoch.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        study = optuna.load_study(study_name="l", storage=storage)
        study._storage.set_trial_state_values(study.get_trials()[0]._trial_id, TrialState.FAIL)

    other = threading.Thread(target=fail_it_as_stale)
    other.start()
    code = tune_here("--study", "l", "--trials", "1", "--storage", storage, "--epochs", "40")
    other.join()
    err = capsys.readouterr().err
    assert code == 2 and err == (
        "error: trial 0 was marked failed by another worker while this one sent no heartbeat (suspended, or its "
        "machine asleep, past the grace): run the same command to continue study 'l'\n"
    ), err


@pytest.mark.parametrize("value", ["0", "0.5", "soon"])
def test_a_bad_heartbeat_setting_is_a_one_line_error(workdir, capsys, monkeypatch, value):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(HEARTBEAT_ENV, value)
    assert tune_here("--study", "s") == 2
    assert capsys.readouterr().err == (
        f"error: {HEARTBEAT_ENV} must be a whole number of seconds, at least 1; got {value!r}\n"
    )
    assert not (workdir / "runs").exists()  # refused before the study's storage or folder


def test_a_study_over_another_studys_trial_folders_is_a_one_line_error(workdir, capsys, monkeypatch):
    """A study started again after its storage was deleted finds its trial folders on disk: it refuses
    in one line before any trial, rather than failing a trial with train's --resume advice."""
    monkeypatch.chdir(workdir)
    left = workdir / "runs" / "tune" / "s" / "trial-0000"
    left.mkdir(parents=True)
    (left / "config.toml").write_text("# another study's trial\n")
    assert tune_here("--study", "s", "--trials", "1") == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {Path('runs/tune/s')} holds trial-0000 that study 's' in sqlite:///runs/tune/s.db did not write "
        "(left by an earlier study of that name, whose storage was deleted or is another one): move runs/tune/s "
        "away, or choose another --study\n"
    )
    trials = optuna.load_study(study_name="s", storage="sqlite:///runs/tune/s.db").get_trials()
    assert trials == [] and sorted(p.name for p in left.iterdir()) == ["config.toml"]  # nothing run or written


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL cluster on 127.0.0.1, run as the postgres user; yields its URL."""
    bin_dir = postgres_bin()
    if bin_dir is None or shutil.which("runuser") is None:
        pytest.skip("Debian's postgresql is not installed (apt-get install -y postgresql; .ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    data, sockets = root / "data", root / "sock"
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_postgres, "mkdir", str(sockets)], check=True)
    subprocess.run(
        [*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [
            *as_postgres,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_a_real_postgresql_server_share_one_study(workdir, postgres):
    two_workers(workdir, ["--storage", postgres], trials=4)
    check_exactly(workdir, postgres, 4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(trials=0), "--trials must be at least 1, got 0"),
        (dict(val_size=0), "--val-size must be > 0: tune scores trials on a validation split"),
        (dict(val_size=-1), "val_size must be >= 0, got -1"),
        (dict(max_params=0), "--max-params must be at least 1, got 0"),
        (dict(prune_after=-1), "--prune-after must be >= 0 epochs, got -1"),
        (dict(val_seeds=0), "--val-seeds must be at least 1, got 0"),
    ],
)
def test_the_library_checks_tunes_options_before_anything_runs(tmp_path, monkeypatch, options, message):
    """Python callers get the command line's checks: mnist_cnn.tune() refuses what `tune` refuses."""
    import mnist_cnn
    from mnist_cnn.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        mnist_cnn.tune("s1", "seed", mnist_cnn.TuneOptions(**options))
    assert not (tmp_path / "runs").exists()
