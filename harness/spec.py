"""The spec language: a paper's data, models, training recipes, claims and assumptions.

    python -m harness validate specs/paper.yaml

`load_spec(path, overrides)` reads YAML once (safe loader), resolves `extends:`, applies
`--set a.b=value` overrides and returns a frozen, fully defaulted `Spec`. Keras defaults are the
reference semantics: every value on which frameworks differ (BatchNorm epsilon and momentum, Adam
epsilon, initializers) is written out here, so backends never fall back on their own defaults.
Bad input raises `UserError` with one line: file, field path, what was found, what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from backends.registry import REGISTRY
from harness.errors import UserError

# ---------------------------------------------------------------------------------------------
# Closed vocabularies (a spec can name these and nothing else: no import paths, no eval)

BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "gelu", "swish")
INITIALIZERS = (
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "lecun_uniform",
    "lecun_normal",
    "zeros",
    "ones",
)
METRIC_NAMES = ("accuracy", "recall", "precision", "specificity", "f1", "auroc", "kappa")
BASES = ("densenet121", "densenet169", "densenet201", "resnet50", "vgg16")
BACKENDS = ("reference", "keras", "keras-torch", "keras-jax", "torch")

Activation = Literal["linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "gelu", "swish"]
Initializer = Literal[
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "lecun_uniform",
    "lecun_normal",
    "zeros",
    "ones",
]
Metric = Literal["accuracy", "recall", "precision", "specificity", "f1", "auroc", "kappa"]
BackendName: TypeAlias = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]  # registry names
PosInt = Annotated[int, Field(gt=0)]
Pair = tuple[PosInt, PosInt]


class Strict(BaseModel):
    """Frozen, strict base: unknown keys are errors with a did-you-mean."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            for key in data:
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key '{key}'{hint}; allowed: {allowed}",
                        {"key": key, "hint": hint, "allowed": ", ".join(sorted(allowed))},
                    )
            for key, value in data.items():
                # pydantic's lax mode reads `epochs: true` as 1; in a spec that is a mistake
                if isinstance(value, bool) and _is_number(cls.model_fields[key].annotation):
                    raise PydanticCustomError(
                        "bool_for_number",
                        "must be a number, not a boolean; got {got}",
                        {"field": key, "got": str(value).lower()},
                    )
        return data


def _is_number(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return all(type(a) is int for a in args)
    return bool(args) and type(None) in args and all(a in (int, float, type(None)) for a in args)


# ---------------------------------------------------------------------------------------------
# Paper: claims, what is named but not printed, internal contradictions


class Counts(Strict):
    k: int = Field(ge=0)
    n: int = Field(gt=0)

    @model_validator(mode="after")
    def _k_le_n(self) -> Counts:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n})")
        return self


class Claim(Strict):
    """A number the paper printed, as a fraction in [0, 1]."""

    model: str
    metric: Metric
    value: float = Field(ge=0, le=1)
    printed: str | None = None  # the text as printed, e.g. "75.09%"
    where: str  # section / figure / table
    counts: Counts | None = None
    relation: Literal["eq", "gt", "approx"] = "eq"
    primary: bool = True  # compared against in the headline table
    note: str | None = None

    @model_validator(mode="after")
    def _counts_match_value(self) -> Claim:
        if self.counts is not None and abs(self.counts.k / self.counts.n - self.value) > 5e-5:
            raise ValueError(
                f"counts {self.counts.k}/{self.counts.n} = {self.counts.k / self.counts.n:.6f} "
                f"do not round to value {self.value}"
            )
        return self


class NotPrinted(Strict):
    metric: Metric
    models: tuple[str, ...] = ()  # empty = every model
    where: str
    note: str | None = None


class Contradiction(Strict):
    where: str
    text: str
    conflicts_with: str
    claims: tuple[Claim, ...] = ()  # the contradicting numbers (primary: false)
    resolution: str


class Paper(Strict):
    title: str
    authors: str | None = None
    reference: str
    url: str | None = None
    claims: tuple[Claim, ...] = ()
    not_printed: tuple[NotPrinted, ...] = ()
    contradictions: tuple[Contradiction, ...] = ()


# ---------------------------------------------------------------------------------------------
# Data and augmentation


class SplitSpec(Strict):
    strategy: Literal["image", "study", "patient"] = "image"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    stratify: bool = False
    seed: int = 42


class ValidationSpec(Strict):
    source: Literal["official", "train"] = "official"
    fraction: float = Field(0.1, gt=0, lt=1)  # of the training part, when source is train


