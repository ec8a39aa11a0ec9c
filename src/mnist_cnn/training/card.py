"""MODEL_CARD.md: a run folder described in the Hugging Face model-card layout, from its own files.

    write_card(Path("runs/seed-readme"))                       # after training, evaluate, --seeds
    write_card(run_dir, Path("dist/m.onnx.MODEL_CARD.md"), report)   # beside an export, with its check

Every figure comes from a file the run wrote (config.toml, metrics.csv, environment.json,
summary.txt, evaluation.json, ../seeds-summary.json); nothing is measured again. The YAML
header (library_name, tags, datasets, metrics, model-index) is written as JSON values, which
YAML reads as they are, so no YAML library is needed to write it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from mnist_cnn.checkpoint import LAST_FILE
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.errors import OutputError, first_line
from mnist_cnn.files import atomic_write
from mnist_cnn.inference.evaluate import per_class
from mnist_cnn.networks.reference import is_object
from mnist_cnn.training.rundir import read_metrics

log = logging.getLogger("mnist_cnn")
CARD = "MODEL_CARD.md"
EVALUATION = "evaluation.json"
LIBRARY = "mnist-cnn"


def has_card_sources(folder: Path) -> bool:
    """Whether `folder` is a run folder a card can be written from: its config and a finished epoch."""
    return (folder / "config.toml").is_file() and (folder / "metrics.csv").is_file()


def final_evaluation(confusion: torch.Tensor, row: dict[str, Any], dataset: str, checkpoint: Path) -> dict[str, Any]:
    """evaluation.json of a run's final epoch: the figures of its last metrics row (the same pass over
    the test set), with the per-class table and the confusion matrix counted in that pass."""
    classes = get_dataset(dataset).classes
    n = int(confusion.sum())
    return {
        "loss": row["test_loss"],
        "accuracy": row["test_acc"],
        "n": n,
        "per_class": per_class(confusion, classes),
        "confusion": confusion.long().tolist(),
        "dataset": dataset,
        "images": f"{dataset} test images, final epoch {row['epoch']} of training",
        "checkpoint": checkpoint.name,  # the model these figures are of, beside this file
    }


def evaluation_of_last(run_dir: Path) -> dict[str, Any] | None:
    """evaluation.json when it evaluated this folder's last.pt (`evaluate best.pt` writes there too). A
    checkpoint beside the file is named by its name alone, so the folder can move."""
    evaluation = read_json(run_dir / EVALUATION)
    if evaluation is None or evaluation.get("checkpoint") != LAST_FILE:
        return None
    return evaluation if isinstance(evaluation.get("per_class"), list) else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_config(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """config.toml's text and values."""
    import tomllib

    text = (run_dir / "config.toml").read_text()
    cfg = tomllib.loads(text)
    for key, default in (("dataset", "mnist"), ("model", "seed"), ("run", {})):  # 0.1.0's configs lack some
        cfg.setdefault(key, default)
    return text, cfg


def parameters(run_dir: Path) -> int | None:
    """The parameter count summary.txt printed when the run started."""
    try:
        found = re.search(r"Total params: ([\d,]+)", (run_dir / "summary.txt").read_text())
    except OSError:
        return None
    return int(found.group(1).replace(",", "")) if found else None


def seeds_summary(run_dir: Path) -> dict[str, Any] | None:
    """The seeds group's summary when the run is one of `--seeds`' seed-N folders: the summary must list
    its seed and be written after its metrics (a summary from before this run finished is another group's)."""
    summary_file = run_dir.parent / "seeds-summary.json"
    summary = read_json(summary_file)
    if summary is None or run_dir.name not in {f"seed-{s}" for s in summary.get("seeds", [])}:
        return None
    if summary_file.stat().st_mtime < (run_dir / "metrics.csv").stat().st_mtime:
        return None
    return summary


def model_name(cfg: dict[str, Any]) -> str:
    """The network's name for the metadata: a built-in's name, or a user network's class (not its local
    path, nor the module of a Python object)."""
    return cfg["model"].rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def from_file(cfg: dict[str, Any]) -> bool:
    """Whether the network comes from a Python file or module (loading it then needs trust_code)."""
    return ":" in cfg["model"] and not is_object(cfg["model"])


def header(cfg: dict[str, Any], final: dict[str, Any], name: str) -> list[str]:
    """The YAML front matter: what the Hub and other tools index."""
    dataset = get_dataset(cfg["dataset"])
    split = "test" if "test_acc" in final else "validation"
    accuracy = final.get("test_acc", final.get("val_acc"))
    result = {
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"name": dataset.name, "type": dataset.name, "split": split},
        "metrics": [{"type": "accuracy", "value": accuracy, "name": f"{split} accuracy, last epoch trained"}],
    }
    fields = {
        "library_name": LIBRARY,
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "pytorch", LIBRARY, model_name(cfg), dataset.name],
        "datasets": [dataset.name],
        "metrics": ["accuracy"],
        "model-index": [{"name": name, "results": [result]}],
    }
    return ["---", *(f"{key}: {json.dumps(value)}" for key, value in fields.items()), "---", ""]


