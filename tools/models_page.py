"""docs/models.md, the model zoo, generated from files so that it cannot drift:

    python tools/models_page.py            # writes docs/models.md
    python tools/models_page.py --check    # exit 1 when docs/models.md is not what the files say

Read: each pretrained model (src/mnist_cnn/pretrained: the file, index.toml with the commands, commit
and machine that made it), its int8 export's report (docs/results/zoo/NAME-int8.json, written by
`mnist-cnn export pretrained:NAME --format onnx --quantize int8 --json`) and its inference benchmark
(docs/results/zoo/NAME-speed.json, by `benchmarks/inference.py --json`); and every recipe's network.
Parameters, MACs and receptive fields are measured here from the networks themselves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnist_cnn import pretrained
from mnist_cnn.checkpoint import load_model_file
from mnist_cnn.config import list_recipes, load_config
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.networks.reference import create, locate
from mnist_cnn.networks.summary import describe, totals

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "models.md"
ZOO = REPO / "docs" / "results" / "zoo"
DATA = {"mnist": "../shared/data/mnist", "fashion-mnist": "../shared/data/fashion-mnist"}  # as the commands ran
ORT_FP32, ORT_INT8 = "ONNX Runtime", "int8"  # how the benchmark names its ONNX Runtime rows


def size(model) -> dict:
    return totals(model, describe(model))


def ort_rows(speed: dict) -> tuple[dict, dict]:
    """The benchmark's fp32 and int8 ONNX Runtime rows."""
    ort = [r for r in speed["rows"] if r["backend"].startswith(ORT_FP32)]
    int8 = next(r for r in ort if ORT_INT8 in r["backend"])
    return next(r for r in ort if r is not int8), int8


def pretrained_section() -> list[str]:
    lines = [
        "## Pretrained models",
        "",
        "In the package, weights only: `mnist-cnn predict pretrained:NAME photo.jpg`, `serve`, `evaluate`, "
        '`export`, `--teacher` and `mnist_cnn.load("pretrained:NAME")` take them; `mnist-cnn pretrained` lists '
        "them. Accuracy is on the whole test set (10,000 images), as `export --quantize int8` measured the fp32 "
        "and the int8 ONNX files (the fp32 figure is also the final epoch's, on the model's card); latency and "
        "throughput are ONNX Runtime's on the CPU, measured while other work shared the two cores: rough figures.",
        "",
        "| model | data set | parameters | MACs | RF | fp32 accuracy | int8 accuracy | agree | .pt | "
        "ONNX fp32 | ONNX int8 | batch-1 fp32 / int8 | images/s at 1024, fp32 / int8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, entry in sorted(pretrained.index().items()):
        file = pretrained.resolve(pretrained.PREFIX + name)
        model, _, _ = load_model_file(file)
        s = size(model)
        q = json.loads((ZOO / f"{name}-int8.json").read_text())["quantized"]
        speed = json.loads((ZOO / f"{name}-speed.json").read_text())
        fp32, int8 = ort_rows(speed)
        share = 100 * q["int8_bytes"] / q["fp32_bytes"]
        lines.append(
            f"| `pretrained:{name}` | {entry['dataset']} | {s['params']:,} | {s['macs']:,} "
            f"| {s['rf_last_feature_map']} | {100 * q['fp32_accuracy']:.2f}% | {100 * q['int8_accuracy']:.2f}% "
            f"| {q['agree']:,} / {q['n']:,} | {file.stat().st_size:,} B | {q['fp32_bytes']:,} B "
            f"| {q['int8_bytes']:,} B ({share:.0f}%) | {fp32['latency_ms']:.3f} / {int8['latency_ms']:.3f} ms "
            f"| {fp32['images_per_s']:,.0f} / {int8['images_per_s']:,.0f} |"
        )
        data = DATA[entry["dataset"]]
        notes += [
            f"**`pretrained:{name}`** ({entry['recipe']} recipe, {entry['epochs']} epochs, seed 0, the final epoch): "
            f"trained at commit `{entry['commit'][:7]}` on {entry['machine']}, by",
            "",
            "```bash",
            *entry["commands"],
            "```",
            "",
            f"then shipped by `python tools/ship_pretrained.py RUN {name} --command ...`; the int8 and speed "
            "figures by",
            "",
            "```bash",
            f"mnist-cnn export pretrained:{name} --format onnx --quantize int8 --out {name}.int8.onnx "
            f"--data-dir {data} --json > docs/results/zoo/{name}-int8.json",
            f"python benchmarks/inference.py --checkpoint pretrained:{name} --json docs/results/zoo/{name}-speed.json",
            "```",
            "",
            f"(the benchmark on {speed['machine']}, torch {speed['torch']}, {speed['threads']} threads).",
            "",
        ]
    return lines + [""] + notes


def recipes_section() -> list[str]:
    shipped = {entry["recipe"]: name for name, entry in pretrained.index().items()}
    lines = [
        "## Recipes",
        "",
        "Every built-in recipe's network, measured here from the network itself; a recipe's accuracy over five "
        "seeds is on [Results](results.md).",
        "",
        "| recipe | data set | network | parameters | MACs | RF | epochs | shipped as |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for recipe in list_recipes():
        cfg = load_config(recipe)
        model = create(locate(cfg.model), get_dataset(cfg.dataset).num_classes, cfg.model_args)
        s = size(model)
        args = ", ".join(f"{k}={v}" for k, v in cfg.model_args.items())
        network = f"{cfg.model}({args})" if args else cfg.model
        ship = f"`pretrained:{shipped[recipe]}`" if recipe in shipped else "–"
        lines.append(
            f"| `{recipe}` | {cfg.dataset} | {network} | {s['params']:,} | {s['macs']:,} | {s['rf_last_feature_map']} "
            f"| {cfg.epochs} | {ship} |"
        )
    return lines


def page() -> str:
    lines = [
        "# Model zoo",
        "",
        "<!-- generated by tools/models_page.py from the files it names; edit those, not this page -->",
        "",
        *pretrained_section(),
        *recipes_section(),
        "",
        "The int8 files are ONNX Runtime's static quantization (QDQ, per-channel int8 weights, uint8 activations "
        "calibrated on 1,000 training images, the logits and the normalization in fp32): "
        "[export](guide/inference.md#export). They keep the accuracy within 0.05 points but are about half the "
        "fp32 file, not a quarter, and no faster on these CPUs: the graph's scales, zero points and int32 biases "
        "weigh as much as the int8 weights of networks this small.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/models.md is out of date")
    text = page()
    if parser.parse_args().check:
        if PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python tools/models_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
