"""The layer sequence of each pretrained base, in pure Python: Keras names and parameter counts.

    python -m harness validate spec.yaml    # `base.trainable_from` is checked and counted here

keras.applications builds a base as a flat list of named layers; `trainable_from: <name>` makes
the layers from the first one named `<name>` (or `<name>_...`, a block such as `conv5`) trainable
and keeps the earlier ones frozen (weights fixed, BatchNorm in inference mode: Keras'
trainable=False). Both backends apply that rule by these names; harness.shapes counts with it.
Layers without weights that Keras names by a session counter (input, zero padding) are left out:
they freeze nothing. Bases without a table here refuse `trainable_from` (harness.shapes says so).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseLayer:
    name: str  # Keras layer name, e.g. "conv5_block1_0_bn"
    trainable: int  # parameters a trainable layer trains (BN: gamma and beta)
    non_trainable: int  # BatchNorm moving mean and variance


def _bn(name: str, c: int) -> BaseLayer:
    return BaseLayer(name, 2 * c, 2 * c)


def _plain(name: str) -> BaseLayer:
    return BaseLayer(name, 0, 0)


def _densenet(blocks: tuple[int, int, int, int], growth: int = 32) -> tuple[BaseLayer, ...]:
    """keras.applications.densenet: conv1, dense blocks conv2..conv5, transitions pool2..pool4."""
    out = [BaseLayer("conv1_conv", 7 * 7 * 3 * 64, 0), _bn("conv1_bn", 64), _plain("conv1_relu"),
           _plain("pool1")]
    c = 64
    for stage, n in enumerate(blocks, start=2):
        for i in range(1, n + 1):
            p = f"conv{stage}_block{i}"
            out += [_bn(f"{p}_0_bn", c), _plain(f"{p}_0_relu"),
                    BaseLayer(f"{p}_1_conv", c * 4 * growth, 0), _bn(f"{p}_1_bn", 4 * growth),
                    _plain(f"{p}_1_relu"), BaseLayer(f"{p}_2_conv", 9 * 4 * growth * growth, 0),
                    _plain(f"{p}_concat")]
            c += growth
        if stage < 5:
            p = f"pool{stage}"
            out += [_bn(f"{p}_bn", c), _plain(f"{p}_relu"), BaseLayer(f"{p}_conv", c * (c // 2), 0),
                    _plain(f"{p}_pool")]
            c //= 2
    return (*out, _bn("bn", c), _plain("relu"))


def _vgg16() -> tuple[BaseLayer, ...]:
    out, c = [], 3
    for block, (n, filters) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)), 1):
        for i in range(1, n + 1):
            out.append(BaseLayer(f"block{block}_conv{i}", 9 * c * filters + filters, 0))
            c = filters
        out.append(_plain(f"block{block}_pool"))
    return tuple(out)


BASE_LAYERS: dict[str, tuple[BaseLayer, ...]] = {
    "densenet121": _densenet((6, 12, 24, 16)),
    "densenet169": _densenet((6, 12, 32, 32)),
    "densenet201": _densenet((6, 12, 48, 32)),
    "vgg16": _vgg16(),
}


def matches(layer: str, name: str) -> bool:
    """`name` names this layer or a block it belongs to (`conv5` matches `conv5_block1_0_bn`)."""
    return layer == name or layer.startswith(name + "_")


def first_trainable(base: str, name: str) -> int | None:
    """Index in BASE_LAYERS[base] of the first layer `trainable_from: name` unfreezes."""
    for i, layer in enumerate(BASE_LAYERS[base]):
        if matches(layer.name, name):
            return i
    return None


def block_names(base: str) -> list[str]:
    """The blocks a spec may name (the first part of the layer names, in order)."""
    seen: dict[str, None] = {}
    for layer in BASE_LAYERS[base]:
        seen.setdefault(layer.name.split("_")[0], None)
    return list(seen)


def frozen_counts(base: str, start: int) -> tuple[int, int]:
    """(trainable, non-trainable) parameters when layers from index `start` on train."""
    layers = BASE_LAYERS[base]
    trainable = sum(layer.trainable for layer in layers[start:])
    total = sum(layer.trainable + layer.non_trainable for layer in layers)
    return trainable, total - trainable
