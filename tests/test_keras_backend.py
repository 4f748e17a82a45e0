"""Tests of the Keras backend (backends/keras_backend.py): counts, shapes, augmentation, weights,
frozen bases, training loop. Runs in the tf tox env (Keras on TensorFlow) and in the keras-torch
env (KERAS_BACKEND=torch: TensorFlow-specific tests skip); skipped where neither is installed.

    tox -e tf -- tests/test_keras_backend.py
    tox -e keras-torch
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

# the framework Keras will load (conftest sets KERAS_BACKEND=torch in the keras-torch env)
pytest.importorskip(os.environ.get("KERAS_BACKEND") or "tensorflow")
pytest.importorskip("keras")

from conftest import ROOT  # noqa: E402

from backends import keras_backend as kb  # noqa: E402
from backends.base import EvalData, ModelInput, TrainData, bce  # noqa: E402
from harness.data.augment import apply_augmentation_numpy  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.shapes import BASE_TABLE, _base_spatial, infer_model  # noqa: E402
from harness.spec import load_spec  # noqa: E402

TF = kb.KERAS_BACKEND == "tensorflow"
tf_only = pytest.mark.skipif(not TF, reason="TensorFlow-specific (Keras on TensorFlow)")
to_np = kb.keras.ops.convert_to_numpy  # framework tensor (any device, grad or not) -> numpy

PAPER = ROOT / "specs" / "paper.yaml"
AUG_REFERENCE = ROOT / "tests" / "data" / "keras_aug_reference.npz"


@pytest.fixture(scope="module")
def backend() -> kb.KerasBackend:
    b = kb.KerasBackend(device="cpu")
    b.seed(0, deterministic=False)
    return b


def counts(b: kb.KerasBackend, handle: kb.KerasHandle) -> tuple[int, int, int]:
    c = b.count_params(handle)
    return c.total, c.trainable, c.non_trainable


def spec_with(tmp_path: Path, body: str, size: int, channels: int = 3):
    """A spec extending paper.yaml with extra models (YAML text under `models:`)."""
    path = tmp_path / "extra.yaml"
    path.write_text(
        f"extends: {PAPER}\ndata: {{image_size: {size}, channels: {channels}}}\n"
        f"models:\n{body}"
    )
    return load_spec(path)


def smooth_images(n: int, size: int) -> np.ndarray:
    """Smooth, asymmetric uint8 test images (bilinear round-off stays tiny on them)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = []
    for k in range(n):
        v = 127 + 90 * np.sin(xx / (4.0 + k) + k) * np.cos(yy / (6.0 + k)) + 30 * xx / size
        out.append(np.clip(v, 0, 255))
    return np.stack(out).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Parameter counts and shapes


def test_paper_cnn_counts_equal_inference_and_paper(backend):
    spec = load_spec(PAPER)
    model = spec.model("cnn")
    handle = backend.build(model, ModelInput(224, 3, "rescale"))
    inf = infer_model(spec, model)
    assert counts(backend, handle) == (inf.counts.total, inf.counts.trainable,
                                       inf.counts.non_trainable)
    assert counts(backend, handle) == (3_309_921, 3_309_441, 480)
    for row in inf.rows:
        layer = handle.model.get_layer(row.name)
        assert tuple(layer.output.shape[1:]) == row.shape, row.name
        assert type(layer).__name__ == row.kind
        assert sum(math.prod(w.shape) for w in layer.weights) == row.params.total


def test_densenet169_counts_equal_inference_and_paper(backend):
    spec = load_spec(PAPER, ["models.densenet.base.weights=none"])
    model = spec.model("densenet")
    handle = backend.build(model, ModelInput(224, 3, "imagenet"))
    inf = infer_model(spec, model)
    expected = (inf.counts.total, inf.counts.trainable, inf.counts.non_trainable)
    assert counts(backend, handle) == expected == (12_644_545, 1_665, 12_642_880)
    assert tuple(handle.base.output.shape[1:]) == inf.rows[0].shape == (7, 7, 1664)
    assert handle.base.trainable is False


