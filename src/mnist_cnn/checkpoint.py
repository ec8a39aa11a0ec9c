"""Self-describing checkpoints, written atomically and read with weights_only=True.

    ckpt = state_checkpoint(state, cfg)      # plain values and tensors only
    files.atomic_write(path, lambda f: torch.save(ckpt, f))   # temp file, fsync, rename
    ckpt = load_checkpoint(path)             # dict; a bad file is a CheckpointError
    model, cfg = model_from_checkpoint(ckpt) # rebuilt from the stored config

A checkpoint holds only plain values and tensors: the resolved config, the
model (from the unwrapped, uncompiled module), optimizer and scheduler state,
completed epoch, metrics rows so far and where an unfinished epoch stopped. No
generator state: every random draw derives from (seed, epoch, step), so a run
resumes on any machine (older checkpoints' "rng" entry is ignored). A user
network's code is imported only with trust_code=True (see networks.py).
"""

from __future__ import annotations

import dataclasses
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
from mnist_cnn.training.loop import EpochProgress, TrainState, plain_network

FORMAT = "mnist-cnn-checkpoint"
VERSION = 1


unwrap = plain_network  # the plain module under torch.compile / DDP wrappers, for its state_dict keys


def own_storage(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of a larger tensor (a seed's slice of stacked weights, together.py) copied out:
    torch.save writes a view's whole storage, every seed's weights with it."""
    return {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in weights.items()}


def make_checkpoint(model: nn.Module, cfg: Config, *, optimizer=None, scheduler=None, epoch: int = 0,
                    metrics: list[dict] | None = None, partial: EpochProgress | None = None,
                    network: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": to_dict(cfg),
        "network": network or {"num_classes": NUM_CLASSES, "sha256": None},  # never code: see networks.py
        "model": own_storage(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "metrics": list(metrics or []),
        "partial": dataclasses.asdict(partial) if partial is not None else None,
    }


def state_checkpoint(state: TrainState, cfg: Config) -> dict[str, Any]:
    """"model" holds what is evaluated (the weight average with optim.ema), "train_model" then
    the trained weights that resume continues from."""
    ckpt = make_checkpoint(state.evaluated, cfg, optimizer=state.optimizer, scheduler=state.scheduler,
                           epoch=state.epoch, metrics=state.metrics, partial=state.partial, network=state.network)
    if state.ema is not None:
        ckpt["train_model"] = own_storage(unwrap(state.model).state_dict())
    return ckpt


def restore_state(state: TrainState, ckpt: dict[str, Any], source: str) -> None:
    """Put a freshly built TrainState where the checkpoint left off. Nothing of the global
    generators is restored (an older checkpoint's "rng" entry is ignored): no draw depends on them."""
    load_weights(unwrap(state.model), ckpt.get("train_model") or ckpt["model"], source)
    if state.ema is not None:
        load_weights(state.ema.model, ckpt["model"], source)
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        state.epoch = int(ckpt["epoch"])
        state.metrics = list(ckpt["metrics"])
        state.partial = partial_progress(ckpt["partial"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: training state is incomplete or corrupt ({e})") from None


def partial_progress(values: dict[str, Any] | None) -> EpochProgress | None:
    """The unfinished epoch of a checkpoint. Fields that this version no longer keeps
    (older checkpoints stored the epoch generator's device-specific state) are dropped:
    every draw now derives from (seed, epoch, step)."""
    if not values:
        return None
    known = {f.name for f in dataclasses.fields(EpochProgress)}
    return EpochProgress(**{k: v for k, v in values.items() if k in known})


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick a reader by the name's suffix
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {first_line(e, 120)}") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                              f"(this mnist-cnn reads version {VERSION})")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], source: str) -> Config:
    try:
        return config_from_checkpoint(ckpt["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: its stored config is not usable: {e}") from None


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint", folder: Path | None = None,
                          trust_code: bool = False) -> tuple[nn.Module, Config]:
    """Rebuild the network named in the stored config and load its weights. A user's
    network is imported from its recorded reference, else from `folder`'s copy of its source,
    and only with trust_code: otherwise a CheckpointError says which file would run."""
    cfg = checkpoint_config(ckpt, source)
    network = ckpt.get("network") or {}
    try:
        net = locate(cfg.model, copy=folder / SOURCE_COPY if folder else None, recorded_sha256=network.get("sha256"),
                     trust_code=trust_code)
        model = create(net, int(network.get("num_classes", NUM_CLASSES)), cfg.model_args)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    load_weights(model, ckpt["model"], source)
    return model, cfg


def load_weights(model: nn.Module, weights: dict, source: str) -> None:
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


def load_model_file(path: str | os.PathLike, trust_code: bool = False) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A model from a training checkpoint (.pt) or a safetensors export, rebuilt from
    its stored config (a user network's code runs only with trust_code: model_from_checkpoint).
    Returns (model in eval mode, config, info with epoch/metrics)."""
    path = Path(path)
    ckpt = read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, str(path), path.parent, trust_code)
    network = ckpt.get("network") or {}
    return model.eval(), cfg, {"epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics", []),
                               "num_classes": network.get("num_classes", NUM_CLASSES),
                               "network_sha256": network.get("sha256")}


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
    metrics = [{"train_acc": float(meta.get("final_train_accuracy") or "nan"),
                "test_acc": float(meta.get("final_test_accuracy") or "nan")}]
    return {"config": cfg_values, "model": weights, "network": network, "epoch": meta.get("epochs_trained"),
            "metrics": metrics}