def results_section(final: dict[str, Any], evaluation: dict[str, Any] | None, seeds: dict | None) -> list[str]:
    lines = ["## Evaluation results", ""]
    for split in ("test", "val"):
        if f"{split}_acc" in final:
            lines.append(
                f"- {'test set' if split == 'test' else 'validation split (held out of the training set)'}: "
                f"accuracy {100 * final[f'{split}_acc']:.2f}%, mean loss {final[f'{split}_loss']:.4f} "
                f"(epoch {final['epoch']}, the last trained; metrics.csv)"
            )
    if "test_acc" not in final:
        lines.append("- the test set was not opened (run.test = false): validation figures only")
    if evaluation is not None:
        lines += ["", f"Per class, on {evaluation.get('images', 'the test set')} (evaluation.json):", ""]
        lines += ["| class | precision | recall | support |", "|---|---:|---:|---:|"]
        for c in evaluation["per_class"]:
            lines.append(f"| {c['name']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']} |")
    if seeds is not None:
        split = seeds["split"]
        mean, std = seeds[f"final_{split}_acc_mean"], seeds[f"final_{split}_acc_std"]
        spread = "" if std is None or math.isnan(std) else f" ± {100 * std:.2f}"  # NaN: written before 0.6.0
        lines += [
            "",
            f"This run is one of {seeds['runs']} seeds ({', '.join(map(str, seeds['seeds']))}) of one recipe "
            f"(../seeds-summary.json): final {split} accuracy {100 * mean:.2f}{spread}% (mean ± sample std), "
            f"min {100 * seeds[f'final_{split}_acc_min']:.2f}%, max {100 * seeds[f'final_{split}_acc_max']:.2f}%.",
        ]
    return lines + [""]


def usage_section(run_dir: Path, model_file: str, trusted: bool, given: str | None = None) -> list[str]:
    """How to load the model: with this tool, with ONNX Runtime, with plain torch / safetensors.
    `trusted`: the network is Python from a file, which the tool runs only when told to; `given`: the
    class name of a network handed to train() as a Python object, which the caller gives back."""
    flag, keyword = (" --trust-code", ", trust_code=True") if trusted else ("", "")
    if given is not None:
        flag, keyword = f" --model path/to/file.py:{given}", f", model={given}"
    return [
        "## How to use",
        "",
        f"With this tool ({LIBRARY}, installed from its repository: `pip install -e .`):",
        "",
        "```bash",
        f"mnist-cnn predict {model_file} my_digit.png{flag}    # or a folder of images; --json for JSON",
        f"mnist-cnn serve {model_file}{flag}                   # a draw-a-digit page and a JSON API",
        "```",
        "",
        "```python",
        "import mnist_cnn",
        f'model = mnist_cnn.load("{model_file}"{keyword})   # [0, 1] (N, 1, 28, 28) -> (N, classes) log-probabilities',
        "```",
        "",
        "With ONNX Runtime, after `mnist-cnn export "
        f"{run_dir / LAST_FILE} --format onnx --out model.onnx` (the normalization is inside the graph):",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        'session = ort.InferenceSession("model.onnx")',
        "images = np.zeros((1, 1, 28, 28), np.float32)   # white digit on black, values in [0, 1]",
        '(log_probs,) = session.run(["log_probs"], {"images": images})',
        "```",
        "",
        "With plain torch or safetensors: `last.pt` is a dictionary (`torch.load(path, weights_only=True)`) "
        'whose "model" entry is the state dict and "config" the full config; a `--format safetensors` export '
        "holds the same weights with the config as metadata (`safetensors.torch.load_file`). The network's "
        "class is built from that config by `mnist_cnn.load`, which also applies the normalization.",
        "",
    ]


def export_section(export: dict[str, Any]) -> list[str]:
    """The export's own parity check: its file against torch on the same images; for an int8 export,
    its fp32 graph against torch, then int8 against fp32 (accuracy, agreement, size)."""
    verdict = "every argmax equal" if export["argmax_equal"] else "argmax differs"
    parity = (
        f"largest |exported - torch| log-probability {export['max_abs_diff']:.3g} over {export['n']} "
        f"{export.get('inputs', 'images')} (tolerance {export['tolerance']:g}), {verdict}"
    )
    name = Path(export["file"]).name
    q = export.get("quantized")
    if q is None:
        return [
            "## This export",
            "",
            f"`{name}` ({export['format']}), checked against the torch model when it was written: {parity}.",
            "",
        ]
    return [
        "## This export",
        "",
        f"`{name}` (onnx, int8): {q['scheme']}; calibrated on {q['calibration']:,} training images (never test "
        "images). Measured when it was written:",
        "",
        "| | fp32 ONNX | int8 ONNX |",
        "|---|---:|---:|",
        f"| test accuracy ({q['n']:,} images) | {100 * q['fp32_accuracy']:.2f}% | {100 * q['int8_accuracy']:.2f}% |",
        f"| file size | {q['fp32_bytes']:,} bytes | {q['int8_bytes']:,} bytes "
        f"({100 * q['int8_bytes'] / q['fp32_bytes']:.0f}%) |",
        "",
        f"{q['agree']:,} of the {q['n']:,} predictions agree between fp32 and int8. The int8 file is written only "
        f"when it loses at most {100 * q['max_accuracy_drop']:.2f} points of accuracy; the fp32 graph it was "
        f"quantized from was checked against the torch model first: {parity}. Measured with ONNX Runtime "
        f"{q['onnxruntime']} on the exporting machine's CPU; int8 kernels differ between CPU kinds.",
        "",
    ]


