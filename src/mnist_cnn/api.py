"""The Python API, for notebooks and scripts. The CLI is built on the same functions.

    import mnist_cnn
    run = mnist_cnn.train(recipe="fast", epochs=2, out="runs/nb")  # a Run: metrics, run_dir, checkpoint, model
    model = mnist_cnn.load(run.checkpoint)      # [0, 1] images (N, 1, 28, 28) -> (N, classes) log-probabilities
    report = mnist_cnn.evaluate(run.checkpoint)  # the dict `mnist-cnn evaluate --json` prints
    answers = mnist_cnn.predict(model, ["seven.png", "my_digits/"])  # `predict --json`'s objects, or
    answers = mnist_cnn.predict(model, [pil_image, array])           # in-memory images (one kind per call)
    answers = mnist_cnn.predict(model, x_test)   # a uint8 (N, 28, 28) array or tensor: N answers, batched
    report = mnist_cnn.evaluate(model, images=x_test, labels=y_test)

Errors are the project's exceptions (mnist_cnn.errors), with the CLI's messages. A checkpoint
of your own network (model="file.py:Class") loads only with trust_code=True: loading runs
that Python file, or the copy in the run folder (`--trust-code` on the command line).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from mnist_cnn.checkpoint import LAST_FILE, load_checkpoint, load_model_file, unwrap
from mnist_cnn.config import Config, list_recipes, load_config
from mnist_cnn.data.contract import PIXEL_MAX, Normalized, checked_images
from mnist_cnn.data.datasets import MNIST, Dataset, get_dataset
from mnist_cnn.data.download import download as fetch
from mnist_cnn.data.idx import IMAGE_SIZE
from mnist_cnn.data.splits import has_split, load_dataset, load_split, resolve_data_dir
from mnist_cnn.device import keeps_process_settings, pick_device
from mnist_cnn.errors import ConfigError, ImageError, OutputError
from mnist_cnn.files import atomic_path, refuse_foreign, refuse_inputs
from mnist_cnn.inference.compare import ANCHORS, group_row, read_group
from mnist_cnn.inference.evaluate import confident_mistakes, full_report, predict_log_probs
from mnist_cnn.inference.image_files import Item, digits_of, evaluate_folder, image_paths, predict_many
from mnist_cnn.inference.predict import answer, predict_log_probs_of, preprocess
from mnist_cnn.networks.reference import (
    GivenModel,
    canonical,
    check_contract,
    config_network_size,
    create,
    given_networks,
    locate,
    reference_of,
)
from mnist_cnn.networks.summary import REQUIREMENTS, Check, run_checks
from mnist_cnn.plots import draw_curves, draw_frontier, draw_lr_find
from mnist_cnn.say import say, speaking
from mnist_cnn.training.card import CARD, has_card_sources, write_card
from mnist_cnn.training.distill import load_teacher
from mnist_cnn.training.distributed import World
from mnist_cnn.training.lr_find import END_LR, START_LR, STEPS, LrFind, range_test
from mnist_cnn.training.run import prepare, resume_run, train_run
from mnist_cnn.training.rundir import RUN_LAYOUT, RunDir, default_run_dir, held, read_metrics
from mnist_cnn.training.seeds import parse_seeds, run_seeds
from mnist_cnn.tuning.study import PRUNER_WARMUP_EPOCHS

log = logging.getLogger("mnist_cnn")
MISTAKES_SHOWN = 48  # misclassified images drawn in mistakes.png
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's state: not parameters
MIN_STEPS = 20  # of lr_find: the slope leaves out the first and the last points
EVAL_BATCH = 1000  # in-memory images per forward pass in predict and evaluate
PHOTO_CHANNELS = (1, 3, 4)  # an (H, W, C) array with so many channels is one photo, not a batch
EVALUATION_FILES = ("confusion.png", "mistakes.png", "evaluation.json", CARD)  # what evaluate may write
# train()'s keywords -> config keys (the CLI's flags); any other field goes in overrides={"optim.ema": 0.999}
KEYWORDS = {
    "model": "model",
    "dataset": "dataset",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "optim.lr",
    "seed": "run.seed",
    "device": "run.device",
    "data_dir": "run.data_dir",
    "out": "run.out",
    "train_limit": "run.train_limit",
    "precision": "run.precision",
    "progress": "run.progress",
    "tensorboard": "run.tensorboard",
    "together": "run.together",
    "teacher": "distill.teachers",  # one run folder / model file, or a list of them (their probabilities averaged)
}


@dataclass
class Run:
    """A finished (or stopped) training run."""

    run_dir: Path
    checkpoint: Path  # run_dir / LAST_FILE
    metrics: list[dict]  # one row per epoch, as in metrics.csv
    model: nn.Module  # the evaluated network (the average with optim.ema), in eval mode, taking [0, 1] images:
    # what load(checkpoint) returns
    finished: bool  # False when a Ctrl-C / SIGTERM stopped it (resume with `mnist-cnn train --resume run_dir`)
    config: Config
    exit_code: int = 0  # what `mnist-cnn train` exits with: 0, or 128 + the signal that stopped it


@dataclass
class Seeds:
    """The runs of train_seeds(): OUT/seed-N/ each, and their final-epoch statistics."""

    out: Path
    summary: dict  # seeds-summary.json: final_test_acc_mean, _std, _min, _max (final_val_* with run.test=false), ...
    results: list[dict]  # seeds.csv's rows: seed, final_test_acc, final_test_loss, ...
    finished: bool  # False when a Ctrl-C / SIGTERM stopped it: the same call continues
    exit_code: int = 0  # what `mnist-cnn train --seeds` exits with: 0, or 128 + the signal that stopped it


def chatty(keywords: dict[str, Any], overrides: dict[str, Any] | None) -> bool:
    """Whether a call prints what it does (progress=False: nothing; mnist_cnn.say)."""
    progress = keywords.get("progress")
    return bool((overrides or {}).get("run.progress", True) if progress is None else progress)


@contextmanager
def handed(keywords: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """keywords with a network object (model=Net, model=net, model=make_net) replaced by its object:
    reference, the object handed over (networks.reference.given_networks) for the block."""
    given = keywords.get("model")
    if given is None or isinstance(given, str):
        yield keywords
        return
    reference = reference_of(given)
    with given_networks({reference: given}):
        yield {**keywords, "model": reference}


def config_of(recipe: str, overrides: dict[str, Any] | None, keywords: dict[str, Any]) -> Config:
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise ConfigError(
            f"unknown keyword(s) {', '.join(unknown)}; use one of {', '.join(KEYWORDS)} "
            "or overrides={'section.key': value}"
        )
    if isinstance(keywords.get("teacher"), (str, Path)):
        keywords = {**keywords, "teacher": [str(keywords["teacher"])]}
    elif "teacher" in keywords:
        keywords = {**keywords, "teacher": [str(t) for t in keywords["teacher"]]}
    return load_config(recipe, {**{KEYWORDS[k]: v for k, v in keywords.items()}, **(overrides or {})})


@keeps_process_settings
def train_seeds(
    recipe: str = "seed", seeds: str | Iterable[int] = "0-4", overrides: dict[str, Any] | None = None, **keywords: Any
) -> Seeds:
    """`train --seeds`: one run per seed and the statistics of their final epochs; together="yes"
    trains them stacked in one model (default "auto": on CUDA). A call with the same out continues."""
    if "seed" in keywords:
        raise ConfigError("give either seed= (train) or seeds= (train_seeds), not both")
    if isinstance(keywords.get("model"), nn.Module):
        raise ConfigError(
            "train_seeds needs the network's class (or a factory): each seed builds its own, from its own seed; "
            "an instance would carry one seed's weights into all"
        )
    with handed(keywords) as keywords, speaking(chatty(keywords, overrides)):
        return seeds_of(recipe, seeds, overrides, keywords)


def seeds_of(recipe: str, seeds: str | Iterable[int], overrides: dict[str, Any] | None, keywords: dict) -> Seeds:
    keywords, overrides = found_lr(recipe, overrides, keywords)  # lr="auto": once, from the recipe's own seed
    cfg = config_of(recipe, overrides, keywords)
    cfg.run.out = cfg.run.out or str(default_run_dir())
    asked = {**{KEYWORDS.get(k, k): v for k, v in keywords.items()}, **(overrides or {})}
    named = [key for key, value in asked.items() if value != "auto"]  # "auto" leaves the choice to the device
    code = run_seeds(cfg, parse_seeds(seeds) if isinstance(seeds, str) else list(seeds), named)
    out = Path(cfg.run.out)
    if code != 0:
        return Seeds(out, {}, [], False, code)
    with open(out / "seeds.csv", newline="") as f:
        results = [
            {k: float(v) if k.startswith("final") or k == "seconds" else int(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    return Seeds(out, json.loads((out / "seeds-summary.json").read_text()), results, True)


@keeps_process_settings
def train(recipe: str = "seed", overrides: dict[str, Any] | None = None, **keywords: Any) -> Run:
    """Train a recipe; keywords are the CLI's flags (epochs=2, lr=1e-3, out="runs/x", ...),
    `overrides` any config field by its dotted key ({"optim.label_smoothing": 0.1}).
    model= is a built-in name or a file.py:Class reference, or your own network as a Python object
    (a class defined in a notebook cell, say): a class or a zero-argument factory is built under the
    run's seed, as the built-ins are; an instance is trained as it is, in place, from the weights you
    gave it (the checkpoint records which: network.given). The run folder records its class, module
    and source where inspect can read it; load it back with load(path, model=YourClass)."""
    with handed(keywords) as keywords, speaking(chatty(keywords, overrides)):
        keywords, overrides = found_lr(recipe, overrides, keywords)
        cfg = config_of(recipe, overrides, keywords)
        outcome = train_run(cfg)
    dataset = get_dataset(cfg.dataset)
    trained = unwrap(outcome.state.evaluated).cpu()
    # in the layout load() gives: a channels_last run's copy would pick other kernels (outputs 1e-6 apart)
    trained.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # missing in torch's stub
    return Run(
        outcome.run_dir,
        outcome.run_dir / LAST_FILE,
        list(outcome.state.metrics),
        described(trained.eval(), dataset, cfg),
        outcome.code == 0,
        cfg,
        outcome.code,
    )


@keeps_process_settings
def resume(
    run_dir: str | Path,
    *,
    device: str | None = None,
    progress: bool | None = None,
    data_dir: str | Path | None = None,
    trust_code: bool = False,
    epochs: int | None = None,
) -> int:
    """`train --resume`: continue an interrupted run from run_dir/last.pt, bitwise where it left off
    (on the CPU with --deterministic). Only where it runs may change (device, progress bar, where the
    data lives), and its length: epochs=N extends a finished run (or changes an unfinished one's end)
    where the schedule does not depend on the length (step, constant; onecycle and cosine are refused).
    Returns the exit code: 0 when it finished, 128 + signal when stopped again;
    load(run_dir / "last.pt") then gives the model."""
    where = str(data_dir) if data_dir else None
    with speaking(progress is not False):
        return resume_run(Path(run_dir), device, progress, where, trust_code, epochs=epochs)


class Loaded(Normalized):
    """load()'s module: the network with its input contract around it, carrying what it was trained on.
    It checks what it is given (data.contract.checked_images): uint8 0..255 or floats in [0, 1],
    (N, 28, 28) or (N, 1, 28, 28); normalized or 0..255 float images are an ImageError, never a
    silently wrong answer."""

    if TYPE_CHECKING:  # declared for mypy only: torch.jit reads class annotations and knows no Dataset
        dataset: Dataset
        classes: tuple[str, ...]
        config: Config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(checked_images(images))


def described(model: nn.Module, dataset: Dataset, cfg: Config) -> Loaded:
    """The network with its input contract around it, carrying what it was trained on."""
    wrapped = Loaded(model, (dataset.mean, dataset.std)).eval()
    wrapped.dataset, wrapped.classes, wrapped.config = dataset, dataset.classes, cfg
    return wrapped


def load(path: str | Path, *, trust_code: bool = False, model: GivenModel | str | None = None) -> Normalized:
    """A checkpoint (.pt) or safetensors export as a module in eval mode: images (N, 1, 28, 28) or
    (N, 28, 28), uint8 0..255 or floats in [0, 1] -> (N, classes) log-probabilities; anything else
    is an ImageError. .classes, .dataset and .config say the rest.
    trust_code=True allows a user network's Python (the file it names, or the run folder's copy) to run.
    model= gives the network yourself: the class (or an instance, or a factory) of a run trained from a
    Python object, whose folder holds no code, or a file.py:Class reference."""
    built, cfg, _ = load_model_file(path, trust_code, model)
    return described(built, get_dataset(cfg.dataset), cfg)


def network(
    source: str | Path | nn.Module, trust_code: bool = False, model: GivenModel | str | None = None
) -> tuple[nn.Module, Dataset, Config | None]:
    """(the raw network, its data set, its config) from a path (model= as in load()) or a model:
    load()'s, or any network returning logits for normalized MNIST images."""
    if isinstance(source, Normalized):
        return source.model, getattr(source, "dataset", MNIST), getattr(source, "config", None)
    if isinstance(source, nn.Module):
        return source, MNIST, None  # put in eval mode while borrowed(), then handed back as it was
    built, cfg, _ = load_model_file(source, trust_code, model)
    return built, get_dataset(cfg.dataset), cfg


