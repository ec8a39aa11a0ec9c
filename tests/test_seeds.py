"""--seeds: one run per seed, final-epoch statistics, and a rerun that continues."""

import csv
import json
import shutil
import statistics

import pytest
import torch

import mnist_cnn
from conftest import REPO, sigterm_at_the_next_evaluation
from mnist_cnn.cli import main
from mnist_cnn.errors import ConfigError
from mnist_cnn.training import seeds as seeds_module
from mnist_cnn.training.seeds import parse_seeds


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,3,7") == [0, 3, 7]
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]
    assert parse_seeds(f"{2**63 - 1}") == [2**63 - 1]
    for bad in ("", "a", "3-1", "0,0", "1-", "-1", f"{2**63}", f"0-{2**64}", "0-999999999999", "\u0661"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def seeds_cmd(data, out, seeds="0-2"):
    return [
        "train",
        "--seeds",
        seeds,
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-verify",
        "--no-progress",
    ]


def test_seeds_train_each_seed_and_summarize_the_final_epoch(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out)) == 0
    rows = list(csv.DictReader(open(out / "seeds.csv")))
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    finals = []
    for r in rows:
        metrics = list(csv.DictReader(open(out / f"seed-{r['seed']}" / "metrics.csv")))
        assert float(r["final_test_acc"]) == pytest.approx(float(metrics[-1]["test_acc"]), abs=1e-6)
        finals.append(float(metrics[-1]["test_acc"]))
    summary = json.loads((out / "seeds-summary.json").read_text())
    assert summary["runs"] == 3 and summary["seeds"] == [0, 1, 2]
    # finals are metrics.csv's six significant digits (off by at most 5e-6 of each value, < 5e-6 here):
    # a mean or min is off by no more, a sample std of three by at most |d| / sqrt(2) <= sqrt(3/2) * 5e-6
    assert summary["final_test_acc_mean"] == pytest.approx(statistics.fmean(finals), abs=5e-6)
    assert summary["final_test_acc_std"] == pytest.approx(statistics.stdev(finals), abs=6.2e-6)
    assert summary["final_test_acc_min"] == pytest.approx(min(finals), abs=5e-6)
    assert "3 seeds of recipe seed (seed): final-epoch test accuracy mean" in capsys.readouterr().out
    for seed in range(3):  # each seed's model card gains the group's summary
        card = (out / f"seed-{seed}" / "MODEL_CARD.md").read_text()
        assert (
            f"one of 3 seeds (0, 1, 2) of one recipe (../seeds-summary.json): final test accuracy "
            f"{100 * summary['final_test_acc_mean']:.2f} ± {100 * summary['final_test_acc_std']:.2f}%" in card
        )
    # different seeds really are different runs
    weights = [(out / f"seed-{s}" / "last.pt").read_bytes() for s in range(3)]
    assert len(set(weights)) == 3


