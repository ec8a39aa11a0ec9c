"""Ship a finished run as a pretrained model inside the package (src/mnist_cnn/pretrained/):

    python tools/ship_pretrained.py RUN_DIR NAME --command "mnist-cnn train --recipe seed ..." [--command ...]

writes NAME.pt (weights-only: config, the evaluated weights, metrics; no optimizer, no code; the
config's run.out and run.data_dir cleared, so a user's data and runs go where theirs do, while a
teacher's recorded path stays as the history of how it was trained), NAME.MODEL_CARD.md (the run's
card, told where the model now lives) and NAME's entry in index.toml (data set, recipe, the
commands, the commit and the machine from the run's environment.json). Refuses an unfinished run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tomllib
from pathlib import Path

from mnist_cnn.checkpoint import LAST_FILE, Checkpoint, load_checkpoint
from mnist_cnn.pretrained import FOLDER, INDEX, PREFIX, card
from mnist_cnn.training.card import card_text
from mnist_cnn.version import __version__

MAX_BYTES = 100_000  # a shipped model stays well under this (the bound; the seed network is ~70 kB)


def stripped(run: Path) -> Checkpoint:
    """The run's checkpoint with what a model needs: no optimizer, schedule or local paths."""
    ckpt = load_checkpoint(run / LAST_FILE)
    if not ckpt.finished:
        sys.exit(f"{run} has not finished: ship finished runs only")
    cfg = copy.deepcopy(ckpt.config)
    cfg.run.out = cfg.run.data_dir = ""  # no local paths
    return dataclasses.replace(
        ckpt, config=cfg, optimizer=None, scheduler=None, train_model=None, written_by=__version__
    )  # written now, by this version


def toml_value(value) -> str:
    if isinstance(value, list):
        return "[\n" + "".join(f"    {json.dumps(v)},\n" for v in value) + "]"
    return json.dumps(value)  # strings and numbers as TOML writes them


def write_index(entries: dict[str, dict]) -> None:
    lines = [
        "# The pretrained models in this folder: written by tools/ship_pretrained.py from each run's files.",
        "",
    ]
    for name in sorted(entries):
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in entries[name].items()]
        lines.append("")
    INDEX.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", action="append", required=True, help="a command that made the run, in order")
    parser.add_argument("--machine", help="the machine, in words (default: environment.json's device name)")
    args = parser.parse_args()
    ckpt = stripped(args.run)
    target = FOLDER / f"{args.name}.pt"
    with open(target, "wb") as f:
        ckpt.write(f)
    size = target.stat().st_size
    if size > MAX_BYTES:
        target.unlink()
        sys.exit(f"{target} would be {size:,} bytes, over {MAX_BYTES:,}")
    text = card_text(args.run).replace(str(args.run.resolve() / LAST_FILE), f"{PREFIX}{args.name}")
    text = text.replace(str(args.run / LAST_FILE), f"{PREFIX}{args.name}")
    card(args.name).write_text(text)
    env = json.loads((args.run / "environment.json").read_text())
    cfg, final = ckpt.config, ckpt.final
    entries = tomllib.loads(INDEX.read_text()) if INDEX.is_file() else {}
    entries[args.name] = {
        "dataset": cfg.dataset,
        "recipe": cfg.recipe,
        "test_accuracy": final["test_acc"],
        "epochs": ckpt.epoch,
        "commands": args.command,
        "commit": env["git_revision"],
        "machine": f"{args.machine or env['device_name']}, {env['cpu_threads']} thread(s), torch {env['torch']}, "
        f"{cfg.run.precision}",
        "started": env["started"],
    }
    write_index(entries)
    print(f"{target}: {size:,} bytes, test accuracy {100 * final['test_acc']:.2f}% (epoch {ckpt.epoch})")


if __name__ == "__main__":
    main()