@keeps_process_settings
def evaluate(
    source: str | Path | nn.Module,
    *,
    data_dir: str | Path | None = None,
    images: str | Path | np.ndarray | torch.Tensor | None = None,
    labels: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    verify: bool = True,
    trust_code: bool = False,
    model: GivenModel | str | None = None,
) -> dict:
    """Accuracy, per-class precision/recall, confusion matrix on the data set's test split, on
    a labelled folder `images` (one sub-folder per class), or on an in-memory batch `images`
    ((N, 28, 28) or (N, 1, 28, 28), uint8 or floats in [0, 1], an array or a tensor) with its
    `labels` (N class indices); with `out`, also confusion.png, mistakes.png and evaluation.json
    there. Returns what `evaluate --json` prints. model= as in load()."""
    net, dataset, cfg = network(source, trust_code, model)
    if out is None:
        with borrowed(net, pick_device(device)):
            return evaluated(net, dataset, cfg, data_dir, images, labels, verify)[0]
    folder = Path(out)
    outputs = [folder / name for name in EVALUATION_FILES]
    refuse_inputs(outputs, [] if isinstance(source, nn.Module) else [Path(source)])
    refuse_foreign(outputs, "; give evaluate another --out")
    with held(folder) as run, borrowed(net, pick_device(device)):  # a folder another process writes: refused first
        report, log_probs, truth, shown, what = evaluated(net, dataset, cfg, data_dir, images, labels, verify)
        name = type(source).__name__ if isinstance(source, nn.Module) else Path(source).name
        model_file = name if isinstance(source, nn.Module) else beside(Path(source), folder)
        write_report(run, {**report, "checkpoint": model_file}, log_probs, truth, shown, dataset, name, what)
        if images is None and has_card_sources(folder):  # a run's folder: its card takes the table if it fits
            write_card(folder)
    return report


