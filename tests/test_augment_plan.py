"""Epoch plans (order + augmentation draws) and the numpy reference augmentation."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import augmentation

from harness.data.augment import apply_augmentation_numpy, epoch_plan


def _apply(images, angle=0.0, scale=1.0, hflip=False, vflip=False):
    n = len(images)
    return apply_augmentation_numpy(
        images, np.full(n, angle), np.full(n, scale), np.full(n, hflip), np.full(n, vflip)
    )


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(3, 9, 9), dtype=np.uint8)


def test_plan_is_a_pure_function_of_seed_and_epoch():
    aug = augmentation()
    a, b = epoch_plan(7, 3, 100, aug), epoch_plan(7, 3, 100, aug)
    for field in ("order", "angle", "scale", "hflip", "vflip"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.order, epoch_plan(7, 4, 100, aug).order)
    assert not np.array_equal(a.order, epoch_plan(8, 3, 100, aug).order)
    np.testing.assert_array_equal(np.sort(a.order), np.arange(100))
    assert a.order.dtype == np.int64 and a.angle.dtype == np.float32
    assert a.scale.dtype == np.float32 and a.hflip.dtype == bool and len(a) == 100
    # The documented stream: permutation, then angle, scale, hflip, vflip.
    rng = np.random.default_rng([7, 3])
    np.testing.assert_array_equal(a.order, rng.permutation(100))
    np.testing.assert_array_equal(a.angle, rng.uniform(-15, 15, 100).astype(np.float32))


def test_plan_ranges_and_switches():
    plan = epoch_plan(0, 0, 4000, augmentation(rotation=30.0, scale=(0.8, 1.2), vflip=False))
    assert np.abs(plan.angle).max() <= 30 and np.abs(plan.angle).max() > 29
    assert plan.scale.min() >= 0.8 and plan.scale.max() <= 1.2
    assert 0.45 < plan.hflip.mean() < 0.55 and not plan.vflip.any()


def test_disabled_plan_keeps_the_order_and_does_nothing():
    on = epoch_plan(1, 2, 50, augmentation())
    off = epoch_plan(1, 2, 50, augmentation(enabled=False))
    np.testing.assert_array_equal(on.order, off.order)
    assert (off.angle == 0).all() and (off.scale == 1).all()
    assert not off.hflip.any() and not off.vflip.any()
    np.testing.assert_array_equal(epoch_plan(1, 2, 5, augmentation(), shuffle=False).order,
                                  np.arange(5))


def test_identity_and_flips_are_exact(images):
    out = _apply(images)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, images.astype(np.float32))
    np.testing.assert_array_equal(_apply(images, hflip=True), images[:, :, ::-1])
    np.testing.assert_array_equal(_apply(images, vflip=True), images[:, ::-1, :])


def test_right_angles_are_exact_and_counter_clockwise(images):
    np.testing.assert_array_equal(_apply(images, angle=90.0), np.rot90(images, k=1, axes=(1, 2)))
    np.testing.assert_array_equal(_apply(images, angle=-90.0),
                                  np.rot90(images, k=-1, axes=(1, 2)))
    np.testing.assert_array_equal(_apply(images, angle=180.0), images[:, ::-1, ::-1])
    # A mark at the top centre goes to the left centre (counter-clockwise as displayed).
    mark = np.zeros((1, 5, 5), np.uint8)
    mark[0, 0, 2] = 255
    assert _apply(mark, angle=90.0)[0, 2, 0] == 255


def test_flip_comes_before_rotation(images):
    out = _apply(images, angle=90.0, hflip=True)
    np.testing.assert_array_equal(out, np.rot90(images[:, :, ::-1], k=1, axes=(1, 2)))


def test_scale_zooms_about_the_centre():
    const = np.full((1, 8, 8), 100, np.uint8)
    np.testing.assert_allclose(_apply(const, scale=2.0), 100.0, rtol=0, atol=1e-4)
    zoomed_out = _apply(const, scale=0.5)[0]
    assert zoomed_out[0, 0] == 0 and abs(zoomed_out[3, 4] - 100) < 1e-4
    ramp = np.tile(np.arange(9, dtype=np.uint8) * 10, (9, 1))[None]
    out = _apply(ramp, scale=2.0)[0]
    # x' = 4 + (x - 4) / 2: column 0 samples 2.0 -> 20, column 1 samples 2.5 -> 25.
    np.testing.assert_allclose(out[4, :3], [20, 25, 30], atol=1e-4)


def test_bilinear_with_zero_fill_at_the_border():
    img = np.full((1, 3, 3), 200, np.uint8)
    # 45 degrees: corners sample outside the image, the centre stays.
    out = _apply(img, angle=45.0)[0]
    assert out[1, 1] == 200
    assert 0 < out[0, 0] < 200
    assert (out >= 0).all() and (out <= 200).all()