@pytest.mark.parametrize("name", sorted(BASE_TABLE))
def test_base_table_matches_keras_applications(backend, tmp_path, name):
    size = 45  # odd: exercises the padding arithmetic of _base_spatial
    spec = spec_with(
        tmp_path,
        f"""  - name: probe
    kind: pretrained
    base: {{name: {name}, weights: none, frozen: false}}
    head: [{{type: global_avg_pool}}, {{type: dense, units: 1, activation: sigmoid}}]
    train: {{optimizer: {{name: adam}}, epochs: 1, batch_size: 2}}
""",
        size,
    )
    model = spec.model("probe")
    handle = backend.build(model, ModelInput(size, 3, "imagenet"))
    info = BASE_TABLE[name]
    base = handle.base
    trainable = sum(math.prod(w.shape) for w in base.trainable_weights)
    assert (base.count_params(), trainable) == (info.counts.total, info.counts.trainable)
    side = _base_spatial(name, size)
    assert tuple(base.output.shape[1:]) == (side, side, info.channels)
    inf = infer_model(spec, model).counts
    assert counts(backend, handle) == (inf.total, inf.trainable, inf.non_trainable)


ODD_LAYERS = """  - name: odd
    kind: sequential
    layers:
      - {type: conv2d, filters: 6, kernel: [3, 5], strides: 2, padding: valid, use_bias: false,
         kernel_initializer: he_normal}
      - {type: batchnorm, center: false, scale: false, epsilon: 0.01, momentum: 0.9}
      - {type: conv2d, filters: 5, kernel: 3, strides: [2, 1], padding: same, activation: tanh,
         kernel_initializer: lecun_uniform, bias_initializer: ones}
      - {type: batchnorm, center: true, scale: false}
      - {type: avgpool2d, pool: 3, strides: 2, padding: same}
      - {type: maxpool2d, pool: [2, 3], padding: valid}
      - {type: activation, activation: elu}
      - {type: dropout, rate: 0.5}
      - {type: flatten}
      - {type: dense, units: 7, use_bias: false, activation: gelu}
      - {type: dense, units: 1, activation: sigmoid}
    train: {optimizer: {name: sgd, learning_rate: 0.1, momentum: 0.9, nesterov: true},
            epochs: 1, batch_size: 4}
  - name: gap
    kind: sequential
    layers:
      - {type: conv2d, filters: 4, kernel: 1}
      - {type: global_avg_pool}
      - {type: dense, units: 1, activation: sigmoid, kernel_initializer: zeros}
    train: {optimizer: {name: adam}, epochs: 1, batch_size: 4}
"""


@pytest.mark.parametrize("name", ["odd", "gap"])
def test_other_layers_counts_and_shapes_equal_inference(backend, tmp_path, name):
    spec = spec_with(tmp_path, ODD_LAYERS, 37, channels=1)
    model = spec.model(name)
    handle = backend.build(model, ModelInput(37, 1, "rescale"))
    inf = infer_model(spec, model)
    assert counts(backend, handle) == (inf.counts.total, inf.counts.trainable,
                                       inf.counts.non_trainable)
    assert len(handle.model.layers) == len(inf.rows) + 1  # + the Input layer
    for row in inf.rows:
        layer = handle.model.get_layer(row.name)
        assert tuple(layer.output.shape[1:]) == row.shape, row.name
        assert type(layer).__name__ == row.kind


def test_layer_parameters_come_from_the_spec(backend, tmp_path):
    spec = spec_with(tmp_path, ODD_LAYERS, 37, channels=1)
    handle = backend.build(spec.model("odd"), ModelInput(37, 1, "rescale"))
    get = handle.model.get_layer
    conv = get("conv2d_1")
    assert conv.strides == (2, 2) and conv.padding == "valid" and conv.use_bias is False
    assert type(conv.kernel_initializer).__name__ == "HeNormal"
    bn = get("batchnorm_1")
    assert (bn.epsilon, bn.momentum, bn.center, bn.scale) == (0.01, 0.9, False, False)
    conv2 = get("conv2d_2")
    assert conv2.strides == (2, 1) and conv2.activation.__name__ == "tanh"
    assert np.all(conv2.bias.numpy() == 1.0)  # bias_initializer: ones
    assert get("avgpool2d_1").padding == "same" and get("avgpool2d_1").strides == (2, 2)
    assert get("maxpool2d_1").strides == (2, 3)  # None in the spec: equal to the pool
    assert get("dropout_1").rate == 0.5
    paper = load_spec(PAPER)
    cnn = backend.build(paper.model("cnn"), ModelInput(224, 3, "rescale")).model
    bn = cnn.get_layer("batchnorm_1")
    assert (bn.epsilon, bn.momentum) == (1e-3, 0.99)


