"""Shape and parameter inference against the paper's printed numbers (Fig. 3, Fig. 4).

    .venv/bin/python -m pytest tests/test_shapes.py -q

Keras rules, channels last, no batch axis; BatchNorm moving statistics are non-trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter

from harness.base_layers import BASE_LAYERS
from harness.errors import UserError
from harness.shapes import (
    BASE_TABLE,
    ZERO,
    ShapeError,
    _base_spatial,
    check_output,
    infer_layer,
    infer_model,
)
from harness.spec import Layer, ParamCounts, Spec, load_spec

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "specs" / "paper.yaml"
DEMO = ROOT / "specs" / "demo.yaml"
CNN, DENSENET = 1, 2

_LAYER = TypeAdapter(Layer)


def layer(**fields: Any) -> Any:
    return _LAYER.validate_python(fields)


def tiny_spec(layers: list[dict[str, Any]], image_size: int = 8, channels: int = 3) -> Spec:
    return Spec.model_validate({
        "name": "tiny",
        "paper": {"title": "t", "reference": "r"},
        "data": {"dataset": "synthetic", "image_size": image_size, "channels": channels},
        "models": [{"name": "m", "kind": "sequential", "layers": layers,
                    "train": {"optimizer": {"name": "adam"}, "epochs": 1, "batch_size": 1}}],
    })


@pytest.fixture(scope="module")
def paper() -> Spec:
    return load_spec(PAPER)


# ---------------------------------------------------------------------------------------------
# The paper's CNN, row by row (Fig. 3)

CNN_ROWS = [
    # name, Keras class, output shape, params
    ("conv2d_1", "Conv2D", (224, 224, 16), 448),
    ("batchnorm_1", "BatchNormalization", (224, 224, 16), 64),
    ("maxpool2d_1", "MaxPooling2D", (112, 112, 16), 0),
    ("dropout_1", "Dropout", (112, 112, 16), 0),
    ("conv2d_2", "Conv2D", (112, 112, 32), 4640),
    ("batchnorm_2", "BatchNormalization", (112, 112, 32), 128),
    ("maxpool2d_2", "MaxPooling2D", (56, 56, 32), 0),
    ("dropout_2", "Dropout", (56, 56, 32), 0),
    ("conv2d_3", "Conv2D", (56, 56, 64), 18496),
    ("batchnorm_3", "BatchNormalization", (56, 56, 64), 256),
    ("maxpool2d_3", "MaxPooling2D", (28, 28, 64), 0),
    ("dropout_3", "Dropout", (28, 28, 64), 0),
    ("conv2d_4", "Conv2D", (28, 28, 128), 73856),
    ("batchnorm_4", "BatchNormalization", (28, 28, 128), 512),
    ("maxpool2d_4", "MaxPooling2D", (14, 14, 128), 0),
    ("dropout_4", "Dropout", (14, 14, 128), 0),
    ("flatten_1", "Flatten", (25088,), 0),
    ("dense_1", "Dense", (128,), 3211392),
    ("dense_2", "Dense", (1,), 129),
]


def test_paper_cnn_rows(paper: Spec) -> None:
    inf = infer_model(paper, paper.models[CNN], CNN)
    assert inf.model == "cnn"
    assert inf.input_shape == (224, 224, 3)
    assert [(r.name, r.kind, r.shape, r.params.total) for r in inf.rows] == CNN_ROWS
    assert inf.output_shape == (1,)


def test_paper_cnn_totals(paper: Spec) -> None:
    inf = infer_model(paper, paper.models[CNN])  # index found by name
    assert inf.counts == ParamCounts(total=3_309_921, trainable=3_309_441, non_trainable=480)
    # the non-trainable 480 are the BatchNorm moving means and variances: 2 x (16+32+64+128)
    assert [r.params.non_trainable for r in inf.rows if r.kind == "BatchNormalization"] == \
        [32, 64, 128, 256]
    printed = paper.models[CNN].printed_params
    assert printed is not None
    assert (printed.total, printed.trainable, printed.non_trainable) == \
        (inf.counts.total, inf.counts.trainable, inf.counts.non_trainable)


def test_paper_densenet(paper: Spec) -> None:
    inf = infer_model(paper, paper.models[DENSENET], DENSENET)
    assert [(r.name, r.kind, r.shape, r.params) for r in inf.rows] == [
        ("densenet169", "Functional", (7, 7, 1664), ParamCounts(
            total=12_642_880, trainable=0, non_trainable=12_642_880
        )),
        ("global_avg_pool_1", "GlobalAveragePooling2D", (1664,), ZERO),
        ("dense_1", "Dense", (1,), ParamCounts(total=1665, trainable=1665, non_trainable=0)),
    ]
    assert inf.counts == ParamCounts(total=12_644_545, trainable=1_665, non_trainable=12_642_880)
    printed = paper.models[DENSENET].printed_params
    assert printed is not None and printed.total == inf.counts.total


def test_unfrozen_base_counts_as_trainable() -> None:
    spec = load_spec(PAPER, ["models.densenet.base.frozen=false"])
    inf = infer_model(spec, spec.models[DENSENET], DENSENET)
    assert inf.rows[0].params == ParamCounts(
        total=12_642_880, trainable=12_484_480, non_trainable=158_400
    )  # BN statistics stay
    assert inf.counts == ParamCounts(total=12_644_545, trainable=12_486_145, non_trainable=158_400)


def test_baseline_has_no_parameters(paper: Spec) -> None:
    inf = infer_model(paper, paper.models[0], 0)
    assert (inf.rows, inf.counts, inf.output_shape) == ((), ZERO, (1,))


def test_demo_cnn_at_64_px() -> None:
    """64 -> 32 -> 16 -> 8 -> 4; flatten 4*4*128 = 2048; dense 2048*128 + 128 = 262,272."""
    demo = load_spec(DEMO)
    inf = infer_model(demo, demo.model("cnn"))
    assert inf.rows[16].shape == (2048,)
    assert inf.rows[17].params.total == 262_272
    assert inf.counts == ParamCounts(total=360_801, trainable=360_321, non_trainable=480)
    dn = infer_model(demo, demo.model("densenet"))
    assert dn.rows[0].shape == (2, 2, 1664)
    assert dn.counts.total == 12_644_545  # the head does not depend on the image size


def test_base_table_is_consistent() -> None:
    for name, info in BASE_TABLE.items():
        assert info.counts.trainable + info.counts.non_trainable == info.counts.total, name
    assert BASE_TABLE["densenet169"].channels == 1664
    assert BASE_TABLE["densenet121"].counts.total == 7_037_504
    assert BASE_TABLE["resnet50"].counts.total == 23_587_712
    assert BASE_TABLE["vgg16"].counts == ParamCounts(
        total=14_714_688, trainable=14_714_688, non_trainable=0
    )
    assert BASE_TABLE["efficientnet_b0"].counts == ParamCounts(
        total=4_049_571, trainable=4_007_548, non_trainable=42_023
    )
    assert BASE_TABLE["mobilenet_v2"].counts == ParamCounts(
        total=2_257_984, trainable=2_223_872, non_trainable=34_112
    )
    assert BASE_TABLE["inception_v3"].counts == ParamCounts(
        total=21_802_784, trainable=21_768_352, non_trainable=34_432
    )


@pytest.mark.parametrize(
    ("base", "size", "side"),
    [
        ("densenet169", 224, 7), ("densenet121", 224, 7), ("resnet50", 224, 7), ("vgg16", 224, 7),
        ("densenet169", 64, 2), ("vgg16", 64, 2), ("densenet169", 32, 1), ("resnet50", 32, 1),
        # odd: pad 3 + 7x7/2 -> 113; pad 1 + 3x3/2 -> 57; DenseNet avg-pools floor (28, 14, 7),
        # ResNet's strided 1x1 convs ceil (29, 15, 8); VGG's pools floor
        ("densenet169", 225, 7), ("resnet50", 225, 8), ("vgg16", 225, 7),
        # five stride-2 'same' / correct_pad steps ceil: 33 -> 17, 9, 5, 3, 2
        ("efficientnet_b0", 224, 7), ("mobilenet_v2", 33, 2), ("efficientnet_b0", 32, 1),
        # 'valid' 3x3s of the stem and of mixed3/mixed8: 299 -> 149, 147, 73, 71, 35, 17, 8
        ("inception_v3", 299, 8), ("inception_v3", 75, 1), ("inception_v3", 139, 3),
    ],
)
def test_base_output_side(base: str, size: int, side: int) -> None:
    assert _base_spatial(base, size) == side


# ---------------------------------------------------------------------------------------------
# One layer at a time


@pytest.mark.parametrize(
    ("fields", "shape", "out", "params"),
    [
        # same padding: ceil(size / stride), also for odd sizes
        ({"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2, "padding": "same"},
         (7, 7, 3), (4, 4, 4), 112),
        ({"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2, "padding": "same"},
         (8, 9, 3), (4, 5, 4), 112),
        # valid padding: floor((size - kernel) / stride) + 1
        ({"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2}, (7, 7, 3), (3, 3, 4), 112),
        ({"type": "conv2d", "filters": 4, "kernel": 3, "strides": 2}, (8, 8, 3), (3, 3, 4), 112),
        ({"type": "conv2d", "filters": 4, "kernel": [3, 1]}, (5, 5, 2), (3, 5, 4), 28),
        ({"type": "conv2d", "filters": 4, "kernel": 3, "use_bias": False},
         (5, 5, 3), (3, 3, 4), 108),
        # pools: strides default to the pool; explicit strides; same padding ceils
        ({"type": "maxpool2d", "pool": 2}, (7, 7, 5), (3, 3, 5), 0),
        ({"type": "maxpool2d", "pool": 3, "strides": 2}, (224, 224, 16), (111, 111, 16), 0),
        ({"type": "maxpool2d", "pool": 3, "strides": 1}, (5, 5, 1), (3, 3, 1), 0),
        ({"type": "avgpool2d", "pool": 2, "padding": "same"}, (7, 7, 5), (4, 4, 5), 0),
        ({"type": "avgpool2d", "pool": 2, "strides": [1, 2]}, (4, 4, 1), (3, 2, 1), 0),
        ({"type": "global_avg_pool"}, (7, 7, 1664), (1664,), 0),
        ({"type": "flatten"}, (14, 14, 128), (25088,), 0),
        ({"type": "dense", "units": 128}, (25088,), (128,), 3_211_392),
        ({"type": "dense", "units": 3, "use_bias": False}, (4,), (3,), 12),
        ({"type": "dropout", "rate": 0.5}, (3, 3, 2), (3, 3, 2), 0),
        ({"type": "activation", "activation": "relu"}, (6,), (6,), 0),
        ({"type": "batchnorm"}, (4, 4, 16), (4, 4, 16), 64),
        ({"type": "batchnorm"}, (10,), (10,), 40),  # after a dense layer: per feature
    ],
)
def test_infer_layer(fields: dict[str, Any], shape: tuple[int, ...], out: tuple[int, ...],
                     params: int) -> None:
    got_shape, counts = infer_layer(layer(**fields), shape, 0)
    assert got_shape == out
    assert counts.total == params


def test_batchnorm_counts() -> None:
    assert infer_layer(layer(type="batchnorm"), (2, 2, 16), 0)[1] == ParamCounts(
        total=64, trainable=32, non_trainable=32
    )
    assert infer_layer(layer(type="batchnorm", center=False), (2, 2, 16), 0)[1] == \
        ParamCounts(total=48, trainable=16, non_trainable=32)
    assert infer_layer(layer(type="batchnorm", center=False, scale=False), (16,), 0)[1] == \
        ParamCounts(total=32, trainable=0, non_trainable=32)


@pytest.mark.parametrize(
    ("fields", "shape", "message"),
    [
        ({"type": "dense", "units": 1}, (4, 4, 3), "dense needs a flat input; got shape (4, 4, 3)"),
        ({"type": "maxpool2d", "pool": 3}, (2, 2, 3),
         "maxpool2d pool (3, 3) is larger than its input (2, 2)"),
        ({"type": "avgpool2d", "pool": [1, 5]}, (4, 4, 3),
         "avgpool2d pool (1, 5) is larger than its input (4, 4)"),
        ({"type": "conv2d", "filters": 2, "kernel": 5}, (4, 4, 3),
         "conv2d kernel (5, 5) is larger than its input (4, 4)"),
        ({"type": "conv2d", "filters": 2, "kernel": 5, "strides": 2}, (3, 3, 3),
         "conv2d kernel (5, 5) is larger than its input (3, 3)"),
        ({"type": "conv2d", "filters": 2, "kernel": 3}, (12,),
         "conv2d needs a (H, W, C) input; got (12,)"),
        ({"type": "maxpool2d"}, (12,), "maxpool2d needs a (H, W, C) input; got (12,)"),
        ({"type": "global_avg_pool"}, (12,), "global_avg_pool needs a (H, W, C) input; got (12,)"),
    ],
)
def test_infer_layer_errors(fields: dict[str, Any], shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ShapeError) as info:
        infer_layer(layer(**fields), shape, 4)
    assert str(info.value) == message
    assert info.value.index == 4


def test_same_padding_pool_larger_than_input_is_allowed() -> None:
    pool = layer(type="maxpool2d", pool=4, padding="same")
    assert infer_layer(pool, (2, 2, 1), 0)[0] == (1, 1, 1)
    conv = layer(type="conv2d", filters=1, kernel=5, padding="same")
    assert infer_layer(conv, (2, 2, 1), 0)[0] == (2, 2, 1)


# ---------------------------------------------------------------------------------------------
# Whole models that cannot be shaped: one line naming file, model, layer


def _error(spec: Spec, index: int = 0) -> UserError:
    with pytest.raises(UserError) as info:
        model = spec.models[index]
        check_output(spec, infer_model(spec, model, index), index)
    return info.value


def test_dense_before_flatten() -> None:
    spec = tiny_spec([{"type": "conv2d", "filters": 2, "kernel": 3},
                      {"type": "dense", "units": 1}])
    err = _error(spec)
    assert err.message == ("spec 'tiny': models[0].layers[1] (dense): dense needs a flat input; "
                           "got shape (6, 6, 2)")
    assert err.hint == "add a flatten or global_avg_pool before it"


def test_pool_larger_than_input() -> None:
    spec = tiny_spec([{"type": "maxpool2d", "pool": 4}, {"type": "maxpool2d", "pool": 4},
                      {"type": "flatten"}, {"type": "dense", "units": 1}])
    assert _error(spec).message == ("spec 'tiny': models[0].layers[1] (maxpool2d): maxpool2d pool "
                                    "(4, 4) is larger than its input (2, 2)")


def test_conv_kernel_larger_than_input() -> None:
    spec = tiny_spec([{"type": "conv2d", "filters": 2, "kernel": 9}, {"type": "flatten"},
                      {"type": "dense", "units": 1}])
    assert _error(spec).message == ("spec 'tiny': models[0].layers[0] (conv2d): conv2d kernel "
                                    "(9, 9) is larger than its input (8, 8)")


def test_output_must_be_one_unit() -> None:
    spec = tiny_spec([{"type": "flatten"}, {"type": "dense", "units": 2}])
    err = _error(spec)
    assert err.message == ("spec 'tiny': models[0]: the model must end in a single unit (binary "
                           "classifier); its output shape is (2,)")
    spec = tiny_spec([{"type": "conv2d", "filters": 1, "kernel": 1}])
    assert _error(spec).message.endswith("its output shape is (8, 8, 1)")


def test_errors_from_a_loaded_spec_name_its_file(tmp_path: Path) -> None:
    data = yaml.safe_load(PAPER.read_text(encoding="utf-8"))
    data["models"][CNN]["layers"][2]["strides"] = 8  # 224 -> 28 after the first pool
    data["models"][CNN]["layers"].insert(3, {"type": "maxpool2d", "pool": 32})
    del data["assumptions"]  # they point at layer indices that moved
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    spec = load_spec(path)
    assert _error(spec, CNN).message == (f"{path}: models[1].layers[3] (maxpool2d): maxpool2d "
                                         "pool (32, 32) is larger than its input (28, 28)")


def test_base_needs_three_channels() -> None:
    spec = load_spec(PAPER, ["data.channels=1"])
    infer_model(spec, spec.models[CNN], CNN)  # the CNN takes one channel
    err = _error(spec, DENSENET)
    assert err.message.endswith("specs/paper.yaml: models[2].base: densenet169 needs 3 input "
                                "channels; data.channels is 1")
    assert err.hint == "set data.channels: 3 (grayscale is replicated to RGB)"


def test_base_min_size() -> None:
    spec = load_spec(PAPER, ["data.image_size=16"])
    err = _error(spec, DENSENET)
    assert err.message.endswith("specs/paper.yaml: models[2].base: densenet169 needs images of at "
                                "least 32 px; data.image_size is 16")
    assert err.hint == "set data.image_size to 32 or more"
    spec = load_spec(PAPER, ["data.image_size=32"])
    assert infer_model(spec, spec.models[DENSENET], DENSENET).rows[0].shape == (1, 1, 1664)


def test_head_must_be_shaped_too() -> None:
    spec = load_spec(PAPER, ["models.densenet.head=[{type: dense, units: 1}]"])
    err = _error(spec, DENSENET)
    assert err.message.endswith("specs/paper.yaml: models[2].head[0] (dense): dense needs a flat "
                                "input; got shape (7, 7, 1664)")


# ---------------------------------------------------------------------------------------------
# Partial fine-tuning: base.trainable_from unfreezes a base from a Keras layer or block on


def test_base_layer_tables_sum_to_the_base_table() -> None:
    for name, layers in BASE_LAYERS.items():
        trainable = sum(layer.trainable for layer in layers)
        stats = sum(layer.non_trainable for layer in layers)
        assert ParamCounts(total=trainable + stats, trainable=trainable,
                           non_trainable=stats) == BASE_TABLE[name].counts, name


@pytest.mark.parametrize(
    ("base", "start", "trainable"),
    [
        # conv5 of DenseNet169 by hand: 32 layers on c_i = 640 + 32 i channels, each
        # BN(c_i) 2 c_i + 1x1 conv c_i*128 + BN(128) 256 + 3x3 conv 9*128*32; then bn(1664) 3328:
        # 130 * 36,352 + 32 * 37,120 + 3,328
        ("densenet169", "conv5", 5_916_928),
        ("densenet169", "conv5_block1_0_bn", 5_916_928),
        ("densenet169", "bn", 3_328),
        ("densenet169", "conv1", 12_484_480),  # everything: the first layer
        ("vgg16", "block5", 3 * (9 * 512 * 512 + 512)),
        ("vgg16", "block5_conv3", 9 * 512 * 512 + 512),
    ],
)
def test_trainable_from_counts(base: str, start: str, trainable: int) -> None:
    spec = load_spec(PAPER, [f"models.densenet.base.name={base}",
                             "models.densenet.base.frozen=false",
                             f"models.densenet.base.trainable_from={start}"])
    inf = infer_model(spec, spec.models[DENSENET], DENSENET)
    total = BASE_TABLE[base].counts.total
    assert inf.rows[0].params == ParamCounts(
        total=total, trainable=trainable, non_trainable=total - trainable)
    head = BASE_TABLE[base].channels + 1
    assert inf.counts == ParamCounts(
        total=total + head, trainable=trainable + head, non_trainable=total - trainable)


def test_trainable_from_unknown_name_lists_the_blocks() -> None:
    spec = load_spec(PAPER, ["models.densenet.base.frozen=false",
                             "models.densenet.base.trainable_from=conv6"])
    with pytest.raises(UserError) as info:
        infer_model(spec, spec.models[DENSENET], DENSENET)
    assert str(info.value).splitlines()[0] == (
        f"{spec.source}: models[{DENSENET}].base.trainable_from: densenet169 has no block or "
        "layer 'conv6'; blocks: conv1, pool1, conv2, pool2, conv3, pool3, conv4, pool4, conv5, "
        "bn, relu (or a layer name such as conv5_block32_concat)"
    )


@pytest.mark.parametrize(("base", "expected"), [
    ("efficientnet_b0", "none"), ("mobilenet_v2", "tf"), ("inception_v3", "tf"),
])
def test_a_base_refuses_inputs_it_was_not_trained_on(base: str, expected: str) -> None:
    spec = load_spec(PAPER, [f"models.densenet.base.name={base}", "data.image_size=80",
                             "models.densenet.printed_params=null"])
    with pytest.raises(UserError) as info:
        infer_model(spec, spec.models[DENSENET], DENSENET)
    assert str(info.value).splitlines()[0] == (
        f"{spec.source}: models[{DENSENET}].base: {base} expects inputs with normalization "
        f"'{expected}'; the model gets 'imagenet'"
    )
    spec = load_spec(PAPER, [f"models.densenet.base.name={base}", "data.image_size=80",
                             "models.densenet.printed_params=null",
                             f"models.densenet.normalization={expected}"])
    inference = infer_model(spec, spec.models[DENSENET], DENSENET)
    total = BASE_TABLE[base].counts.total  # the paper's base is frozen
    assert inference.rows[0].params == ParamCounts(total=total, trainable=0, non_trainable=total)


def test_inception_v3_needs_75_px() -> None:
    spec = load_spec(PAPER, ["models.densenet.base.name=inception_v3", "data.image_size=74",
                             "models.densenet.printed_params=null",
                             "models.densenet.normalization=tf"])
    with pytest.raises(UserError) as info:
        infer_model(spec, spec.models[DENSENET], DENSENET)
    assert "inception_v3 needs images of at least 75 px; data.image_size is 74" in str(info.value)


def test_trainable_from_on_a_base_without_layer_table() -> None:
    spec = load_spec(PAPER, ["models.densenet.base.name=resnet50",
                             "models.densenet.base.frozen=false",
                             "models.densenet.base.trainable_from=conv5"])
    with pytest.raises(UserError) as info:
        infer_model(spec, spec.models[DENSENET], DENSENET)
    assert "resnet50 has no layer table in this harness; bases that take trainable_from: " \
        "densenet121, densenet169, densenet201, vgg16" in str(info.value)


def test_trainable_from_needs_frozen_false() -> None:
    with pytest.raises(UserError) as info:
        load_spec(PAPER, ["models.densenet.base.trainable_from=conv5"])
    assert str(info.value).splitlines()[0] == (
        "specs/paper.yaml: models[2].base: trainable_from: conv5 trains part of the base, but "
        "frozen is true; set frozen: false (the base then trains from conv5 on) "
        "(from --set models.densenet.base.trainable_from=conv5)")