def beside(path: Path, folder: Path) -> str:
    """`path` as evaluation.json in `folder` names it: its name when it is in that folder, else in full."""
    path = path.resolve()
    return path.name if path.parent == folder.resolve() else str(path)


@contextmanager
def borrowed(model: nn.Module, device: torch.device):
    """The model on `device` in eval mode for a while; a caller's module gets its device and mode back."""
    home, training = next(model.parameters()).device, model.training
    try:
        yield model.to(device).eval()
    finally:
        model.to(home).train(training)


def evaluated(model: nn.Module, dataset: Dataset, cfg: Config | None, data_dir, images, labels, verify: bool):
    """(report, log-probabilities, labels, the images shown, what they were) on the test split, a
    folder or an in-memory batch."""
    batch = in_memory_batch(images, alone=False)
    device_of = next(model.parameters()).device
    if batch is not None:
        labels = checked_labels(labels, batch.shape[0], dataset)
        log_probs = predict_log_probs(model, batch.to(device_of), EVAL_BATCH, norm=(dataset.mean, dataset.std)).cpu()
        shown = batch[:, 0].mul(PIXEL_MAX).round().to(torch.uint8)  # (N, 28, 28) for mistakes.png
        what, extra = f"{batch.shape[0]:,} in-memory images", dict[str, Any]()
    elif labels is not None:
        raise ConfigError("labels go with in-memory images (an array or tensor); a folder's labels are its sub-folders")
    elif images is not None:
        log_probs, labels, shown, extra = evaluate_folder(model, Path(images), dataset)
        what = f"images in {images}"
    else:
        folder = resolve_data_dir(data_dir, cfg.run.data_dir if cfg else None, dataset.name)
        shown, labels = load_split(folder, "test", verify, dataset, download_missing=True)
        log_probs = predict_log_probs(
            model, shown.to(device_of), cfg.eval_batch_size if cfg else 1000, norm=(dataset.mean, dataset.std)
        ).cpu()
        what, extra = f"{dataset.name} test images", {}
    report = full_report(log_probs, labels, dataset.classes)
    report["dataset"] = dataset.name
    report.update(extra)
    return report, log_probs, labels, shown, what


