"""The device batch stage: geometry, one resample per image, anti-aliasing, lighting, seeding (real tensors)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from petbreeds.config import AugmentParams
from petbreeds.data.augment import BatchAugment, Draws, ValidAugment, affine_matrices, sampling_grid, warp_matrices
from petbreeds.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

BOOK = AugmentParams(
    mult=1.0,
    do_flip=True,
    max_rotate=10.0,
    min_zoom=1.0,
    max_zoom=1.1,
    max_warp=0.2,
    max_lighting=0.2,
    p_affine=0.75,
    p_lighting=0.75,
    min_scale=0.75,
)
OFF = BOOK.model_copy(
    update={
        "do_flip": False,
        "max_rotate": 0.0,
        "max_zoom": 1.0,
        "max_warp": 0.0,
        "max_lighting": 0.0,
        "min_scale": 1.0,
    }
)
CPU = torch.device("cpu")


def smooth_images(n: int, side: int) -> torch.Tensor:
    """uint8 ``[n, 3, side, side]``: low-frequency patterns sampled at pixel centres, so the same continuous
    picture at any resolution (a resize of one is close to another)."""
    c = (torch.arange(side) * 2 + 1) / side - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    images = []
    for i in range(n):
        channels = [torch.sin(2.1 * x + 1.3 * k + i) * torch.cos(1.7 * y - 0.5 * k) for k in range(3)]
        images.append(torch.stack(channels))
    return ((torch.stack(images) * 0.45 + 0.5) * 255).round().to(torch.uint8)


def pixels(aug: BatchAugment, x: torch.Tensor) -> torch.Tensor:
    """Normalised output back to 0..255 floats."""
    return aug.denormalize(x) * 255


def test_with_augmentation_off_train_is_a_plain_resize() -> None:
    x = smooth_images(3, 64)
    aug = BatchAugment(OFF, 48, seed=0, device=CPU)
    train = pixels(aug, aug(x, train=True))
    plain = F.interpolate(x.float(), size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    assert (train - plain).abs().max() < 3.0
    assert (train - pixels(aug, aug(x, train=False))).abs().max() < 3.0


def test_forced_flip_mirrors() -> None:
    x = smooth_images(2, 32)
    aug = BatchAugment(BOOK, 32, seed=0, device=CPU)
    flipped = dataclasses.replace(Draws.identity(2), flip=torch.tensor([True, False]))
    out = aug.train(x, flipped)
    assert torch.allclose(out[0], aug.valid(x)[0].flip(-1), atol=1e-4)
    assert torch.allclose(out[1], aug.valid(x)[1], atol=1e-4)


def test_forced_rotation_moves_a_marked_pixel_where_the_maths_says() -> None:
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    row, col = 16, 48
    x[..., row - 1 : row + 2, col - 1 : col + 2] = 255
    degrees = 30.0
    aug = BatchAugment(BOOK, 64, seed=0, device=CPU)
    out = pixels(aug, aug.train(x, dataclasses.replace(Draws.identity(1), angle=torch.tensor([degrees]))))[0, 0]
    # output point p samples input R·p, R = [[cos, sin], [-sin, cos]]; so the mark lands at p = Rᵀ·q, in fastai's
    # align_corners=True coordinates (pixel i of 64 at -1 + 2i/63)
    qx, qy = 2 * col / 63 - 1, 2 * row / 63 - 1
    t = math.radians(degrees)
    px, py = math.cos(t) * qx - math.sin(t) * qy, math.sin(t) * qx + math.cos(t) * qy
    expected_col, expected_row = (px + 1) * 63 / 2, (py + 1) * 63 / 2
    weights = out.clamp(min=0)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    got_row, got_col = (weights * rows).sum() / weights.sum(), (weights * cols).sum() / weights.sum()
    assert abs(got_row - expected_row) < 0.5 and abs(got_col - expected_col) < 0.5
    assert (expected_row, expected_col) != pytest.approx((row, col), abs=3)  # it did move


def test_forced_crop_and_zoom_pick_the_expected_region() -> None:
    x = smooth_images(1, 64)
    aug = BatchAugment(BOOK, 32, seed=0, device=CPU)
    # fastai's crop of the top-left 32 x 32 pixels: its corner pixels' centres span 31/63 of the item's
    side = 31 / 63
    top_left = dataclasses.replace(
        Draws.identity(1), crop_side=torch.tensor([side]), crop_x=torch.tensor([0.0]), crop_y=torch.tensor([0.0])
    )
    # 32 outputs from 32 pixels: every output pixel reads one pixel's centre (no prefilter: nothing shrinks)
    assert (pixels(aug, aug.train(x, top_left)) - x[..., :32, :32]).abs().max() < 1e-3
    # fastai's zoom around the top-left centre fraction is the same region
    zoomed = dataclasses.replace(
        Draws.identity(1), zoom=torch.tensor([1 / side]), zoom_x=torch.tensor([0.0]), zoom_y=torch.tensor([0.0])
    )
    assert torch.allclose(aug.train(x, zoomed), aug.train(x, top_left), atol=1e-4)


def test_warp_maps_fastais_perturbed_points_to_the_corners() -> None:
    # fastai's image warp: the output pixel at the perturbed point (1 + y_t, -1 + x_t) reads the input's (1, -1).
    d = dataclasses.replace(Draws.identity(2), warp_x=torch.tensor([0.0, 0.1]), warp_y=torch.tensor([0.0, -0.2]))
    h = warp_matrices(d)
    assert torch.allclose(h[0], torch.eye(3), atol=1e-6)
    corner = h[1] @ torch.tensor([1 - 0.2, -1 + 0.1, 1.0])
    assert torch.allclose(corner[:2] / corner[2], torch.tensor([1.0, -1.0]), atol=1e-5)
    top_left = h[1] @ torch.tensor([-1.0, -1.0, 1.0])  # the output's corner reads outside the input (reflected)
    assert torch.allclose(top_left[:2] / top_left[2], torch.tensor([-1.1793, -0.8335]), atol=1e-4)


def test_affine_is_identity_for_identity_draws() -> None:
    assert torch.allclose(affine_matrices(Draws.identity(3)), torch.eye(3).expand(3, 3, 3))


def test_each_image_gets_its_own_draws() -> None:
    aug = BatchAugment(BOOK, 32, seed=1, device=CPU)
    d = aug.draw(16)
    for name in ("angle", "zoom", "crop_side", "crop_x", "warp_x", "brightness", "contrast"):
        assert getattr(d, name).unique().numel() > 3, name
    assert 0 < d.flip.sum() < 16
    x = smooth_images(1, 48).expand(8, -1, -1, -1)
    out = aug(x, train=True)
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 8))


def test_draws_follow_the_params_ranges() -> None:
    d = BatchAugment(BOOK, 32, seed=2, device=CPU).draw(4000)
    assert d.angle.abs().max() <= 10.0 and (d.angle == 0).float().mean() == pytest.approx(0.25, abs=0.03)
    assert d.zoom.min() >= 1.0 and d.zoom.max() <= 1.1
    assert math.sqrt(0.75) <= d.crop_side.min() and d.crop_side.max() <= 1.0
    assert d.brightness.min() >= 0.4 and d.brightness.max() <= 0.6
    assert d.contrast.min() >= 0.8 and d.contrast.max() <= 1.25
    assert d.flip.float().mean() == pytest.approx(0.5, abs=0.03)
    assert not BatchAugment(OFF, 32, seed=2, device=CPU).draw(100).flip.any()


def test_same_seed_same_batches_and_valid_is_deterministic() -> None:
    x = smooth_images(4, 40)
    a, b, c = (BatchAugment(BOOK, 24, seed=s, device=CPU) for s in (7, 7, 8))
    first = [a(x, train=True), a(x, train=True)]
    assert all(torch.equal(f, b(x, train=True)) for f in first)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], c(x, train=True))
    assert torch.equal(a(x, train=False), c(x, train=False))
    assert torch.equal(a(x, train=False), a(x, train=False))


def test_output_shape_dtype_and_range() -> None:
    x = torch.full((2, 3, 40, 40), 128, dtype=torch.uint8)
    aug = BatchAugment(BOOK, 24, seed=0, device=CPU)
    for train in (True, False):
        out = aug(x, train=train)
        assert out.shape == (2, 3, 24, 24) and out.dtype == torch.float32
        shown = aug.denormalize(out)
        assert shown.min() >= 0.0 and shown.max() <= 1.0
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(aug(x, train=False)[0, :, 5, 5], expected, atol=1e-5)


def test_lighting_brightens_and_adds_contrast_per_image() -> None:
    x = smooth_images(1, 32).expand(3, -1, -1, -1)
    aug = BatchAugment(BOOK, 32, seed=0, device=CPU)
    d = dataclasses.replace(
        Draws.identity(3), brightness=torch.tensor([0.5, 0.6, 0.5]), contrast=torch.tensor([1.0, 1.0, 1.25])
    )
    out = pixels(aug, aug.train(x, d))
    plain = x[0].float()
    assert (out[0] - plain).abs().max() < 0.5
    assert out[1].mean() > plain.mean() + 10
    assert out[2].std() > plain.std() * 1.1


@pytest.mark.parametrize("item", [32, 160])  # 160 → 32 runs the anti-alias prefilter, 32 → 32 never shrinks
def test_exactly_one_grid_sample_per_training_batch(monkeypatch: pytest.MonkeyPatch, item: int) -> None:
    calls = []
    real = F.grid_sample

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", counting)
    aug = BatchAugment(BOOK, 32, seed=0, device=CPU)
    aug(smooth_images(4, item), train=True)
    assert len(calls) == 1
    assert calls[0][-1] < item if item == 160 else calls[0][-1] == item


def test_large_downscale_prefilter_removes_aliasing_without_moving_anything() -> None:
    aug = BatchAugment(BOOK, 32, seed=0, device=CPU)
    # a one-pixel checkerboard: a faithful 5x reduction is (nearly) flat grey; bare bilinear sampling is not
    checker = ((torch.arange(160)[:, None] + torch.arange(160)[None, :]) % 2 * 255).to(torch.uint8)
    checker = checker.expand(1, 3, 160, 160)
    flat = pixels(aug, aug.train(checker, Draws.identity(1)))
    assert (flat - 127.5).abs().max() < 6.0  # a 5-pixel box leaves 1/25 of the pattern
    identity = F.affine_grid(torch.eye(3)[None, :2], [1, 3, 32, 32], align_corners=False)
    bare = F.grid_sample(checker.float(), identity, mode="bilinear", align_corners=False)
    assert (bare - 127.5).abs().max() > 100
    # the prefilter moves nothing: a linear ramp, which a symmetric low-pass filter leaves as it is, reads the same
    # through the prefilter as straight from the full-size item (same grid, no filter)
    d = dataclasses.replace(Draws.identity(1), angle=torch.tensor([8.0]), crop_side=torch.tensor([0.77]))
    k = torch.arange(160.0)
    ramp = (k[None, :] * 0.8 + k[:, None] * 0.4 + 20).expand(1, 3, 160, 160)
    filtered = pixels(aug, aug.train(ramp, d))
    grid = sampling_grid(warp_matrices(d) @ affine_matrices(d), 32, 160)
    unfiltered = F.grid_sample(ramp, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (filtered - unfiltered).abs().max() < 0.1  # an area reduction by 160/42 moves content by 0.39


def test_the_valid_path_alone_needs_no_params_and_has_no_training_path() -> None:
    x = smooth_images(3, 64)
    alone = ValidAugment(48, CPU)
    assert torch.equal(alone(x, train=False), BatchAugment(BOOK, 48, seed=0, device=CPU)(x, train=False))
    with pytest.raises(ValueError, match="no training path"):
        alone(x, train=True)