def test_unknown_layer_type_lists_the_table():
    class Fake:
        type = "lstm"

    with pytest.raises(ValueError, match="no layer 'lstm'; known: conv2d, batchnorm"):
        kb.make_layer(Fake(), "x")  # type: ignore[arg-type]


def test_pretrained_needs_three_channels(backend):
    spec = load_spec(PAPER, ["models.densenet.base.weights=none"])
    with pytest.raises(UserError, match="needs 3 input channels"):
        backend.build(spec.model("densenet"), ModelInput(32, 1, "imagenet"))


# ---------------------------------------------------------------------------------------------
# Weights files


def test_imagenet_weights_offline_error_names_file_folder_and_alternative(
    backend, tmp_path, monkeypatch
):
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(kb, "_online", lambda *a, **k: False)
    spec = load_spec(PAPER)
    with pytest.raises(UserError) as e:
        backend.build(spec.model("densenet"), ModelInput(224, 3, "imagenet"))
    msg = str(e.value)
    assert "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(home / "models") in msg and "$KERAS_HOME/models" in msg
    assert "weights: none" in msg
    assert "\n" not in e.value.message


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.write_bytes(b"")
    monkeypatch.setattr(kb, "_online", lambda *a, **k: pytest.fail("must not go online"))
    assert kb.resolve_weights("densenet169", "imagenet") == str(cached)
    assert kb.resolve_weights("densenet169", "none") is None


def test_missing_local_weights_file_is_a_user_error(backend, tmp_path):
    missing = tmp_path / "nope.h5"
    spec = load_spec(PAPER, [f"models.densenet.base.weights={missing}"])
    with pytest.raises(UserError, match="weights file not found: .*nope.h5"):
        backend.build(spec.model("densenet"), ModelInput(32, 3, "imagenet"))


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
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------------------------
# Augmentation (on device) against the numpy oracle


def flags(n: int, angle: float = 0.0, scale: float = 1.0, h: bool = False, v: bool = False):
    return (np.full(n, angle, np.float32), np.full(n, scale, np.float32),
            np.full(n, h), np.full(n, v))


def test_identity_and_flips_are_exact(backend):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 17, 23)).astype(np.uint8)
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3)), imgs.astype(np.float32))
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3, h=True)), imgs[:, :, ::-1])
    np.testing.assert_array_equal(backend.augment(imgs, *flags(3, v=True)), imgs[:, ::-1, :])
    np.testing.assert_array_equal(
        backend.augment(imgs, *flags(3, h=True, v=True)), imgs[:, ::-1, ::-1]
    )


@pytest.mark.parametrize("size", [16, 17])
def test_rotation_by_90_degrees_is_rot90(backend, size):
    imgs = np.random.default_rng(1).integers(0, 256, (2, size, size)).astype(np.uint8)
    out = backend.augment(imgs, *flags(2, angle=90.0))
    expected = np.stack([np.rot90(im, 1) for im in imgs]).astype(np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_random_parameters_agree_with_the_numpy_oracle(backend):
    rng = np.random.default_rng(2)
    n = 12
    imgs = smooth_images(n, 40)
    params = (
        rng.uniform(-180, 180, n).astype(np.float32),
        rng.uniform(0.6, 1.6, n).astype(np.float32),
        rng.random(n) < 0.5,
        rng.random(n) < 0.5,
    )
    out = backend.augment(imgs, *params)
    ref = apply_augmentation_numpy(imgs, *params)
    assert out.dtype == np.float32 and out.shape == imgs.shape
    assert np.mean(np.abs(out - ref)) < 1 / 255
    # the same interpolation and border rule, not just a close one
    assert np.max(np.abs(out - ref)) < 0.01


def test_projective_matrix_maps_output_to_input():
    m = kb.projective_matrices(np.array([90.0]), np.array([2.0]), np.array([True]),
                               np.array([False]), height=5, width=9)[0]
    # output centre -> input centre; one step right in the output -> half a step, rotated
    cx, cy = 4.0, 2.0
    x_in = lambda x, y: (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])  # noqa: E731
    np.testing.assert_allclose(x_in(cx, cy), (cx, cy), atol=1e-6)
    np.testing.assert_allclose(x_in(cx + 1, cy), (cx, cy + 0.5), atol=1e-6)
    assert m[6] == m[7] == 0


