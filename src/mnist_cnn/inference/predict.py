"""People's own digit images -> MNIST-style 28x28 -> probabilities.

    digit = preprocess(Image.open("my_seven.jpg"))   # (28, 28) float in [0, 1], white on black
    probs = predict_probs(model, [digit])            # (1, 10)

A photo or drawing looks nothing like MNIST until it is prepared the way MNIST
itself was made: grayscale; inverted if the digit is dark on a light
background; cropped to the ink; the longer side scaled to 20 px with
anti-aliasing, keeping the aspect ratio; pasted into 28x28 so that the
intensity-weighted centre of mass sits at the centre. A 28x28 image that
already looks like MNIST passes through unchanged.

Fashion-MNIST was made differently (kind="object"): the object trimmed to its
bounding box, its longer side resized to 28 px, centred, light on dark.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torch import nn

from mnist_cnn.data.contract import MNIST_NORM, log_probs
from mnist_cnn.errors import ImageError
from mnist_cnn.files import SOFTWARE, atomic_write

CANVAS = 28
BOX = 20  # MNIST scaled each digit so its longer side is 20 px...
CENTRE = 14.0  # ...and moved its centre of mass to pixel 14 (test set: 13.5 <= com < 14.5)
MIN_SIDE = 8  # smaller than this is not a picture of anything
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (20,000 x 20,000 would need 400 MB)
LIGHT_BACKGROUND = 0.5  # border brighter than this (0..1): dark ink on light paper -> invert
INK = 0.25  # after background removal, pixels above this fraction of the peak count as ink
MIN_CONTRAST = 0.15  # peak ink above background, else the image is blank
OBJECT_EDGE = 0.05  # an object's faint edges count (a garment is not a pen stroke): trim at 5% of the peak
MNIST_LIKE_COM = 1.0  # a 28x28 image with its centre of mass this close to CENTRE is used as is


def open_image(file: str | Path | bytes, source: str | None = None) -> Image.Image:
    """Open and fully decode an image file (a path, or the bytes of an upload), refusing
    anything unusable with an ImageError whose message starts with `source`."""
    source = source or str(file)
    if (len(file) if isinstance(file, bytes) else file_size(file)) == 0:
        raise ImageError(f"{source}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{source}: {w}x{h} is larger than the {MAX_PIXELS:,}-pixel limit; scale it down")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{source}: larger than the {MAX_PIXELS:,}-pixel limit; scale it down") from None
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{source}: not an image PIL can read (PNG, JPEG, BMP, GIF, ...)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{source}: cannot decode image ({e})") from None
    if min(img.size) < MIN_SIDE:
        raise ImageError(
            f"{source}: {img.size[0]}x{img.size[1]} is too small; an image must be at least {MIN_SIDE}x{MIN_SIDE}"
        )
    return img


def file_size(path: str | Path) -> int | None:
    """Bytes in a regular file; None for anything else (a missing file is open_image's error)."""
    try:
        return os.stat(path).st_size if os.path.isfile(path) else None
    except OSError:
        return None


def to_gray(img: Image.Image) -> np.ndarray:
    """Any mode -> (H, W) float in [0, 1]; transparency is composited over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    if img.mode in ("I", "I;16", "F"):
        a = np.asarray(img, dtype=np.float32)
        return (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted (row, column) of a (H, W) array with some ink."""
    total = a.sum()
    rows, cols = np.arange(a.shape[0]), np.arange(a.shape[1])
    return float(a.sum(1) @ rows / total), float(a.sum(0) @ cols / total)


def looks_like_mnist(gray: np.ndarray) -> bool:
    """28x28, light on dark, centre of mass where MNIST puts it."""
    if gray.shape != (CANVAS, CANVAS) or np.median(border(gray)) > LIGHT_BACKGROUND or gray.max() <= 0:
        return False
    r, c = centre_of_mass(gray)
    return abs(r - CENTRE) <= MNIST_LIKE_COM and abs(c - CENTRE) <= MNIST_LIKE_COM


def preprocess(img: Image.Image, source: str = "image", kind: str = "handwriting") -> np.ndarray:
    """An image of one digit, letter or object -> (28, 28) float32 in [0, 1], light on dark,
    prepared the way the model's data set was made: `kind` is the data set's preprocessing,
    "handwriting" (MNIST, KMNIST, EMNIST, QMNIST) or "object" (Fashion-MNIST)."""
    gray = to_gray(img)
    if kind == "object":
        return preprocess_object(gray, source)
    if looks_like_mnist(gray):
        return gray
    small = crop_and_fit(foreground(gray, source), INK, BOX)  # (<=20, <=20), anti-aliased
    r, c = centre_of_mass(small)
    top, left = round(CENTRE - r), round(CENTRE - c)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    # paste with clipping: a very lopsided digit may need a shift that crosses the edge
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + small.shape[0], CANVAS), min(left + small.shape[1], CANVAS)
    canvas[r0:r1, c0:c1] = small[r0 - top : r1 - top, c0 - left : c1 - left]
    return canvas


