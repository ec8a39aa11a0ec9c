"""Command line: argument parsing and wiring, nothing else.

    mnist-cnn train [--recipe seed] [--epochs N] ... [--set optim.lr=2e-3]
    mnist-cnn evaluate runs/x/last.pt [--json]
    mnist-cnn summary [--model seed]
    mnist-cnn plot runs/x
    mnist-cnn download [--data-dir DIR]
    mnist-cnn recipes

Errors the user can fix (the project's MnistCnnError) are one line on stderr
and a non-zero exit; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .augment import augment_batch
from .checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint
from .config import Config, list_recipes, load_config, parse_override, read_recipe
from .data import download, load_mnist, resolve_data_dir
from .errors import MnistCnnError
from .evaluate import evaluate
from .models import MODELS, build_model
from .plots import draw_curves, draw_samples
from .rundir import RunDir, default_run_dir, read_metrics, write_text
from .train import build_state, fit, pick_device, seed_everything, to_device

log = logging.getLogger("mnist_cnn")
SAMPLE_GRID = 32  # augmented training images shown in samples.png


def model_summary(name: str) -> str:
    """Per-layer output shapes and parameter counts (torchinfo), for one 28x28 image."""
    import torchinfo
    stats = torchinfo.summary(build_model(name), input_size=(1, 1, 28, 28), depth=3, verbose=0,
                              col_names=("output_size", "num_params"), device="cpu")
    return str(stats) + "\n"


def config_from_args(args: argparse.Namespace) -> Config:
    """Recipe, then the named flags, then --set KEY=VALUE, each checked."""
    overrides = dict(parse_override(s) for s in args.set or [])
    named = {
        "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "optim.lr": args.lr,
        "run.seed": args.seed, "run.device": args.device, "run.data_dir": args.data_dir,
        "run.out": args.out, "run.train_limit": args.train_limit, "run.precision": args.precision,
    }
    named.update({k: v for k, v in (("run.verify", False if args.no_verify else None),
                                    ("run.progress", False if args.no_progress else None),
                                    ("run.deterministic", True if args.deterministic else None))})
    overrides = {k: v for k, v in named.items() if v is not None} | overrides
    return load_config(args.recipe, overrides)


def format_row(row: dict, epochs: int) -> str:
    text = (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.1e}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}%  ")
    if "val_acc" in row:
        text += f"val acc {100 * row['val_acc']:6.2f}%  "
    return text + f"{row['seconds']:6.1f} s"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    device = pick_device(cfg.run.device)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    data_dir = resolve_data_dir(cfg.run.data_dir or None)
    mnist = load_mnist(data_dir, verify=cfg.run.verify)
    data = to_device(mnist, cfg, device)
    run = RunDir.create(Path(cfg.run.out) if cfg.run.out else default_run_dir())
    cfg.run.out, cfg.run.data_dir = str(run.path), str(data_dir)
    state = build_state(cfg, device, data.steps_per_epoch(cfg.batch_size))
    run.write_start(cfg, device, model_summary(cfg.model))
    write_samples(run, data, cfg)
    print(f"training {cfg.model} ({sum(p.numel() for p in state.model.parameters()):,} parameters), "
          f"recipe {cfg.recipe}, {data.train_images.shape[0]:,} images, {cfg.epochs} epochs on {device} "
          f"-> {run.path}", flush=True)
    start = time.perf_counter()
    for row in fit(state, data, cfg, device, progress=cfg.run.progress):
        run.end_epoch(make_checkpoint(state.model, cfg, optimizer=state.optimizer, scheduler=state.scheduler,
                                      epoch=state.epoch, metrics=state.metrics),
                      best=best_on_validation(state.metrics))
        print(format_row(row, cfg.epochs), flush=True)
    wall = time.perf_counter() - start
    run.save_figure("curves.png", lambda f: draw_curves(state.metrics, f))
    final = state.metrics[-1]
    print(f"final test accuracy {100 * final['test_acc']:.2f}% (epoch {final['epoch']}), "
          f"wall {wall:.1f} s; run folder {run.path}")
    return 0


def best_on_validation(rows: list[dict]) -> bool:
    """Whether the latest epoch has the best validation accuracy so far. Never the
    test set: with no validation split there is no "best" checkpoint."""
    if "val_acc" not in rows[-1]:
        return False
    return rows[-1]["val_acc"] >= max(r["val_acc"] for r in rows)


def write_samples(run: RunDir, data, cfg: Config) -> None:
    """samples.png: augmented training images as the model sees them (before normalization)."""
    from .augment import MNIST_MEAN, MNIST_STD
    g = torch.Generator(data.train_images.device).manual_seed(cfg.run.seed)  # not the training RNG
    x = augment_batch(data.train_images[:SAMPLE_GRID], cfg.augment, g) * MNIST_STD + MNIST_MEAN
    run.save_figure("samples.png", lambda f: draw_samples(
        x, data.train_labels[:SAMPLE_GRID], f, title=f"augmented training samples ({cfg.recipe})"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model, cfg = model_from_checkpoint(ckpt, args.checkpoint)
    device = pick_device(args.device)
    data_dir = resolve_data_dir(args.data_dir)
    mnist = load_mnist(data_dir, verify=not args.no_verify)
    model = model.to(device)
    result = evaluate(model, mnist.test_images.to(device), mnist.test_labels.to(device), cfg.eval_batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.checkpoint}: test accuracy {100 * result['accuracy']:.2f}% "
              f"({round(result['accuracy'] * result['n'])}/{result['n']}), loss {result['loss']:.4f}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    if args.model not in MODELS:
        raise MnistCnnError(f"unknown model {args.model!r}; known: {', '.join(sorted(MODELS))}")
    print(model_summary(args.model), end="")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    run = RunDir(Path(args.run_dir))
    rows = read_metrics(run.file("metrics.csv"))
    run.save_figure("curves.png", lambda f: draw_curves(rows, f))
    print(f"wrote {run.file('curves.png')}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    fetched = download(data_dir)
    load_mnist(data_dir, download_missing=False)  # verify everything, not only what was fetched
    print(f"MNIST verified in {data_dir}" + (f" ({len(fetched)} files downloaded)" if fetched else ""))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for name in list_recipes():
        recipe = read_recipe(name)
        print(f"{name:<8} model {recipe.get('model', 'seed'):<8} epochs {recipe.get('epochs', 20)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-cnn", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"mnist-cnn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with a recipe")
    p.add_argument("--recipe", default="seed", help="recipe name (see `mnist-cnn recipes`) or a .toml file")
    p.add_argument("--model", help="a registered model name")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", help="fp32 | bf16")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise repeatable)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check (your own IDX data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config field, e.g. --set optim.label_smoothing=0.1 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set accuracy and loss of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="per-layer output shapes and parameter counts")
    p.add_argument("--model", default="seed")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("plot", help="redraw curves.png from a run folder's metrics.csv")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("download", help="fetch and verify the MNIST files")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except MnistCnnError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
