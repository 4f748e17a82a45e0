"""The spec's schema: typed, frozen, fully defaulted pydantic models, one per section.

    spec = Spec.model_validate(raw)      # harness.spec.load_spec reads the YAML and calls this

Keras defaults are the reference semantics: every value on which frameworks differ (BatchNorm
epsilon and momentum, Adam epsilon, initializers) is written out here, so backends never fall back
on their own defaults. Every closed set a field accepts is a type of harness.vocab. Validation
errors are pydantic's (or this module's custom ones: unknown keys, booleans for numbers, cross
references); harness.spec.messages turns them into one line per error.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Annotated, Any, Literal, TypeAlias, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from backends.registry import REGISTRY
from harness.vocab import (
    BODY_PARTS,
    Activation,
    BaseName,
    BodyPart,
    BootstrapMethod,
    BootstrapUnit,
    Channels,
    ClaimRelation,
    ClassWeightRule,
    Dataset,
    Device,
    GroupLevel,
    Initializer,
    InitMode,
    Level,
    LossForm,
    LossName,
    Metric,
    MonitorMode,
    MonitorName,
    Normalization,
    OnBadImage,
    Padding,
    ResizeFilter,
    SplitStrategy,
    SyntheticLayout,
    ValidationSource,
)

# The registry is the authority on backend names: built-in ones (harness.vocab.BACKENDS) and
# those installed through its entry point group. It is framework-free: it names modules, imports
# none of them.
BackendName: TypeAlias = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]  # registry names
PosInt = Annotated[int, Field(gt=0)]
Pair = tuple[PosInt, PosInt]
SEED_MAX = 2**32 - 1  # PYTHONHASHSEED and numpy seed sequences take 0 .. 2**32 - 1


def _seed(v: Any) -> Any:
    # one check for every seed of a spec (seeds, data.split.seed, data.synthetic.seed,
    # evaluation.bootstrap.seed): an integer, never a boolean, a float or a string
    if isinstance(v, bool) or not isinstance(v, int):
        shown = str(v).lower() if isinstance(v, bool) else repr(v)
        raise ValueError(f"must be an integer seed in [0, {SEED_MAX}]; got {shown}")
    if not 0 <= v <= SEED_MAX:
        raise ValueError(f"must be an integer seed in [0, {SEED_MAX}]; got {v}")
    return v


Seed = Annotated[int, BeforeValidator(_seed)]


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
    """A number the paper printed, as a fraction in [0, 1] ([-1, 1] for kappa), at the level
    (image or study) it was computed at."""

    model: str
    metric: Metric
    value: float = Field(ge=-1, le=1)
    level: Level = "image"  # the verdict compares it with our metric at this level
    printed: str | None = None  # the text as printed, e.g. "75.09%"
    where: str  # section / figure / table
    counts: Counts | None = None
    relation: ClaimRelation = "eq"
    primary: bool = True  # compared against in the headline table
    note: str | None = None

    @model_validator(mode="after")
    def _counts_match_value(self) -> Claim:
        if self.value < 0 and self.metric != "kappa":
            raise ValueError(
                f"value {self.value} is negative; {self.metric} lies in [0, 1] "
                "(only kappa may be negative, in [-1, 1])"
            )
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
    strategy: SplitStrategy = "image"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    stratify: bool = False
    seed: Seed = 42


class ValidationSpec(Strict):
    source: ValidationSource = "official"
    fraction: float = Field(0.1, gt=0, lt=1)  # of the training part, when source is train
    # what the validation split keeps together (source train); None: the split strategy's
    # group, image for strategy official
    group: GroupLevel | None = None


class SyntheticSpec(Strict):
    patients: int = Field(300, ge=4)
    seed: Seed = 0
    min_size: int = Field(160, ge=16, le=512)
    max_size: int = Field(512, ge=16, le=512)
    label_noise: float = Field(0.0, ge=0, lt=0.5)
    valid_fraction: float = Field(0.15, ge=0, lt=1)  # 0: no valid set (folder layout only)
    difficulty: float = Field(0.5, ge=0, le=1)
    # mura: MURA-v1.1's tree and CSVs; folder: <split>/<class>/<images>, read as dataset folder
    layout: SyntheticLayout = "mura"
    classes: tuple[str, str] = ("NORMAL", "PNEUMONIA")  # folder layout: label 0, label 1
    test_fraction: float = Field(0.15, gt=0, lt=1)  # folder layout: patients written to test/

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticSpec:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) exceeds max_size ({self.max_size})")
        if self.layout == "mura" and self.valid_fraction == 0:
            raise ValueError("valid_fraction must be above 0 for layout mura (MURA has a valid "
                             "set); got 0")
        bad = [c for c in self.classes if not _FOLDER_NAME.match(c)]
        if bad or self.classes[0] == self.classes[1]:
            raise ValueError(
                f"classes must be two different folder names (letters, digits, _ - .); "
                f"got {list(self.classes)}"
            )
        return self


_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class CsvSpec(Strict):
    """dataset csv: a table of image paths (relative to data.root) and labels."""

    file: str  # relative to data.root, or absolute
    path_column: str = "path"
    label_column: str = "label"  # 0/1, or names mapped by data.classes
    patient_column: str | None = None  # None: data.group_pattern, else each image its own
    study_column: str | None = None  # None: each image its own study
    split_column: str | None = None  # values train | test | val (valid); None: all train


class DataSpec(Strict):
    dataset: Dataset
    root: str | None = None  # None: $MURA_ROOT
    body_parts: tuple[BodyPart, ...] = ("WRIST",)
    image_size: int = Field(224, ge=8, le=1024)
    channels: Channels = 3  # grayscale is replicated when a model wants 3
    resize: ResizeFilter = "bilinear"
    normalization: Normalization = "rescale"
    split: SplitSpec = SplitSpec()
    validation: ValidationSpec = ValidationSpec()
    on_bad_image: OnBadImage = "fail"
    # a file of the tree that is a symlink leading outside MURA-v1.1/ is refused unless true
    follow_symlinks: bool = False
    synthetic: SyntheticSpec = SyntheticSpec()
    # dataset folder (and csv with named labels): folder / label name -> 0 or 1
    classes: dict[str, Literal[0, 1]] | None = None
    # a regex with one group on the file name giving the patient, e.g. 'person(\d+)_'
    group_pattern: str | None = None
    csv: CsvSpec | None = None

    @field_validator("group_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"is not a valid regular expression ({e}); got {v!r}") from None
        if groups != 1:
            raise ValueError(
                f"must have exactly one group (...) giving the patient; got {groups} in {v!r}"
            )
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and set(v.values()) != {0, 1}:
            raise ValueError(
                f"must map names to 0 and 1, both used (e.g. {{NORMAL: 0, PNEUMONIA: 1}}); "
                f"got {v}"
            )
        return v

    @model_validator(mode="after")
    def _dataset_fields(self) -> DataSpec:
        folder_like = self.dataset in ("folder", "csv") or (
            self.dataset == "synthetic" and self.synthetic.layout == "folder"
        )
        if self.dataset == "folder" and self.classes is None:
            raise PydanticCustomError(
                "dataset_field", "{path}: required for dataset folder (class folder name -> 0 or "
                "1, e.g. {NORMAL: 0, PNEUMONIA: 1})", {"path": "data.classes"},
            )
        if self.dataset == "csv" and self.csv is None:
            raise PydanticCustomError(
                "dataset_field", "{path}: required for dataset csv (file, path_column, "
                "label_column, ...)", {"path": "data.csv"},
            )
        if self.csv is not None and self.dataset != "csv":
            raise PydanticCustomError(
                "dataset_field", "{path}: only for dataset csv; got dataset {got}",
                {"path": "data.csv", "got": self.dataset},
            )
        for name in ("classes", "group_pattern"):
            if getattr(self, name) is not None and not folder_like:
                raise PydanticCustomError(
                    "dataset_field", "{path}: only for datasets folder and csv (and synthetic "
                    "with layout folder); {got} has its own labels and patients",
                    {"path": f"data.{name}", "got": self.dataset},
                )
        return self

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
    padding: Padding = "valid"
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
    padding: Padding = "valid"

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


# ---------------------------------------------------------------------------------------------
# Training recipe


class Adam(Strict):
    name: Literal["adam"]
    learning_rate: float = Field(1e-3, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)  # Keras; torch's default is 1e-8
    amsgrad: bool = False


class AdamW(Strict):
    """Keras' AdamW: Adam with decoupled weight decay, applied before the Adam update as
    w <- w - w * weight_decay * learning_rate (torch's AdamW decays by the same lr * wd)."""

    name: Literal["adamw"]
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.004, ge=0)  # Keras; torch's default is 0.01
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)  # Keras; torch's default is 1e-8
    amsgrad: bool = False


