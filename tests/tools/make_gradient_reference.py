"""Write tests/data/gradient_reference.npz: Keras' (TensorFlow's) float64 step-1 gradients for
the models of make_cross_framework_reference.py, weights drawn there from a seeded numpy
generator in the neutral layout.

    KERAS_BACKEND=tensorflow PYTHONPATH=. python tests/tools/make_gradient_reference.py

The parity tests (tests/test_parity.py) set the same weights into each env's backend and
compare its float64 gradients (`Backend.gradients`: the exact arithmetic, within
harness.parity.GRAD64_TOL) and its float32 training-step gradients (within GRAD_TOL) with these:
the weight-port parity check's training half, one framework per process.
Keys per model: `<key>/images` uint8 (N, H, W), `<key>/labels` float32 (N,), `<key>/grad64/<var>`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from tools.make_cross_framework_reference import case  # noqa: E402

OUT = ROOT / "tests" / "data" / "gradient_reference.npz"
MODELS = ("cnn", "densenet169")
N = 4  # images per batch, as harness.parity.CHECK_IMAGES


def batch(key: str) -> tuple[Any, Any, Any, Any]:
    """(spec, model with dropout off, weights, Batch) of one reference model."""
    from backends.base import Batch
    from harness.parity import without_dropout

    spec, model, weights, images = case(key)
    images = images[:N]
    labels = np.array([1, 0, 1, 1], np.float32)[:N]
    b = Batch(images, labels, np.zeros(N, np.float32), np.ones(N, np.float32),
              np.zeros(N, bool), np.zeros(N, bool), augment=False)
    return spec, without_dropout(model), weights, b


def build(backend: Any, key: str) -> tuple[Any, Any]:
    """(handle with the drawn weights, Batch) in `backend`."""
    from backends.base import ModelInput

    spec, model, weights, b = batch(key)
    backend.seed(0, True)
    norm = model.normalization or spec.data.normalization
    handle = backend.build(model, ModelInput(spec.data.image_size, spec.data.channels, norm))
    backend.set_weights(handle, weights)
    return handle, b


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from backends.registry import create

    backend = create("keras", device="cpu", deterministic=True)
    arrays: dict[str, np.ndarray] = {}
    for key in MODELS:
        handle, b = build(backend, key)
        arrays[f"{key}/images"], arrays[f"{key}/labels"] = b.images, b.labels
        for name, g in backend.gradients(handle, b, "float64").items():
            arrays[f"{key}/grad64/{name}"] = g
            print(key, name, f"norm {np.linalg.norm(g):.6g}")
    np.savez_compressed(OUT, **arrays)  # type: ignore[arg-type]
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
