"""Self-describing checkpoints, written atomically and read with weights_only=True.

    ckpt = make_checkpoint(model, cfg, ...)  # plain values and tensors only (training.state adds the rest)
    files.atomic_write(path, lambda f: torch.save(ckpt, f))   # temp file, fsync, rename
    ckpt = load_checkpoint(path)             # dict; a bad file is a CheckpointError
    model, cfg = model_from_checkpoint(ckpt) # rebuilt from the stored config

A checkpoint holds only plain values and tensors: the resolved config, the
model (from the unwrapped, uncompiled module), optimizer and scheduler state,
completed epoch, metrics rows so far and where an unfinished epoch stopped. No
generator state: every random draw derives from (seed, epoch, step), so a run
resumes on any machine (older checkpoints' "rng" entry is ignored). A user
network's code is imported only with trust_code=True (see networks.reference).

A checkpoint from elsewhere is data: load_checkpoint checks the kind of every entry, and
model_from_checkpoint builds the stored network on the meta device first (within the bounds
of networks.reference) and checks that the weights fit it (names, shapes, floating point)
before any memory is allocated. Each refusal is one CheckpointError line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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

FORMAT = "mnist-cnn-checkpoint"
VERSION = 1


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


def make_checkpoint(
    model: nn.Module,
    cfg: Config,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
    metrics: list[dict[str, Any]] | None = None,
    partial: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(cfg),
        "network": network or {"num_classes": NUM_CLASSES, "sha256": None},  # never code: see networks.reference
        "model": own_storage(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "metrics": list(metrics or []),
        "partial": partial,  # training.state.EpochProgress as a dict
    }


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    regular_file(path, CheckpointError, "checkpoint file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the name's suffix
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load parses bytes from anywhere: whatever it raises, the file is not readable
        # (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, struct.error, RecursionError, ...)
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt or truncated?): {first_line(e, 120)}"
        ) from None
    if not isinstance(ckpt, dict) or not is_value(ckpt.get("format"), FORMAT):
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    if not is_value(ckpt.get("version"), VERSION):
        raise CheckpointError(
            f"{path}: checkpoint version {brief(ckpt.get('version'))} is not supported "
            f"(this mnist-cnn reads version {VERSION})"
        )
    check_entries(ckpt, str(path))
    return ckpt


def is_value(value: Any, expected: str | int) -> bool:
    """value == expected, and of its type: a tensor's == is a tensor, and True == 1."""
    return type(value) is type(expected) and value == expected


# A checkpoint's entries and the types they must have (any of), so that whatever reads one (resume,
# evaluate, compare, seeds) may use them as they are. "config" and "model" are required.
ENTRIES: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "model": (dict,),
    "train_model": (dict,),  # the trained weights beside an average (optim.ema)
    "network": (dict, type(None)),
    "optimizer": (dict, type(None)),
    "scheduler": (dict, type(None)),
    "epoch": (int,),
    "metrics": (list,),
    "partial": (dict, type(None)),
}
REQUIRED = ("config", "model")
KINDS = {dict: "a table", list: "a list", int: "a whole number"}


def check_entries(ckpt: dict[str, Any], source: str) -> None:
    for key in REQUIRED:
        if key not in ckpt:
            raise CheckpointError(f"{source}: its {key!r} entry is missing")
    for key, kinds in ENTRIES.items():
        value = ckpt.get(key, None if type(None) in kinds else kinds[0]())
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise CheckpointError(f"{source}: its {key!r} entry is a {type(value).__name__}, not {KINDS[kinds[0]]}")
    if ckpt.get("epoch", 0) < 0:
        raise CheckpointError(f"{source}: its epoch {ckpt['epoch']} is negative")
    if not all(isinstance(row, dict) for row in ckpt.get("metrics", [])):
        raise CheckpointError(f"{source}: its metrics are not a list of rows (tables)")


