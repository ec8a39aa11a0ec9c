"""Your own network: train, check and inspect any compact CNN; load it back from the run folder."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import EXACT_TOL, REPO, sigterm_at_the_next_evaluation, synthetic_digits, training_setup
from mnist_cnn.cli import main
from mnist_cnn.config import load_config
from mnist_cnn.networks.builtin import GlobalAvgPool, SeedNet, build_model
from mnist_cnn.networks.reference import SOURCE_COPY
from mnist_cnn.networks.summary import describe
from mnist_cnn.training.loop import fit_one

EXAMPLE = REPO / "examples" / "gap_net.py"
FAST = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-verify", "--no-progress"]


def train(data: Path, out: Path, model: str, *extra: str) -> int:
    return main(["train", "--data-dir", str(data), "--out", str(out), "--model", model, *FAST, *extra])


@pytest.fixture
def user_run(synthetic_dir, tmp_path) -> tuple[Path, Path]:
    """(run folder, the network file it was trained from): examples/gap_net.py copied to tmp."""
    source = tmp_path / "src" / "my_net.py"
    source.parent.mkdir()
    shutil.copy(EXAMPLE, source)
    out = tmp_path / "run"
    assert train(synthetic_dir, out, f"{source}:GapNet") == 0
    return out, source


NOT_AN_OBJECT = ("given", "parameters", "macs", "receptive_field")  # recorded for a network given as a Python object


def test_a_user_network_trains_and_its_run_folder_keeps_its_source(user_run):
    out, source = user_run
    assert (out / SOURCE_COPY).read_bytes() == source.read_bytes()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    import hashlib

    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    assert ckpt["network"] == {"num_classes": 10, "sha256": sha256} | dict.fromkeys(NOT_AN_OBJECT, None)
    assert ckpt["config"]["model"] == f"{source.resolve()}:GapNet"  # absolute: resolves from anywhere
    assert "Total params: 6,114" in (out / "summary.txt").read_text()
    assert not any(isinstance(v, (bytes, str)) and "class GapNet" in v for v in ckpt.values())  # no code inside
    card = (out / "MODEL_CARD.md").read_text()  # its commands ask for trust; its metadata names no local path
    assert "predict " + str(out / "last.pt") + " my_digit.png --trust-code" in card and "trust_code=True)" in card
    header = card.split("\n---\n", 1)[0]
    assert '"GapNet"' in header and str(source.parent) not in header and "# GapNet-mnist-run" in card


def test_the_run_folder_copy_serves_every_command_after_the_source_moved(
    user_run, synthetic_dir, tmp_path, monkeypatch, capsys
):
    out, source = user_run
    source.rename(tmp_path / "moved.py")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    flags = ["--data-dir", str(synthetic_dir), "--no-verify", "--trust-code"]  # the run's own code: ours
    assert main(["evaluate", str(out / "last.pt"), "--json", "--out", "ev", *flags]) == 0
    captured = capsys.readouterr()
    accuracy = json.loads(captured.out)["accuracy"]
    final = float((out / "metrics.csv").read_text().splitlines()[-1].split(",")[5])
    assert accuracy == pytest.approx(final, abs=1e-6)
    assert f"WARNING: {source} is not there any more: using the copy {out / SOURCE_COPY}" in captured.err
    for fmt in ("onnx", "torchscript", "safetensors"):
        assert main(["export", str(out / "last.pt"), "--format", fmt, "--out", f"m.{fmt}", "--json", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["argmax_equal"] and report["max_abs_diff"] <= 1e-4 and report["n"] == 200
    from PIL import Image

    Image.fromarray(synthetic_digits(1, seed=3)[0][0]).save("digit.png")
    assert main(["predict", str(out / "last.pt"), "digit.png", "--json", "--trust-code"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    # the trained weights in the network the example file defines, loaded without the run folder's copy
    import mnist_cnn

    (expected,) = mnist_cnn.predict(out / "last.pt", ["digit.png"], model=f"{EXAMPLE}:GapNet")
    assert answer == expected


def test_a_changed_source_is_a_warning_and_a_missing_one_an_error(user_run, synthetic_dir, capsys):
    out, source = user_run
    source.write_text(source.read_text() + "\n# edited after training\n")
    flags = ["--data-dir", str(synthetic_dir), "--no-verify", "--json", "--out", str(out.parent / "ev"), "--trust-code"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "last.pt"), *flags]) == 0
    assert f"WARNING: {source} changed since this model was trained" in capsys.readouterr().err
    source.unlink()
    (out / SOURCE_COPY).unlink()
    capsys.readouterr()
    assert main(["evaluate", str(out / "last.pt"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"not found (looked in {source} and {out / SOURCE_COPY})" in err


def test_seeds_of_a_user_network_resume_a_stopped_seed_and_reuse_finished_ones(
    synthetic_dir, tmp_path, monkeypatch, capsys
):
    """A SIGTERM during seed 0's first evaluation stops the command after that epoch; the same command
    then resumes seed 0 from its checkpoint (its first row kept as it was, seconds included: not
    retrained) and trains seed 1; once more, and both finished folders are reused, not refused."""
    source = tmp_path / "my_net.py"
    shutil.copy(EXAMPLE, source)
    sigterm_at_the_next_evaluation(monkeypatch)
    out = tmp_path / "seeds"
    cmd = ["train", "--seeds", "0-1", "--data-dir", str(synthetic_dir), "--out", str(out)]
    cmd += ["--model", f"{source}:GapNet", "--epochs", "2", "--train-limit", "160", *FAST[2:]]
    assert main(cmd) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after epoch 1" in capsys.readouterr().err
    stopped = torch.load(out / "seed-0" / "last.pt", weights_only=True)
    assert stopped["epoch"] == 1 and not (out / "seed-1").exists()
    assert main(cmd) == 0
    assert f"resuming {out / 'seed-0'} after epoch 1" in capsys.readouterr().out
    for seed in (0, 1):
        ckpt = torch.load(out / f"seed-{seed}" / "last.pt", weights_only=True)
        assert [r["epoch"] for r in ckpt["metrics"]] == [1, 2]
        assert (out / f"seed-{seed}" / SOURCE_COPY).read_bytes() == EXAMPLE.read_bytes()
        if seed == 0:
            assert ckpt["metrics"][0] == stopped["metrics"][0]
    written = [(out / f"seed-{seed}" / "last.pt").stat().st_mtime_ns for seed in (0, 1)]
    assert main(cmd) == 0
    assert [(out / f"seed-{seed}" / "last.pt").stat().st_mtime_ns for seed in (0, 1)] == written
    assert "2 seeds of recipe seed" in capsys.readouterr().out


BROKEN = """
import torch
from torch import nn

