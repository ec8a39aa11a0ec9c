"""Evaluation: loss and accuracy, per-class figures and the confusion matrix.

    log_probs = predict_log_probs(model, images_u8, batch_size=1000)   # (N, classes)
    result = summarize(log_probs, labels)   # accuracy (fraction), loss (mean NLL per image), n
    report = full_report(log_probs, labels)  # adds per_class and confusion

Images are uint8 (N, 28, 28) on the model's device; inputs.log_probs applies
the normalization and log-softmax, the same way as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.data.contract import MNIST_NORM, log_probs, to_unit


@torch.no_grad()
def predict_log_probs(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    channels_last: bool = False,
    norm: tuple[float, float] = MNIST_NORM,
) -> torch.Tensor:
    """(N, 28, 28) uint8, or (N, 1, 28, 28) floats in [0, 1] -> (N, classes) float32 log-probabilities,
    in eval mode and in fp32 whatever the training precision: what `predict` and the exports compute too."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        x = to_unit(x) if x.dtype == torch.uint8 else x  # (B, 1, 28, 28) in [0, 1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(log_probs(model, x, norm))
    model.train(was_training)
    return torch.cat(out)


def summarize(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean per-image NLL (not divided again by the batch size, unlike the seed) and accuracy."""
    labels = labels.long()
    n = labels.numel()
    loss = F.nll_loss(log_probs, labels, reduction="sum").item() / n
    correct = (log_probs.argmax(1) == labels).sum().item()
    return {"loss": loss, "accuracy": correct / n, "n": n}


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat.cpu(), minlength=num_classes**2).reshape(num_classes, num_classes)


def full_report(log_probs: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...] | None = None) -> dict:
    """summarize() plus per-class precision/recall (with the class names) and the confusion matrix."""
    report = summarize(log_probs, labels)
    num_classes = log_probs.shape[1]  # the network's output: the data set's classes
    conf = confusion_matrix(log_probs.argmax(1), labels, num_classes)
    report["per_class"] = per_class(conf, classes)
    report["confusion"] = conf.tolist()
    return report


def per_class(conf: torch.Tensor, classes: tuple[str, ...] | None = None) -> list[dict]:
    """Each class's precision, recall and support from a (C, C) confusion matrix (row = true class)."""
    rows = []
    for c in range(conf.shape[0]):
        tp = int(conf[c, c])
        predicted, actual = int(conf[:, c].sum()), int(conf[c, :].sum())
        rows.append(
            {
                "class": c,
                "name": classes[c] if classes else str(c),
                "precision": tp / predicted if predicted else 0.0,
                "recall": tp / actual if actual else 0.0,
                "support": actual,
            }
        )
    return rows


def confident_mistakes(log_probs: torch.Tensor, labels: torch.Tensor, limit: int) -> dict:
    """The misclassified images, most confident first: indices, true, predicted, probability."""
    prob, pred = log_probs.exp().max(1)
    wrong = (pred != labels.long()).nonzero().flatten()
    order = wrong[prob[wrong].argsort(descending=True)][:limit]
    return {
        "index": order.tolist(),
        "true": labels[order].long().tolist(),
        "pred": pred[order].tolist(),
        "prob": prob[order].tolist(),
    }
