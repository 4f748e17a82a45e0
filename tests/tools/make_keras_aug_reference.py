"""Writes tests/data/keras_aug_reference.npz: the Keras backend's on-device augmentation of a
fixed batch, which the PyTorch backend's tests compare against (mean abs diff < 1/255 of 255).

    .tox/tf/bin/python tests/tools/make_keras_aug_reference.py

Keys: images uint8 (N, 32, 32); angle, scale float32 (N,); hflip, vflip bool (N,);
augmented float32 (N, 32, 32) on the 0..255 scale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "keras_aug_reference.npz"

# (angle degrees counter-clockwise, scale, hflip, vflip): identity, exact grid maps, then the
# non-trivial ones: 30 degrees, zoom out 0.8 (zero border enters), zoom in 1.25, combinations
CASES = [
    (0.0, 1.0, False, False),
    (0.0, 1.0, True, False),
    (0.0, 1.0, False, True),
    (90.0, 1.0, False, False),
    (30.0, 1.0, False, False),
    (0.0, 0.8, False, False),
    (0.0, 1.25, False, False),
    (-30.0, 1.25, True, False),
    (45.0, 0.8, False, True),
    (-12.5, 1.1, True, True),
]


def reference_images(n: int = 4, size: int = 32) -> np.ndarray:
    """Smooth, asymmetric images from a fixed formula (no RNG, no files)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    imgs = [
        110 + 80 * np.sin(xx / (3.0 + k) + 0.7 * k) * np.cos(yy / (5.0 + k)) + 60 * xx / size
        for k in range(n)
    ]
    return np.clip(np.rint(np.stack(imgs)), 0, 255).astype(np.uint8)


def reference_arrays(backend: Any) -> dict[str, np.ndarray]:
    """Every (image, case) pair, augmented by `backend.augment`."""
    base = reference_images()
    images = np.concatenate([base] * len(CASES))
    per = len(base)
    angle = np.repeat(np.array([c[0] for c in CASES], np.float32), per)
    scale = np.repeat(np.array([c[1] for c in CASES], np.float32), per)
    hflip = np.repeat(np.array([c[2] for c in CASES], bool), per)
    vflip = np.repeat(np.array([c[3] for c in CASES], bool), per)
    augmented = backend.augment(images, angle, scale, hflip, vflip).astype(np.float32)
    return {"images": images, "angle": angle, "scale": scale, "hflip": hflip, "vflip": vflip,
            "augmented": augmented}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from backends.keras_backend import KerasBackend

    arrays = reference_arrays(KerasBackend(device="cpu"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)  # type: ignore[arg-type]
    print(f"wrote {OUT.relative_to(ROOT)}: {len(arrays['images'])} images")


if __name__ == "__main__":
    main()
