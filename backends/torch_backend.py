"""The `torch` backend: PyTorch + torchvision with Keras semantics made explicit.

    python -m harness run specs/paper.yaml --backends torch      # via the worker
    backend = TorchBackend(device="auto")
    handle = backend.build(model, ModelInput(224, 3, "rescale"))

Builds any spec model (one table maps a spec layer type to a builder), trains it on the harness's
data stream, and returns numpy. Where PyTorch's defaults differ from Keras', the spec (= Keras
semantics) wins:

- Layout: channels-first internally (NCHW tensors, optionally in channels_last memory format,
  which changes strides, not semantics). `Flatten` permutes to NHWC before flattening, so the
  Dense layer after it sees Keras' feature order and Keras-layout weights port 1:1 (only the
  usual kernel transposes are needed, no row permutation).
- Padding 'same' follows TensorFlow: total = max((ceil(n/s) - 1) s + k - n, 0), with the odd
  pixel at the bottom/right. Symmetric cases use the layer's own `padding=`; asymmetric ones pad
  explicitly first (zeros for conv, -inf for max pooling). Average pooling excludes the padding
  from the divisor, as TF does. 'valid' pools floor.
- Initializers by name, Keras' VarianceScaling: fans of a conv kernel are k_h k_w c_in and
  k_h k_w c_out; the *_normal ones are truncated at 2 sd with the sd divided by 0.8796... (Keras'
  correction). Biases use the spec's initializer (zeros by default), never torch's uniform.
- BatchNorm: epsilon from the spec, momentum converted (torch = 1 - Keras); `center`/`scale`
  false drop beta/gamma. torch updates the running variance with the unbiased batch variance,
  Keras with the biased one: a factor n/(n-1) over n = batch x H x W values (1.000001 for the
  paper's CNN, 1.03 for a BatchNorm after a Dense layer at batch 32).
- Pretrained bases: torchvision's feature extractor (+ the ReLU DenseNet's forward() applies
  after norm5, which Keras' base includes). `weights: imagenet` loads only from torchvision's
  cache ($TORCH_HOME/hub/checkpoints; no download is attempted); `none` keeps torchvision's own
  random init (what `weights=None` gives); a path loads a local state dict (old DenseNet key
  names are renamed as torchvision does). A frozen base has requires_grad False AND stays in
  eval mode while the model trains, so its BatchNorm statistics never move (Keras' trainable=False).
  The base's BatchNorm momentum is set to Keras' 0.99 (matters only for `frozen: false`), and
  DenseNet's and ResNet's epsilon to Keras' 1.001e-5 (torchvision: 1e-5).
- Loss (harness.spec.Loss), labels smoothed as y (1 - ls) + ls / 2: with `form: auto` and a model
  whose last layer ends in a sigmoid, BCE from the pre-sigmoid logits (F.binary_cross_entropy_
  with_logits, `bce_logits_loss`), which is what Keras 3 on TensorFlow computes for a sigmoid
  output; otherwise on the probabilities clipped to [eps, 1 - eps] (`bce_loss`). The model is
  unchanged: `TorchNet.logits` runs it without its final sigmoid; predictions are probabilities
  (`predict(..., logits=True)` gives the logits, from which the loop computes the validation loss).
- Adam: Keras 3 computes `alpha m / (sqrt(v) + eps)` with alpha = lr sqrt(1 - b2^t) / (1 - b1^t);
  torch computes `lr m_hat / (sqrt(v_hat) + eps)`. They are the same update when torch's epsilon
  at step t is eps / sqrt(1 - b2^t); `KerasAdam` sets that before every step, so the two differ
  only by float rounding. SGD's momentum forms are algebraically identical at constant lr.
- Augmentation runs on the device: flips exactly (torch.flip), rotation + zoom with
  F.affine_grid / F.grid_sample (bilinear, zeros, align_corners=True, which puts pixel centres
  at integer indices and the centre at ((W-1)/2, (H-1)/2), as harness/data/augment.py defines).
- Preprocessing (normalization, channel replication) happens before the model, not inside it,
  so parameter counts equal the paper's.
"""

from __future__ import annotations

import copy
import io
import math
import os
import platform
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from backends.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backend,
    BackendInfo,
    Batch,
    ModelInput,
    StepResult,
    check_weights,
)
from backends.loop import last_layer
from backends.torch_env import PRE_IMPORT_ENV, THREADS_ENV
from harness.base_layers import BASE_LAYERS, first_trainable
from harness.errors import UserError
from harness.spec import (
    SGD,
    ActivationLayer,
    Adam,
    AdamW,
    BaseNet,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Loss,
    Model,
    ParamCounts,
    Pool2D,
    PretrainedModel,
    RMSprop,
    SequentialModel,
)
from harness.vocab import NORMALIZATIONS

Shape = tuple[int, ...]  # channels-first, no batch axis: (C, H, W) or (F,)

# ---------------------------------------------------------------------------------------------
# Activations and initializers (one table each)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": lambda: nn.Softmax(dim=1),  # the channel axis = Keras' last axis
    "elu": lambda: nn.ELU(alpha=1.0),
    "selu": nn.SELU,
    "gelu": lambda: nn.GELU(approximate="none"),  # keras.activations.gelu: exact erf form
    "swish": nn.SiLU,
}

# Keras' truncated normal keeps 2 sd and divides the sd by this to restore the variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def keras_fans(t: torch.Tensor) -> tuple[int, int]:
    """Keras' compute_fans for a torch-layout tensor (Linear (out, in), Conv (out, in, kh, kw))."""
    if t.dim() == 0:
        return 1, 1
    if t.dim() == 1:
        return t.shape[0], t.shape[0]
    receptive = math.prod(t.shape[2:])
    return t.shape[1] * receptive, t.shape[0] * receptive


def _variance_scaling(scale: float, mode: str, distribution: str) -> Callable[[torch.Tensor], None]:
    def init(t: torch.Tensor) -> None:
        fan_in, fan_out = keras_fans(t)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(1.0, fan)
        with torch.no_grad():
            if distribution == "uniform":
                limit = math.sqrt(3.0 * variance)
                nn.init.uniform_(t, -limit, limit)
            else:
                std = math.sqrt(variance) / _TRUNCATED_NORMAL_STD
                nn.init.trunc_normal_(t, 0.0, std, -2.0 * std, 2.0 * std)

    return init


INITIALIZERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),  # = xavier_uniform_
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "lecun_uniform": _variance_scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
    "zeros": nn.init.zeros_,
    "ones": nn.init.ones_,
}


def _lookup(table: dict[str, Any], key: str, what: str) -> Any:
    try:
        return table[key]
    except KeyError:
        known = ", ".join(table)
        raise UserError(f"torch backend: unknown {what} '{key}'; known: {known}") from None


def _initialize(t: torch.Tensor, name: str) -> None:
    _lookup(INITIALIZERS, name, "initializer")(t)


