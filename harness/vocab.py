"""The closed vocabularies of the spec language, each defined once (standard library only).

    python -m harness list          # prints them, and which backend supports what

Every name a spec may write for a closed set (layer types, base networks, optimizers, backends,
metrics, datasets, ...) is defined here as a `Literal` type, and the tuple of its names, in
order, is derived from it. Everything else derives from these: the spec's schema
(harness.spec.schema) types its fields with them, error messages list them, harness.shapes and
the data modules key their tables by them, each framework backend's `TABLES` and the registry's
`supports` claims are checked against them (tests/test_vocab.py), and `list` prints them.

Backend names are the one open set: `BACKENDS` are the built-in ones; third-party backends join
them through the registry's entry point group, and the spec accepts the registry's names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# ---------------------------------------------------------------------------------------------
# Models: what a backend builds and trains (the categories of a backend's `supports` and TABLES)

ModelKind = Literal["random", "sequential", "pretrained"]
LayerType = Literal[
    "conv2d",
    "batchnorm",
    "maxpool2d",
    "avgpool2d",
    "dropout",
    "flatten",
    "dense",
    "global_avg_pool",
    "activation",
]
BaseName = Literal[
    "densenet121", "densenet169", "densenet201", "resnet50", "vgg16", "efficientnet_b0",
    "mobilenet_v2", "inception_v3",
]
OptimizerName = Literal["adam", "adamw", "rmsprop", "sgd"]
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

MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
LAYER_TYPES: tuple[str, ...] = get_args(LayerType)
BASES: tuple[str, ...] = get_args(BaseName)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
INITIALIZERS: tuple[str, ...] = get_args(Initializer)

# Layer and training options
Padding = Literal["valid", "same"]
LossName = Literal["binary_crossentropy"]
LossForm = Literal["auto", "probabilities"]
PADDINGS: tuple[str, ...] = get_args(Padding)
LOSSES: tuple[str, ...] = get_args(LossName)
LOSS_FORMS: tuple[str, ...] = get_args(LossForm)

# The training recipe's per-epoch policies (harness.spec.schema TrainSpec; backends/recipe.py)
ScheduleName = Literal["constant", "step", "exponential", "cosine", "reduce_on_plateau"]
# what a callback watches: an EpochRecord field (training, or validation with val_)
MonitorName = Literal[
    "val_loss", "val_accuracy", "val_auroc", "val_recall", "val_precision",
    "loss", "accuracy", "recall", "precision",
]
MonitorMode = Literal["auto", "min", "max"]
# loss.class_weight by rule: balanced = MURA's w1 = N / (A + N), w0 = A / (A + N)
ClassWeightRule = Literal["balanced"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
MONITORS: tuple[str, ...] = get_args(MonitorName)
MONITOR_MODES: tuple[str, ...] = get_args(MonitorMode)
CLASS_WEIGHT_RULES: tuple[str, ...] = get_args(ClassWeightRule)

# ---------------------------------------------------------------------------------------------
# Backends: the built-in ones (backends/registry.py adds those installed through its entry points)

BuiltinBackend = Literal["reference", "keras", "keras-torch", "keras-jax", "torch"]
BACKENDS: tuple[str, ...] = get_args(BuiltinBackend)

# ---------------------------------------------------------------------------------------------
# Data

Dataset = Literal["mura-v1.1", "folder", "csv", "synthetic"]
BodyPart = Literal["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]
Channels = Literal[1, 3]
ResizeFilter = Literal["bilinear", "nearest", "area", "lanczos"]
# tf: [-1, 1] (x / 127.5 - 1), what keras.applications calls preprocess mode "tf"
Normalization = Literal["rescale", "imagenet", "tf", "none"]
# "official": the dataset's own test part (MURA's valid set, a folder's test/, a csv split column)
SplitStrategy = Literal["official", "image", "study", "patient"]
GroupLevel = Literal["image", "study", "patient"]  # what a split keeps together
# the generated data: MURA's tree and CSVs, or class folders (root/<split>/<class>/<images>)
SyntheticLayout = Literal["mura", "folder"]
# file names a folder or csv dataset may list (DICOM needs the `dicom` extra: pydicom)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
ValidationSource = Literal["official", "train"]
OnBadImage = Literal["fail", "skip"]

DATASETS: tuple[str, ...] = get_args(Dataset)
BODY_PARTS: tuple[str, ...] = get_args(BodyPart)
CHANNELS: tuple[int, ...] = get_args(Channels)
RESIZE_FILTERS: tuple[str, ...] = get_args(ResizeFilter)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
SPLIT_STRATEGIES: tuple[str, ...] = get_args(SplitStrategy)
VALIDATION_SOURCES: tuple[str, ...] = get_args(ValidationSource)
GROUP_LEVELS: tuple[str, ...] = get_args(GroupLevel)
SYNTHETIC_LAYOUTS: tuple[str, ...] = get_args(SyntheticLayout)
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)

# ---------------------------------------------------------------------------------------------
# Evaluation, claims, runtime

Metric = Literal["accuracy", "recall", "precision", "specificity", "f1", "auroc", "kappa"]
Level = Literal["image", "study"]
BootstrapUnit = Literal["image", "study", "patient"]
BootstrapMethod = Literal["percentile", "bca"]
ClaimRelation = Literal["eq", "gt", "approx"]
Device = Literal["auto", "cpu", "gpu"]
# initial weights: each framework its own, or the first backend's ported to the others
InitMode = Literal["per_backend", "shared"]

METRICS: tuple[str, ...] = get_args(Metric)
LEVELS: tuple[str, ...] = get_args(Level)
BOOTSTRAP_UNITS: tuple[str, ...] = get_args(BootstrapUnit)
BOOTSTRAP_METHODS: tuple[str, ...] = get_args(BootstrapMethod)
CLAIM_RELATIONS: tuple[str, ...] = get_args(ClaimRelation)
DEVICES: tuple[str, ...] = get_args(Device)
INIT_MODES: tuple[str, ...] = get_args(InitMode)


# ---------------------------------------------------------------------------------------------
# What a backend claims to support (declared in backends/registry.py, checked by the tests)


@dataclass(frozen=True)
class Supports:
    """The vocabulary a backend claims, by category; each field holds names of the set above.

    The categories other than `kinds` are also the keys of a framework backend's `TABLES`.
    `trains`: the backend runs a training recipe (False: it builds and predicts only)."""

    kinds: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    initializers: tuple[str, ...] = ()
    trains: bool = False

    def claims(self) -> dict[str, tuple[str, ...]]:
        """Category -> the names claimed, in the order of `CATEGORIES`."""
        return {c: getattr(self, c) for c in CATEGORIES}


# Category of a `Supports` claim -> the whole set it draws from, and how messages name a member.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "kinds": MODEL_KINDS,
    "layers": LAYER_TYPES,
    "bases": BASES,
    "optimizers": OPTIMIZERS,
    "activations": ACTIVATIONS,
    "initializers": INITIALIZERS,
}
CATEGORY_NAMES: dict[str, str] = {
    "kinds": "model kind",
    "layers": "layer type",
    "bases": "base",
    "optimizers": "optimizer",
    "activations": "activation",
    "initializers": "initializer",
}

# The paper's vocabulary: what the Keras and PyTorch backends build and train.
PAPER_MODELS = Supports(
    kinds=("sequential", "pretrained"),
    layers=LAYER_TYPES,
    bases=BASES,
    optimizers=OPTIMIZERS,
    activations=ACTIVATIONS,
    initializers=INITIALIZERS,
    trains=True,
)