def write_report(
    run: RunDir,
    report: dict,
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    shown: torch.Tensor,
    dataset: Dataset,
    name: str,
    what: str,
) -> None:
    """confusion.png, mistakes.png (the most confident mistakes, as the network saw them) and evaluation.json."""
    from mnist_cnn.plots import draw_confusion, draw_mistakes

    wrong = confident_mistakes(log_probs, labels, MISTAKES_SHOWN)
    run.save_figure(
        "confusion.png",
        lambda f: draw_confusion(
            report["confusion"],
            f,
            classes=list(dataset.classes),
            title=f"{name}: {100 * report['accuracy']:.2f}% of {report['n']:,} {what}",
        ),
    )
    run.save_figure(
        "mistakes.png",
        lambda f: draw_mistakes(
            shown[wrong["index"]],
            [dataset.classes[c] for c in wrong["true"]],
            [dataset.classes[c] for c in wrong["pred"]],
            wrong["prob"],
            f,
            what=what,
        ),
    )
    text = json.dumps({**report, "images": what}, indent=1)
    run.save_figure("evaluation.json", lambda f: f.write(text.encode()))


def predictions(
    source: str | Path | nn.Module,
    images: Iterable,
    *,
    trust_code: bool = False,
    model: GivenModel | str | None = None,
) -> Iterator[tuple[Item, dict]]:
    """(Item, `predict --json` object) per image, in order, batch by batch: file paths and
    folders; PIL images or arrays / tensors of one photo each ((H, W) or (H, W, 3), uint8, or
    float in [0, 1]), preprocessed like files; or one batch of MNIST-format images, an array or
    tensor (N, 28, 28) or (N, 1, 28, 28), uint8 or floats in [0, 1], taken as they are in one
    forward pass per 1000 (answers named "[0]", "[1]", ...). A bad file's object is
    {"image": ..., "error": ...}; a batch outside the contract is an ImageError. model= as in load()."""
    net, dataset, _ = network(source, trust_code, model)
    with borrowed(net, next(net.parameters()).device):
        yield from predicted(net, dataset, images)


def in_memory_batch(images: Any, alone: bool = True) -> torch.Tensor | None:
    """An array or tensor holding a batch of MNIST-format images, (N, 28, 28) or (N, 1, 28, 28), as
    (N, 1, 28, 28) floats in [0, 1] (checked: data.contract.checked_images); None for anything else.
    alone=True (predict): an (H, W) or (H, W, 3) array is one photo, preprocessed like a file;
    alone=False (evaluate): any array or tensor must be a batch."""
    if isinstance(images, np.ndarray):
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(images))
        except TypeError:
            raise ImageError(f"images of dtype {images.dtype}: give uint8 0..255 or floats in [0, 1]") from None
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
    else:
        return None
    one_photo = tensor.ndim == 2 or (tensor.ndim == 3 and tensor.shape[-1] in PHOTO_CHANNELS)
    return None if alone and one_photo else checked_images(tensor)


