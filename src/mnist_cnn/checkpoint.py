"""The checkpoint: one typed record, written atomically and read with weights_only=True.
No module but this one knows the keys of the file.

    ckpt = make_checkpoint(model, cfg)          # a network alone; a run's: training.state.state_checkpoint
    files.atomic_write(path, ckpt.write)         # temp file, fsync, rename (training.rundir does it)
    ckpt = load_checkpoint(path)                 # a Checkpoint, older formats migrated; a bad file is a CheckpointError
    model, cfg = model_from_checkpoint(ckpt)     # rebuilt from the stored config

On disk a checkpoint is a plain dict of values and tensors (what `torch.load(path, weights_only=True)`
gives a user): "format", "version", then the fields of Checkpoint: the resolved config, the model
(from the unwrapped, uncompiled module), optimizer and scheduler state, completed epochs, metrics
rows so far and where an unfinished epoch stopped. No generator state: every random draw derives
from (seed, epoch, step), so a run resumes on any machine. A user network's code is imported only
with trust_code=True (see networks.reference).

Formats (VERSION): 1 was written by 0.1.0 through 0.5.0 (and 0.6.0 until format 2), with the same
entries; what changed inside was the config (0.2.0 added [distill], 0.5.0 made run.compile a choice,
0.6.0 added optim.lr_found), which config.from_dict reads in any of those shapes. Development builds
before 0.1.0 also wrote generator states ("rng", and in "partial"), dropped on reading. 2 (0.6.0) records the mnist-cnn
that wrote it and holds every entry, the config as this version reads it. MIGRATIONS brings each
older format to the current one; tests/fixtures/checkpoints keeps a run folder from each release.

A checkpoint from elsewhere is data: load_checkpoint checks the kind of every entry, and
model_from_checkpoint builds the stored network on the meta device first (within the bounds
of networks.reference) and checks that the weights fit it (names, shapes, floating point)
before any memory is allocated. Each refusal is one CheckpointError line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

from mnist_cnn import pretrained
from mnist_cnn.config import Config, brief, config_from_checkpoint, to_dict
from mnist_cnn.data.idx import NUM_CLASSES
from mnist_cnn.errors import CheckpointError, ConfigError, first_line
from mnist_cnn.files import regular_file
from mnist_cnn.networks.reference import (
    SOURCE_COPY,
    GivenModel,
    canonical,
    create,
    given_networks,
    locate,
    reference_of,
)
from mnist_cnn.version import __version__

FORMAT = "mnist-cnn-checkpoint"
VERSION = 2
FORMAT_1_WRITER = "not recorded (format 1: 0.1.0 to 0.5.0, or 0.6.0 before format 2)"
LAST_FILE = "last.pt"  # a run folder's checkpoint after its latest step (what --resume continues)
BEST_FILE = "best.pt"  # the epoch of the best validation accuracy (with a validation split)


@dataclass
class EpochProgress:
    """How far an epoch got: enough to continue it exactly after an interruption."""

    epoch: int
    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their plain NLL
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0  # time spent on it so far
    lr: float | None = None  # the learning rate the optimizer used for the epoch's first step


@dataclass
class NetworkRecord:
    """What a checkpoint records of its network (never code)."""

    num_classes: int = NUM_CLASSES
    sha256: str | None = None  # of the network's source file, for a network from a user's file
    given: str | None = None  # instance, class or factory: a network handed to train() as a Python object
    parameters: int | None = None  # ... then its size and reach, which compare cannot measure without the class
    macs: int | None = None
    receptive_field: int | None = None


@dataclass
class Checkpoint:
    config: Config
    model: dict[str, torch.Tensor]  # what is evaluated and exported: the weight average with optim.ema
    network: NetworkRecord = field(default_factory=NetworkRecord)
    epoch: int | None = 0  # epochs completed; None: not known (a safetensors export that does not say)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row (metrics.csv's columns) per epoch
    optimizer: dict[str, Any] | None = None  # torch's own state_dict()s
    scheduler: dict[str, Any] | None = None
    partial: EpochProgress | None = None  # set when the run stopped inside epoch `epoch + 1`
    train_model: dict[str, torch.Tensor] | None = None  # the trained weights beside an average (optim.ema)
    written_by: str = __version__  # the mnist-cnn that wrote it (FORMAT_1_WRITER: not recorded)

    @property
    def trained(self) -> int:
        """Epochs completed, where a run's checkpoint must know them (load_checkpoint's always do)."""
        if self.epoch is None:
            raise CheckpointError("the file does not say how many epochs its network trained")
        return self.epoch

    @property
    def finished(self) -> bool:
        """All the run's epochs done; True when not known (a safetensors export is of what was trained)."""
        return self.epoch is None or (self.epoch >= self.config.epochs and self.partial is None)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics row ({} before the first epoch ends)."""
        return self.metrics[-1] if self.metrics else {}

    def to_dict(self) -> dict[str, Any]:
        """The file's contents: plain values and tensors only."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "mnist_cnn": self.written_by,
            "config": to_dict(self.config),
            "network": dataclasses.asdict(self.network),
            "model": self.model,
            "train_model": self.train_model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "partial": dataclasses.asdict(self.partial) if self.partial is not None else None,
        }

    def write(self, f: IO[bytes]) -> None:
        torch.save(self.to_dict(), f)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network under torch.compile / DistributedDataParallel wrappers, for its state_dict keys."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def own_storage(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a larger tensor (a seed's slice of stacked weights, training.stack) copied out:
    torch.save writes a view's whole storage, every seed's weights with it."""
    return {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in weights.items()}


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A network's state_dict as a checkpoint holds it: of the plain module, each tensor its own storage."""
    return own_storage(unwrap(model).state_dict())


