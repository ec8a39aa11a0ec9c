"""The input contract, in one place: raw images in [0, 1] in, normalization and
log-softmax applied here and nowhere else.

    x = to_unit(images_u8)             # (B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]
    out = log_probs(model, x, norm)    # normalizes with the data set's (mean, std), runs the network,
                                       # log-softmax: (B, classes)
    wrapped = Normalized(model, norm)  # the same as an nn.Module: what exports and predict run
    x = checked_images(batch)          # a caller's (N, 28, 28) / (N, 1, 28, 28) uint8 or [0, 1] floats
                                       # -> (N, 1, 28, 28) in [0, 1]; anything else an ImageError

A network takes normalized (B, 1, 28, 28) images and may return logits or
log-probabilities: log_softmax is applied to whatever it returns (on
log-probabilities it changes nothing), so both conventions train and predict alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.errors import ImageError

# Mean and std of the 60,000 training images scaled to [0, 1]
# (`mnist.train_images.float().div(255).mean()/.std()` gives 0.1307 / 0.3081).
# The seed used 0.1407 / 0.4081, a typo of these.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_NORM = (MNIST_MEAN, MNIST_STD)
PIXEL_MAX = 255.0  # uint8 images
SIDE = 28  # every MNIST-family image is 28x28


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float in [0, 1], of torch's default float dtype: float32,
    unless a test computes in float64 (torch.set_default_dtype) to compare two computations exactly."""
    return images.unsqueeze(1).to(torch.get_default_dtype()).div_(PIXEL_MAX)


def normalize(x: torch.Tensor, norm: tuple[float, float] = MNIST_NORM) -> torch.Tensor:
    """(x - mean) / std with the data set's (mean, std) of its training images (MNIST's by default)."""
    mean, std = norm
    return (x - mean) / std


def as_log_probs(out: torch.Tensor) -> torch.Tensor:
    """A network's (B, classes) output, logits or log-probabilities -> log-probabilities in the
    default float dtype (fp32). Under bf16 autocast on the CPU log_softmax runs in bf16, as the
    seed network's own last layer always did there; the cast to fp32 comes after it."""
    return F.log_softmax(out, dim=1).to(torch.get_default_dtype())


def log_probs(model: nn.Module, x: torch.Tensor, norm: tuple[float, float] = MNIST_NORM) -> torch.Tensor:
    """(B, 1, 28, 28) images in [0, 1] -> (B, classes) fp32 log-probabilities."""
    return as_log_probs(model(normalize(x, norm)))


class Normalized(nn.Module):
    """The network with the input contract around it: takes images in [0, 1], returns
    log-probabilities. Exports, predict and the Python API run this."""

    def __init__(self, model: nn.Module, norm: tuple[float, float] = MNIST_NORM) -> None:
        super().__init__()
        self.model = model
        self.norm = norm  # plain floats: traced and exported as constants

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return log_probs(self.model, images, self.norm)


def checked_images(images: torch.Tensor) -> torch.Tensor:
    """A caller's batch as the network takes it: (N, 28, 28) or (N, 1, 28, 28), uint8 0..255 (divided
    by 255 here) or floats in [0, 1] -> (N, 1, 28, 28) floats in [0, 1]. Anything else is one line
    that says what was expected: already-normalized images or 0..255 floats would give wrong
    answers without a word (31% and 40% of MNIST's test set, measured), so they are refused."""
    shape = tuple(images.shape)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, SIDE, SIDE):
        raise ImageError(f"expected images shaped (N, {SIDE}, {SIDE}) or (N, 1, {SIDE}, {SIDE}), got {shape}")
    if images.dtype == torch.uint8:
        return images.to(torch.get_default_dtype()).div_(PIXEL_MAX)
    if not images.is_floating_point():
        raise ImageError(f"expected uint8 (0..255) or float images in [0, 1], got {images.dtype}")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails both
        low, high = images.min().item(), images.max().item()
        raise ImageError(
            f"float images must be in [0, 1] (these span {low:.3g}..{high:.3g}): pass raw uint8 0..255, "
            "or divide by 255; do not normalize them, the model does"
        )
    return images
