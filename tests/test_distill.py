"""Knowledge distillation (train --teacher): the loss, its gradient, what a run records, and refusals."""

import pytest
import torch
import torch.nn.functional as F

from conftest import checkpoint_file
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.config import DistillConfig, load_config
from mnist_cnn.training.distill import Teacher, distill_loss, file_sha256
from mnist_cnn.training.run import resume_run, train_run

QUICK = ["--device", "cpu", "--no-progress", "--no-verify", "--batch-size", "32", "--train-limit", "320"]


def train_cmd(data, out, *extra):
    return ["train", "--data-dir", str(data), "--out", str(out), "--epochs", "1", *QUICK, *extra]


def weights(run):
    return load_checkpoint(run / "last.pt").model


def test_kl_term_gradient_matches_its_closed_form():
    """d/dz of alpha T^2 KL(p || softmax(z / T)), batch mean, is alpha T (softmax(z / T) - p) / N;
    the input may be log-probabilities, whose softmax at T equals the logits'."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, generator=g, dtype=torch.float64)
    soft = F.softmax(torch.randn(5, 10, generator=g, dtype=torch.float64) / 3, dim=1)
    d = DistillConfig(temperature=3.0, alpha=0.7)
    z = F.log_softmax(logits, dim=1).requires_grad_(True)
    loss = distill_loss(z, torch.zeros((), dtype=torch.float64), soft, d)
    (grad,) = torch.autograd.grad(loss, z)
    expected = d.alpha * d.temperature * (F.softmax(logits / d.temperature, dim=1) - soft) / logits.shape[0]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: distill_loss(t, t.sum() * 0, soft, d), (z.detach().requires_grad_(),))


def test_kl_term_is_zero_when_the_student_matches_the_teacher():
    logits = torch.randn(4, 10, dtype=torch.float64)
    d = DistillConfig(temperature=2.0, alpha=1.0)
    soft = F.softmax(logits / 2.0, dim=1)
    assert distill_loss(logits, torch.tensor(5.0), soft, d).abs() < 1e-12  # alpha 1: the label loss drops out


def test_teachers_probabilities_are_averaged():
    a, b = torch.nn.Linear(784, 10), torch.nn.Linear(784, 10)
    flat = torch.nn.Flatten()
    ta, tb = torch.nn.Sequential(flat, a), torch.nn.Sequential(flat, b)
    x = torch.randn(6, 1, 28, 28)
    both = Teacher([ta, tb], 2.0, channels_last=False).probs(x, "fp32")
    one = [Teacher([t], 2.0, channels_last=False).probs(x, "fp32") for t in (ta, tb)]
    torch.testing.assert_close(both, (one[0] + one[1]) / 2)
    torch.testing.assert_close(both.sum(1), torch.ones(6))


def test_alpha_zero_at_temperature_one_trains_bitwise_as_without_teacher(synthetic_run, tmp_path):
    data, teacher = synthetic_run
    exact = ["--deterministic", "--seed", "3"]
    assert main(train_cmd(data, tmp_path / "plain", *exact)) == 0
    distil = ["--teacher", str(teacher), "--set", "distill.alpha=0.0", "--set", "distill.temperature=1.0"]
    assert main(train_cmd(data, tmp_path / "taught", *exact, *distil)) == 0
    plain, taught = weights(tmp_path / "plain"), weights(tmp_path / "taught")
    assert all(torch.equal(plain[k], taught[k]) for k in plain)
    # and the teacher does change training when it has weight
    assert main(train_cmd(data, tmp_path / "alpha", *exact, "--teacher", str(teacher))) == 0
    moved = weights(tmp_path / "alpha")
    assert max((moved[k].double() - plain[k].double()).abs().max().item() for k in plain) > 1e-3


def test_a_student_learns_from_the_teacher_alone(synthetic_run, tmp_path):
    """alpha = 1: the labels have no weight, so what the student learns came through the KL term."""
    data, teacher = synthetic_run
    cfg = load_config(
        "seed",
        {
            "epochs": 3,
            "batch_size": 32,
            "run.data_dir": str(data),
            "run.out": str(tmp_path / "s"),
            "run.device": "cpu",
            "run.progress": False,
            "run.verify": False,
            "distill.teachers": [str(teacher)],
            "distill.alpha": 1.0,
        },
    )
    rows = train_run(cfg).state.metrics
    teacher_acc = load_checkpoint(teacher / "last.pt").final["test_acc"]
    assert rows[-1]["test_acc"] >= min(0.8, teacher_acc - 0.05)


def test_the_run_records_its_teacher_and_resumes_with_it(synthetic_run, tmp_path):
    data, teacher = synthetic_run
    common = {
        "epochs": 2,
        "batch_size": 32,
        "run.train_limit": 320,
        "run.data_dir": str(data),
        "run.device": "cpu",
        "run.progress": False,
        "run.verify": False,
        "run.deterministic": True,
        "distill.teachers": [str(teacher)],
    }
    whole = train_run(load_config("seed", {**common, "run.out": str(tmp_path / "whole")}))
    cut = load_config("seed", {**common, "run.out": str(tmp_path / "cut")})
    assert train_run(cut, on_epoch=lambda row: False).state.epoch == 1  # stopped after epoch 1 of 2
    stored = load_checkpoint(tmp_path / "cut" / "last.pt").config.distill
    assert stored.teachers == [str((teacher / "last.pt").resolve())]
    assert stored.sha256 == [file_sha256(teacher / "last.pt")]
    assert 'teachers = ["' in (tmp_path / "cut" / "config.toml").read_text()
    assert resume_run(tmp_path / "cut") == 0
    resumed = weights(tmp_path / "cut")
    assert all(torch.equal(resumed[k], whole.state.model.state_dict()[k]) for k in resumed)


def test_a_changed_teacher_stops_the_resume(synthetic_run, tmp_path, capsys):
    data, teacher = synthetic_run
    mine = tmp_path / "teacher.pt"
    mine.write_bytes((teacher / "last.pt").read_bytes())
    out = tmp_path / "s"
    cfg = load_config(
        "seed",
        {
            "epochs": 2,
            "batch_size": 32,
            "run.train_limit": 320,
            "run.data_dir": str(data),
            "run.out": str(out),
            "run.device": "cpu",
            "run.progress": False,
            "run.verify": False,
            "distill.teachers": [str(mine)],
        },
    )
    train_run(cfg, on_epoch=lambda row: False)
    ckpt = checkpoint_file(mine)
    ckpt["metrics"][-1]["test_acc"] = 0.5  # another file now
    torch.save(ckpt, mine)
    assert main(["train", "--resume", str(out)]) == 2
    assert "changed since this run started" in capsys.readouterr().err


@pytest.mark.parametrize("together", ["yes", "no"])
def test_seeds_share_the_teacher(synthetic_run, tmp_path, monkeypatch, together):
    data, teacher = synthetic_run
    calls = []
    probs = Teacher.probs
    monkeypatch.setattr(Teacher, "probs", lambda self, x, p: calls.append(x.shape[0]) or probs(self, x, p))
    cmd = train_cmd(data, tmp_path / "s", "--teacher", str(teacher), "--seeds", "0-1", "--together", together)
    assert main(cmd) == 0
    steps = 10  # 320 images at batch 32
    # stacked: one teacher forward per step for both seeds' batches; alone: one per seed per step
    assert calls == ([64] * steps if together == "yes" else [32] * 2 * steps)
    for seed in (0, 1):
        stored = load_checkpoint(tmp_path / "s" / f"seed-{seed}" / "last.pt").config.distill
        assert stored.sha256 == [file_sha256(teacher / "last.pt")]


def test_a_teacher_of_another_data_set_is_refused(synthetic_run, tmp_path, capsys):
    data, teacher = synthetic_run
    ckpt = checkpoint_file(teacher / "last.pt")
    ckpt["config"]["dataset"] = "fashion-mnist"
    torch.save(ckpt, tmp_path / "fashion.pt")
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(tmp_path / "fashion.pt"))) == 2
    err = capsys.readouterr().err
    assert "was trained on fashion-mnist (10 classes); this run trains on mnist" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "teacher, message",
    [("missing", "no such run folder or model file"), ("notes.txt", "not a readable checkpoint")],
)
def test_a_teacher_that_is_not_a_model_is_refused(synthetic_run, tmp_path, capsys, teacher, message):
    data, _ = synthetic_run
    (tmp_path / "notes.txt").write_text("hello")
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(tmp_path / teacher))) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_an_unfinished_teacher_is_refused(synthetic_run, tmp_path, capsys):
    data, teacher = synthetic_run
    ckpt = checkpoint_file(teacher / "last.pt")
    ckpt["epoch"] = 1  # of 2
    torch.save(ckpt, tmp_path / "half.pt")
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(tmp_path / "half.pt"))) == 2
    assert "stopped after epoch 1 of 2: finish it first" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("distill.temperature", "0"), ("distill.alpha", "1.5")])
def test_bad_distill_settings_are_config_errors(synthetic_run, tmp_path, capsys, key, value):
    data, teacher = synthetic_run
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(teacher), "--set", f"{key}={value}")) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_teachers_run_in_the_students_precision():
    """bf16 autocast around the teacher when the student trains in bf16: close to fp32, not equal to it."""
    from mnist_cnn.networks.builtin import build_model

    torch.manual_seed(0)
    teacher = Teacher([build_model("seed")], 4.0, channels_last=False)
    x = torch.randn(16, 1, 28, 28)
    fp32, bf16 = teacher.probs(x, "fp32"), teacher.probs(x, "bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.02, rtol=0)


def test_a_folder_without_last_pt_and_a_network_from_a_python_file_are_refused(synthetic_run, tmp_path, capsys):
    data, _ = synthetic_run
    (tmp_path / "seeds" / "seed-0").mkdir(parents=True)
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(tmp_path / "seeds"))) == 2
    assert "holds no last.pt (a --seeds folder? name one of its seed-N/)" in capsys.readouterr().err
    net = tmp_path / "my_net.py"
    net.write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n        super().__init__()\n"
        "        self.f = nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n\n"
        "    def forward(self, x):\n        return self.f(x)\n"
    )
    assert main(train_cmd(data, tmp_path / "mine", "--model", f"{net}:Net")) == 0
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(tmp_path / "mine"))) == 2
    err = capsys.readouterr().err
    assert "its network is defined in a Python file; teachers are built-in networks only" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_safetensors_export_can_teach(synthetic_run, tmp_path):
    data, teacher = synthetic_run
    export = tmp_path / "teacher.safetensors"
    assert (
        main(["export", str(teacher / "last.pt"), "--format", "safetensors", "--out", str(export), "--no-verify"]) == 0
    )
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(export))) == 0
    stored = load_checkpoint(tmp_path / "s" / "last.pt").config.distill
    assert stored.teachers == [str(export.resolve())] and stored.sha256 == [file_sha256(export)]


def test_a_teacher_that_saw_the_validation_split_is_refused(synthetic_run, tmp_path, capsys):
    """Validation scores of a student whose teacher trained on the validation images would be flattered."""
    data, teacher = synthetic_run  # trained on every training image
    assert main(train_cmd(data, tmp_path / "s", "--teacher", str(teacher), "--set", "val_size=100")) == 2
    assert "trained on images of this run's validation split (its val_size 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_python_api_takes_one_teacher_or_several():
    from pathlib import Path

    from mnist_cnn.api import config_of

    assert config_of("seed", None, {"teacher": Path("runs/t")}).distill.teachers == ["runs/t"]
    assert config_of("seed", None, {"teacher": ["a", Path("b")]}).distill.teachers == ["a", "b"]
