"""What only the Keras backend (backends/keras_backend.py) has: Keras layer parameters, Keras'
weights cache and files, the projective matrices, Keras' own loss functions as ground truth,
the pre-import environment. Everything every backend must do is in test_backend_conformance.py.

Runs in the tf tox env (Keras on TensorFlow) and in the keras-torch and keras-jax envs
(KERAS_BACKEND=torch|jax: TensorFlow-specific tests skip); skipped where none is installed.

    tox -e tf -- tests/test_keras_backend.py
    tox -e keras-torch
    tox -e keras-jax
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, available_backends

if not {"keras", "keras-torch", "keras-jax"} & set(available_backends()):
    pytest.skip("the Keras backend is not this env's backend", allow_module_level=True)

# the framework Keras will load (conftest sets KERAS_BACKEND in the keras-torch/keras-jax envs)
pytest.importorskip(os.environ.get("KERAS_BACKEND") or "tensorflow")
pytest.importorskip("keras")

from backend_fixtures import (  # noqa: E402
    LOGIT_LABELS,
    LOGITS,
    UNIT_WEIGHTS,
    clipped_bce,
    linear_unit,
    paper,
    spec_with,
    stable_bce,
)
from tools.make_cross_framework_reference import odd_spec  # noqa: E402

from backends import keras_backend as kb  # noqa: E402
from backends.base import EvalData, ModelInput, bce  # noqa: E402
from backends.loop import validate  # noqa: E402
from harness.shapes import infer_model  # noqa: E402

TF = kb.KERAS_BACKEND == "tensorflow"
tf_only = pytest.mark.skipif(not TF, reason="TensorFlow-specific (Keras on TensorFlow)")
torch_only = pytest.mark.skipif(kb.KERAS_BACKEND != "torch", reason="Keras on PyTorch only")
to_np = kb.keras.ops.convert_to_numpy  # framework tensor (any device, grad or not) -> numpy


@pytest.fixture(scope="module")
def backend() -> kb.KerasBackend:
    b = kb.KerasBackend(device="cpu")
    b.seed(0, deterministic=False)
    return b


# ---------------------------------------------------------------------------------------------
# Keras layers and their parameters


def test_layer_parameters_come_from_the_spec(backend, tmp_path):
    spec = odd_spec(tmp_path, "odd", 37)
    model = spec.model("odd")
    handle = backend.build(model, ModelInput(37, 1, "rescale"))
    get = handle.model.get_layer
    # the Keras classes harness.shapes names in its rows
    # off TensorFlow, 'same' average pooling is SameAveragePooling2D (TensorFlow's semantics)
    same_pool = {} if TF else {"SameAveragePooling2D": "AveragePooling2D"}
    classes = [type(get(r.name)).__name__ for r in infer_model(spec, model).rows]
    assert [same_pool.get(c, c) for c in classes] == [
        r.kind for r in infer_model(spec, model).rows]
    conv = get("conv2d_1")
    assert conv.strides == (2, 2) and conv.padding == "valid" and conv.use_bias is False
    assert type(conv.kernel_initializer).__name__ == "HeNormal"
    bn = get("batchnorm_1")
    assert (bn.epsilon, bn.momentum, bn.center, bn.scale) == (0.01, 0.9, False, False)
    conv2 = get("conv2d_2")
    assert conv2.strides == (2, 1) and conv2.activation.__name__ == "tanh"
    assert np.all(to_np(conv2.bias) == 1.0)  # bias_initializer: ones
    pool = get("avgpool2d_1")
    assert (pool.padding == "same") if TF else isinstance(pool, kb.SameAveragePooling2D)
    assert tuple(pool.strides) == (2, 2)
    assert get("maxpool2d_1").strides == (2, 3)  # None in the spec: equal to the pool
    assert get("dropout_1").rate == 0.5
    cnn = backend.build(paper().model("cnn"), ModelInput(224, 3, "rescale")).model
    bn = cnn.get_layer("batchnorm_1")
    assert (bn.epsilon, bn.momentum) == (1e-3, 0.99)
    assert handle.model.count_params() == backend.count_params(handle).total  # + `features`: 0


# ---------------------------------------------------------------------------------------------
# Weights files: Keras' cache and .weights.h5


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.write_bytes(b"")
    monkeypatch.setattr(kb, "_online", lambda *a, **k: pytest.fail("must not go online"))
    assert kb.resolve_weights("densenet169", "imagenet") == str(cached)
    assert kb.resolve_weights("densenet169", "none") is None


def test_local_weights_file_is_loaded(backend, tmp_path):
    import keras

    spec = spec_with(
        tmp_path,
        """  - name: vgg
    kind: pretrained
    base: {name: vgg16, weights: none}
    head: [{type: global_avg_pool}, {type: dense, units: 1, activation: sigmoid}]
    train: {optimizer: {name: adam}, epochs: 1, batch_size: 2}