class RMSprop(Strict):
    """Keras' RMSprop: v = rho v + (1 - rho) g^2, step lr g / sqrt(v + epsilon) (epsilon under
    the root; torch adds it after), centered subtracts the mean gradient's square; momentum
    accumulates the steps. Keras' defaults (torch: alpha 0.99, eps 1e-8, lr 1e-2)."""

    name: Literal["rmsprop"]
    learning_rate: float = Field(1e-3, gt=0)
    rho: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0)
    centered: bool = False
    weight_decay: float = Field(0.0, ge=0)  # decoupled, as every Keras optimizer's


class SGD(Strict):
    """Keras' SGD: m = momentum m - lr g, w += m (nesterov: w += momentum m - lr g). Unlike
    torch's (which keeps the unscaled gradient sum), the velocity holds lr, which differs once
    the learning rate changes. weight_decay is Keras': decoupled, w <- w - w wd lr before the
    step (torch's weight_decay adds wd w to the gradient instead)."""

    name: Literal["sgd"]
    learning_rate: float = Field(1e-2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)


Optimizer = Annotated[Adam | AdamW | RMSprop | SGD, Field(discriminator="name")]


def _class_weight(v: Any) -> Any:
    if isinstance(v, dict):
        keys = {int(k) if isinstance(k, str) and k in ("0", "1") else k for k in v}
        if keys != {0, 1}:
            raise ValueError(
                f"must be balanced or {{0: w0, 1: w1}} with both classes; got keys "
                f"{sorted(map(str, v))}"
            )
        out = {}
        for k, w in v.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
                raise ValueError(f"class {k}: the weight must be a number > 0; got {w!r}")
            out[int(k)] = float(w)
        return out
    return v


