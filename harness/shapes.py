"""Shape and parameter inference from a spec, in pure Python (no framework import).

    python -m harness validate specs/paper.yaml     # prints these tables

Shapes are Keras-style, channels last, without the batch axis. Parameter counts follow Keras:
BatchNorm moving mean and variance are non-trainable parameters; a frozen base counts entirely as
non-trainable. Pretrained bases take their counts from `BASE_TABLE` (measured with
keras.applications, include_top=False; the backend tests check them against the built models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.base_layers import BASE_LAYERS, block_names, first_trainable, frozen_counts
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
    RandomModel,
    SequentialModel,
    Spec,
    Stage,
)

Shape = tuple[int, ...]


ZERO = ParamCounts(total=0, trainable=0, non_trainable=0)


@dataclass(frozen=True)
class LayerRow:
    name: str  # e.g. "conv2d_1"
    kind: str  # e.g. "Conv2D"
    shape: Shape
    params: ParamCounts


@dataclass(frozen=True)
class Inference:
    model: str
    input_shape: Shape
    rows: tuple[LayerRow, ...]
    counts: ParamCounts
    output_shape: Shape


@dataclass(frozen=True)
class BaseInfo:
    channels: int  # output feature channels
    counts: ParamCounts  # unfrozen: trainable vs BatchNorm moving statistics
    min_size: int
    normalization: str | None = None  # the input the base was trained on; None: not checked


# Counts of keras.applications.<Base>(include_top=False) (Keras 3): total / trainable / BN stats.
BASE_TABLE: dict[str, BaseInfo] = {
    "densenet121": BaseInfo(1024, ParamCounts(
        total=7_037_504, trainable=6_953_856, non_trainable=83_648
    ), 32),
    "densenet169": BaseInfo(1664, ParamCounts(
        total=12_642_880, trainable=12_484_480, non_trainable=158_400
    ), 32),
    "densenet201": BaseInfo(1920, ParamCounts(
        total=18_321_984, trainable=18_092_928, non_trainable=229_056
    ), 32),
    "resnet50": BaseInfo(2048, ParamCounts(
        total=23_587_712, trainable=23_534_592, non_trainable=53_120
    ), 32),
    "vgg16": BaseInfo(512, ParamCounts(
        total=14_714_688, trainable=14_714_688, non_trainable=0
    ), 32),
    # includes its input Normalization layer's mean, variance and count (7); expects raw pixels
    "efficientnet_b0": BaseInfo(1280, ParamCounts(
        total=4_049_571, trainable=4_007_548, non_trainable=42_023
    ), 32, "none"),
    "mobilenet_v2": BaseInfo(1280, ParamCounts(
        total=2_257_984, trainable=2_223_872, non_trainable=34_112
    ), 32, "tf"),
    # BatchNormalization(scale=False): no gamma (torchvision's has one: 17,216 more)
    "inception_v3": BaseInfo(2048, ParamCounts(
        total=21_802_784, trainable=21_768_352, non_trainable=34_432
    ), 75, "tf"),
}


def _base_spatial(name: str, size: int) -> int:
    """Spatial side of a base's output for a square input (Keras padding rules)."""
    if name == "vgg16":
        for _ in range(5):
            size //= 2
        return size
    if name in ("efficientnet_b0", "mobilenet_v2"):
        for _ in range(5):  # stride-2 convs, 'same' / correct_pad padding
            size = -(-size // 2)
        return size
    if name == "inception_v3":  # 'valid' 3x3 convs and pools of the stem, mixed3, mixed8
        size = (size - 3) // 2 + 1 - 2  # conv 3x3/2, conv 3x3 (the third is 'same')
        size = (size - 3) // 2 + 1 - 2  # max pool 3x3/2, conv 1x1, conv 3x3
        for _ in range(3):  # max pool 3x3/2; mixed3 and mixed8 reduce with 3x3/2 'valid'
            size = (size - 3) // 2 + 1
        return size
    size = (size + 6 - 7) // 2 + 1  # ZeroPadding2D(3) + 7x7 stride-2 conv
    size = (size + 2 - 3) // 2 + 1  # ZeroPadding2D(1) + 3x3 stride-2 max pool
    for _ in range(3):  # transition pools (DenseNet) / strided 1x1 convs (ResNet)
        size = size // 2 if name.startswith("densenet") else (size - 1) // 2 + 1
    return size


def _window(size: int, window: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


class ShapeError(Exception):
    """A layer sequence that cannot be shaped; `index` is the offending layer."""

    def __init__(self, index: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.hint = hint


_KIND = {
    "conv2d": "Conv2D",
    "batchnorm": "BatchNormalization",
    "maxpool2d": "MaxPooling2D",
    "avgpool2d": "AveragePooling2D",
    "dropout": "Dropout",
    "flatten": "Flatten",
    "dense": "Dense",
    "global_avg_pool": "GlobalAveragePooling2D",
    "activation": "Activation",
}


def infer_layer(layer: Layer, shape: Shape, index: int) -> tuple[Shape, ParamCounts]:
    """Output shape and parameter counts of one layer on an input shape."""
    rank_needed = {"conv2d": 3, "maxpool2d": 3, "avgpool2d": 3, "global_avg_pool": 3}
    need = rank_needed.get(layer.type)
    if need is not None and len(shape) != need:
        raise ShapeError(index, f"{layer.type} needs a (H, W, C) input; got {shape}")
    if isinstance(layer, Conv2D):
        h, w, c = shape
        out_hw = tuple(
            _window(s, k, st, layer.padding)
            for s, k, st in zip((h, w), layer.kernel, layer.strides, strict=True)
        )
        if min(out_hw) < 1:
            raise ShapeError(
                index, f"conv2d kernel {layer.kernel} is larger than its input {shape[:2]}"
            )
        n = layer.kernel[0] * layer.kernel[1] * c * layer.filters
        n += layer.filters if layer.use_bias else 0
        return (*out_hw, layer.filters), ParamCounts(total=n, trainable=n, non_trainable=0)
    if isinstance(layer, Pool2D):
        h, w, c = shape
        strides = layer.strides or layer.pool
        if layer.padding == "valid" and (layer.pool[0] > h or layer.pool[1] > w):
            raise ShapeError(
                index, f"{layer.type} pool {layer.pool} is larger than its input {shape[:2]}"
            )
        out_hw = tuple(
            _window(s, p, st, layer.padding)
            for s, p, st in zip((h, w), layer.pool, strides, strict=True)
        )
        return (*out_hw, c), ZERO
    if isinstance(layer, BatchNorm):
        c = shape[-1]
        trainable = c * (int(layer.center) + int(layer.scale))
        return shape, ParamCounts(total=trainable + 2 * c, trainable=trainable, non_trainable=2 * c)
    if isinstance(layer, Dropout | ActivationLayer):
        return shape, ZERO
    if isinstance(layer, Flatten):
        return (math.prod(shape),), ZERO
    if isinstance(layer, GlobalAvgPool):
        return (shape[-1],), ZERO
    if isinstance(layer, Dense):
        if len(shape) != 1:
            raise ShapeError(
                index,
                f"dense needs a flat input; got shape {shape}",
                "add a flatten or global_avg_pool before it",
            )
        n = shape[0] * layer.units + (layer.units if layer.use_bias else 0)
        return (layer.units,), ParamCounts(total=n, trainable=n, non_trainable=0)
    raise ShapeError(index, f"unknown layer type {layer.type!r}")  # pragma: no cover


def _layers(rows: list[LayerRow], layers: tuple[Layer, ...], shape: Shape, where: str) -> Shape:
    seen: dict[str, int] = {}
    for i, layer in enumerate(layers):
        try:
            shape, counts = infer_layer(layer, shape, i)
        except ShapeError as e:
            raise UserError(f"{where}[{i}] ({layer.type}): {e}", e.hint) from None
        seen[layer.type] = seen.get(layer.type, 0) + 1
        rows.append(LayerRow(f"{layer.type}_{seen[layer.type]}", _KIND[layer.type], shape, counts))
    return shape


def trainable_start(spec: Spec, model: PretrainedModel, index: int) -> int:
    """Index in BASE_LAYERS of the first layer `base.trainable_from` unfreezes, or a UserError."""
    name, where = model.base.name, f"{spec.source}: models[{index}].base.trainable_from"
    if name not in BASE_LAYERS:
        raise UserError(
            f"{where}: {name} has no layer table in this harness; bases that take "
            f"trainable_from: {', '.join(BASE_LAYERS)}",
            "use frozen: true or frozen: false for this base",
        )
    start = first_trainable(name, model.base.trainable_from or "")
    if start is None:
        layers = BASE_LAYERS[name]
        raise UserError(
            f"{where}: {name} has no block or layer '{model.base.trainable_from}'; blocks: "
            f"{', '.join(block_names(name))} (or a layer name such as {layers[-3].name})"
        )
    return start


def infer_model(spec: Spec, model: Model, index: int | None = None) -> Inference:
    """Per-layer shapes and the model's parameter counts, the Keras way."""
    if index is None:
        index = [m.name for m in spec.models].index(model.name)
    size = spec.data.image_size
    input_shape: Shape = (size, size, spec.data.channels)
    rows: list[LayerRow] = []
    if isinstance(model, RandomModel):
        return Inference(model.name, input_shape, (), ZERO, (1,))
    if isinstance(model, SequentialModel):
        out = _layers(rows, model.layers, input_shape, f"{spec.source}: models[{index}].layers")
    else:
        if not isinstance(model, PretrainedModel):
            raise TypeError(f"unknown model kind {model.kind}")
        info = BASE_TABLE[model.base.name]
        if spec.data.channels != 3:
            raise UserError(
                f"{spec.source}: models[{index}].base: {model.base.name} needs 3 input channels; "
                f"data.channels is {spec.data.channels}",
                "set data.channels: 3 (grayscale is replicated to RGB)",
            )
        if size < info.min_size:
            raise UserError(
                f"{spec.source}: models[{index}].base: {model.base.name} needs images of at least "
                f"{info.min_size} px; data.image_size is {size}",
                f"set data.image_size to {info.min_size} or more",
            )
        expected = info.normalization
        if expected is not None and spec.normalization(model) != expected:
            raise UserError(
                f"{spec.source}: models[{index}].base: {model.base.name} expects inputs with "
                f"normalization '{expected}'; the model gets '{spec.normalization(model)}'",
                f"set normalization: {expected} on the model (or data.normalization)",
            )
        side = _base_spatial(model.base.name, size)
        base_counts = info.counts
        if model.base.trainable_from is not None:
            trainable, non_trainable = frozen_counts(
                model.base.name, trainable_start(spec, model, index)
            )
            base_counts = ParamCounts(
                total=trainable + non_trainable, trainable=trainable, non_trainable=non_trainable
            )
        elif model.base.frozen:
            base_counts = ParamCounts(
                total=base_counts.total, trainable=0, non_trainable=base_counts.total
            )
        base_shape = (side, side, info.channels)
        rows.append(LayerRow(model.base.name, "Functional", base_shape, base_counts))
        out = _layers(rows, model.head, base_shape, f"{spec.source}: models[{index}].head")
    total = ZERO
    for r in rows:
        total = total + r.params
    return Inference(model.name, input_shape, tuple(rows), total, out)


def stage_counts(spec: Spec, model: Model, index: int) -> list[tuple[Stage, ParamCounts]]:
    """Each `train.stages` stage with its parameter counts (what trains in it); [] without
    stages. A stage's trainable_from is checked against harness.base_layers like the base's."""
    if not isinstance(model, PretrainedModel) or not model.train.stages:
        return []
    out = []
    for k, stage in enumerate(model.train.stages):
        if stage.trainable_from is not None and first_trainable(
            model.base.name, stage.trainable_from
        ) is None:
            where = f"{spec.source}: models[{index}].train.stages[{k}].trainable_from"
            if model.base.name not in BASE_LAYERS:
                raise UserError(
                    f"{where}: {model.base.name} has no layer table in this harness; bases "
                    f"that take trainable_from: {', '.join(BASE_LAYERS)}",
                    "use frozen: true or frozen: false in this stage",
                )
            raise UserError(
                f"{where}: {model.base.name} has no block or layer '{stage.trainable_from}'; "
                f"blocks: {', '.join(block_names(model.base.name))} (or a layer name such as "
                f"{BASE_LAYERS[model.base.name][-3].name})"
            )
        base = model.base.model_copy(update={"frozen": stage.head_only,
                                             "trainable_from": stage.trainable_from})
        variant = model.model_copy(update={"base": base})
        out.append((stage, infer_model(spec, variant, index).counts))
    return out


def check_output(spec: Spec, inference: Inference, index: int) -> None:
    """The models of this harness are binary classifiers: one sigmoid unit at the end."""
    if inference.output_shape != (1,):
        raise UserError(
            f"{spec.source}: models[{index}]: the model must end in a single unit (binary "
            f"classifier); its output shape is {inference.output_shape}",
            "end with {type: dense, units: 1, activation: sigmoid}",
        )
