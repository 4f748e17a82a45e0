"""Write tests/data/cross_framework_reference.npz: Keras' (TensorFlow's) outputs for models whose
every weight is drawn from a seeded numpy generator in the neutral layout (backends/base.py).

    KERAS_BACKEND=tensorflow PYTHONPATH=. python tests/tools/make_cross_framework_reference.py

Each env's conformance suite sets the same weights into its backend (torch, keras-torch, ...)
and compares its outputs with these: a cross-framework check with one framework per process.

Models (`MODELS`): the paper CNN at 32 px with a small dense layer, and DenseNet169 with a frozen
random base at 32 px (+ global average pooling + Dense(1, sigmoid)). The CNN's layout comes from
harness.shapes (`layout_from_rows`), DenseNet169's base from tests/data/neutral_layouts.json:
neither is read back from a backend. Keys per model: `<model>/images` uint8 (N, 32, 32),
`<model>/probs` and `<model>/logits` float64 (N,).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "cross_framework_reference.npz"
LAYOUTS = ROOT / "tests" / "data" / "neutral_layouts.json"
PAPER = ROOT / "specs" / "paper.yaml"
SIZE = 32
N_IMAGES = 12

# spec name -> (model in paper.yaml, --set overrides, weight seed, image seed)
MODELS: dict[str, tuple[str, tuple[str, ...], int, int]] = {
    "cnn": ("cnn", (f"data.image_size={SIZE}", "models.cnn.layers[17].units=16"), 11, 12),
    "densenet169": (
        "densenet",
        (f"data.image_size={SIZE}", "models.densenet.base.weights=none",
         "models.densenet.base.frozen=true", "models.densenet.printed_params=null"),
        21,
        22,
    ),
}

# Keras' variables of each spec layer type, in Keras' order (backends/base.py)
_VARIABLES = {"conv2d": ("kernel", "bias"), "dense": ("kernel", "bias"),
              "batchnorm": ("gamma", "beta", "moving_mean", "moving_variance")}


def layout_from_rows(spec: Any, model: Any) -> dict[str, tuple[int, ...]]:
    """The neutral layout {name: shape} of a model, in build order, from harness.shapes alone:
    conv2d -> kernel (kh, kw, c_in, filters) [+ bias (filters,)]; batchnorm -> [gamma] [beta]
    moving_mean moving_variance (C,); dense -> kernel (in, units) [+ bias (units,)]; a base ->
    tests/data/neutral_layouts.json."""
    from harness.shapes import infer_model

    inference = infer_model(spec, model)
    layers = model.layers if model.kind == "sequential" else (model.base, *model.head)
    out: dict[str, tuple[int, ...]] = {}
    shape = inference.input_shape
    for row, layer in zip(inference.rows, layers, strict=True):
        if model.kind == "pretrained" and layer is model.base:
            base = json.loads(LAYOUTS.read_text())[model.base.name]
            out.update({k: tuple(v) for k, v in base.items()})
        elif layer.type == "conv2d":
            out[f"{row.name}/kernel"] = (*layer.kernel, shape[-1], layer.filters)
            if layer.use_bias:
                out[f"{row.name}/bias"] = (layer.filters,)
        elif layer.type == "dense":
            out[f"{row.name}/kernel"] = (shape[-1], layer.units)
            if layer.use_bias:
                out[f"{row.name}/bias"] = (layer.units,)
        elif layer.type == "batchnorm":
            for var in _VARIABLES["batchnorm"]:
                if (var != "gamma" or layer.scale) and (var != "beta" or layer.center):
                    out[f"{row.name}/{var}"] = (shape[-1],)
        shape = row.shape
    return out


def draw_weights(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Every variable from one seeded generator, in the layout's order, float32: kernels He
    uniform (keeps ReLU activations of order 1), small biases/betas/means, gamma near 1,
    moving variances in [0.5, 1.5] (positive)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in layout.items():
        var = name.rsplit("/", 1)[1]
        if var == "kernel":
            limit = math.sqrt(6.0 / math.prod(shape[:-1]))
            value = rng.uniform(-limit, limit, shape)
        elif var == "gamma":
            value = rng.uniform(0.8, 1.2, shape)
        elif var == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, beta, moving_mean
            value = rng.uniform(-0.1, 0.1, shape)
        out[name] = value.astype(np.float32)
    return out


def images(seed: int, n: int = N_IMAGES, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size)).astype(np.uint8)


def case(key: str) -> tuple[Any, Any, dict[str, np.ndarray], np.ndarray]:
    """(spec, model, drawn weights, images) of one reference model."""
    from harness.spec import load_spec

    name, sets, weight_seed, image_seed = MODELS[key]
    spec = load_spec(PAPER, list(sets))
    model = spec.model(name)
    return spec, model, draw_weights(layout_from_rows(spec, model), weight_seed), images(image_seed)


def outputs(backend: Any, key: str) -> dict[str, np.ndarray]:
    """Build `key`'s model in `backend`, set the drawn weights, predict the fixed images."""
    from backends.base import ModelInput

    spec, model, weights, imgs = case(key)
    norm = model.normalization or spec.data.normalization
    backend.seed(0, True)
    handle = backend.build(model, ModelInput(SIZE, spec.data.channels, norm))
    backend.set_weights(handle, weights)
    return {"images": imgs, "probs": backend.predict(handle, imgs),
            "logits": backend.predict(handle, imgs, logits=True)}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from backends.registry import create

    backend = create("keras", device="cpu", deterministic=True)
    arrays = {}
    for key in MODELS:
        for k, v in outputs(backend, key).items():
            arrays[f"{key}/{k}"] = v
        print(key, "logits", np.round(arrays[f"{key}/logits"], 4).tolist())
    np.savez_compressed(OUT, **arrays)  # type: ignore[arg-type]
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