# ---------------------------------------------------------------------------------------------
# Layers with Keras semantics


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) along one axis: the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _window(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class KerasConv2d(nn.Conv2d):
    """Conv2d + activation; `pad` (left, right, top, bottom) is applied first when asymmetric."""

    def __init__(self, *args: Any, pad: tuple[int, int, int, int] | None, activation: str,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pad = pad
        self.act = _lookup(ACTIVATIONS, activation, "activation")()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(super().forward(x))


class KerasDense(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.act = _lookup(ACTIVATIONS, activation, "activation")()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class KerasPool2d(nn.Module):
    """Max/average pooling with TF padding: -inf pads for max, padding excluded from averages."""

    def __init__(self, kind: str, kernel: tuple[int, int], stride: tuple[int, int],
                 pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.kind, self.kernel, self.stride, self.pad = kind, kernel, stride, pad
        left, right, top, bottom = pad
        # torch's own padding= is symmetric and limited to half the window: use it when it fits
        self.native = (left == right and top == bottom and 2 * left <= kernel[1]
                       and 2 * top <= kernel[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            if self.native:
                return F.max_pool2d(x, self.kernel, self.stride, (self.pad[2], self.pad[0]))
            return F.max_pool2d(F.pad(x, self.pad, value=-math.inf), self.kernel, self.stride)
        if self.native:
            return F.avg_pool2d(x, self.kernel, self.stride, (self.pad[2], self.pad[0]),
                                count_include_pad=False)
        total = F.avg_pool2d(F.pad(x, self.pad), self.kernel, self.stride)
        ones = x.new_ones((1, 1, *x.shape[2:]))
        return total / F.avg_pool2d(F.pad(ones, self.pad), self.kernel, self.stride)

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}"


class BatchNorm2dNCHW(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are computed on an NCHW copy of a
    channels_last input. torch's CPU kernel for channels_last float32 input is 30-300x less
    precise (normalized output 1.5e-5 .. 3e-5 relative from float64, NCHW 5e-8 .. 2e-7):
    enough to flip the winner of near-tied max-pool windows below it, which moved the paper
    CNN's step-1 gradients by 2e-3 (parity check; the report's investigation). Inference
    (running statistics, no reduction) keeps the input's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.dim() == 4 and not x.is_contiguous():
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class PartialBatchNorm(nn.Module):
    """BatchNorm without beta (center: false) and/or gamma (scale: false), as Keras allows."""

    def __init__(self, channels: int, rank: int, eps: float, momentum: float, center: bool,
                 scale: bool) -> None:
        super().__init__()
        cls = BatchNorm2dNCHW if rank == 3 else nn.BatchNorm1d
        self.bn = cls(channels, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(channels)) if scale else None
        self.bias = nn.Parameter(torch.zeros(channels)) if center else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            x = x * self.weight.view(view)
        if self.bias is not None:
            x = x + self.bias.view(view)
        return x


class FlattenNHWC(nn.Module):
    """Keras' Flatten order (channels last), whatever the tensor's memory format."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1)


class GlobalAvgPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W: unlike adaptive_avg_pool2d, its CUDA backward is deterministic
        return x.mean(dim=(2, 3))


def _need_image(layer: Any, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise UserError(f"{layer.type} needs an image input (H, W, C); got a flat input {shape}")
    return shape  # type: ignore[return-value]


def _build_conv(layer: Conv2D, shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = _need_image(layer, shape)
    (kh, kw), (sh, sw) = layer.kernel, layer.strides
    if layer.padding == "same":
        (top, bottom), (left, right) = same_padding(h, kh, sh), same_padding(w, kw, sw)
        symmetric = top == bottom and left == right
        padding, pad = ((top, left), None) if symmetric else ((0, 0), (left, right, top, bottom))
        out = (-(-h // sh), -(-w // sw))
    else:
        padding, pad, out = (0, 0), None, (_window(h, kh, sh), _window(w, kw, sw))
    if min(out) < 1:
        raise UserError(f"conv2d kernel {layer.kernel} is larger than its input {(h, w)}")
    conv = KerasConv2d(c, layer.filters, (kh, kw), stride=(sh, sw), padding=padding,
                       bias=layer.use_bias, pad=pad, activation=layer.activation)
    _initialize(conv.weight, layer.kernel_initializer)
    if conv.bias is not None:
        _initialize(conv.bias, layer.bias_initializer)
    return conv, (layer.filters, *out)


def _build_pool(layer: Pool2D, shape: Shape) -> tuple[nn.Module, Shape]:
    c, h, w = _need_image(layer, shape)
    (kh, kw) = layer.pool
    (sh, sw) = layer.strides or layer.pool
    if layer.padding == "same":
        (top, bottom), (left, right) = same_padding(h, kh, sh), same_padding(w, kw, sw)
        out = (-(-h // sh), -(-w // sw))
    else:
        if kh > h or kw > w:
            raise UserError(f"{layer.type} pool {layer.pool} is larger than its input {(h, w)}")
        top = bottom = left = right = 0
        out = (_window(h, kh, sh), _window(w, kw, sw))
    kind = "max" if layer.type == "maxpool2d" else "avg"
    return KerasPool2d(kind, (kh, kw), (sh, sw), (left, right, top, bottom)), (c, *out)


def _build_batchnorm(layer: BatchNorm, shape: Shape) -> tuple[nn.Module, Shape]:
    momentum = 1.0 - layer.momentum  # torch: running = (1 - m) running + m batch
    if layer.center and layer.scale:
        cls = BatchNorm2dNCHW if len(shape) == 3 else nn.BatchNorm1d
        return cls(shape[0], eps=layer.epsilon, momentum=momentum), shape
    bn = PartialBatchNorm(shape[0], len(shape), layer.epsilon, momentum, layer.center, layer.scale)
    return bn, shape


def _build_dense(layer: Dense, shape: Shape) -> tuple[nn.Module, Shape]:
    if len(shape) != 1:
        raise UserError(
            f"dense needs a flat input; got {shape}: add a flatten or global_avg_pool before it"
        )
    dense = KerasDense(shape[0], layer.units, layer.use_bias, layer.activation)
    _initialize(dense.weight, layer.kernel_initializer)
    if dense.bias is not None:
        _initialize(dense.bias, layer.bias_initializer)
    return dense, (layer.units,)


def _build_flatten(layer: Flatten, shape: Shape) -> tuple[nn.Module, Shape]:
    return FlattenNHWC(), (math.prod(shape),)


def _build_gap(layer: GlobalAvgPool, shape: Shape) -> tuple[nn.Module, Shape]:
    c, _, _ = _need_image(layer, shape)
    return GlobalAvgPool2d(), (c,)


def _build_dropout(layer: Dropout, shape: Shape) -> tuple[nn.Module, Shape]:
    return nn.Dropout(layer.rate), shape


def _build_activation(layer: ActivationLayer, shape: Shape) -> tuple[nn.Module, Shape]:
    return _lookup(ACTIVATIONS, layer.activation, "activation")(), shape


LAYER_BUILDERS: dict[str, Callable[[Any, Shape], tuple[nn.Module, Shape]]] = {
    "conv2d": _build_conv,
    "batchnorm": _build_batchnorm,
    "maxpool2d": _build_pool,
    "avgpool2d": _build_pool,
    "dropout": _build_dropout,
    "flatten": _build_flatten,
    "dense": _build_dense,
    "global_avg_pool": _build_gap,
    "activation": _build_activation,
}


def keras_shape(shape: Shape) -> Shape:
    """(C, H, W) -> Keras' (H, W, C); flat shapes unchanged."""
    return (*shape[1:], shape[0]) if len(shape) == 3 else shape


def build_layers(layers: tuple[Any, ...], shape: Shape, where: str = "layers"
                 ) -> tuple[nn.Sequential, list[tuple[str, Shape]]]:
    """Spec layers -> nn.Sequential named like harness.shapes rows; rows carry Keras shapes."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    rows: list[tuple[str, Shape]] = []
    seen: dict[str, int] = {}
    for i, layer in enumerate(layers):
        builder = _lookup(LAYER_BUILDERS, layer.type, "layer type")
        try:
            module, shape = builder(layer, shape)
        except UserError as e:
            raise UserError(f"{where}[{i}] ({layer.type}): {e.message}", e.hint) from None
        seen[layer.type] = seen.get(layer.type, 0) + 1
        name = f"{layer.type}_{seen[layer.type]}"
        modules[name] = module
        rows.append((name, keras_shape(shape)))
    return nn.Sequential(modules), rows


# ---------------------------------------------------------------------------------------------
# Pretrained bases (torchvision)


def _densenet_features(m: nn.Module) -> nn.Module:
    # torchvision applies this ReLU in DenseNet.forward(); Keras' base ends with it
    features: nn.Module = m.features  # type: ignore[assignment]
    return nn.Sequential(OrderedDict(features=features, relu=nn.ReLU(inplace=True)))


def _resnet_features(m: nn.Module) -> nn.Module:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(m, n)) for n in names))


def _vgg_features(m: nn.Module) -> nn.Module:
    features: nn.Module = m.features  # type: ignore[assignment]
    return nn.Sequential(OrderedDict(features=features))


class PixelsToImagenet(nn.Module):
    """Keras' EfficientNet input layers with ImageNet weights (Rescaling 1/255, Normalization
    by ImageNet mean and variance): the base takes raw [0, 255] pixels in both backends."""

    def __init__(self) -> None:
        super().__init__()
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std


def _efficientnet_features(m: nn.Module) -> nn.Module:
    features: nn.Module = m.features  # type: ignore[assignment]
    return nn.Sequential(OrderedDict(input=PixelsToImagenet(), features=features))


def _tf_same_pad(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """forward pre-hook: TensorFlow's 'same' padding (the extra row/column after, as Keras'
    correct_pad + ZeroPadding2D), for a strided conv whose own padding is set to 0."""
    x = args[0]
    pads: list[int] = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(conv.kernel_size), reversed(conv.stride),
                       strict=True):  # F.pad takes the last dimension first
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return (nn.functional.pad(x, pads),)


def _mobilenet_v2_features(m: nn.Module) -> nn.Module:
    """torchvision's MobileNetV2 features computing Keras' function: BatchNorm eps 1e-3 and
    momentum 0.999 (set in build_base), strided convs padded as TensorFlow's 'same'."""
    features: nn.Module = m.features  # type: ignore[assignment]
    for module in features.modules():
        if isinstance(module, nn.Conv2d) and module.stride != (1, 1):
            module.padding = (0, 0)
            module.register_forward_pre_hook(_tf_same_pad)
    return nn.Sequential(OrderedDict(features=features))


def _inception_features(m: nn.Module) -> nn.Module:
    names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
             "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
             "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
    return nn.Sequential(OrderedDict((n, getattr(m, n)) for n in names))


@dataclass(frozen=True)
class BaseEntry:
    constructor: str  # torchvision.models.<constructor>
    weights_enum: str  # torchvision.models.<weights_enum>.IMAGENET1K_V1
    features: Callable[[nn.Module], nn.Module]
    channels: int
    bn_momentum: float = 0.01  # torch's momentum: 1 - Keras' (0.99 by default)
    bn_eps: float | None = None  # None: torchvision's
    random_init: dict[str, Any] = field(default_factory=dict)  # constructor options, weights=None


BASES: dict[str, BaseEntry] = {
    "densenet121": BaseEntry("densenet121", "DenseNet121_Weights", _densenet_features, 1024),
    "densenet169": BaseEntry("densenet169", "DenseNet169_Weights", _densenet_features, 1664),
    "densenet201": BaseEntry("densenet201", "DenseNet201_Weights", _densenet_features, 1920),
    "resnet50": BaseEntry("resnet50", "ResNet50_Weights", _resnet_features, 2048),
    "vgg16": BaseEntry("vgg16", "VGG16_Weights", _vgg_features, 512),
    "efficientnet_b0": BaseEntry(
        "efficientnet_b0", "EfficientNet_B0_Weights", _efficientnet_features, 1280, bn_eps=1e-3
    ),
    "mobilenet_v2": BaseEntry(
        "mobilenet_v2", "MobileNet_V2_Weights", _mobilenet_v2_features, 1280, bn_momentum=0.001,
        bn_eps=1e-3,
    ),
    "inception_v3": BaseEntry(
        "inception_v3", "Inception_V3_Weights", _inception_features, 2048,
        random_init={"init_weights": True},
    ),
}

# Released DenseNet checkpoints use 'norm.1'-style keys; torchvision renames them on load (its
# regex, plus num_batches_tracked, which files saved by newer torch versions also carry).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_HEAD_PREFIXES = ("classifier.", "fc.")


def imagenet_weights_file(name: str) -> tuple[Path, str]:
    """Where torchvision caches a base's ImageNet weights, and the URL it would fetch."""
    entry = _lookup(BASES, name, "base")
    url = getattr(torchvision.models, entry.weights_enum).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name, url


def rename_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    """torchvision's DenseNet key renaming (`denselayer1.norm.1.weight` -> `norm1.weight`)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _OLD_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _load_local_weights(model: nn.Module, name: str, path_text: str) -> None:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(
            f"base {name}: weights file '{path_text}' not found (looked for {path.resolve()})",
            "give an existing .pth state dict, `weights: imagenet` (torchvision cache) or "
            "`weights: none`",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-torch file: the user's input, not a bug
        raise UserError(f"base {name}: cannot read weights file '{path}': {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"base {name}: weights file '{path}' does not hold a state dict")
    result = model.load_state_dict(rename_legacy_keys(state), strict=False)
    # files older than torch 0.4.1 have no num_batches_tracked; nothing reads it (momentum set)
    missing = [k for k in result.missing_keys
               if not k.startswith(_HEAD_PREFIXES) and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        what = (f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing
                else f"{len(result.unexpected_keys)} unexpected keys "
                     f"(e.g. {result.unexpected_keys[:3]})")
        raise UserError(
            f"base {name}: weights file '{path}' does not match torchvision's {name}: {what}"
        )


def build_base(name: str, weights: str) -> nn.Module:
    """torchvision's feature extractor for `name` with the spec's weights (never downloads)."""
    entry = _lookup(BASES, name, "base")
    constructor = getattr(torchvision.models, entry.constructor)
    keyword = weights.strip().lower()
    if keyword == "imagenet":
        file, url = imagenet_weights_file(name)
        if not file.is_file():
            raise UserError(
                f"base {name}: weights: imagenet needs {file.name} in {file.parent} "
                f"($TORCH_HOME/hub/checkpoints); it is not there and downloads are not attempted: "
                f"copy it there (from {url}), give a local file as weights:, or set `weights: none`"
            )
        model = constructor(weights=getattr(torchvision.models, entry.weights_enum).IMAGENET1K_V1)
    elif keyword == "none":
        model = constructor(weights=None, **entry.random_init)
    else:
        model = constructor(weights=None, **entry.random_init)
        _load_local_weights(model, name, weights)
    base = entry.features(model)
    for m in base.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = entry.bn_momentum
            if entry.bn_eps is not None:
                m.eps = entry.bn_eps
            elif name.startswith(("densenet", "resnet")):
                # keras.applications' DenseNet and ResNet use epsilon 1.001e-5, torchvision 1e-5:
                # 1e-7 of the frozen DenseNet's head gradient (measured by weight-port parity)
                m.eps = 1.001e-5
    return base


class TorchNet(nn.Module):
    """Optional pretrained base + head. A frozen base stays in eval mode under model.train()."""

    def __init__(
        self, base: nn.Module | None, head: nn.Sequential, frozen_parts: list[nn.Module]
    ) -> None:
        super().__init__()
        self.base = base
        self.head = head
        # the frozen base (or, with trainable_from, its modules before that layer): no gradient
        # and eval mode under model.train(), so their BatchNorm is in inference mode as in Keras
        self.frozen_parts = frozen_parts
        self.frozen = base is not None and any(m is base for m in frozen_parts)
        for m in frozen_parts:
            m.requires_grad_(False)
            m.eval()

    def refreeze(self, frozen_parts: list[nn.Module]) -> None:
        """Make `frozen_parts` the frozen ones (a training stage begins); the rest trains."""
        if self.base is not None:
            self.base.requires_grad_(True)
            self.base.train(self.training)
        self.frozen_parts = frozen_parts
        self.frozen = self.base is not None and any(m is self.base for m in frozen_parts)
        for m in frozen_parts:
            m.requires_grad_(False)
            m.eval()

    def train(self, mode: bool = True) -> TorchNet:
        super().train(mode)
        for m in self.frozen_parts:
            m.eval()
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            if self.frozen:
                with torch.no_grad():
                    x = self.base(x)
            else:
                x = self.base(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the final sigmoid (same modules and weights as forward()).

        The last module is a KerasDense (its linear part, without its activation) or the
        activation layer itself (skipped). sigmoid of this is forward()'s output.
        """
        x = self._features(x)
        *body, last = self.head
        for module in body:
            x = module(x)
        if isinstance(last, KerasDense):
            return F.linear(x, last.weight, last.bias)
        if isinstance(last, nn.Sigmoid):
            return x
        raise TypeError(f"no pre-activation for a last module {type(last).__name__}")


@dataclass
class TorchHandle:
    """What `build` returns: the module and what fit/predict need to feed it."""

    net: TorchNet
    model: Any  # the spec's model
    model_input: ModelInput
    device: torch.device
    channels_last: bool
    rows: list[tuple[str, Shape]] = field(default_factory=list)  # per layer, Keras shapes
    output_shape: Shape = ()
    optimizer: torch.optim.Optimizer | None = None  # None for a model that does not train
    on_logits: bool = False  # the loss is computed from the pre-sigmoid logits

    def trainer(self) -> torch.optim.Optimizer:
        """The optimizer, for the steps that need one."""
        if self.optimizer is None:
            raise ValueError(f"model '{self.model.name}' has no training recipe")
        return self.optimizer


# ---------------------------------------------------------------------------------------------
# Neutral weights (backends/base.py): Keras' layout and names

@dataclass(frozen=True)
class Slot:
    """One variable seen in Keras' layout: its axes permuted by `perm` (None: as it is)."""

    tensor: torch.Tensor
    perm: tuple[int, ...] | None = None

    def _keras(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.perm is None else t.permute(*self.perm)

    def get(self) -> torch.Tensor:
        return self._keras(self.tensor.detach())

    def grad(self) -> torch.Tensor | None:
        g = self.tensor.grad
        return None if g is None else self._keras(g)

    def put(self, value: torch.Tensor) -> None:
        if self.perm is not None:
            value = value.permute(*(int(i) for i in np.argsort(self.perm)))
        self.tensor.copy_(value)


def _module_weights(module: nn.Module) -> dict[str, Slot]:
    """One module's variables by Keras name: conv kernels OIHW -> HWIO, dense (out, in) -> (in,
    out), BatchNorm weight/bias/running stats -> gamma/beta/moving_mean/moving_variance."""
    out: dict[str, Slot] = {}
    depthwise = isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels
    if depthwise:
        out["kernel"] = Slot(module.weight, (2, 3, 0, 1))  # depthwise (C, 1, H, W) -> HWC1
    elif isinstance(module, nn.Conv2d):
        out["kernel"] = Slot(module.weight, (2, 3, 1, 0))
    elif isinstance(module, nn.Linear):
        out["kernel"] = Slot(module.weight, (1, 0))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm | PartialBatchNorm):
        bn = module.bn if isinstance(module, PartialBatchNorm) else module
        if module.weight is not None:
            out["gamma"] = Slot(module.weight)
        if module.bias is not None:
            out["beta"] = Slot(module.bias)
        out["moving_mean"] = Slot(bn.running_mean)  # type: ignore[arg-type]
        out["moving_variance"] = Slot(bn.running_var)  # type: ignore[arg-type]
        return out
    else:
        return out
    if module.bias is not None:
        out["bias"] = Slot(module.bias)
    return out


def _densenet_names(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """torchvision DenseNet modules under Keras' layer names (keras.applications.densenet)."""
    rename = {"conv0": "conv1_conv", "norm0": "conv1_bn", "norm5": "bn"}
    out = []
    for name, module in base.features.named_modules():  # type: ignore[union-attr]
        if not isinstance(module, nn.Conv2d | nn.BatchNorm2d):
            continue
        parts = name.split(".")
        if len(parts) == 1:
            keras_name = rename[name]
        elif parts[0].startswith("transition"):  # transitionK.{norm,conv} -> pool{K+1}_{bn,conv}
            k = int(parts[0].removeprefix("transition")) + 1
            keras_name = f"pool{k}_{'bn' if parts[1] == 'norm' else 'conv'}"
        else:  # denseblockK.denselayerI.{norm1,conv1,norm2,conv2} -> conv{K+1}_blockI_...
            k = int(parts[0].removeprefix("denseblock")) + 1
            i = int(parts[1].removeprefix("denselayer"))
            suffix = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}
            keras_name = f"conv{k}_block{i}_{suffix[parts[2]]}"
        out.append((keras_name, module))
    return out


def _vgg_names(base: nn.Module) -> list[tuple[str, nn.Module]]:
    convs = [m for m in base.modules() if isinstance(m, nn.Conv2d)]
    per_block = (2, 2, 3, 3, 3)
    names = [f"block{b + 1}_conv{i + 1}" for b, n in enumerate(per_block) for i in range(n)]
    return list(zip(names, convs, strict=True))


def _mobilenet_v2_names(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """torchvision MobileNetV2 modules under Keras' layer names (keras.applications.mobilenet_v2):
    features.0 the stem, features.1..17 the inverted residual blocks, features.18 the last conv."""
    blocks = list(base.features.children())  # type: ignore[union-attr]
    modules = [m for m in blocks[0].modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    out = list(zip(("Conv1", "bn_Conv1"), modules, strict=True))
    for i, block in enumerate(blocks[1:-1]):
        prefix = "expanded_conv" if i == 0 else f"block_{i}"
        parts = (("depthwise", "project") if i == 0 else ("expand", "depthwise", "project"))
        names = [n for part in parts for n in (f"{prefix}_{part}", f"{prefix}_{part}_BN")]
        modules = [m for m in block.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        out += zip(names, modules, strict=True)
    modules = [m for m in blocks[-1].modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    return out + list(zip(("Conv_1", "Conv_1_bn"), modules, strict=True))


def _no_counterpart(
    base_name: str, reason: str
) -> Callable[[nn.Module], list[tuple[str, nn.Module]]]:
    def fail(base: nn.Module) -> list[tuple[str, nn.Module]]:
        raise ValueError(
            f"base {base_name}: torchvision's model has no exact counterpart of Keras' "
            f"({reason}), so it has no neutral weight layout"
        )

    return fail


BASE_NAMES: dict[str, Callable[[nn.Module], list[tuple[str, nn.Module]]]] = {
    "densenet121": _densenet_names,
    "densenet169": _densenet_names,
    "densenet201": _densenet_names,
    "resnet50": _no_counterpart("resnet50", "its convolutions have no biases"),
    "vgg16": _vgg_names,
    "efficientnet_b0": _no_counterpart(
        "efficientnet_b0", "Keras pads strided convs after only and normalizes the input inside"
    ),
    "mobilenet_v2": _mobilenet_v2_names,
    "inception_v3": _no_counterpart(
        "inception_v3", "Keras' BatchNormalization has no gamma (scale=False)"
    ),
}


def frozen_parts(base: nn.Module, spec: BaseNet) -> list[nn.Module]:
    """The modules of `base` that stay frozen: all of it, none, or (trainable_from) those whose
    Keras layer comes before the first one the name matches, in keras.applications' order."""
    if spec.frozen:
        return [base]
    if spec.trainable_from is None:
        return []
    order = {layer.name: i for i, layer in enumerate(BASE_LAYERS[spec.name])}
    start = first_trainable(spec.name, spec.trainable_from)
    if start is None:
        raise UserError(
            f"base {spec.name}: no layer or block '{spec.trainable_from}' to train from"
        )
    return [m for name, m in _lookup(BASE_NAMES, spec.name, "base")(base) if order[name] < start]


def _densenet_blocks(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each dense block's and transition's output under Keras' name for the same tensor."""
    out = []
    for name, m in base.features.named_children():  # type: ignore[union-attr]
        if name.startswith("denseblock"):
            k = int(name.removeprefix("denseblock")) + 1
            out.append((f"conv{k}_block{len(list(m.children()))}_concat", m))
        elif name.startswith("transition"):
            out.append((f"pool{int(name.removeprefix('transition')) + 1}_pool", m))
    return out


def _vgg_blocks(base: nn.Module) -> list[tuple[str, nn.Module]]:
    pools = [m for m in base.modules() if isinstance(m, nn.MaxPool2d)]
    return [(f"block{i + 1}_pool", m) for i, m in enumerate(pools)]


BASE_BLOCKS: dict[str, Callable[[nn.Module], list[tuple[str, nn.Module]]]] = {
    "densenet121": _densenet_blocks,
    "densenet169": _densenet_blocks,
    "densenet201": _densenet_blocks,
    "resnet50": lambda base: [],
    "vgg16": _vgg_blocks,
    "efficientnet_b0": lambda base: [],
    "mobilenet_v2": lambda base: [],
    "inception_v3": lambda base: [],
}


def _neutral(handle: TorchHandle) -> dict[str, Slot]:
    """Every variable of the model by its neutral name (backends/base.py), in build order."""
    table: dict[str, Slot] = {}
    model = handle.model
    if handle.net.base is not None:
        base_name = model.base.name
        for layer, module in _lookup(BASE_NAMES, base_name, "base")(handle.net.base):
            for var, access in _module_weights(module).items():
                table[f"{base_name}/{layer}/{var}"] = access
    for layer, module in handle.net.head.named_children():
        for var, access in _module_weights(module).items():
            table[f"{layer}/{var}"] = access
    return table


# ---------------------------------------------------------------------------------------------
# Optimizers and loss


def _keras_weight_decay(group: dict[str, Any]) -> None:
    """Keras' decoupled weight decay, before the update: w <- w - w * wd * lr."""
    wd = group.get("keras_weight_decay", 0.0)
    if wd:
        for p in group["params"]:
            if p.grad is not None:
                p.sub_(p * (wd * group["lr"]))


class KerasAdam(torch.optim.Adam):
    """torch Adam whose epsilon enters where Keras 3 puts it (see the module docstring); with
    weight_decay, Keras' AdamW (decoupled decay before the Adam update, as torch's AdamW)."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float,
                 amsgrad: bool, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, amsgrad=amsgrad)
        for group in self.param_groups:
            group["keras_weight_decay"] = weight_decay
        self.keras_epsilon = eps
        self.keras_iterations = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.keras_iterations += 1
        for group in self.param_groups:
            _keras_weight_decay(group)
            group["eps"] = self.keras_epsilon / math.sqrt(
                1.0 - group["betas"][1] ** self.keras_iterations
            )
        return super().step(closure)


class KerasSGD(torch.optim.Optimizer):
    """Keras' SGD: m = momentum m - lr g; w += m (nesterov: w += momentum m - lr g). torch's
    SGD keeps the unscaled sum of gradients instead, which differs once the rate changes."""

    def __init__(self, params: Any, lr: float, momentum: float, nesterov: bool,
                 weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "keras_weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            _keras_weight_decay(group)
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if mom == 0:
                    p.sub_(g * lr)
                    continue
                state = self.state[p]
                m = state.setdefault("momentum", torch.zeros_like(p))
                m.copy_(m * mom - g * lr)
                p.add_(m * mom - g * lr if group["nesterov"] else m)
        return None


class KerasRMSprop(torch.optim.Optimizer):
    """Keras' RMSprop: v = rho v + (1 - rho) g^2 (centered: minus the mean gradient's square),
    increment = lr g / sqrt(v + eps); momentum m = momentum m + increment, w -= m. torch adds
    eps after the root (sqrt(v) + eps) and names rho alpha."""

    def __init__(self, params: Any, lr: float, rho: float, momentum: float, eps: float,
                 centered: bool, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "rho": rho, "momentum": momentum, "eps": eps,
                                  "centered": centered, "keras_weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            _keras_weight_decay(group)
            lr, rho, mom, eps = group["lr"], group["rho"], group["momentum"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                v = state.setdefault("velocity", torch.zeros_like(p))
                v.copy_(rho * v + (1 - rho) * g.square())
                if group["centered"]:
                    a = state.setdefault("average_gradient", torch.zeros_like(p))
                    a.copy_(rho * a + (1 - rho) * g)
                    denominator = v - a.square() + eps
                else:
                    denominator = v + eps
                increment = (lr * g) / denominator.sqrt()
                if mom > 0:
                    m = state.setdefault("momentum", torch.zeros_like(p))
                    m.copy_(mom * m + increment)
                    p.sub_(m)
                else:
                    p.sub_(increment)
        return None


def _adam(opt: Adam, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return KerasAdam(params, opt.learning_rate, (opt.beta_1, opt.beta_2), opt.epsilon, opt.amsgrad)


def _adamw(opt: AdamW, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return KerasAdam(params, opt.learning_rate, (opt.beta_1, opt.beta_2), opt.epsilon,
                     opt.amsgrad, opt.weight_decay)


def _rmsprop(opt: RMSprop, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return KerasRMSprop(params, opt.learning_rate, opt.rho, opt.momentum, opt.epsilon,
                        opt.centered, opt.weight_decay)


def _sgd(opt: SGD, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # Keras allows nesterov with momentum 0 (plain SGD); torch refuses it
    nesterov = opt.nesterov and opt.momentum > 0
    if opt.weight_decay == 0 and opt.momentum == 0:
        return torch.optim.SGD(params, lr=opt.learning_rate)  # the same update as Keras'
    return KerasSGD(params, opt.learning_rate, opt.momentum, nesterov, opt.weight_decay)


OPTIMIZERS: dict[str, Callable[[Any, list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "rmsprop": _rmsprop,
    "sgd": _sgd,
}

# The backend's tables by vocabulary category (checked against the vocabulary by the tests).
TABLES: dict[str, Mapping[str, Any]] = {
    "layers": LAYER_BUILDERS,
    "bases": BASES,
    "optimizers": OPTIMIZERS,
    "activations": ACTIVATIONS,
    "initializers": INITIALIZERS,
}


def bce_loss(probs: torch.Tensor, labels: torch.Tensor, loss: Loss,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Keras' binary_crossentropy on probabilities: clip to [eps, 1-eps], smooth, pos_weight
    on the positive term, times the sample weights, batch mean (harness.spec.Loss)."""
    y = labels * (1.0 - loss.label_smoothing) + 0.5 * loss.label_smoothing
    p = probs.clamp(loss.epsilon, 1.0 - loss.epsilon)
    pos = y * torch.log(p) if loss.pos_weight == 1.0 else loss.pos_weight * y * torch.log(p)
    per = -(pos + (1.0 - y) * torch.log(1.0 - p))
    return (per if weights is None else per * weights).mean()


def bce_logits_loss(logits: torch.Tensor, labels: torch.Tensor, loss: Loss,
                    reduction: str = "mean", weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Keras 3 (TensorFlow) binary_crossentropy of a sigmoid output: from its logits, no clip.

    max(x, 0) - x y + log(1 + exp(-|x|)) with smoothed labels y, batch mean (`reduction`).
    """
    y = labels * (1.0 - loss.label_smoothing) + 0.5 * loss.label_smoothing
    pos_weight = None
    if loss.pos_weight != 1.0:
        pos_weight = torch.tensor(loss.pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, y, weight=weights, reduction=reduction,
                                              pos_weight=pos_weight)


# ---------------------------------------------------------------------------------------------
# Augmentation geometry


def rotate_zoom_theta(angle_deg: np.ndarray, scale: np.ndarray, height: int, width: int
                      ) -> np.ndarray:
    """affine_grid thetas (B, 2, 3) for 'rotate CCW by angle, then zoom by scale' about the centre.

    In pixel units about the centre c (y down), an output pixel q maps back to the input at
    d = (q - c) / s, x' = cos(a) d_x - sin(a) d_y, y' = sin(a) d_x + cos(a) d_y. With
    align_corners=True a normalized coordinate u is the pixel offset divided by r = (size-1)/2 on
    each axis, so theta = diag(1/r_x, 1/r_y) M diag(r_x, r_y): off-diagonals carry r_y/r_x.
    """
    a = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    s = np.asarray(scale, dtype=np.float64)
    rx, ry = max(width - 1, 1) / 2.0, max(height - 1, 1) / 2.0
    cos, sin = np.cos(a) / s, np.sin(a) / s
    theta = np.zeros((len(a), 2, 3), dtype=np.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * ry / rx
    theta[:, 1, 0] = sin * rx / ry
    theta[:, 1, 1] = cos
    return theta


def augment_tensor(x: torch.Tensor, angle: np.ndarray, scale: np.ndarray, hflip: np.ndarray,
                   vflip: np.ndarray) -> torch.Tensor:
    """Apply the harness's augmentation to float images (B, C, H, W) on their device.

    Flips are exact index reversals; only samples with a rotation or zoom go through
    grid_sample, so identity and pure flips stay bit-exact.
    """
    device = x.device
    if hflip.any():
        mask = torch.from_numpy(np.asarray(hflip, bool)).to(device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    if vflip.any():
        mask = torch.from_numpy(np.asarray(vflip, bool)).to(device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-2), x)
    geometric = (np.asarray(angle) != 0) | (np.asarray(scale) != 1)
    if not geometric.any():
        return x
    # identity thetas for the other samples of a mixed batch; torch.where below restores them
    # exactly (no index_copy/index_put, whose CUDA determinism varies across torch versions)
    angle = np.where(geometric, angle, 0.0)
    scale = np.where(geometric, scale, 1.0)
    theta = torch.from_numpy(rotate_zoom_theta(angle, scale, x.shape[-2], x.shape[-1])).to(device)
    # float64 sampling: float32 grid coordinates are off by ~1e-6 px, i.e. 3e-4 grey levels at
    # sharp edges; the grey image is one channel, so the extra cost is small even on a GPU
    src = x.double()
    grid = F.affine_grid(theta, list(src.shape), align_corners=True)
    sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True).to(x.dtype)
    if geometric.all():
        return sampled
    mask = torch.from_numpy(geometric).to(device).view(-1, 1, 1, 1)
    return torch.where(mask, sampled, x)


# ---------------------------------------------------------------------------------------------
# The backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "auto", deterministic: bool | None = None,
                 channels_last: bool | None = None) -> None:
        """`channels_last`: None chooses it for convolutional models (faster on CPU/oneDNN)."""
        super().__init__(device)
        self.device = self._resolve_device(device)
        self.channels_last_policy = channels_last
        self._seed: int | None = None
        self._deterministic = bool(deterministic)
        self._last_channels_last: bool | None = None
        if deterministic:
            self._apply_determinism(True)

    @staticmethod
    def _resolve_device(request: str) -> torch.device:
        if request == "cpu":
            return torch.device("cpu")
        if request == "gpu":
            if not torch.cuda.is_available():
                raise UserError(
                    f"device: gpu requested, but torch {torch.__version__} sees no CUDA device "
                    f"(built for CUDA {torch.version.cuda or 'none'})",
                    "use device: cpu or auto, or install a CUDA build of torch with a driver",
                )
            return torch.device("cuda", torch.cuda.current_device())
        if request == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        raise UserError(f"torch backend: device must be one of auto, cpu, gpu; got '{request}'")

    # -- environment and seeding ----------------------------------------------------------------

    def _apply_determinism(self, deterministic: bool) -> None:
        for key, value in PRE_IMPORT_ENV["deterministic" if deterministic else "default"].items():
            os.environ.setdefault(key, value)  # works only if CUDA is not initialised yet
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic
        if deterministic:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def seed(self, seed: int, deterministic: bool) -> None:
        self._seed = seed
        self._deterministic = deterministic
        self._apply_determinism(deterministic)
        threads = os.environ.get(THREADS_ENV)  # the worker's share of the cores (executors)
        if threads and threads.isdigit():
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(int(threads))
            except RuntimeError:  # only settable before the first parallel op
                pass
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds CUDA generators too
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def determinism_flags(self) -> dict[str, Any]:
        """The flags actually in force now (read back from torch, not what was asked)."""
        return {
            "seed": self._seed,
            "deterministic_requested": self._deterministic,
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }

    def environment(self) -> dict[str, Any]:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if self.device.type == "cuda":
            device_name: str | None = torch.cuda.get_device_name(self.device)
        else:
            device_name = platform.processor() or platform.machine()
        info = BackendInfo(
            name=self.name,
            framework="pytorch",
            versions={
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "cuda": torch.version.cuda,
                "cudnn": str(cudnn) if cudnn else None,
                "python": platform.python_version(),
            },
            device=str(self.device),
            device_name=device_name,
            determinism=self.determinism_flags(),
        )
        return {
            **asdict(info),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "channels_last": self._last_channels_last,
            "mkldnn": torch.backends.mkldnn.is_available(),
        }

    def peak_memory(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            return {}
        return {
            "torch_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            "torch_max_memory_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
        }

    # -- build ------------------------------------------------------------------------------------

    def build(self, model: Model, model_input: ModelInput) -> TorchHandle:
        size, channels = model_input.image_size, model_input.channels
        rows: list[tuple[str, Shape]] = []
        if isinstance(model, SequentialModel):
            base, frozen = None, []
            head, rows = build_layers(model.layers, (channels, size, size), "layers")
        elif isinstance(model, PretrainedModel):
            if channels != 3:
                raise UserError(f"base {model.base.name} needs 3 input channels; got {channels}")
            base = build_base(model.base.name, model.base.weights)
            frozen = frozen_parts(base, model.base)
            base_shape = self._probe(base, (channels, size, size))
            rows = [(model.base.name, keras_shape(base_shape))]
            head, head_rows = build_layers(model.head, base_shape, "head")
            rows += head_rows
        else:
            raise UserError(
                f"backend 'torch' builds kind: sequential and pretrained models; "
                f"'{model.name}' is kind: {model.kind}"
            )
        net = TorchNet(base, head, frozen)
        has_conv = base is not None or any(isinstance(m, nn.Conv2d) for m in net.modules())
        channels_last = has_conv if self.channels_last_policy is None else self.channels_last_policy
        net = net.to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._last_channels_last = channels_last
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        handle = TorchHandle(net, model, model_input, self.device, channels_last, rows,
                             rows[-1][1] if rows else ())
        handle.optimizer = self._optimizer(handle)
        handle.on_logits = model.train.loss.on_logits(last_layer(model))
        return handle

    @staticmethod
    def _optimizer(handle: TorchHandle) -> torch.optim.Optimizer:
        """The recipe's optimizer over the parameters that train now, with no state."""
        params = [p for p in handle.net.parameters() if p.requires_grad]
        opt = handle.model.train.optimizer
        return _lookup(OPTIMIZERS, opt.name, "optimizer")(opt, params)  # type: ignore[no-any-return]

    def set_trainable(self, handle: TorchHandle, frozen: bool, trainable_from: str | None
                      ) -> None:
        """requires_grad and eval() of the frozen modules (harness.base_layers' order), then a
        new optimizer over the parameters that train (Keras' recompile: no state kept)."""
        base = handle.net.base
        if base is None:
            raise UserError(f"model '{handle.model.name}' has no base: stages need one")
        spec = handle.model.base.model_copy(
            update={"frozen": frozen, "trainable_from": None if frozen else trainable_from})
        handle.net.refreeze(frozen_parts(base, spec))
        handle.optimizer = self._optimizer(handle)

    @staticmethod
    def _probe(base: nn.Module, shape: Shape) -> Shape:
        """Output shape of a base, from one forward pass of a blank image."""
        was_training = base.training
        base.eval()
        with torch.no_grad():
            out = base(torch.zeros((1, *shape)))
        base.train(was_training)
        return tuple(out.shape[1:])

    def count_params(self, handle: TorchHandle) -> ParamCounts:
        trainable = sum(p.numel() for p in handle.net.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in handle.net.parameters() if not p.requires_grad)
        stats = sum(b.numel() for name, b in handle.net.named_buffers()
                    if name.endswith(("running_mean", "running_var")))
        return ParamCounts(
            total=trainable + frozen + stats, trainable=trainable, non_trainable=frozen + stats
        )

    # -- data to the device ----------------------------------------------------------------------

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W) -> float32 (B, 1, H, W) in 0..255 on the device."""
        t = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.unsqueeze(1).to(torch.float32)

    @staticmethod
    def _preprocess(x: torch.Tensor, handle: TorchHandle) -> torch.Tensor:
        """Normalization, then channel replication, in the model's memory format."""
        mi = handle.model_input
        if mi.normalization == "rescale":
            x = x / 255.0
        elif mi.normalization == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN[: mi.channels], device=x.device, dtype=x.dtype)
            std = torch.tensor(IMAGENET_STD[: mi.channels], device=x.device, dtype=x.dtype)
            mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
            x = (x / 255.0 - mean) / std  # broadcasting replicates the grey channel
        elif mi.normalization == "tf":
            x = x / 127.5 - 1.0
        elif mi.normalization != "none":
            raise UserError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}; "
                f"got '{mi.normalization}'"
            )
        if x.shape[1] != mi.channels:
            x = x.expand(-1, mi.channels, -1, -1)
        if handle.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def augment(self, images_uint8: np.ndarray, angle: np.ndarray, scale: np.ndarray,
                hflip: np.ndarray, vflip: np.ndarray) -> np.ndarray:
        """The on-device augmentation, exposed for tests: uint8 (N, H, W) -> float32 0..255."""
        x = self._to_device(images_uint8)
        out = augment_tensor(x, np.asarray(angle, np.float64), np.asarray(scale, np.float64),
                             np.asarray(hflip, bool), np.asarray(vflip, bool))
        return out[:, 0].cpu().numpy().astype(np.float32)

    # -- steps: train, predict, learning rate ---------------------------------------------------

    def train_step(self, handle: TorchHandle, batch: Batch, gradients: bool = False
                   ) -> Callable[[], StepResult]:
        net, optimizer = handle.net, handle.trainer()
        if not net.training:
            net.train()
        x = self._to_device(batch.images)
        if batch.augment:
            x = augment_tensor(x, batch.angle, batch.scale, batch.hflip, batch.vflip)
        x = self._preprocess(x, handle)
        y = torch.from_numpy(np.asarray(batch.labels, np.float32)).to(self.device)
        loss_spec = handle.model.train.loss
        w = None
        if batch.weights is not None:
            w = torch.from_numpy(np.asarray(batch.weights, np.float32)).to(self.device)
        if handle.on_logits:  # Keras 3 on TF: BCE from the sigmoid's logits
            z = net.logits(x).reshape(-1)
            p = torch.sigmoid(z)
            loss = bce_logits_loss(z, y, loss_spec, weights=w)
        else:
            p = net(x).reshape(-1)
            loss = bce_loss(p, y, loss_spec, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = None
        if gradients:  # before the update; the next step clears them
            grads = {name: g.cpu().numpy().copy() for name, slot in _neutral(handle).items()
                     if (g := slot.grad()) is not None}
        optimizer.step()
        loss, p = loss.detach(), p.detach()
        return lambda: StepResult(float(loss), p.double().cpu().numpy(), grads)

    def gradients(self, handle: TorchHandle, batch: Batch, dtype: str = "float64"
                  ) -> dict[str, np.ndarray]:
        """The loss's gradient per trainable variable (neutral names) at the model's current
        weights, computed in `dtype` on a copy of the module (`.to(dtype)`): no update, the
        model and its optimizer untouched. Weight-port parity's exact reference; no
        augmentation."""
        if batch.augment:
            raise ValueError("gradients(): augmentation is not supported (pass augment=False)")
        precision = getattr(torch, dtype)
        net = copy.deepcopy(handle.net).to(precision)
        net.train()
        twin = replace(handle, net=net, optimizer=None)
        x = self._preprocess(self._to_device(batch.images).to(precision), twin)
        y = torch.from_numpy(np.asarray(batch.labels)).to(self.device, precision)
        loss_spec = handle.model.train.loss
        if handle.on_logits:
            loss = bce_logits_loss(net.logits(x).reshape(-1), y, loss_spec)
        else:
            loss = bce_loss(net(x).reshape(-1), y, loss_spec)
        loss.backward()
        return {name: g.cpu().numpy().copy() for name, slot in _neutral(twin).items()
                if (g := slot.grad()) is not None}

    def activations(self, handle: TorchHandle, images: np.ndarray) -> dict[str, np.ndarray]:
        net, model = handle.net, handle.model
        probes: list[tuple[str, nn.Module]] = []
        if net.base is not None:
            probes += [(f"{model.base.name}/{name}", m)
                       for name, m in _lookup(BASE_BLOCKS, model.base.name, "base")(net.base)]
            probes.append((model.base.name, net.base))
        probes += list(net.head.named_children())
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
                 for name, m in probes]
        try:
            net.eval()
            with torch.inference_mode():
                net(self._preprocess(self._to_device(np.asarray(images)), handle))
        finally:
            for h in hooks:
                h.remove()
        # channels last, as Keras lays them out
        return {name: (seen[name].permute(0, 2, 3, 1) if seen[name].dim() == 4 else seen[name])
                .double().cpu().numpy() for name, _ in probes}

    def predict(self, handle: TorchHandle, images: np.ndarray, batch_size: int = 64,
                logits: bool = False) -> np.ndarray:
        images = np.asarray(images)
        size = handle.model_input.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"predict wants uint8 (N, {size}, {size}); got {images.shape}")
        net = handle.net
        net.eval()
        forward = net.logits if logits else net
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = self._preprocess(self._to_device(images[start : start + batch_size]), handle)
                out.append(forward(x).reshape(-1))
        if not out:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(out).double().cpu().numpy()

    def get_learning_rate(self, handle: TorchHandle) -> float:
        return float(handle.trainer().param_groups[0]["lr"])

    def set_learning_rate(self, handle: TorchHandle, learning_rate: float) -> None:
        for group in handle.trainer().param_groups:
            group["lr"] = float(learning_rate)

    # -- training state (resume) --------------------------------------------------------------

    def get_state(self, handle: TorchHandle) -> dict[str, np.ndarray]:
        """The module's and optimizer's state dicts and torch's RNG states, in torch's own
        format (torch.save), as one uint8 array."""
        optimizer = handle.trainer()
        state = {
            "net": handle.net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "keras_iterations": getattr(optimizer, "keras_iterations", 0),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return {"torch": np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()}

    def set_state(self, handle: TorchHandle, state: dict[str, np.ndarray]) -> None:
        if set(state) != {"torch"}:
            raise ValueError(f"backend 'torch': not a torch training state (keys {sorted(state)})")
        saved = torch.load(io.BytesIO(np.asarray(state["torch"], np.uint8).tobytes()),
                           map_location="cpu", weights_only=True)
        optimizer = handle.trainer()
        handle.net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        if isinstance(optimizer, KerasAdam):
            optimizer.keras_iterations = int(saved["keras_iterations"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    # -- neutral weights ---------------------------------------------------------------------------

    def get_weights(self, handle: TorchHandle) -> dict[str, np.ndarray]:
        return {name: slot.get().cpu().numpy().copy() for name, slot in _neutral(handle).items()}

    def set_weights(self, handle: TorchHandle, weights: dict[str, np.ndarray]) -> None:
        table = _neutral(handle)
        check_weights({k: tuple(slot.get().shape) for k, slot in table.items()}, weights,
                      self.name)
        with torch.no_grad():
            for name, slot in table.items():
                slot.put(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)))
