"""One conformance suite for every backend (scikit-learn's estimator checks, for us).

    tox -e tf            keras         (Keras 3 on TensorFlow)
    tox -e torch         torch         (PyTorch + torchvision)
    tox -e keras-torch   keras-torch   (the Keras code on Keras 3's PyTorch backend)
    tox -e keras-jax     keras-jax     (the Keras code on Keras 3's JAX backend)

Every test runs for each framework backend installed in the env (conftest `available_backends`),
and for `reference` where it applies, through the interface of backends/base.py (build,
count_params, train_step, predict, learning rate, neutral weights, environment) and `augment`,
the on-device augmentation both framework backends expose for tests. What differs between
backends only by name (a weights file, a framework's version key, a message's wording) or by a
documented framework choice (the learning rate's precision, BatchNorm's variance estimate) is
one row of `EXPECT`; the one thing the interface has no method for, the per-layer output shapes,
is read by `LAYER_ROWS`. Framework-specific checks stay in test_keras_backend.py and
test_torch_backend.py; the loop itself is tested with a scripted backend in test_loop.py.

Cross-framework without two frameworks in one process: tests/data/cross_framework_reference.npz
holds Keras' (TensorFlow's) outputs for weights drawn from a seeded generator in the neutral layout
(tests/tools/make_cross_framework_reference.py: the paper CNN, DenseNet169 with a random base, and
every layer type in ODD_LAYERS); every env sets the same weights into its backend and must match
within 1e-5, and a deliberately wrong port must miss by far more.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pytest
from backend_fixtures import (
    LOGIT_LABELS,
    LOGITS,
    NO_AUG,
    PAPER,
    UNIT_IMAGES,
    UNIT_WEIGHTS,
    clipped_bce,
    linear_unit,
    paper,
    random_images,
    sequential,
    smooth_images,
    spec_with,
    stable_bce,
    tiny_cnn_spec,
)
from conftest import ROOT, available_backends
from tools import make_cross_framework_reference as cross
from tools.make_keras_aug_reference import reference_arrays

from backends.base import (
    Batch,
    EvalData,
    ModelInput,
    TrainData,
    bce,
    bce_logits,
    sigmoid,
)
from backends.loop import fit, validate
from harness.data.augment import apply_augmentation_numpy
from harness.errors import UserError
from harness.shapes import BASE_TABLE, _base_spatial, infer_model
from harness.spec import (
    ACTIVATIONS,
    BASES,
    INITIALIZERS,
    LAYER_TYPES,
    OPTIMIZERS,
    RandomModel,
    SequentialModel,
)

BACKENDS = available_backends()  # the framework backends of this env
LAYOUTS = json.loads((ROOT / "tests" / "data" / "neutral_layouts.json").read_text())
CROSS_TOLERANCE = 1e-5  # absolute, float32 on CPU


def make_backend(name: str, seed: int = 0):
    from backends.registry import create

    b = create(name, device="cpu", deterministic=True)
    b.seed(seed, True)
    return b


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param


@pytest.fixture
def backend(backend_name):
    return make_backend(backend_name)


# ---------------------------------------------------------------------------------------------
# What differs between backends only by name or by a documented framework choice


def _tf_has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _torch_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _jax_has_gpu() -> bool:
    import jax

    return any(d.platform == "gpu" for d in jax.devices())


def _keras_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("backends.keras_backend._online", lambda *a, **k: False)


@dataclass(frozen=True)
class Expect:
    framework: str  # the module whose __version__ environment()["versions"] reports
    determinism: str  # the flag of environment()["determinism"] that seed(..., True) turns on
    unknown_layer: str  # the UserError for a layer type outside the table ({known}: the table)
    imagenet_file: str  # densenet169's ImageNet weights, as cached by the framework
    imagenet_home: str  # the environment variable of the cache
    imagenet_folder: str  # the cache folder below it
    missing_file: str  # the UserError for a weights path that is not a file
    no_gpu: str  # how the UserError for device gpu without a GPU starts
    has_gpu: Callable[[], bool]
    lr_dtype: type  # the optimizer holds the learning rate in this precision
    # BatchNorm's moving variance moves towards the biased (Keras) or unbiased (torch) batch
    # variance: a factor n / (n - 1), documented in backends/torch_backend.py
    batch_variance: str
    offline: Callable[[pytest.MonkeyPatch], None] = lambda monkeypatch: None


KERAS = Expect(
    framework="tensorflow",
    determinism="op_determinism",
    unknown_layer="the keras backend has no layer 'lstm'; known: {known}",
    imagenet_file="densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
    imagenet_home="KERAS_HOME",
    imagenet_folder="models",
    missing_file="base weights file not found: {path}",
    no_gpu="runtime.device is gpu but TensorFlow sees no GPU",
    has_gpu=_tf_has_gpu,
    lr_dtype=np.float32,
    batch_variance="biased",
    offline=_keras_offline,
)
EXPECT: dict[str, Expect] = {
    "keras": KERAS,
    "keras-torch": replace(
        KERAS,
        framework="torch",
        determinism="use_deterministic_algorithms",
        no_gpu="runtime.device is gpu but Keras' torch backend sees no GPU",
        has_gpu=_torch_has_gpu,
    ),
    "keras-jax": replace(
        KERAS,
        framework="jax",
        determinism="xla_gpu_deterministic_ops",
        no_gpu="runtime.device is gpu but Keras' jax backend sees no GPU",
        has_gpu=_jax_has_gpu,
    ),
    "torch": Expect(
        framework="torch",
        determinism="use_deterministic_algorithms",
        unknown_layer="torch backend: unknown layer type 'lstm'; known: {known}",
        imagenet_file="densenet169-b2777c0a.pth",
        imagenet_home="TORCH_HOME",
        imagenet_folder="hub/checkpoints",
        missing_file="base densenet169: weights file '{path}' not found (looked for {path})",
        no_gpu="device: gpu requested, but torch ",
        has_gpu=_torch_has_gpu,
        lr_dtype=np.float64,
        batch_variance="unbiased",
    ),
}


def _keras_rows(handle) -> list[tuple[str, tuple[int, ...]]]:
    import keras

    return [(layer.name, tuple(layer.output.shape[1:])) for layer in handle.model.layers
            if not isinstance(layer, keras.layers.InputLayer)]


def _torch_rows(handle) -> list[tuple[str, tuple[int, ...]]]:
    return list(handle.rows)


# Per-layer output shapes (Keras' channels-last) of a built model: the interface has no method
LAYER_ROWS = {"keras": _keras_rows, "keras-torch": _keras_rows, "keras-jax": _keras_rows,
              "torch": _torch_rows}


def counts(b, handle) -> tuple[int, int, int]:
    c = b.count_params(handle)
    return c.total, c.trainable, c.non_trainable


def inferred(spec, model) -> tuple[int, int, int]:
    c = infer_model(spec, model).counts
    return c.total, c.trainable, c.non_trainable


def layout(weights: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """Names in order, with shapes."""
    return [(k, tuple(v.shape)) for k, v in weights.items()]


def size_of(weights: dict[str, np.ndarray]) -> int:
    return int(sum(v.size for v in weights.values()))


def per_layer(weights: dict[str, np.ndarray]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in weights.items():
        out[k.rsplit("/", 1)[0]] = out.get(k.rsplit("/", 1)[0], 0) + v.size
    return out


def model_input(spec, model) -> ModelInput:
    return ModelInput(spec.data.image_size, spec.data.channels,
                      model.normalization or spec.data.normalization)


def no_aug_batch(images: np.ndarray, labels: np.ndarray, augment: bool = False, **flip) -> Batch:
    n = len(images)
    return Batch(images, np.asarray(labels, np.float32), np.zeros(n, np.float32),
                 np.ones(n, np.float32), np.full(n, flip.get("hflip", False)),
                 np.full(n, flip.get("vflip", False)), augment)


def test_tables_cover_the_vocabulary(backend):
    """Each backend module's TABLES: one dict per vocabulary category, with every entry."""
    tables = sys.modules[type(backend).__module__].TABLES
    vocabulary = {"layers": LAYER_TYPES, "bases": BASES, "optimizers": OPTIMIZERS,
                  "activations": ACTIVATIONS, "initializers": INITIALIZERS}
    assert sorted(tables) == sorted(vocabulary)
    for category, names in vocabulary.items():
        assert sorted(tables[category]) == sorted(names), category