class Loss(Strict):
    """Binary cross-entropy, labels smoothed as y (1 - ls) + ls / 2 in both forms.

    `form` says what the loss is computed from:
    - auto: as Keras 3 on TensorFlow: when the model's last layer ends in a sigmoid activation
      (a dense layer with activation sigmoid, or an activation layer sigmoid), BCE is computed
      from the pre-sigmoid logits x (stable, no clipping: max(x, 0) - x y + log(1 + exp(-|x|)),
      so its gradient does not vanish at saturation); otherwise on the probabilities clipped to
      [epsilon, 1 - epsilon].
    - probabilities: always on the probabilities clipped to [epsilon, 1 - epsilon].

    Weights: per sample l = -(pos_weight y log p + (1 - y) log(1 - p)) (pos_weight as
    tf.nn.weighted_cross_entropy_with_logits and torch's BCEWithLogitsLoss), times the weight of
    the sample's class; the batch loss is sum(w l) / B (Keras' sum_over_batch_size, as fit's
    `class_weight`). `class_weight: balanced` takes MURA's weights from the training labels:
    w1 = N / (A + N), w0 = A / (A + N) (A positives, N negatives); or {0: w0, 1: w1}.
    The validation loss (the loop's, float64) uses the same weights and pos_weight, unlike
    Keras' fit, which weights only the training loss: a monitor on val_loss sees the loss
    that is trained.
    """

    name: LossName = "binary_crossentropy"
    form: LossForm = "auto"
    epsilon: float = Field(1e-7, gt=0, lt=0.5)  # the clip, where probabilities are used
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weight: Annotated[
        ClassWeightRule | dict[int, float] | None, BeforeValidator(_class_weight)
    ] = None
    pos_weight: float = Field(1.0, gt=0)

    def on_logits(self, last_layer: Any) -> bool:
        """True when the loss is computed from logits for a model ending in `last_layer`."""
        return (
            self.form == "auto"
            and getattr(last_layer, "type", None) in ("dense", "activation")
            and getattr(last_layer, "activation", None) == "sigmoid"
        )

    def class_weights(self, train_labels: Any) -> tuple[float, float]:
        """(w0, w1) for this loss given the training labels (1.0, 1.0 without class_weight)."""
        if self.class_weight is None:
            return 1.0, 1.0
        if isinstance(self.class_weight, dict):
            return self.class_weight[0], self.class_weight[1]
        labels = [float(y) for y in train_labels]
        a = sum(1 for y in labels if y >= 0.5)
        n = len(labels) - a
        if a == 0 or n == 0:
            raise ValueError(
                f"class_weight balanced needs both classes in the training labels; got {a} "
                f"positive and {n} negative"
            )
        return a / (a + n), n / (a + n)