class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 12)
    def forward(self, x):
        return self.fc(x.flatten(1))

class Crashes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
    def forward(self, x):
        return self.fc(x)

class NoParameters(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]
"""


@pytest.mark.parametrize(
    "cls, message",
    [
        ("WrongShape", "returned (2, 12) for a batch of shape (2, 1, 28, 28); expected (2, 10)"),
        ("Crashes", "fails on a test batch of shape (2, 1, 28, 28): RuntimeError: mat1 and mat2"),
        ("NoParameters", "has no trainable parameters"),
        ("Missing", "has no nn.Module class 'Missing'"),
    ],
)
def test_a_broken_network_is_refused_before_the_run_folder_exists(synthetic_dir, tmp_path, capsys, cls, message):
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    out = tmp_path / "run"
    assert train(synthetic_dir, out, f"{path}:{cls}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_network_that_does_not_import_is_one_line(synthetic_dir, tmp_path, capsys):
    path = tmp_path / "typo.py"
    path.write_text("import torch\nclass Net(torch.nn.Module:\n    pass\n")
    assert train(synthetic_dir, tmp_path / "run", f"{path}:Net") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import it: SyntaxError" in err


class Logits(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = build_model("tiny", num_classes)

    def forward(self, x):
        return self.net(x)


class LogProbs(Logits):
    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=1)


@pytest.mark.numerics
def test_logits_and_log_probabilities_train_the_same(synthetic_dir, float64):
    """In float64 the two conventions end an epoch equal to ~1e-12 (measured max 3e-16 on an AVX2
    AMD EPYC); in fp32 the same run differs by ~3e-4 on AVX2 kernels and ~1e-6 on AVX-512 ones. A real
    difference (log_softmax applied twice with another result, a lost gradient) moves weights by >1e-3."""
    results = []
    for cls in ("Logits", "LogProbs"):
        # SGD, not Adam: Adam divides by sqrt(v) and magnifies the last-bit differences of two
        # mathematically equal graphs on near-zero gradients past any useful tolerance
        cfg = load_config(
            "seed",
            {
                "model": f"{Path(__file__)}:{cls}",
                "epochs": 1,
                "batch_size": 50,
                "optim.name": "sgd",
                "optim.lr": 0.05,
                "run.precision": "fp32",
                "run.deterministic": True,
            },
        )
        data, state = training_setup(synthetic_dir, cfg)
        rows = list(fit_one(state, data, cfg))
        results.append((state.model.state_dict(), rows[0]))
    (wa, ra), (wb, rb) = results
    assert wa["net.features.0.0.weight"].dtype == torch.float64
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=EXACT_TOL, rtol=0), key
    assert ra["test_acc"] == rb["test_acc"] and ra["train_loss"] == pytest.approx(rb["train_loss"], rel=EXACT_TOL)


def test_model_args_from_a_recipe_and_from_the_command_line(synthetic_dir, tmp_path, capsys):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(f'model = "{EXAMPLE}:GapNet"\nepochs = 1\n\n[model_args]\nwidth = 8\n')
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(recipe),
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(out),
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--no-verify",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "Total params: 1,622" in (out / "summary.txt").read_text()
    assert load_config(str(out / "config.toml")).model_args == {"width": 8}
    assert (
        main(
            [
                "train",
                "--recipe",
                str(recipe),
                "--set",
                "model_args.width=12",
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(tmp_path / "run12"),
                *FAST[2:],
            ]
        )
        == 0
    )
    assert load_config(str(tmp_path / "run12" / "config.toml")).model_args == {"width": 12}
    assert (
        main(
            [
                "train",
                "--recipe",
                str(recipe),
                "--set",
                "model_args.depth=3",
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(tmp_path / "bad"),
                *FAST[2:],
            ]
        )
        == 2
    )
    assert "unexpected keyword argument 'depth'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_module_reference_resolves_from_the_current_folder(synthetic_dir, tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, package / "nets.py")
    monkeypatch.chdir(tmp_path)
    assert train(synthetic_dir, tmp_path / "run", "mypkg.nets:GapNet") == 0
    assert (tmp_path / "run" / SOURCE_COPY).read_bytes() == EXAMPLE.read_bytes()


# --- check and summary ----------------------------------------------------------------------


def test_check_passes_the_seed_and_says_which_check_fails(capsys):
    assert main(["check", "--model", "seed", "--max-params", "20000", "--require", "batchnorm,dropout,fc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["parameters", "16,426", "<=", "20,000", "ok"]
    assert out[-1] == "seed: all checks passed"
    assert main(["check", "--model", "seed", "--max-params", "10000", "--require", "batchnorm,dropout,fc"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["parameters", "16,426", ">", "10,000", "FAILED"]
    assert out[-1] == "seed: failed: parameters"


def test_check_on_the_example_network(capsys):
    model = f"{EXAMPLE}:GapNet"
    assert (
        main(["check", "--model", model, "--max-params", "8000", "--require", "batchnorm,dropout,gap", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["parameters", "batchnorm", "dropout", "gap"]
    assert main(["check", "--model", model, "--max-params", "5000", "--require", "fc"]) == 1
    out = capsys.readouterr().out
    assert "6,114 > 5,000" in out and "0 Linear layers" in out and "failed: parameters, fc" in out
    assert main(["check", "--model", model, "--require", "pooling"]) == 2
    assert "--require 'pooling': choose from batchnorm, dropout, fc, gap" in capsys.readouterr().err


def kernel_stride_arithmetic(model: nn.Module) -> list[tuple[int, int]]:
    """(receptive field, jump) after each conv/pool of a plain sequential CNN:
    r += (k - 1) * j, then j *= s."""
    r, j, out = 1, 1, []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            r, j = r + (k - 1) * j, j * s
            out.append((r, j))
    return out


def test_summary_json_receptive_fields_equal_the_hand_arithmetic_for_the_seed(capsys):
    assert main(["summary", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    measured = [(row["rf"], row["jump"]) for row in report["layers"] if row["type"] in ("Conv2d", "MaxPool2d")]
    expected = kernel_stride_arithmetic(build_model("seed"))
    assert measured == expected
    assert expected[-1] == (32, 4)  # the last conv sees 32 x 32: more than the 28 x 28 image
    assert report["params"] == 16_426 and report["rf_last_feature_map"] == 32
    assert report["rf_output_in_image"] == 28
    conv1 = report["layers"][0]
    assert conv1["output"] == [16, 26, 26] and conv1["params"] == 160 and conv1["macs"] == 16 * 26 * 26 * 9


def test_receptive_field_follows_a_forward_that_is_not_a_sequence():
    """Two branches of different depth, added: the field is the larger one's, which kernel
    arithmetic over the module list would get wrong (it would add both)."""

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.deep = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
            self.wide = nn.Conv2d(1, 4, 7, padding=3)
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head((self.deep(x) + self.wide(x)).mean(dim=(2, 3)))

    rows = {r["layer"]: r for r in describe(TwoBranches())}
    assert rows["deep.0"]["rf"] == 3 and rows["deep.1"]["rf"] == 5 and rows["wide"]["rf"] == 7
    assert rows["(output)"]["rf_in_image"] == 28


def test_summary_and_check_build_the_network_for_a_data_sets_classes(capsys):
    assert main(["summary", "--dataset", "emnist-letters", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"][-1]["output"] == [26]
    assert report["params"] == 16_426 + 16 * (40 + 1)  # 16 more classes: 40 weights and a bias each
    assert main(["check", "--model", f"{EXAMPLE}:GapNet", "--dataset", "emnist-letters", "--require", "gap"]) == 0


# --- --require gap and fc mean what they say (issue 34) ----------------------------------------------------------

HEADS = '''
import torch
import torch.nn.functional as F
from torch import nn


def body():  # (N, 8, 24, 24)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())


class AdaptiveAvg(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(body(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.net(x)


class WholeMapAvgPool(AdaptiveAvg):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net[1] = nn.AvgPool2d(24)  # (N, 8, 1, 1)


class FunctionalMean(nn.Module):
    """x.mean over the spatial dims in forward, after a functional ReLU that no module hook sees."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean(dim=(-2, -1)))