def make_checkpoint(
    model: nn.Module, cfg: Config, *, epoch: int = 0, metrics: list[dict[str, Any]] | None = None
) -> Checkpoint:
    """A checkpoint of a network alone (no training state): what a test, a benchmark or an export starts from;
    training.state.state_checkpoint adds the optimizer, the schedule and the unfinished epoch."""
    return Checkpoint(config=cfg, model=weights_of(model), epoch=epoch, metrics=list(metrics or []))


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    path = Path(path)
    regular_file(path, CheckpointError, "checkpoint file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the name's suffix
            raw = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load parses bytes from anywhere: whatever it raises, the file is not readable
        # (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, struct.error, RecursionError, ...)
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt or truncated?): {first_line(e, 120)}"
        ) from None
    if not isinstance(raw, dict) or not is_value(raw.get("format"), FORMAT):
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    version = raw.get("version")
    if not any(is_value(version, v) for v in (*MIGRATIONS, VERSION)):
        raise CheckpointError(
            f"{path}: checkpoint format {brief(version)} is not supported "
            f"(this mnist-cnn reads formats 1 to {VERSION}; a newer mnist-cnn wrote it?)"
        )
    while raw["version"] != VERSION:
        raw = MIGRATIONS[raw["version"]](raw)
    return from_dict(raw, str(path))


def is_value(value: Any, expected: str | int) -> bool:
    """value == expected, and of its type: a tensor's == is a tensor, and True == 1."""
    return type(value) is type(expected) and value == expected


def from_format_1(raw: dict[str, Any]) -> dict[str, Any]:
    """0.1.0 to 0.5.0 (format 1) -> format 2: a development build's generator states go (every draw
    derives from seed, epoch and step), a missing network record is the built-in network's default, an
    unfinished epoch keeps only EpochProgress's fields, and an entry a file lacks gets its empty value.
    The config stays as stored: from_dict reads every shape it had."""
    known = {f.name for f in dataclasses.fields(EpochProgress)}
    partial = raw.get("partial")
    if isinstance(partial, dict):
        partial = {k: v for k, v in partial.items() if k in known}  # what ENTRIES does not refuse, from_dict does
    network = raw.get("network")
    return {
        **{key: raw[key] for key in ("config", "model") if key in raw},  # required in every format
        "format": FORMAT,
        "version": 2,
        "mnist_cnn": FORMAT_1_WRITER,
        "network": {"num_classes": NUM_CLASSES, "sha256": None} if network is None else network,
        "train_model": raw.get("train_model"),
        "optimizer": raw.get("optimizer"),
        "scheduler": raw.get("scheduler"),
        "epoch": raw.get("epoch", 0),
        "metrics": raw.get("metrics", []),
        "partial": partial,
    }


# format -> the function that brings it one format up; a new format adds its predecessor here
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: from_format_1}

# The entries of the current format and the types they must have (any of), so that whatever reads a
# Checkpoint may use its fields as they are.
ENTRIES: dict[str, tuple[type, ...]] = {
    "mnist_cnn": (str,),
    "config": (dict,),
    "model": (dict,),
    "train_model": (dict, type(None)),
    "network": (dict,),
    "optimizer": (dict, type(None)),
    "scheduler": (dict, type(None)),
    "epoch": (int,),
    "metrics": (list,),
    "partial": (dict, type(None)),
}
KINDS = {dict: "a table", list: "a list", int: "a whole number", str: "a string"}


