"""Knowledge distillation: a trained teacher's softened outputs as a second target.

    teacher = load_teacher(cfg, device, num_classes)      # None when cfg.distill.teachers is empty
    soft = teacher.probs(x, "fp32")                       # (B, classes): the teachers' mean at temperature T
    loss = distill_loss(log_probs, labels_loss, soft, cfg.distill)

The student's loss is (1 - alpha) * label loss + alpha * T^2 * KL(teacher_T || student_T),
where _T means softmax(logits / T) (Hinton et al., 2015; T^2 keeps the soft term's gradient
on the scale of the label term's as T grows). The teachers run in eval mode, without
gradients, on the same augmented batch as the student and in the same precision.

A teacher is a run folder (its last.pt, finished) or a checkpoint / safetensors file. The
run's config records each teacher's absolute path and the sha256 of its file, so that a
resumed run or another seed is taught by the same weights or refuses to continue.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.checkpoint import LAST_FILE, Checkpoint, load_model_file
from mnist_cnn.config import Config, DistillConfig
from mnist_cnn.data.contract import as_log_probs
from mnist_cnn.data.datasets import get_dataset
from mnist_cnn.device import autocast
from mnist_cnn.errors import CheckpointError, ConfigError, MnistCnnError
from mnist_cnn.networks.builtin import MODELS
from mnist_cnn.networks.reference import file_sha256
from mnist_cnn.pretrained import is_pretrained, resolve

TEACHER_FILE = LAST_FILE  # a run folder's checkpoint, after its last epoch


def teacher_file(name: str) -> Path:
    """A teacher as given (a run folder, a model file or pretrained:NAME) -> the absolute path of its model file."""
    if is_pretrained(name):
        return resolve(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / TEACHER_FILE).is_file():
            raise ConfigError(f"teacher {name} holds no {TEACHER_FILE} (a --seeds folder? name one of its seed-N/)")
        path = path / TEACHER_FILE
    if not path.is_file():
        raise ConfigError(f"teacher {name}: no such run folder or model file")
    return path.resolve()


def resolve_teachers(cfg: Config) -> None:
    """Make cfg.distill name each teacher's model file by absolute path and record its sha256.
    A config that already records a digest (a resumed run, a seed folder) must find the same file."""
    d = cfg.distill
    paths = [teacher_file(t) for t in d.teachers]
    digests = [file_sha256(p) for p in paths]
    if d.sha256 and d.sha256 != digests:
        changed = next(str(p) for p, old, new in zip(paths, d.sha256, digests) if old != new)
        raise CheckpointError(f"teacher {changed} changed since this run started (its sha256 differs)")
    # a shipped model keeps its name: it is found on any machine (its sha256 says which file it was)
    d.teachers = [t if is_pretrained(t) else str(p) for t, p in zip(d.teachers, paths)]
    d.sha256 = digests


class Teacher:
    """One or more trained networks whose softened probabilities the student learns from."""

    def __init__(self, models: list[nn.Module], temperature: float, channels_last: bool) -> None:
        self.models, self.temperature = models, temperature
        for m in models:
            m.eval().requires_grad_(False)
            if channels_last:
                m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing in torch's stub

    @torch.no_grad()
    def probs(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        """(N, 1, 28, 28) normalized images -> (N, classes) fp32: the teachers' mean probability at T."""
        total = None
        for m in self.models:
            with autocast(x.device, precision):
                log_p = as_log_probs(m(x))  # fp32 whatever the precision
            p = F.softmax(log_p / self.temperature, dim=1)  # log_softmax(logits) / T differs by a constant only
            total = p if total is None else total + p
        assert total is not None
        return total / len(self.models)


def distill_loss(
    log_probs: torch.Tensor, label_loss: torch.Tensor, soft: torch.Tensor, d: DistillConfig
) -> torch.Tensor:
    """(1 - alpha) label_loss + alpha T^2 KL(soft || student at T); log_probs (N, classes) fp32."""
    student = F.log_softmax(log_probs / d.temperature, dim=1)  # (N, classes)
    kl = F.kl_div(student, soft, reduction="batchmean")
    return (1 - d.alpha) * label_loss + (d.alpha * d.temperature**2) * kl


def load_teacher(cfg: Config, device: torch.device, num_classes: int | None = None) -> Teacher | None:
    """The teachers of cfg (resolved by resolve_teachers), on `device`, checked against the student's
    data set, classes (default: the data set's) and validation split; None without teachers."""
    if not cfg.distill.teachers:
        return None
    resolve_teachers(cfg)
    num_classes = get_dataset(cfg.dataset).num_classes if num_classes is None else num_classes
    models = []
    for path in cfg.distill.teachers:
        try:
            model, tcfg, ckpt = load_model_file(path)
        except MnistCnnError as e:
            if "--trust-code" in str(e):  # a network from a Python file: its code would run here
                raise ConfigError(
                    f"teacher {path}: its network is defined in a Python file; teachers are built-in "
                    f"networks only ({', '.join(MODELS)})"
                ) from None
            raise ConfigError(f"teacher {e}") from None
        check_teacher(path, tcfg, ckpt, cfg, num_classes)
        models.append(model.to(device))
    return Teacher(models, cfg.distill.temperature, cfg.run.channels_last)


def check_teacher(path: str, tcfg: Config, ckpt: Checkpoint, cfg: Config, num_classes: int) -> None:
    """A teacher fits the student: same data set and classes, a finished run, and none of the student's
    validation images among its training images (validation scores would be flattered)."""
    if tcfg.dataset != cfg.dataset or ckpt.network.num_classes != num_classes:
        raise ConfigError(
            f"teacher {path} was trained on {tcfg.dataset} ({ckpt.network.num_classes} classes); "
            f"this run trains on {cfg.dataset} ({num_classes} classes)"
        )
    if not ckpt.finished:
        raise ConfigError(f"teacher {path} stopped after epoch {ckpt.epoch} of {tcfg.epochs}: finish it first")
    # the held-out images are the last val_size of one fixed permutation: a larger split holds a smaller one
    if cfg.val_size and (tcfg.val_size < cfg.val_size or tcfg.run.train_limit != cfg.run.train_limit):
        raise ConfigError(
            f"teacher {path} trained on images of this run's validation split (its val_size {tcfg.val_size}, "
            f"train_limit {tcfg.run.train_limit}): train the teacher with --set val_size={cfg.val_size} "
            f"(the `teacher` recipe holds out 10,000)"
        )
