"""Command line: argument parsing and wiring, nothing else.

    mnist-cnn train [--recipe seed] [--epochs N] ... [--set optim.lr=2e-3]
    mnist-cnn evaluate runs/x/last.pt [--json] [--out DIR]
    mnist-cnn predict runs/x/last.pt my_digit.png my_folder/ [--json | --jsonl] [--csv FILE]
    mnist-cnn serve runs/x/last.pt [--host 127.0.0.1] [--port 8000]
    mnist-cnn tune --recipe best --study s1 [--trials 40] [--storage URL] [--report]
    mnist-cnn export runs/x/last.pt --format onnx --out seed.onnx
    mnist-cnn summary [--model seed] [--json]
    mnist-cnn check --model my_net.py:Net --max-params 20000 --require batchnorm,dropout,fc
    mnist-cnn plot runs/x
    mnist-cnn download [--data-dir DIR]
    mnist-cnn recipes

Errors the user can fix (the project's MnistCnnError) are one line on stderr
and a non-zero exit; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeAlias

from mnist_cnn import api
from mnist_cnn.config import CHOICES, parse_override
from mnist_cnn.data.datasets import DATASETS
from mnist_cnn.errors import ConfigError, ImageError, MnistCnnError
from mnist_cnn.files import refuse_foreign, refuse_inputs
from mnist_cnn.inference.compare import format_csv, format_markdown, format_table
from mnist_cnn.inference.image_files import image_paths, predicted
from mnist_cnn.inference.output import Answers
from mnist_cnn.inference.predict import save_preprocessed
from mnist_cnn.networks.builtin import MODELS
from mnist_cnn.networks.summary import REQUIREMENTS, describe, format_summary, totals
from mnist_cnn.pretrained import is_pretrained
from mnist_cnn.say import SAY, plain_handlers
from mnist_cnn.training.lr_find import END_LR, START_LR, STEPS
from mnist_cnn.tuning.study import PRUNER_WARMUP_EPOCHS
from mnist_cnn.version import __version__

log = logging.getLogger("mnist_cnn")
DESCRIPTION = "A fast, exact trainer for compact CNNs on MNIST and its family."
CHECK_FAILED = 1  # `check` exit code when a check fails (2 stays "bad input")
FRONTIER = "frontier.png"  # compare's figure when --plot names none
LR_FIND_PLOT = "lr-find.png"  # lr-find's figure when --plot names none
MODEL_NAMES = ", ".join(MODELS)  # the built-in networks, as the help lists them

# train's switches -> (config key, value); its valued flags are api.KEYWORDS, by the same names
SWITCH_KEYS = {
    "no_verify": ("run.verify", False),
    "no_progress": ("run.progress", False),
    "deterministic": ("run.deterministic", True),
}
# all that --resume accepts: where it runs, and a new length (training.run.extend says which schedules allow it)
RESUME_FLAGS = ("device", "no_progress", "data_dir", "trust_code", "epochs")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The named flags, then --set KEY=VALUE, as config keys (those the subcommand has)."""
    overrides = {
        key: getattr(args, dest) for dest, key in api.KEYWORDS.items() if getattr(args, dest, None) is not None
    }
    overrides.update({key: value for dest, (key, value) in SWITCH_KEYS.items() if getattr(args, dest, False)})
    overrides.update(parse_override(s) for s in args.set or [])
    return overrides