# ---------------------------------------------------------------------------------------------
# Per-epoch policies: schedule, early stopping, best-epoch checkpoint (Keras' callbacks; the
# loop runs them, backends/recipe.py). A monitor names an EpochRecord field; `mode: auto` is
# min for a loss and max for the others (Keras' MonitorCallback: its metrics' direction).


def _named(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v  # `schedule: cosine` as {name: cosine}


class Monitored(Strict):
    monitor: MonitorName = "val_loss"
    mode: MonitorMode = "auto"

    def maximize(self) -> bool:
        """Whether a larger monitored value is better."""
        if self.mode != "auto":
            return self.mode == "max"
        return self.monitor.removeprefix("val_") != "loss"


class ConstantSchedule(Strict):
    name: Literal["constant"]


class StepSchedule(Strict):
    """lr * gamma ** floor(e / every) at 0-based epoch e (Keras ExponentialDecay, staircase)."""

    name: Literal["step"]
    every: PosInt  # epochs
    gamma: float = Field(0.1, gt=0, le=1)


class ExponentialSchedule(Strict):
    """lr * decay_rate ** (e / decay_epochs) at 0-based epoch e (Keras ExponentialDecay)."""

    name: Literal["exponential"]
    decay_rate: float = Field(gt=0, le=1)
    decay_epochs: PosInt = 1
    staircase: bool = False


class CosineSchedule(Strict):
    """lr ((1 - alpha) (1 + cos(pi min(e, D) / D)) / 2 + alpha) at 0-based epoch e (Keras
    CosineDecay): from lr down to the floor alpha lr over D = decay_epochs (None: the epochs)."""

    name: Literal["cosine"]
    decay_epochs: PosInt | None = None
    alpha: float = Field(0.0, ge=0, le=1)


class ReduceOnPlateau(Monitored):
    """Keras' ReduceLROnPlateau, after each epoch's validation: lr * factor (not below
    min_lr) once the monitor has not improved by more than min_delta for `patience` epochs;
    then `cooldown` epochs without counting."""

    name: Literal["reduce_on_plateau"]
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    min_delta: float = Field(1e-4, ge=0)
    cooldown: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)


Schedule = Annotated[
    ConstantSchedule | StepSchedule | ExponentialSchedule | CosineSchedule | ReduceOnPlateau,
    Field(discriminator="name"),
    BeforeValidator(_named),
]


class EarlyStopping(Monitored):
    """Keras' EarlyStopping: stop once the monitor has not improved by more than min_delta
    for `patience` epochs (from start_from_epoch, 0-based, on); restore_best: end with the
    weights of the best epoch (Keras' restore_best_weights)."""

    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = False
    baseline: float | None = None
    start_from_epoch: int = Field(0, ge=0)