@tf_only  # the file is TensorFlow's output, bit for bit
def test_stored_reference_file_is_reproduced(backend):
    """tests/data/keras_aug_reference.npz (read by the torch backend's tests) is current."""
    from tools.make_keras_aug_reference import reference_arrays

    stored = np.load(AUG_REFERENCE)
    fresh = reference_arrays(backend)
    assert set(stored.files) == set(fresh)
    for key in fresh:
        np.testing.assert_array_equal(stored[key], fresh[key], err_msg=key)
    ref = apply_augmentation_numpy(stored["images"], stored["angle"], stored["scale"],
                                   stored["hflip"], stored["vflip"])
    assert np.mean(np.abs(stored["augmented"] - ref)) < 1 / 255


# ---------------------------------------------------------------------------------------------
# Loss, training, prediction


def stable_bce(labels, logits, label_smoothing=0.0):
    """max(x, 0) - x y + log(1 + exp(-|x|)) per sample, float64: the logits form, by hand."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def clipped_bce(labels, probs, epsilon=1e-7, label_smoothing=0.0):
    """The probabilities form, by hand, with float32's clip bounds (as in Keras)."""
    lo, hi = float(np.float32(epsilon)), float(np.float32(1 - epsilon))
    p = np.clip(np.asarray(probs, np.float64), lo, hi)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_bce_matches_the_harness_definition():
    # float64 here: in float32, 1 - 1e-7 rounds to 1 - 1.19e-7 (in Keras' own BCE too)
    y = np.array([0, 1, 1, 0, 1, 0], np.float64)
    p = np.array([0.0, 1.0, 0.3, 0.999, 1e-9, 0.5], np.float64)
    yt, pt = (kb.keras.ops.convert_to_tensor(a, "float64") for a in (y, p))
    ours = to_np(kb._bce(yt, pt, 1e-7, 0.0)).astype(np.float64)
    smoothed = to_np(kb._bce(yt, pt, 1e-7, 0.1)).astype(np.float64).mean()
    if not TF:  # Keras' clip on torch rounds its python bounds to float32, even on float64
        assert ours.mean() == pytest.approx(clipped_bce(y, p).mean(), rel=1e-12)
        assert smoothed == pytest.approx(clipped_bce(y, p, label_smoothing=0.1).mean(), rel=1e-12)
        return
    assert ours.mean() == pytest.approx(bce(y, p, 1e-7), rel=1e-12)
    assert smoothed == pytest.approx(bce(y * 0.9 + 0.05, p, 1e-7), rel=1e-12)


LOGITS = np.array([40.0, -3.0, 0.5])
LOGIT_LABELS = np.array([0.0, 1.0, 1.0])