def cmd_tune(args: argparse.Namespace) -> int:
    if args.report:
        return api.tune_report(args.study, args.storage)
    options = api.TuneOptions(
        args.trials,
        args.timeout,
        args.space,
        args.storage,
        args.val_size,
        args.startup_trials,
        args.max_params,
        args.prune_after,
        args.baseline,
        args.val_seeds,
    )
    return api.tune(args.study, args.recipe, options, overrides_from_args(args))


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        dests = [*(d for d in api.KEYWORDS if hasattr(args, d)), *SWITCH_KEYS, "recipe", "set", "seeds"]
        given = [
            "--" + d.replace("_", "-")
            for d in dests
            if d not in RESUME_FLAGS and getattr(args, d) is not None and getattr(args, d) is not False
        ]
        if given:
            raise ConfigError(f"--resume continues with the run's own config; drop {', '.join(given)}")
        return api.resume(
            args.resume,
            device=args.device,
            progress=False if args.no_progress else None,
            data_dir=args.data_dir,
            trust_code=args.trust_code,
            epochs=args.epochs,
        )
    if args.trust_code:
        raise ConfigError(
            "--trust-code goes with --resume (the run's own network file); the --model you name runs without it"
        )
    if args.together and not args.seeds:
        raise ConfigError("--together says how --seeds trains its seeds; give it with --seeds")
    if args.seeds:
        if args.seed is not None:
            raise ConfigError("give either --seed or --seeds, not both")
        return api.train_seeds(args.recipe or "seed", args.seeds, overrides_from_args(args)).exit_code
    return api.train(args.recipe or "seed", overrides_from_args(args)).exit_code


def lr_value(text: str) -> float | str:
    """--lr: a rate, or "auto" (train finds one first: api.found_lr)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, not {text!r}") from None


def cmd_lr_find(args: argparse.Namespace) -> int:
    plot = None if args.no_plot else Path(args.plot or LR_FIND_PLOT)
    if plot is not None and args.plot is None:
        refuse_foreign([plot], "; name it with --plot to replace it, or give --no-plot")
    found = api.lr_find(
        args.recipe or "seed",
        overrides_from_args(args),
        steps=args.steps,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        plot=plot,
    )
    if args.json:
        print(json.dumps(found.as_dict()))
        return 0
    print(f"suggested learning rate {found.suggestion:.3g}: {found.reason}")
    if plot is not None:
        print(f"wrote {plot}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    out: Path | None
    if args.out:
        out = Path(args.out)
    elif is_pretrained(args.checkpoint):  # the package's own folder is not a place to write: --out DIR says where
        out = None
    elif args.images:  # the user's own labelled folder: beside the checkpoint, apart from the test set's
        out = Path(args.checkpoint).parent / f"evaluate-{Path(args.images).resolve().name}"
    else:
        out = Path(args.checkpoint).parent
    report = api.evaluate(
        args.checkpoint,
        data_dir=args.data_dir,
        images=args.images,
        device=args.device,
        out=out,
        verify=not args.no_verify,
        trust_code=args.trust_code,
        model=args.model,
    )
    what = f"images in {args.images}"
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{args.checkpoint}: {'accuracy' if args.images else 'test accuracy'} {100 * report['accuracy']:.2f}% "
        f"({round(report['accuracy'] * report['n'])}/{report['n']}{' ' + what if args.images else ''}), "
        f"mean loss {report['loss']:.4f}"
    )
    if report.get("unreadable"):
        print(f"{len(report['unreadable'])} image(s) could not be read and are not counted (listed above)")
    width = max(5, *(len(c["name"]) for c in report["per_class"]))
    print(f"{'class':>{width}}  precision  recall  support")
    for c in report["per_class"]:
        print(f"{c['name']:>{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['support']:7}")
    if out is None:
        print("no figures written: give --out DIR for confusion.png, mistakes.png and evaluation.json")
    else:
        print(f"wrote {out / 'confusion.png'}, {out / 'mistakes.png'}, {out / 'evaluation.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    model = api.load(args.checkpoint, trust_code=args.trust_code, model=args.model)
    paths, skipped = image_paths(args.images)
    if skipped:
        log.warning(
            "skipped %d file(s) in the folders given that are not images by their extension, e.g. %s",
            len(skipped),
            skipped[0],
        )
    if not paths:
        raise ImageError(f"no images in {', '.join(args.images)}")
    folder = Path(args.save_preprocessed) if args.save_preprocessed else None
    csv_file = Path(args.csv) if args.csv else None
    # refused before anything is written: an output over an input image, or (in the folder, whose
    # files the user did not name one by one) over a file mnist-cnn did not write
    targets = [] if folder is None else [preprocessed_name(folder, i, path) for i, path in enumerate(paths)]
    refuse_inputs([*targets, *([csv_file] if csv_file else [])], [Path(p) for p in paths] + [Path(args.checkpoint)])
    refuse_foreign(targets, "; choose another --save-preprocessed folder")
    failed = 0
    stdout_format = "json" if args.json else "jsonl" if args.jsonl else "text"
    with Answers(stdout_format, csv_file) as out:
        for i, (item, result) in enumerate(api.predictions(model, paths)):
            if item.error is not None:
                failed += 1
                print(f"error: {item.error}", file=sys.stderr, flush=True)
            elif folder is not None:  # created with the first good image: a failed command writes nothing
                folder.mkdir(parents=True, exist_ok=True)
                save_preprocessed(predicted(item)[0], preprocessed_name(folder, i, item.path))
            out.add(result)
    if failed and len(paths) > 1:
        print(f"{failed} of {len(paths)} images could not be read", file=sys.stderr)
    return ImageError.exit_code if failed else 0


def preprocessed_name(folder: Path, index: int, image: str) -> Path:
    """Where --save-preprocessed puts the network's input for the index-th image."""
    return folder / f"{index:03d}_{Path(image).stem}.png"