def checked_labels(labels: Any, n: int, dataset: Dataset) -> torch.Tensor:
    """evaluate's labels of an in-memory batch as (N,) int64 class indices, or a one-line error."""
    if labels is None:
        raise ConfigError("evaluate on in-memory images needs labels: one class index per image")
    try:
        values = torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError("labels must be class indices (an array, tensor or list of ints)") from None
    if values.shape != (n,) or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ConfigError(
            f"labels must be {n} integer class indices, one per image; got {values.dtype} {tuple(values.shape)}"
        )
    if n and (values.min() < 0 or values.max() >= dataset.num_classes):
        raise ConfigError(f"labels must be class indices 0..{dataset.num_classes - 1} of {dataset.name}")
    return values.long()


def predicted(model: nn.Module, dataset: Dataset, images) -> Iterator[tuple[Item, dict]]:
    batch = in_memory_batch(images)
    if batch is not None:  # one forward per EVAL_BATCH images, no decoding: they are MNIST-format already
        device_of = next(model.parameters()).device
        all_log_probs = predict_log_probs(model, batch.to(device_of), EVAL_BATCH, norm=(dataset.mean, dataset.std))
        for i, out in enumerate(all_log_probs.cpu()):
            item = Item(f"[{i}]", digit=batch[i, 0].numpy(), log_probs=out)
            yield item, item_answer(item, dataset)
        return
    if isinstance(images, torch.Tensor):  # one picture as a tensor: as the array it holds
        images = images.detach().cpu().numpy()
    images = [images] if isinstance(images, (str, Path, Image.Image, np.ndarray)) else list(images)
    if all(isinstance(i, (str, Path)) for i in images):
        paths, _ = image_paths([str(i) for i in images])
        if not paths:
            raise ImageError(f"no images in {', '.join(map(str, images))}")
        for item in predict_many(model, paths, dataset):
            yield item, item_answer(item, dataset)
        return
    items = [in_memory(image, i, dataset) for i, image in enumerate(images)]
    good = [item for item in items if item.error is None]
    if good:
        for item, out in zip(good, predict_log_probs_of(model, digits_of(good), (dataset.mean, dataset.std))):
            item.log_probs = out
    for item in items:
        yield item, item_answer(item, dataset)


def in_memory(image, index: int, dataset: Dataset) -> Item:
    """A PIL image or an array as an Item, preprocessed like a file; named by its position."""
    name = f"[{index}]"
    if isinstance(image, (str, Path)):
        raise ConfigError("give either file paths or in-memory images in one call, not both")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        a = image.squeeze()
        if a.dtype.kind == "f" and a.size and not (a.min() >= 0 and a.max() <= 1):  # NaN fails both
            return Item(name, error=f"{name}: float images must be in [0, 1]; pass uint8 0..255 or divide by 255")
        image = Image.fromarray(np.round(a * 255).astype(np.uint8) if a.dtype.kind == "f" else a)
    try:
        return Item(name, digit=preprocess(image, name, dataset.preprocessing))
    except ImageError as e:
        return Item(name, error=str(e))


def item_answer(item: Item, dataset: Dataset) -> dict:
    if item.error is not None:
        return {"image": item.path, "error": item.error}
    return answer(item.path, item.probs, dataset.classes)


def predict(
    source: str | Path | nn.Module,
    images: Iterable,
    *,
    trust_code: bool = False,
    model: GivenModel | str | None = None,
) -> list[dict]:
    """`predict --json`'s objects for files, folders, PIL images, arrays, tensors, or a batch of N
    MNIST-format images (N answers; see predictions())."""
    return [result for _, result in predictions(source, images, trust_code=trust_code, model=model)]


# -- the other commands: each CLI command is one of these functions and its printing ---------------------------

SERVE_THREADS = 1  # torch threads per request in `serve`
EXPORT_CHECK = 1000  # test images an export is compared with torch on
QUANTIZE = ("int8",)  # export --quantize: ONNX Runtime's static quantization
CALIBRATION = 1000  # training images an int8 export's activation ranges are calibrated on


def serve(
    checkpoint: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    trust_code: bool = False,
    model: GivenModel | str | None = None,
) -> None:
    """`serve`: the draw-a-digit page and its JSON API for a checkpoint or export, until Ctrl+C.
    port=0 picks a free port (printed); a host other than 127.0.0.1 is reachable from the network."""
    try:
        from mnist_cnn.serving.app import create_app, describe_model
        from mnist_cnn.serving.app import serve as run_server
    except ImportError:
        raise ConfigError("serve needs the web extra: pip install 'mnist-cnn[web]'") from None
    net, cfg, ckpt = load_model_file(checkpoint, trust_code, model)
    dataset = get_dataset(cfg.dataset)
    # one image per request: its ops are too small to split across cores, and concurrent requests
    # already run in parallel worker threads (benchmarks/serve.py, 2 cores: 170-173 requests/s, 154-157 with 2)
    torch.set_num_threads(SERVE_THREADS)
    about = describe_model(net, cfg, ckpt, dataset, Path(checkpoint).name)
    accuracy = "" if about["test_accuracy"] is None else f", test accuracy {100 * about['test_accuracy']:.2f}%"
    run_server(
        create_app(net, dataset, about),
        host,
        port,
        f"{about['model']} ({about['parameters']:,} parameters{accuracy})",
    )


