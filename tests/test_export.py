"""Exports check themselves against torch; evaluate's report is self-consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import real_mnist_dir
from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.cli import main
from mnist_cnn.data.splits import load_split
from mnist_cnn.inference import export as export_module
from mnist_cnn.inference.evaluate import predict_log_probs


@pytest.fixture(scope="module")
def trained(request) -> tuple[Path, Path, list[str]]:
    """(data folder, checkpoint, extra flags): the real one-epoch run when MNIST is here,
    else the synthetic run."""
    if real_mnist_dir() is not None:
        run = request.getfixturevalue("real_run")
        return real_mnist_dir(), run / "last.pt", []
    data, run = request.getfixturevalue("synthetic_run")
    return data, run / "last.pt", ["--no-verify"]


@pytest.mark.numerics
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_torch_on_test_images(trained, tmp_path, capsys, fmt):
    data, ckpt, flags = trained
    out = tmp_path / f"model.{fmt}"
    assert (
        main(["export", str(ckpt), "--format", fmt, "--out", str(out), "--data-dir", str(data), "--json", *flags]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == (1000 if not flags else 200)  # the synthetic test set has 200 images
    assert report["max_abs_diff"] <= 1e-4 and report["argmax_equal"] is True
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_onnx_contract_dynamic_batch_and_metadata(trained, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    data, ckpt, flags = trained
    out = tmp_path / "model.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--data-dir", str(data), *flags]) == 0
    printed = capsys.readouterr().out
    assert "max |onnx - torch| = " in printed and "argmax identical: yes" in printed
    card = (tmp_path / "model.onnx.MODEL_CARD.md").read_text()  # beside the export, with its own check's figure
    diff = re.search(r"max \|onnx - torch\| = (\S+) ", printed).group(1)
    checked = 1000 if not flags else 200  # the synthetic test set (no real MNIST here) has 200 images
    assert f"largest |exported - torch| log-probability {float(diff):.3g} over {checked} " in card
    # the card's ONNX Runtime lines, as written (its default providers), run on the exported file
    assert 'session = ort.InferenceSession("model.onnx")' in card
    assert '(log_probs,) = session.run(["log_probs"], {"images": images})' in card
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["log_probs"]
    for n in (1, 7):
        got = session.run(None, {"images": np.random.rand(n, 1, 28, 28).astype(np.float32)})[0]
        assert got.shape == (n, 10)
        assert np.allclose(np.exp(got).sum(1), 1.0, atol=1e-5)
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["classes"] == "0,1,2,3,4,5,6,7,8,9"
    assert (meta["normalization_mean"], meta["normalization_std"]) == ("0.1307", "0.3081")
    assert meta["model"] == "seed" and meta["recipe"] == "seed"
    assert 0.0 < float(meta["final_test_accuracy"]) <= 1.0
    # no exporter debugging record: stack traces with this machine's source paths
    assert not [n.name for n in proto.graph.node if n.metadata_props]
    assert str(Path(__file__).resolve().parents[1] / "src").encode() not in out.read_bytes()


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_takes_raw_images_in_0_1(trained, tmp_path):
    data, ckpt, flags = trained
    out = tmp_path / "model.pt"
    assert (
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(out), "--data-dir", str(data), *flags]) == 0
    )
    loaded = torch.jit.load(str(out))
    images, _ = load_split(data, "test", verify=not flags)
    model, cfg, _ = load_model_file(ckpt)
    expected = predict_log_probs(model, images[:100], 100)  # normalizes uint8 images itself
    got = loaded(images[:100].float().div(255).unsqueeze(1))  # raw [0, 1] in, normalized inside
    assert torch.allclose(got, expected, atol=1e-5)


def test_safetensors_export_is_accepted_by_predict_and_evaluate(trained, tmp_path, capsys):
    data, ckpt, flags = trained
    out = tmp_path / "model.safetensors"
    assert (
        main(["export", str(ckpt), "--format", "safetensors", "--out", str(out), "--data-dir", str(data), *flags]) == 0
    )
    capsys.readouterr()
    results = []
    for model_file in (ckpt, out):
        assert (
            main(
                ["evaluate", str(model_file), "--data-dir", str(data), "--out", str(tmp_path / "ev"), "--json", *flags]
            )
            == 0
        )
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1]


def test_a_failed_check_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no export can pass this
    data, ckpt, flags = trained
    out = tmp_path / "model.pt"
    assert (
        main(["export", str(ckpt), "--format", "torchscript", "--out", str(out), "--data-dir", str(data), *flags]) == 2
    )
    err = capsys.readouterr().err
    assert "torchscript export does not match torch" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_json_counts_are_consistent(synthetic_run, tmp_path, capsys):
    data, run = synthetic_run
    assert (
        main(
            ["evaluate", str(run / "last.pt"), "--data-dir", str(data), "--no-verify", "--json", "--out", str(tmp_path)]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    conf = np.array(report["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == report["n"] == 200
    assert report["accuracy"] == pytest.approx(np.trace(conf) / report["n"])
    assert [c["support"] for c in report["per_class"]] == conf.sum(1).tolist()
    for c in report["per_class"]:
        k = c["class"]
        assert c["recall"] == pytest.approx(conf[k, k] / conf[k].sum())
        assert c["precision"] == pytest.approx(conf[k, k] / conf[:, k].sum() if conf[:, k].sum() else 0.0)
    assert report["loss"] > 0
    for name in ("confusion.png", "mistakes.png", "evaluation.json"):
        assert (tmp_path / name).is_file()


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """No $MNIST_CNN_DATA, an empty cache, and no network: any download attempt fails the test."""
    from mnist_cnn.data import splits as data_module

    monkeypatch.delenv("MNIST_CNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(data_module, "download", no_download)


def test_export_with_no_test_images_anywhere_checks_random_images(tmp_path, no_data_anywhere, capsys):
    from mnist_cnn.checkpoint import make_checkpoint
    from mnist_cnn.config import load_config
    from mnist_cnn.networks.builtin import build_model

    ckpt = tmp_path / "fresh.pt"
    torch.save(make_checkpoint(build_model("seed"), load_config("seed")).to_dict(), ckpt)  # records no data folder
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["inputs"] == "random images" and report["n"] == 1000 and report["argmax_equal"] is True
    assert "no mnist test images in" in captured.err and "random images instead" in captured.err
    assert out.is_file() and not (tmp_path / "empty-cache" / "mnist-cnn").exists()  # nothing fetched


def test_export_and_evaluate_find_the_data_the_run_was_trained_on(synthetic_run, tmp_path, no_data_anywhere, capsys):
    """After `train --data-dir D`, neither command needs --data-dir, and neither downloads."""
    data, run = synthetic_run
    out = tmp_path / "m.pt"
    assert (
        main(["export", str(run / "last.pt"), "--format", "torchscript", "--out", str(out), "--no-verify", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == "test images" and report["n"] == 200
    assert main(["evaluate", str(run / "last.pt"), "--no-verify", "--json", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 200


def test_evaluate_and_export_read_only_the_test_files(synthetic_run, tmp_path, no_data_anywhere, capsys):
    data, run = synthetic_run
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    for f in data.glob("t10k-*"):
        (test_only / f.name).write_bytes(f.read_bytes())
    assert (
        main(
            [
                "evaluate",
                str(run / "last.pt"),
                "--data-dir",
                str(test_only),
                "--no-verify",
                "--json",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n"] == 200
    assert (
        main(
            [
                "export",
                str(run / "last.pt"),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "w.st"),
                "--data-dir",
                str(test_only),
                "--no-verify",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["inputs"] == "test images"


def test_safetensors_is_recognised_by_content_whatever_its_name(synthetic_run, tmp_path, capsys):
    data, run = synthetic_run
    flags = ["--data-dir", str(data), "--no-verify"]
    out = tmp_path / "weights.st"
    assert main(["export", str(run / "last.pt"), "--format", "safetensors", "--out", str(out), *flags]) == 0
    capsys.readouterr()
    reports = []
    for model_file in (run / "last.pt", out):
        assert main(["evaluate", str(model_file), "--json", "--out", str(tmp_path / "ev"), *flags]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0] == reports[1]
    digit = tmp_path / "d.png"
    from PIL import Image

    images, _ = load_split(data, "test", verify=False)
    Image.fromarray(images[0].numpy()).save(digit)
    assert main(["predict", str(out), str(digit), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    # and a checkpoint named like a safetensors file is still read as a checkpoint
    renamed = tmp_path / "last.safetensors"
    renamed.write_bytes((run / "last.pt").read_bytes())
    assert main(["evaluate", str(renamed), "--json", "--out", str(tmp_path / "ev"), *flags]) == 0
    assert json.loads(capsys.readouterr().out) == reports[0]
