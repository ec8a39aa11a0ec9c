"""Your own module, as it is: mnist_cnn.train(model=...) takes an nn.Module class, instance or factory
defined anywhere (a notebook cell included); the run folder records what it honestly can and holds no
code; load(path, model=Net) and the CLI's --model file.py:Class give the class back."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mnist_cnn
from mnist_cnn.checkpoint import load_checkpoint
from mnist_cnn.cli import main
from mnist_cnn.errors import CheckpointError, ConfigError
from mnist_cnn.networks.reference import SOURCE_COPY, locate

NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Linear(16, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).flatten(1))  # (B, 16) -> (B, classes) logits
    """
)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("code") / "my_net.py"
    path.write_text(NET_SOURCE)
    return path


@pytest.fixture(scope="module")
def Net(net_file):  # noqa: N802 (a class, as a notebook would name it)
    return locate(f"{net_file}:Net").cls


def cell_class(kept: bool):
    """A class as a notebook cell defines it: module __main__, no file inspect can read; kept=True: the
    cell's text in linecache under the name its code carries, as IPython keeps it."""
    import linecache

    name = f"/tmp/ipykernel_0/{id(NET_SOURCE)}-{kept}.py"  # IPython's kind of name for a cell
    if kept:
        lines = NET_SOURCE.splitlines(keepends=True)
        linecache.cache[name] = (len(NET_SOURCE), None, lines, name)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(NET_SOURCE, name, "exec"), namespace)  # noqa: S102 (a test's own source)
    return namespace["Net"]