@tf_only
def test_bce_logits_is_the_stable_formula_and_tensorflows():
    import tensorflow as tf

    ours = np.asarray(kb._bce_logits(LOGIT_LABELS.astype(np.float32),
                                     LOGITS.astype(np.float32), 0.0), np.float64)
    assert ours.mean() == pytest.approx(stable_bce(LOGIT_LABELS, LOGITS).mean(), rel=1e-6)
    assert ours.mean() == pytest.approx((40 + 3.048587351573742 + 0.47407698418010663) / 3,
                                        rel=1e-6)
    tf_own = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.constant(LOGIT_LABELS, tf.float32), logits=tf.constant(LOGITS, tf.float32))
    np.testing.assert_array_equal(ours, tf_own.numpy().astype(np.float64))
    smoothed = np.asarray(kb._bce_logits(LOGIT_LABELS, LOGITS, 0.1), np.float64).mean()
    assert smoothed == pytest.approx(stable_bce(LOGIT_LABELS, LOGITS, 0.1).mean(), rel=1e-12)
    # the clipped formula caps a confidently wrong prediction at -log(1.19e-7) = 15.94
    p = tf.sigmoid(tf.constant(LOGITS, tf.float32)).numpy()
    clipped = np.asarray(kb._bce(LOGIT_LABELS.astype(np.float32), p, 1e-7, 0.0), np.float64)
    assert clipped[0] == pytest.approx(15.942385, rel=1e-6)
    assert clipped.mean() == pytest.approx(clipped_bce(LOGIT_LABELS, p).mean(), rel=1e-6)


@tf_only
def test_bce_gradient_at_saturation_nonzero_from_logits_zero_from_clipped_probabilities():
    import tensorflow as tf

    x = tf.Variable([40.0])
    y = tf.constant([0.0])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(kb._bce_logits(y, x, 0.0))
    assert tape.gradient(loss, x).numpy()[0] == pytest.approx(1.0)  # sigmoid(40) - 0
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(kb._bce(y, tf.sigmoid(x), 1e-7, 0.0))
    assert tape.gradient(loss, x).numpy()[0] == 0.0
    with tf.GradientTape() as tape:  # x = 0 exactly: sigmoid(0) - y, as TensorFlow's
        loss = tf.reduce_mean(kb._bce_logits(tf.constant([1.0]), x * 0.0, 0.0))
    assert tape.gradient(loss, x).numpy()[0] == pytest.approx(0.0)


def linear_unit_spec(form: str, lr: float = 1e-12, smoothing: float = 0.0, last: str = "dense"):
    """A 1x1-pixel model whose logit is 0.5 * pixel - 3: pixels 86, 0, 7 give 40, -3, 0.5."""
    layers = ("[{type: flatten}, {type: dense, units: 1, activation: sigmoid, "
              "kernel_initializer: zeros}]")
    if last == "activation":
        layers = ("[{type: flatten}, {type: dense, units: 1, kernel_initializer: zeros}, "
                  "{type: activation, activation: sigmoid}]")
    from harness.spec import SequentialModel

    return SequentialModel.model_validate({
        "name": "unit", "kind": "sequential", "layers": __import__("yaml").safe_load(layers),
        "train": {"optimizer": {"name": "sgd", "learning_rate": lr}, "epochs": 1,
                  "batch_size": 3, "shuffle": False,
                  "loss": {"form": form, "label_smoothing": smoothing}},
    })


def unit_handle(backend, model):
    handle = backend.build(model, ModelInput(1, 1, "none"))
    dense = handle.model.get_layer("dense_1")
    dense.kernel.assign(np.array([[0.5]], np.float32))
    dense.bias.assign(np.array([-3.0], np.float32))
    return handle


UNIT_IMAGES = np.array([86, 0, 7], np.uint8).reshape(3, 1, 1)
NO_AUG = load_spec(PAPER, ["augmentation.enabled=false"]).augmentation


@pytest.mark.parametrize("last", ["dense", "activation"])
def test_loss_forms_by_hand_in_training_and_validation(backend, last):
    stable = stable_bce(LOGIT_LABELS, LOGITS).mean()
    for form, expected in [("auto", stable), ("probabilities", None)]:
        model = linear_unit_spec(form, last=last)
        handle = unit_handle(backend, model)
        probs = backend.predict(handle, UNIT_IMAGES)
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-LOGITS)), rtol=1e-6)
        if expected is None:
            expected = clipped_bce(LOGIT_LABELS, probs).mean()
            assert expected == pytest.approx((15.942385 + 3.048587 + 0.474077) / 3, rel=1e-5)
        assert model.train.loss.on_logits(model.layers[-1]) == (form == "auto")
        train = TrainData(UNIT_IMAGES, np.arange(3), LOGIT_LABELS.astype(np.float32), NO_AUG,
                          seed=0, shuffle=False)
        hist = backend.fit(handle, train, EvalData(UNIT_IMAGES, LOGIT_LABELS), model.train)
        assert hist[0].loss == pytest.approx(expected, rel=1e-6), form  # lr 1e-12: no change
        if form == "probabilities":  # validation: the harness's float64 `bce` (clip 1 - 1e-7,
            expected = bce(LOGIT_LABELS, probs)  # not float32's 1 - 1.19e-7): 16.118, not 15.942
            assert expected == pytest.approx((16.118096 + 3.048587 + 0.474077) / 3, rel=1e-5)
        assert hist[0].val_loss == pytest.approx(expected, rel=1e-6), form
        v_loss, v_probs = backend.evaluate_loss(handle, UNIT_IMAGES, LOGIT_LABELS, model.train)
        assert v_loss == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(v_probs, probs, rtol=1e-7)


