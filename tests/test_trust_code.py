"""Code that comes with a run folder runs only when the user says so (--trust-code, trust_code=True).

The network file here writes a line to a marker file when it is imported, so each test can
show that a refused load ran none of it, and that a trusted one did.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, synthetic_digits, write_synthetic
from mnist_cnn import api
from mnist_cnn.cli import main
from mnist_cnn.errors import CheckpointError
from mnist_cnn.networks.reference import SOURCE_COPY

FAST = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--no-verify", "--no-progress"]


class UserRun:
    def __init__(self, root: Path, base: Path):
        self.root = root
        self.base = base.resolve()  # every test's tmp_path is under it
        self.data = root / "mnist"
        self.source = root / "nets" / "my_net.py"  # where the user keeps it
        self.marker = root / "imported.txt"  # one line per import of the network's file
        self.run = root / "run"
        self.ckpt = self.run / "last.pt"
        self.image = root / "digit.png"

    def sha(self, path: Path | None = None) -> str:
        return hashlib.sha256((path or self.source).read_bytes()).hexdigest()

    def executed(self) -> list[str]:
        return self.marker.read_text().splitlines() if self.marker.exists() else []

    def reset(self) -> None:
        """No marker, and no module left imported from this test module's files: a load that
        imports one again would run it again, and show in the marker."""
        self.marker.unlink(missing_ok=True)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(self.base):
                del sys.modules[name]


def network_file(marker: Path) -> str:
    """examples/gap_net.py, announcing its import in `marker`."""
    return f'open({str(marker)!r}, "a").write(__file__ + "\\n")\n' + (REPO / "examples" / "gap_net.py").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> UserRun:
    """One epoch of the example user network on synthetic data, trained the way a user does."""
    u = UserRun(tmp_path_factory.mktemp("trust"), tmp_path_factory.getbasetemp())
    write_synthetic(u.data)
    u.source.parent.mkdir()
    u.source.write_text(network_file(u.marker))
    assert main(["train", "--data-dir", str(u.data), "--out", str(u.run), "--model", f"{u.source}:GapNet", *FAST]) == 0
    assert u.executed() == [str(u.source.resolve())]  # --model the user names runs without any flag
    from PIL import Image

    Image.fromarray(synthetic_digits(1, seed=3)[0][0]).save(u.image)
    return u


@pytest.fixture
def user(trained) -> UserRun:
    trained.reset()
    return trained


def refusal(capsys, user: UserRun, file: Path) -> str:
    """The one-line error of a refused load, checked to name the file, its SHA-256, the class and
    the flag; and that the file did not run."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"class GapNet from {file} (SHA-256 {user.sha(file)[:12]}...)" in err
    assert "pass --trust-code" in err
    assert user.executed() == []
    return err