class Checkpoint(Monitored):
    """Keras' ModelCheckpoint(save_best_only=True): keep the weights of the epoch whose monitor
    is best (strictly better than every earlier one and than initial_value_threshold); the test
    set is evaluated with them (they win over early_stopping.restore_best)."""

    initial_value_threshold: float | None = None


class Stage(Strict):
    """One training phase of a pretrained model (`train.stages`, run in order): `epochs`
    epochs at `learning_rate` (set at the stage's start), training the head only
    (`frozen: true`, also when neither key is given), the base from `trainable_from` on, or
    everything (`frozen: false`). A stage change re-creates the optimizer, as Keras' recompile
    after changing `trainable` does: no optimizer state (moments, iterations) carries over."""

    epochs: PosInt
    learning_rate: float = Field(gt=0)
    frozen: bool | None = None  # None: true unless trainable_from is given
    trainable_from: str | None = None

    @model_validator(mode="after")
    def _partial(self) -> Stage:
        if self.trainable_from is not None and self.frozen:
            raise ValueError(
                f"trainable_from: {self.trainable_from} trains part of the base, but frozen is "
                f"true; drop frozen (or set frozen: false)"
            )
        return self

    @property
    def head_only(self) -> bool:
        return self.frozen is not False and self.trainable_from is None