@tf_only  # Keras' own BCE switches to the logits on TensorFlow only
def test_logits_form_equals_keras_own_binary_crossentropy_at_saturation(backend):
    """Ground truth: Keras' own loss (compiled, graph mode, and eager) on the model's output."""
    import tensorflow as tf

    ls = 0.1
    model = linear_unit_spec("auto", smoothing=ls)
    handle = unit_handle(backend, model)
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
    step, _ = backend._train_step(handle, model.train, augment=False)
    loss, probs = step(images.reshape(6, 1, 1), labels, np.zeros((6, 8), np.float32))
    assert float(loss) == pytest.approx(float(keras_compiled), rel=1e-6)
    np.testing.assert_array_equal(probs.numpy(), tf.reshape(handle.model(x), [-1]).numpy())
    v_loss, _ = backend.evaluate_loss(handle, images.reshape(6, 1, 1), labels, model.train)
    assert v_loss == pytest.approx(float(keras_compiled), rel=1e-6)


def test_training_at_saturation_moves_weights_only_from_logits(backend):
    wrong = np.array([255, 255, 255], np.uint8).reshape(3, 1, 1)  # logit 124.5, label 0
    labels = np.zeros(3, np.float32)
    moved = {}
    for form in ("auto", "probabilities"):
        model = linear_unit_spec(form, lr=0.01)
        handle = unit_handle(backend, model)
        train = TrainData(wrong, np.arange(3), labels, NO_AUG, seed=0, shuffle=False)
        backend.fit(handle, train, None, model.train)
        dense = handle.model.get_layer("dense_1")
        moved[form] = (float(dense.kernel.numpy()[0, 0]) - 0.5, float(dense.bias.numpy()[0]) + 3)
    # from logits: d loss / d logit = sigmoid(124.5) - 0 = 1 -> kernel -= 0.01 * 255, bias -= 0.01
    assert moved["auto"] == pytest.approx((-2.55, -0.01), rel=1e-5)
    assert moved["probabilities"] == (0.0, 0.0)  # the clip stops the gradient


def test_sigmoid_of_logits_is_the_model_output(backend):
    spec = tiny_cnn_spec()
    handle = backend.build(spec.model("cnn"), ModelInput(32, 3, "rescale"))
    imgs = np.random.default_rng(2).integers(0, 256, (5, 32, 32)).astype(np.uint8)
    x = kb._normalize(imgs.astype(np.float32)[..., None], handle.model_input)
    z = to_np(kb._logits(handle, x, training=False))
    p = backend.predict(handle, imgs)
    np.testing.assert_allclose(1 / (1 + np.exp(-z.astype(np.float64))), p, rtol=1e-6)
    assert counts(backend, handle)[0] == handle.model.count_params()  # features adds nothing


def tiny_cnn_spec(extra=()):
    return load_spec(PAPER, ["data.image_size=32", "models.cnn.layers[17].units=8",
                             "models.cnn.train.batch_size=8", *extra])


