"""Train-time augmentation as ONE batched affine warp on the device.

    g = torch.Generator(device).manual_seed(0)
    x = augment_batch(images_u8, cfg, g)    # (B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]
    x = to_unit(images_u8)                  # the same without augmentation (evaluation)

Every sample draws its own parameters: with probability `zoom_p` the seed's
"center-crop 22 then resize to 28" (a zoom of 28/22 about the centre), then a
rotation uniform in +-max_rotation degrees (and, if asked, a shift), with zeros
outside the image -- the seed's fill=0, applied before normalization as in the
seed (normalization is the contract's job: data.contract).

Two stronger warps for the search of issue 14, each off by default and drawn
only when on (so the other draws, and published results, stay what they were):
`max_scale` multiplies each sample's scale by a factor uniform in
[1 - max_scale, 1 + max_scale], and `elastic` adds a smooth random displacement
field -- ELASTIC_GRID x ELASTIC_GRID control points, each moved uniformly in
+-elastic pixels per axis, upsampled bicubically to 28 x 28 -- to the sampling grid
(Simard et al. 2003 smooth a dense noise field with a Gaussian; a coarse grid
upsampled is the same kind of field in one small kernel).

`interpolation` says how the rotation samples pixels. "nearest" is what the
seed's torchvision transforms do (Resize is bilinear, RandomRotation defaults to
NEAREST): a bilinear zoom, then a nearest-pixel rotation, two grid_samples per
batch. "bilinear" composes zoom, rotation and shift into one 2x3 matrix per
sample: a single bilinear grid_sample, smoother and slightly cheaper.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mnist_cnn.config import AugmentConfig
from mnist_cnn.data.contract import to_unit
from mnist_cnn.data.idx import IMAGE_SIZE

ELASTIC_GRID = 4  # control points per axis of the elastic field: ~9 px apart, the scale of a stroke


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
    linear = torch.stack([torch.stack([cos, -sin], dim=1), torch.stack([sin, cos], dim=1)], dim=1)  # (B, 2, 2)
    offset = -(linear @ shift.unsqueeze(2))  # (B, 2, 1)
    return torch.cat([linear, offset], dim=2)  # (B, 2, 3)


def warp(
    x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", displacement: torch.Tensor | None = None
) -> torch.Tensor:
    """Warp of (B, 1, H, W) by (B, 2, 3), zeros outside the image; mode bilinear or nearest.
    With align_corners=False a nearest sample takes the pixel whose square holds the
    sampling point, as PIL's NEAREST does. `displacement` (B, H, W, 2), in normalized
    units, moves each output pixel's sampling point: the elastic field."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    if displacement is not None:
        grid = grid + displacement
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class Draws(NamedTuple):
    """One batch's augmentation draws: angle (n,) degrees, scale (n,), shift (n, 2); flip (n,)
    and field (n, 2, ELASTIC_GRID, ELASTIC_GRID) pixels, or None when off."""

    angle: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    flip: torch.Tensor | None = None
    field: torch.Tensor | None = None

    @staticmethod
    def cat(parts: "list[Draws]") -> "Draws":
        """One Draws of several (the same config's): optional parts stay None when off."""

        def joined(column: list[torch.Tensor | None]) -> torch.Tensor | None:
            if column[0] is None:
                return None
            tensors = [t for t in column if t is not None]
            assert len(tensors) == len(column), "draws of one config: an optional part is on in all or none"
            return torch.cat(tensors)

        return Draws(
            torch.cat([p.angle for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.shift for p in parts]),
            joined([p.flip for p in parts]),
            joined([p.field for p in parts]),
        )


def sample_params(
    n: int, cfg: AugmentConfig, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent draws per sample: angle (n,) degrees, scale (n,), shift (n, 2)."""
    u = torch.rand(n, 4, generator=generator, device=device)  # one draw, sliced: fewer kernel launches
    angle = (u[:, 0] * 2 - 1) * cfg.max_rotation
    zoom = IMAGE_SIZE / cfg.zoom_crop  # crop 22 then resize to 28 = magnify 28/22
    scale = torch.where(u[:, 1] < cfg.zoom_p, zoom, 1.0)
    pixels_to_unit = 2.0 / IMAGE_SIZE
    shift = (u[:, 2:] * 2 - 1) * (cfg.max_shift * pixels_to_unit)
    if cfg.max_scale > 0:  # drawn only when asked: the draws above stay those of older recipes
        scale = scale * (1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * cfg.max_scale)
    return angle, scale, shift


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1], warped."""
    if not cfg.enabled:
        return to_unit(images)
    return apply_draws(images, cfg, draw(images.shape[0], cfg, generator, images.device))


def draw(n: int, cfg: AugmentConfig, generator: torch.Generator, device: torch.device) -> Draws:
    """Every random number that augmenting n images takes, in the order augment_batch draws them."""
    angle, scale, shift = sample_params(n, cfg, generator, device)
    flip = None
    if cfg.hflip_p > 0:  # drawn only when asked, so the other draws stay what they were
        flip = torch.rand(n, generator=generator, device=device) < cfg.hflip_p  # (n,)
    field = None
    if cfg.elastic > 0:
        field = (torch.rand(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator, device=device) * 2 - 1) * cfg.elastic
    return Draws(angle, scale, shift, flip, field)


def displacement(field: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """(n, 2, G, G) control-point moves in pixels -> (n, size, size, 2) in grid_sample's normalized
    units (x then y, as the grid), smooth between the points."""
    if field is None:
        return None
    dense = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True)  # (n, 2, H, W)
    return dense.permute(0, 2, 3, 1) * (2.0 / size)


def apply_draws(images: torch.Tensor, cfg: AugmentConfig, d: Draws) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1], warped as the draws say. Draws of
    several generators concatenated (Draws.cat) augment their batches in one warp: stacked seeds."""
    x = to_unit(images)
    moved = displacement(d.field, x.shape[-1])  # (B, H, W, 2) or None
    if not cfg.warps:
        pass  # flips only (the fashion recipe): no warp to do, the identity warp would only cost time
    elif cfg.interpolation == "bilinear":
        x = warp(x, affine_theta(d.angle, d.scale, d.shift), displacement=moved)
    else:  # the seed's two steps: bilinear resize, then nearest-pixel rotation (+ shift, elastic field)
        none, one = torch.zeros_like(d.angle), torch.ones_like(d.scale)
        if cfg.zoom_p > 0 or cfg.max_scale > 0:
            x = warp(x, affine_theta(none, d.scale, torch.zeros_like(d.shift)))
        x = warp(x, affine_theta(d.angle, one, d.shift), mode="nearest", displacement=moved)
    if d.flip is not None:
        x = torch.where(d.flip[:, None, None, None], x.flip(3), x)
    return x