def test_evaluate_runs_a_run_folders_network_only_with_trust_code(user, tmp_path, capsys):
    out = tmp_path / "ev"
    cmd = ["evaluate", str(user.ckpt), "--data-dir", str(user.data), "--no-verify", "--json", "--out", str(out)]
    capsys.readouterr()
    assert main(cmd) == 2
    assert refusal(capsys, user, user.source.resolve()).startswith(f"error: {user.ckpt}: loading it runs Python code")
    assert not out.exists()
    assert main([*cmd, "--trust-code"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert user.executed() == [str(user.source.resolve())]


def test_predict_runs_a_run_folders_network_only_with_trust_code(user, tmp_path, capsys):
    csv = tmp_path / "answers.csv"
    cmd = ["predict", str(user.ckpt), str(user.image), "--json", "--csv", str(csv)]
    capsys.readouterr()
    assert main(cmd) == 2
    refusal(capsys, user, user.source.resolve())
    assert not csv.exists()
    assert main([*cmd, "--trust-code"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)[0]["digit"] <= 9
    assert user.executed() == [str(user.source.resolve())]


def test_export_and_its_safetensors_file_run_the_network_only_with_trust_code(user, tmp_path, capsys):
    """A .safetensors export holds weights and config, and is rebuilt with the network's file:
    loading it is gated the same way."""
    exported = tmp_path / "gap.safetensors"
    cmd = [
        "export",
        str(user.ckpt),
        "--format",
        "safetensors",
        "--out",
        str(exported),
        "--data-dir",
        str(user.data),
        "--no-verify",
        "--json",
    ]
    capsys.readouterr()
    assert main(cmd) == 2
    refusal(capsys, user, user.source.resolve())
    assert not exported.exists() and list(tmp_path.iterdir()) == []
    assert main([*cmd, "--trust-code"]) == 0
    assert json.loads(capsys.readouterr().out)["argmax_equal"]
    user.reset()
    assert main(["predict", str(exported), str(user.image)]) == 2
    assert refusal(capsys, user, user.source.resolve()).startswith(f"error: {exported}: loading it runs")
    assert main(["predict", str(exported), str(user.image), "--trust-code", "--json"]) == 0
    assert user.executed() == [str(user.source.resolve())]


def test_serve_loads_a_run_folders_network_only_with_trust_code(user, monkeypatch, capsys):
    from mnist_cnn.serving import app as server

    started = []
    monkeypatch.setattr(server, "serve", lambda app, host, port, banner, *rest, **kw: started.append(banner))
    capsys.readouterr()
    assert main(["serve", str(user.ckpt), "--port", "0"]) == 2
    refusal(capsys, user, user.source.resolve())
    assert started == []
    assert main(["serve", str(user.ckpt), "--port", "0", "--trust-code"]) == 0
    assert len(started) == 1 and "6,114 parameters" in started[0]
    assert user.executed() == [str(user.source.resolve())]


def test_the_python_api_loads_a_user_network_only_with_trust_code(user):
    digit = synthetic_digits(1, seed=3)[0][0].astype("float32") / 255
    calls = [
        lambda **kw: api.load(user.ckpt, **kw),
        lambda **kw: api.evaluate(user.ckpt, data_dir=user.data, verify=False, **kw),
        lambda **kw: api.predict(user.ckpt, [digit], **kw),
    ]
    for call in calls:
        with pytest.raises(CheckpointError, match=r"class GapNet from .*my_net\.py \(SHA-256 .*trust_code=True"):
            call()
    assert user.executed() == []
    model = api.load(user.ckpt, trust_code=True)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert api.evaluate(user.ckpt, data_dir=user.data, verify=False, trust_code=True)["n"] == 200
    assert 0 <= api.predict(user.ckpt, [digit], trust_code=True)[0]["digit"] <= 9
    assert user.executed() == [str(user.source.resolve())]  # imported once, then reused


def test_the_run_folders_copy_is_what_would_run_when_the_source_has_gone(user, tmp_path, capsys):
    """A run folder from someone else: their path does not exist here, so the copy
    (network_source.py) inside the folder would run. It is named, and it does not run."""
    received = tmp_path / "received"
    shutil.copytree(user.run, received)
    copy = received / SOURCE_COPY
    moved = user.source.with_suffix(".away")
    user.source.rename(moved)
    try:
        cmd = ["predict", str(received / "last.pt"), str(user.image), "--json"]
        capsys.readouterr()
        assert main(cmd) == 2
        refusal(capsys, user, copy)
        assert main([*cmd, "--trust-code"]) == 0
        assert f"is not there any more: using the copy {copy}" in capsys.readouterr().err
        assert user.executed() == [str(copy)]
    finally:
        moved.rename(user.source)


def test_a_module_reference_is_found_without_running_its_package(user, tmp_path, monkeypatch, capsys):
    """package.module:Class: finding the file must not import the package (its __init__.py) either."""
    package = tmp_path / "trustpkg"
    package.mkdir()
    (package / "__init__.py").write_text(f'open({str(user.marker)!r}, "a").write("package\\n")\n')
    (package / "nets.py").write_text(user.source.read_text())
    ckpt = torch.load(user.ckpt, weights_only=True)
    ckpt["config"]["model"] = "trustpkg.nets:GapNet"
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "last.pt")
    monkeypatch.chdir(tmp_path)
    cmd = ["predict", str(run / "last.pt"), str(user.image), "--json"]
    capsys.readouterr()
    assert main(cmd) == 2
    refusal(capsys, user, package / "nets.py")
    assert main([*cmd, "--trust-code"]) == 0
    assert user.executed() == [str(package / "nets.py")]  # the module's file alone, as in training


def test_resume_runs_the_run_folders_network_only_with_trust_code(user, tmp_path, capsys):
    """--resume takes no --model: the run folder names the code, so it needs --trust-code too."""
    run = tmp_path / "run"
    shutil.copytree(user.run, run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["config"]["epochs"] = 2  # one more epoch to go
    torch.save(ckpt, run / "last.pt")
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    refusal(capsys, user, user.source.resolve())
    assert (run / "last.pt").read_bytes() == before
    assert main(["train", "--resume", str(run), "--no-progress", "--trust-code"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert user.executed() == [str(user.source.resolve())]
    assert main(["train", "--trust-code", "--epochs", "1"]) == 2
    assert "--trust-code goes with --resume" in capsys.readouterr().err