def test_fit_history_predict_and_partial_batch(backend):
    spec = tiny_cnn_spec(["models.cnn.train.epochs=2"])
    model = spec.model("cnn")
    imgs = np.random.default_rng(4).integers(0, 256, (30, 32, 32)).astype(np.uint8)
    labels = (np.arange(30) % 2).astype(np.float32)
    handle = backend.build(model, ModelInput(32, 3, "rescale"))
    seen = []
    train = TrainData(imgs, np.arange(21), labels[:21], spec.augmentation, seed=0)
    hist = backend.fit(handle, train, EvalData(imgs[21:], labels[21:]), model.train, seen.append)
    assert seen == hist and [h.epoch for h in hist] == [1, 2]
    assert all(h.images == 21 for h in hist)  # 8 + 8 + 5: the partial batch is kept
    assert hist[0].first_step_seconds is not None and hist[1].first_step_seconds is None
    assert all(0 < h.train_seconds <= h.seconds for h in hist)
    assert all(0 <= h.accuracy <= 1 and np.isfinite(h.loss) for h in hist)
    p = backend.predict(handle, imgs[21:], batch_size=4)
    assert p.shape == (9,) and p.dtype == np.float64 and np.all((p >= 0) & (p <= 1))
    # form auto, model ending in a sigmoid: the validation loss is from the logits
    x = kb._normalize(imgs[21:].astype(np.float32)[..., None], handle.model_input)
    z = to_np(kb._logits(handle, x, training=False)).astype(np.float64)
    assert hist[-1].val_loss == pytest.approx(stable_bce(labels[21:], z).mean(), rel=1e-6)
    assert hist[-1].val_loss == pytest.approx(bce(labels[21:], p), rel=1e-5)  # unsaturated
    assert backend.predict(handle, imgs[:0]).shape == (0,)


@pytest.mark.parametrize(("bad", "step"), [(0, 1), (10, 2), (19, 3)])
def test_nan_loss_names_epoch_and_step(backend, bad, step):
    spec = tiny_cnn_spec(["models.cnn.train.epochs=1"])
    imgs = np.zeros((20, 32, 32), np.uint8)
    labels = np.zeros(20, np.float32)
    labels[bad] = np.nan  # batches of 8 in order: sample 10 is in step 2, sample 19 in step 3
    handle = backend.build(spec.model("cnn"), ModelInput(32, 3, "rescale"))
    train = TrainData(imgs, np.arange(20), labels, spec.augmentation, seed=0, shuffle=False)
    with pytest.raises(FloatingPointError, match=f"loss became NaN at epoch 1 step {step}$"):
        backend.fit(handle, train, None, spec.model("cnn").train)


@pytest.mark.slow
def test_frozen_base_keeps_weights_and_bn_statistics(backend, tmp_path):
    spec = spec_with(
        tmp_path,
        """  - name: frozen
    kind: pretrained
    base: {name: densenet169, weights: none, frozen: true}
    normalization: imagenet
    head: [{type: global_avg_pool}, {type: dense, units: 1, activation: sigmoid}]
    train: {optimizer: {name: adam, learning_rate: 0.01}, epochs: 2, batch_size: 8}
""",
        32,
    )
    model = spec.model("frozen")
    handle = backend.build(model, ModelInput(32, 3, "imagenet"))
    base_before = [w.numpy().copy() for w in handle.base.weights]
    head_before = [w.numpy().copy() for w in handle.model.get_layer("dense_1").weights]
    moving = [w for w in handle.base.weights if "moving" in w.path]
    assert sum(math.prod(w.shape) for w in moving) == BASE_TABLE["densenet169"].counts.non_trainable
    imgs = smooth_images(20, 32)
    labels = (np.arange(20) % 2).astype(np.float32)
    train = TrainData(imgs, np.arange(16), labels[:16], spec.augmentation, seed=0)
    backend.fit(handle, train, EvalData(imgs[16:], labels[16:]), model.train)
    for before, w in zip(base_before, handle.base.weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy(), err_msg=w.path)
    head_after = [w.numpy() for w in handle.model.get_layer("dense_1").weights]
    assert all(not np.array_equal(a, b) for a, b in zip(head_before, head_after, strict=True))
    p = backend.predict(handle, imgs)
    assert p.shape == (20,) and np.all((p >= 0) & (p <= 1))