def crop_and_fit(gray: np.ndarray, threshold: float, side: int) -> np.ndarray:
    """Crop (H, W) to the box of pixels above `threshold`, then resize (Lanczos, anti-aliased)
    so that the longer side is `side` pixels, keeping the aspect ratio."""
    rows = np.flatnonzero((gray > threshold).any(1))
    cols = np.flatnonzero((gray > threshold).any(0))
    crop = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # (h, w)
    h, w = crop.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (width, height)
    small = Image.fromarray(np.round(crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def foreground(gray: np.ndarray, source: str) -> np.ndarray:
    """Light on dark with the background at 0 and the peak at 1; a blank image is an ImageError."""
    if np.median(border(gray)) > LIGHT_BACKGROUND:
        gray = 1.0 - gray  # dark on light paper (or a product shot on white)
    gray = np.clip(gray - np.median(border(gray)), 0.0, None)  # the background becomes 0
    peak = float(gray.max())
    if peak < MIN_CONTRAST:
        raise ImageError(f"{source}: no ink found (the image is blank or has almost no contrast)")
    return gray / peak


def preprocess_object(gray: np.ndarray, source: str) -> np.ndarray:
    """Fashion-MNIST's recipe: the object trimmed to its bounding box, its longer side
    resized to 28 px, centred on a 28x28 canvas, light on dark. A 28x28 image that is
    already light on dark passes through unchanged."""
    if gray.shape == (CANVAS, CANVAS) and np.median(border(gray)) <= LIGHT_BACKGROUND:
        return gray
    small = crop_and_fit(foreground(gray, source), OBJECT_EDGE, CANVAS)  # longer side 28
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    top, left = (CANVAS - small.shape[0]) // 2, (CANVAS - small.shape[1]) // 2
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small
    return canvas


def load_digit(file: str | Path | bytes, kind: str = "handwriting", source: str | None = None) -> np.ndarray:
    """A path or the bytes of an upload -> (28, 28) float32 in [0, 1], ready for predict_probs."""
    source = source or str(file)
    return preprocess(open_image(file, source), source, kind)


@torch.no_grad()
def predict_log_probs_of(
    model: nn.Module, digits: list[np.ndarray], norm: tuple[float, float] = MNIST_NORM
) -> torch.Tensor:
    """(N,) 28x28 [0, 1] arrays -> (N, classes) log-probabilities, one forward pass; norm is the
    data set's (mean, std)."""
    model.eval()
    x = torch.from_numpy(np.stack(digits)).unsqueeze(1)  # (N, 1, 28, 28)
    return log_probs(model, x.to(next(model.parameters()).device), norm).cpu()


def predict_probs(model: nn.Module, digits: list[np.ndarray], norm: tuple[float, float] = MNIST_NORM) -> torch.Tensor:
    """(N,) 28x28 [0, 1] arrays -> (N, classes) probabilities."""
    return predict_log_probs_of(model, digits, norm).exp()


def top_k(probs: torch.Tensor, k: int = 3) -> list[tuple[int, float]]:
    values, indices = probs.topk(k)
    return [(int(i), float(v)) for v, i in zip(values, indices)]


def answer(image: str, probs: torch.Tensor, classes: tuple[str, ...]) -> dict:
    """One image's answer, as `predict --json` prints it and `serve` returns it: "digit" is
    the class index (a digit for the digit sets), "label" the class name."""
    top3 = top_k(probs, min(3, len(classes)))
    return {
        "image": image,
        "digit": top3[0][0],
        "label": classes[top3[0][0]],
        "probability": top3[0][1],
        "top3": [{"digit": d, "label": classes[d], "probability": q} for d, q in top3],
    }


def save_preprocessed(digit: np.ndarray, path: Path) -> None:
    img = Image.fromarray(np.round(digit * 255).astype(np.uint8))
    mark = PngImagePlugin.PngInfo()
    mark.add_text("Software", SOFTWARE)  # the tool's own file: a later --save-preprocessed may replace it
    atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=mark))