class SyntheticSpec(Strict):
    patients: int = Field(300, ge=4)
    seed: int = 0
    min_size: int = Field(160, ge=16, le=512)
    max_size: int = Field(512, ge=16, le=512)
    label_noise: float = Field(0.0, ge=0, lt=0.5)
    valid_fraction: float = Field(0.15, gt=0, lt=1)
    difficulty: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticSpec:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) exceeds max_size ({self.max_size})")
        return self


class DataSpec(Strict):
    dataset: Literal["mura-v1.1", "synthetic"]
    root: str | None = None  # None: $MURA_ROOT
    body_parts: tuple[Literal[BODY_PARTS], ...] = ("WRIST",)  # type: ignore[valid-type]
    image_size: int = Field(224, ge=8, le=1024)
    channels: Literal[1, 3] = 3  # grayscale is replicated when a model wants 3
    resize: Literal["bilinear", "nearest", "area", "lanczos"] = "bilinear"
    normalization: Literal["rescale", "imagenet", "none"] = "rescale"
    split: SplitSpec = SplitSpec()
    validation: ValidationSpec = ValidationSpec()
    on_bad_image: Literal["fail", "skip"] = "fail"
    synthetic: SyntheticSpec = SyntheticSpec()

    @field_validator("body_parts", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list | tuple):
            return tuple(str(p).upper().removeprefix("XR_") for p in v)
        return v

    @field_validator("body_parts")
    @classmethod
    def _nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"must name at least one body part of {', '.join(BODY_PARTS)}")
        return v


class AugmentationSpec(Strict):
    enabled: bool = True
    rotation: float = Field(0.0, ge=0, le=180)  # max degrees; angle ~ U[-r, r]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor ~ U[lo, hi]; > 1 zooms in
    hflip: bool = False
    vflip: bool = False

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high; got {list(v)}")
        return v


# ---------------------------------------------------------------------------------------------
# Layers (Keras semantics; every default written out)


def _pair(v: Any) -> Any:
    return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