# ---------------------------------------------------------------------------------------------
# The reference backend (numpy; the paper's random baseline)


def test_reference_predicts_uniform_values_reproducible_by_seed():
    b = make_backend("reference", seed=3)
    model = paper().model("baseline")
    handle = b.build(model, ModelInput(224, 3, "rescale"))
    assert counts(b, handle) == (0, 0, 0) == inferred(paper(), model)
    images = np.zeros((1000, 2, 2), np.uint8)
    p = b.predict(handle, images)
    assert p.shape == (1000,) and p.dtype == np.float64
    np.testing.assert_array_equal(p, np.random.default_rng(3).uniform(0.0, 1.0, 1000))
    assert 0.0 <= p.min() and p.max() < 1.0
    b.seed(3, True)
    np.testing.assert_array_equal(b.predict(handle, images), p)
    b.seed(4, True)
    assert not np.array_equal(b.predict(handle, images), p)
    narrow = RandomModel(name="narrow", kind="random", low=0.25, high=0.5)
    q = b.predict(b.build(narrow, ModelInput(8, 1, "none")), images)
    assert 0.25 <= q.min() and q.max() < 0.5
    with pytest.raises(ValueError, match="^a random model has no logits$"):
        b.predict(handle, images, logits=True)


def test_reference_has_no_weights_optimizer_or_training():
    b = make_backend("reference")
    handle = b.build(paper().model("baseline"), ModelInput(224, 3, "rescale"))
    assert b.get_weights(handle) == {}
    b.set_weights(handle, {})
    with pytest.raises(ValueError) as e:
        b.set_weights(handle, {"dense_1/kernel": np.zeros((1, 1), np.float32)})
    assert str(e.value) == ("backend 'reference': weights do not fit the model: "
                            "unexpected 1 (e.g. dense_1/kernel)")
    with pytest.raises(NotImplementedError, match="^backend 'reference' has no optimizer$"):
        b.get_learning_rate(handle)
    with pytest.raises(NotImplementedError, match="^backend 'reference' does not train models$"):
        b.train_step(handle, no_aug_batch(UNIT_IMAGES, LOGIT_LABELS))


@pytest.mark.parametrize("kind", ["cnn", "densenet"])
def test_reference_refuses_other_kinds(kind):
    model = paper().model(kind)
    with pytest.raises(UserError) as e:
        make_backend("reference").build(model, ModelInput(224, 3, "rescale"))
    assert e.value.message == (f"backend 'reference' only runs kind: random models; '{kind}' is "
                               f"kind: {model.kind}")


def test_framework_backends_refuse_random_models(backend, backend_name):
    with pytest.raises(UserError) as e:
        backend.build(paper().model("baseline"), ModelInput(224, 3, "rescale"))
    assert e.value.message.startswith(
        f"backend '{backend_name}' builds kind: sequential and pretrained models; "
        "'baseline' is kind: random")


@pytest.mark.parametrize("name", ["reference", *BACKENDS])
def test_environment_reports_versions_device_and_determinism(name):
    b = make_backend(name, seed=3)
    env = b.environment()
    assert json.loads(json.dumps(env)) == env  # JSON-able, as written into the run record
    assert env["name"] == name and env["device"] == "cpu"
    assert env["versions"]["python"] == platform.python_version()
    if name == "reference":
        assert env["versions"]["numpy"] == np.__version__
        assert env["determinism"] == {"rng": "numpy.random.default_rng(seed)"}
    else:
        expect = EXPECT[name]
        module = importlib.import_module(expect.framework)
        assert env["versions"][expect.framework] == module.__version__
        assert env["determinism"][expect.determinism] is True
        assert env["determinism"]["seed"] == 3
    assert b.peak_memory() == {}


def test_gpu_request_without_gpu_is_a_user_error(backend_name):
    from backends.registry import create

    expect = EXPECT[backend_name]
    if expect.has_gpu():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as e:
        create(backend_name, device="gpu")
    assert e.value.message.startswith(expect.no_gpu)


# ---------------------------------------------------------------------------------------------
# Parameter counts, shapes and the neutral layout against harness.shapes and the paper


def test_paper_cnn_counts_shapes_and_weights_equal_inference_and_paper(backend, backend_name):
    spec = paper()
    model = spec.model("cnn")
    handle = backend.build(model, ModelInput(224, 3, "rescale"))
    inf = infer_model(spec, model)
    assert counts(backend, handle) == inferred(spec, model) == (3_309_921, 3_309_441, 480)
    assert LAYER_ROWS[backend_name](handle) == [(r.name, r.shape) for r in inf.rows]
    weights = backend.get_weights(handle)
    assert per_layer(weights) == {r.name: r.params.total for r in inf.rows if r.params.total}
    assert size_of(weights) == 3_309_921


def test_paper_densenet169_counts_equal_inference_and_paper(backend, backend_name):
    spec = paper("models.densenet.base.weights=none")
    model = spec.model("densenet")
    handle = backend.build(model, ModelInput(224, 3, "imagenet"))
    inf = infer_model(spec, model)
    assert counts(backend, handle) == inferred(spec, model) == (12_644_545, 1_665, 12_642_880)
    rows = LAYER_ROWS[backend_name](handle)
    assert rows == [(r.name, r.shape) for r in inf.rows]
    assert rows[0] == ("densenet169", (7, 7, 1664))  # after the final ReLU in both


# torch vs Keras for the bases torchvision has no exact counterpart of: Keras' count minus
# torch's (total, trainable, non-trainable), and why (the ValueError of get/set_weights)
NO_COUNTERPART = {
    # Keras' ResNet50 (v1) gives its 53 convolutions biases; torchvision's (v1.5) has none
    "resnet50": ((26_560, 26_560, 0), "its convolutions have no biases"),
    # Keras' input Normalization layer: mean (3), variance (3), count (1), non-trainable
    "efficientnet_b0": ((7, 0, 7), "Keras pads strided convs after only and normalizes the "
                                   "input inside"),
    # Keras' BatchNormalization(scale=False) has no gamma; torchvision's has (17,216 values)
    "inception_v3": ((-17_216, -17_216, 0), "Keras' BatchNormalization has no gamma "
                                            "(scale=False)"),
}