def checkpoint_config(ckpt: dict[str, Any], source: str) -> Config:
    try:
        return config_from_checkpoint(ckpt["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: its stored config is not usable: {e}") from None


def model_from_checkpoint(
    ckpt: dict[str, Any],
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
    cfg = checkpoint_config(ckpt, source)
    num_classes, sha256 = stored_network(ckpt, source)
    weights = ckpt.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{source}: it holds no weights (a table of tensors under 'model')")
    given = {} if model is None or isinstance(model, str) else {reference_of(model): model}
    try:
        with given_networks(given):
            if model is None:
                copy = folder / SOURCE_COPY if folder else None
                net = locate(cfg.model, copy=copy, recorded_sha256=sha256, trust_code=trust_code)
            else:  # the caller's own: trusted as what they name
                net = locate(canonical(model) if isinstance(model, str) else reference_of(model))
            args = cfg.model_args if net.kind in (None, "class") else {}
            built = create(net, num_classes, args, check=lambda empty: check_weights(empty, weights, source))
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    load_weights(built, weights, source)
    return built, cfg


def stored_network(ckpt: dict[str, Any], source: str) -> tuple[int, str | None]:
    """(num_classes, the network source's SHA-256 or None) as the checkpoint records them."""
    network = ckpt.get("network") or {}
    if not isinstance(network, dict):
        raise CheckpointError(f"{source}: its network record is a {type(network).__name__}, not a table")
    num_classes, sha256 = network.get("num_classes", NUM_CLASSES), network.get("sha256")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise CheckpointError(f"{source}: its num_classes {brief(num_classes)} is not a whole number")
    if sha256 is not None and not isinstance(sha256, str):
        raise CheckpointError(f"{source}: its network sha256 {brief(sha256)} is not a string")
    return num_classes, sha256


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
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A model from a training checkpoint (.pt) or a safetensors export, rebuilt from
    its stored config (a user network's code runs only with trust_code), or into `model`
    (model_from_checkpoint). `pretrained:NAME` is a model shipped in the package (mnist_cnn.pretrained).
    Returns (model in eval mode, config, info with epoch/metrics)."""
    path = pretrained.resolve(path)
    regular_file(path, CheckpointError, "checkpoint file")  # before is_safetensors reads it
    ckpt = read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, str(path), path.parent, trust_code, model)
    num_classes, sha256 = stored_network(ckpt, str(path))
    metrics = [{k: number(v, f"{path}: its metrics") for k, v in row.items()} for row in ckpt.get("metrics", [])]
    return (
        model.eval(),
        cfg,
        {
            "epoch": ckpt.get("epoch"),
            "metrics": metrics,
            "num_classes": num_classes,
            "network_sha256": sha256,
        },
    )


def number(value: Any, where: str) -> float | int | None:
    """A metric as a plain number (a 0-d tensor's value): what describes a model (serve, export) reads."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    raise CheckpointError(f"{where} hold {brief(value)}, not a number")


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors export as the parts of a checkpoint that a model needs: config,
    weights, network record, epochs and final accuracies (from the metadata, all strings)."""
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
    metrics = {"train_acc": "final_train_accuracy", "test_acc": "final_test_accuracy"}
    return {
        "config": cfg_values,
        "model": weights,
        "network": {"num_classes": meta_number(meta, "num_classes", int, path), "sha256": meta.get("network_sha256")},
        "epoch": meta_number(meta, "epochs_trained", int, path),
        "metrics": [{key: meta_number(meta, field, float, path) for key, field in metrics.items()}],
    }


UNKNOWN = ("", "None")  # what an export writes for a value it did not know


def meta_number(meta: dict[str, str], key: str, kind: type[int] | type[float], path: Path) -> Any:
    """A number from the metadata's strings; None when absent or unknown (num_classes: the default)."""
    text = meta.get(key, "")
    if text in UNKNOWN:
        return NUM_CLASSES if key == "num_classes" else None
    try:
        return kind(text)
    except (ValueError, OverflowError):
        raise CheckpointError(f"{path}: its metadata {key} {brief(text)} is not a number") from None
