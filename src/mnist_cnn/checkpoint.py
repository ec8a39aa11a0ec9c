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
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_cnn.config import Config, config_from_checkpoint, to_dict
from mnist_cnn.data.idx import NUM_CLASSES
from mnist_cnn.errors import CheckpointError, ConfigError, first_line
from mnist_cnn.networks.reference import SOURCE_COPY, create, locate

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
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the name's suffix
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt or truncated?): {first_line(e, 120)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')} is not supported "
            f"(this mnist-cnn reads version {VERSION})"
        )
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], source: str) -> Config:
    try:
        return config_from_checkpoint(ckpt["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: its stored config is not usable: {e}") from None


def model_from_checkpoint(
    ckpt: dict[str, Any], source: str = "checkpoint", folder: Path | None = None, trust_code: bool = False
) -> tuple[nn.Module, Config]:
    """Rebuild the network named in the stored config and load its weights. A user's
    network is imported from its recorded reference, else from `folder`'s copy of its source,
    and only with trust_code: otherwise a CheckpointError says which file would run."""
    cfg = checkpoint_config(ckpt, source)
    network = ckpt.get("network") or {}
    try:
        net = locate(
            cfg.model,
            copy=folder / SOURCE_COPY if folder else None,
            recorded_sha256=network.get("sha256"),
            trust_code=trust_code,
        )
        model = create(net, int(network.get("num_classes", NUM_CLASSES)), cfg.model_args)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    load_weights(model, ckpt["model"], source)
    return model, cfg


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: weights do not fit model {type(model).__name__}: {first_line(e)}") from None


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


def load_model_file(path: str | os.PathLike[str], trust_code: bool = False) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A model from a training checkpoint (.pt) or a safetensors export, rebuilt from
    its stored config (a user network's code runs only with trust_code: model_from_checkpoint).
    Returns (model in eval mode, config, info with epoch/metrics)."""
    path = Path(path)
    ckpt = read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, str(path), path.parent, trust_code)
    network = ckpt.get("network") or {}
    return (
        model.eval(),
        cfg,
        {
            "epoch": ckpt.get("epoch"),
            "metrics": ckpt.get("metrics", []),
            "num_classes": network.get("num_classes", NUM_CLASSES),
            "network_sha256": network.get("sha256"),
        },
    )


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors export as the parts of a checkpoint that a model needs: config,
    weights, network record, epochs and final accuracies (from the metadata)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError("reading .safetensors needs: pip install 'mnist-cnn[export]'") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
        cfg_values = json.loads(meta["config"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a safetensors export of mnist-cnn ({e})") from None
    network = {"num_classes": int(meta.get("num_classes") or NUM_CLASSES), "sha256": meta.get("network_sha256")}
    metrics = [
        {
            "train_acc": float(meta.get("final_train_accuracy") or "nan"),
            "test_acc": float(meta.get("final_test_accuracy") or "nan"),
        }
    ]
    return {
        "config": cfg_values,
        "model": weights,
        "network": network,
        "epoch": meta.get("epochs_trained"),
        "metrics": metrics,
    }