@pytest.mark.parametrize("base", BASES)
def test_base_table_shapes_and_neutral_layout(backend, backend_name, tmp_path, base):
    # odd: exercises the padding arithmetic of harness.shapes._base_spatial
    size = max(45, BASE_TABLE[base].min_size + 2)
    normalization = BASE_TABLE[base].normalization or "imagenet"
    spec = spec_with(tmp_path, f"""  - name: probe
    kind: pretrained
    normalization: {normalization}
    base: {{name: {base}, weights: none, frozen: false}}
    head: [{{type: global_avg_pool}}, {{type: dense, units: 1, activation: sigmoid}}]
    train: {{optimizer: {{name: adam}}, epochs: 1, batch_size: 2}}
""", size)
    model = spec.model("probe")
    handle = backend.build(model, ModelInput(size, 3, normalization))
    side = _base_spatial(base, size)
    assert LAYER_ROWS[backend_name](handle)[0] == (base, (side, side, BASE_TABLE[base].channels))
    if backend_name == "torch" and base in NO_COUNTERPART:
        difference, reason = NO_COUNTERPART[base]
        c, inf = counts(backend, handle), inferred(spec, model)
        assert (inf[0] - c[0], inf[1] - c[1], inf[2] - c[2]) == difference
        message = (f"base {base}: torchvision's model has no exact counterpart of Keras' "
                   f"({reason}), so it has no neutral weight layout")
        for call in (lambda: backend.get_weights(handle), lambda: backend.set_weights(handle, {})):
            with pytest.raises(ValueError) as e:
                call()
            assert str(e.value) == message
        return
    assert counts(backend, handle) == inferred(spec, model)
    weights = backend.get_weights(handle)
    assert size_of(weights) == counts(backend, handle)[0]
    head = [("dense_1/kernel", (BASE_TABLE[base].channels, 1)), ("dense_1/bias", (1,))]
    if base in LAYOUTS:  # Keras' names and shapes, in Keras' order (tests/tools/...layouts.py)
        expected = [(k, tuple(v)) for k, v in LAYOUTS[base].items()]
        assert layout(weights) == expected + head
    else:  # resnet50 and the bases added after the layouts in Keras: their own, not committed
        assert layout(weights)[-2:] == head


@pytest.mark.parametrize("size", [31, 32])
@pytest.mark.parametrize("name", sorted(cross.ODD_LAYERS))
def test_other_layers_counts_shapes_and_neutral_layout_equal_inference(
    backend, backend_name, tmp_path, name, size
):
    spec = cross.odd_spec(tmp_path, name, size)
    model = spec.model(name)
    handle = backend.build(model, ModelInput(size, 1, "rescale"))
    inf = infer_model(spec, model)
    assert counts(backend, handle) == inferred(spec, model)
    assert LAYER_ROWS[backend_name](handle) == [(r.name, r.shape) for r in inf.rows]
    weights = backend.get_weights(handle)
    assert layout(weights) == list(cross.layout_from_rows(spec, model).items())
    assert size_of(weights) == inf.counts.total


def test_neutral_layout_of_the_paper_cnn_is_keras(backend):
    """Names, order, shapes and dtype derived from harness.shapes alone (no backend)."""
    spec = paper("data.image_size=32", "models.cnn.layers[17].units=16")
    model = spec.model("cnn")
    weights = backend.get_weights(backend.build(model, ModelInput(32, 3, "rescale")))
    expected = cross.layout_from_rows(spec, model)
    assert list(expected.items())[:6] == [
        ("conv2d_1/kernel", (3, 3, 3, 16)), ("conv2d_1/bias", (16,)),
        ("batchnorm_1/gamma", (16,)), ("batchnorm_1/beta", (16,)),
        ("batchnorm_1/moving_mean", (16,)), ("batchnorm_1/moving_variance", (16,))]
    assert list(expected.items())[-4:] == [  # 32 px -> 2 x 2 x 128 after four pools, NHWC
        ("dense_1/kernel", (512, 16)), ("dense_1/bias", (16,)),
        ("dense_2/kernel", (16, 1)), ("dense_2/bias", (1,))]
    assert layout(weights) == list(expected.items())
    assert {v.dtype for v in weights.values()} == {np.dtype(np.float32)}
    # fresh BatchNorm statistics: mean 0, variance 1 (Keras' initial values)
    for k in ("batchnorm_1/moving_mean", "batchnorm_4/moving_mean"):
        np.testing.assert_array_equal(weights[k], 0.0)
    np.testing.assert_array_equal(weights["batchnorm_2/moving_variance"], 1.0)


# ---------------------------------------------------------------------------------------------
# Neutral weights: round trip, refusals, same function from the same weights


def test_set_weights_round_trip_is_exact_and_weights_define_the_function(backend_name):
    spec = paper("data.image_size=32", "models.cnn.layers[17].units=16")
    model = spec.model("cnn")
    imgs = random_images(6, 32, seed=1)
    b = make_backend(backend_name, seed=0)
    h = b.build(model, ModelInput(32, 3, "rescale"))
    w0, p0 = b.get_weights(h), b.predict(h, imgs)
    b.set_weights(h, w0)
    w1 = b.get_weights(h)
    assert list(w1) == list(w0)
    assert all(np.array_equal(w0[k], w1[k]) and w1[k].dtype == w0[k].dtype for k in w0)
    np.testing.assert_array_equal(b.predict(h, imgs), p0)
    # get_weights gives copies: writing into them changes nothing
    w1["conv2d_1/kernel"][...] = 0
    np.testing.assert_array_equal(b.get_weights(h)["conv2d_1/kernel"], w0["conv2d_1/kernel"])

    drawn = cross.draw_weights(cross.layout_from_rows(spec, model), seed=5)
    b.set_weights(h, {k: v.astype(np.float64) for k, v in drawn.items()})  # cast to float32
    got = b.get_weights(h)
    assert all(np.array_equal(got[k], drawn[k]) and got[k].dtype == np.float32 for k in drawn)
    p1 = b.predict(h, imgs)
    assert np.max(np.abs(p1 - p0)) > 1e-3
    np.testing.assert_array_equal(b.predict(h, imgs), p1)  # predicting twice: bit-identical
    # a model built from another seed, given the same weights, is the same function
    other = make_backend(backend_name, seed=9)
    h2 = other.build(model, ModelInput(32, 3, "rescale"))
    assert not np.array_equal(other.get_weights(h2)["conv2d_1/kernel"], w0["conv2d_1/kernel"])
    other.set_weights(h2, drawn)
    np.testing.assert_array_equal(other.predict(h2, imgs), p1)
    np.testing.assert_array_equal(other.predict(h2, imgs, logits=True),
                                  b.predict(h, imgs, logits=True))


def test_set_weights_refuses_missing_unexpected_and_wrong_shape(backend, backend_name):
    spec = paper("data.image_size=32", "models.cnn.layers[17].units=16")
    h = backend.build(spec.model("cnn"), ModelInput(32, 3, "rescale"))
    w = backend.get_weights(h)
    head = f"backend '{backend_name}': weights do not fit the model: "
    missing = "missing 1 (e.g. dense_2/bias)"
    unexpected = "unexpected 1 (e.g. dense_3/kernel)"
    wrong = "1 with another shape (e.g. dense_1/kernel: (16, 512), the model has (512, 16))"
    cases = [
        ({k: v for k, v in w.items() if k != "dense_2/bias"}, missing),
        ({**w, "dense_3/kernel": np.zeros((16, 1), np.float32)}, unexpected),
        ({**w, "dense_1/kernel": np.zeros((16, 512), np.float32)}, wrong),
        ({**{k: v for k, v in w.items() if k != "dense_2/bias"},
          "dense_3/kernel": np.zeros((16, 1), np.float32),
          "dense_1/kernel": np.zeros((16, 512), np.float32),
          "conv2d_1/bias": np.zeros(16, np.float32)},  # right shape: assigned only if all fit
         f"{missing}; {unexpected}; {wrong}"),
    ]
    for weights, message in cases:
        with pytest.raises(ValueError) as e:
            backend.set_weights(h, weights)
        assert str(e.value) == head + message
        after = backend.get_weights(h)
        assert all(np.array_equal(after[k], w[k]) for k in w), message  # nothing was assigned


