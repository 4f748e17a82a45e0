"""Per-epoch sample order and augmentation parameters, decided by the harness for every backend.

    plan = epoch_plan(seed, epoch, len(train), spec.augmentation)
    batch = images[plan.order[i:i + 32]]; angles = plan.angle[i:i + 32]  # etc.

All draws come from np.random.default_rng([seed, epoch]) in a fixed sequence (order, angle,
scale, hflip, vflip; every array is drawn even when its augmentation is off), so both backends
see identical streams. Arrays are indexed by position in `order`.

Semantics the backends implement (`apply_augmentation_numpy` is the reference):
- Pixel centres sit at integer indices (x = column, y = row); the centre of an H x W image is
  c = ((W - 1) / 2, (H - 1) / 2).
- The output is the input flipped (hflip: x -> W-1-x; vflip: y -> H-1-y), then rotated
  counter-clockwise as displayed (row 0 at the top) by `angle` degrees about c, then scaled by
  `scale` about c (scale > 1 zooms in).
- Each output pixel centre q is mapped back to the input with the inverse transform:
  d = (q - c) / scale;  x' = c_x + cos(a) d_x - sin(a) d_y;  y' = c_y + sin(a) d_x + cos(a) d_y;
  then un-flipped. The value is bilinear interpolation of the input at (x', y'), where pixels
  outside the image count as 0 (constant fill 0; like torch grid_sample with zeros padding and
  align_corners=True).
- angle ~ U[-rotation, rotation], scale ~ U[scale_lo, scale_hi], flips with p = 0.5 each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    order: np.ndarray  # int64 permutation of range(n)
    angle: np.ndarray  # float32 degrees, counter-clockwise
    scale: np.ndarray  # float32, > 1 zooms in
    hflip: np.ndarray  # bool
    vflip: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.order)


def epoch_plan(
    seed: int, epoch: int, n: int, augmentation: Any, shuffle: bool = True
) -> EpochPlan:
    """Order and per-sample augmentation of one epoch; a pure function of (seed, epoch, n, spec)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    enabled = bool(getattr(augmentation, "enabled", False))
    rotation = float(augmentation.rotation) if enabled else 0.0
    lo, hi = (float(v) for v in augmentation.scale) if enabled else (1.0, 1.0)
    angle = rng.uniform(-rotation, rotation, n)
    scale = rng.uniform(lo, hi, n)
    hflip = rng.random(n) < 0.5
    vflip = rng.random(n) < 0.5
    if not enabled:
        angle, scale = np.zeros(n), np.ones(n)
    return EpochPlan(
        order=order.astype(np.int64),
        angle=angle.astype(np.float32),
        scale=scale.astype(np.float32),
        hflip=hflip & (enabled and bool(augmentation.hflip)),
        vflip=vflip & (enabled and bool(augmentation.vflip)),
    )


def apply_augmentation_numpy(
    images: np.ndarray, angle: np.ndarray, scale: np.ndarray, hflip: np.ndarray,
    vflip: np.ndarray,
) -> np.ndarray:
    """Reference (oracle) implementation of the semantics above: (N, H, W) -> float32 (N, H, W)."""
    imgs = np.asarray(images, dtype=np.float64)
    n, h, w = imgs.shape
    a = np.deg2rad(np.asarray(angle, dtype=np.float64)).reshape(n, 1, 1)
    s = np.asarray(scale, dtype=np.float64).reshape(n, 1, 1)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = (xx - cx)[None] / s, (yy - cy)[None] / s
    cos, sin = np.cos(a), np.sin(a)
    x = cx + cos * dx - sin * dy
    y = cy + sin * dx + cos * dy
    x = np.where(np.asarray(hflip, bool).reshape(n, 1, 1), (w - 1) - x, x)
    y = np.where(np.asarray(vflip, bool).reshape(n, 1, 1), (h - 1) - y, y)
    # Snap float round-off (cos(90 deg) = 6e-17) so exact grid maps stay exact.
    for coord in (x, y):
        near = np.rint(coord)
        snap = np.abs(coord - near) < 1e-9
        coord[snap] = near[snap]

    padded = np.zeros((n, h + 2, w + 2), dtype=np.float64)
    padded[:, 1:-1, 1:-1] = imgs
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx, fy = x - x0, y - y0
    # +1 for the zero border; coordinates beyond it read the border (value 0).
    x0i, y0i = x0.astype(np.int64), y0.astype(np.int64)
    xi, xj = np.clip(x0i + 1, 0, w + 1), np.clip(x0i + 2, 0, w + 1)
    yi, yj = np.clip(y0i + 1, 0, h + 1), np.clip(y0i + 2, 0, h + 1)
    b = np.arange(n).reshape(n, 1, 1)
    out = (
        padded[b, yi, xi] * (1 - fx) * (1 - fy)
        + padded[b, yi, xj] * fx * (1 - fy)
        + padded[b, yj, xi] * (1 - fx) * fy
        + padded[b, yj, xj] * fx * fy
    )
    return out.astype(np.float32)