class TrainSpec(Strict):
    optimizer: Optimizer
    loss: Loss = Loss()
    epochs: int = Field(ge=1)  # with stages: their sum (may be omitted)
    batch_size: int = Field(ge=1)
    shuffle: bool = True
    schedule: Schedule = ConstantSchedule(name="constant")
    early_stopping: EarlyStopping | None = None
    checkpoint: Checkpoint | None = None
    # pretrained models: phases run in order (Stage); epochs is their sum; no schedule with them
    stages: tuple[Stage, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _stage_epochs(cls, data: Any) -> Any:
        """With stages, epochs defaults to the sum of the stages' epochs."""
        if isinstance(data, dict) and data.get("stages") and data.get("epochs") is None:
            stages = data["stages"]
            if isinstance(stages, list | tuple) and all(
                isinstance(s, dict) and isinstance(s.get("epochs"), int)
                and not isinstance(s.get("epochs"), bool) for s in stages
            ):
                data = {**data, "epochs": sum(s["epochs"] for s in stages)}
        return data

    @model_validator(mode="after")
    def _stages(self) -> TrainSpec:
        if self.stages is None:
            return self
        if not self.stages:
            raise ValueError("stages: must list at least one stage (or be omitted)")
        total = sum(s.epochs for s in self.stages)
        if self.epochs != total:
            raise ValueError(
                f"epochs: {self.epochs} but the stages sum to {total} epochs; omit epochs "
                f"(it is the stages' sum) or make them agree"
            )
        if not isinstance(self.schedule, ConstantSchedule):
            raise ValueError(
                f"schedule: {self.schedule.name} cannot be combined with stages (each stage "
                f"sets its learning_rate); drop the schedule"
            )
        return self

    def stage_of(self, epoch: int) -> int:
        """The 0-based index of the stage that 1-based `epoch` belongs to (0 without stages)."""
        end = 0
        for i, s in enumerate(self.stages or ()):
            end += s.epochs
            if epoch <= end:
                return i
        return max(len(self.stages or ()) - 1, 0)


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
    normalization: Normalization | None = None  # None: data's

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
    low: float = Field(0.0, ge=0, le=1)  # probabilities
    high: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _low_below_high(self) -> RandomModel:
        if not self.low < self.high:
            raise ValueError(
                f"low ({self.low:g}) must be below high ({self.high:g}): p ~ U[low, high)"
            )
        return self


class SequentialModel(ModelBase):
    kind: Literal["sequential"]
    backends: tuple[BackendName, ...] = ("keras", "torch")
    layers: tuple[Layer, ...] = Field(min_length=1)
    train: TrainSpec

    @model_validator(mode="after")
    def _no_stages(self) -> SequentialModel:
        if self.train.stages:
            raise ValueError(
                "train.stages switch what of a pretrained base trains; a sequential model "
                "has no base: drop stages"
            )
        return self


class BaseNet(Strict):
    name: BaseName
    weights: str = "imagenet"  # imagenet | none | a local file path
    frozen: bool = True  # frozen = weights fixed AND BatchNorm in inference mode
    # with frozen: false, train from this Keras layer or block (e.g. conv5) on; the layers
    # before stay frozen (weights fixed, BatchNorm in inference mode)
    trainable_from: str | None = None

    @model_validator(mode="after")
    def _partial(self) -> BaseNet:
        if self.trainable_from is not None and self.frozen:
            raise ValueError(
                f"trainable_from: {self.trainable_from} trains part of the base, but frozen is "
                f"true; set frozen: false (the base then trains from {self.trainable_from} on)"
            )
        return self

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
    normalization: Normalization | None = "imagenet"

    @model_validator(mode="after")
    def _stages_decide(self) -> PretrainedModel:
        if self.train.stages and (self.base.trainable_from is not None or not self.base.frozen):
            raise ValueError(
                f"train.stages decide what of the base trains, but base has frozen: "
                f"{str(self.base.frozen).lower()}, trainable_from: {self.base.trainable_from}; "
                f"leave both out of base (set frozen / trainable_from per stage)"
            )
        return self


Model = Annotated[RandomModel | SequentialModel | PretrainedModel, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------
# Evaluation, runtime, assumptions, the whole spec


class Bootstrap(Strict):
    resamples: int = Field(2000, ge=100, le=1_000_000)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    unit: BootstrapUnit = "patient"
    method: BootstrapMethod = "bca"  # covers better at small n (tests/test_stats.py)
    seed: Seed = 0


class Evaluation(Strict):
    metrics: tuple[Metric, ...] = ("accuracy", "recall", "precision")
    threshold: float = Field(0.5, gt=0, lt=1)
    bootstrap: Bootstrap = Bootstrap()
    levels: tuple[Level, ...] = ("image", "study")

    @field_validator("metrics", "levels")
    @classmethod
    def _nonempty_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list without repeats; got {list(v)}")
        return v


class Runtime(Strict):
    device: Device = "auto"
    deterministic: bool = True
    timeout_s: float = Field(6 * 3600, gt=0)  # per run
    # write the training state every N epochs so a killed run resumes there; 0: never
    checkpoint_every: int = Field(1, ge=0)
    # initial weights: each framework draws its own (per_backend), or every backend of a model
    # starts seed s from the first backend's seeded weights, ported (shared)
    init: InitMode = "per_backend"


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
    seeds: tuple[Seed, ...] = (0,)
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
        refs = [(f"{where}.model", claim.model) for where, claim in claims]
        refs += [
            (f"paper.not_printed[{i}].models[{j}]", name)
            for i, np_ in enumerate(self.paper.not_printed)
            for j, name in enumerate(np_.models)
        ]
        for where, claim in claims:
            if claim.level not in self.evaluation.levels:
                raise PydanticCustomError(
                    "cross_ref",
                    "{path}: level '{got}', but evaluation.levels is [{allowed}]; add {got} to "
                    "evaluation.levels or set the claim's level to one of them",
                    {"path": f"{where}.level", "got": claim.level,
                     "allowed": ", ".join(self.evaluation.levels)},
                )
        for where, model in refs:
            if model not in names:
                # a custom error type carries the path: an after-validator's own location is the top
                raise PydanticCustomError(
                    "cross_ref",
                    "{path}: no model named '{got}'; models are {allowed}",
                    {"path": where, "got": model, "allowed": ", ".join(sorted(names))},
                )
        return self

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def normalization(self, model: Model) -> str:
        return model.normalization or self.data.normalization




def spec_digest(obj: Any) -> str:
    """Stable sha256 of any pydantic object or JSON-able value."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