def export(
    checkpoint: str | Path,
    format: str,
    out: str | Path,
    *,
    check: int = EXPORT_CHECK,
    data_dir: str | Path | None = None,
    verify: bool = True,
    trust_code: bool = False,
    quantize: str | None = None,
    model: GivenModel | str | None = None,
) -> dict[str, Any]:
    """`export`: write an ONNX, TorchScript or safetensors file and check it against torch on `check`
    test images (random images when the data set's test files are not there: an export never downloads).
    quantize="int8" (ONNX only): ONNX Runtime's static quantization, calibrated on CALIBRATION training
    images (never the test set), and compared with the fp32 model on the whole test set (report["quantized"]).
    Returns what `export --json` prints: file, n, max_abs_diff, tolerance, argmax_equal, inputs, ..."""
    from mnist_cnn.inference.export import Int8
    from mnist_cnn.inference.export import export as write_export

    if check < 1:
        raise ConfigError(f"--check must be at least 1, got {check}")
    if quantize is not None and (quantize not in QUANTIZE or format != "onnx"):
        raise ConfigError(f"--quantize {quantize}: choose {', '.join(QUANTIZE)}, with --format onnx")
    run_dir, out = Path(checkpoint).parent, Path(out)
    card_path = Path(f"{out}.{CARD}")
    # refused before anything is written: the export over its checkpoint or any file of its run folder
    # (--out names a file on purpose, so another file there is replaced; the card beside it is not named)
    refuse_inputs([out, card_path], [Path(checkpoint)])
    if out.resolve().parent == run_dir.resolve() and out.name in RUN_LAYOUT:
        raise OutputError(f"{out} is a file of the run folder {run_dir}; write the export elsewhere")
    refuse_foreign([card_path], "; give export another --out")
    net, cfg, ckpt = load_model_file(checkpoint, trust_code, model)
    if quantize is None:
        images, source = check_images(cfg, check, data_dir, verify)
        report = write_export(net, cfg, ckpt, format, out, images)
    else:
        calibration, images, labels = quantization_images(cfg, data_dir, verify)
        source = "test images"
        report = write_export(net, cfg, ckpt, format, out, images, Int8(calibration, labels))
    report["inputs"] = source
    if Path(checkpoint).name == LAST_FILE and has_card_sources(run_dir):  # the model the run's card describes
        card = write_card(run_dir, card_path, report)
        if card is not None:
            report["card"] = str(card)
    return report


def quantization_images(
    cfg: Config, data_dir: str | Path | None, verify: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration images, test images, test labels) of the model's data set for an int8 export: the
    first CALIBRATION training images (the scales are fitted on them, never on the test set), and the
    whole test split the int8 model's accuracy is measured on. Both must be there: never downloads."""
    dataset = get_dataset(cfg.dataset)
    folder = resolve_data_dir(data_dir, cfg.run.data_dir, dataset.name)
    for split in ("train", "test"):
        if not has_split(folder, split, dataset):
            raise ConfigError(
                f"--quantize needs {dataset.name}'s {split} images in {folder} (calibration on training images, "
                "accuracy on the test set): give --data-dir, or run mnist-cnn download"
            )
    calibration = load_split(folder, "train", verify, dataset)[0][:CALIBRATION]
    images, labels = load_split(folder, "test", verify, dataset)
    return calibration, images, labels


def check_images(cfg: Config, n: int, data_dir: str | Path | None, verify: bool) -> tuple[torch.Tensor, str]:
    """(n, 28, 28) uint8 images an export is checked on, and what they are: the first n test images
    of the model's data set when its files are there, else n random images (a warning says so)."""
    dataset = get_dataset(cfg.dataset)
    folder = resolve_data_dir(data_dir, cfg.run.data_dir, dataset.name)
    if has_split(folder, "test", dataset):  # never downloads: an export needs no data set
        return load_split(folder, "test", verify, dataset)[0][:n], "test images"
    log.warning("no %s test images in %s: checking the export on %d random images instead", dataset.name, folder, n)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator), "random images"