class Conv2D(Strict):
    type: Literal["conv2d"]
    filters: PosInt
    kernel: Pair
    strides: Pair = (1, 1)
    padding: Literal["valid", "same"] = "valid"
    activation: Activation = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = "glorot_uniform"
    bias_initializer: Initializer = "zeros"

    @field_validator("kernel", "strides", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        return _pair(v)


class BatchNorm(Strict):
    type: Literal["batchnorm"]
    epsilon: float = Field(1e-3, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # Keras convention: moving = m*moving + (1-m)*batch
    center: bool = True
    scale: bool = True


class Pool2D(Strict):
    type: Literal["maxpool2d", "avgpool2d"]
    pool: Pair = (2, 2)
    strides: Pair | None = None  # None: equal to pool (Keras)
    padding: Literal["valid", "same"] = "valid"

    @field_validator("pool", "strides", mode="before")
    @classmethod
    def _pairs(cls, v: Any) -> Any:
        return _pair(v)


class Dropout(Strict):
    type: Literal["dropout"]
    rate: float = Field(ge=0, lt=1)


class Flatten(Strict):
    type: Literal["flatten"]


class GlobalAvgPool(Strict):
    type: Literal["global_avg_pool"]


class Dense(Strict):
    type: Literal["dense"]
    units: PosInt
    activation: Activation = "linear"
    use_bias: bool = True
    kernel_initializer: Initializer = "glorot_uniform"
    bias_initializer: Initializer = "zeros"


class ActivationLayer(Strict):
    type: Literal["activation"]
    activation: Activation


Layer = Annotated[
    Conv2D | BatchNorm | Pool2D | Dropout | Flatten | GlobalAvgPool | Dense | ActivationLayer,
    Field(discriminator="type"),
]
LAYER_TYPES = (
    "conv2d",
    "batchnorm",
    "maxpool2d",
    "avgpool2d",
    "dropout",
    "flatten",
    "dense",
    "global_avg_pool",
    "activation",
)


# ---------------------------------------------------------------------------------------------
# Training recipe


class Adam(Strict):
    name: Literal["adam"]
    learning_rate: float = Field(1e-3, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)  # Keras; torch's default is 1e-8
    amsgrad: bool = False


class SGD(Strict):
    name: Literal["sgd"]
    learning_rate: float = Field(1e-2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False


Optimizer = Annotated[Adam | SGD, Field(discriminator="name")]
OPTIMIZERS = ("adam", "sgd")


class Loss(Strict):
    """Binary cross-entropy, batch mean, labels smoothed as y (1 - ls) + ls / 2 in both forms.

    `form` says what the loss is computed from:
    - auto: as Keras 3 on TensorFlow: when the model's last layer ends in a sigmoid activation
      (a dense layer with activation sigmoid, or an activation layer sigmoid), BCE is computed
      from the pre-sigmoid logits x (stable, no clipping: max(x, 0) - x y + log(1 + exp(-|x|)),
      so its gradient does not vanish at saturation); otherwise on the probabilities clipped to
      [epsilon, 1 - epsilon].
    - probabilities: always on the probabilities clipped to [epsilon, 1 - epsilon].
    """

    name: Literal["binary_crossentropy"] = "binary_crossentropy"
    form: Literal["auto", "probabilities"] = "auto"
    epsilon: float = Field(1e-7, gt=0, lt=0.5)  # the clip, where probabilities are used
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    def on_logits(self, last_layer: Any) -> bool:
        """True when the loss is computed from logits for a model ending in `last_layer`."""
        return (
            self.form == "auto"
            and getattr(last_layer, "type", None) in ("dense", "activation")
            and getattr(last_layer, "activation", None) == "sigmoid"
        )


class TrainSpec(Strict):
    optimizer: Optimizer
    loss: Loss = Loss()
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    shuffle: bool = True


class ParamCounts(Strict):
    """Parameter counts, Keras' way (BatchNorm moving statistics are non-trainable): what the
    paper printed, what harness.shapes infers, and what a backend's built model holds."""

    total: int = Field(ge=0)
    trainable: int = Field(ge=0)
    non_trainable: int = Field(ge=0)

    def __add__(self, other: ParamCounts) -> ParamCounts:
        return ParamCounts(
            total=self.total + other.total,
            trainable=self.trainable + other.trainable,
            non_trainable=self.non_trainable + other.non_trainable,
        )

    @model_validator(mode="after")
    def _sum(self) -> ParamCounts:
        if self.trainable + self.non_trainable != self.total:
            raise ValueError(
                f"trainable ({self.trainable}) + non_trainable ({self.non_trainable}) "
                f"!= total ({self.total})"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Models


class ModelBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    description: str | None = None
    backends: tuple[BackendName, ...]
    printed_params: ParamCounts | None = None  # as printed in the paper
    normalization: Literal["rescale", "imagenet", "none"] | None = None  # None: data's

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must name at least one backend")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a backend twice: {list(v)}")
        return v


class RandomModel(ModelBase):
    """The paper's baseline: p ~ U[low, high), label 1 when p >= threshold."""

    kind: Literal["random"]
    backends: tuple[BackendName, ...] = ("reference",)
    low: float = 0.0
    high: float = 1.0


class SequentialModel(ModelBase):
    kind: Literal["sequential"]
    backends: tuple[BackendName, ...] = ("keras", "torch")
    layers: tuple[Layer, ...] = Field(min_length=1)
    train: TrainSpec


class BaseNet(Strict):
    name: Literal["densenet121", "densenet169", "densenet201", "resnet50", "vgg16"]
    weights: str = "imagenet"  # imagenet | none | a local file path
    frozen: bool = True  # frozen = weights fixed AND BatchNorm in inference mode

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be imagenet, none or a local file path; got ''")
        return v


class PretrainedModel(ModelBase):
    kind: Literal["pretrained"]
    backends: tuple[BackendName, ...] = ("keras", "torch")
    base: BaseNet
    head: tuple[Layer, ...] = Field(min_length=1)
    train: TrainSpec
    normalization: Literal["rescale", "imagenet", "none"] | None = "imagenet"


Model = Annotated[RandomModel | SequentialModel | PretrainedModel, Field(discriminator="kind")]
MODEL_KINDS = ("random", "sequential", "pretrained")


# ---------------------------------------------------------------------------------------------
# Evaluation, runtime, assumptions, the whole spec


class Bootstrap(Strict):
    resamples: int = Field(2000, ge=100, le=1_000_000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    unit: Literal["image", "study", "patient"] = "patient"
    method: Literal["percentile", "bca"] = "bca"  # covers better at small n (tests/test_stats.py)
    seed: int = 0


class Evaluation(Strict):
    metrics: tuple[Metric, ...] = ("accuracy", "recall", "precision")
    threshold: float = Field(0.5, gt=0, lt=1)
    bootstrap: Bootstrap = Bootstrap()
    levels: tuple[Literal["image", "study"], ...] = ("image", "study")

    @field_validator("metrics", "levels")
    @classmethod
    def _nonempty_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list without repeats; got {list(v)}")
        return v


class Runtime(Strict):
    device: Literal["auto", "cpu", "gpu"] = "auto"
    deterministic: bool = True
    timeout_s: float = Field(6 * 3600, gt=0)  # per run


class Assumption(Strict):
    what: str
    value: Any
    reason: str
    field: str | None = None  # the spec path that carries the value, checked to exist


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    paper: Paper
    data: DataSpec
    augmentation: AugmentationSpec = AugmentationSpec()
    models: tuple[Model, ...]
    evaluation: Evaluation = Evaluation()
    seeds: tuple[int, ...] = (0,)
    runtime: Runtime = Runtime()
    assumptions: tuple[Assumption, ...] = ()

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        if not v:
            raise ValueError("must list at least one model")
        names = [m.name for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; '{dupes[0]}' appears twice")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list of distinct integers; got {list(v)}")
        bad = [s for s in v if not 0 <= s < 2**32]
        if bad:  # PYTHONHASHSEED and numpy seed sequences take 0 .. 2**32 - 1
            raise ValueError(f"seeds must be in [0, 4294967295]; got {bad[0]}")
        return v

    _source: str | None = PrivateAttr(default=None)  # set by load_spec, for messages

    @property
    def source(self) -> str:
        """The spec file as messages show it (the spec's name when it was not loaded from one)."""
        return self._source or f"spec '{self.name}'"

    @model_validator(mode="after")
    def _cross_refs(self) -> Spec:
        names = {m.name for m in self.models}
        claims = [(f"paper.claims[{i}]", c) for i, c in enumerate(self.paper.claims)]
        for j, con in enumerate(self.paper.contradictions):
            where = f"paper.contradictions[{j}].claims"
            claims += [(f"{where}[{i}]", c) for i, c in enumerate(con.claims)]
        for where, claim in claims:
            if claim.model not in names:
                # a custom error type carries the path: an after-validator's own location is the top
                raise PydanticCustomError(
                    "cross_ref",
                    "{path}: no model named '{got}'; models are {allowed}",
                    {"path": f"{where}.model", "got": claim.model,
                     "allowed": ", ".join(sorted(names))},
                )
        return self

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def normalization(self, model: Model) -> str:
        return model.normalization or self.data.normalization


# ---------------------------------------------------------------------------------------------
# Loading: YAML -> extends -> --set -> validation -> Spec


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file safely; errors carry the line and column."""
    shown = _display(path)
    if not path.exists():
        raise UserError(f"{shown}: spec file not found", "check the path; specs live in specs/")
    if path.is_dir():
        raise UserError(f"{shown}: is a folder, not a spec file", "name a .yaml file inside it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        tag = re.search(r"tag '(?:tag:yaml\.org,2002:)?([^']*)'", e.problem or "")
        if isinstance(e, yaml.constructor.ConstructorError) and tag:
            shown_tag = tag.group(1) if tag.group(1).startswith("!") else f"!!{tag.group(1)}"
            raise UserError(
                f"{shown}: invalid YAML at {where}: tag '{shown_tag}' is not allowed",
                "a spec holds plain data (mappings, lists, strings, numbers), never objects",
            ) from None
        raise UserError(f"{shown}: invalid YAML at {where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{shown}: invalid YAML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{shown}: cannot read the spec file: {e.strerror or e}") from None
    if data is None:
        raise UserError(f"{shown}: the spec is empty")
    if not isinstance(data, dict):
        raise UserError(f"{shown}: the top level must be a mapping; got {type(data).__name__}")
    return data


MERGE_KEYS = ("name", "what")  # models merge by name, assumptions by what


def _merge_key(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return None
    for k in MERGE_KEYS:
        if all(isinstance(x, dict) and k in x for x in v):
            return k
    return None


def merge(base: Any, over: Any) -> Any:
    """Deep merge for `extends`: mappings merge, lists of mappings keyed by `name` (models) or
    `what` (assumptions) merge item by item, other lists and scalars are replaced. `null` in the
    child deletes a key whose parent value is a mapping or list (back to the default)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if v is None and k in out and isinstance(out[k], dict | list):
                del out[k]
            else:
                out[k] = merge(out[k], v) if k in out else v
        return out
    key = _merge_key(base)
    if key is not None and key == _merge_key(over):
        out_list = [dict(x) for x in base]
        index = {x[key]: i for i, x in enumerate(out_list)}
        for item in over:
            if item[key] in index:
                out_list[index[item[key]]] = merge(out_list[index[item[key]]], item)
            else:
                out_list.append(item)
        return out_list
    return over


def resolve_extends(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a spec and its `extends:` parents (paths relative to the child file), then apply
    its `overrides:` (a list of `PATH=VALUE`, as for --set) to the merged result."""
    path = path.resolve() if path.exists() else path
    if path in _chain:
        cycle = " -> ".join(_display(p) for p in (*_chain, path))
        raise UserError(f"{_display(_chain[-1])}: extends: cycle: {cycle}")
    raw = read_yaml(path)
    parent = raw.pop("extends", None)
    overrides = raw.pop("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(
            f"{_display(path)}: overrides: must be a list of 'PATH=VALUE' strings "
            f"(as for --set); got {overrides!r}"
        )
    if parent is None:
        merged = raw
    else:
        merged = merge(_parent(path, parent, _chain), raw)
    for i, assignment in enumerate(overrides):
        try:
            apply_override(merged, assignment, _display(path))
        except UserError as e:
            raise UserError(
                f"{_display(path)}: overrides[{i}]: {e.message.removeprefix('--set ')}"
            ) from None
    return merged


def _parent(path: Path, parent: Any, _chain: tuple[Path, ...]) -> dict[str, Any]:
    if not isinstance(parent, str):
        raise UserError(f"{_display(path)}: extends: must be a file path; got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.exists():
        raise UserError(
            f"{_display(path)}: extends: parent spec '{parent}' not found "
            f"(looked for {_display(parent_path)})"
        )
    return resolve_extends(parent_path, (*_chain, path))


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_path(dotted: str) -> list[str | int]:
    """`models.cnn.layers[3].rate` or `models.1.train.epochs` -> segments."""
    parts: list[str | int] = []
    for name, index in _SEGMENT.findall(dotted):
        if index:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
    return parts


def _join(path: str, seg: str | int) -> str:
    if isinstance(seg, int):
        return f"{path}[{seg}]"
    return f"{path}.{seg}" if path else seg


def apply_override(raw: dict[str, Any], assignment: str, source: str) -> str:
    """Apply one `--set path=value`; the value is parsed as a YAML scalar or flow collection.

    Returns the path it set as validation messages write it (`models[1].train.epochs`).
    """
    if "=" not in assignment:
        raise UserError(
            f"--set {assignment}: expected PATH=VALUE, e.g. --set models.cnn.train.epochs=3"
        )
    dotted, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    segments = split_path(dotted.strip())
    if not segments:
        raise UserError(f"--set {assignment}: empty path")
    node: Any = raw
    walked = ""  # as the user wrote it, for messages
    resolved = ""  # with names resolved to indices, as validation messages write it
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        where = walked or "the top level"
        shown = seg if isinstance(seg, str) else f"[{seg}]"  # before a name becomes an index
        if isinstance(node, list):
            if isinstance(seg, str):
                matches = [x for x in node if isinstance(x, dict) and x.get("name") == seg]
                if not matches:
                    names = [str(x["name"]) for x in node if isinstance(x, dict) and "name" in x]
                    raise UserError(
                        f"--set {dotted}: {where} has no item named '{seg}'; "
                        f"named items: {', '.join(names) or 'none'}"
                    )
                seg = node.index(matches[0])
            if not 0 <= seg < len(node):
                raise UserError(f"--set {dotted}: {where} has {len(node)} items; got index {seg}")
        elif isinstance(node, dict):
            if isinstance(seg, int):
                raise UserError(f"--set {dotted}: {where} is a mapping; got index [{seg}]")
            if seg not in node and not last:
                node[seg] = {}  # a section left to its defaults; validation checks the key
        else:
            raise UserError(f"--set {dotted}: {where} is a value, it has no field '{shown}'")
        if last:
            node[seg] = value
        else:
            node = node[seg]
        walked = f"{walked}{shown}" if shown.startswith("[") else _join(walked, shown)
        resolved = _join(resolved, seg)
    del source
    return resolved


def _loc_to_path(loc: Sequence[int | str], raw: Any) -> str:
    """Turn a pydantic error location into a spec path, dropping union tags."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            out += f".{part}" if out else str(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and node.get("type") != part \
                and node.get("kind") != part and node.get("name") != part:
            out += f".{part}" if out else str(part)
            node = None
        # else: a discriminator tag (layer type, model kind, optimizer name): not a path step
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ALLOWED_BY_TAG = {
    "type": ("layer type", LAYER_TYPES),
    "kind": ("model kind", MODEL_KINDS),
    "name": ("optimizer", OPTIMIZERS),
}


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind in ("unknown_key", "bool_for_number"):
        return str(err["msg"])
    if kind == "cross_ref":
        return str(err["msg"]).split(": ", 1)[1]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (key: value); got {_short(got)}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list; got {_short(got)}"
    if kind == "union_tag_invalid":
        what, allowed = _ALLOWED_BY_TAG.get(ctx.get("discriminator", "").strip("'"), ("value", ()))
        return f"unknown {what} {ctx.get('tag')!r}; allowed: {', '.join(allowed)}"
    if kind == "union_tag_not_found":
        disc = str(ctx.get("discriminator", "")).strip("'")
        what, allowed = _ALLOWED_BY_TAG.get(disc, ("value", ()))
        return f"missing '{disc}' ({what}); allowed: {', '.join(allowed)}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}; got {_short(got)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "too_short" and isinstance(got, list | tuple) and not got:
        return "must not be empty"
    msg = str(err["msg"])
    msg = re.sub(r"^(Input|String|List|Tuple|Dictionary|Value) should ", "must ", msg)
    msg = re.sub(r"^Value error, ", "", msg)
    return f"{msg}; got {_short(got)}"


def _error_path(err: dict[str, Any], raw: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "cross_ref":
        return str(ctx["path"])
    where = _loc_to_path(err["loc"], raw)
    if err["type"] == "bool_for_number":  # raised by the mapping, about one of its fields
        return _join("" if where == "(top level)" else where, str(ctx["field"]))
    return where


def validation_message(e: ValidationError, raw: dict[str, Any], source: str) -> str:
    err = dict(e.errors(include_url=False)[0])
    return f"{source}: {_error_path(err, raw)}: {_describe(err)}"


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith((f"{ancestor}.", f"{ancestor}["))


def _from_override(
    err: dict[str, Any], raw: dict[str, Any], set_paths: dict[str, str]
) -> str | None:
    """The `--set` assignment an error comes from, if any."""
    where = _error_path(err, raw)
    where = "" if where == "(top level)" else where
    ctx = err.get("ctx") or {}
    if err["type"] in ("unknown_key", "union_tag_invalid"):  # about one key of the mapping
        key = _join(where, str(ctx.get("key") or ctx.get("discriminator", "")).strip("'"))
        return next((a for p, a in set_paths.items() if _within(p, key)), None)
    for p, a in set_paths.items():
        if where and _within(where, p):  # at or inside the overridden value
            return a
        if err["type"] == "value_error" and _within(p, where):  # a check across sibling fields
            return a
    return None


def _check_assumption_fields(spec: Spec, raw: dict[str, Any], source: str) -> None:
    missing = object()  # a field whose value is None (data.root) is still a path
    for i, a in enumerate(spec.assumptions):
        if a.field is None:
            continue
        node: Any = spec
        for seg in split_path(a.field):
            if isinstance(seg, str) and isinstance(node, tuple):
                node = next((x for x in node if getattr(x, "name", None) == seg), missing)
            elif isinstance(seg, int) and isinstance(node, tuple):
                node = node[seg] if seg < len(node) else missing
            elif isinstance(seg, str) and isinstance(node, BaseModel):
                node = getattr(node, seg) if seg in type(node).model_fields else missing
            else:
                node = missing
            if node is missing:
                raise UserError(
                    f"{source}: assumptions[{i}].field: '{a.field}' is not a path in this spec"
                )


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Load, resolve `extends`, apply `--set` overrides and validate a spec file."""
    path = Path(path)
    source = _display(path)
    raw = resolve_extends(path)
    raw.setdefault("name", path.stem)
    set_paths: dict[str, str] = {}
    for assignment in overrides:
        set_paths[apply_override(raw, assignment, source)] = assignment
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        message = validation_message(e, raw, source)
        culprit = _from_override(dict(e.errors(include_url=False)[0]), raw, set_paths)
        if culprit is not None:
            message += f" (from --set {culprit})"
        raise UserError(message) from None
    _check_assumption_fields(spec, raw, source)
    spec._source = source
    return spec


def spec_digest(obj: Any) -> str:
    """Stable sha256 of any pydantic object or JSON-able value."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
