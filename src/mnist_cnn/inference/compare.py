"""`mnist-cnn compare`: runs and seed groups side by side, and the accuracy-parameters frontier.

    groups = [read_group(Path("runs/best"))]       # a run folder, or a --seeds folder of seed-N/ runs
    rows = [group_row(g) for g in groups]          # network, parameters, MACs, receptive field, accuracy
    print(format_table(rows))

Everything comes from what the runs wrote (each seed's last.pt: config, metrics rows, weights); the
network is rebuilt only to count its multiply-accumulates and receptive field, never re-evaluated.
Accuracy is each seed's FINAL epoch, on the test set (or the validation split for runs trained
with run.test = false, which the row says). Seconds per epoch are what each seed's metrics
record: for seeds trained stacked, a seed's share of the stack's wall time.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_cnn.checkpoint import LAST_FILE, Checkpoint, load_checkpoint, model_from_checkpoint
from mnist_cnn.config import Config
from mnist_cnn.errors import ConfigError
from mnist_cnn.networks.builtin import MODELS
from mnist_cnn.networks.reference import is_object
from mnist_cnn.networks.summary import describe, totals

RUN_FILE = LAST_FILE
# Published figures drawn on frontier.png as labelled references, by data set:
# (label, parameters, test accuracy %, source). None for Fashion-MNIST: its benchmark table gives no sizes.
ANCHORS = {
    "mnist": (
        ("seed notebook (one run)", 16_426, 99.56, "the seed project's README"),
        ("LeNet-5", 60_000, 99.05, "LeCun et al. 1998, 0.95% test error without distortions"),
    ),
}
COLUMNS = (
    "group",
    "dataset",
    "network",
    "parameters",
    "macs",
    "receptive_field",
    "epochs",
    "seeds",
    "split",
    "mean",
    "std",
    "min",
    "max",
    "seconds_per_epoch",
    "teacher",
)


@dataclass
class Group:
    """One run, or the seeds of one --seeds folder: their configs, final rows and a checkpoint to rebuild from."""

    name: str
    configs: list[Config]
    finals: list[dict[str, Any]]  # each seed's final metrics row
    seconds: list[float]  # each seed's seconds per epoch (training + evaluation)
    checkpoint: Checkpoint  # the first seed's
    folder: Path  # the first seed's run folder (where a user network's source copy is)


def seed_folders(path: Path) -> list[Path]:
    """A run folder -> [it]; a --seeds folder -> its seed-N/ folders in seed order."""
    if (path / RUN_FILE).is_file():
        return [path]
    seeds = sorted(
        (p for p in path.glob("seed-*") if (p / RUN_FILE).is_file() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    if not seeds:
        raise ConfigError(f"{path}: neither a run folder (no {RUN_FILE}) nor a --seeds folder (no seed-N/{RUN_FILE})")
    return seeds


def read_group(path: Path) -> Group:
    """A run folder or a --seeds folder; every seed must have finished its epochs."""
    configs, finals, seconds, first = [], [], [], None
    folders = seed_folders(path)
    for folder in folders:
        ckpt = load_checkpoint(folder / RUN_FILE)
        cfg, rows = ckpt.config, ckpt.metrics
        if not ckpt.finished or not rows:
            raise ConfigError(f"{folder} has not finished (epoch {ckpt.epoch} of {cfg.epochs})")
        configs.append(cfg)
        finals.append(rows[-1])
        seconds.append(sum(r["seconds"] for r in rows) / len(rows))
        first = first or ckpt
    assert first is not None
    return Group(str(path), configs, finals, seconds, first, folders[0])


def network_text(cfg: Config) -> str:
    """seed, or family(w1=16, d1=2, ...) with the model args; a file network by its class name."""
    name = cfg.model if cfg.model in MODELS else cfg.model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    args = ", ".join(f"{k}={v}" for k, v in cfg.model_args.items())
    return f"{name}({args})" if args else name


def teacher_text(cfg: Config) -> str:
    """The teachers by their run folder's name (or file name); '' when not distilled."""
    names = []
    for t in cfg.distill.teachers:
        p = Path(t)
        names.append(p.parent.name if p.name == RUN_FILE else p.name)
    return " + ".join(names)


def group_row(group: Group, trust_code: bool = False) -> dict[str, Any]:
    """The table's row: the network's size and reach, and the final accuracy over the group's seeds."""
    cfg = group.configs[0]
    record = group.checkpoint.network
    if is_object(cfg.model) and record.parameters is not None:  # no code in the folder: the sizes the run measured
        size = {
            "params": record.parameters,
            "macs": record.macs,
            "rf_last_feature_map": record.receptive_field,
        }
    else:
        model, _ = model_from_checkpoint(group.checkpoint, group.name, group.folder, trust_code)
        size = totals(model, describe(model))
    split = "test" if all("test_acc" in f for f in group.finals) else "val"
    accs = [100 * f[f"{split}_acc"] for f in group.finals]
    return {
        "group": group.name,
        "dataset": cfg.dataset,
        "network": network_text(cfg),
        "parameters": size["params"],
        "macs": size["macs"],
        "receptive_field": size["rf_last_feature_map"],
        "epochs": cfg.epochs,
        "seeds": len(accs),
        "split": split,
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "seconds_per_epoch": statistics.fmean(group.seconds),
        "teacher": teacher_text(cfg),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text, one line per group; the name columns as wide as their longest entry."""
    g = max(5, *(len(r["group"]) for r in rows))
    d = max(7, *(len(r["dataset"]) for r in rows))
    n = max(7, *(len(r["network"]) for r in rows))
    head = f"{'group':<{g}} {'dataset':<{d}} {'network':<{n}} {'params':>8} {'MACs':>10} {'RF':>3} {'ep':>3} {'n':>2} "
    head += f"{'split':<5} {'mean ± std':>14} {'min':>6} {'s/epoch':>8}  teacher"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['group']:<{g}} {r['dataset']:<{d}} {r['network']:<{n}} {r['parameters']:>8,} {r['macs']:>10,} "
            f"{r['receptive_field']!s:>3} {r['epochs']:>3} {r['seeds']:>2} {r['split']:<5} "
            f"{r['mean']:>6.2f} ± {r['std']:<5.2f} {r['min']:>6.2f} {r['seconds_per_epoch']:>8.1f}  "
            f"{r['teacher'] or '-'}"
        )
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown, for README and the docs."""
    lines = [
        "| group | data set | network | parameters | MACs | RF | epochs | seeds "
        "| final accuracy, mean ± std (%) | min (%) | s per epoch | teacher |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        split = "" if r["split"] == "test" else " (validation)"
        spread = f" ± {r['std']:.2f}" if r["seeds"] > 1 else ""  # one run has no spread to show
        lines.append(
            f"| `{r['group']}` | {r['dataset']} | {r['network']} | {r['parameters']:,} | {r['macs']:,} "
            f"| {r['receptive_field']} | {r['epochs']} | {r['seeds']} | **{r['mean']:.2f}{spread}**{split} "
            f"| {r['min']:.2f} | {r['seconds_per_epoch']:.1f} | {r['teacher'] or '–'} |"
        )
    return "\n".join(lines)


def format_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