@dataclass
class TuneOptions:
    """How `tune` searches, besides the recipe: the CLI's flags of the same names."""

    trials: int = 20  # trials the study finishes, all workers together
    timeout: float | None = None  # stop starting trials after this many seconds
    space: str | None = None  # a search-space TOML file; None: tuning.study.DEFAULT_SPACE
    storage: str | None = None  # default sqlite:///runs/tune/STUDY.db; postgresql://... for many machines
    val_size: int = 10_000  # training images held out to score trials
    startup_trials: int = 5  # random trials before TPE and the pruner act
    max_params: int | None = None  # trials whose network is larger are pruned before they train
    prune_after: int = PRUNER_WARMUP_EPOCHS  # epochs every trial runs before the median pruner may stop it
    baseline: bool = False  # one trial runs the recipe's own values
    val_seeds: int = 1  # seeds per trial; its score is their mean validation accuracy, with a standard error


@keeps_process_settings
def tune(
    study: str,
    recipe: str = "seed",
    options: TuneOptions | None = None,
    overrides: dict[str, Any] | None = None,
    **keywords: Any,
) -> int:
    """`tune`: an Optuna study of `recipe` (keywords and overrides as in train(), for every trial),
    scored on a validation split; every setting is checked before anything runs. Returns the exit
    code; tune_report() then writes the best trial's recipe."""
    from mnist_cnn.tuning import study as tuning

    o = options or TuneOptions()
    tuning.check_budget(o.trials)
    base = config_of(recipe, {**(overrides or {}), "val_size": o.val_size}, keywords)  # every value checked
    overrides = {**{KEYWORDS[k]: v for k, v in keywords.items()}, **(overrides or {}), "val_size": o.val_size}
    if base.val_size <= 0:
        raise ConfigError("--val-size must be > 0: tune scores trials on a validation split")
    if o.max_params is not None and o.max_params < 1:
        raise ConfigError(f"--max-params must be at least 1, got {o.max_params}")
    space = tuning.read_space(o.space, base)
    baseline = tuning.baseline_values(base, space) if o.baseline else None
    if o.prune_after < 0:
        raise ConfigError(f"--prune-after must be >= 0 epochs, got {o.prune_after}")
    if o.val_seeds < 1:
        raise ConfigError(f"--val-seeds must be at least 1, got {o.val_seeds}")
    load_teacher(base, torch.device("cpu"))  # a teacher that does not fit is refused before any trial
    spec = tuning.Study(
        study,
        recipe,
        overrides,
        space,
        o.storage or tuning.default_storage(study),
        tuning.TUNE_DIR / study,
        o.trials,
        o.startup_trials,
        o.max_params,
        baseline,
        o.prune_after,
        o.val_seeds,
    )
    with speaking(chatty(keywords, overrides)):
        return tuning.run(spec, o.timeout)


@keeps_process_settings
def lr_find(
    recipe: str = "seed",
    overrides: dict[str, Any] | None = None,
    *,
    steps: int = STEPS,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    plot: str | Path | None = None,
    **keywords: Any,
) -> LrFind:
    """`lr-find`: Smith's learning-rate range test of a recipe (keywords and overrides as in train()):
    `steps` steps of its optimizer, augmentation and data from its seed's initial weights, the rate
    growing from start_lr to end_lr, stopped when the smoothed loss diverges. Returns an LrFind whose
    .suggestion is the rate of steepest descent of the smoothed loss and .reason says how it was read;
    with `plot`, draws the curve there. Writes nothing else and touches no model of yours."""
    if steps < MIN_STEPS or not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find needs at least {MIN_STEPS} steps and 0 < start rate < end rate")
    if plot is not None and not Path(plot).parent.is_dir():
        raise ConfigError(f"cannot write {plot}: no folder {Path(plot).parent}")
    if isinstance(keywords.get("model"), nn.Module):  # the range test trains a copy: yours stays as it is
        keywords = {**keywords, "model": copy.deepcopy(keywords["model"])}
    with handed(keywords) as keywords:  # model=Net: a fresh one, built from the recipe's seed
        cfg = config_of(recipe, overrides, {k: v for k, v in keywords.items() if k != "lr"})
        device, data = prepare(cfg, World())
        found = range_test(cfg, data, device, start_lr, end_lr, steps)
    if plot is not None:
        with atomic_path(Path(plot)) as tmp, open(tmp, "wb") as f:
            draw_lr_find(found.lrs, found.losses, found.smoothed, found.suggestion, f)
    return found