def cmd_serve(args: argparse.Namespace) -> int:
    api.serve(args.checkpoint, host=args.host, port=args.port, trust_code=args.trust_code, model=args.model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    report = api.export(
        args.checkpoint,
        args.format,
        args.out,
        check=args.check,
        data_dir=args.data_dir,
        verify=not args.no_verify,
        trust_code=args.trust_code,
        quantize=args.quantize,
        model=args.model,
    )
    if args.json:
        print(json.dumps(report))
    elif "quantized" in report:
        q = report["quantized"]
        print(
            f"wrote {report['file']} (onnx, int8); on the {q['n']:,} test images: accuracy "
            f"{100 * q['int8_accuracy']:.2f}% (fp32 {100 * q['fp32_accuracy']:.2f}%), {q['agree']:,} predictions "
            f"agree; {q['int8_bytes']:,} bytes, "
            f"{100 * q['int8_bytes'] / q['fp32_bytes']:.0f}% of the fp32 export's {q['fp32_bytes']:,}"
            + (f"; model card {report['card']}" if "card" in report else "")
        )
    else:
        print(
            f"wrote {report['file']} ({args.format}); on {report['n']} {report['inputs']}: "
            f"max |{args.format} - torch| = {report['max_abs_diff']:.2e} (tolerance {report['tolerance']:.0e}), "
            f"argmax identical: {'yes' if report['argmax_equal'] else 'no'}"
            + (f"; model card {report['card']}" if "card" in report else "")
        )
    return 0


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(parse_override(a) for a in args.arg or [])


def cmd_summary(args: argparse.Namespace) -> int:
    model = api.build(args.model, model_args(args), args.dataset)
    rows = describe(model)
    if args.json:
        print(json.dumps({"model": args.model, "layers": rows, **totals(model, rows)}))
    else:
        print(format_summary(model, rows, args.model), end="")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    require = [r.strip() for r in (args.require or "").split(",") if r.strip()]
    checks = api.check(
        args.model, max_params=args.max_params, require=require, model_args=model_args(args), dataset=args.dataset
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "ok": all(c.ok for c in checks),
                    "checks": [dataclasses.asdict(c) for c in checks],
                }
            )
        )
    else:
        for c in checks:
            print(f"{c.name:<11} {c.detail:<40} {'ok' if c.ok else 'FAILED'}")
        failed = [c.name for c in checks if not c.ok]
        print(f"{args.model}: " + (f"failed: {', '.join(failed)}" if failed else "all checks passed"))
    return 0 if all(c.ok for c in checks) else CHECK_FAILED


