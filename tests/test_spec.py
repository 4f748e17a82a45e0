"""The spec language: every bad input fails with one line naming file, field, found and allowed.

    .venv/bin/python -m pytest tests/test_spec.py -q

Each bad-input test edits a copy of specs/paper.yaml in tmp_path and asserts the UserError's text;
a subset also runs `python -m harness validate FILE` to check the exit code and the stderr shape.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from backends.registry import REGISTRY
from harness.errors import EXIT_USER_ERROR, UserError
from harness.shapes import infer_model
from harness.spec import (
    LAYER_TYPES,
    Adam,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Pool2D,
    PretrainedModel,
    RandomModel,
    SequentialModel,
    Spec,
    check_backends,
    load_spec,
    merge,
    split_path,
)
from harness.vocab import PAPER_MODELS, Supports

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "specs" / "paper.yaml"
DEMO = ROOT / "specs" / "demo.yaml"
_PAPER_RAW: dict[str, Any] = yaml.safe_load(PAPER.read_text(encoding="utf-8"))

# indices into paper.yaml's models and the CNN's layers
BASELINE, CNN, DENSENET = 0, 1, 2
CONV_1, BN_1, POOL_1, DROP_1 = 0, 1, 2, 3


def paper_raw() -> dict[str, Any]:
    return copy.deepcopy(_PAPER_RAW)


def write(tmp_path: Path, data: Any, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> UserError:
    with pytest.raises(UserError) as info:
        load_spec(path, overrides)
    return info.value


def edited(tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    data = paper_raw()
    edit(data)
    return write(tmp_path, data)


def cnn(d: dict[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = d["models"][CNN]
    return model


# ---------------------------------------------------------------------------------------------
# The paper's spec, parsed


@pytest.fixture(scope="module")
def paper() -> Spec:
    return load_spec(PAPER)


def test_paper_loads(paper: Spec) -> None:
    assert paper.name == "paper"
    assert [m.name for m in paper.models] == ["baseline", "cnn", "densenet"]
    assert [m.kind for m in paper.models] == ["random", "sequential", "pretrained"]
    assert paper.seeds == (0, 1, 2)
    assert paper.data.dataset == "mura-v1.1" and paper.data.body_parts == ("WRIST",)
    assert (paper.data.image_size, paper.data.channels) == (224, 3)
    assert paper.data.split.strategy == "image" and paper.data.split.test_fraction == 0.2
    assert len(paper.paper.claims) == 6 and len(paper.paper.contradictions[0].claims) == 4
    assert {(c.model, c.metric): (c.counts.k, c.counts.n) for c in paper.paper.claims if c.counts} \
        == {("baseline", "accuracy"): (960, 1951), ("baseline", "recall"): (384, 790),
            ("cnn", "accuracy"): (1465, 1951), ("cnn", "recall"): (475, 790),
            ("densenet", "accuracy"): (1541, 1951), ("densenet", "recall"): (543, 790)}
    assert len(paper.assumptions) == 13
    assert paper.source == "specs/paper.yaml" or paper.source.endswith("specs/paper.yaml")
    assert paper.model("cnn") is paper.models[CNN]
    assert paper.normalization(paper.models[CNN]) == "rescale"
    assert paper.normalization(paper.models[DENSENET]) == "imagenet"


def test_keras_defaults_are_written_out(paper: Spec) -> None:
    """Every value on which Keras and PyTorch differ is explicit in the parsed spec."""
    model = paper.models[CNN]
    assert isinstance(model, SequentialModel)
    conv, bn, pool, drop = model.layers[:4]
    assert isinstance(conv, Conv2D) and isinstance(bn, BatchNorm)
    assert isinstance(pool, Pool2D) and isinstance(drop, Dropout)
    assert (conv.kernel, conv.strides, conv.padding) == ((3, 3), (1, 1), "same")
    assert (conv.kernel_initializer, conv.bias_initializer, conv.use_bias) == \
        ("glorot_uniform", "zeros", True)
    assert (bn.epsilon, bn.momentum, bn.center, bn.scale) == (1e-3, 0.99, True, True)
    assert (pool.pool, pool.strides, pool.padding) == ((2, 2), None, "valid")
    assert drop.rate == 0.25
    for dense in model.layers[-2:]:
        assert isinstance(dense, Dense)
        assert (dense.kernel_initializer, dense.bias_initializer) == ("glorot_uniform", "zeros")
    assert [d.activation for d in model.layers[-2:]] == ["relu", "sigmoid"]  # type: ignore[union-attr]
    opt = model.train.optimizer
    assert isinstance(opt, Adam)
    assert (opt.learning_rate, opt.beta_1, opt.beta_2, opt.epsilon, opt.amsgrad) == \
        (1e-4, 0.9, 0.999, 1e-7, False)
    assert (model.train.loss.name, model.train.loss.epsilon, model.train.loss.label_smoothing) == \
        ("binary_crossentropy", 1e-7, 0.0)
    dn = paper.models[DENSENET]
    assert isinstance(dn, PretrainedModel)
    assert isinstance(dn.train.optimizer, Adam)
    assert (dn.train.optimizer.learning_rate, dn.train.optimizer.epsilon) == (1e-3, 1e-7)
    assert (dn.base.name, dn.base.weights, dn.base.frozen) == ("densenet169", "imagenet", True)
    # and they survive into the dump that results carry
    dumped = paper.model_dump(mode="json")["models"][CNN]
    assert dumped["layers"][BN_1] == {"type": "batchnorm", "epsilon": 1e-3, "momentum": 0.99,
                                      "center": True, "scale": True}
    assert dumped["train"]["optimizer"]["epsilon"] == 1e-7
    assert dumped["train"]["loss"]["epsilon"] == 1e-7
    assert dumped["layers"][CONV_1]["kernel_initializer"] == "glorot_uniform"


def test_baseline_is_the_reference_random_model(paper: Spec) -> None:
    model = paper.models[BASELINE]
    assert isinstance(model, RandomModel)
    assert (model.backends, model.low, model.high) == (("reference",), 0.0, 1.0)


def test_spec_is_frozen(paper: Spec) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        paper.seeds = (7,)  # type: ignore[misc]
    model = paper.models[CNN]
    assert isinstance(model, SequentialModel)
    with pytest.raises(ValidationError, match="frozen"):
        model.train.epochs = 99  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        model.layers[BN_1].epsilon = 1e-5  # type: ignore[union-attr]
    with pytest.raises(TypeError):  # lists are stored as tuples
        paper.models[0] = paper.models[1]  # type: ignore[index]
    assert model.train.epochs == 10


def test_a_value_the_spec_names_as_null_is_still_a_field_path(tmp_path: Path) -> None:
    """`data.root: null` is a real field; an assumption may point at it."""
    spec = load_spec(edited(tmp_path, lambda d: d["assumptions"][0].update(field="data.root")))
    assert spec.assumptions[0].field == "data.root" and spec.data.root is None


# ---------------------------------------------------------------------------------------------
# extends


def test_demo_extends_paper() -> None:
    demo = load_spec(DEMO)
    paper = load_spec(PAPER)
    assert demo.name == "demo"
    assert (demo.data.dataset, demo.data.image_size) == ("synthetic", 64)
    assert demo.data.split == paper.data.split  # untouched sections come from the parent
    cnn_model = demo.model("cnn")
    assert isinstance(cnn_model, SequentialModel)
    assert cnn_model.train.epochs == 12
    assert cnn_model.train.optimizer.learning_rate == 1e-3
    assert cnn_model.train.optimizer.epsilon == 1e-7  # merged into the parent's optimizer
    paper_layers = paper.model("cnn").layers  # type: ignore[union-attr]
    # `overrides:` in the spec file: BatchNorm momentum and dropout rate, the rest untouched
    bn = [getattr(x, "momentum", None) for x in cnn_model.layers if x.type == "batchnorm"]
    assert bn == [0.9] * 4
    assert [getattr(x, "rate", None) for x in cnn_model.layers if x.type == "dropout"] == [0.0] * 4
    assert [x.type for x in cnn_model.layers] == [x.type for x in paper_layers]
    assert cnn_model.layers[0] == paper_layers[0]
    assert cnn_model.printed_params is None  # `printed_params: null` deleted the parent's
    dn = demo.model("densenet")
    assert isinstance(dn, PretrainedModel)
    assert (dn.base.name, dn.base.weights, dn.base.frozen) == ("densenet169", "none", True)
    assert demo.seeds == (0, 1)
    assert demo.evaluation.bootstrap.resamples == 1000
    assert demo.evaluation.bootstrap.unit == "patient"  # merged, not replaced
    assert len(demo.assumptions) == len(paper.assumptions) + 3  # merged by `what`


def test_spec_file_overrides_errors(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {PAPER}\noverrides:\n  - models.cnn.layers[99].rate=0.1\n")
    with pytest.raises(UserError) as err:
        load_spec(child)
    assert err.value.message == (
        f"{child}: overrides[0]: models.cnn.layers[99].rate: models.cnn.layers has 19 items; "
        "got index 99"
    )
    child.write_text(f"extends: {PAPER}\noverrides: models.cnn.train.epochs=2\n")
    with pytest.raises(UserError, match=r"overrides: must be a list of 'PATH=VALUE' strings"):
        load_spec(child)


def test_extends_merges_models_by_name_and_keeps_the_rest(tmp_path: Path) -> None:
    write(tmp_path, paper_raw(), "paper.yaml")
    child = write(tmp_path, {
        "extends": "paper.yaml",
        "name": "child",
        "data": {"image_size": 96},
        "models": [{"name": "cnn", "train": {"epochs": 4}},
                   {"name": "extra", "kind": "random"}],
    }, "child.yaml")
    spec = load_spec(child)
    paper = load_spec(PAPER)
    assert spec.name == "child"
    assert spec.data.image_size == 96
    assert spec.data.model_dump(exclude={"image_size"}) == \
        paper.data.model_dump(exclude={"image_size"})
    assert [m.name for m in spec.models] == ["baseline", "cnn", "densenet", "extra"]
    cnn_model = spec.model("cnn")
    assert isinstance(cnn_model, SequentialModel)
    assert cnn_model.train.epochs == 4
    assert cnn_model.train.batch_size == 32
    assert cnn_model.train.optimizer.learning_rate == 1e-4
    assert cnn_model.printed_params == paper.model("cnn").printed_params
    assert spec.model("densenet") == paper.model("densenet")
    assert spec.paper == paper.paper and spec.assumptions == paper.assumptions


def test_extends_null_deletes_a_mapping_and_lists_are_replaced(tmp_path: Path) -> None:
    write(tmp_path, paper_raw(), "paper.yaml")
    child = write(tmp_path, {"extends": "paper.yaml", "augmentation": None, "seeds": [5],
                             "models": [{"name": "cnn",
                                         "layers": [{"type": "flatten"},
                                                    {"type": "dense", "units": 1}],
                                         "printed_params": None}],
                             "assumptions": []}, "child.yaml")
    spec = load_spec(child)
    assert spec.augmentation.rotation == 0.0 and spec.augmentation.hflip is False  # defaults
    assert spec.seeds == (5,)
    assert [layer.type for layer in spec.model("cnn").layers] == ["flatten", "dense"]  # type: ignore[union-attr]


def test_extends_chain_resolves_parents_relative_to_each_child(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "variants").mkdir()
    write(tmp_path / "base", paper_raw(), "paper.yaml")
    write(tmp_path / "variants", {"extends": "../base/paper.yaml", "seeds": [1, 2]}, "mid.yaml")
    leaf = write(tmp_path, {"extends": "variants/mid.yaml", "name": "leaf",
                            "runtime": {"device": "cpu"}}, "leaf.yaml")
    spec = load_spec(leaf)
    assert (spec.name, spec.seeds, spec.runtime.device) == ("leaf", (1, 2), "cpu")
    assert spec.runtime.timeout_s == 21600


def test_merge_semantics() -> None:
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert merge({"a": {"b": 1}, "x": 1}, {"a": None}) == {"x": 1}
    assert merge({"a": 1}, {"a": None}) == {"a": None}  # a scalar is set to null, not deleted
    assert merge([1, 2], [3]) == [3]
    assert merge([{"name": "a", "v": 1}, {"name": "b", "v": 2}], [{"name": "b", "v": 3}]) == \
        [{"name": "a", "v": 1}, {"name": "b", "v": 3}]


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, {"extends": "b.yaml", "name": "a"}, "a.yaml")
    write(tmp_path, {"extends": "a.yaml", "name": "b"}, "b.yaml")
    msg = str(error_of(tmp_path / "a.yaml"))
    assert msg.startswith(f"{tmp_path / 'b.yaml'}: extends: cycle: ")
    assert msg.endswith(f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}")


def test_extends_itself(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends": "self.yaml"}, "self.yaml")
    assert str(error_of(path)) == f"{path}: extends: cycle: {path} -> {path}"


def test_extends_missing_parent(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends": "nope.yaml", "name": "x"})
    assert str(error_of(path)) == (
        f"{path}: extends: parent spec 'nope.yaml' not found (looked for {tmp_path / 'nope.yaml'})"
    )


def test_extends_must_be_a_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends": ["a.yaml"], "name": "x"})
    assert str(error_of(path)) == f"{path}: extends: must be a file path; got ['a.yaml']"


# ---------------------------------------------------------------------------------------------
# --set


@pytest.mark.parametrize(
    ("assignment", "read", "expected"),
    [
        ("models.cnn.train.epochs=3", lambda s: s.model("cnn").train.epochs, 3),
        ("models.1.train.batch_size=8", lambda s: s.models[CNN].train.batch_size, 8),
        ("models.cnn.layers[3].rate=0.5", lambda s: s.model("cnn").layers[DROP_1].rate, 0.5),
        ("models[1].layers[1].momentum=0.9", lambda s: s.models[CNN].layers[BN_1].momentum, 0.9),
        ("models.cnn.train.optimizer.learning_rate=1e-5",
         lambda s: s.model("cnn").train.optimizer.learning_rate, 1e-5),
        ("augmentation.rotation=7.5", lambda s: s.augmentation.rotation, 7.5),
        ("runtime.deterministic=false", lambda s: s.runtime.deterministic, False),
        ("data.split.stratify=true", lambda s: s.data.split.stratify, True),
        ("seeds=[0,1]", lambda s: s.seeds, (0, 1)),
        ("augmentation.scale=[0.8, 1.2]", lambda s: s.augmentation.scale, (0.8, 1.2)),
        ("data.root=/data/mura", lambda s: s.data.root, "/data/mura"),
        ("name=paper-rerun", lambda s: s.name, "paper-rerun"),
        ("models.densenet.base.weights=none", lambda s: s.model("densenet").base.weights, "none"),
        ("models.cnn.layers[0].kernel=5", lambda s: s.model("cnn").layers[CONV_1].kernel, (5, 5)),
    ],
)
def test_set_typed_values(assignment: str, read: Callable[[Spec], Any], expected: Any) -> None:
    value = read(load_spec(PAPER, [assignment]))
    assert value == expected and type(value) is type(expected)


def test_set_several_and_later_wins() -> None:
    spec = load_spec(PAPER, ["models.cnn.train.epochs=2", "models.cnn.train.epochs=5",
                             "data.image_size=64"])
    assert spec.model("cnn").train.epochs == 5  # type: ignore[union-attr]
    assert spec.data.image_size == 64


def test_set_does_not_touch_the_file() -> None:
    before = PAPER.read_bytes()
    load_spec(PAPER, ["models.cnn.train.epochs=2"])
    assert PAPER.read_bytes() == before
    assert load_spec(PAPER).model("cnn").train.epochs == 10  # type: ignore[union-attr]


def test_split_path() -> None:
    assert split_path("models.cnn.layers[3].rate") == ["models", "cnn", "layers", 3, "rate"]
    assert split_path("models.1.train.epochs") == ["models", 1, "train", "epochs"]


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("models.cnn.train.epochz=3",
         "models[1].train: unknown key 'epochz' (did you mean 'epochs'?); allowed: batch_size, "
         "checkpoint, early_stopping, epochs, loss, optimizer, schedule, shuffle, stages "
         "(from --set models.cnn.train.epochz=3)"),
        ("foo.bar=1",
         "(top level): unknown key 'foo'; allowed: assumptions, augmentation, data, evaluation, "
         "models, name, paper, runtime, seeds (from --set foo.bar=1)"),
        ("models.cnn.train.epochs=abc",
         "models[1].train.epochs: must be a valid integer, unable to parse string as an integer; "
         "got 'abc' (from --set models.cnn.train.epochs=abc)"),
        ("models.cnn.train.epochs=0",
         "models[1].train.epochs: must be greater than or equal to 1; got 0 "
         "(from --set models.cnn.train.epochs=0)"),
        ("runtime.deterministic=maybe",
         "runtime.deterministic: must be a valid boolean, unable to interpret input; got 'maybe' "
         "(from --set runtime.deterministic=maybe)"),
        ("seeds=abc", "seeds: must be a list; got 'abc' (from --set seeds=abc)"),
        ("models.cnn.train.optimizer.name=adagrad",
         "models[1].train.optimizer: unknown optimizer 'adagrad'; allowed: adam, adamw, rmsprop, "
         "sgd "
         "(from --set models.cnn.train.optimizer.name=adagrad)"),
        ("models.cnn.layers[4].type=conv3d",
         "models[1].layers[4]: unknown layer type 'conv3d'; allowed: " + ", ".join(LAYER_TYPES)
         + " (from --set models.cnn.layers[4].type=conv3d)"),
        ("models.cnn.backends=[keras, jax]",
         "models[1].backends[1]: must be one of reference, keras, keras-torch, keras-jax, torch; "
         "got 'jax' (from --set models.cnn.backends=[keras, jax])"),
        ("models.cnn.printed_params.total=5",
         "models[1].printed_params: trainable (3309441) + non_trainable (480) != total (5) "
         "(from --set models.cnn.printed_params.total=5)"),
    ],
)
def test_set_bad_value_or_key(assignment: str, expected: str) -> None:
    err = error_of(PAPER, (assignment,))
    assert str(err) == f"{err.message.split(': ', 1)[0]}: {expected}"
    assert err.message.split(": ", 1)[0].endswith("specs/paper.yaml")


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("models.vgg.train.epochs=3",
         "--set models.vgg.train.epochs: models has no item named 'vgg'; "
         "named items: baseline, cnn, densenet"),
        ("models.cnn.layers[30].rate=0.5",
         "--set models.cnn.layers[30].rate: models.cnn.layers has 19 items; got index 30"),
        ("models.cnn.layers.conv=1",
         "--set models.cnn.layers.conv: models.cnn.layers has no item named 'conv'; "
         "named items: none"),
        ("data[0]=1", "--set data[0]: data is a mapping; got index [0]"),
        ("runtime.device.kind=gpu",
         "--set runtime.device.kind: runtime.device is a value, it has no field 'kind'"),
        ("models.cnn.train.epochs",
         "--set models.cnn.train.epochs: expected PATH=VALUE, "
         "e.g. --set models.cnn.train.epochs=3"),
    ],
)
def test_set_missing_path(assignment: str, expected: str) -> None:
    assert str(error_of(PAPER, (assignment,))) == expected


def test_set_cannot_build_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = load_spec(PAPER, [f"data.root=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
    assert spec.data.root is not None and spec.data.root.startswith("!!python")  # text, never run


# ---------------------------------------------------------------------------------------------
# Bad input through load_spec: the whole one-line message


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ndata:\n  dataset: synthetic\n  image_size: [64\nseeds: [0]\n")
    err = error_of(path)
    assert str(err).startswith(f"{path}: invalid YAML at line 5, column 6: ")
    path = write(tmp_path, "name: x\n  bad: value\n")
    assert str(error_of(path)) == \
        f"{path}: invalid YAML at line 2, column 6: mapping values are not allowed here"


def test_python_tag_is_rejected_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    err = error_of(path)
    assert err.message == (f"{path}: invalid YAML at line 1, column 7: "
                           "tag '!!python/object/apply:os.system' is not allowed")
    assert err.hint and "plain data" in err.hint
    assert not marker.exists()
    path = write(tmp_path, "data: !!python/object:collections.OrderedDict {}\n")
    assert error_of(path).message.endswith(
        "tag '!!python/object:collections.OrderedDict' is not allowed")
    path = write(tmp_path, "data: !custom {}\n")
    assert error_of(path).message.endswith("tag '!custom' is not allowed")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the spec is empty"),
        ("# only a comment\n", "the spec is empty"),
        ("- a\n- b\n", "the top level must be a mapping; got list"),
        ("just text\n", "the top level must be a mapping; got str"),
    ],
)
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert str(error_of(path)) == f"{path}: {expected}"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    assert error_of(path).message == f"{path}: not a UTF-8 text file"


def test_missing_spec_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "nope.yaml")
    assert err.message == f"{tmp_path / 'nope.yaml'}: spec file not found"
    assert err.hint == "check the path; specs live in specs/"


def test_spec_path_is_a_folder(tmp_path: Path) -> None:
    err = error_of(tmp_path)
    assert err.message == f"{tmp_path}: is a folder, not a spec file"
    assert err.hint == "name a .yaml file inside it"


def _layer(i: int, **fields: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda d: cnn(d)["layers"][i].update(fields)


def _drop_assumptions(d: dict[str, Any]) -> None:
    d.pop("assumptions")


# (id, edit of paper.yaml, message after "FILE: ")
BAD_INPUTS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    # unknown keys, with a did-you-mean
    ("unknown-top-key", lambda d: d.update(seeeds=[1]),
     "(top level): unknown key 'seeeds' (did you mean 'seeds'?); allowed: assumptions, "
     "augmentation, data, evaluation, models, name, paper, runtime, seeds"),
    ("unknown-layer-key", _layer(CONV_1, filter=8),
     "models[1].layers[0]: unknown key 'filter' (did you mean 'filters'?); allowed: activation, "
     "bias_initializer, filters, kernel, kernel_initializer, padding, strides, type, use_bias"),
    ("unknown-train-key", lambda d: cnn(d)["train"].update(epoch=3),
     "models[1].train: unknown key 'epoch' (did you mean 'epochs'?); allowed: batch_size, "
     "checkpoint, early_stopping, epochs, loss, optimizer, schedule, shuffle, stages"),
    ("unknown-key-no-match", lambda d: d["data"]["split"].update(zzz=1),
     "data.split: unknown key 'zzz'; allowed: seed, strategy, stratify, test_fraction"),
    # wrong types
    ("epochs-text", lambda d: cnn(d)["train"].update(epochs="ten"),
     "models[1].train.epochs: must be a valid integer, unable to parse string as an integer; "
     "got 'ten'"),
    ("epochs-fraction", lambda d: cnn(d)["train"].update(epochs=2.5),
     "models[1].train.epochs: must be a valid integer, got a number with a fractional part; "
     "got 2.5"),
    ("epochs-bool", lambda d: cnn(d)["train"].update(epochs=True),
     "models[1].train.epochs: must be a number, not a boolean; got true"),
    ("channels-bool", lambda d: d["data"].update(channels=True),
     "data.channels: must be a number, not a boolean; got true"),
    ("rate-bool", _layer(DROP_1, rate=False),
     "models[1].layers[3].rate: must be a number, not a boolean; got false"),
    ("stratify-text", lambda d: d["data"]["split"].update(stratify="maybe"),
     "data.split.stratify: must be a valid boolean, unable to interpret input; got 'maybe'"),
    ("data-not-mapping", lambda d: d.update(data=[1]),
     "data: must be a mapping (key: value); got [1]"),
    ("models-not-list", lambda d: d.update(models={"cnn": 1}),
     "models: must be a list; got {'cnn': 1}"),
    ("name-pattern", lambda d: cnn(d).update(name="1cnn"),
     r"models[1].name: must match pattern '^[A-Za-z][A-Za-z0-9_\-]*$'; got '1cnn'"),
    ("missing-required", lambda d: cnn(d)["train"].pop("epochs"),
     "models[1].train.epochs: required field is missing"),
    # out of range
    ("dropout-1.5", _layer(DROP_1, rate=1.5),
     "models[1].layers[3].rate: must be less than 1; got 1.5"),
    ("filters-0", _layer(CONV_1, filters=0),
     "models[1].layers[0].filters: must be greater than 0; got 0"),
    ("kernel-0", _layer(CONV_1, kernel=[3, 0]),
     "models[1].layers[0].kernel[1]: must be greater than 0; got 0"),
    ("epochs-0", lambda d: cnn(d)["train"].update(epochs=0),
     "models[1].train.epochs: must be greater than or equal to 1; got 0"),
    ("test-fraction-1.2", lambda d: d["data"]["split"].update(test_fraction=1.2),
     "data.split.test_fraction: must be less than 1; got 1.2"),
    ("bn-momentum-1", _layer(BN_1, momentum=1.0),
     "models[1].layers[1].momentum: must be less than 1; got 1.0"),
    ("threshold-0", lambda d: d["evaluation"].update(threshold=0),
     "evaluation.threshold: must be greater than 0; got 0"),
    ("scale-reversed", lambda d: d["augmentation"].update(scale=[1.1, 0.9]),
     "augmentation.scale: must be [low, high] with 0 < low <= high; got [1.1, 0.9]"),
    ("printed-sum", lambda d: cnn(d).update(printed_params={"total": 5, "trainable": 3,
                                                            "non_trainable": 1}),
     "models[1].printed_params: trainable (3) + non_trainable (1) != total (5)"),
    # closed vocabularies list what is allowed
    ("unknown-layer", _layer(CONV_1, type="conv3d"),
     "models[1].layers[0]: unknown layer type 'conv3d'; allowed: " + ", ".join(LAYER_TYPES)),
    ("missing-layer-type", lambda d: cnn(d)["layers"][CONV_1].pop("type"),
     "models[1].layers[0]: missing 'type' (layer type); allowed: " + ", ".join(LAYER_TYPES)),
    ("unknown-optimizer", lambda d: cnn(d)["train"]["optimizer"].update(name="adagrad"),
     "models[1].train.optimizer: unknown optimizer 'adagrad'; allowed: adam, adamw, rmsprop, sgd"),
    ("unknown-loss", lambda d: cnn(d)["train"]["loss"].update(name="mse"),
     "models[1].train.loss.name: must be one of binary_crossentropy; got 'mse'"),
    ("unknown-backend", lambda d: cnn(d).update(backends=["keras", "jax"]),
     "models[1].backends[1]: must be one of reference, keras, keras-torch, keras-jax, torch; "
     "got 'jax'"),
    ("repeated-backend", lambda d: cnn(d).update(backends=["keras", "keras"]),
     "models[1].backends: lists a backend twice: ['keras', 'keras']"),
    ("unknown-base", lambda d: d["models"][DENSENET]["base"].update(name="resnet18"),
     "models[2].base.name: must be one of densenet121, densenet169, densenet201, resnet50, "
     "vgg16, efficientnet_b0, mobilenet_v2, inception_v3; got 'resnet18'"),
    ("unknown-kind", lambda d: d["models"][DENSENET].update(kind="pretrain"),
     "models[2]: unknown model kind 'pretrain'; allowed: random, sequential, pretrained"),
    ("unknown-activation", _layer(CONV_1, activation="leaky"),
     "models[1].layers[0].activation: must be one of linear, relu, sigmoid, tanh, softmax, elu, "
     "selu, gelu, swish; got 'leaky'"),
    ("unknown-initializer", _layer(CONV_1, kernel_initializer="orthogonal"),
     "models[1].layers[0].kernel_initializer: must be one of glorot_uniform, glorot_normal, "
     "he_uniform, he_normal, lecun_uniform, lecun_normal, zeros, ones; got 'orthogonal'"),
    ("unknown-dataset", lambda d: d["data"].update(dataset="imagenet"),
     "data.dataset: must be one of mura-v1.1, folder, csv, synthetic; got 'imagenet'"),
    ("unknown-body-part", lambda d: d["data"].update(body_parts=["KNEE"]),
     "data.body_parts[0]: must be one of ELBOW, FINGER, FOREARM, HAND, HUMERUS, SHOULDER, WRIST; "
     "got 'KNEE'"),
    ("unknown-metric", lambda d: d["evaluation"].update(metrics=["auc"]),
     "evaluation.metrics[0]: must be one of accuracy, recall, precision, specificity, f1, auroc, "
     "kappa; got 'auc'"),
    # model lists
    ("empty-models", lambda d: d.update(models=[]), "models: must list at least one model"),
    ("duplicate-models", lambda d: d["models"][DENSENET].update(name="cnn"),
     "models: model names must be unique; 'cnn' appears twice"),
    ("empty-layers", lambda d: (cnn(d).update(layers=[]), _drop_assumptions(d)),
     "models[1].layers: must not be empty"),
    ("repeated-seeds", lambda d: d.update(seeds=[1, 1]),
     "seeds: must be a non-empty list of distinct integers; got [1, 1]"),
    # every seed field is one type: an integer in [0, 2**32), never a boolean or a float
    ("boolean-seed", lambda d: d.update(seeds=[True]),
     "seeds[0]: must be an integer seed in [0, 4294967295]; got true"),
    ("float-seed", lambda d: d.update(seeds=[0, 1.5]),
     "seeds[1]: must be an integer seed in [0, 4294967295]; got 1.5"),
    ("huge-seed", lambda d: d.update(seeds=[2**32]),
     "seeds[0]: must be an integer seed in [0, 4294967295]; got 4294967296"),
    ("negative-split-seed", lambda d: d["data"].setdefault("split", {}).update(seed=-1),
     "data.split.seed: must be an integer seed in [0, 4294967295]; got -1"),
    ("huge-synthetic-seed", lambda d: d["data"].setdefault("synthetic", {}).update(seed=2**40),
     "data.synthetic.seed: must be an integer seed in [0, 4294967295]; got 1099511627776"),
    ("string-synthetic-seed", lambda d: d["data"].setdefault("synthetic", {}).update(seed="7"),
     "data.synthetic.seed: must be an integer seed in [0, 4294967295]; got '7'"),
    ("negative-bootstrap-seed",
     lambda d: d.setdefault("evaluation", {}).setdefault("bootstrap", {}).update(seed=-5),
     "evaluation.bootstrap.seed: must be an integer seed in [0, 4294967295]; got -5"),
    # the paper's claims and the assumptions must agree with the spec
    ("claim-counts", lambda d: d["paper"]["claims"][0]["counts"].update(k=961),
     "paper.claims[0]: counts 961/1951 = 0.492568 do not round to value 0.4921"),
    ("claim-k-over-n", lambda d: d["paper"]["claims"][0].update(counts={"k": 3, "n": 2}),
     "paper.claims[0].counts: k (3) must not exceed n (2)"),
    ("claim-over-1", lambda d: d["paper"]["claims"][0].update(value=75.09, counts=None),
     "paper.claims[0].value: must be less than or equal to 1; got 75.09"),
    ("claim-negative-accuracy", lambda d: d["paper"]["claims"][0].update(value=-0.1, counts=None),
     "paper.claims[0]: value -0.1 is negative; accuracy lies in [0, 1] (only kappa may be "
     "negative, in [-1, 1])"),
    ("claim-kappa-below-minus-1",
     lambda d: d["paper"]["claims"][0].update(metric="kappa", value=-1.5, counts=None),
     "paper.claims[0].value: must be greater than or equal to -1; got -1.5"),
    ("claim-level-not-evaluated", lambda d: (
        d["paper"]["claims"][2].update(level="study"),
        d.setdefault("evaluation", {}).update(levels=["image"])),
     "paper.claims[2].level: level 'study', but evaluation.levels is [image]; add study to "
     "evaluation.levels or set the claim's level to one of them"),
    ("claim-unknown-model", lambda d: d["paper"]["claims"][2].update(model="resnet"),
     "paper.claims[2].model: no model named 'resnet'; models are baseline, cnn, densenet"),
    ("contradiction-unknown-model",
     lambda d: d["paper"]["contradictions"][0]["claims"][1].update(model="vgg"),
     "paper.contradictions[0].claims[1].model: no model named 'vgg'; "
     "models are baseline, cnn, densenet"),
    ("not-printed-unknown-model",
     lambda d: d["paper"]["not_printed"][0].update(models=["cnn", "vgg"]),
     "paper.not_printed[0].models[1]: no model named 'vgg'; models are baseline, cnn, densenet"),
    ("random-low-above-high", lambda d: d["models"][0].update(low=0.9, high=0.1),
     "models[0]: low (0.9) must be below high (0.1): p ~ U[low, high)"),
    ("random-low-equals-high", lambda d: d["models"][0].update(low=0.5, high=0.5),
     "models[0]: low (0.5) must be below high (0.5): p ~ U[low, high)"),
    ("random-high-over-1", lambda d: d["models"][0].update(high=2),
     "models[0].high: must be less than or equal to 1; got 2"),
    ("random-low-negative", lambda d: d["models"][0].update(low=-1),
     "models[0].low: must be greater than or equal to 0; got -1"),
    ("assumption-field-typo", lambda d: d["assumptions"][0].update(field="data.chanels"),
     "assumptions[0].field: 'data.chanels' is not a path in this spec"),
    ("assumption-field-model",
     lambda d: d["assumptions"][4].update(field="models.vgg.train.epochs"),
     "assumptions[4].field: 'models.vgg.train.epochs' is not a path in this spec"),
    ("assumption-field-index",
     lambda d: d["assumptions"][2].update(field="models.cnn.layers[40].rate"),
     "assumptions[2].field: 'models.cnn.layers[40].rate' is not a path in this spec"),
    ("assumption-field-wrong-layer", lambda d: d["assumptions"][2].update(
        field="models.cnn.layers[0].rate"),
     "assumptions[2].field: 'models.cnn.layers[0].rate' is not a path in this spec"),
]


@pytest.mark.parametrize(("edit", "expected"), [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_message(tmp_path: Path, edit: Callable[[dict[str, Any]], Any],
                           expected: str) -> None:
    path = edited(tmp_path, edit)
    err = error_of(path)
    assert err.message == f"{path}: {expected}"
    assert "\n" not in err.message


def test_claims_take_a_level_and_kappa_may_be_negative(tmp_path: Path) -> None:
    path = edited(tmp_path, lambda d: d["paper"]["claims"][2].update(
        metric="kappa", value=-0.25, counts=None, level="study"))
    spec = load_spec(path)
    claim = spec.paper.claims[2]
    assert (claim.metric, claim.value, claim.level) == ("kappa", -0.25, "study")
    assert [c.level for c in spec.paper.claims] == ["image", "image", "study", "image", "image",
                                                    "image"]


def test_message_shows_a_relative_path_under_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "specs").mkdir()
    edited(tmp_path / "specs", lambda d: cnn(d)["train"]["optimizer"].update(name="adagrad"))
    monkeypatch.chdir(tmp_path)
    assert error_of(Path("specs/spec.yaml")).message == \
        "specs/spec.yaml: models[1].train.optimizer: unknown optimizer 'adagrad'; allowed: adam, " \
        "adamw, rmsprop, sgd"


def test_long_found_values_are_shortened(tmp_path: Path) -> None:
    path = edited(tmp_path, lambda d: cnn(d)["train"].update(epochs=["x" * 500]))
    msg = error_of(path).message
    assert msg.startswith(f"{path}: models[1].train.epochs: must be a valid integer; got ['xxx")
    assert msg.endswith("...") and len(msg) < len(str(path)) + 120


def test_shape_errors_name_the_file(tmp_path: Path) -> None:
    """Checks that need the inferred shapes run after loading; they name the file too."""

    def dense_first(d: dict[str, Any]) -> None:
        cnn(d)["layers"].insert(0, {"type": "dense", "units": 4})
        _drop_assumptions(d)

    path = edited(tmp_path, dense_first)
    spec = load_spec(path)
    with pytest.raises(UserError) as info:
        infer_model(spec, spec.models[CNN], CNN)
    assert info.value.message == (f"{path}: models[1].layers[0] (dense): dense needs a flat "
                                  "input; got shape (224, 224, 3)")
    assert info.value.hint == "add a flatten or global_avg_pool before it"


# ---------------------------------------------------------------------------------------------
# Backends at plan time: each model against what its backends claim to support

ALL_BUT = {  # the paper's vocabulary with one name taken out of one category
    "kinds": replace(PAPER_MODELS, kinds=("sequential",)),
    "layers": replace(PAPER_MODELS, layers=tuple(t for t in LAYER_TYPES if t != "dropout")),
    "activations": replace(PAPER_MODELS, activations=("linear", "relu")),
    "initializers": replace(PAPER_MODELS, initializers=("glorot_uniform",)),
    "bases": replace(PAPER_MODELS, bases=("resnet50",)),
    "optimizers": replace(PAPER_MODELS, optimizers=("sgd",)),
}


def _claims() -> dict[str, Supports | None]:
    return {e.name: e.supports for e in REGISTRY.values()}


def test_the_paper_fits_the_registry(paper: Spec) -> None:
    check_backends(paper, _claims())  # raises on any mismatch
    assert {m.name: m.backends for m in paper.models} == {
        "baseline": ("reference",), "cnn": ("keras", "torch"), "densenet": ("keras", "torch")}


@pytest.mark.parametrize(("model", "backend", "expected"), [
    (CNN, "reference", "backend 'reference' does not support model kind 'sequential' "
                       "(models[1].kind); it supports: random"),
    (BASELINE, "torch", "backend 'torch' does not support model kind 'random' (models[0].kind); "
                        "it supports: sequential, pretrained"),
    (CNN, "keras-jax", "backend 'keras-jax' builds and predicts only; model 'cnn' trains "
                       "(models[1].train)"),
])
def test_plan_time_backend_errors(paper: Spec, model: int, backend: str, expected: str) -> None:
    raw = paper_raw()
    raw["models"][model]["backends"] = [backend]
    spec = Spec.model_validate(raw)
    claims = _claims()
    # a backend that builds and predicts only (keras-jax was one before it trained)
    claims["keras-jax"] = replace(claims["keras-jax"], trains=False)
    with pytest.raises(UserError) as info:
        check_backends(spec, claims)
    assert info.value.message == f"spec 'paper': models[{model}].backends[0]: {expected}"


@pytest.mark.parametrize(("category", "model", "expected"), [
    ("kinds", DENSENET, "model kind 'pretrained' (models[0].kind); it supports: sequential"),
    ("layers", CNN, "layer type 'dropout' (models[0].layers[3]); it supports: conv2d, batchnorm, "
                    "maxpool2d, avgpool2d, flatten, dense, global_avg_pool, activation"),
    ("activations", CNN, "activation 'sigmoid' (models[0].layers[18].activation); it supports: "
                         "linear, relu"),
    ("initializers", CNN, "initializer 'zeros' (models[0].layers[0].bias_initializer); it "
                          "supports: glorot_uniform"),
    ("bases", DENSENET, "base 'densenet169' (models[0].base.name); it supports: resnet50"),
    ("optimizers", CNN, "optimizer 'adam' (models[0].train.optimizer.name); it supports: sgd"),
])
def test_a_model_needs_every_name_it_uses_claimed(category: str, model: int,
                                                  expected: str) -> None:
    """A spec of one paper model, on a 'keras' that claims all but one name of one category."""
    raw = {**paper_raw(), "paper": {"title": "t", "reference": "r"}, "assumptions": []}
    only = Spec.model_validate({**raw, "models": [raw["models"][model]]})
    with pytest.raises(UserError) as info:
        check_backends(only, {"keras": ALL_BUT[category]})
    assert info.value.message == (
        f"spec 'paper': models[0].backends[0]: backend 'keras' does not support {expected}")


def test_backends_without_claims_are_not_checked(paper: Spec) -> None:
    raw = paper_raw()
    raw["models"][CNN]["backends"] = ["reference"]
    spec = Spec.model_validate(raw)
    check_backends(spec, {"reference": None, "keras": PAPER_MODELS})  # no claims: not checked
    check_backends(spec, {"keras": PAPER_MODELS})  # not in the claims: not checked either
    with pytest.raises(UserError, match="backend 'reference' does not support model kind"):
        check_backends(spec, {"reference": Supports(kinds=("random",))})


def test_a_model_its_backend_cannot_build_fails_validate(tmp_path: Path) -> None:
    path = edited(tmp_path, lambda d: cnn(d).update(backends=["keras", "reference"]))
    assert load_spec(path).models[CNN].backends == ("keras", "reference")  # a valid spec
    _assert_user_error(_validate(path), f"{path}: models[1].backends[1]: backend 'reference' "
                       "does not support model kind 'sequential' (models[1].kind); it supports: "
                       "random")


def test_a_random_model_on_a_framework_backend_fails_validate(tmp_path: Path) -> None:
    path = edited(tmp_path, lambda d: d["models"][0].update(backends=["torch"]))
    _assert_user_error(_validate(path), f"{path}: models[0].backends[0]: backend 'torch' "
                       "does not support model kind 'random' (models[0].kind); it supports: "
                       "sequential, pretrained")


# ---------------------------------------------------------------------------------------------
# The same errors through the command line: exit 2, one line (+ hint), no traceback


def _validate(path: Path | str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MURA_ROOT"}
    return subprocess.run([sys.executable, "-m", "harness", "validate", str(path), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _assert_user_error(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {message}"
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  hint: "))


CLI_CASES = ["unknown-train-key", "epochs-text", "dropout-1.5", "test-fraction-1.2",
             "unknown-optimizer", "unknown-layer", "duplicate-models", "empty-models",
             "claim-unknown-model"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(tmp_path: Path, case: str) -> None:
    _, edit, expected = next(b for b in BAD_INPUTS if b[0] == case)
    path = edited(tmp_path, edit)
    _assert_user_error(_validate(path), f"{path}: {expected}")


def test_cli_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n  bad: value\n")
    _assert_user_error(
        _validate(path),
        f"{path}: invalid YAML at line 2, column 6: mapping values are not allowed here")


def test_cli_python_tag(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = _validate(path)
    _assert_user_error(proc, f"{path}: invalid YAML at line 1, column 7: "
                             "tag '!!python/object/apply:os.system' is not allowed")
    assert len(proc.stderr.splitlines()) == 2
    assert not marker.exists()


def test_cli_missing_spec_and_folder(tmp_path: Path) -> None:
    proc = _validate(tmp_path / "nope.yaml")
    _assert_user_error(proc, f"{tmp_path / 'nope.yaml'}: spec file not found")
    assert proc.stderr.splitlines()[1] == "  hint: check the path; specs live in specs/"
    _assert_user_error(_validate(tmp_path), f"{tmp_path}: is a folder, not a spec file")


def test_cli_relative_spec_path() -> None:
    _assert_user_error(_validate("specs/nope.yaml"), "specs/nope.yaml: spec file not found")


def test_cli_extends_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, {"extends": "self.yaml"}, "self.yaml")
    _assert_user_error(_validate(path), f"{path}: extends: cycle: {path} -> {path}")


def test_cli_set_errors() -> None:
    _assert_user_error(
        _validate("specs/paper.yaml", "--set", "models.cnn.train.epochs=ten"),
        "specs/paper.yaml: models[1].train.epochs: must be a valid integer, unable to parse string "
        "as an integer; got 'ten' (from --set models.cnn.train.epochs=ten)")
    _assert_user_error(
        _validate("specs/paper.yaml", "--set", "models.vgg.train.epochs=3"),
        "--set models.vgg.train.epochs: models has no item named 'vgg'; "
        "named items: baseline, cnn, densenet")


def test_cli_shape_error(tmp_path: Path) -> None:
    def big_pool(d: dict[str, Any]) -> None:
        cnn(d)["layers"][POOL_1].update(pool=300)
        _drop_assumptions(d)

    path = edited(tmp_path, big_pool)
    _assert_user_error(_validate(path), f"{path}: models[1].layers[2] (maxpool2d): maxpool2d pool "
                                        "(300, 300) is larger than its input (224, 224)")


# ---------------------------------------------------------------------------------------------
# YAML a reader could misread, or that costs without bound (issue 13)


@pytest.mark.parametrize(("text", "expected"), [
    ("name: a\nseeds: [0]\nname: b\n",
     "(top level): duplicate key 'name' at lines 1 and 3; write each key once (YAML would "
     "silently keep the last one)"),
    ("data:\n  split:\n    seed: 1\n    strategy: image\n    seed: 2\n",
     "data.split: duplicate key 'seed' at lines 3 and 5; write each key once (YAML would "
     "silently keep the last one)"),
    ("data: {split: {seed: 1, seed: 2}}\n",
     "data.split: duplicate key 'seed' twice on line 1; write each key once (YAML would "
     "silently keep the last one)"),
    ("models:\n  - name: a\n    kind: random\n  - {name: b, kind: random, kind: sequential}\n",
     "models[1]: duplicate key 'kind' twice on line 4; write each key once (YAML would "
     "silently keep the last one)"),
])
def test_duplicate_keys_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path).message == f"{path}: {expected}"


def test_a_duplicate_key_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    parent = write(tmp_path, "runtime:\n  device: cpu\n  device: auto\n", "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nname: child\n", "child.yaml")
    assert error_of(child).message == (
        f"{parent}: runtime: duplicate key 'device' at lines 2 and 3; write each key once "
        "(YAML would silently keep the last one)")


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    message = error_of(path).message
    assert message.startswith(f"{path}: a")
    assert message.endswith(
        ": more than 100,000 values once YAML aliases (*name) are expanded; a spec needs far "
        "fewer: write the values out or use `extends:`")


def test_shared_aliases_within_the_limit_are_fine(tmp_path: Path) -> None:
    from harness.spec import read_yaml

    path = write(tmp_path, "a: &x [1, 2]\nb: *x\nc: {d: *x}\n")
    assert read_yaml(path) == {"a": [1, 2], "b": [1, 2], "c": {"d": [1, 2]}}


@pytest.mark.parametrize("depth", [65, 2000])
def test_deep_nesting_is_refused(tmp_path: Path, depth: int) -> None:
    path = write(tmp_path, "a: " + "[" * depth + "]" * depth + "\n")
    expected = (f"{path}: line 1, column 68: nested deeper than 64 levels; a spec nests a few "
                "levels") if depth == 65 else (
        f"{path}: nested too deeply for a spec (more than 64 levels); a spec nests a few levels")
    assert error_of(path).message == expected


def test_an_oversized_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * 100_001)
    assert error_of(path).message == (
        f"{path}: larger than 1,000,000 bytes; a spec is a small text file (specs/paper.yaml is "
        "under 20 KB): name the spec, not a data file")


def test_an_endless_file_is_refused() -> None:
    assert error_of(Path("/dev/zero")).message == (
        "/dev/zero: larger than 1,000,000 bytes; a spec is a small text file "
        "(specs/paper.yaml is under 20 KB): name the spec, not a data file")


def test_an_error_written_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    base = write(tmp_path, f"extends: {ROOT / 'specs' / 'demo.yaml'}\n"
                           "models: [{name: cnn, train: {epochs: 0}}]\n"
                           "data: {split: {sed: 3}}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\ndata: {split: {sed: null}}\n",
                  "child.yaml")
    # the child wrote data.split.sed (null): the child is named
    assert error_of(child).message.startswith(f"{child}: data.split: unknown key 'sed'")
    child.write_text("extends: base.yaml\nname: child\n")
    assert error_of(child).message.splitlines() == [
        f"{base}: data.split: unknown key 'sed' (did you mean 'seed'?); allowed: seed, strategy, "
        f"stratify, test_fraction (extended by {child})",
        f"{base}: models[1].train.epochs: must be greater than or equal to 1; got 0 "
        f"(extended by {child})"]
    base.write_text(f"extends: {ROOT / 'specs' / 'demo.yaml'}\n"
                    "models: [{name: cnn, train: {epochs: 0}}]\n")
    assert error_of(child).message == (
        f"{base}: models[1].train.epochs: must be greater than or equal to 1; got 0 "
        f"(extended by {child})")
    child.write_text("extends: base.yaml\nname: child\n"
                     "models: [{name: cnn, train: {epochs: -2}}]\n")
    assert error_of(child).message == (
        f"{child}: models[1].train.epochs: must be greater than or equal to 1; got -2")
    # --set is named as before, whoever wrote the field
    assert error_of(child, ("models.cnn.train.epochs=-3",)).message == (
        f"{child}: models[1].train.epochs: must be greater than or equal to 1; got -3 "
        "(from --set models.cnn.train.epochs=-3)")


def test_invalid_yaml_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    base = write(tmp_path, "name: [x\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\n", "child.yaml")
    assert error_of(child).message.startswith(f"{base}: invalid YAML at line ")


def test_every_mistake_of_a_spec_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, f"extends: {ROOT / 'specs' / 'demo.yaml'}\n"
                           "seeds: [0, one]\n"
                           "data: {image_size: -4}\n"
                           "models: [{name: cnn, train: {epochs: 0}}]\n", "three.yaml")
    expected = [
        f"error: {path}: data.image_size: must be greater than or equal to 8; got -4",
        f"{path}: models[1].train.epochs: must be greater than or equal to 1; got 0",
        f"{path}: seeds[1]: must be an integer seed in [0, 4294967295]; got 'one'",
    ]
    for verb in ("validate", "run"):
        proc = subprocess.run([sys.executable, "-m", "harness", verb, str(path), "--out",
                               str(tmp_path / "out")] if verb == "run" else
                              [sys.executable, "-m", "harness", verb, str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr
        assert proc.stderr.splitlines() == expected
    assert not (tmp_path / "out").exists()


def test_more_than_ten_mistakes_are_cut_at_ten(tmp_path: Path) -> None:
    path = write(tmp_path, f"extends: {ROOT / 'specs' / 'demo.yaml'}\nseeds: [{'-1, ' * 11}-1]\n")
    assert error_of(path).message.splitlines() == [
        *(f"{path}: seeds[{i}]: must be an integer seed in [0, 4294967295]; got -1"
          for i in range(10)),
        f"{path}: 2 more errors not shown; fix these first"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("models.cnn.train.early_stopping.patience=-1",
         "models[1].train.early_stopping.patience: must be greater than or equal to 0; got -1"),
        ("models.cnn.train.checkpoint.monitor=val_auc",
         "models[1].train.checkpoint.monitor: must be one of"),
        ("models.cnn.train.schedule=linear", "models[1].train.schedule"),
        ("models.cnn.train.loss.class_weight=even", "models[1].train.loss.class_weight"),
        ("models.cnn.train.loss.class_weight={1: 2}",
         "must be balanced or {0: w0, 1: w1} with both classes; got keys ['1']"),
        ("models.cnn.train.schedule={name: reduce_on_plateau, factor: 1.5}",
         "models[1].train.schedule.factor: must be less than 1; got 1.5"),
    ],
)
def test_recipe_mistakes_are_one_line_user_errors(override, message):
    with pytest.raises(UserError) as e:
        load_spec(ROOT / "specs" / "paper.yaml", [override])
    text = str(e.value)
    assert "\n" not in text and message in text, text


def test_recipe_fields_parse_with_keras_defaults():
    spec = load_spec(ROOT / "specs" / "paper.yaml", [
        "models.cnn.train.schedule=cosine", "models.cnn.train.early_stopping={monitor: val_auroc}",
        "models.cnn.train.loss.class_weight={0: 0.4, 1: 0.6}",
    ])
    train = spec.model("cnn").train
    assert (train.schedule.name, train.schedule.alpha, train.schedule.decay_epochs) == (
        "cosine", 0.0, None)
    es = train.early_stopping
    assert (es.patience, es.min_delta, es.restore_best, es.maximize()) == (0, 0.0, False, True)
    assert train.loss.class_weights([1, 0, 0]) == (0.4, 0.6)
    assert train.loss.model_copy(update={"class_weight": "balanced"}).class_weights(
        [1, 0, 0, 0]) == (0.25, 0.75)  # MURA: w0 = A / (A + N), w1 = N / (A + N)


STAGES = ("models.densenet.train.stages=[{epochs: 4, learning_rate: 1.0e-3}, "
          "{epochs: 6, learning_rate: 1.0e-5, trainable_from: conv5}]")


def test_stages_sum_to_the_epochs_and_validate_counts_each_stage():
    from harness.validate import model_tables

    spec = load_spec(ROOT / "specs" / "paper.yaml", [STAGES, "models.densenet.train.epochs=null"])
    train = spec.model("densenet").train
    assert train.epochs == 10 and [train.stage_of(e) for e in (1, 4, 5, 10)] == [0, 0, 1, 1]
    assert [(s.head_only, s.trainable_from) for s in train.stages] == [(True, None),
                                                                        (False, "conv5")]
    tables, problems = model_tables(spec)
    assert "  stage 1 (4 epochs, lr 0.001): Trainable: 1,665  Non-trainable: 12,642,880" in tables
    # conv5 + the final bn + the head, as base.trainable_from: conv5 counts it
    assert "  stage 2 (6 epochs, lr 1e-05): Trainable: 5,918,593  Non-trainable: 6,725,952" in (
        tables)
    assert problems == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([STAGES.replace("epochs: 6", "epochs: 5")],
         "models[2].train: epochs: 10 but the stages sum to 9 epochs; omit epochs (it is the "
         "stages' sum) or make them agree"),
        ([STAGES, "models.densenet.train.schedule=cosine"],
         "models[2].train: schedule: cosine cannot be combined with stages (each stage sets its "
         "learning_rate); drop the schedule"),
        ([STAGES, "models.densenet.base.frozen=false"],
         "models[2]: train.stages decide what of the base trains, but base has frozen: false, "
         "trainable_from: None; leave both out of base"),
        ([STAGES.replace("cnn", "x").replace("densenet", "cnn")],
         "models[1]: train.stages switch what of a pretrained base trains; a sequential model "
         "has no base: drop stages"),
        ([STAGES.replace("learning_rate: 1.0e-3}", "learning_rate: 1.0e-3, frozen: true, "
                         "trainable_from: conv4}")],
         "models[2].train.stages[0]: trainable_from: conv4 trains part of the base, but frozen "
         "is true; drop frozen (or set frozen: false)"),
        ([STAGES.replace("conv5", "conv9")],
         "models[2].train.stages[1].trainable_from: densenet169 has no block or layer 'conv9'; "
         "blocks: conv1, pool1"),
    ],
)
def test_stage_mistakes_are_one_line_user_errors(overrides, message):
    from harness.validate import model_tables

    with pytest.raises(UserError) as e:
        model_tables(load_spec(ROOT / "specs" / "paper.yaml", overrides))
    text = str(e.value)
    assert "\n" not in text and message in text, text
