"""Train-time augmentation as ONE batched affine warp on the device.

    g = torch.Generator(device).manual_seed(0)
    x = augment_batch(images_u8, cfg, g)    # (B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]
    x = to_unit(images_u8)                  # the same without augmentation (evaluation)

Every sample draws its own parameters: with probability `zoom_p` the seed's
"center-crop 22 then resize to 28" (a zoom of 28/22 about the centre), then a
rotation uniform in +-max_rotation degrees (and, if asked, a shift), with zeros
outside the image -- the seed's fill=0, applied before normalization as in the
seed (normalization is inputs.py's job).

`interpolation` says how the rotation samples pixels. "nearest" is what the
seed's torchvision transforms do (Resize is bilinear, RandomRotation defaults to
NEAREST): a bilinear zoom, then a nearest-pixel rotation, two grid_samples per
batch. "bilinear" composes zoom, rotation and shift into one 2x3 matrix per
sample: a single bilinear grid_sample, smoother and slightly cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import AugmentConfig
from .data import IMAGE_SIZE
from .inputs import to_unit


def affine_theta(angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample (B, 2, 3) matrices for F.affine_grid.

    The content is scaled by `scale` (>1 zooms in), rotated by `angle_deg`
    counter-clockwise on screen (PIL / torchvision convention) and shifted by
    `shift` (B, 2) in normalized units (2.0 = the image width), all about the
    centre. affine_grid maps OUTPUT coordinates to INPUT ones, so theta is the
    inverse of that forward map: p_in = R(-a) (p_out - shift) / scale.
    """
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # With y pointing down, R(-a) as seen on screen is [[cos, -sin], [sin, cos]].
    linear = torch.stack([torch.stack([cos, -sin], dim=1),
                          torch.stack([sin, cos], dim=1)], dim=1)  # (B, 2, 2)
    offset = -(linear @ shift.unsqueeze(2))  # (B, 2, 1)
    return torch.cat([linear, offset], dim=2)  # (B, 2, 3)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp of (B, 1, H, W) by (B, 2, 3), zeros outside the image; mode bilinear or nearest.
    With align_corners=False a nearest sample takes the pixel whose square holds the
    sampling point, as PIL's NEAREST does."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent draws per sample: angle (n,) degrees, scale (n,), shift (n, 2)."""
    u = torch.rand(n, 4, generator=generator, device=device)  # one draw, sliced: fewer kernel launches
    angle = (u[:, 0] * 2 - 1) * cfg.max_rotation
    zoom = IMAGE_SIZE / cfg.zoom_crop  # crop 22 then resize to 28 = magnify 28/22
    scale = torch.where(u[:, 1] < cfg.zoom_p, zoom, 1.0)
    pixels_to_unit = 2.0 / IMAGE_SIZE
    shift = (u[:, 2:] * 2 - 1) * (cfg.max_shift * pixels_to_unit)
    return angle, scale, shift


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1], warped."""
    x = to_unit(images)
    if not cfg.enabled:
        return x
    angle, scale, shift = sample_params(x.shape[0], cfg, generator, x.device)
    if not (cfg.zoom_p > 0 or cfg.max_rotation > 0 or cfg.max_shift > 0):
        pass  # flips only (the fashion recipe): no warp to do, the identity warp would only cost time
    elif cfg.interpolation == "bilinear":
        x = warp(x, affine_theta(angle, scale, shift))
    else:  # the seed's two steps: bilinear resize, then nearest-pixel rotation (+ shift)
        none, one = torch.zeros_like(angle), torch.ones_like(scale)
        if cfg.zoom_p > 0:
            x = warp(x, affine_theta(none, scale, torch.zeros_like(shift)))
        x = warp(x, affine_theta(angle, one, shift), mode="nearest")
    if cfg.hflip_p > 0:  # drawn only when asked, so the other draws stay what they were
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < cfg.hflip_p  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
