"""The Keras 3 backend: builds spec models with keras.layers / keras.applications and trains them.

    backend = registry.create("keras", device="auto")   # or "keras-torch", "keras-jax"
    backend.seed(0, deterministic=True)
    handle = backend.build(spec.model("cnn"), ModelInput(224, 3, "rescale"))
    history = backend.fit(handle, train, val, spec.model("cnn").train, on_epoch=print)
    probs = backend.predict(handle, test_images)

Model building, counting and prediction are written with keras.layers / keras.ops and run on any
Keras backend. Training takes the harness's uint8 batch and the per-sample augmentation matrices
and does, on the device, augmentation -> normalization -> channel replication -> forward -> BCE ->
optimizer update, and returns the loss and the training-mode probabilities (for the history
metrics). On TensorFlow the step is a compiled `tf.function` (GradientTape); on Keras' PyTorch
backend (`keras-torch`) it runs eagerly with torch autograd on the Keras variables, as Keras' own
TorchTrainer does (`_train_step_torch`). Forward and loss (`_loss_and_probs`), normalization,
optimizer and the epoch loop are shared. JAX (`keras-jax`) builds and predicts only.

Loss (harness.spec.Loss): with `form: auto` and a model whose last layer ends in a sigmoid, BCE is
computed from the pre-sigmoid logits, as Keras 3 on TensorFlow does (the sigmoid's output carries
`_keras_logits` and `binary_crossentropy` switches to `sigmoid_cross_entropy_with_logits`). The
model itself is unchanged (same layers, counts and probabilities): `build` also makes a `features`
model that shares its layers and stops before the last one, and `_logits` applies the last
layer's pre-activation (Dense: x W + b; Activation: identity) to it. Otherwise (`form:
probabilities`, or another last layer) BCE is on probabilities clipped to [eps, 1 - eps].
The validation loss in the history uses the same per-sample function as training (inference
mode, float32 in the framework, averaged in float64).

Augmentation (semantics in harness/data/augment.py): flip, rotate counter-clockwise by `angle`
about the centre, zoom by `scale` about the centre. Each sample's inverse map (output pixel ->
input pixel) is one 3x3 projective matrix, passed as its 8 leading entries to
`ImageProjectiveTransformV3` (bilinear, constant fill 0), whose pixel centres sit at integer
indices like the numpy oracle's. See `projective_matrices`. Other Keras backends use
keras.ops.image.affine_transform, which takes the same 8 parameters with the same conventions
(bilinear, each out-of-image neighbour read as 0); on torch it is within 2e-3 of the oracle.

Determinism on CPU (REFERENCE.md: op determinism alone is not bit-identical across processes with
oneDNN on 2 threads): `seed(..., deterministic=True)` also runs TensorFlow on one intra-op and one
inter-op thread, set through tf.config before the first op. Chosen over TF_ENABLE_ONEDNN_OPTS=0
because it is cheaper (REFERENCE.md: 1.6x vs 2.5x on the CNN) and needs nothing before import.
Measured with tests/benchmarks/test_bench_keras.py (paper CNN, batch 32, 224 px, 2 cores): about
64 -> 33 images/s, i.e. 1.95x. On GPU: op determinism plus TF32 off; threads are left alone.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from backends.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    EpochRecord,
    EvalData,
    ModelInput,
    TrainData,
    bce,
    epoch_metrics,
)
from harness.errors import UserError
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

KERAS_BACKEND = keras.backend.backend()
_NAMES = {"tensorflow": "keras", "torch": "keras-torch", "jax": "keras-jax"}

if KERAS_BACKEND == "tensorflow":
    import tensorflow as tf
else:  # pragma: no cover - exercised only under KERAS_BACKEND=torch|jax
    tf = None


# ---------------------------------------------------------------------------------------------
# Spec layers -> Keras layers: one table. Every parameter comes from the spec.


def _conv2d(layer: Conv2D, name: str) -> keras.layers.Layer:
    return keras.layers.Conv2D(
        filters=layer.filters,
        kernel_size=layer.kernel,
        strides=layer.strides,
        padding=layer.padding,
        activation=layer.activation,
        use_bias=layer.use_bias,
        kernel_initializer=layer.kernel_initializer,
        bias_initializer=layer.bias_initializer,
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
    return keras.layers.AveragePooling2D(
        pool_size=layer.pool, strides=layer.strides or layer.pool, padding=layer.padding, name=name
    )


def _dropout(layer: Dropout, name: str) -> keras.layers.Layer:
    return keras.layers.Dropout(rate=layer.rate, name=name)


def _flatten(layer: Flatten, name: str) -> keras.layers.Layer:
    return keras.layers.Flatten(data_format="channels_last", name=name)


def _global_avg_pool(layer: GlobalAvgPool, name: str) -> keras.layers.Layer:
    return keras.layers.GlobalAveragePooling2D(data_format="channels_last", name=name)


def _dense(layer: Dense, name: str) -> keras.layers.Layer:
    return keras.layers.Dense(
        units=layer.units,
        activation=layer.activation,
        use_bias=layer.use_bias,
        kernel_initializer=layer.kernel_initializer,
        bias_initializer=layer.bias_initializer,
        name=name,
    )


def _activation(layer: ActivationLayer, name: str) -> keras.layers.Layer:
    return keras.layers.Activation(layer.activation, name=name)


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
        raise ValueError(
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
    assert last is not None  # the spec requires at least one layer
    return x, before, last


# ---------------------------------------------------------------------------------------------
# Pretrained bases: one table (keras.applications constructor, no-top weights file, origin, md5)

_APPS = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class BaseEntry:
    constructor: str  # attribute of keras.applications
    weights_file: str
    origin: str
    md5: str


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
}


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
                    file_hash=entry.md5,
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
        mean = np.asarray(IMAGENET_MEAN[: model_input.channels], dtype=np.float32)
        std = np.asarray(IMAGENET_STD[: model_input.channels], dtype=np.float32)
        x = (x - mean) / std
    elif model_input.normalization not in ("rescale", "none"):
        raise ValueError(
            f"unknown normalization '{model_input.normalization}'; known: rescale, imagenet, none"
        )
    return x


def _bce(labels: Any, probs: Any, epsilon: float, label_smoothing: float) -> Any:
    """Per-sample BCE on probabilities clipped to [eps, 1 - eps] (Keras' formula, explicit).

    Written out rather than keras.losses.BinaryCrossentropy because Keras on TensorFlow
    silently switches to the sigmoid's logits when the output comes from a sigmoid layer: which
    form is used is the spec's choice (`Loss.form`), see `_bce_logits`.
    """
    ops = keras.ops
    y = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    p = ops.clip(probs, epsilon, 1.0 - epsilon)
    return -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))


def _bce_logits(labels: Any, logits: Any, label_smoothing: float) -> Any:
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
    _predict_fn: Any = field(default=None, repr=False)
    _val_fn: Any = field(default=None, repr=False)

    @property
    def last_spec_layer(self) -> Layer:
        spec = self.spec
        return spec.layers[-1] if isinstance(spec, SequentialModel) else spec.head[-1]  # type: ignore[union-attr]


def _logits(handle: KerasHandle, x: Any, training: bool) -> Any:
    """The model's output before its final sigmoid, shape (B,); same layers and weights.

    Dense: x W (+ b), exactly Dense.call's ops before its activation; Activation: its input.
    sigmoid of this equals the model's output (the same ops in the same order).
    """
    ops = keras.ops
    assert handle.features is not None, "the handle was not made by KerasBackend.build"
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
    handle: KerasHandle, x: Any, labels: Any, on_logits: bool, epsilon: float, smoothing: float
) -> tuple[Any, Any]:
    """Training-mode forward: (mean BCE, probabilities (B,)), in keras.ops (any backend)."""
    ops = keras.ops
    if on_logits:  # Keras 3 on TF: BCE from the sigmoid's logits
        logits = _logits(handle, x, training=True)
        return ops.mean(_bce_logits(labels, logits, smoothing)), ops.sigmoid(logits)
    probs = ops.reshape(handle.model(x, training=True), (-1,))
    return ops.mean(_bce(labels, probs, epsilon, smoothing)), probs


OPTIMIZERS: dict[str, Callable[[Any], keras.optimizers.Optimizer]] = {
    "adam": lambda o: keras.optimizers.Adam(
        learning_rate=o.learning_rate,
        beta_1=o.beta_1,
        beta_2=o.beta_2,
        epsilon=o.epsilon,
        amsgrad=o.amsgrad,
    ),
    "sgd": lambda o: keras.optimizers.SGD(
        learning_rate=o.learning_rate, momentum=o.momentum, nesterov=o.nesterov
    ),
}

# The backend's tables by vocabulary category (checked against the vocabulary by the tests).
TABLES: dict[str, Mapping[str, Any]] = {"layers": LAYERS, "bases": BASES, "optimizers": OPTIMIZERS}


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
    """Keras 3; training on TensorFlow and PyTorch, building/counting/predicting on any."""

    name = _NAMES.get(KERAS_BACKEND, f"keras-{KERAS_BACKEND}")

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        if device not in ("auto", "cpu", "gpu"):
            raise UserError(f"device must be one of auto, cpu, gpu; got '{device}'")
        self._deterministic = False
        self._seed: int | None = None
        self._thread_note: str | None = None
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
                self._single_thread()
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
        keras.utils.set_random_seed(seed)

    def _single_thread(self) -> None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            # the runtime already started (e.g. several runs in one test process): record it
            intra = tf.config.threading.get_intra_op_parallelism_threads()
            inter = tf.config.threading.get_inter_op_parallelism_threads()
            if (intra, inter) != (1, 1):
                self._thread_note = (
                    "TensorFlow was already running: threads could not be set to 1; results may "
                    "differ across processes"
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
            raise ValueError(
                f"the keras backend builds kind sequential and pretrained models; "
                f"'{model.name}' is kind {model.kind} (run it with backend 'reference')"
            )
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
            include_top=False, weights=weights, input_shape=(size, size, 3)
        )
        inputs = keras.Input((size, size, 3), name="image")
        if model.base.frozen:
            base.trainable = False
            # training=False keeps the base's BatchNorm in inference mode even in a train step
            x = base(inputs, training=False)
        else:
            x = base(inputs)
        outputs, before, last = _stack(x, model.head)
        net = keras.Model(inputs, outputs, name=model.name)
        features = keras.Model(inputs, before, name=f"{model.name}_features")
        return KerasHandle(net, model_input, model, base, features=features, last=last)

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

    def _train_step(
        self, handle: KerasHandle, recipe: TrainSpec, augment: bool
    ) -> tuple[Callable[..., Any], keras.optimizers.Optimizer]:
        """One training step (images uint8 (B, H, W), labels float32 (B,), matrices (B, 8)) ->
        (mean loss, training-mode probabilities (B,)), as framework tensors."""
        if KERAS_BACKEND == "torch":
            return self._train_step_torch(handle, recipe, augment)
        if KERAS_BACKEND != "tensorflow":
            raise UserError(
                f"backend '{self.name}': training is implemented for Keras on TensorFlow and "
                f"PyTorch only (build, count_params and predict work on {KERAS_BACKEND})",
                "use backend 'keras' (TensorFlow), 'keras-torch' or 'torch'",
            )
        model, model_input = handle.model, handle.model_input
        optimizer = _optimizer(recipe)
        variables = model.trainable_variables
        optimizer.build(variables)
        eps, smoothing = recipe.loss.epsilon, recipe.loss.label_smoothing
        on_logits = recipe.loss.on_logits(handle.last_spec_layer)
        size = model_input.image_size

        @tf.function(
            jit_compile=False,
            input_signature=(
                tf.TensorSpec((None, size, size), tf.uint8),
                tf.TensorSpec((None,), tf.float32),
                tf.TensorSpec((None, 8), tf.float32),
            ),
        )
        def step(images: Any, labels: Any, matrices: Any) -> tuple[Any, Any]:
            x = tf.cast(images, tf.float32)[..., None]
            if augment:
                x = _transform(x, matrices)
            x = _normalize(x, model_input)
            with tf.GradientTape() as tape:
                loss, probs = _loss_and_probs(handle, x, labels, on_logits, eps, smoothing)
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return loss, probs

        return step, optimizer

    def _train_step_torch(
        self, handle: KerasHandle, recipe: TrainSpec, augment: bool
    ) -> tuple[Callable[..., Any], keras.optimizers.Optimizer]:
        """The same step on Keras' PyTorch backend: eager keras.ops forward, torch autograd.

        Keras Variables wrap torch Parameters (requires_grad = trainable); as Keras' own
        TorchTrainer.train_step: clear the grads, loss.backward(), optimizer.apply under no_grad.
        """
        import torch

        model, model_input = handle.model, handle.model_input
        optimizer = _optimizer(recipe)
        variables = model.trainable_variables
        optimizer.build(variables)
        eps, smoothing = recipe.loss.epsilon, recipe.loss.label_smoothing
        on_logits = recipe.loss.on_logits(handle.last_spec_layer)
        ops = keras.ops

        def step(images: Any, labels: Any, matrices: Any) -> tuple[Any, Any]:
            with torch.no_grad():
                x = ops.cast(ops.convert_to_tensor(images), "float32")[..., None]
                if augment:
                    # affine_transform swaps entries of the transform in place: pass a copy
                    x = _transform(x, ops.convert_to_tensor(np.array(matrices, np.float32)))
                x = _normalize(x, model_input)
                y = ops.convert_to_tensor(labels, "float32")
            for v in variables:
                v.value.grad = None
            loss, probs = _loss_and_probs(handle, x, y, on_logits, eps, smoothing)
            loss.backward()
            grads = [v.value.grad for v in variables]
            with torch.no_grad():
                optimizer.apply(grads, variables)
            return loss.detach(), probs.detach()

        return step, optimizer

    def fit(
        self,
        handle: KerasHandle,
        train: TrainData,
        val: EvalData | None,
        recipe: TrainSpec,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        size = handle.model_input.image_size
        if train.images.shape[1:] != (size, size):
            raise ValueError(
                f"training images are {train.images.shape[1:]}; the model was built for "
                f"{(size, size)}"
            )
        step, _ = self._train_step(handle, recipe, train.augmentation.enabled)
        history: list[EpochRecord] = []
        for epoch in range(1, recipe.epochs + 1):
            t_epoch = time.perf_counter()
            first_step: float | None = None
            losses: list[tuple[Any, int]] = []
            probs: list[Any] = []
            labels: list[np.ndarray] = []
            for i, batch in enumerate(train.batches(epoch, recipe.batch_size)):
                mats = projective_matrices(
                    batch.angle, batch.scale, batch.hflip, batch.vflip, size, size
                )
                t_step = time.perf_counter()
                loss, p = step(batch.images, batch.labels.astype(np.float32), mats)
                if epoch == 1 and i == 0:
                    float(loss)  # wait for it: this step's time includes tracing
                    first_step = time.perf_counter() - t_step
                if i > 0:
                    # checked one step behind so the device is never idle waiting for the host
                    self._check_finite(losses[-1][0], epoch, i)
                losses.append((loss, len(batch.labels)))
                probs.append(p)
                labels.append(batch.labels)
            if losses:
                self._check_finite(losses[-1][0], epoch, len(losses))
            train_seconds = time.perf_counter() - t_epoch
            y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
            p_all = (
                np.concatenate([keras.ops.convert_to_numpy(p) for p in probs])
                if probs
                else np.zeros(0)
            )
            n = len(y)
            mean_loss = sum(float(l_) * k for l_, k in losses) / n if n else float("nan")
            metrics = epoch_metrics(y, p_all)
            v_loss = v_acc = v_rec = v_prec = None
            if val is not None and len(val.labels):
                v_loss, v_probs = self.evaluate_loss(
                    handle, val.images, val.labels, recipe, batch_size=max(recipe.batch_size, 64)
                )
                vm = epoch_metrics(val.labels, v_probs)
                v_acc, v_rec, v_prec = vm["accuracy"], vm["recall"], vm["precision"]
            record = EpochRecord(
                epoch=epoch,
                loss=mean_loss,
                accuracy=metrics["accuracy"],
                recall=metrics["recall"],
                precision=metrics["precision"],
                val_loss=v_loss,
                val_accuracy=v_acc,
                val_recall=v_rec,
                val_precision=v_prec,
                seconds=time.perf_counter() - t_epoch,
                train_seconds=train_seconds,
                images=n,
                first_step_seconds=first_step,
            )
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return history

    @staticmethod
    def _check_finite(loss: Any, epoch: int, step: int) -> None:
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"loss became NaN at epoch {epoch} step {step}")

    def evaluate_loss(
        self,
        handle: KerasHandle,
        images: np.ndarray,
        labels: np.ndarray,
        recipe: TrainSpec,
        batch_size: int = 64,
    ) -> tuple[float, np.ndarray]:
        """(mean BCE, probabilities) in inference mode: the validation loss of the history.

        With the logits form, the per-sample loss is `_bce_logits` on the model's logits (the
        training step's function, float32 in the framework); otherwise the harness's clipped
        float64 `bce` on the probabilities `predict` returns.
        """
        loss = recipe.loss
        smoothing = loss.label_smoothing
        if not loss.on_logits(handle.last_spec_layer):
            probs = self.predict(handle, images, batch_size)
            y = np.asarray(labels, np.float64) * (1 - smoothing) + 0.5 * smoothing
            return bce(y, probs, loss.epsilon), probs
        images = np.asarray(images)
        size = handle.model_input.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"evaluate_loss wants uint8 (N, {size}, {size}); got {images.shape}")
        forward = self._val_forward(handle)
        labels32 = np.asarray(labels, np.float32)
        per_sample: list[np.ndarray] = []
        probs_out: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            logits = forward(np.ascontiguousarray(images[i : i + batch_size]))
            y = keras.ops.convert_to_tensor(labels32[i : i + batch_size])
            per_sample.append(keras.ops.convert_to_numpy(_bce_logits(y, logits, smoothing)))
            probs_out.append(keras.ops.convert_to_numpy(keras.ops.sigmoid(logits)))
        if not per_sample:
            return float("nan"), np.zeros(0, dtype=np.float64)
        losses = np.concatenate(per_sample).astype(np.float64)
        return float(np.mean(losses)), np.concatenate(probs_out).astype(np.float64)

    def _val_forward(self, handle: KerasHandle) -> Callable[[np.ndarray], Any]:
        if handle._val_fn is not None:
            return handle._val_fn
        model_input = handle.model_input

        def forward(images: Any) -> Any:
            x = keras.ops.cast(images, "float32")[..., None]
            return _logits(handle, _normalize(x, model_input), training=False)

        if KERAS_BACKEND == "tensorflow":
            size = model_input.image_size
            forward = tf.function(
                forward,
                jit_compile=False,
                input_signature=(tf.TensorSpec((None, size, size), tf.uint8),),
            )
        handle._val_fn = forward
        return forward

    # -- inference ----------------------------------------------------------------------------

    def _predictor(self, handle: KerasHandle) -> Callable[[np.ndarray], Any]:
        if handle._predict_fn is not None:
            return handle._predict_fn
        model, model_input = handle.model, handle.model_input

        def forward(images: Any) -> Any:
            x = keras.ops.cast(images, "float32")[..., None]
            x = _normalize(x, model_input)
            return keras.ops.reshape(model(x, training=False), (-1,))

        if KERAS_BACKEND == "tensorflow":
            size = model_input.image_size
            forward = tf.function(
                forward,
                jit_compile=False,
                input_signature=(tf.TensorSpec((None, size, size), tf.uint8),),
            )
        handle._predict_fn = forward
        return forward

    def predict(self, handle: KerasHandle, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        images = np.asarray(images)
        size = handle.model_input.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"predict wants uint8 (N, {size}, {size}); got {images.shape}")
        forward = self._predictor(handle)
        out = [
            keras.ops.convert_to_numpy(forward(np.ascontiguousarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        if not out:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate(out).astype(np.float64)

    def peak_memory(self) -> dict[str, Any]:
        if KERAS_BACKEND == "tensorflow" and self.device == "gpu":
            return {"tf_peak_bytes": int(tf.config.experimental.get_memory_info("GPU:0")["peak"])}
        return {}
