"""Batched augmentation: per-sample parameters, ranges, and agreement with PIL."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_digits
from mnist_cnn.config import AugmentConfig
from mnist_cnn.data.augment import (
    ELASTIC_GRID,
    Draws,
    affine_theta,
    apply_draws,
    augment_batch,
    draw,
    sample_params,
    warp,
)
from mnist_cnn.data.contract import MNIST_MEAN, MNIST_STD, normalize, to_unit

N = 20_000


def draws(cfg=AugmentConfig(), n=N, seed=0):
    return sample_params(n, cfg, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_angles_stay_within_15_degrees_and_spread_across_the_range():
    angle, _, _ = draws()
    assert angle.abs().max() <= 15.0
    # uniform on [-15, 15]: every 3-degree bin holds about a tenth of the draws
    counts = torch.histc(angle, bins=10, min=-15, max=15)
    assert (counts / N - 0.1).abs().max() < 0.015
    assert angle.min() < -14.5 and angle.max() > 14.5


def test_about_ten_percent_of_samples_are_zoomed_by_28_over_22():
    _, scale, _ = draws()
    zoomed = scale != 1.0
    assert abs(zoomed.float().mean().item() - 0.1) < 0.01  # 0.1 +- 4.7 binomial sigma
    assert torch.allclose(scale[zoomed], torch.tensor(28 / 22))


def test_every_sample_draws_its_own_parameters():
    angle, _, _ = draws(n=64)
    assert angle.unique().numel() == 64


def test_same_generator_seed_gives_the_same_draws():
    assert all(torch.equal(a, b) for a, b in zip(draws(seed=3), draws(seed=3)))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_identity_parameters_return_the_input(mode):
    x = to_unit(torch.from_numpy(synthetic_digits(16)[0]))
    theta = affine_theta(torch.zeros(16), torch.ones(16), torch.zeros(16, 2))
    assert torch.allclose(warp(x, theta, mode), x, atol=1e-5)
    off = AugmentConfig(zoom_p=0.0, max_rotation=0.0)
    out = augment_batch(torch.from_numpy(synthetic_digits(16)[0]), off, torch.Generator())
    assert torch.equal(out, x)  # [0, 1] images out: normalization is the training step's
    assert torch.allclose(normalize(x), (x - 0.1307) / 0.3081, atol=1e-6)


def pil_rotate(images: np.ndarray, angle: float, resample=Image.BILINEAR) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(np.array(Image.fromarray(a).rotate(angle, resample=resample, fillcolor=0))).float()
            for a in images
        ]
    )


@pytest.mark.parametrize("angle", [-15.0, -7.3, 3.1, 10.0, 14.9, 90.0])
def test_nearest_rotation_is_pil_nearest_exactly(angle):
    """torchvision's RandomRotation default (InterpolationMode.NEAREST) is PIL's rotate with
    NEAREST: every pixel must be the same one."""
    images = synthetic_digits(64, noise=60)[0]
    theta = affine_theta(torch.full((64,), angle), torch.ones(64), torch.zeros(64, 2))
    ours = warp(to_unit(torch.from_numpy(images)), theta, "nearest")[:, 0] * 255
    assert torch.equal(ours.round(), pil_rotate(images, angle, Image.NEAREST))


def seed_transforms(image: np.ndarray, zoom: bool, angle: float) -> np.ndarray:
    """The seed's torchvision pipeline with torchvision's settings, on fixed parameters:
    RandomApply([CenterCrop(22), Resize((28, 28))]) -> PIL crop + bilinear resize;
    RandomRotation(15, fill=0) -> PIL rotate, NEAREST, about the centre, fill 0."""
    img = Image.fromarray(image)
    if zoom:
        top = int(round((28 - 22) / 2.0))  # torchvision's CenterCrop offset
        img = img.crop((top, top, top + 22, top + 22)).resize((28, 28), Image.BILINEAR)
    return np.array(img.rotate(angle, resample=Image.NEAREST, expand=False, fillcolor=0))


def test_seed_recipe_augmentation_matches_the_seeds_transforms_on_the_same_draws():
    """augment_batch with the seed recipe, against the PIL pipeline fed the very angles and
    zooms it drew. PIL rounds to uint8 between resize and rotation and clamps at the crop's
    edge, so a few pixels differ; all others agree within 1.5 grey levels."""
    from mnist_cnn.config import load_config

    cfg = load_config("seed").augment
    assert cfg.interpolation == "nearest"
    images = synthetic_digits(256, noise=0)[0]
    angle, scale, _ = sample_params(256, cfg, torch.Generator().manual_seed(5), torch.device("cpu"))
    ours = augment_batch(torch.from_numpy(images), cfg, torch.Generator().manual_seed(5))[:, 0]
    ours = ours * 255
    ref = torch.stack(
        [torch.from_numpy(seed_transforms(a, bool(z != 1), float(t))).float() for a, z, t in zip(images, scale, angle)]
    )
    assert 10 <= int((scale != 1).sum()) <= 45  # about 10% zoomed: both branches are compared
    diff = (ours - ref).abs()
    assert (diff <= 1.5).float().mean() > 0.995
    assert diff.mean() < 0.5


def test_bilinear_interpolation_is_one_smoother_warp():
    images = synthetic_digits(64, noise=0)[0]
    near = AugmentConfig(interpolation="nearest", zoom_p=0.0)
    smooth = AugmentConfig(interpolation="bilinear", zoom_p=0.0)
    a = augment_batch(torch.from_numpy(images), near, torch.Generator().manual_seed(1))
    b = augment_batch(torch.from_numpy(images), smooth, torch.Generator().manual_seed(1))
    levels = lambda x: torch.unique((x * 255).round())  # noqa: E731
    assert set(levels(a).tolist()) <= {0.0, 200.0, 255.0}  # nearest only moves pixels: no new grey levels
    assert len(levels(b)) > 20  # bilinear blends them


@pytest.mark.parametrize("angle", [-15.0, -7.3, 10.0, 90.0])
def test_fixed_rotation_matches_pil_rotate(angle):
    """Tolerance: mean |difference| under 0.5 grey levels (of 255) and 99.5% of
    pixels within 2 levels. PIL works in fixed point and treats the outermost
    ring of pixels differently, so a few edge pixels may differ more."""
    images = synthetic_digits(64, noise=0)[0]
    theta = affine_theta(torch.full((64,), angle), torch.ones(64), torch.zeros(64, 2))
    ours = warp(to_unit(torch.from_numpy(images)), theta)[:, 0] * 255
    diff = (ours - pil_rotate(images, angle)).abs()
    assert diff.mean() < 0.5
    assert (diff <= 2).float().mean() > 0.995


def test_zoom_matches_center_crop_22_then_resize_28():
    images = synthetic_digits(64, noise=0)[0]
    ref = torch.stack(
        [
            torch.from_numpy(np.array(Image.fromarray(a).crop((3, 3, 25, 25)).resize((28, 28), Image.BILINEAR))).float()
            for a in images
        ]
    )
    theta = affine_theta(torch.zeros(64), torch.full((64,), 28 / 22), torch.zeros(64, 2))
    ours = warp(to_unit(torch.from_numpy(images)), theta)[:, 0] * 255
    # PIL's resize clamps at the crop edge; we sample the real pixels beyond it: compare the interior.
    assert (ours - ref)[:, 1:-1, 1:-1].abs().max() <= 1.5


def test_shift_moves_content_by_whole_pixels():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 10] = 1.0
    theta = affine_theta(torch.zeros(1), torch.ones(1), torch.tensor([[3 * 2 / 28, 2 * 2 / 28]]))
    out = warp(x, theta)[0, 0]
    assert out[12, 13] == pytest.approx(1.0, abs=1e-5)  # 3 right, 2 down


def test_rotation_fills_with_zero_before_normalization():
    white = torch.full((64, 28, 28), 255, dtype=torch.uint8)
    cfg = AugmentConfig(zoom_p=0.0, max_rotation=15.0)
    out = augment_batch(white, cfg, torch.Generator().manual_seed(0))
    # corners rotate out of the image and come back black in pixel space (0, not MNIST_MEAN),
    # because the warp runs on [0, 1] images before normalization
    assert out.min() == pytest.approx(0.0, abs=1e-5)
    assert out[:, 0, 14, 14].min() == pytest.approx(1.0, abs=1e-5)


def test_normalization_constants_are_those_of_the_training_set(real_dir):
    from mnist_cnn.data.splits import load_split

    images, _ = load_split(real_dir, "train")
    x = images.float().div(255)
    assert MNIST_MEAN == pytest.approx(x.mean().item(), abs=5e-5)
    assert MNIST_STD == pytest.approx(x.std().item(), abs=5e-5)


def test_hflip_mirrors_about_half_the_images_exactly_and_nothing_else():
    images = torch.from_numpy(synthetic_digits(400, noise=0)[0])
    cfg = AugmentConfig(zoom_p=0.0, max_rotation=0.0, max_shift=0.0, hflip_p=0.5)
    out = augment_batch(images, cfg, torch.Generator().manual_seed(0))[:, 0]
    x = images.float() / 255
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(2)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # every image is itself or its exact mirror
    assert 160 <= int((mirrored & ~same).sum()) <= 240  # about half: 200 +- 4 sigma
    off = AugmentConfig(zoom_p=0.0, max_rotation=0.0, max_shift=0.0, hflip_p=0.0)
    assert torch.equal(augment_batch(images, off, torch.Generator()), x.unsqueeze(1))


def test_scale_jitter_spreads_scales_over_its_range_and_leaves_other_draws_alone():
    plain = AugmentConfig(zoom_p=0.0, max_rotation=10.0, max_shift=2.0)
    jitter = AugmentConfig(zoom_p=0.0, max_rotation=10.0, max_shift=2.0, max_scale=0.1)
    angle, scale, shift = draws(jitter)
    assert scale.min() >= 0.9 and scale.max() <= 1.1
    assert scale.min() < 0.905 and scale.max() > 1.095  # uniform: both ends reached
    angle0, scale0, shift0 = draws(plain)
    assert torch.equal(angle, angle0) and torch.equal(shift, shift0)  # drawn after them: older recipes unchanged
    assert bool((scale0 == 1).all())


def test_elastic_field_is_drawn_only_when_on_and_stays_within_its_size():
    g = torch.Generator().manual_seed(0)
    off = draw(64, AugmentConfig(), g, torch.device("cpu"))
    assert off.field is None
    on = draw(N, AugmentConfig(elastic=2.5), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert on.field.shape == (N, 2, ELASTIC_GRID, ELASTIC_GRID)
    assert on.field.abs().max() <= 2.5 and on.field.abs().max() > 2.45
    assert torch.equal(on.angle, draw(N, AugmentConfig(), torch.Generator().manual_seed(0), torch.device("cpu")).angle)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_a_uniform_elastic_field_is_a_shift_by_the_same_pixels(interpolation):
    # every control point moved by (+3, -2) px: each output pixel samples 3 px right and 2 px up,
    # so the content moves 3 px left and 2 px down -- the shift warp's (-3, +2)
    images = torch.from_numpy(synthetic_digits(8, noise=0)[0])
    cfg = AugmentConfig(zoom_p=0.0, max_rotation=0.0, elastic=3.0, interpolation=interpolation)
    n = images.shape[0]
    field = torch.empty(n, 2, ELASTIC_GRID, ELASTIC_GRID)
    field[:, 0], field[:, 1] = 3.0, -2.0
    zero, one = torch.zeros(n), torch.ones(n)
    elastic = apply_draws(images, cfg, Draws(zero, one, torch.zeros(n, 2), None, field))
    shift = torch.tensor([[-3.0, 2.0]]).repeat(n, 1) * (2 / 28)
    moved = warp(to_unit(images), affine_theta(zero, one, shift), mode=interpolation)
    assert (elastic - moved).abs().max() < 1e-4


def test_elastic_warp_bends_strokes_but_keeps_the_ink():
    images = torch.from_numpy(synthetic_digits(256, noise=0)[0])
    cfg = AugmentConfig(zoom_p=0.0, max_rotation=0.0, elastic=2.0, interpolation="bilinear")
    out = augment_batch(images, cfg, torch.Generator().manual_seed(1))
    x = to_unit(images)
    changed = (out - x).flatten(1).abs().amax(1)
    assert bool((changed > 0.1).all())  # every image is deformed
    ink_ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert 0.8 < ink_ratio.median() < 1.2  # a smooth field moves ink, it does not erase it


def test_draws_of_several_generators_concatenate_with_their_elastic_fields():
    cfg = AugmentConfig(elastic=1.5)
    parts = [draw(8, cfg, torch.Generator().manual_seed(k), torch.device("cpu")) for k in range(3)]
    joined = Draws.cat(parts)
    assert joined.field.shape == (24, 2, ELASTIC_GRID, ELASTIC_GRID) and joined.flip is None
    assert torch.equal(joined.field[8:16], parts[1].field) and torch.equal(joined.angle[16:], parts[2].angle)
