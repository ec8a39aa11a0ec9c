"""`mnist-cnn compare`: the rows come from what the runs wrote; frontier.png is drawn from them."""

import csv
import io
import json
import statistics

import pytest
import torch

from conftest import checkpoint_file
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.networks.builtin import build_model, count_parameters

QUICK = ["--device", "cpu", "--no-progress", "--no-verify", "--batch-size", "32", "--train-limit", "320"]


@pytest.fixture(scope="module")
def groups(synthetic_run, tmp_path_factory):
    """(teacher run, a --seeds folder of the tiny network distilled from it, an unfinished run)."""
    data, teacher = synthetic_run
    base = tmp_path_factory.mktemp("compare")
    seeds = base / "tiny-seeds"
    cmd = ["train", "--data-dir", str(data), "--out", str(seeds), "--epochs", "2", "--model", "tiny", *QUICK]
    assert main([*cmd, "--seeds", "0-2", "--teacher", str(teacher)]) == 0
    half = base / "half"
    half.mkdir()
    ckpt = checkpoint_file(seeds / "seed-0" / "last.pt")
    ckpt["epoch"] = 1
    torch.save(ckpt, half / "last.pt")
    return teacher, seeds, half


def final_accs(folder):
    return [100 * load_checkpoint(folder / f"seed-{s}" / "last.pt").metrics[-1]["test_acc"] for s in range(3)]


def test_rows_hold_the_seeds_final_accuracy_and_the_networks_size(groups, tmp_path, capsys):
    teacher, seeds, _ = groups
    assert main(["compare", str(teacher), str(seeds), "--json", "--plot", str(tmp_path / "f.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    one, group = rows
    accs = final_accs(seeds)
    assert group["seeds"] == 3 and group["split"] == "test" and group["epochs"] == 2
    assert group["mean"] == pytest.approx(statistics.fmean(accs))
    assert group["std"] == pytest.approx(statistics.stdev(accs))
    assert (group["min"], group["max"]) == (pytest.approx(min(accs)), pytest.approx(max(accs)))
    tiny = build_model("tiny")
    assert group["parameters"] == count_parameters(tiny) == 7_578
    assert group["macs"] == 949_696 and group["receptive_field"] == 18  # docs/results/frontier.json's tiny rows
    assert group["teacher"] == teacher.name and one["teacher"] == ""
    assert one["seeds"] == 1 and one["std"] == 0.0 and one["parameters"] == 16_426
    metrics = load_checkpoint(teacher / "last.pt").metrics
    assert one["mean"] == pytest.approx(100 * metrics[-1]["test_acc"])
    assert one["seconds_per_epoch"] == pytest.approx(statistics.fmean(r["seconds"] for r in metrics))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_csv_and_markdown_say_the_same(groups, tmp_path, capsys, monkeypatch):
    teacher, seeds, _ = groups
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(seeds), "--csv"]) == 0
    out = capsys.readouterr()
    (row,) = csv.DictReader(io.StringIO(out.out))
    assert row["network"] == "tiny" and row["seeds"] == "3"
    assert "wrote frontier.png" in out.err and (tmp_path / "frontier.png").is_file()  # the default plot
    assert main(["compare", str(seeds), "--markdown", "--no-plot"]) == 0
    md = capsys.readouterr().out
    assert f"**{float(row['mean']):.2f} ± {float(row['std']):.2f}**" in md and "| 7,578 |" in md
    assert main(["compare", str(seeds), "--no-plot"]) == 0
    assert f"{float(row['mean']):.2f} ± {float(row['std']):.2f}" in capsys.readouterr().out


@pytest.mark.parametrize("which, message", [("half", "has not finished (epoch 1 of 2)"), ("none", "neither a run")])
def test_what_is_not_a_finished_run_is_a_one_line_error(groups, tmp_path, capsys, which, message):
    _, _, half = groups
    path = half if which == "half" else tmp_path
    assert main(["compare", str(path), "--plot", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.png").exists()


def test_the_python_api_returns_the_rows_and_draws_nothing_with_plot_none(groups, tmp_path, monkeypatch):
    import mnist_cnn

    teacher, _, _ = groups
    monkeypatch.chdir(tmp_path)  # where the default plot, frontier.png, would go
    rows = mnist_cnn.compare(str(teacher), plot=None)  # one path, or a list of them
    assert [r["network"] for r in rows] == ["seed"] and not list(tmp_path.iterdir())
    assert mnist_cnn.compare([teacher, teacher], plot=None)[1] == rows[0]


def test_a_plot_into_a_missing_folder_is_a_one_line_error(groups, tmp_path, capsys):
    teacher, _, _ = groups
    assert main(["compare", str(teacher), "--plot", str(tmp_path / "nope" / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {tmp_path / 'nope' / 'f.png'}: no folder {tmp_path / 'nope'}\n"
    assert not list(tmp_path.iterdir())


def test_runs_without_the_test_split_are_scored_on_validation_and_say_so(synthetic_run, tmp_path, capsys):
    data, _ = synthetic_run
    cmd = ["train", "--data-dir", str(data), "--out", str(tmp_path / "v"), "--epochs", "1", *QUICK]
    assert main([*cmd, "--set", "val_size=100", "--set", "run.test=false"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "v"), "--json", "--no-plot"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    final = load_checkpoint(tmp_path / "v" / "last.pt").metrics[-1]
    assert row["split"] == "val" and row["mean"] == pytest.approx(100 * final["val_acc"])
    assert main(["compare", str(tmp_path / "v"), "--markdown", "--no-plot"]) == 0
    assert "(validation)" in capsys.readouterr().out


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[16:24]
    return int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")


def test_groups_of_two_data_sets_say_which_and_get_a_panel_each(groups, tmp_path, capsys):
    teacher, seeds, _ = groups
    fashion = tmp_path / "fashion"  # the teacher's run as if trained on Fashion-MNIST: compare reads only the config
    fashion.mkdir()
    ckpt = checkpoint_file(teacher / "last.pt")
    ckpt["config"]["dataset"] = "fashion-mnist"
    torch.save(ckpt, fashion / "last.pt")
    assert main(["compare", str(teacher), str(fashion), "--json", "--plot", str(tmp_path / "two.png")]) == 0
    assert [r["dataset"] for r in json.loads(capsys.readouterr().out)] == ["mnist", "fashion-mnist"]
    assert main(["compare", str(teacher), str(seeds), "--plot", str(tmp_path / "one.png")]) == 0
    assert "fashion-mnist" not in capsys.readouterr().out
    (w1, _), (w2, _) = png_size(tmp_path / "one.png"), png_size(tmp_path / "two.png")
    assert w2 > 1.7 * w1  # two panels side by side (the tight bounding box trims the margins)
