"""Write tests/data/cross_framework_reference.npz: Keras' (TensorFlow's) outputs for models whose
every weight is drawn from a seeded numpy generator in the neutral layout (backends/base.py).

    KERAS_BACKEND=tensorflow PYTHONPATH=. python tests/tools/make_cross_framework_reference.py

Each env's conformance suite sets the same weights into its backend (torch, keras-torch, ...)
and compares its outputs with these: a cross-framework check with one framework per process.

Models (`MODELS`): the paper CNN at 32 px with a small dense layer; DenseNet169 with a frozen
random base at 32 px (+ global average pooling + Dense(1, sigmoid)); the one-channel models of
`ODD_LAYERS` at 31 px (every layer type and option, asymmetric 'same' padding). Layouts come from
harness.shapes (`layout_from_rows`) and, for the base, tests/data/neutral_layouts.json: none is
read back from a backend. Keys per model: `<key>/images` uint8 (N, H, W), `<key>/probs` and
`<key>/logits` float64 (N,).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "cross_framework_reference.npz"
LAYOUTS = ROOT / "tests" / "data" / "neutral_layouts.json"
PAPER = ROOT / "specs" / "paper.yaml"
SIZE = 32
N_IMAGES = 12

# Sequential models using every layer type and option, with odd kernels, strides and 'same'
# padding that is asymmetric at 31 px (the conformance suite also checks counts and shapes)
ODD_LAYERS = {
    "odd": [
        {"type": "conv2d", "filters": 6, "kernel": [3, 5], "strides": 2, "padding": "valid",
         "use_bias": False, "kernel_initializer": "he_normal"},
        {"type": "batchnorm", "center": False, "scale": False, "epsilon": 0.01, "momentum": 0.9},
        {"type": "conv2d", "filters": 5, "kernel": 3, "strides": [2, 1], "padding": "same",
         "activation": "tanh", "kernel_initializer": "lecun_uniform", "bias_initializer": "ones"},
        {"type": "batchnorm", "center": True, "scale": False},
        {"type": "avgpool2d", "pool": 3, "strides": 2, "padding": "same"},
        {"type": "maxpool2d", "pool": [2, 3], "padding": "valid"},
        {"type": "activation", "activation": "elu"},
        {"type": "dropout", "rate": 0.5},
        {"type": "flatten"},
        {"type": "dense", "units": 7, "use_bias": False, "activation": "gelu"},
        {"type": "dense", "units": 1, "activation": "sigmoid"},
    ],
    "gap": [
        {"type": "conv2d", "filters": 4, "kernel": 1},
        {"type": "global_avg_pool"},
        {"type": "dense", "units": 1, "activation": "sigmoid", "kernel_initializer": "zeros"},
    ],
    "valid_strided": [
        {"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2, "padding": "valid"},
        {"type": "maxpool2d", "pool": 3, "strides": 2, "padding": "valid"},
        {"type": "conv2d", "filters": 6, "kernel": [2, 3], "strides": [2, 1], "use_bias": False},
        {"type": "flatten"},
        {"type": "dense", "units": 1, "activation": "sigmoid"},
    ],
    "same_asymmetric": [
        {"type": "conv2d", "filters": 4, "kernel": 4, "strides": 2, "padding": "same",
         "activation": "gelu"},
        {"type": "maxpool2d", "pool": 2, "strides": 2, "padding": "same"},
        {"type": "conv2d", "filters": 5, "kernel": 2, "padding": "same", "activation": "swish"},
        {"type": "avgpool2d", "pool": 3, "strides": 2, "padding": "same"},
        {"type": "global_avg_pool"},
        {"type": "dense", "units": 1, "activation": "sigmoid"},
    ],
    "avgpool_bn_variants": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "padding": "same", "use_bias": False},
        {"type": "batchnorm", "center": False},
        {"type": "activation", "activation": "elu"},
        {"type": "avgpool2d", "pool": 2, "padding": "valid"},
        {"type": "batchnorm", "scale": False, "center": False, "epsilon": 0.01},
        {"type": "dropout", "rate": 0.5},
        {"type": "flatten"},
        {"type": "dense", "units": 3, "activation": "selu", "kernel_initializer": "lecun_normal"},
        {"type": "batchnorm", "scale": False, "momentum": 0.9},
        {"type": "dense", "units": 1, "activation": "sigmoid", "use_bias": False},
    ],
}
ODD_SIZE = 31

# key -> (model in paper.yaml, --set overrides, weight seed, image seed); `odd/<name>`: ODD_LAYERS
MODELS: dict[str, tuple[str, tuple[str, ...], int, int]] = {
    "cnn": ("cnn", (f"data.image_size={SIZE}", "models.cnn.layers[17].units=16"), 11, 12),
    "densenet169": (
        "densenet",
        (f"data.image_size={SIZE}", "models.densenet.base.weights=none",
         "models.densenet.base.frozen=true", "models.densenet.printed_params=null"),
        21,
        22,
    ),
    **{f"odd/{name}": (name, (), 30 + i, 40 + i) for i, name in enumerate(sorted(ODD_LAYERS))},
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
    """Uniform noise, each image at its own brightness (so that pooled features differ)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, size, size))
    return np.floor(noise * rng.uniform(0.1, 1.0, (n, 1, 1))).astype(np.uint8)


def odd_spec(folder: Path, name: str, size: int = ODD_SIZE) -> Any:
    """A spec (written to `folder`) holding ODD_LAYERS[name] as a one-channel model."""
    from harness.spec import load_spec

    path = folder / f"{name}.yaml"
    path.write_text(
        f"extends: {PAPER}\ndata: {{image_size: {size}, channels: 1}}\nmodels:\n"
        f"  - name: {name}\n    kind: sequential\n    layers: {json.dumps(ODD_LAYERS[name])}\n"
        "    train: {optimizer: {name: sgd, learning_rate: 0.1, momentum: 0.9, nesterov: true}, "
        "epochs: 1, batch_size: 4}\n"
    )
    return load_spec(path)


def case(key: str) -> tuple[Any, Any, dict[str, np.ndarray], np.ndarray]:
    """(spec, model, drawn weights, images) of one reference model."""
    from harness.spec import load_spec

    name, sets, weight_seed, image_seed = MODELS[key]
    if key.startswith("odd/"):
        with tempfile.TemporaryDirectory() as folder:
            spec = odd_spec(Path(folder), name)
    else:
        spec = load_spec(PAPER, list(sets))
    model = spec.model(name)
    weights = draw_weights(layout_from_rows(spec, model), weight_seed)
    return spec, model, weights, images(image_seed, size=spec.data.image_size)


def outputs(backend: Any, key: str) -> dict[str, np.ndarray]:
    """Build `key`'s model in `backend`, set the drawn weights, predict the fixed images."""
    from backends.base import ModelInput

    spec, model, weights, imgs = case(key)
    norm = model.normalization or spec.data.normalization
    backend.seed(0, True)
    handle = backend.build(model, ModelInput(spec.data.image_size, spec.data.channels, norm))
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