def cmd_plot(args: argparse.Namespace) -> int:
    print(f"wrote {api.plot(args.run_dir)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    plot = None if args.no_plot else (args.plot or FRONTIER)
    rows = api.compare(args.paths, plot=plot, trust_code=args.trust_code, plot_named=args.plot is not None)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        print(format_csv(rows), end="")
    elif args.markdown:
        print(format_markdown(rows))
    else:
        print(format_table(rows))
    if plot is not None:
        print(f"wrote {plot}", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    folder, fetched = api.download(args.dataset, args.data_dir)
    print(f"{args.dataset} verified in {folder}" + (f" ({len(fetched)} files fetched)" if fetched else ""))
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    rows = api.pretrained()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(
            f"pretrained:{r['name']:<8} {r['dataset']:<14} {r['parameters']:>7,} parameters  "
            f"test accuracy {100 * r['test_accuracy']:.2f}%  {r['bytes']:>7,} bytes  recipe {r['recipe']}"
        )
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    listed = api.recipes()
    width = max(len(cfg.recipe) for cfg, _ in listed)  # names in one column, however long
    for cfg, params in listed:
        print(
            f"{cfg.recipe:<{width}} {cfg.dataset:<14} {cfg.model:<5} {params:>6,} parameters  {cfg.epochs:>2} epochs  "
            f"batch {cfg.batch_size:<4} {cfg.optim.name} {cfg.optim.schedule:<9} {cfg.about}"
        )
    return 0


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--model and --trust-code of the commands that load a checkpoint."""
    p.add_argument(
        "--model",
        metavar="FILE.py:CLASS",
        help="the network's class, for a run trained from a Python object (its folder holds no code); "
        "any run's weights load into it",
    )
    add_trust_code(p)


def add_trust_code(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help=f"{when}import the Python file of the run's own network (or the run folder's copy, "
        "network_source.py); only for runs you trust",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `mnist-cnn` command and its subcommands (the docs' CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="mnist-cnn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mnist-cnn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_train,
        add_lr_find,
        add_tune,
        add_evaluate,
        add_predict,
        add_serve,
        add_export,
        add_networks,
        add_files,
    ):
        add(sub)
    return parser


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher",
        action="append",
        metavar="RUN_OR_CKPT",
        help="distil from this trained run folder or model file (repeatable: their probabilities averaged); "
        "--set distill.temperature=T, distill.alpha=A",
    )


# The config flags that train, tune and lr-find share: flag -> add_argument's keywords (their dests
# are api.KEYWORDS and SWITCH_KEYS); each command takes the ones that mean something to it.
CONFIG_FLAGS: dict[str, dict[str, Any]] = {
    "--recipe": {"help": "recipe name (see `mnist-cnn recipes`) or a .toml file; default seed"},
    "--model": {"help": f"a built-in network ({MODEL_NAMES}), path/to/file.py:Class or package.module:Class"},
    "--dataset": {"help": f"one of {', '.join(DATASETS)} (default mnist)"},
    "--epochs": {"type": int, "help": "epochs to train (with --resume: extend the run to N epochs)"},
    "--batch-size": {"type": int},
    "--lr": {"type": lr_value, "help": "the peak learning rate; auto: what `mnist-cnn lr-find` suggests"},
    "--seed": {"type": int},
    "--device": {"help": "auto | cpu | cuda | cuda:N"},
    "--precision": {
        "help": f"{' | '.join(CHOICES['run.precision'])}; auto (default): bf16 where the hardware computes it natively"
    },
    "--data-dir": {"help": "folder with the data set's IDX files (with --resume: where the data lives now)"},
    "--train-limit": {"type": int, "help": "use only the first N training images"},
    "--no-verify": {"action": "store_true", "help": "skip the SHA-256 check (your own IDX data)"},
    "--no-progress": {"action": "store_true", "help": "no progress bar"},
    "--set": {
        "action": "append",
        "metavar": "KEY=VALUE",
        "help": "any config field, e.g. --set optim.label_smoothing=0.1 (repeatable)",
    },
}


def add_config_flags(p: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        p.add_argument(flag, **CONFIG_FLAGS[flag])


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train a model with a recipe")
    add_config_flags(p, *CONFIG_FLAGS)
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (bitwise repeatable)")
    p.add_argument(  # default None: a recipe's run.tensorboard stands unless the flag is given
        "--tensorboard", action="store_true", default=None, help="also write TensorBoard event files in the run folder"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from RUN_DIR/last.pt")
    p.add_argument(
        "--seeds",
        metavar="LIST",
        help="one run per seed, e.g. 0-4 or 0,3,7: OUT/seed-N/ each, then seeds.csv and the final-accuracy statistics",
    )
    p.add_argument(
        "--together",
        choices=("auto", "yes", "no"),
        help="with --seeds: train the seeds stacked in one model (yes), one after another (no); "
        "auto (default): stacked on CUDA, one after another on the CPU",
    )
    add_teacher(p)
    add_trust_code(p, "with --resume: ")
    p.set_defaults(func=cmd_train)


def add_lr_find(sub: Subparsers) -> None:
    p = sub.add_parser("lr-find", help="the learning-rate range test: a suggested rate for a recipe, and its curve")
    add_config_flags(
        p, "--recipe", "--model", "--dataset", "--batch-size", "--seed", "--device", "--precision", "--data-dir"
    )
    add_config_flags(p, "--train-limit", "--no-verify", "--set")
    p.add_argument("--steps", type=int, default=STEPS, help="steps of the test (default %(default)s)")
    p.add_argument("--start-lr", type=float, default=START_LR, help="the first rate (default %(default)g)")
    p.add_argument("--end-lr", type=float, default=END_LR, help="the last rate (default %(default)g)")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help=f"the curve, replacing what is there (default {LR_FIND_PLOT}, if lr-find drew it)",
    )
    p.add_argument("--no-plot", action="store_true", help="draw nothing")
    p.add_argument("--json", action="store_true", help="print the suggestion, its reason and the curve as JSON")
    p.set_defaults(func=cmd_lr_find)


def add_tune(sub: Subparsers) -> None:
    p = sub.add_parser("tune", help="hyperparameter search with Optuna, scored on a validation split")
    p.add_argument("--study", required=True, help="the study's name: runs/tune/NAME/ holds its trials")
    p.add_argument("--recipe", default="seed", help="what every trial starts from (default seed)")
    p.add_argument("--trials", type=int, default=20, help="trials the study finishes, all workers together")
    p.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    p.add_argument("--space", metavar="FILE.toml", help="the search space (default: tune.DEFAULT_SPACE)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="default sqlite:///runs/tune/NAME.db; postgresql://... for workers on many machines",
    )
    p.add_argument("--val-size", type=int, default=10_000, help="training images held out to score trials")
    p.add_argument("--startup-trials", type=int, default=5, help="random trials before TPE and the pruner act")
    p.add_argument(
        "--max-params",
        type=int,
        metavar="N",
        help="prune trials whose network has more than N parameters before they train (not counted)",
    )
    p.add_argument(
        "--prune-after",
        type=int,
        default=PRUNER_WARMUP_EPOCHS,
        metavar="E",
        help="epochs every trial runs before the median pruner may stop it (default %(default)s); "
        "one-cycle warm-ups look poor early",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="one trial runs the recipe's own values, so the report says whether the search beat it",
    )
    p.add_argument(
        "--val-seeds",
        type=int,
        default=1,
        metavar="K",
        help="train each trial's configuration with K seeds (stacked on CUDA): its score is their mean "
        "validation accuracy, reported with its standard error (default %(default)s)",
    )
    p.add_argument("--report", action="store_true", help="best trials, importances, plots and best.toml")
    add_config_flags(p, "--model", "--dataset", "--device", "--precision", "--data-dir", "--epochs", "--batch-size")
    add_config_flags(p, "--seed", "--train-limit", "--no-verify", "--no-progress", "--set")
    p.add_argument("--lr", type=float, help="the peak learning rate of every trial (unless the space searches it)")
    add_teacher(p)
    p.set_defaults(func=cmd_tune)


def add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser("evaluate", help="test-set accuracy, per-class figures, confusion matrix, mistakes")
    p.add_argument("checkpoint", help="a .pt checkpoint or a .safetensors export")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--images",
        metavar="DIR",
        help="your own labelled images instead of the test set: one "
        "sub-folder per class (0/ ... 9/ or the class names)",
    )
    p.add_argument(
        "--out",
        help="folder for confusion.png, mistakes.png, evaluation.json "
        "(default: the checkpoint's folder; with --images, evaluate-DIR in it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true")
    add_model_source(p)
    p.set_defaults(func=cmd_evaluate)


def add_predict(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="classify your own digit images")
    p.add_argument("checkpoint", help="a .pt checkpoint or a .safetensors export")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="PNG, JPEG, BMP, GIF, ... of one digit each, or folders of them (searched recursively)",
    )
    formats = p.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    formats.add_argument("--jsonl", action="store_true", help="print JSON Lines, one object per image")
    p.add_argument("--csv", metavar="FILE", help="also write image,digit,label,probability,error to FILE")
    p.add_argument("--save-preprocessed", metavar="DIR", help="save the MNIST-style 28x28 inputs here")
    add_model_source(p)
    p.set_defaults(func=cmd_predict)


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a draw-a-digit web page and JSON API for a checkpoint")
    p.add_argument("checkpoint", help="a .pt checkpoint or a .safetensors export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add_model_source(p)
    p.set_defaults(func=cmd_serve)


def add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="ONNX / TorchScript / safetensors, checked against torch")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"))
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--data-dir", help="MNIST test images for the check")
    p.add_argument(
        "--check",
        type=int,
        default=api.EXPORT_CHECK,
        help="test images compared with torch (default %(default)s; random images when no test set is found)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="with --format onnx: int8 weights and activations (ONNX Runtime's static quantization, calibrated "
        "on training images), its accuracy against fp32 on the whole test set",
    )
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--json", action="store_true")
    add_model_source(p)
    p.set_defaults(func=cmd_export)


def add_networks(sub: Subparsers) -> None:
    p = sub.add_parser("summary", help="per layer: output shape, parameters, MACs, receptive field, jump")
    p.add_argument("--model", default="seed", help=f"{MODEL_NAMES}, path/to/file.py:Class or package.module:Class")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="a constructor argument (repeatable)")
    p.add_argument("--dataset", default="mnist", help="whose number of classes the network is built for")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("check", help="the seed's design checks for your network; exit 1 when one fails")
    p.add_argument("--model", default="seed", help=f"{MODEL_NAMES}, path/to/file.py:Class or package.module:Class")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="a constructor argument (repeatable)")
    p.add_argument("--max-params", type=int, metavar="N", help="at most N parameters")
    p.add_argument("--require", metavar="LIST", help=f"comma-separated, from {', '.join(REQUIREMENTS)}")
    p.add_argument("--dataset", default="mnist", help="whose number of classes the network is built for")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)


def add_files(sub: Subparsers) -> None:
    p = sub.add_parser("plot", help="redraw curves.png from a run folder's metrics.csv")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="runs and seed groups side by side; frontier.png: accuracy against size")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SEEDS_DIR", help="run folders and `train --seeds` folders")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="print the rows as JSON")
    what.add_argument("--csv", action="store_true", help="print the rows as CSV")
    what.add_argument("--markdown", action="store_true", help="print a Markdown table (README's results)")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help=f"where to draw, replacing what is there (default {FRONTIER}, replaced only if compare drew it)",
    )
    p.add_argument("--no-plot", action="store_true", help="draw nothing")
    add_trust_code(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("download", help="fetch and verify a data set's files")
    p.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("pretrained", help="list the trained models shipped in the package (pretrained:NAME)")
    p.add_argument("--json", action="store_true", help="print them, with the commands that made them, as JSON")
    p.set_defaults(func=cmd_pretrained)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_logging():
        return run(args)


@contextmanager
def cli_logging() -> Iterator[None]:
    """The command's messages: warnings as "LEVEL: text" on stderr, its commentary (mnist_cnn.say) as plain
    lines; the loggers as they were afterwards (main() may run inside a notebook's or a test's process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    commentary = logging.getLogger(SAY)
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in (log, commentary)]
    for logger, handlers in ((log, [handler]), (commentary, plain_handlers())):
        logger.handlers[:] = handlers  # our messages only; libraries' INFO chatter stays off
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def run(args: argparse.Namespace) -> int:
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
    except BrokenPipeError:  # `mnist-cnn recipes | head`: the reader left; nothing to say, as cat would not
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed that way
