"""A user's files are never overwritten, mixed or deleted: one writer per run folder (an OS lock,
named by PID), a new run only in a new or empty folder, cleanup of only what a run made, no output
over an input, messages about checkpoints and resuming that are true, a full disk said in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import checkpoint_file, write_synthetic
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.errors import OutputError
from mnist_cnn.files import LOCK_FILE, FolderLock, refuse_foreign, written_by_us
from mnist_cnn.training import loop as train_module
from mnist_cnn.training.rundir import RunDir

WAIT_S = 120  # for a training subprocess to reach a point; a failure, not a wait, when exceeded


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """1,500 synthetic training images: an epoch takes about a second, so a run is caught while it trains."""
    folder = tmp_path_factory.mktemp("own") / "mnist"
    write_synthetic(folder, n_train=1500, n_test=200)
    return folder


def train_args(data: Path, out: Path | None, epochs: int = 1, *extra: str) -> list[str]:
    where = ["--out", str(out)] if out is not None else []
    return [
        "train",
        "--data-dir",
        str(data),
        *where,
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--no-verify",
        "--no-progress",
        *extra,
    ]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_cnn", *args]


def wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not get there in time")
        time.sleep(0.01)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def breaks_at(step: int):
    """A loss that turns NaN at the step-th optimizer step of the process (counting from 1)."""
    real = train_module.nll
    count = {"n": 0}

    def nll(log_probs, labels, smoothing):
        count["n"] += 1
        loss = real(log_probs, labels, smoothing)
        return loss * float("nan") if count["n"] == step else loss

    return nll


# -- a folder that already holds the user's files ---------------------------------------------------------------


def test_a_folder_with_the_users_files_is_refused_and_left_as_it_was(data, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my = 'own config'\n")
    (mine / "summary.txt").write_text("my notes\n")
    before = snapshot(mine)
    monkeypatch.chdir(mine)
    assert main(train_args(data, Path("."))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "holds files that are not a run (config.toml, summary.txt); a new run needs a new or empty folder" in err
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.toml", "summary.txt"]


def test_a_run_that_fails_in_an_empty_folder_of_the_users_removes_only_its_own_files(
    data, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "empty"
    folder.mkdir()
    monkeypatch.setattr(train_module, "nll", breaks_at(2))
    assert main(train_args(data, folder)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss became NaN or infinite at step 2" in err
    assert "no checkpoint was written" in err and "before this epoch" not in err  # there is none to speak of
    assert folder.is_dir() and list(folder.iterdir()) == []  # the user's folder stays, empty as it was


def test_a_divergence_after_a_checkpoint_names_it(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(train_module, "nll", breaks_at(24 + 3))  # 24 steps of 64 an epoch: step 3 of epoch 2
    assert main(train_args(data, out, 2)) == 3
    err = capsys.readouterr().err
    assert f"its last checkpoint, {out / 'last.pt'}, is intact" in err and err.count("\n") == 1
    assert load_checkpoint(out / "last.pt").epoch == 1


def test_the_lock_is_taken_again_by_one_thread_and_refused_to_another(tmp_path):
    import threading

    with FolderLock.take(tmp_path), FolderLock.take(tmp_path):  # nested writers of one command
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        errors: list[BaseException] = []

        def other():
            try:
                FolderLock.take(tmp_path)
            except OutputError as e:
                errors.append(e)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert "being written by another thread of this process" in str(errors[0])
    assert not (tmp_path / LOCK_FILE).exists()  # released: the folder looks as before


# -- two processes, one run folder ------------------------------------------------------------------------------


def test_two_processes_racing_for_one_folder_one_trains_the_other_refuses_naming_it(data, tmp_path):
    out = tmp_path / "race"
    procs = [subprocess.Popen(cli(*train_args(data, out, 3)), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    ended = [(p.wait(timeout=WAIT_S), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in ended)
    assert codes == [0, 2], ended
    winner = next(p for p, (code, _) in zip(procs, ended) if code == 0)
    message = next(err for code, err in ended if code == 2).strip()
    assert "\n" not in message
    # the loser either met the winner at work (and names it) or came after it had finished
    assert f"being written by process {winner.pid}" in message or "already holds a run" in message
    stored = load_checkpoint(out / "last.pt")
    assert stored.epoch == 3 and len((out / "metrics.csv").read_text().splitlines()) == 4
    started = json.loads((out / "environment.json").read_text())["started"]
    assert started and (out / "MODEL_CARD.md").is_file() and not (out / LOCK_FILE).exists()


def test_a_second_writer_of_a_training_folder_is_refused_and_kill_9_leaves_no_stale_lock(data, tmp_path):
    out = tmp_path / "busy"
    proc = subprocess.Popen(cli(*train_args(data, out, 50)), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "last.pt").is_file(), proc)
    before = (out / "last.pt").stat().st_mtime_ns
    for args in (
        ["train", "--resume", str(out), "--no-progress"],
        train_args(data, out),
        ["evaluate", str(out / "last.pt"), "--data-dir", str(data), "--no-verify", "--device", "cpu"],
        ["plot", str(out)],
    ):
        refused = subprocess.run(cli(*args), capture_output=True, text=True, timeout=WAIT_S)
        assert refused.returncode == 2, (args, refused.stderr)
        assert refused.stderr.strip() == (
            f"error: {out} is being written by process {proc.pid} (PID in {out / LOCK_FILE}); "
            "wait for it to end or choose another folder"
        )
    assert not (out / "evaluation.json").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).exists()  # the file stays after kill -9, but no one holds it
    assert (out / "last.pt").stat().st_mtime_ns >= before
    end = load_checkpoint(out / "last.pt").epoch + 1  # one more epoch is enough to show it continues
    resumed = subprocess.run(
        cli("train", "--resume", str(out), "--no-progress", "--device", "cpu", "--epochs", str(end)),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "last.pt").epoch == end and not (out / LOCK_FILE).exists()


# -- outputs over inputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(data, out)) == 0
    return out


def export_args(run: Path, format: str, out: Path) -> list[str]:
    return ["export", str(run / "last.pt"), "--format", format, "--out", str(out), "--no-verify", "--check", "10"]


def test_an_export_over_its_checkpoint_or_a_file_of_its_run_is_refused(finished, capsys):
    before = snapshot(finished)
    for target in ("last.pt", "metrics.csv", "MODEL_CARD.md"):
        out = finished / target
        assert main(export_args(finished, "safetensors", out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err
    assert snapshot(finished) == before
    assert main(["train", "--resume", str(finished)]) == 0  # the checkpoint still resumes


def test_an_export_may_replace_the_file_its_out_names_but_not_a_card_of_the_users(finished, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_text("an older export")
    card = Path(f"{out}.MODEL_CARD.md")
    card.write_text("# my own notes\n")
    assert main(export_args(finished, "safetensors", out)) == 2
    assert "model.safetensors.MODEL_CARD.md exists and was not written by mnist-cnn" in capsys.readouterr().err
    assert out.read_text() == "an older export" and card.read_text() == "# my own notes\n"
    card.unlink()
    assert main(export_args(finished, "safetensors", out)) == 0
    assert out.read_bytes() != b"an older export" and written_by_us(card)
    assert main(export_args(finished, "safetensors", out)) == 0  # ours


def test_predict_never_writes_over_an_image_it_reads(finished, tmp_path, capsys):
    from PIL import Image

    images = []
    for name in ("a.png", "b.png"):
        Image.new("L", (28, 28), 0).save(tmp_path / name)
        images.append(tmp_path / name)
    before = images[1].read_bytes()
    assert main(["predict", str(finished / "last.pt"), *map(str, images), "--csv", str(images[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{images[1]} is one of this command's inputs" in err
    assert images[1].read_bytes() == before
    # --save-preprocessed into the images' own folder: the 000_a.png it would write is a user's file there
    (tmp_path / "000_a.png").write_bytes(before)
    assert main(["predict", str(finished / "last.pt"), str(images[0]), "--save-preprocessed", str(tmp_path)]) == 2
    assert "000_a.png exists and was not written by mnist-cnn" in capsys.readouterr().err
    assert (tmp_path / "000_a.png").read_bytes() == before


def test_compare_replaces_its_own_figure_but_not_a_users_unless_named(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frontier.png").write_bytes(b"the user's own picture")
    assert main(["compare", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "frontier.png exists and was not written by mnist-cnn; it is left alone; name it with --plot" in err
    assert (tmp_path / "frontier.png").read_bytes() == b"the user's own picture"
    assert main(["compare", str(finished), "--plot", "frontier.png"]) == 0  # named on purpose
    assert written_by_us(tmp_path / "frontier.png")
    assert main(["compare", str(finished)]) == 0  # the tool's own figure: replaced
    with pytest.raises(OutputError):
        refuse_foreign([finished / "last.pt"])  # a file of another kind is never taken for the tool's


# -- the resume hint is true -----------------------------------------------------------------------------------


def test_a_run_stopped_without_out_names_the_folder_that_resume_continues(data, tmp_path):
    proc = subprocess.Popen(
        cli(*train_args(data, None, 50)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: any(tmp_path.glob("runs/*/last.pt")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, err
    (folder,) = (tmp_path / "runs").iterdir()
    hint = f"resume with: mnist-cnn train --resume runs/{folder.name}"
    assert err.strip().endswith(hint), err
    assert not (folder / LOCK_FILE).exists()
    end = load_checkpoint(folder / "last.pt").epoch + 1  # the stopped epoch, then no more
    resumed = subprocess.run(
        cli("train", "--resume", f"runs/{folder.name}", "--no-progress", "--device", "cpu", "--epochs", str(end)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert resumed.returncode == 0 and load_checkpoint(folder / "last.pt").epoch == end


def test_a_resumed_run_records_where_it_ran_since(finished, data, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(finished, run)
    elsewhere = tmp_path / "data-now"
    shutil.copytree(data, elsewhere)
    ckpt = checkpoint_file(run / "last.pt")
    ckpt["config"]["epochs"] = 2  # one more epoch to go: a resume has work to do
    torch.save(ckpt, run / "last.pt")
    first = json.loads((run / "environment.json").read_text())
    assert main(["train", "--resume", str(run), "--data-dir", str(elsewhere)]) == 0
    assert f'data_dir = "{elsewhere.resolve()}"' in (run / "config.toml").read_text()
    env = json.loads((run / "environment.json").read_text())
    assert env["earlier"] == [first] and "earlier" not in first  # the first session kept, this one on top


# -- disks that are full or read-only --------------------------------------------------------------------------


def mounted(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not mounted(disk, "size=8m"):
        pytest.skip("mounting a tmpfs is not allowed here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_training_is_one_line_exit_3_with_the_last_checkpoint_intact(
    data, small_disk, monkeypatch, capsys
):
    out = small_disk / "run"
    real_end_epoch = RunDir.end_epoch

    def end_epoch_then_fill_the_disk(self, ckpt, best=False):
        real_end_epoch(self, ckpt, best)
        with open(small_disk / "filler", "wb") as f:  # what another program did meanwhile
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass

    monkeypatch.setattr(RunDir, "end_epoch", end_epoch_then_fill_the_disk)
    assert main(train_args(data, out, 3)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot write {out / 'last.pt'}: No space left on device" in err
    assert f"its last checkpoint, {out / 'last.pt'}, is intact; make room, then resume with: " in err
    assert load_checkpoint(out / "last.pt").epoch == 1
    assert not [p for p in out.iterdir() if p.suffix == ".tmp"]
    monkeypatch.setattr(RunDir, "end_epoch", real_end_epoch)
    (small_disk / "filler").unlink()
    assert main(["train", "--resume", str(out)]) == 0
    assert load_checkpoint(out / "last.pt").epoch == 3


def test_an_output_on_a_read_only_disk_or_a_folder_is_one_line(finished, data, tmp_path, capsys):
    ro = tmp_path / "ro"
    if not mounted(ro, "ro,size=1m"):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        for out, says in ((ro / "m.onnx", "Read-only file system"), (tmp_path, "it is a folder")):
            assert main(export_args(finished, "onnx", out)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"cannot write {out}" in err and says in err
        assert main(train_args(data, ro / "run")) == 2
        assert "cannot create run folder" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_crafted_lock_file_is_refused_and_nothing_it_points_to_is_written(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    for name, make in (
        ("link", lambda p: p.symlink_to(precious)),
        ("fifo", lambda p: os.mkfifo(p)),
        ("dir", lambda p: p.mkdir()),
    ):
        folder = tmp_path / name
        folder.mkdir()
        make(folder / LOCK_FILE)
        with pytest.raises(OutputError, match=f"cannot write into {folder}"):
            RunDir.create(folder)
    assert precious.read_text() == "keep me"


def test_compare_never_draws_over_a_file_of_the_runs_it_reads(finished, capsys):
    before = (finished / "last.pt").read_bytes()
    assert main(["compare", str(finished), "--plot", str(finished / "last.pt")]) == 2
    assert "is one of this command's inputs" in capsys.readouterr().err
    assert (finished / "last.pt").read_bytes() == before


def test_a_refused_folder_gets_no_lock_file_written_into_it(tmp_path, data, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    seen = []
    real = os.open

    def watching(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching)
    assert main(train_args(data, mine)) == 2
    monkeypatch.undo()
    assert not [p for p in seen if p.startswith(str(mine))]  # not even a lock file, for a moment