def from_dict(raw: dict[str, Any], source: str) -> Checkpoint:
    """The typed checkpoint of a current-format dict; every entry checked first."""
    for key, kinds in ENTRIES.items():
        if key not in raw:
            raise CheckpointError(f"{source}: its {key!r} entry is missing")
        value = raw[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise CheckpointError(f"{source}: its {key!r} entry is a {type(value).__name__}, not {KINDS[kinds[0]]}")
    if raw["epoch"] < 0:
        raise CheckpointError(f"{source}: its epoch {raw['epoch']} is negative")
    if not all(isinstance(row, dict) for row in raw["metrics"]):
        raise CheckpointError(f"{source}: its metrics are not a list of rows (tables)")
    return Checkpoint(
        config=checkpoint_config(raw["config"], source),
        model=raw["model"],
        network=network_record(raw["network"], source),
        epoch=raw["epoch"],
        metrics=[{k: number(v, f"{source}: its metrics") for k, v in row.items()} for row in raw["metrics"]],
        optimizer=raw["optimizer"],
        scheduler=raw["scheduler"],
        partial=epoch_progress(raw["partial"], source),
        train_model=raw["train_model"],
        written_by=raw["mnist_cnn"],
    )


def network_record(values: dict[str, Any], source: str) -> NetworkRecord:
    known = {f.name for f in dataclasses.fields(NetworkRecord)}
    record = NetworkRecord(**{k: v for k, v in values.items() if k in known})
    if isinstance(record.num_classes, bool) or not isinstance(record.num_classes, int):
        raise CheckpointError(f"{source}: its num_classes {brief(record.num_classes)} is not a whole number")
    if record.sha256 is not None and not isinstance(record.sha256, str):
        raise CheckpointError(f"{source}: its network sha256 {brief(record.sha256)} is not a string")
    return record


def epoch_progress(values: dict[str, Any] | None, source: str) -> EpochProgress | None:
    if not values:
        return None
    try:
        progress = EpochProgress(**values)
        int(progress.epoch), int(progress.step)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{source}: its unfinished epoch {brief(values)} is not readable") from None
    return progress


def checkpoint_config(values: Any, source: str) -> Config:
    try:
        return config_from_checkpoint(values)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: its stored config is not usable: {e}") from None


def model_from_checkpoint(
    ckpt: Checkpoint,
    source: str = "checkpoint",
    folder: Path | None = None,
    trust_code: bool = False,
    model: GivenModel | str | None = None,
) -> tuple[nn.Module, Config]:
    """Rebuild the network named in the stored config and load its weights. A user's
    network is imported from its recorded reference, else from `folder`'s copy of its source,
    and only with trust_code: otherwise a CheckpointError says which file would run. The stored
    num_classes and model_args are data: the network is built on the meta device first, and
    refused (before any memory is allocated) when it is past a bound of networks.reference or
    when the stored weights do not fit it. `model` names the network instead, as its caller holds
    it (a class, an instance, a factory) or by a reference they name (file.py:Class): what a run of
    a network handed to train() as a Python object needs, since its folder holds no code."""
    cfg, weights = ckpt.config, ckpt.model
    given = {} if model is None or isinstance(model, str) else {reference_of(model): model}
    try:
        with given_networks(given):
            if model is None:
                copy = folder / SOURCE_COPY if folder else None
                net = locate(cfg.model, copy=copy, recorded_sha256=ckpt.network.sha256, trust_code=trust_code)
            else:  # the caller's own: trusted as what they name
                net = locate(canonical(model) if isinstance(model, str) else reference_of(model))
            args = cfg.model_args if net.kind in (None, "class") else {}
            built = create(
                net, ckpt.network.num_classes, args, check=lambda empty: check_weights(empty, weights, source)
            )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    load_weights(built, weights, source)
    return built, cfg


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    check_weights(model, weights, source)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: weights do not fit model {type(model).__name__}: {first_line(e)}") from None


def check_weights(model: nn.Module, weights: Any, source: str) -> None:
    """Refuse weights that load_state_dict would refuse (with a line that names the keys) or would
    take without a word: integer weights, cast to float, give a network that says 10% to every class."""
    problem = weights_problem(model.state_dict(), weights)  # on the meta device: names, shapes, dtypes only
    if problem:
        raise CheckpointError(f"{source}: weights do not fit model {type(model).__name__}: {problem}")


SHOWN_KEYS = 3  # names quoted in a one-line error about keys


def weights_problem(expected: dict[str, torch.Tensor], weights: Any) -> str | None:
    if not isinstance(weights, dict):
        return f"they are a {type(weights).__name__}, not a table of tensors"
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        return ", ".join(few(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    not_tensors = [k for k in expected if not isinstance(weights[k], torch.Tensor)]
    if not_tensors:
        return f"{few('not tensors', not_tensors)}"
    not_float = [k for k, want in expected.items() if want.is_floating_point() and not weights[k].is_floating_point()]
    if not_float:
        return f"weights must be floating point: {name(not_float[0])} is {weights[not_float[0]].dtype}" + (
            f" (and {len(not_float) - 1} more)" if len(not_float) > 1 else ""
        )
    wrong = [k for k, want in expected.items() if weights[k].shape != want.shape]
    if wrong:
        k = wrong[0]
        return f"{name(k)} is {size(weights[k])} in the file, {size(expected[k])} in the model" + (
            f" (and {len(wrong) - 1} more of another shape)" if len(wrong) > 1 else ""
        )
    return None


def few(what: str, keys: list[Any]) -> str:
    """'2 missing (head.4.weight, head.4.bias)': a count and the first SHOWN_KEYS names."""
    shown = ", ".join(name(k) for k in keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} {what} ({shown})"


def name(key: Any) -> str:
    """A state_dict key as written in a one-line error: as is when it is a plain printable name."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= KEY_CHARS else brief(key, KEY_CHARS)


KEY_CHARS = 60


def size(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "a scalar"


SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on its JSON header


def is_safetensors(path: Path) -> bool:
    """By content, not by name: a safetensors file starts with the length of its JSON
    header (8 bytes, little-endian) and the header's opening brace."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    return 0 < int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def load_model_file(
    path: str | os.PathLike[str], trust_code: bool = False, model: GivenModel | str | None = None
) -> tuple[nn.Module, Config, Checkpoint]:
    """A model from a training checkpoint (.pt) or a safetensors export, rebuilt from
    its stored config (a user network's code runs only with trust_code), or into `model`
    (model_from_checkpoint). `pretrained:NAME` is a model shipped in the package (mnist_cnn.pretrained).
    Returns (model in eval mode, config, the checkpoint: epochs, metrics, network record)."""
    path = pretrained.resolve(path)
    regular_file(path, CheckpointError, "checkpoint file")  # before is_safetensors reads it
    ckpt = read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)
    built, cfg = model_from_checkpoint(ckpt, str(path), path.parent, trust_code, model)
    return built.eval(), cfg, ckpt


def number(value: Any, where: str) -> float | int | None:
    """A metric as a plain number (a 0-d tensor's value)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    raise CheckpointError(f"{where} hold {brief(value)}, not a number")


# A safetensors export's metadata (all strings) that describes the checkpoint it came from: one table,
# read by read_safetensors and written by metadata(), so that an export and a checkpoint say the same.
# name in the metadata -> (how to read it back, the value from a Checkpoint)
METADATA: dict[str, tuple[type, Callable[[Checkpoint], Any]]] = {
    "num_classes": (int, lambda c: c.network.num_classes),
    "network_sha256": (str, lambda c: c.network.sha256),
    "epochs_trained": (int, lambda c: c.epoch),
    "final_train_accuracy": (float, lambda c: c.final.get("train_acc")),
    "final_test_accuracy": (float, lambda c: c.final.get("test_acc")),
}
UNKNOWN = ("", "None")  # what an export writes for a value it did not know


def metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The checkpoint's part of an export's metadata: METADATA's fields, the config as JSON, the writer."""
    values = {key: get(ckpt) for key, (_, get) in METADATA.items()}
    return {
        **{key: "" if value is None else str(value) for key, value in values.items()},
        "config": json.dumps(to_dict(ckpt.config)),
        "mnist_cnn_version": __version__,
    }


def read_safetensors(path: Path) -> Checkpoint:
    """A safetensors export as the Checkpoint a model needs: config, weights, network record, epochs
    and final accuracies (from the metadata, all strings: METADATA)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError("reading .safetensors needs: pip install 'mnist-cnn[export]'") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
        cfg_values = json.loads(meta["config"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a safetensors export of mnist-cnn ({first_line(e, 120)})") from None
    value = {key: meta_value(meta, key, kind, path) for key, (kind, _) in METADATA.items()}
    final = {"train_acc": value["final_train_accuracy"], "test_acc": value["final_test_accuracy"]}
    if value["epochs_trained"] is not None and value["epochs_trained"] < 0:
        raise CheckpointError(f"{path}: its metadata epochs_trained {value['epochs_trained']} is negative")
    return Checkpoint(
        config=checkpoint_config(cfg_values, str(path)),
        model=weights,
        network=network_record(
            {
                "num_classes": NUM_CLASSES if value["num_classes"] is None else value["num_classes"],
                "sha256": value["network_sha256"],
            },
            str(path),
        ),
        epoch=value["epochs_trained"],
        metrics=[final],
        written_by=meta.get("mnist_cnn_version", "unknown"),
    )


def meta_value(meta: dict[str, str], key: str, kind: type, path: Path) -> Any:
    """A value from the metadata's strings; None when absent or unknown."""
    text = meta.get(key, "")
    if text in UNKNOWN:
        return None
    try:
        return kind(text)
    except (ValueError, OverflowError):
        raise CheckpointError(f"{path}: its metadata {key} {brief(text)} is not a number") from None