""",
        32,
    )
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg.weights.h5"
    source.save_weights(path)
    model = spec.model("vgg").model_copy(
        update={"base": spec.model("vgg").base.model_copy(update={"weights": str(path)})}
    )
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    for a, b in zip(source.weights, handle.base.weights, strict=True):
        np.testing.assert_array_equal(to_np(a), to_np(b))


# ---------------------------------------------------------------------------------------------
# Augmentation geometry: the projective matrices


def test_projective_matrix_maps_output_to_input():
    m = kb.projective_matrices(np.array([90.0]), np.array([2.0]), np.array([True]),
                               np.array([False]), height=5, width=9)[0]
    # output centre -> input centre; one step right in the output -> half a step, rotated
    cx, cy = 4.0, 2.0
    x_in = lambda x, y: (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])  # noqa: E731
    np.testing.assert_allclose(x_in(cx, cy), (cx, cy), atol=1e-6)
    np.testing.assert_allclose(x_in(cx + 1, cy), (cx, cy + 0.5), atol=1e-6)
    assert m[6] == m[7] == 0


# ---------------------------------------------------------------------------------------------
# The loss functions against Keras' and TensorFlow's own


def test_bce_matches_the_harness_definition():
    # float64 here: in float32, 1 - 1e-7 rounds to 1 - 1.19e-7 (in Keras' own BCE too)
    y = np.array([0, 1, 1, 0, 1, 0], np.float64)
    p = np.array([0.0, 1.0, 0.3, 0.999, 1e-9, 0.5], np.float64)
    yt, pt = (kb.keras.ops.convert_to_tensor(a, "float64") for a in (y, p))
    ours = to_np(kb._bce(yt, pt, 1e-7, 0.0)).astype(np.float64)
    smoothed = to_np(kb._bce(yt, pt, 1e-7, 0.1)).astype(np.float64).mean()
    if not TF:  # Keras' clip on torch rounds its python bounds to float32, even on float64
        # JAX without jax_enable_x64 computes float64 inputs in float32
        rel = 1e-6 if kb.KERAS_BACKEND == "jax" else 1e-12
        assert ours.mean() == pytest.approx(clipped_bce(y, p).mean(), rel=rel)
        assert smoothed == pytest.approx(clipped_bce(y, p, label_smoothing=0.1).mean(), rel=rel)
        return
    assert ours.mean() == pytest.approx(bce(y, p, 1e-7), rel=1e-12)
    assert smoothed == pytest.approx(bce(y * 0.9 + 0.05, p, 1e-7), rel=1e-12)


@tf_only
def test_bce_logits_is_tensorflows_formula_with_its_gradient_at_zero():
    import tensorflow as tf

    ours = np.asarray(kb._bce_logits(LOGIT_LABELS.astype(np.float32),
                                     LOGITS.astype(np.float32), 0.0), np.float64)
    tf_own = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.constant(LOGIT_LABELS, tf.float32), logits=tf.constant(LOGITS, tf.float32))
    np.testing.assert_array_equal(ours, tf_own.numpy().astype(np.float64))
    x = tf.Variable([40.0])
    with tf.GradientTape() as tape:  # x = 0 exactly: sigmoid(0) - y, as TensorFlow's
        loss = tf.reduce_mean(kb._bce_logits(tf.constant([1.0]), x * 0.0, 0.0))
    assert tape.gradient(loss, x).numpy()[0] == pytest.approx(0.0)


@tf_only  # Keras' own BCE switches to the logits on TensorFlow only
def test_logits_form_equals_keras_own_binary_crossentropy_at_saturation(backend):
    """Ground truth: Keras' own loss (compiled, graph mode, and eager) on the model's output."""
    import tensorflow as tf

    ls = 0.1
    model = linear_unit("auto", smoothing=ls)
    handle = backend.build(model, ModelInput(1, 1, "none"))
    backend.set_weights(handle, UNIT_WEIGHTS)
    images = np.array([86, 0, 7, 255, 255, 30], np.uint8).reshape(6, 1, 1)  # logits up to 124.5
    labels = np.array([0, 1, 1, 0, 1, 0], np.float32)
    x = images.astype(np.float32)[..., None]
    # eager: the sigmoid output carries _keras_logits
    keras_eager = kb.keras.losses.binary_crossentropy(labels[:, None], handle.model(x),
                                                      label_smoothing=ls)
    # compiled, as the paper's model.fit computed it
    handle.model.compile(optimizer=kb.keras.optimizers.SGD(0.0),
                         loss=kb.keras.losses.BinaryCrossentropy(label_smoothing=ls))
    keras_compiled = handle.model.test_on_batch(x, labels)
    logits = 0.5 * images.reshape(-1).astype(np.float64) - 3
    by_hand = stable_bce(labels, logits, ls).mean()
    assert float(np.mean(keras_eager)) == pytest.approx(by_hand, rel=1e-6)
    assert float(keras_compiled) == pytest.approx(by_hand, rel=1e-6)
    clipped = clipped_bce(labels, 1 / (1 + np.exp(-logits)), label_smoothing=ls).mean()
    assert by_hand == pytest.approx(29.5496, rel=1e-4) and clipped < 12  # Keras is not clipped
    step = backend._make_step(handle, augment=False, gradients=False)
    loss, probs = step(images, labels, np.zeros((6, 8), np.float32), np.ones(6, np.float32))
    assert float(loss) == pytest.approx(float(keras_compiled), rel=1e-6)
    np.testing.assert_array_equal(probs.numpy(), tf.reshape(handle.model(x), [-1]).numpy())
    v_loss, _ = validate(backend, handle, model, EvalData(images, labels))
    assert v_loss == pytest.approx(float(keras_compiled), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Environment read before the framework is imported; Keras on PyTorch


def test_pre_import_env_does_not_import_tensorflow():
    code = ("import sys; from backends.keras_env import PRE_IMPORT_ENV; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
            "print(sorted(PRE_IMPORT_ENV))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "['default', 'deterministic']" in r.stdout


@torch_only
def test_keras_on_torch_never_imports_tensorflow(backend):
    assert backend.name == "keras-torch" and backend.environment()["keras_backend"] == "torch"
    assert "tensorflow" not in sys.modules