class AdaptiveMax(AdaptiveAvg):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net[1] = nn.AdaptiveMaxPool2d(1)


class WholeMapMaxPool(AdaptiveAvg):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net[1] = nn.MaxPool2d(24)


class AvgTo2x2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(body(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


class GatedConvHead(nn.Module):
    """A Linear inside a block (squeeze-and-excitation gating), a 1x1 conv and a max pool as the classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body, self.gate = body(), nn.Linear(8, 8)
        self.classify, self.pool = nn.Conv2d(8, num_classes, 1), nn.MaxPool2d(24)

    def forward(self, x):
        y = self.body(x)
        y = y * torch.sigmoid(self.gate(y.mean(dim=(2, 3))))[:, :, None, None]
        return self.pool(self.classify(y)).flatten(1)


class PooledConvHead(nn.Module):
    """Global average pooling, then a 1x1 convolution as the classifier: gap, and no Linear at all."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(body(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, num_classes, 1), nn.Flatten())

    def forward(self, x):
        return self.net(x)
'''


@pytest.mark.parametrize(
    "model, gap, fc",
    [
        ("{heads}:AdaptiveAvg", True, True),
        ("{heads}:WholeMapAvgPool", True, True),
        ("{heads}:FunctionalMean", True, True),
        ("{heads}:AdaptiveMax", False, True),  # passed gap before: AdaptiveMaxPool2d counted as an average
        ("{heads}:WholeMapMaxPool", False, True),  # passed gap before: any parameter-free layer to one value a channel
        ("{heads}:AvgTo2x2", False, True),  # passed gap before: any AdaptiveAvgPool2d, whatever its output size
        ("{heads}:GatedConvHead", False, False),  # passed fc before: any Linear anywhere
        ("{heads}:PooledConvHead", True, False),
        ("{example}:GapNet", True, False),
        ("seed", False, True),
        ("tiny", True, True),
        ("family --arg head=fc", False, True),
    ],
)
def test_check_gap_and_fc_mean_global_average_pooling_and_a_linear_head(tmp_path, capsys, model, gap, fc):
    heads = tmp_path / "heads.py"
    heads.write_text(HEADS)
    name, *args = model.format(heads=heads, example=EXAMPLE).split()
    assert main(["check", "--model", name, *args, "--require", "gap,fc", "--json"]) == (0 if gap and fc else 1)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert (checks["gap"]["ok"], checks["fc"]["ok"]) == (gap, fc), checks


def test_check_details_say_what_was_found_and_where():
    from mnist_cnn.networks.summary import run_checks

    seed = {c.name: c.detail for c in run_checks(build_model("seed"), None, ["fc", "gap"])}
    assert seed == {
        "fc": "2 Linear layers at the head (64->40, 40->10)",
        "gap": "global average pooling not found: the last feature map (16x2x2) is not averaged to 1x1",
    }
    namespace: dict = {}
    exec(compile(HEADS, "heads.py", "exec"), namespace)
    gated = {c.name: c.detail for c in run_checks(namespace["GatedConvHead"](), None, ["fc"])}
    assert gated == {"fc": "0 Linear layers at the head; 1 before the last feature map (8->8)"}


class SeedPooled(nn.Module):
    """The seed network's features, then a global average pool written one of three ways, then a Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.features, self.how = SeedNet().features, how  # (N, 16, 2, 2)
        if how == "adaptive":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        elif how == "module":
            self.pool = GlobalAvgPool()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.features(x)
        return self.fc(y.mean((2, 3)) if self.how == "mean" else self.pool(y))  # (N, 16) -> (N, 10)


@pytest.mark.parametrize("how", ["adaptive", "module", "mean"])
def test_gap_is_found_however_it_is_written_and_the_seed_has_none(how):
    """--require gap traces the ops of one forward: nn.AdaptiveAvgPool2d(1), the project's own GlobalAvgPool
    and x.mean((2, 3)) in forward all average the seed's last 16x2x2 map; the seed itself (Flatten into two
    Linear layers) does not."""
    from mnist_cnn.networks.summary import head_of, run_checks

    seed = head_of(build_model("seed"))
    assert (seed.pooled, seed.last_map, seed.linear) == (None, "16x2x2", [(64, 40), (40, 10)])
    assert [c.ok for c in run_checks(build_model("seed"), None, ["gap"])] == [False]
    pooled = SeedPooled(how)
    head = head_of(pooled)
    assert (head.pooled, head.last_map, head.linear) == ("16x2x2", "16x2x2", [(16, 10)])
    (check,) = run_checks(pooled, None, ["gap"])
    assert check.ok and check.detail == "global average pooling found"