def found_lr(
    recipe: str, overrides: dict[str, Any] | None, keywords: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """train(lr="auto") / train --lr auto: (keywords, overrides) with the rate set to lr_find's suggestion
    for this very recipe and settings (said on the output); config.toml records the rate, and how it
    was read in optim.lr_found."""
    overrides = dict(overrides or {})
    if keywords.get("lr") != "auto" and overrides.get("optim.lr") != "auto":
        return keywords, overrides
    keywords = {k: v for k, v in keywords.items() if k != "lr"}
    overrides.pop("optim.lr", None)
    found = lr_find(recipe, overrides, **{k: v for k, v in keywords.items() if k != "out"})
    rate = float(f"{found.suggestion:.3g}")
    say(f"--lr auto: {rate:.3g} ({found.reason})")
    return keywords, {**overrides, "optim.lr": rate, "optim.lr_found": found.reason}


def tune_report(study: str, storage: str | None = None) -> int:
    """`tune --report`: best trials, failed ones and why, importances, plots and runs/tune/STUDY/best.toml,
    all read from the study's storage."""
    from mnist_cnn.tuning import study as tuning
    from mnist_cnn.tuning.report import report

    return report(
        tuning.Study(study, "seed", {}, [], storage or tuning.default_storage(study), tuning.TUNE_DIR / study, 1)
    )


@keeps_process_settings
def build(
    model: str | GivenModel = "seed", model_args: dict[str, Any] | None = None, dataset: str = "mnist"
) -> nn.Module:
    """The network `model` names (seed, tiny, file.py:Class, package.module:Class) or is (your own
    class, instance or factory), built with its constructor arguments for the data set's classes and
    checked against the input contract, as `train` builds it."""
    num_classes = get_dataset(dataset).num_classes
    with handed({"model": model}) as named:
        reference = canonical(named["model"])
        built = create(locate(reference), num_classes, model_args or {})
    check_contract(built, num_classes, torch.device("cpu"), reference)
    return built


@keeps_process_settings
def check(
    model: str | GivenModel = "seed",
    *,
    max_params: int | None = None,
    require: Iterable[str] = (),
    model_args: dict[str, Any] | None = None,
    dataset: str = "mnist",
) -> list[Check]:
    """`check`: the seed notebook's design checks for a network: at most max_params parameters and
    the parts in `require` (batchnorm, dropout, fc, gap). Each Check has name, ok and detail."""
    require = [r for r in require]
    unknown = [r for r in require if r not in REQUIREMENTS]
    if unknown:
        raise ConfigError(f"--require {unknown[0]!r}: choose from {', '.join(REQUIREMENTS)}")
    if max_params is None and not require:
        raise ConfigError("nothing to check: give --max-params N and/or --require batchnorm,dropout,fc|gap")
    return run_checks(build(model, model_args, dataset), max_params, require)


def download(dataset: str = "mnist", data_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """`download`: fetch what is missing of a data set and verify all of its files.
    Returns (the data folder, the files fetched)."""
    ds = get_dataset(dataset)
    folder = resolve_data_dir(data_dir, dataset=ds.name)
    fetched = fetch(folder, dataset=ds)
    load_dataset(folder, download_missing=False, dataset=ds)  # verify everything, not only what was fetched
    return folder, fetched


def compare(
    paths: str | Path | Iterable[str | Path],
    *,
    plot: str | Path | None = "frontier.png",
    trust_code: bool = False,
    plot_named: bool = True,
) -> list[dict[str, Any]]:
    """`compare`: one row per run folder or --seeds folder (network, parameters, MACs, receptive field,
    epochs, final accuracy mean/std/min/max over the seeds, seconds per epoch, teacher); draws the
    accuracy-parameters frontier into `plot` unless it is None. plot_named=False (the CLI's default
    file): an existing file there that mnist-cnn did not draw is refused, not replaced."""
    given = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if plot is not None and not Path(plot).parent.is_dir():
        raise ConfigError(f"cannot write {plot}: no folder {Path(plot).parent}")
    if plot is not None and not plot_named:
        refuse_foreign([Path(plot)], "; name it with --plot to replace it, or give --no-plot")
    if plot is not None:  # never over a file of the runs it reads, named or not
        refuse_inputs([Path(plot)], [f for p in given for f in Path(p).rglob("*") if f.is_file()])
    rows = [group_row(read_group(Path(p)), trust_code) for p in given]
    if not rows:
        raise ConfigError("compare needs at least one run folder or --seeds folder")
    if plot is not None:
        with atomic_path(Path(plot)) as tmp, open(tmp, "wb") as f:
            draw_frontier(rows, ANCHORS, f)
    return rows


def plot(run_dir: str | Path) -> Path:
    """`plot`: redraw a run folder's curves.png from its metrics.csv; returns its path."""
    rows = read_metrics(Path(run_dir) / "metrics.csv")
    with held(Path(run_dir)) as run:  # a run still training is refused: it draws its own at the end
        run.save_figure("curves.png", lambda f: draw_curves(rows, f))
    return run.file("curves.png")


def pretrained() -> list[dict[str, Any]]:
    """`pretrained`: the models shipped in the package (`pretrained:NAME` wherever a checkpoint is taken):
    name, data set, recipe, parameters, final test accuracy, file size, and the commands, commit and
    machine that made each (mnist_cnn.pretrained)."""
    from mnist_cnn import pretrained as shipped

    rows = []
    for name, entry in shipped.index().items():
        file = shipped.resolve(shipped.PREFIX + name)
        weights = load_checkpoint(file).model
        parameters = sum(v.numel() for k, v in weights.items() if not k.endswith(BUFFERS))
        rows.append({"name": name, **entry, "parameters": parameters, "bytes": file.stat().st_size})
    return rows


def recipes() -> list[tuple[Config, int]]:
    """`recipes`: each built-in recipe's config and its network's parameter count."""
    out = []
    for name in list_recipes():
        cfg = load_config(name)
        out.append((cfg, config_network_size(cfg.model, cfg.dataset, cfg.model_args)))
    return out