@tf_only
def test_environment_reports_versions_device_and_determinism(backend):
    env = backend.environment()
    assert env["name"] == "keras" and env["keras_backend"] == "tensorflow"
    assert env["device"] == "cpu" and env["versions"]["tensorflow"]
    det = env["determinism"]
    for key in ("op_determinism", "intra_op_threads", "inter_op_threads",
                "TF_ENABLE_ONEDNN_OPTS", "tf32"):
        assert key in det
    assert backend.peak_memory() == {}


def test_pre_import_env_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from backends.keras_env import PRE_IMPORT_ENV; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
            "print(sorted(PRE_IMPORT_ENV))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "['default', 'deterministic']" in r.stdout


def test_normalization_and_channel_replication():
    x = np.array([0.0, 51.0, 255.0], np.float32).reshape(1, 1, 3, 1)
    rescale = to_np(kb._normalize(x, ModelInput(3, 3, "rescale")))
    assert rescale.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(rescale[0, 0, :, 1], [0.0, 0.2, 1.0], rtol=1e-6)
    assert np.all(rescale[..., 0] == rescale[..., 2])
    imagenet = to_np(kb._normalize(x, ModelInput(3, 3, "imagenet")))
    expected = (np.array([0.0, 0.2, 1.0])[:, None] - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    np.testing.assert_allclose(imagenet[0, 0], expected, rtol=1e-5)
    none = to_np(kb._normalize(x, ModelInput(3, 1, "none")))
    np.testing.assert_array_equal(none, x)


def test_same_seed_same_initial_weights(backend):
    spec = tiny_cnn_spec()

    def initial(seed: int) -> list[np.ndarray]:
        backend.seed(seed, deterministic=False)
        handle = backend.build(spec.model("cnn"), ModelInput(32, 3, "rescale"))
        return [w.numpy() for w in handle.model.weights]

    a, b, c = initial(5), initial(5), initial(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@tf_only
def test_gpu_request_without_gpu_is_a_user_error():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="device is gpu but TensorFlow sees no GPU"):
        kb.KerasBackend(device="gpu")


# ---------------------------------------------------------------------------------------------
# Keras on PyTorch (tox -e keras-torch)

torch_only = pytest.mark.skipif(kb.KERAS_BACKEND != "torch", reason="Keras on PyTorch only")


@torch_only
def test_torch_environment_reports_versions_and_determinism():
    b = kb.KerasBackend(device="cpu")
    b.seed(0, deterministic=True)
    env = b.environment()
    assert env["name"] == "keras-torch" and env["keras_backend"] == "torch"
    assert env["versions"]["torch"] and env["device"] == "cpu"
    assert env["determinism"]["use_deterministic_algorithms"] is True
    assert "tensorflow" not in __import__("sys").modules


@torch_only
def test_torch_gradient_at_saturation_nonzero_from_logits_zero_from_clipped_probabilities():
    import torch

    x = torch.tensor([40.0], requires_grad=True)
    kb.keras.ops.mean(kb._bce_logits(torch.tensor([0.0]), x, 0.0)).backward()
    assert float(x.grad[0]) == pytest.approx(1.0)  # sigmoid(40) - 0
    x.grad = None
    kb.keras.ops.mean(kb._bce(torch.tensor([0.0]), torch.sigmoid(x), 1e-7, 0.0)).backward()
    assert float(x.grad[0]) == 0.0


@torch_only
def test_torch_train_step_loss_and_probs_match_the_model(backend):
    model = linear_unit_spec("auto", smoothing=0.1)
    handle = unit_handle(backend, model)
    images = np.array([86, 0, 7, 255, 255, 30], np.uint8).reshape(6, 1, 1)
    labels = np.array([0, 1, 1, 0, 1, 0], np.float32)
    step, _ = backend._train_step(handle, model.train, augment=False)
    loss, probs = step(images, labels, np.zeros((6, 8), np.float32))
    logits = 0.5 * images.reshape(-1).astype(np.float64) - 3
    assert float(loss) == pytest.approx(stable_bce(labels, logits, 0.1).mean(), rel=1e-6)
    np.testing.assert_allclose(to_np(probs), backend.predict(handle, images), rtol=1e-6)