# ---------------------------------------------------------------------------------------------
# Cross-framework: Keras' committed outputs for weights drawn in the neutral layout


@pytest.fixture(scope="module")
def cross_reference() -> dict[str, np.ndarray]:
    with np.load(cross.OUT) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=pytest.mark.slow) if k == "densenet169" else k for k in cross.MODELS])
def test_outputs_match_the_committed_keras_reference(backend, cross_reference, key):
    out = cross.outputs(backend, key)
    np.testing.assert_array_equal(out["images"], cross_reference[f"{key}/images"])
    for what in ("probs", "logits"):
        diff = np.max(np.abs(out[what] - cross_reference[f"{key}/{what}"]))
        assert diff <= CROSS_TOLERANCE, f"{key} {what}: max |diff| {diff:.3g}"
    # the reference is informative: unsaturated outputs that differ between images
    assert np.all(np.abs(cross_reference[f"{key}/logits"]) < 5)
    assert np.ptp(cross_reference[f"{key}/logits"]) > 0.25


def _dense_rows_nchw(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The classic wrong port: dense_1's rows in NCHW flatten order (2 x 2 x 128 at 32 px)."""
    perm = np.arange(2 * 2 * 128).reshape(2, 2, 128).transpose(2, 0, 1).reshape(-1)
    return {**weights, "dense_1/kernel": weights["dense_1/kernel"][perm]}


def _conv_kernels_hw_swapped(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Another: conv kernels read as WHIO (a transpose of each 3x3 window)."""
    return {k: v.transpose(1, 0, 2, 3) if v.ndim == 4 else v for k, v in weights.items()}


@pytest.mark.parametrize("wrong", [_dense_rows_nchw, _conv_kernels_hw_swapped])
def test_a_wrong_port_fails_the_cross_framework_check(backend, cross_reference, wrong):
    spec, model, weights, imgs = cross.case("cnn")
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    backend.set_weights(handle, wrong(weights))
    diff = np.max(np.abs(backend.predict(handle, imgs) - cross_reference["cnn/probs"]))
    assert diff > 100 * CROSS_TOLERANCE, f"max |diff| {diff:.3g}"


# ---------------------------------------------------------------------------------------------
# Errors the user can cause


def test_unknown_layer_type_lists_the_table(backend, backend_name):
    class LSTM:
        type = "lstm"

    model = SequentialModel.model_construct(
        name="m", kind="sequential", layers=(LSTM(),), train=paper().model("cnn").train)
    with pytest.raises(UserError) as e:
        backend.build(model, ModelInput(8, 1, "rescale"))
    known = ", ".join(sys.modules[type(backend).__module__].TABLES["layers"])
    assert known.startswith("conv2d, batchnorm")
    assert e.value.message == EXPECT[backend_name].unknown_layer.format(known=known)


def test_pretrained_needs_three_channels(backend):
    spec = paper("models.densenet.base.weights=none")
    with pytest.raises(UserError) as e:
        backend.build(spec.model("densenet"), ModelInput(32, 1, "imagenet"))
    assert "base densenet169 needs 3 input channels; got 1" in e.value.message


def test_imagenet_weights_offline_error_names_file_folder_and_alternative(
    backend, backend_name, tmp_path, monkeypatch
):
    expect = EXPECT[backend_name]
    monkeypatch.setenv(expect.imagenet_home, str(tmp_path))
    expect.offline(monkeypatch)
    with pytest.raises(UserError) as e:
        backend.build(paper().model("densenet"), ModelInput(224, 3, "imagenet"))
    msg = e.value.message
    assert expect.imagenet_file in msg
    assert f"{tmp_path / expect.imagenet_folder} (${expect.imagenet_home}/" in msg
    assert "`weights: none`" in msg and "\n" not in msg


def test_missing_local_weights_file_is_a_user_error(backend, backend_name, tmp_path):
    missing = tmp_path / "nope.h5"
    spec = paper(f"models.densenet.base.weights={missing}")
    with pytest.raises(UserError) as e:
        backend.build(spec.model("densenet"), ModelInput(32, 3, "imagenet"))
    assert e.value.message == EXPECT[backend_name].missing_file.format(path=missing)


@pytest.mark.parametrize("shape", [(4, 16, 32), (4, 32, 32, 1), (32, 32)])
def test_predict_rejects_wrong_image_shapes_with_one_message(backend, shape):
    handle = backend.build(tiny_cnn_spec().model("cnn"), ModelInput(32, 3, "rescale"))
    with pytest.raises(ValueError) as e:
        backend.predict(handle, np.zeros(shape, np.uint8))
    assert str(e.value) == f"predict wants uint8 (N, 32, 32); got {shape}"


# ---------------------------------------------------------------------------------------------
# Augmentation on the device against the numpy oracle and Keras' stored output

# max |augment - oracle| (0..255 scale), measured on 2 cores: keras 1.3e-3, keras-torch 9.7e-4
# (bilinear in float32), torch 0 (float64 grid_sample)
ORACLE_MAX = {"keras": 3e-3, "keras-torch": 3e-3, "keras-jax": 3e-3, "torch": 1e-4}


def flags(n: int, angle: float = 0.0, scale: float = 1.0, h: bool = False, v: bool = False):
    return (np.full(n, angle, np.float32), np.full(n, scale, np.float32),
            np.full(n, h), np.full(n, v))


def test_augment_identity_and_flips_are_exact(backend):
    imgs = random_images(3, 17, seed=0)[:, :, :13]  # 17 x 13: odd, not square
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3)), imgs.astype(np.float32))
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3, h=True)), imgs[:, :, ::-1])
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3, v=True)), imgs[:, ::-1, :])
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3, h=True, v=True)),
                                  imgs[:, ::-1, ::-1])


@pytest.mark.parametrize("size", [16, 17])
def test_augment_rotation_by_90_degrees_is_rot90(backend, size):
    imgs = random_images(2, size, seed=1)
    out = backend.augment(imgs, *flags(2, angle=90.0))
    np.testing.assert_allclose(out, np.rot90(imgs, 1, axes=(1, 2)).astype(np.float32),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize(("shape", "angles", "scales"), [
    ((32, 32), 30, (0.8, 1.25)), ((24, 40), 30, (0.8, 1.25)), ((41, 29), 30, (0.8, 1.25)),
    ((40, 40), 180, (0.6, 1.6)),
])
def test_augment_agrees_with_the_numpy_oracle(backend, backend_name, shape, angles, scales):
    n = 16
    imgs = smooth_images(n, *shape, seed=2)
    rng = np.random.default_rng(3)
    angle = rng.uniform(-angles, angles, n).astype(np.float32)
    scale = rng.uniform(*scales, n).astype(np.float32)
    hflip, vflip = rng.random(n) < 0.5, rng.random(n) < 0.5
    angle[0], scale[0] = 0.0, 1.0  # mixed batch: one identity-geometry sample
    ours = backend.augment(imgs, angle, scale, hflip, vflip)
    oracle = apply_augmentation_numpy(imgs, angle, scale, hflip, vflip)
    assert ours.dtype == np.float32 and ours.shape == imgs.shape
    assert np.mean(np.abs(ours - oracle)) < 1 / 255
    assert np.max(np.abs(ours - oracle)) < ORACLE_MAX[backend_name]


def test_augment_agrees_with_the_stored_keras_reference(backend, backend_name):
    """tests/data/keras_aug_reference.npz: TensorFlow's output, reproduced bit for bit there."""
    with np.load(ROOT / "tests" / "data" / "keras_aug_reference.npz") as f:
        stored = {k: f[k] for k in f.files}
    fresh = reference_arrays(backend)
    assert sorted(stored) == sorted(fresh)
    for key in ("images", "angle", "scale", "hflip", "vflip"):
        np.testing.assert_array_equal(stored[key], fresh[key], err_msg=key)
    diff = np.abs(fresh["augmented"] - stored["augmented"])
    if backend_name == "keras":
        assert diff.max() == 0.0
    assert diff.mean() < 1 / 255 and diff.max() < 2 * ORACLE_MAX[backend_name] + 0.01


def read_out(b, handle, image: np.ndarray, features: int) -> np.ndarray:
    """Every feature before the last dense(1) layer, one at a time (one-hot kernel, logits)."""
    out = np.zeros(features)
    for i in range(features):
        kernel = np.zeros((features, 1), np.float32)
        kernel[i] = 1.0
        b.set_weights(handle, {"dense_1/kernel": kernel, "dense_1/bias": np.zeros(1, np.float32)})
        out[i] = b.predict(handle, image, logits=True)[0]
    return out


def tf_same_pool(x: np.ndarray, kind: str, pool: int, stride: int) -> np.ndarray:
    """TensorFlow's 'same' pooling of a 2-D array by hand: the odd padding pixel after, and
    the padding never counted (not in the max, not in the mean's divisor)."""
    n = len(x)
    out_n = -(-n // stride)
    before = max((out_n - 1) * stride + pool - n, 0) // 2
    out = np.zeros((out_n, out_n))
    for i in range(out_n):
        for j in range(out_n):
            r0, c0 = i * stride - before, j * stride - before
            window = x[max(r0, 0) : r0 + pool, max(c0, 0) : c0 + pool]
            out[i, j] = window.mean() if kind == "avgpool2d" else window.max()
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalization", ["rescale", "imagenet", "tf", "none"])
def test_normalization_and_channel_replication_by_hand(backend, normalization, channels):
    """The model input, read through a dense layer whose kernel picks one (pixel, channel) of
    the NHWC flatten: uint8 -> float -> normalization -> grey replicated to every channel."""
    model = sequential([{"type": "flatten"}, {"type": "dense", "units": 1,
                                              "activation": "sigmoid"}])
    handle = backend.build(model, ModelInput(2, channels, normalization))
    image = np.array([[[0, 51], [255, 128]]], np.uint8)
    grey = image.reshape(-1).astype(np.float64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    seen = read_out(backend, handle, image, 4 * channels).reshape(4, channels)
    replicated = np.repeat(grey[:, None], channels, axis=1)
    expected = {"rescale": replicated / 255,
                "imagenet": (replicated / 255 - mean[:channels]) / std[:channels],
                "tf": replicated / 127.5 - 1, "none": replicated}[normalization]
    np.testing.assert_allclose(seen, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("kind", "pool", "stride"), [
    ("avgpool2d", 3, 2),  # padding 0 before, 1 after: asymmetric
    ("avgpool2d", 3, 1),  # 1 and 1: symmetric
    ("maxpool2d", 3, 2),
])
def test_same_pooling_leaves_the_padding_out_by_hand(backend, kind, pool, stride):
    model = sequential([{"type": kind, "pool": pool, "strides": stride, "padding": "same"},
                        {"type": "flatten"}, {"type": "dense", "units": 1}])
    handle = backend.build(model, ModelInput(4, 1, "none"))
    x = (np.arange(16).reshape(4, 4) * 10 + np.array([0, 7, 3, 1])).astype(np.uint8)
    expected = tf_same_pool(x.astype(np.float64), kind, pool, stride)
    seen = read_out(backend, handle, x[None], expected.size)
    np.testing.assert_allclose(seen, expected.reshape(-1), rtol=1e-6)


def test_train_step_augments_only_when_the_batch_says_so(backend):
    """A 3x3 linear model sees the flip of an asymmetric image in training-mode probabilities
    when `Batch.augment` is set, and never otherwise (whatever the parameters say)."""
    model = sequential([{"type": "flatten"}, {"type": "dense", "units": 1,
                                              "activation": "sigmoid"}], "sgd", 1e-12)
    handle = backend.build(model, ModelInput(3, 1, "none"))
    backend.set_weights(handle, {"dense_1/kernel": (np.arange(9, dtype=np.float32)[:, None] - 4)
                                 / 1000, "dense_1/bias": np.zeros(1, np.float32)})
    imgs = np.array([[[0, 50, 250], [10, 20, 30], [90, 0, 5]]] * 2, np.uint8)
    labels = np.zeros(2)
    flipped = backend.predict(handle, imgs[:, :, ::-1])
    plain = backend.predict(handle, imgs)
    assert np.max(np.abs(flipped - plain)) > 0.05  # logits -0.8 and -0.43
    on = backend.train_step(handle, no_aug_batch(imgs, labels, augment=True, hflip=True))()
    np.testing.assert_allclose(on.probs, flipped, rtol=1e-6)
    off = backend.train_step(handle, no_aug_batch(imgs, labels, augment=False, hflip=True))()
    np.testing.assert_allclose(off.probs, plain, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loss, steps, learning rate, training through backends.loop.fit


def unit_handle(b, model):
    handle = b.build(model, ModelInput(1, 1, "none"))
    b.set_weights(handle, UNIT_WEIGHTS)
    return handle


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("last", ["dense", "activation"])
def test_loss_forms_by_hand_in_training_and_validation(backend, last, smoothing):
    """Training (the backend's step, float32) and validation (the loop, float64) both follow
    the spec's loss form: from logits for a sigmoid output with form auto, else clipped."""
    labels = LOGIT_LABELS.astype(np.float32)
    for form in ("auto", "probabilities"):
        model = linear_unit(form, smoothing=smoothing, last=last)
        assert model.train.loss.on_logits(model.layers[-1]) == (form == "auto")
        handle = unit_handle(backend, model)
        probs = backend.predict(handle, UNIT_IMAGES)
        np.testing.assert_allclose(probs, sigmoid(LOGITS), rtol=1e-6)
        if form == "auto":
            train_loss = val_loss = stable_bce(LOGIT_LABELS, LOGITS, smoothing).mean()
            assert train_loss == pytest.approx(
                (40 + 3.048587351573742 + 0.47407698418010663) / 3 if smoothing == 0
                else 13.799221445251284, rel=1e-6)
        else:  # training: float32's clip bound 1 - 1.19e-7; validation: float64's 1 - 1e-7
            train_loss = clipped_bce(LOGIT_LABELS, probs, label_smoothing=smoothing).mean()
            ys = LOGIT_LABELS * (1 - smoothing) + smoothing / 2
            val_loss = bce(ys, probs)
            if smoothing == 0:
                assert train_loss == pytest.approx((15.942385 + 3.048587 + 0.474077) / 3, rel=1e-5)
                assert val_loss == pytest.approx((16.118096 + 3.048587 + 0.474077) / 3, rel=1e-5)
        train = TrainData(UNIT_IMAGES, np.arange(3), labels, NO_AUG, seed=0, shuffle=False)
        hist = fit(backend, handle, model, train, EvalData(UNIT_IMAGES, labels))
        assert hist[0].loss == pytest.approx(train_loss, rel=1e-6), form  # lr 1e-12: no change
        assert hist[0].val_loss == pytest.approx(val_loss, rel=1e-6), form
        v_loss, v_probs = validate(backend, handle, model, EvalData(UNIT_IMAGES, labels))
        assert v_loss == pytest.approx(val_loss, rel=1e-6)
        np.testing.assert_allclose(v_probs, probs, rtol=1e-6)


@pytest.mark.parametrize("form", ["auto", "probabilities"])
def test_class_weighted_loss_by_hand_in_training_and_validation(backend, form):
    """class_weight balanced (MURA's, from the training labels: A = 2 positives, N = 1, so
    w1 = 1/3, w0 = 2/3) and pos_weight 2: the step's loss mean(w l) and the loop's validation
    loss with the same weights, against the value computed by hand."""
    model = linear_unit(form)
    loss = model.train.loss.model_copy(update={"class_weight": "balanced", "pos_weight": 2.0})
    model = model.model_copy(update={"train": model.train.model_copy(update={"loss": loss})})
    handle = unit_handle(backend, model)
    labels = LOGIT_LABELS.astype(np.float32)
    w = np.array([2 / 3, 1 / 3, 1 / 3])
    if form == "auto":  # softplus(-x) per sample: (1 - y) x + (1 + (q - 1) y) softplus(-x)
        per = np.array([40.0, 2 * 3.048587351573742, 2 * 0.47407698418010663])
        train_loss = val_loss = float(np.mean(w * per))
        assert train_loss == pytest.approx(9.671703186, rel=1e-9)
    else:
        p = sigmoid(LOGITS)
        lo, hi = float(np.float32(1e-7)), float(np.float32(1 - 1e-7))
        q = np.clip(p, lo, hi)
        per32 = -(2 * LOGIT_LABELS * np.log(q) + (1 - LOGIT_LABELS) * np.log(1 - q))
        train_loss = float(np.mean(w * per32))
        q64 = np.clip(p, 1e-7, 1 - 1e-7)
        per64 = -(2 * LOGIT_LABELS * np.log(q64) + (1 - LOGIT_LABELS) * np.log(1 - q64))
        val_loss = float(np.mean(w * per64))
    train = TrainData(UNIT_IMAGES, np.arange(3), labels, NO_AUG, seed=0, shuffle=False)
    hist = fit(backend, handle, model, train, EvalData(UNIT_IMAGES, labels))
    assert hist[0].loss == pytest.approx(train_loss, rel=1e-5)  # lr 1e-12: no change
    assert hist[0].val_loss == pytest.approx(val_loss, rel=1e-6)
    unweighted = stable_bce(LOGIT_LABELS, LOGITS).mean()
    assert abs(hist[0].loss - unweighted) > 1.0  # the weights are in the step


def test_training_at_saturation_moves_weights_only_from_logits(backend):
    wrong = np.full((3, 1, 1), 255, np.uint8)  # logit 124.5, label 0
    labels = np.zeros(3, np.float32)
    moved = {}
    for form in ("auto", "probabilities"):
        model = linear_unit(form, lr=0.01)
        handle = unit_handle(backend, model)
        fit(backend, handle, model, TrainData(wrong, np.arange(3), labels, NO_AUG, seed=0), None)
        w = backend.get_weights(handle)
        moved[form] = (float(w["dense_1/kernel"][0, 0]) - 0.5, float(w["dense_1/bias"][0]) + 3)
    # from logits: d loss / d logit = sigmoid(124.5) - 0 = 1 -> kernel -= 0.01 * 255, bias -= 0.01
    assert moved["auto"] == pytest.approx((-2.55, -0.01), rel=1e-5)
    assert moved["probabilities"] == (0.0, 0.0)  # the clip stops the gradient


@pytest.mark.parametrize("last", ["dense", "activation"])
def test_sigmoid_of_logits_is_the_model_output(backend, last):
    spec = tiny_cnn_spec()
    model = spec.model("cnn")
    if last == "activation":  # dense(1) then activation(sigmoid): the logits are its input
        layers = [layer.model_dump() for layer in model.layers]
        layers[-1]["activation"] = "linear"
        layers.append({"type": "activation", "activation": "sigmoid"})
        model = SequentialModel.model_validate({**model.model_dump(), "layers": layers})
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    imgs = random_images(5, 32, seed=2)
    z, p = backend.predict(handle, imgs, logits=True), backend.predict(handle, imgs)
    assert z.dtype == p.dtype == np.float64 and z.shape == p.shape == (5,)
    np.testing.assert_allclose(sigmoid(z), p, rtol=1e-6, atol=0)
    assert np.max(np.abs(z)) > 1e-3  # not trivially zero


def test_train_step_dispatches_now_and_its_thunk_gives_that_step(backend):
    """The update happens at `train_step`; its thunk, called later (after the next step, as the
    loop does), still gives that step's loss and training-mode probabilities."""
    lr = 0.01
    model = linear_unit("auto", lr=lr)
    handle = unit_handle(backend, model)
    batch = no_aug_batch(UNIT_IMAGES, LOGIT_LABELS)
    x = UNIT_IMAGES.reshape(-1).astype(np.float64)
    first = backend.train_step(handle, batch)
    assert callable(first)
    # SGD on the mean BCE from logits: d/dz = sigmoid(z) - y
    g = (sigmoid(LOGITS) - LOGIT_LABELS) / 3
    kernel, bias = 0.5 - lr * float(np.dot(g, x)), -3.0 - lr * float(g.sum())
    w = backend.get_weights(handle)  # before the thunk is called
    assert float(w["dense_1/kernel"][0, 0]) == pytest.approx(kernel, rel=1e-6)
    assert float(w["dense_1/bias"][0]) == pytest.approx(bias, rel=1e-6)
    second = backend.train_step(handle, batch)
    r2, r1 = second(), first()
    assert r1.loss == pytest.approx(stable_bce(LOGIT_LABELS, LOGITS).mean(), rel=1e-6)
    np.testing.assert_allclose(r1.probs, sigmoid(LOGITS), rtol=1e-6)
    z2 = kernel * x + bias
    assert r2.loss == pytest.approx(stable_bce(LOGIT_LABELS, z2).mean(), rel=1e-5)
    np.testing.assert_allclose(r2.probs, sigmoid(z2), rtol=1e-5)
    again = first()
    assert again.loss == r1.loss and np.array_equal(again.probs, r1.probs)


def test_train_step_gives_a_non_finite_loss_for_nan_labels(backend):
    """What the loop's NaN check (tests/test_loop.py) sees from a real backend."""
    model = linear_unit("auto", lr=0.01)
    handle = unit_handle(backend, model)
    result = backend.train_step(handle, no_aug_batch(UNIT_IMAGES, [0.0, np.nan, 1.0]))()
    assert math.isnan(result.loss)


def _conv_same_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """numpy oracle: 'same' 3x3 convolution (NHWC, HWIO) + bias + ReLU, float64."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    return np.maximum(np.einsum("bhwcij,ijcf->bhwf", win, kernel.astype(np.float64)) + bias, 0)


def test_learning_rate_round_trip_and_a_zero_rate_step(backend, backend_name, tmp_path):
    """lr 0: every trainable variable stays bit for bit; only BatchNorm's moving statistics
    move, to momentum * old + (1 - momentum) * the batch's, by hand."""
    body = ("  - name: bn\n    kind: sequential\n    layers: [{type: conv2d, filters: 2, "
            "kernel: 3, padding: same, activation: relu}, {type: batchnorm, momentum: 0.9}, "
            "{type: flatten}, {type: dense, units: 1, activation: sigmoid}]\n    train: "
            "{optimizer: {name: adam, learning_rate: 0.001}, epochs: 1, batch_size: 4}\n")
    spec = spec_with(tmp_path, body, 8, channels=1)
    model = spec.model("bn")
    handle = backend.build(model, ModelInput(8, 1, "rescale"))
    lr_dtype = EXPECT[backend_name].lr_dtype
    assert backend.get_learning_rate(handle) == float(lr_dtype(0.001))
    for lr in (0.25, 2.0**-20, 0.0):
        backend.set_learning_rate(handle, lr)
        assert backend.get_learning_rate(handle) == lr
    w0 = cross.draw_weights(cross.layout_from_rows(spec, model), seed=4)
    w0["batchnorm_1/moving_mean"][:] = 0.0
    w0["batchnorm_1/moving_variance"][:] = 0.0  # so the batch's variance dominates the update
    backend.set_weights(handle, w0)
    imgs = random_images(4, 8, seed=6)
    backend.train_step(handle, no_aug_batch(imgs, [0, 1, 0, 1]))()
    w1 = backend.get_weights(handle)
    moved = sorted(k for k in w0 if not np.array_equal(w0[k], w1[k]))
    assert moved == ["batchnorm_1/moving_mean", "batchnorm_1/moving_variance"]
    a = _conv_same_relu(imgs[..., None] / 255.0, w0["conv2d_1/kernel"], w0["conv2d_1/bias"])
    n = a.shape[0] * a.shape[1] * a.shape[2]  # 4 x 8 x 8 values per channel
    mean, biased = a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))
    variance = {"biased": biased, "unbiased": biased * n / (n - 1)}
    np.testing.assert_allclose(w1["batchnorm_1/moving_mean"], 0.1 * mean, rtol=1e-5)
    chosen = EXPECT[backend_name].batch_variance
    np.testing.assert_allclose(w1["batchnorm_1/moving_variance"], 0.1 * variance[chosen],
                               rtol=1e-5)
    other = variance["unbiased" if chosen == "biased" else "biased"]
    assert not np.allclose(w1["batchnorm_1/moving_variance"], 0.1 * other, rtol=1e-5, atol=0)


def test_fit_history_predict_and_partial_batch(backend):
    spec = tiny_cnn_spec("models.cnn.train.epochs=2")
    model = spec.model("cnn")
    imgs, labels = random_images(30, 32, seed=4), (np.arange(30) % 2).astype(np.float32)
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    seen = []
    train = TrainData(imgs, np.arange(21), labels[:21], spec.augmentation, seed=0)
    hist = fit(backend, handle, model, train, EvalData(imgs[21:], labels[21:]), seen.append)
    assert seen == hist and [h.epoch for h in hist] == [1, 2]
    assert all(h.images == 21 for h in hist)  # 8 + 8 + 5: the partial batch is kept
    assert hist[0].first_step_seconds is not None and hist[1].first_step_seconds is None
    assert all(np.isfinite(h.loss) and 0 <= h.accuracy <= 1 for h in hist)
    p = backend.predict(handle, imgs[21:], batch_size=4)  # 4 + 4 + 1
    assert p.shape == (9,) and p.dtype == np.float64 and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p, backend.predict(handle, imgs[21:]), rtol=0, atol=1e-6)
    # form auto, model ending in a sigmoid: the loop's validation loss is from the logits
    z = backend.predict(handle, imgs[21:], logits=True)
    assert hist[-1].val_loss == pytest.approx(bce_logits(labels[21:], z), rel=1e-12)
    assert hist[-1].val_loss == pytest.approx(bce(labels[21:], p), rel=1e-5)  # unsaturated
    empty = backend.predict(handle, imgs[:0])
    assert empty.shape == (0,) and empty.dtype == np.float64


def test_learns_a_separable_set(backend):
    # 4 epochs: the training loss is 0.0 from epoch 2 on, and later epochs only grow the
    # validation loss (inference-mode BatchNorm drifts from the batch statistics); measured
    # validation accuracy 1.0 at epochs 1-4 on keras, torch and keras-jax, but 0.375 at epochs
    # 5-6 on keras-jax (its own initial draws), a threshold effect of overfitting, not learning
    spec = tiny_cnn_spec("models.cnn.train.epochs=4", "models.cnn.train.batch_size=16",
                         "models.cnn.train.optimizer.learning_rate=0.003",
                         "augmentation.enabled=false")
    model = spec.model("cnn")
    rng = np.random.default_rng(1)  # a bright blob top-left (label 0) or bottom-right (1)
    labels = (np.arange(200) % 2).astype(np.float32)
    rng.shuffle(labels)
    imgs = rng.integers(0, 60, size=(200, 32, 32)).astype(np.uint8)
    for i, y in enumerate(labels):
        r0 = 4 if y == 0 else 20
        imgs[i, r0 : r0 + 8, r0 : r0 + 8] = 220
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    train = TrainData(imgs, np.arange(160), labels[:160], spec.augmentation, seed=0)
    fit(backend, handle, model, train, EvalData(imgs[160:], labels[160:]))
    acc = float(np.mean((backend.predict(handle, imgs[160:]) >= 0.5) == labels[160:].astype(bool)))
    assert acc >= 0.9, f"accuracy {acc:.3f} on a separable set"


@pytest.mark.slow
def test_frozen_base_keeps_weights_and_bn_statistics(backend, tmp_path):
    spec = spec_with(tmp_path, """  - name: frozen
    kind: pretrained
    base: {name: densenet121, weights: none, frozen: true}
    normalization: imagenet
    head: [{type: global_avg_pool}, {type: dense, units: 1, activation: sigmoid}]
    train: {optimizer: {name: adam, learning_rate: 0.01}, epochs: 1, batch_size: 4}
""", 32)
    model = spec.model("frozen")
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    assert counts(backend, handle)[1] == 1025  # only the head trains
    before = backend.get_weights(handle)
    stats = [k for k in before if k.startswith("densenet121/") and "/moving_" in k]
    assert sum(before[k].size for k in stats) == BASE_TABLE["densenet121"].counts.non_trainable
    imgs, labels = smooth_images(12, 32, 32, seed=1), (np.arange(12) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(8), labels[:8], spec.augmentation, seed=0)
    fit(backend, handle, model, train, EvalData(imgs[8:], labels[8:]))
    after = backend.get_weights(handle)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["dense_1/bias", "dense_1/kernel"]  # base weights AND statistics kept
    p = backend.predict(handle, imgs)
    assert p.shape == (12,) and np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize(
    ("base_yaml", "trainable"),
    [
        ("frozen: true", 1025),  # the head only
        ("frozen: false", 6_953_856 + 1025),  # all but the BatchNorm statistics
        # conv5_block16 (BN(992) + 1x1 conv 992x128 + BN(128) + 3x3 conv 128x32) + bn(1024)
        ("frozen: false, trainable_from: conv5_block16", 1984 + 126_976 + 256 + 36_864 + 2048
         + 1025),
    ],
)
def test_trainable_counts_for_frozen_partial_and_unfrozen_bases(
    backend, tmp_path, base_yaml, trainable
):
    base = "{name: densenet121, weights: none, " + base_yaml + "}"
    spec = spec_with(tmp_path, f"""  - name: ft
    kind: pretrained
    base: {base}
    head: [{{type: global_avg_pool}}, {{type: dense, units: 1, activation: sigmoid}}]
    train: {{optimizer: {{name: adam}}, epochs: 1, batch_size: 4}}
""", 32)
    model = spec.model("ft")
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    total = BASE_TABLE["densenet121"].counts.total + 1025
    assert counts(backend, handle) == (total, trainable, total - trainable)
    assert counts(backend, handle) == inferred(spec, model)


@pytest.mark.slow
def test_partial_fine_tuning_trains_from_the_named_layer_and_keeps_frozen_bn(backend, tmp_path):
    spec = spec_with(tmp_path, """  - name: ft
    kind: pretrained
    base: {name: densenet121, weights: none, frozen: false, trainable_from: conv5_block16}
    head: [{type: global_avg_pool}, {type: dense, units: 1, activation: sigmoid}]
    train: {optimizer: {name: adam, learning_rate: 0.01}, epochs: 1, batch_size: 4}
""", 32)
    model = spec.model("ft")
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    before = backend.get_weights(handle)
    imgs, labels = smooth_images(12, 32, 32, seed=1), (np.arange(12) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(8), labels[:8], spec.augmentation, seed=0)
    fit(backend, handle, model, train, EvalData(imgs[8:], labels[8:]))
    after = backend.get_weights(handle)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    # the trained part: its weights AND its BatchNorm statistics (training mode) move; every
    # layer before conv5_block16 keeps weights and statistics (BatchNorm in inference mode)
    trained = sorted(k for k in before if k.startswith(("densenet121/conv5_block16_",
                                                        "densenet121/bn/", "dense_1/")))
    assert len(trained) == 2 * 4 + 2 + 4 + 2  # 2 BNs and 2 kernels in the block, bn, head
    assert changed == trained


STAGED = """  - name: staged
    kind: pretrained
    base: {name: densenet121, weights: none}
    head: [{type: global_avg_pool}, {type: dense, units: 1, activation: sigmoid}]
    train:
      optimizer: {name: adam, learning_rate: 0.01}
      batch_size: 4
      stages:
        - {epochs: 1, learning_rate: 0.01}
        - {epochs: %d, learning_rate: 0.001, trainable_from: conv5_block16}
"""


@pytest.mark.slow
def test_stages_train_the_head_then_the_base_from_trainable_from(backend, tmp_path):
    spec = spec_with(tmp_path, STAGED % 1, 32)
    model = spec.model("staged")
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    before = backend.get_weights(handle)
    seen: list[tuple[dict, tuple[int, int, int], float]] = []
    imgs, labels = smooth_images(12, 32, 32, seed=1), (np.arange(12) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(8), labels[:8], spec.augmentation, seed=0)
    hist = fit(backend, handle, model, train, EvalData(imgs[8:], labels[8:]),
               on_epoch=lambda r: seen.append((backend.get_weights(handle),
                                               counts(backend, handle),
                                               backend.get_learning_rate(handle))))
    assert [h.learning_rate for h in hist] == [float(np.float32(0.01)), float(np.float32(0.001))]
    total = BASE_TABLE["densenet121"].counts.total + 1025
    partial = 1984 + 126_976 + 256 + 36_864 + 2048 + 1025  # as the trainable_from count test
    assert [c for _, c, _ in seen] == [(total, 1025, total - 1025),
                                       (total, partial, total - partial)]
    assert [lr for _, _, lr in seen] == pytest.approx([0.01, 0.001], rel=1e-7)
    stage1, stage2 = seen[0][0], seen[1][0]
    changed1 = sorted(k for k in before if not np.array_equal(before[k], stage1[k]))
    assert changed1 == ["dense_1/bias", "dense_1/kernel"]  # base weights AND statistics kept
    changed2 = sorted(k for k in before if not np.array_equal(stage1[k], stage2[k]))
    trained = sorted(k for k in before if k.startswith(("densenet121/conv5_block16_",
                                                        "densenet121/bn/", "dense_1/")))
    assert len(trained) == 2 * 4 + 2 + 4 + 2
    assert changed2 == trained  # from conv5_block16 on (weights, BN statistics); none before


@pytest.mark.slow
def test_stages_resume_inside_stage_two_ends_bit_identical(backend_name, tmp_path):
    spec = spec_with(tmp_path, STAGED % 2, 32)
    model = spec.model("staged")
    imgs, labels = smooth_images(12, 32, 32, seed=1), (np.arange(12) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(8), labels[:8], spec.augmentation, seed=0)
    val = EvalData(imgs[8:], labels[8:])

    def run(resume=None):
        b = make_backend(backend_name)
        handle = b.build(model, ModelInput(32, 3, "imagenet"))
        states: list = []
        hist = fit(b, handle, model, train, val, resume=resume, on_checkpoint=states.append)
        return hist, b.get_weights(handle), states

    whole, weights, states = run()
    assert [s.recipe["stage"] for s in states] == [0, 1]
    resumed, resumed_weights, _ = run(states[1])  # after epoch 2, inside stage 2
    assert [h.loss for h in resumed] == [h.loss for h in whole]
    assert [h.val_loss for h in resumed] == [h.val_loss for h in whole]
    assert all(np.array_equal(weights[k], resumed_weights[k]) for k in weights)


def test_same_seed_same_initial_weights(backend_name):
    spec = tiny_cnn_spec()

    def initial(seed: int) -> dict[str, np.ndarray]:
        b = make_backend(backend_name, seed=seed)
        return b.get_weights(b.build(spec.model("cnn"), ModelInput(32, 3, "rescale")))

    a, b, c = initial(5), initial(5), initial(6)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv2d_1/kernel"], c["conv2d_1/kernel"])
    assert not np.array_equal(a["dense_1/kernel"], c["dense_1/kernel"])


@pytest.mark.slow
def test_same_seed_same_training_in_process(backend_name):
    spec = tiny_cnn_spec()
    model = spec.model("cnn")
    imgs, labels = random_images(20, 32, seed=0), (np.arange(20) % 2).astype(np.float32)
    outs = []
    for _ in range(2):
        b = make_backend(backend_name, seed=5)
        h = b.build(model, ModelInput(32, 3, "rescale"))
        fit(b, h, model, TrainData(imgs, np.arange(16), labels[:16], spec.augmentation, seed=5),
            None)
        outs.append(b.predict(h, imgs[16:]))
    np.testing.assert_array_equal(outs[0], outs[1])


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from backends.registry import create
    from backends.base import ModelInput, TrainData, EvalData
    from backends.loop import fit
    from harness.spec import load_spec
    spec = load_spec({spec!r}, ["data.image_size=32", "models.cnn.layers[17].units=16",
                                "models.cnn.train.epochs=1", "models.cnn.train.batch_size=8"])
    model = spec.model("cnn")
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 255, size=(48, 32, 32)).astype(np.uint8)
    labels = (np.arange(48) % 2).astype(np.float32)
    b = create({name!r}, device="cpu", deterministic=True)
    b.seed(7, True)
    h = b.build(model, ModelInput(32, 3, "rescale"))
    fit(b, h, model, TrainData(imgs, np.arange(40), labels[:40], spec.augmentation, seed=7),
        EvalData(imgs[40:], labels[40:]))
    print("RESULT " + json.dumps(b.predict(h, imgs[40:]).tolist()))
    """
)


@pytest.mark.slow
def test_same_seed_is_bit_identical_across_processes(backend_name):
    code = DETERMINISM_SCRIPT.format(root=str(ROOT), spec=str(PAPER), name=backend_name)
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
        assert r.returncode == 0, r.stderr[-2000:]
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
        outs.append(json.loads(line[7:]))
    assert outs[0] == outs[1]  # exact float equality: bit-identical
