"""The Keras 3 backend: builds spec models with keras.layers / keras.applications and trains them.

    backend = registry.create("keras", device="auto")   # or "keras-torch", "keras-jax"
    backend.seed(0, deterministic=True)
    handle = backend.build(spec.model("cnn"), ModelInput(224, 3, "rescale"))
    history = backends.loop.fit(backend, handle, spec.model("cnn"), train, val, on_epoch=print)
    probs = backend.predict(handle, test_images)

Model building, counting and prediction are written with keras.layers / keras.ops and run on any
Keras backend. Training takes the harness's uint8 batch and the per-sample augmentation matrices
and does, on the device, augmentation -> normalization -> channel replication -> forward -> BCE ->
optimizer update, and returns the loss and the training-mode probabilities (for the history
metrics). On TensorFlow the step is a compiled `tf.function` (GradientTape); on Keras' PyTorch
backend (`keras-torch`) it runs eagerly with torch autograd on the Keras variables, as Keras' own
TorchTrainer does (`_make_step_torch`); on JAX (`keras-jax`) it is one jax.jit of Keras 3's
stateless API (StatelessScope, jax.value_and_grad, optimizer.stateless_apply), as Keras' own
JAXTrainer does (`_make_step_jax`), and predict is jitted the same way (`_jit_stateless`).
Forward and loss (`_loss_and_probs`), normalization and optimizer are shared; the epoch loop is
the harness's (backends/loop.py), as for every backend.

Loss (harness.spec.Loss): with `form: auto` and a model whose last layer ends in a sigmoid, BCE is
computed from the pre-sigmoid logits, as Keras 3 on TensorFlow does (the sigmoid's output carries
`_keras_logits` and `binary_crossentropy` switches to `sigmoid_cross_entropy_with_logits`). The
model itself is unchanged (same layers, counts and probabilities): `build` also makes a `features`
model that shares its layers and stops before the last one, and `_logits` applies the last
layer's pre-activation (Dense: x W + b; Activation: identity) to it. Otherwise (`form:
probabilities`, or another last layer) BCE is on probabilities clipped to [eps, 1 - eps].
`predict(..., logits=True)` returns those logits in inference mode; the loop computes the
validation loss from them in float64 (backends/base.py `bce_logits`).

Augmentation (semantics in harness/data/augment.py): flip, rotate counter-clockwise by `angle`
about the centre, zoom by `scale` about the centre. Each sample's inverse map (output pixel ->
input pixel) is one 3x3 projective matrix, passed as its 8 leading entries to
`ImageProjectiveTransformV3` (bilinear, constant fill 0), whose pixel centres sit at integer
indices like the numpy oracle's. See `projective_matrices`. Other Keras backends use
keras.ops.image.affine_transform, which takes the same 8 parameters with the same conventions
(bilinear, each out-of-image neighbour read as 0); on torch it is within 2e-3 of the oracle.

Determinism on CPU: `seed(..., deterministic=True)` enables op determinism and fixes TensorFlow's
intra- and inter-op pools at `CPU_THREADS` (the cores this process may use), through tf.config
before the first op; the counts are recorded in every result (`environment()`). It used to pin
one thread (REFERENCE.md: op determinism alone was not bit-identical with oneDNN on 2 threads),
which cost 1.95x (64 -> 33 images/s). Measured again with tests/tools/measure_determinism.py
(specs/demo.yaml, CNN 2 epochs and frozen DenseNet169 1 epoch at 64 px, 2 cores, op determinism,
2 intra + 2 inter-op threads): 10 fresh processes per model, test probabilities bit-identical
20 of 20 times (`run --check-determinism` grading). The cost left is in
tests/benchmarks/test_bench_determinism.py. On GPU: op determinism plus TF32 off; threads are
left alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from backends.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    Batch,
    ModelInput,
    StepResult,
    check_weights,
)
from backends.keras_env import THREADS_ENV
from backends.loop import last_layer
from harness.base_layers import matches
from harness.errors import UserError
from harness.spec import ACTIVATIONS as SPEC_ACTIVATIONS
from harness.spec import INITIALIZERS as SPEC_INITIALIZERS
from harness.spec import (
    ActivationLayer,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Layer,
    Model,
    ParamCounts,
    Pool2D,
    PretrainedModel,
    SequentialModel,
    TrainSpec,
)
from harness.vocab import NORMALIZATIONS

KERAS_BACKEND = keras.backend.backend()
_NAMES = {"tensorflow": "keras", "torch": "keras-torch", "jax": "keras-jax"}
# TensorFlow's thread pools in deterministic CPU mode: the worker's share of the cores when an
# executor runs several at once (HARNESS_THREADS), else the cores this process may use (see the
# module docstring for the measurement behind it)
_SHARE = os.environ.get(THREADS_ENV, "")
CPU_THREADS = (int(_SHARE) if _SHARE.isdigit() and int(_SHARE) > 0
               else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)

if KERAS_BACKEND == "tensorflow":
    import tensorflow as tf
else:  # pragma: no cover - exercised only under KERAS_BACKEND=torch|jax
    tf = None


# ---------------------------------------------------------------------------------------------
# Activations and initializers: the spec's names are Keras' own; the tables resolve each one
# when the module loads, so a name Keras lacks fails here, not in the middle of a build.

ACTIVATIONS: dict[str, Callable[..., Any]] = {a: keras.activations.get(a) for a in SPEC_ACTIVATIONS}
INITIALIZERS: dict[str, type[keras.initializers.Initializer]] = {
    i: type(keras.initializers.get(i)) for i in SPEC_INITIALIZERS
}


def _activation_of(layer: Any) -> Callable[..., Any]:
    return ACTIVATIONS[layer.activation]


def _initializer(name: str) -> keras.initializers.Initializer:
    return INITIALIZERS[name]()  # a fresh instance per variable, as Keras makes from a name


# ---------------------------------------------------------------------------------------------
# Spec layers -> Keras layers: one table. Every parameter comes from the spec.


def _conv2d(layer: Conv2D, name: str) -> keras.layers.Layer:
    return keras.layers.Conv2D(
        filters=layer.filters,
        kernel_size=layer.kernel,
        strides=layer.strides,
        padding=layer.padding,
        activation=_activation_of(layer),
        use_bias=layer.use_bias,
        kernel_initializer=_initializer(layer.kernel_initializer),
        bias_initializer=_initializer(layer.bias_initializer),
        name=name,
    )


def _batchnorm(layer: BatchNorm, name: str) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(
        axis=-1,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        center=layer.center,
        scale=layer.scale,
        name=name,
    )


def _maxpool2d(layer: Pool2D, name: str) -> keras.layers.Layer:
    return keras.layers.MaxPooling2D(
        pool_size=layer.pool, strides=layer.strides or layer.pool, padding=layer.padding, name=name
    )


def _avgpool2d(layer: Pool2D, name: str) -> keras.layers.Layer:
    strides = layer.strides or layer.pool
    if KERAS_BACKEND != "tensorflow" and layer.padding == "same":
        return SameAveragePooling2D(layer.pool, strides, name=name)
    return keras.layers.AveragePooling2D(
        pool_size=layer.pool, strides=strides, padding=layer.padding, name=name
    )


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding along one axis (the odd pixel after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@contextlib.contextmanager
def _float64_kept(dtype: str) -> Iterator[None]:
    """Keras off TensorFlow demotes float64 to float32 in type promotion (JAX's rule without x64:
    keras/src/backend/common/dtypes.py BIT64_TO_BIT32_DTYPE), so BatchNormalization.call, which
    casts its input to result_type(input, "float32"), computes a float64 input in float32. The
    float64 gradients of the parity check must be float64 throughout: the demotion is lifted
    while they are computed, and only then (training and inference never run in float64).
    Measured on keras-torch: float64 gradients 7e-8..7e-7 from TensorFlow's with the demotion,
    2e-16..9e-15 without (tests/test_parity.py pins both behaviours)."""
    from keras.src.backend.common import dtypes as keras_dtypes

    table = keras_dtypes.BIT64_TO_BIT32_DTYPE
    if dtype != "float64" or table.get("float64") != "float32":
        yield
        return
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = "float32"


class SameAveragePooling2D(keras.layers.Layer):
    """'same' average pooling as TensorFlow computes it: the padding is left out of each mean.

    Keras 3.15's torch backend pads by repeating edge values and counts them when the padding is
    uneven (keras-team/keras#19721); this pads with zeros and divides by the pooled count of
    real pixels instead. No weights: parameter counts are unchanged.
    """

    def __init__(self, pool: tuple[int, int], strides: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool, self.strides = tuple(pool), tuple(strides)

    def call(self, x: Any) -> Any:
        ops = keras.ops
        (kh, kw), (sh, sw) = self.pool, self.strides
        pads = [(0, 0), _same_pads(x.shape[1], kh, sh), _same_pads(x.shape[2], kw, sw), (0, 0)]
        ones = ops.ones_like(x[..., :1])

        def pooled_sum(t: Any) -> Any:
            return ops.average_pool(ops.pad(t, pads), self.pool, self.strides, "valid") * (kh * kw)

        return pooled_sum(x) / pooled_sum(ones)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        n, h, w, c = input_shape
        (sh, sw) = self.strides
        return (n, None if h is None else -(-h // sh), None if w is None else -(-w // sw), c)


def _dropout(layer: Dropout, name: str) -> keras.layers.Layer:
    return keras.layers.Dropout(rate=layer.rate, name=name)


def _flatten(layer: Flatten, name: str) -> keras.layers.Layer:
    return keras.layers.Flatten(data_format="channels_last", name=name)


def _global_avg_pool(layer: GlobalAvgPool, name: str) -> keras.layers.Layer:
    return keras.layers.GlobalAveragePooling2D(data_format="channels_last", name=name)


def _dense(layer: Dense, name: str) -> keras.layers.Layer:
    return keras.layers.Dense(
        units=layer.units,
        activation=_activation_of(layer),
        use_bias=layer.use_bias,
        kernel_initializer=_initializer(layer.kernel_initializer),
        bias_initializer=_initializer(layer.bias_initializer),
        name=name,
    )


def _activation(layer: ActivationLayer, name: str) -> keras.layers.Layer:
    return keras.layers.Activation(_activation_of(layer), name=name)


LAYERS: dict[str, Callable[[Any, str], keras.layers.Layer]] = {
    "conv2d": _conv2d,
    "batchnorm": _batchnorm,
    "maxpool2d": _maxpool2d,
    "avgpool2d": _avgpool2d,
    "dropout": _dropout,
    "flatten": _flatten,
    "global_avg_pool": _global_avg_pool,
    "dense": _dense,
    "activation": _activation,
}


def make_layer(layer: Layer, name: str) -> keras.layers.Layer:
    """The Keras layer for one spec layer; `name` follows harness.shapes' row names."""
    try:
        maker = LAYERS[layer.type]
    except KeyError:
        raise UserError(
            f"the keras backend has no layer '{layer.type}'; known: {', '.join(LAYERS)}"
        ) from None
    return maker(layer, name)


def _stack(x: Any, layers: tuple[Layer, ...]) -> tuple[Any, Any, keras.layers.Layer]:
    """Applies the spec's layers; returns the output, the last layer's input, the last layer."""
    seen: dict[str, int] = {}
    before, last = x, None
    for layer in layers:
        seen[layer.type] = seen.get(layer.type, 0) + 1
        last = make_layer(layer, f"{layer.type}_{seen[layer.type]}")
        before, x = x, last(x)
    if last is None:
        raise UserError("a model needs at least one layer")
    return x, before, last


# ---------------------------------------------------------------------------------------------
# Pretrained bases: one table (keras.applications constructor, no-top weights file, origin, md5)

_APPS = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class BaseEntry:
    constructor: str  # attribute of keras.applications
    weights_file: str
    origin: str
    md5: str  # "": none published


BASES: dict[str, BaseEntry] = {
    "densenet121": BaseEntry(
        "DenseNet121",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "30ee3e1110167f948a6b9946edeeb738",
    ),
    "densenet169": BaseEntry(
        "DenseNet169",
        "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/densenet/densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b8c4d4c20dd625c148057b9ff1c1176b",
    ),
    "densenet201": BaseEntry(
        "DenseNet201",
        "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/densenet/densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "c13680b51ded0fb44dff2d8f86ac8bb1",
    ),
    "resnet50": BaseEntry(
        "ResNet50",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
    "vgg16": BaseEntry(
        "VGG16",
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    # loaded from a path (as every base here), Keras leaves out the extra Rescaling by
    # 1/sqrt(std) it adds only for weights="imagenet" (keras issue tensorflow#49930): the input is
    # (x/255 - mean) / std with the file's mean/variance, what torch's PixelsToImagenet computes
    "efficientnet_b0": BaseEntry(
        "EfficientNetB0",
        "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
    ),
    "mobilenet_v2": BaseEntry(  # Keras publishes no hash; the 224 px file (any input size)
        "MobileNetV2",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        f"{_APPS}/mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
        "",
    ),
    "inception_v3": BaseEntry(
        "InceptionV3",
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_APPS}/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "bcbd6486424b2319ff4ef7d526e38f63",
    ),
}


def _base_blocks(base: keras.Model) -> list[str]:
    """The layers that end a base's blocks: a DenseNet's dense blocks (the last concat of
    each stage) and transitions, a VGG's pools. The torch backend probes the same tensors."""
    names = [layer.name for layer in base.layers]

    def stage(name: str) -> str:
        return name.split("_block")[0]

    out = []
    for i, name in enumerate(names):
        ends_stage = i + 1 == len(names) or stage(names[i + 1]) != stage(name)
        if (name.endswith("_concat") and ends_stage) or re.fullmatch(r"(pool|block)\d+_pool", name):
            out.append(name)
    return out


def _freeze_before(base: keras.Model, name: str) -> None:
    """Keras' partial fine-tuning: layers before the first one `name` matches get
    trainable=False (harness.base_layers.matches: a layer name or a block such as conv5)."""
    for layer in base.layers:
        if matches(layer.name, name):
            return
        layer.trainable = False
    raise UserError(f"base {base.name}: no layer or block '{name}' to train from")


def keras_models_dir() -> Path:
    """Where Keras caches application weights: $KERAS_HOME/models (default ~/.keras/models)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_weights(base: str, weights: str) -> str | None:
    """A local file for `weights` (imagenet | none | path), or None for random init.

    ImageNet weights come from Keras' cache; a download is tried only after a 3 s connectivity
    probe, so an offline machine gets the error at once instead of a network hang.
    """
    if weights.strip().lower() == "none":
        return None
    entry = BASES[base]
    if weights.strip().lower() == "imagenet":
        folder = keras_models_dir()
        cached = folder / entry.weights_file
        if cached.is_file():
            return str(cached)
        offline_msg = (
            f"ImageNet weights for {base} not found: put "
            f"{entry.weights_file} in {folder} ($KERAS_HOME/models), or use `weights: none` "
            f"(random init); download from {entry.origin}"
        )
        if not _online():
            raise UserError(offline_msg)
        try:
            return str(
                keras.utils.get_file(
                    entry.weights_file,
                    entry.origin,
                    cache_dir=str(folder.parent),
                    cache_subdir="models",
                    file_hash=entry.md5 or None,
                )
            )
        except Exception as e:  # noqa: BLE001 - any download failure is the same user error
            raise UserError(f"{offline_msg} (download failed: {e})") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"base weights file not found: {path}",
            "give imagenet, none, or the path of an existing .h5/.keras weights file",
        )
    return str(path)


# ---------------------------------------------------------------------------------------------
# Input pipeline: augmentation matrices, normalization, channel replication


def projective_matrices(
    angle: np.ndarray,
    scale: np.ndarray,
    hflip: np.ndarray,
    vflip: np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """Per-sample 8-parameter projective transforms mapping OUTPUT pixel (x, y) to INPUT.

    Forward: flip, rotate counter-clockwise (as seen on screen, y pointing down) by `angle`
    degrees about the centre c = ((W-1)/2, (H-1)/2), zoom by `scale`. Inverse, for d = (p - c):
    unzoom d/s, rotate by -angle: (dx cos - dy sin, dx sin + dy cos), unflip (negate the axis).
    Computed in float64 so 90 degrees is exact to float32 precision. Returns float32 (B, 8).
    """
    theta = np.deg2rad(np.asarray(angle, dtype=np.float64))
    s = np.asarray(scale, dtype=np.float64)
    fx = np.where(np.asarray(hflip, dtype=bool), -1.0, 1.0)
    fy = np.where(np.asarray(vflip, dtype=bool), -1.0, 1.0)
    cos, sin = np.cos(theta), np.sin(theta)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a0, a1 = fx * cos / s, -fx * sin / s
    b0, b1 = fy * sin / s, fy * cos / s
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    zeros = np.zeros_like(a0)
    return np.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1).astype(np.float32)


def _transform(x: Any, matrices: Any) -> Any:
    """Bilinear projective warp of float32 NHWC images, constant fill 0, on the device."""
    if KERAS_BACKEND == "tensorflow":
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x,
            transforms=matrices,
            output_shape=tf.shape(x)[1:3],
            fill_value=tf.constant(0.0, tf.float32),
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
    return keras.ops.image.affine_transform(
        x, matrices, interpolation="bilinear", fill_mode="constant", fill_value=0,
        data_format="channels_last",
    )


def _normalize(x: Any, model_input: ModelInput) -> Any:
    """float32 [0, 255] NHWC (1 channel) -> normalized, replicated to model_input.channels."""
    ops = keras.ops
    if model_input.normalization in ("rescale", "imagenet"):
        x = x / 255.0
    x = ops.repeat(x, model_input.channels, axis=-1) if model_input.channels > 1 else x
    if model_input.normalization == "imagenet":
        dtype = keras.backend.standardize_dtype(x.dtype)  # float32, or float64 for parity
        mean = np.asarray(IMAGENET_MEAN[: model_input.channels], dtype=dtype)
        std = np.asarray(IMAGENET_STD[: model_input.channels], dtype=dtype)
        x = (x - mean) / std
    elif model_input.normalization == "tf":
        x = x / 127.5 - 1.0
    elif model_input.normalization not in ("rescale", "none"):
        raise ValueError(
            f"unknown normalization '{model_input.normalization}'; "
            f"known: {', '.join(NORMALIZATIONS)}"
        )
    return x


def _bce(
    labels: Any, probs: Any, epsilon: float, label_smoothing: float, pos_weight: float = 1.0
) -> Any:
    """Per-sample BCE on probabilities clipped to [eps, 1 - eps] (Keras' formula, explicit).

    Written out rather than keras.losses.BinaryCrossentropy because Keras on TensorFlow
    silently switches to the sigmoid's logits when the output comes from a sigmoid layer: which
    form is used is the spec's choice (`Loss.form`), see `_bce_logits`.
    """
    ops = keras.ops
    y = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = ops.clip(probs, epsilon, 1.0 - epsilon)
    if pos_weight != 1.0:
        return -(pos_weight * y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))
    return -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))


def _bce_logits(labels: Any, logits: Any, label_smoothing: float, pos_weight: float = 1.0) -> Any:
    """Per-sample BCE from pre-sigmoid logits x: max(x, 0) - x y + log(1 + exp(-|x|)).

    What Keras 3 on TensorFlow computes for a sigmoid output (tf.nn.sigmoid_cross_entropy_with_
    logits), written with the same `where` form so the gradient at x = 0 is sigmoid(0) - y too.
    No clipping: the loss grows linearly and the gradient stays sigmoid(x) - y at saturation.
    """
    ops = keras.ops
    y = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    x = logits
    positive = ops.greater_equal(x, 0.0)
    relu_x = ops.where(positive, x, ops.zeros_like(x))
    neg_abs_x = ops.where(positive, -x, x)
    if pos_weight != 1.0:  # tf.nn.weighted_cross_entropy_with_logits' formula
        relu_neg_x = ops.where(positive, ops.zeros_like(x), -x)
        return (1.0 - y) * x + (1.0 + (pos_weight - 1.0) * y) * (
            ops.log1p(ops.exp(neg_abs_x)) + relu_neg_x
        )
    return relu_x - x * y + ops.log1p(ops.exp(neg_abs_x))


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass
class KerasHandle:
    """What `build` returns: the Keras model (parameters counted on it) and its input contract."""

    model: keras.Model
    model_input: ModelInput
    spec: Model
    base: keras.Model | None = None
    # the model up to the input of its last layer (shared layers), and that last layer: what
    # `_logits` needs to compute the pre-sigmoid output without changing the model
    features: keras.Model | None = None
    last: keras.layers.Layer | None = None
    optimizer: keras.optimizers.Optimizer | None = None  # None for a model that does not train
    on_logits: bool = False  # the loss is computed from the pre-sigmoid logits
    # compiled functions, made on first use: train steps by (augment, gradients), predict by
    # `logits`
    _steps: dict[tuple[bool, bool], Any] = field(default_factory=dict, repr=False)
    _forward: dict[bool, Any] = field(default_factory=dict, repr=False)

    def trainer(self) -> keras.optimizers.Optimizer:
        """The optimizer, for the steps that need one."""
        if self.optimizer is None:
            raise ValueError(f"model '{self.spec.name}' has no training recipe")
        return self.optimizer


def _logits(handle: KerasHandle, x: Any, training: bool) -> Any:
    """The model's output before its final sigmoid, shape (B,); same layers and weights.

    Dense: x W (+ b), exactly Dense.call's ops before its activation; Activation: its input.
    sigmoid of this equals the model's output (the same ops in the same order).
    """
    ops = keras.ops
    if handle.features is None:
        raise TypeError("the handle was not made by KerasBackend.build")
    h = handle.features(x, training=training)
    last = handle.last
    if isinstance(last, keras.layers.Dense):
        h = ops.matmul(h, last.kernel)
        if last.bias is not None:
            h = ops.add(h, last.bias)
    elif not isinstance(last, keras.layers.Activation):  # pragma: no cover - guarded by on_logits
        raise TypeError(f"no pre-activation for a last layer of type {type(last).__name__}")
    return ops.reshape(h, (-1,))


def _loss_and_probs(
    handle: KerasHandle, x: Any, labels: Any, on_logits: bool, epsilon: float, smoothing: float,
    weights: Any = None,
) -> tuple[Any, Any]:
    """Training-mode forward: (batch loss, probabilities (B,)), in keras.ops (any backend).

    The loss is mean(w l) with the sample weights w (Keras' sum_over_batch_size, as fit's
    class_weight) and the spec's pos_weight inside l; unweighted when `weights` is None."""
    ops = keras.ops
    pos_weight = handle.spec.train.loss.pos_weight  # type: ignore[union-attr]
    if on_logits:  # Keras 3 on TF: BCE from the sigmoid's logits
        logits = _logits(handle, x, training=True)
        per, probs = _bce_logits(labels, logits, smoothing, pos_weight), ops.sigmoid(logits)
    else:
        probs = ops.reshape(handle.model(x, training=True), (-1,))
        per = _bce(labels, probs, epsilon, smoothing, pos_weight)
    return ops.mean(per if weights is None else per * weights), probs


def _jit_stateless(handle: KerasHandle, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (reading the model's variables) as one jax.jit of the variables' current values,
    passed in at each call (a variable read inside a plain jax.jit would be baked in)."""
    import jax

    variables = handle.model.variables

    @jax.jit
    def pure(values: list[Any], *args: Any) -> Any:
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            return fn(*args)

    return lambda *args: pure([v.value for v in variables], *args)


OPTIMIZERS: dict[str, Callable[[Any], keras.optimizers.Optimizer]] = {
    "adam": lambda o: keras.optimizers.Adam(
        learning_rate=o.learning_rate,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        epsilon=o.epsilon,
        amsgrad=o.amsgrad,
    ),
    "adamw": lambda o: keras.optimizers.AdamW(
        learning_rate=o.learning_rate,
        weight_decay=o.weight_decay,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        epsilon=o.epsilon,
        amsgrad=o.amsgrad,
    ),
    "rmsprop": lambda o: keras.optimizers.RMSprop(
        learning_rate=o.learning_rate,
        rho=o.rho,
        momentum=o.momentum,
        epsilon=o.epsilon,
        centered=o.centered,
        weight_decay=o.weight_decay or None,
    ),
    "sgd": lambda o: keras.optimizers.SGD(
        learning_rate=o.learning_rate,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay or None,
    ),
}

# The backend's tables by vocabulary category (checked against the vocabulary by the tests).
TABLES: dict[str, Mapping[str, Any]] = {
    "layers": LAYERS,
    "bases": BASES,
    "optimizers": OPTIMIZERS,
    "activations": ACTIVATIONS,
    "initializers": INITIALIZERS,
}


def _optimizer(recipe: TrainSpec) -> keras.optimizers.Optimizer:
    opt = recipe.optimizer
    try:
        return OPTIMIZERS[opt.name](opt)
    except KeyError:
        raise UserError(
            f"the keras backend has no optimizer '{opt.name}'; known: {', '.join(OPTIMIZERS)}"
        ) from None


def _op_determinism_enabled(fallback: bool) -> bool:
    """TF's own flag (no public getter exists); what seed() set when it cannot be read."""
    try:
        from tensorflow.python.framework.config import is_op_determinism_enabled

        return bool(is_op_determinism_enabled())
    except ImportError:  # pragma: no cover - private path moved
        return fallback


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


class KerasBackend(Backend):
    """Keras 3; training on TensorFlow, PyTorch and JAX, building/counting/predicting on any."""

    name = _NAMES.get(KERAS_BACKEND, f"keras-{KERAS_BACKEND}")

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        if device not in ("auto", "cpu", "gpu"):
            raise UserError(f"device must be one of auto, cpu, gpu; got '{device}'")
        self._deterministic = False
        self._seed: int | None = None
        self._thread_note: str | None = None
        threads = os.environ.get(THREADS_ENV)  # the worker's share of the cores (executors)
        if KERAS_BACKEND == "tensorflow" and threads and threads.isdigit():
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
                tf.config.threading.set_inter_op_parallelism_threads(int(threads))
            except RuntimeError:  # the runtime already started (several backends in a process)
                self._thread_note = f"{THREADS_ENV}={threads} not applied: TensorFlow was running"
        self.device = self._select_device(device)

    # -- device and environment ---------------------------------------------------------------

    def _select_device(self, request: str) -> str:
        if KERAS_BACKEND != "tensorflow":
            return self._select_device_other(request)
        gpus = tf.config.list_physical_devices("GPU")
        if request == "gpu" and not gpus:
            raise UserError(
                "runtime.device is gpu but TensorFlow sees no GPU",
                "install tensorflow[and-cuda] (pip install -e '.[tf-gpu]') or use device: cpu/auto",
            )
        try:
            if request == "cpu":
                if gpus and tf.config.get_visible_devices("GPU"):
                    tf.config.set_visible_devices([], "GPU")
                return "cpu"
            for gpu in gpus:
                if not tf.config.experimental.get_memory_growth(gpu):
                    tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as e:  # the runtime is already initialized in this process
            if request == "cpu":
                raise UserError(
                    "device cpu requested after TensorFlow already started on the GPU",
                    "create the backend before running any TensorFlow op",
                ) from None
            if os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH") != "true":
                warnings.warn(f"GPU memory growth not set: {e}", stacklevel=3)
        return "gpu" if gpus and tf.config.get_visible_devices("GPU") else "cpu"

    def _select_device_other(self, request: str) -> str:  # pragma: no cover - torch/jax Keras
        if KERAS_BACKEND == "jax":
            import jax

            has_gpu = any(d.platform == "gpu" for d in jax.devices())
        else:
            import torch

            has_gpu = torch.cuda.is_available()
        if request == "gpu" and not has_gpu:
            raise UserError(f"runtime.device is gpu but Keras' {KERAS_BACKEND} backend sees no GPU")
        if request == "cpu" and has_gpu:
            raise UserError(
                f"device cpu with Keras on {KERAS_BACKEND} needs the GPU hidden before import",
                "set CUDA_VISIBLE_DEVICES= (empty) in the environment",
            )
        return "gpu" if has_gpu else "cpu"

    def environment(self) -> dict[str, Any]:
        versions: dict[str, str | None] = {
            "keras": keras.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        }
        determinism: dict[str, Any] = {
            "requested": self._deterministic,
            "seed": self._seed,
            "keras.utils.set_random_seed": self._seed is not None,
        }
        device_name = _cpu_name()
        if KERAS_BACKEND == "tensorflow":
            versions["tensorflow"] = tf.__version__
            determinism.update(
                {
                    "op_determinism": _op_determinism_enabled(self._deterministic),
                    "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                    "TF_DETERMINISTIC_OPS": os.environ.get("TF_DETERMINISTIC_OPS"),
                    "tf32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
                }
            )
            if self._thread_note:
                determinism["note"] = self._thread_note
            gpus = tf.config.get_visible_devices("GPU")
            if self.device == "gpu" and gpus:
                details = tf.config.experimental.get_device_details(gpus[0])
                device_name = details.get("device_name", gpus[0].name)
        elif KERAS_BACKEND == "torch":
            import torch

            versions["torch"] = torch.__version__
            determinism.update(
                {
                    "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                    "cudnn_deterministic": torch.backends.cudnn.deterministic,
                    "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                    "intra_op_threads": torch.get_num_threads(),
                }
            )
            if self.device == "gpu":
                device_name = torch.cuda.get_device_name(0)
        elif KERAS_BACKEND == "jax":
            import jax
            import jaxlib

            versions.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
            xla_flags = os.environ.get("XLA_FLAGS")
            determinism.update(
                {
                    # read when JAX started (backends/jax_env.py); GPU kernels only
                    "xla_gpu_deterministic_ops": "--xla_gpu_deterministic_ops=true"
                    in (xla_flags or ""),
                    "XLA_FLAGS": xla_flags,
                    "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                    "jax_enable_x64": bool(jax.config.jax_enable_x64),
                    "jax_platform": jax.default_backend(),
                }
            )
            if self.device == "gpu":
                device_name = jax.devices()[0].device_kind
        return {
            "name": self.name,
            "framework": f"keras/{KERAS_BACKEND}",
            "keras_backend": KERAS_BACKEND,
            "versions": versions,
            "device": self.device,
            "device_name": device_name,
            "determinism": determinism,
        }

    def seed(self, seed: int, deterministic: bool) -> None:
        self._seed = seed
        self._deterministic = deterministic
        if KERAS_BACKEND == "tensorflow" and deterministic:
            if self.device == "cpu":
                self._pin_threads()
            else:
                tf.config.experimental.enable_tensor_float_32_execution(False)
            tf.config.experimental.enable_op_determinism()
        elif KERAS_BACKEND == "torch":
            import torch

            # as backends/torch_backend.py; CUBLAS_WORKSPACE_CONFIG comes from torch_env
            torch.use_deterministic_algorithms(deterministic)
            torch.backends.cudnn.deterministic = deterministic
            torch.backends.cudnn.benchmark = not deterministic
            if deterministic:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
        elif KERAS_BACKEND == "jax":
            import jax

            # float32 matmuls and convolutions in full float32 on GPU (TF32 off, as above);
            # read when a function is traced, so before the first step
            jax.config.update("jax_default_matmul_precision", "highest" if deterministic else None)
        if KERAS_BACKEND != "tensorflow" and "tensorflow" not in sys.modules:
            # set_random_seed also seeds TensorFlow whenever it is importable: on Keras' other
            # backends that would load TensorFlow beside torch (the segfault REFERENCE.md notes)
            sys.modules["tensorflow"] = None  # type: ignore[assignment]
            try:
                keras.utils.set_random_seed(seed)
            finally:
                del sys.modules["tensorflow"]
        else:
            keras.utils.set_random_seed(seed)

    def _pin_threads(self) -> None:
        """Deterministic CPU mode: fixed intra- and inter-op pools of CPU_THREADS each, set before
        the first op (a pool size chosen at run time by TF could differ between machines)."""
        try:
            tf.config.threading.set_intra_op_parallelism_threads(CPU_THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(CPU_THREADS)
        except RuntimeError:
            # the runtime already started (e.g. several runs in one test process): record it
            intra = tf.config.threading.get_intra_op_parallelism_threads()
            inter = tf.config.threading.get_inter_op_parallelism_threads()
            if (intra, inter) != (CPU_THREADS, CPU_THREADS):
                self._thread_note = (
                    f"TensorFlow was already running: threads could not be set to {CPU_THREADS}; "
                    "results may differ across processes"
                )

    # -- model --------------------------------------------------------------------------------

    def build(self, model: Model, model_input: ModelInput) -> KerasHandle:
        size = model_input.image_size
        if isinstance(model, SequentialModel):
            inputs = keras.Input((size, size, model_input.channels), name="image")
            outputs, before, last = _stack(inputs, model.layers)
            net = keras.Model(inputs, outputs, name=model.name)
            features = keras.Model(inputs, before, name=f"{model.name}_features")
            handle = KerasHandle(net, model_input, model, features=features, last=last)
        elif isinstance(model, PretrainedModel):
            handle = self._build_pretrained(model, model_input)
        else:
            raise UserError(
                f"backend '{self.name}' builds kind: sequential and pretrained models; "
                f"'{model.name}' is kind: {model.kind} (run it with backend 'reference')"
            )
        handle.optimizer = _optimizer(model.train)
        handle.optimizer.build(handle.model.trainable_variables)
        handle.on_logits = model.train.loss.on_logits(last_layer(model))
        if KERAS_BACKEND == "tensorflow" and self.device == "gpu":
            tf.config.experimental.reset_memory_stats("GPU:0")
        return handle

    def _build_pretrained(self, model: PretrainedModel, model_input: ModelInput) -> KerasHandle:
        if model_input.channels != 3:
            raise UserError(
                f"model '{model.name}': base {model.base.name} needs 3 input channels; "
                f"got {model_input.channels}",
                "set data.channels: 3 (grayscale is replicated to RGB)",
            )
        entry = BASES[model.base.name]
        weights = resolve_weights(model.base.name, model.base.weights)
        size = model_input.image_size
        base = getattr(keras.applications, entry.constructor)(
            include_top=False, weights=weights, input_shape=(size, size, 3), name=model.base.name
        )
        inputs = keras.Input((size, size, 3), name="image")
        if model.base.frozen and not model.train.stages:
            base.trainable = False
            # training=False keeps the base's BatchNorm in inference mode even in a train step
            x = base(inputs, training=False)
        else:
            if model.train.stages:  # set_trainable switches it per stage
                base.trainable = False
            elif model.base.trainable_from is not None:
                _freeze_before(base, model.base.trainable_from)
            x = base(inputs)  # a BatchNorm with trainable=False runs in inference mode
        outputs, before, last = _stack(x, model.head)
        net = keras.Model(inputs, outputs, name=model.name)
        features = keras.Model(inputs, before, name=f"{model.name}_features")
        return KerasHandle(net, model_input, model, base, features=features, last=last)

    def set_trainable(self, handle: KerasHandle, frozen: bool, trainable_from: str | None
                      ) -> None:
        """layer.trainable as Keras' fine-tuning recipe sets it, then a new optimizer built on
        the new trainable variables and new train steps (Keras' recompile)."""
        base = handle.base
        if base is None:
            raise UserError(f"model '{handle.spec.name}' has no base: stages need one")
        base.trainable = not frozen  # sets every layer's flag
        if not frozen and trainable_from is not None:
            _freeze_before(base, trainable_from)
        handle.optimizer = _optimizer(handle.spec.train)  # type: ignore[arg-type]
        handle.optimizer.build(handle.model.trainable_variables)
        handle._steps.clear()
        handle._forward.clear()

    def count_params(self, handle: KerasHandle) -> ParamCounts:
        def size(weights: list[Any]) -> int:
            return int(sum(math.prod(w.shape) for w in weights))

        trainable = size(handle.model.trainable_weights)
        non_trainable = size(handle.model.non_trainable_weights)
        return ParamCounts(
            total=trainable + non_trainable, trainable=trainable, non_trainable=non_trainable
        )

    # -- input pipeline -----------------------------------------------------------------------

    def augment(
        self,
        images_uint8: np.ndarray,
        angle: np.ndarray,
        scale: np.ndarray,
        hflip: np.ndarray,
        vflip: np.ndarray,
    ) -> np.ndarray:
        """The on-device augmentation alone: uint8 (B, H, W) -> float32 (B, H, W) in [0, 255]."""
        images = np.asarray(images_uint8, dtype=np.uint8)
        n, h, w = images.shape
        mats = projective_matrices(angle, scale, hflip, vflip, h, w)
        x = keras.ops.cast(keras.ops.convert_to_tensor(images[..., None]), "float32")
        out = _transform(x, keras.ops.convert_to_tensor(mats))
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)[..., 0]

    # -- training -----------------------------------------------------------------------------

    def _make_step(
        self, handle: KerasHandle, augment: bool, gradients: bool
    ) -> Callable[..., tuple[Any, ...]]:
        """One training step (images uint8 (B, H, W), labels float32 (B,), matrices (B, 8)) ->
        (mean loss, training-mode probabilities (B,)[, gradients]), as framework tensors."""
        if KERAS_BACKEND == "torch":
            return self._make_step_torch(handle, augment, gradients)
        if KERAS_BACKEND == "jax":
            return self._make_step_jax(handle, augment, gradients)
        if KERAS_BACKEND != "tensorflow":
            raise UserError(
                f"backend '{self.name}': training is implemented for Keras on TensorFlow, "
                f"PyTorch and JAX only (build, count_params and predict work on {KERAS_BACKEND})",
                "use backend 'keras' (TensorFlow), 'keras-torch', 'keras-jax' or 'torch'",
            )
        model_input, optimizer = handle.model_input, handle.trainer()
        variables = handle.model.trainable_variables
        loss = handle.spec.train.loss  # type: ignore[union-attr]
        eps, smoothing, on_logits = loss.epsilon, loss.label_smoothing, handle.on_logits
        weighted = loss.class_weight is not None
        size = model_input.image_size

        @tf.function(
            jit_compile=False,
            input_signature=(
                tf.TensorSpec((None, size, size), tf.uint8),
                tf.TensorSpec((None,), tf.float32),
                tf.TensorSpec((None, 8), tf.float32),
                tf.TensorSpec((None,), tf.float32),
            ),
        )
        def step(images: Any, labels: Any, matrices: Any, weights: Any) -> tuple[Any, ...]:
            x = tf.cast(images, tf.float32)[..., None]
            if augment:
                x = _transform(x, matrices)
            x = _normalize(x, model_input)
            with tf.GradientTape() as tape:
                loss, probs = _loss_and_probs(
                    handle, x, labels, on_logits, eps, smoothing, weights if weighted else None
                )
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            # a separate trace: the training step itself stays the same graph without them
            return (loss, probs, grads) if gradients else (loss, probs)

        return step

    def _make_step_torch(
        self, handle: KerasHandle, augment: bool, gradients: bool
    ) -> Callable[..., tuple[Any, ...]]:
        """The same step on Keras' PyTorch backend: eager keras.ops forward, torch autograd.

        Keras Variables wrap torch Parameters (requires_grad = trainable); as Keras' own
        TorchTrainer.train_step: clear the grads, loss.backward(), optimizer.apply under no_grad.
        """
        import torch

        model_input, optimizer = handle.model_input, handle.trainer()
        variables = handle.model.trainable_variables
        loss_spec = handle.spec.train.loss  # type: ignore[union-attr]
        eps, smoothing, on_logits = loss_spec.epsilon, loss_spec.label_smoothing, handle.on_logits
        weighted = loss_spec.class_weight is not None
        ops = keras.ops

        def step(images: Any, labels: Any, matrices: Any, weights: Any) -> tuple[Any, ...]:
            with torch.no_grad():
                x = ops.cast(ops.convert_to_tensor(images), "float32")[..., None]
                if augment:
                    # affine_transform swaps entries of the transform in place: pass a copy
                    x = _transform(x, ops.convert_to_tensor(np.array(matrices, np.float32)))
                x = _normalize(x, model_input)
                y = ops.convert_to_tensor(labels, "float32")
                w = ops.convert_to_tensor(weights, "float32") if weighted else None
            for v in variables:
                v.value.grad = None
            loss, probs = _loss_and_probs(handle, x, y, on_logits, eps, smoothing, w)
            loss.backward()
            grads = [v.value.grad for v in variables]
            copies = [g.detach().clone() for g in grads] if gradients else None
            with torch.no_grad():
                optimizer.apply(grads, variables)
            if copies is not None:
                return loss.detach(), probs.detach(), copies
            return loss.detach(), probs.detach()

        return step

    def _make_step_jax(
        self, handle: KerasHandle, augment: bool, gradients: bool
    ) -> Callable[..., tuple[Any, ...]]:
        """The same step on Keras' JAX backend: Keras 3's stateless API under one jax.jit.

        As Keras' own JAXTrainer.train_step: a pure function of the variables' values
        (trainable; non-trainable: BatchNorm statistics, dropout seed states; the optimizer's),
        jax.value_and_grad of the forward and loss, optimizer.stateless_apply. The forward is
        the shared `_loss_and_probs` (it needs the features model and the last layer's
        pre-activation, not only model.call) inside the keras.StatelessScope that
        model.stateless_call opens, mapping the model's variables to the traced values; the
        scope returns the updated non-trainable values. After each step the new values are
        assigned to the Keras variables, so predict, get/set_weights, get/set_state and the
        learning rate (an optimizer variable, read as an input of each step) work unchanged.
        """
        import jax

        model_input, optimizer = handle.model_input, handle.trainer()
        trainable = handle.model.trainable_variables
        non_trainable = handle.model.non_trainable_variables
        opt_variables = optimizer.variables
        loss_spec = handle.spec.train.loss  # type: ignore[union-attr]
        eps, smoothing, on_logits = loss_spec.epsilon, loss_spec.label_smoothing, handle.on_logits
        weighted = loss_spec.class_weight is not None
        ops = keras.ops

        def forward(train_values: list[Any], other_values: list[Any], x: Any, y: Any,
                    w: Any) -> Any:
            mapping = [*zip(trainable, train_values, strict=True),
                       *zip(non_trainable, other_values, strict=True)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                loss, probs = _loss_and_probs(handle, x, y, on_logits, eps, smoothing,
                                              w if weighted else None)
            return loss, (probs, [scope.get_current_value(v) for v in non_trainable])

        value_and_grad = jax.value_and_grad(forward, has_aux=True)

        @jax.jit
        def pure_step(train_values: list[Any], other_values: list[Any], opt_values: list[Any],
                      images: Any, labels: Any, matrices: Any, weights: Any
                      ) -> tuple[Any, ...]:
            x = ops.cast(images, "float32")[..., None]
            if augment:
                x = _transform(x, matrices)
            x = _normalize(x, model_input)
            (loss, (probs, other_values)), grads = value_and_grad(
                train_values, other_values, x, labels, weights
            )
            train_values, opt_values = optimizer.stateless_apply(opt_values, grads, train_values)
            return loss, probs, train_values, other_values, opt_values, grads

        def step(images: Any, labels: Any, matrices: Any, weights: Any) -> tuple[Any, ...]:
            loss, probs, *values, grads = pure_step(
                [v.value for v in trainable], [v.value for v in non_trainable],
                [v.value for v in opt_variables], images, labels, matrices, weights,
            )
            for variables, new in zip((trainable, non_trainable, opt_variables), values,
                                      strict=True):
                for v, value in zip(variables, new, strict=True):
                    v.assign(value)
            return (loss, probs, grads) if gradients else (loss, probs)

        return step

    def train_step(
        self, handle: KerasHandle, batch: Batch, gradients: bool = False
    ) -> Callable[[], StepResult]:
        key = (batch.augment, gradients)
        step = handle._steps.get(key)
        if step is None:
            step = handle._steps[key] = self._make_step(handle, *key)
        size = handle.model_input.image_size
        mats = projective_matrices(batch.angle, batch.scale, batch.hflip, batch.vflip, size, size)
        weights = np.ones(len(batch.labels), np.float32) if batch.weights is None else batch.weights
        out = step(batch.images, np.asarray(batch.labels, np.float32), mats,
                   np.asarray(weights, np.float32))
        grads = None
        if gradients:
            names = {id(v): k for k, v in self._variables(handle).items()}
            variables = handle.model.trainable_variables
            grads = {names[id(v)]: np.array(keras.ops.convert_to_numpy(g))
                     for v, g in zip(variables, out[2], strict=True)}
        loss, probs = out[0], out[1]
        return lambda: StepResult(float(loss), keras.ops.convert_to_numpy(probs), grads)

    def gradients(self, handle: KerasHandle, batch: Batch, dtype: str = "float64"
                  ) -> dict[str, np.ndarray]:
        """The loss's gradient per trainable variable (neutral names) at the model's current
        weights, computed in `dtype` on a copy built with that floatx: no update, the model and
        its optimizer untouched. Weight-port parity's exact reference; no augmentation."""
        if batch.augment:
            raise ValueError("gradients(): augmentation is not supported (pass augment=False)")
        previous = keras.config.floatx(), keras.config.dtype_policy()
        keras.config.set_floatx(dtype)
        keras.config.set_dtype_policy(dtype)
        try:
            copy = self.build(handle.spec, handle.model_input)
        finally:
            keras.config.set_floatx(previous[0])
            keras.config.set_dtype_policy(previous[1])
        self.set_weights(copy, self.get_weights(handle))
        loss_spec = handle.spec.train.loss  # type: ignore[union-attr]
        ops = keras.ops
        x = _normalize(ops.cast(ops.convert_to_tensor(batch.images), dtype)[..., None],
                       copy.model_input)
        y = ops.convert_to_tensor(np.asarray(batch.labels, dtype))
        variables = copy.model.trainable_variables

        def loss() -> Any:
            return _loss_and_probs(copy, x, y, copy.on_logits, loss_spec.epsilon,
                                   loss_spec.label_smoothing)[0]

        if KERAS_BACKEND == "tensorflow":
            with tf.GradientTape() as tape:
                value = loss()
            grads = tape.gradient(value, variables)
        else:  # pragma: no cover - keras-torch
            for v in variables:
                v.value.grad = None
            with _float64_kept(dtype):
                loss().backward()
            grads = [v.value.grad for v in variables]
        names = {id(v): k for k, v in self._variables(copy).items()}
        return {names[id(v)]: np.array(keras.ops.convert_to_numpy(g))
                for v, g in zip(variables, grads, strict=True)}

    # -- inference ----------------------------------------------------------------------------

    def _forward_fn(self, handle: KerasHandle, logits: bool) -> Callable[[np.ndarray], Any]:
        """uint8 (B, H, W) -> (B,) in inference mode: the model's output, or its logits."""
        if logits in handle._forward:
            return handle._forward[logits]
        model, model_input = handle.model, handle.model_input

        def forward(images: Any) -> Any:
            x = _normalize(keras.ops.cast(images, "float32")[..., None], model_input)
            if logits:
                return _logits(handle, x, training=False)
            return keras.ops.reshape(model(x, training=False), (-1,))

        if KERAS_BACKEND == "tensorflow":
            size = model_input.image_size
            forward = tf.function(
                forward,
                jit_compile=False,
                input_signature=(tf.TensorSpec((None, size, size), tf.uint8),),
            )
        elif KERAS_BACKEND == "jax":
            forward = _jit_stateless(handle, forward)
        handle._forward[logits] = forward
        return forward

    def predict(
        self, handle: KerasHandle, images: np.ndarray, batch_size: int = 64, logits: bool = False
    ) -> np.ndarray:
        images = np.asarray(images)
        size = handle.model_input.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"predict wants uint8 (N, {size}, {size}); got {images.shape}")
        forward = self._forward_fn(handle, logits)
        out = [
            keras.ops.convert_to_numpy(forward(np.ascontiguousarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        if not out:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(out).astype(np.float64)

    def activations(self, handle: KerasHandle, images: np.ndarray) -> dict[str, np.ndarray]:
        model = handle.model
        x = _normalize(
            keras.ops.cast(keras.ops.convert_to_tensor(np.asarray(images)), "float32")[..., None],
            handle.model_input,
        )
        out: dict[str, np.ndarray] = {}
        blocks = [] if handle.base is None else _base_blocks(handle.base)
        if handle.base is not None and blocks:  # a base without block tensors: its output only
            base, base_name = handle.base, handle.spec.base.name  # type: ignore[union-attr]
            probe = keras.Model(base.inputs, [base.get_layer(n).output for n in blocks])
            values = probe(x, training=False)
            for name, value in zip(blocks, values, strict=True):
                out[f"{base_name}/{name}"] = value
        h = x
        for layer in model.layers[1:]:  # after the input; the model is a linear stack
            h = layer(h, training=False)
            out[handle.spec.base.name if layer is handle.base else layer.name] = h  # type: ignore[union-attr]
        return {k: np.asarray(keras.ops.convert_to_numpy(v), np.float64) for k, v in out.items()}

    def get_learning_rate(self, handle: KerasHandle) -> float:
        return float(keras.ops.convert_to_numpy(handle.trainer().learning_rate))

    def set_learning_rate(self, handle: KerasHandle, learning_rate: float) -> None:
        handle.trainer().learning_rate.assign(learning_rate)

    # -- neutral weights ----------------------------------------------------------------------

    def _variables(self, handle: KerasHandle) -> dict[str, Any]:
        """Every variable by its neutral name (backends/base.py): Keras' own layout."""
        out: dict[str, Any] = {}
        for layer in handle.model.layers:
            if layer is handle.base:
                for sub in layer.layers:
                    for v in sub.weights:
                        out[f"{handle.spec.base.name}/{sub.name}/{v.name}"] = v  # type: ignore[union-attr]
            else:
                for v in layer.weights:
                    out[f"{layer.name}/{v.name}"] = v
        return out

    def get_weights(self, handle: KerasHandle) -> dict[str, np.ndarray]:
        variables = self._variables(handle).items()
        return {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in variables}

    def set_weights(self, handle: KerasHandle, weights: dict[str, np.ndarray]) -> None:
        variables = self._variables(handle)
        check_weights({k: tuple(v.shape) for k, v in variables.items()}, weights, self.name)
        for k, v in variables.items():
            v.assign(np.asarray(weights[k], dtype=v.dtype))

    # -- training state (resume) -------------------------------------------------------------

    @staticmethod
    def _state_variables(handle: KerasHandle) -> dict[str, Any]:
        """model.variables (weights, BatchNorm statistics, dropout seed-generator states) and
        the optimizer's (iterations, learning rate, moments), in their fixed build order."""
        model = {f"model/{i}/{v.name}": v for i, v in enumerate(handle.model.variables)}
        opt = {f"optimizer/{i}/{v.name}": v for i, v in enumerate(handle.trainer().variables)}
        return {**model, **opt}

    def get_state(self, handle: KerasHandle) -> dict[str, np.ndarray]:
        variables = self._state_variables(handle).items()
        state = {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in variables}
        if KERAS_BACKEND == "torch":
            # Keras' torch dropout without an explicit seed draws from torch's global generator
            import torch

            state["torch_rng"] = torch.get_rng_state().numpy().copy()
        return state

    def set_state(self, handle: KerasHandle, state: dict[str, np.ndarray]) -> None:
        variables = self._state_variables(handle)
        expected = {k: tuple(v.shape) for k, v in variables.items()}
        if KERAS_BACKEND == "torch":
            import torch

            expected["torch_rng"] = tuple(torch.get_rng_state().shape)
        check_weights(expected, state, self.name)
        for k, v in variables.items():
            v.assign(np.asarray(state[k], dtype=v.dtype))
        if KERAS_BACKEND == "torch":
            torch.set_rng_state(torch.from_numpy(np.asarray(state["torch_rng"], np.uint8)))

    def peak_memory(self) -> dict[str, Any]:
        if KERAS_BACKEND == "tensorflow" and self.device == "gpu":
            return {"tf_peak_bytes": int(tf.config.experimental.get_memory_info("GPU:0")["peak"])}
        if KERAS_BACKEND == "jax" and self.device == "gpu":
            import jax

            # None where the device keeps no statistics: reported as not measured
            peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
            return {} if peak is None else {"jax_peak_bytes": int(peak)}
        return {}