def quick(synthetic_dir, out: Path, **extra) -> dict:
    return dict(
        data_dir=str(synthetic_dir), out=str(out), epochs=1, batch_size=32, device="cpu", progress=False, **extra
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model


def test_a_class_trains_seeded_and_the_folder_records_it_without_code(Net, synthetic_dir, tmp_path):
    runs = [
        mnist_cnn.train("seed", {"run.verify": False}, model=Net, **quick(synthetic_dir, tmp_path / name, seed=seed))
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    a, b, c = (weights(r.checkpoint) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the seed builds the class: the same weights twice
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed, other weights
    ckpt = load_checkpoint(runs[0].checkpoint)
    assert ckpt.config.model == f"object:{Net.__module__}.Net"
    record = ckpt.network
    assert record.given == "class" and record.parameters == sum(p.numel() for p in Net().parameters())
    source = (runs[0].run_dir / SOURCE_COPY).read_text()
    assert "class Net(nn.Module)" in source and len(record.sha256) == 64  # the class's source and its hash
    assert not any(runs[0].run_dir.glob("*.pkl")) and (runs[0].run_dir / "MODEL_CARD.md").is_file()
    assert "model=Net" in (runs[0].run_dir / "MODEL_CARD.md").read_text()  # the card says how to load it


def test_an_instance_is_trained_as_given_in_place(Net, synthetic_dir, tmp_path):
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.01)  # the caller's own initial weights, not the seed's
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = mnist_cnn.train("seed", {"run.verify": False}, model=net, **quick(synthetic_dir, tmp_path / "r"))
    assert load_checkpoint(run.checkpoint).network.given == "instance"
    trained = weights(run.checkpoint)
    assert all(torch.equal(trained[k], v) for k, v in net.state_dict().items())  # the object you hold trained
    assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    factory = mnist_cnn.train(
        "seed", {"run.verify": False}, model=lambda: Net(), **quick(synthetic_dir, tmp_path / "f")
    )
    assert load_checkpoint(factory.checkpoint).network.given == "factory"


def test_load_needs_the_class_and_says_which(Net, synthetic_dir, tmp_path):
    run = mnist_cnn.train("seed", {"run.verify": False}, model=Net, **quick(synthetic_dir, tmp_path / "r"))
    with pytest.raises(CheckpointError) as e:
        mnist_cnn.load(run.checkpoint)
    text = str(e.value)
    assert "\n" not in text and f"{Net.__module__}.Net" in text
    assert "mnist_cnn.load(path, model=Net)" in text and "--model path/to/file.py:Net" in text
    x = torch.rand(4, 1, 28, 28)
    expected = run.model(x)
    for given in (Net, Net()):  # the class, or an instance to load into
        assert torch.equal(mnist_cnn.load(run.checkpoint, model=given)(x), expected)  # bitwise: one layout
    with pytest.raises(CheckpointError, match="weights do not fit"):
        mnist_cnn.load(run.checkpoint, model="seed")  # another network: one line, not a traceback


def test_the_command_line_on_such_a_run(Net, net_file, synthetic_dir, tmp_path, capsys):
    run = mnist_cnn.train("seed", {"run.verify": False}, model=Net, **quick(synthetic_dir, tmp_path / "r"))
    ckpt = str(run.checkpoint)
    data = ["--data-dir", str(synthetic_dir), "--no-verify"]
    assert main(["evaluate", ckpt, *data, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model path/to/file.py:Net" in err
    assert main(["evaluate", ckpt, *data, "--json", "--model", f"{net_file}:Net"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(run.metrics[-1]["test_acc"], rel=5e-6)
    onnx = tmp_path / "net.onnx"
    assert main(["export", ckpt, "--format", "onnx", "--out", str(onnx), *data, "--model", f"{net_file}:Net"]) == 0
    rows = mnist_cnn.compare([run.run_dir], plot=None)  # sizes the run measured: no class needed
    assert rows[0]["network"] == "Net" and rows[0]["parameters"] == sum(p.numel() for p in Net().parameters())
    assert rows[0]["receptive_field"] is not None and rows[0]["macs"] > 0


def test_a_class_from_a_notebook_cell_and_train_seeds(synthetic_dir, tmp_path):
    Cell = cell_class(kept=False)  # noqa: N806
    out = tmp_path / "seeds"
    got = mnist_cnn.train_seeds("seed", "0-1", {"run.verify": False}, model=Cell, **quick(synthetic_dir, out))
    assert got.finished and len(got.results) == 2
    w0, w1 = weights(out / "seed-0" / "last.pt"), weights(out / "seed-1" / "last.pt")
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)  # each seed its own instance
    ckpt = load_checkpoint(out / "seed-0" / "last.pt")
    assert ckpt.config.model == "object:__main__.Net" and ckpt.network.sha256 is None
    assert not (out / "seed-0" / SOURCE_COPY).exists()  # inspect could not read a cell's class: nothing claimed
    assert mnist_cnn.check(Cell, max_params=20_000, require=["batchnorm", "gap", "fc"])[0].ok
    with pytest.raises(ConfigError, match="each seed builds its own"):
        mnist_cnn.train_seeds("seed", "0-1", model=Cell(), **quick(synthetic_dir, tmp_path / "x"))
    with pytest.raises(ConfigError, match="got int"):
        mnist_cnn.train("seed", model=3, **quick(synthetic_dir, tmp_path / "y"))
    assert isinstance(mnist_cnn.build(Cell), nn.Module)


def test_a_cells_class_source_is_recorded_where_the_kernel_keeps_it(synthetic_dir, tmp_path):
    Cell = cell_class(kept=True)  # noqa: N806
    run = mnist_cnn.train("seed", {"run.verify": False}, model=Cell, **quick(synthetic_dir, tmp_path / "r"))
    source = (run.run_dir / SOURCE_COPY).read_text()
    assert source.startswith("class Net(nn.Module):") and "def forward" in source and "import" not in source
    assert len(load_checkpoint(run.checkpoint).network.sha256) == 64


def test_the_notebook_way_of_readmes_quick_start(Net, synthetic_dir, tmp_path):
    """lr="auto" with your own class: the range test runs on a network built as the run's will be."""
    run = mnist_cnn.train("seed", {"run.verify": False}, model=Net, lr="auto", **quick(synthetic_dir, tmp_path / "r"))
    optim = load_checkpoint(run.checkpoint).config.optim
    assert optim.lr_found.startswith("steepest descent") and optim.lr == float(optim.lr_found.split()[8])
    model = mnist_cnn.load(run.checkpoint, model=Net)
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert len(mnist_cnn.predict(model, x)) == 5