def details_section(run_dir: Path, cfg: dict[str, Any], env: dict[str, Any], metrics: list[dict]) -> list[str]:
    dataset, size = get_dataset(cfg["dataset"]), parameters(run_dir)
    network = f"- network: `{cfg['model']}`" + (f" ({size:,} parameters)" if size is not None else "")
    if cfg.get("model_args"):
        network += f", model_args {json.dumps(cfg['model_args'])}"
    seconds = sum(row["seconds"] for row in metrics)
    return [
        "## Model details",
        "",
        network,
        f"- classifies {dataset.name}-style 28x28 grayscale images into {len(dataset.classes)} classes: "
        f"{', '.join(dataset.classes)}",
        f"- trained with {LIBRARY} {env.get('mnist_cnn', '?')} (git {str(env.get('git_revision', '?'))[:12]}), "
        f"torch {env.get('torch', '?')}, on {env.get('device_name', env.get('device', '?'))}, "
        f"{len(metrics)} epoch{'s' if len(metrics) > 1 else ''} in {seconds:.0f} s, started {env.get('started', '?')}",
        f"- recipe `{cfg.get('recipe', '')}`: {cfg.get('about', '')}",
        "",
        "## Intended use and limits",
        "",
        f"- For {dataset.name}-like inputs: one centred digit, letter or object, light on a dark background, "
        "28x28 (`predict` and `serve` bring photos and drawings to that form: grayscale, inverted when the "
        "paper is light, cropped, centred by mass).",
        "- A teaching and benchmarking model. Accuracy on the test set says little about other writers, "
        "scanners or cameras; measure on your own labelled images (`mnist-cnn evaluate ... --images DIR`).",
        "- Not for decisions about people (signatures, forms, identity).",
        "",
    ]


def training_section(cfg: dict[str, Any], env: dict[str, Any], config_text: str) -> list[str]:
    dataset = get_dataset(cfg["dataset"])
    data = f"- data: {dataset.name} training images ({cfg['run'].get('train_limit') or 'all'})"
    if cfg.get("val_size"):
        data += f", of which the last {cfg['val_size']:,} are held out for validation"
    return [
        "## Training data and procedure",
        "",
        data,
        f"- command: `{env.get('command', '?')}`",
        "- full config (config.toml):",
        "",
        "```toml",
        config_text.rstrip(),
        "```",
        "",
    ]


def card_text(run_dir: Path, export: dict[str, Any] | None = None) -> str:
    """MODEL_CARD.md of a finished run folder; with `export`, for that exported file."""
    config_text, cfg = read_config(run_dir)
    metrics = read_metrics(run_dir / "metrics.csv")
    env = read_json(run_dir / "environment.json") or {}
    name = f"{model_name(cfg)}-{cfg['dataset']}-{run_dir.resolve().name}"
    # predict, serve and load take checkpoints and safetensors files, not ONNX or TorchScript
    exported = Path(export["file"]).name if export else ""
    model_file = exported if exported.endswith(".safetensors") else str(run_dir / LAST_FILE)
    lines = [
        *header(cfg, metrics[-1], name),
        f"# {name}",
        "",
        *details_section(run_dir, cfg, env, metrics),
        *training_section(cfg, env, config_text),
        *results_section(metrics[-1], evaluation_of_last(run_dir), seeds_summary(run_dir)),
        *(export_section(export) if export else []),
        *usage_section(run_dir, model_file, from_file(cfg), model_name(cfg) if is_object(cfg["model"]) else None),
    ]
    return "\n".join(lines)


def write_card(run_dir: Path, path: Path | None = None, export: dict[str, Any] | None = None) -> Path | None:
    """Write the card of `run_dir` to `path` (default: its MODEL_CARD.md); returns the path. A card is a
    courtesy: a run folder it cannot be made from (a damaged file) gets a one-line warning, not an error."""
    path = path or run_dir / CARD
    try:
        text = card_text(run_dir, export)
        atomic_write(path, lambda f: f.write(text.encode()))
    # tomllib's and json's errors are ValueErrors; OutputError: the disk is full or read-only
    except (OSError, OutputError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("no model card for %s: %s", run_dir, first_line(e))
        return None
    return path