def test_rerunning_keeps_finished_seeds_and_adds_new_ones(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0-1")) == 0
    before = (out / "seed-0" / "last.pt").stat().st_mtime_ns
    assert main(seeds_cmd(synthetic_dir, out, "0-2")) == 0
    assert (out / "seed-0" / "last.pt").stat().st_mtime_ns == before  # not retrained
    assert len(list(csv.DictReader(open(out / "seeds.csv")))) == 3


def test_seed_and_seeds_together_are_refused(synthetic_dir, tmp_path, capsys):
    assert main(seeds_cmd(synthetic_dir, tmp_path / "x") + ["--seed", "3"]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err


def test_a_folder_of_another_run_is_refused_not_counted(synthetic_dir, tmp_path, capsys):
    """A seed folder trained with other settings (another lr, another recipe) is not reused."""
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0")) == 0
    before = (out / "seed-0" / "last.pt").read_bytes()
    summary = (out / "seeds-summary.json").read_text()
    capsys.readouterr()
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--lr", "0.002"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed-0 holds a run with other settings (optim.lr 0.001 -> 0.002)" in err
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--recipe", "fast"]) == 2
    err = capsys.readouterr().err
    assert "optim.schedule 'step' -> 'onecycle'" in err and "epochs" not in err  # both ask for 1 epoch
    assert (out / "seed-0" / "last.pt").read_bytes() == before
    assert (out / "seeds-summary.json").read_text() == summary
    # what does not change results may differ: progress, threads, data folder spelling
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--set", "run.threads=1"]) == 0
    assert (out / "seed-0" / "last.pt").read_bytes() == before


def test_a_run_stopped_between_its_checkpoint_and_its_metrics_file_counts_by_its_checkpoint(
    synthetic_dir, tmp_path, capsys
):
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0-1")) == 0
    expected = (out / "seeds.csv").read_text()
    (out / "seed-1" / "metrics.csv").unlink()  # killed after last.pt was renamed into place
    (out / "seeds.csv").unlink()
    assert main(seeds_cmd(synthetic_dir, out, "0-1")) == 0
    assert (out / "seeds.csv").read_text() == expected


def test_more_epochs_on_a_finished_folder_is_another_run(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0")) == 0
    cmd = seeds_cmd(synthetic_dir, out, "0")
    cmd[cmd.index("--epochs") + 1] = "2"
    assert main(cmd) == 2
    assert "epochs 1 -> 2" in capsys.readouterr().err


def test_a_signal_during_a_seeds_last_evaluation_stops_the_loop(synthetic_dir, tmp_path, monkeypatch, capsys):
    """That seed's run is complete (and kept), but the next seed does not start."""
    sigterm_at_the_next_evaluation(monkeypatch)
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0-2")) == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after seed 0; run the same command with --out {out} to continue all the seeds" in err
    assert (out / "seed-0" / "curves.png").is_file() and not (out / "seed-1").exists()
    assert main(seeds_cmd(synthetic_dir, out, "0-2")) == 0  # continues with seeds 1 and 2
    assert len(list(csv.DictReader(open(out / "seeds.csv")))) == 3


def test_seeds_that_never_read_the_test_set_are_summarized_on_validation(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0-1") + ["--set", "run.test=false", "--set", "val_size=100"]) == 0
    summary = json.loads((out / "seeds-summary.json").read_text())
    assert summary["split"] == "val" and "final_test_acc_mean" not in summary
    rows = list(csv.DictReader(open(out / "seeds.csv")))
    mean_of_rows = statistics.fmean(float(r["final_val_acc"]) for r in rows)  # of six significant digits each
    assert summary["final_val_acc_mean"] == pytest.approx(mean_of_rows, rel=5e-6)
    assert "final-epoch validation accuracy mean" in capsys.readouterr().out
    assert main(seeds_cmd(synthetic_dir, tmp_path / "x", "0") + ["--set", "run.test=false"]) == 2
    assert "run.test = false needs val_size > 0" in capsys.readouterr().err


def test_seeds_of_a_relative_model_file_continue_from_the_same_folder(synthetic_dir, tmp_path, monkeypatch, capsys):
    """The runs record the network's file by its absolute path; the request names it relative to the
    working folder: the same command again (CLI or API) continues, it is not 'another run'."""
    shutil.copy(REPO / "examples" / "gap_net.py", tmp_path / "gap_net.py")
    monkeypatch.chdir(tmp_path)
    cmd = seeds_cmd(synthetic_dir, "multi", "0") + ["--model", "gap_net.py:GapNet"]
    assert main(cmd) == 0
    before = (tmp_path / "multi" / "seed-0" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(cmd[:2] + ["0-1"] + cmd[3:]) == 0  # seed 0 kept, seed 1 added
    assert "holds a run with other settings" not in capsys.readouterr().err
    assert (tmp_path / "multi" / "seed-0" / "last.pt").read_bytes() == before
    got = mnist_cnn.train_seeds(
        "seed",
        "0-1",
        model="gap_net.py:GapNet",
        epochs=1,
        batch_size=32,
        device="cpu",
        data_dir=str(synthetic_dir),
        out="multi",
        progress=False,
        overrides={"run.verify": False},
    )
    assert got.finished and [r["seed"] for r in got.results] == [0, 1]
    assert (tmp_path / "multi" / "seed-0" / "last.pt").read_bytes() == before
    # the file you name is gone: the seed folders' copies of it are not run in its place
    (tmp_path / "gap_net.py").unlink()
    capsys.readouterr()
    assert main(cmd[:2] + ["0-2"] + cmd[3:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "network source for" in err and "not found" in err
    assert not (tmp_path / "multi" / "seed-2").exists()


def test_a_seed_folder_continues_on_another_device(synthetic_dir, tmp_path, monkeypatch, capsys):
    """precision "auto" resolves per device (bf16 on CUDA); a folder finished on the CPU in fp32 is the
    same run when the command comes back on a GPU, and keeps what it ran with."""
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--precision", "auto"]) == 0
    stored = (out / "seed-0" / "config.toml").read_text()
    assert 'precision = "fp32"' in stored or 'precision = "bf16"' in stored  # what auto gave this CPU
    before = (out / "seed-0" / "last.pt").read_bytes()
    monkeypatch.setattr(seeds_module, "pick_device", lambda name: torch.device("cuda"))  # as on a GPU machine
    monkeypatch.setattr(seeds_module, "resolve_precision", lambda precision, device: "bf16")
    capsys.readouterr()
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--together", "no"]) == 0
    assert "holds a run with other settings" not in capsys.readouterr().err
    assert (out / "seed-0" / "last.pt").read_bytes() == before
    assert (out / "seed-0" / "config.toml").read_text() == stored


def test_a_seed_folder_trained_otherwise_than_the_user_asks_by_name_is_refused(synthetic_dir, tmp_path, capsys):
    """Only what the device chose may differ: a precision or layout the user names must match the folder's."""
    out = tmp_path / "multi"
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--precision", "fp32", "--set", "run.channels_last=false"]) == 0
    before = (out / "seed-0" / "last.pt").read_bytes()
    for asked, changed in (
        (["--precision", "bf16"], "run.precision 'fp32' -> 'bf16'"),
        (["--set", "run.channels_last=true"], "run.channels_last False -> True"),
    ):
        capsys.readouterr()
        assert main(seeds_cmd(synthetic_dir, out, "0") + asked) == 2
        err = capsys.readouterr().err
        assert "holds a run with other settings" in err and changed in err and err.count("\n") == 1
    assert (out / "seed-0" / "last.pt").read_bytes() == before
    assert main(seeds_cmd(synthetic_dir, out, "0") + ["--precision", "auto"]) == 0  # the device's choice: reused
    assert (out / "seed-0" / "last.pt").read_bytes() == before


def test_one_seed_summary_is_valid_json_with_no_spread(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(seeds_cmd(synthetic_dir, out, "5")) == 0
    summary = json.loads((out / "seeds-summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["runs"] == 1 and summary["final_test_acc_std"] is None
    assert "+-" not in capsys.readouterr().out  # no spread of one value is printed


def test_seeds_under_torchrun_are_refused_before_anything_is_written(synthetic_dir, tmp_path, monkeypatch, capsys):
    """--seeds runs one process per seed: under torchrun (WORLD_SIZE > 1) the library refuses it, so the
    Python API (train_seeds) refuses it as the command line does."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "seeds"
    assert (
        main(
            [
                "train",
                "--seeds",
                "0-1",
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(out),
                "--no-verify",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "under torchrun, train one seed per command" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="under torchrun"):
        mnist_cnn.train_seeds("seed", "0-1", out=str(out), data_dir=str(synthetic_dir))
    assert not out.exists()
