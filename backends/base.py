"""The backend interface: a few small steps, numpy in and out. No framework import here.

One training loop (backends/loop.py, framework-free) drives every backend, as Keras 3's one
`Trainer` drives per-backend steps. The harness worker (harness/worker.py) does:

    backend = registry.create("torch", device="auto")
    backend.seed(seed, deterministic=True)
    handle = backend.build(model_spec, ModelInput(224, 3, "rescale"))   # model + optimizer
    counts = backend.count_params(handle)
    history = loop.fit(backend, handle, model_spec, train_data, val_data, on_epoch)
    probs = backend.predict(handle, test_images)

and the loop calls only `train_step`, `predict`, `get/set_learning_rate`,
`get/set_weights` and (train.stages) `set_trainable`. What a backend implements (each method
is small; tables map the spec's vocabulary to framework classes, one dict per category,
exposed as `TABLES`):

    environment()                      versions, device, determinism flags in force (JSON-able)
    seed(seed, deterministic)          seed every RNG; enforce determinism when asked
    build(model, model_input)          the spec's model and, if it trains, its optimizer
    count_params(handle)               ParamCounts, the Keras way (BN statistics non-trainable)
    train_step(handle, batch)          one optimizer step; returns a thunk -> StepResult
    gradients(handle, batch, dtype)    the loss's gradients in float64 on a copy, no update (parity)
    activations(handle, images)        every layer's inference output (parity)
    predict(handle, images, logits=)   inference mode, float64 (N,): probabilities or logits
    get_learning_rate / set_learning_rate(handle, lr)
    set_trainable(handle, frozen, trainable_from)   a stage: what trains; a fresh optimizer
    get_weights(handle) / set_weights(handle, weights)    the neutral layout below
    get_state(handle) / set_state(handle, state)   weights + optimizer + RNG: resume a run
    peak_memory()                      the framework's own peak memory ({} when not applicable)

Input semantics every backend implements identically (the harness decides, backends apply):
- Images arrive as uint8 (N, H, W), one channel, already resized by the shared cache.
- Training batches come from `TrainData.batches(epoch, batch_size)`: the harness fixes the order
  and the per-sample augmentation parameters from (seed, epoch); see harness/data/augment.py for
  the exact geometry (flip, then rotate counter-clockwise about the centre, then zoom; bilinear;
  constant fill 0; pixel centres at integer indices). `apply_augmentation_numpy` there is the
  oracle the backend tests compare against. `Batch.augment` is False when the spec turns
  augmentation off: the step then applies nothing.
- Per sample, in this order: uint8 -> float32 in [0, 255] -> augmentation (train only) ->
  normalization -> replicate the channel to `ModelInput.channels`.
  Normalization: "rescale" x/255; "imagenet" x/255 then (x - mean) / std per RGB channel with
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (keras.applications "torch" mode);
  "none" leaves 0..255.
- The loss is the spec's (harness.spec.Loss): with `form: auto` and a model ending in a sigmoid,
  binary cross-entropy from the pre-sigmoid logits (what Keras 3 on TensorFlow computes);
  otherwise on probabilities clipped to [eps, 1 - eps]; labels smoothed as y (1 - ls) + ls / 2.
  `train_step` returns the batch-mean loss and the training-mode probabilities; the loop
  computes the validation loss itself from `predict(..., logits=True)` (or the probabilities)
  with `bce_logits` / `bce` below, in float64, so both backends define it identically.

`train_step` returns a thunk rather than numbers so that the loop can fetch step i's loss after
step i + 1 is dispatched: an accelerator is never idle while the host waits for a result.

Neutral weights (`get_weights`/`set_weights`): one dict of numpy arrays in Keras' layout, named
`<spec layer>/<variable>` with the layer names of harness.shapes (`conv2d_1`, `batchnorm_2`,
`dense_1`, ...) and Keras' variable names: `kernel` (conv HWIO, dense (in, out); the flatten
order is NHWC), `bias`, `gamma`, `beta`, `moving_mean`, `moving_variance`. A pretrained base's
variables are `<base>/<Keras layer name>/<variable>` (e.g. `densenet169/conv1_conv/kernel`).
They serve best-epoch restore, shared initial weights and weight-port parity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from harness.data.augment import EpochPlan, epoch_plan
from harness.spec import AugmentationSpec, Model, ParamCounts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInput:
    image_size: int
    channels: int  # 1 or 3
    normalization: str  # rescale | imagenet | none


@dataclass(frozen=True)
class Batch:
    """One training batch in the harness's order, with each sample's augmentation parameters."""

    images: np.ndarray  # uint8 (B, H, W)
    labels: np.ndarray  # float32 (B,)
    angle: np.ndarray  # float32 degrees (B,)
    scale: np.ndarray  # float32 (B,)
    hflip: np.ndarray  # bool (B,)
    vflip: np.ndarray  # bool (B,)
    augment: bool = True  # False: the spec's augmentation is off; apply nothing
    # per-sample loss weights (the loss' class weights, set by the loop); None: all 1
    weights: np.ndarray | None = None


@dataclass(frozen=True)
class EvalData:
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # float32 (N,)


@dataclass(frozen=True)
class TrainData:
    """The harness's data stream: identical for every backend given the same seed."""

    images: np.ndarray  # uint8 (M, H, W): the cache (memory-mapped), indexed by `index`
    index: np.ndarray  # int64 (N,): rows of `images` in the training set
    labels: np.ndarray  # float32 (N,)
    augmentation: AugmentationSpec
    seed: int
    shuffle: bool = True

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.seed, epoch, len(self.index), self.augmentation, self.shuffle)

    def batches(self, epoch: int, batch_size: int) -> Iterator[Batch]:
        """Batches of epoch `epoch` (1-based), in the harness's order, last one partial."""
        p = self.plan(epoch)
        for start in range(0, len(self.index), batch_size):
            pos = p.order[start : start + batch_size]
            rows = self.index[pos]
            # memmap fancy indexing wants sorted rows for locality; restore the order after
            sorter = np.argsort(rows, kind="stable")
            imgs = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
            imgs[sorter] = self.images[rows[sorter]]
            sl = slice(start, start + len(pos))
            yield Batch(
                imgs,
                self.labels[pos],
                p.angle[sl],
                p.scale[sl],
                p.hflip[sl],
                p.vflip[sl],
                bool(self.augmentation.enabled),
            )


def epoch_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, recall, precision, AUROC for the history (nan where undefined, never 0)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(probs, dtype=np.float64)
    pred = p >= threshold
    tp = float(np.sum(pred & y))
    acc = float(np.mean(pred == y)) if len(y) else float("nan")
    recall = tp / y.sum() if y.sum() else float("nan")
    precision = tp / pred.sum() if pred.sum() else float("nan")
    return {"accuracy": acc, "recall": float(recall), "precision": float(precision),
            "auroc": auroc(y, p)}


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U with mid-ranks for ties; nan with one class."""
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # mid-ranks: every run of equal scores gets the mean of its 1-based positions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def smooth_labels(labels: np.ndarray, label_smoothing: float) -> np.ndarray:
    """Keras' label smoothing for binary cross-entropy: y (1 - ls) + ls / 2, float64."""
    return np.asarray(labels, dtype=np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing


def bce(
    labels: np.ndarray,
    probs: np.ndarray,
    epsilon: float = 1e-7,
    weights: np.ndarray | None = None,
    pos_weight: float = 1.0,
) -> float:
    """Keras binary cross-entropy on probabilities clipped to [eps, 1 - eps]: the mean of
    w * -(pos_weight y log p + (1 - y) log(1 - p)) (harness.spec.Loss; w 1 without weights)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), epsilon, 1 - epsilon)
    y = np.asarray(labels, dtype=np.float64)
    per = -(pos_weight * y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.mean(per if weights is None else np.asarray(weights, np.float64) * per))


def bce_logits(
    labels: np.ndarray,
    logits: np.ndarray,
    weights: np.ndarray | None = None,
    pos_weight: float = 1.0,
) -> float:
    """Binary cross-entropy from logits x (mean): max(x, 0) - x y + log(1 + exp(-|x|)).

    tf.nn.sigmoid_cross_entropy_with_logits' formula, in float64: stable at saturation. With
    pos_weight q (tf.nn.weighted_cross_entropy_with_logits, torch's pos_weight):
    (1 - y) x + (1 + (q - 1) y) (log(1 + exp(-|x|)) + max(-x, 0)); times the sample weights.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0)  # -log sigmoid(x)
    per = (1 - y) * x + (1 + (pos_weight - 1) * y) * softplus_neg
    if pos_weight == 1.0:  # the unweighted formula exactly, as before
        per = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return float(np.mean(per if weights is None else np.asarray(weights, np.float64) * per))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float64 logistic function, without overflow for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


@dataclass(frozen=True)
class StepResult:
    """What one training step produced: the batch-mean loss and training-mode probabilities,
    and, when asked for, the gradient of every trainable variable before the update (neutral
    names and layout, like `get_weights`)."""

    loss: float
    probs: np.ndarray  # (B,)
    gradients: dict[str, np.ndarray] | None = None


@dataclass
class BackendInfo:
    """What `environment()` returns: versions, device, determinism flags actually in force."""

    name: str
    framework: str
    versions: dict[str, str | None] = field(default_factory=dict)
    device: str = "cpu"
    device_name: str | None = None
    determinism: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """One framework behind the harness: small steps, numpy in and out (see the module doc)."""

    name: ClassVar[str]

    def __init__(self, device: str = "auto") -> None:
        self.device_request = device  # auto | cpu | gpu

    @abstractmethod
    def environment(self) -> dict[str, Any]:
        """Versions, device in use, determinism flags (JSON-able)."""

    @abstractmethod
    def seed(self, seed: int, deterministic: bool) -> None:
        """Seed every RNG the framework uses; with deterministic, enforce determinism."""

    @abstractmethod
    def build(self, model: Model, model_input: ModelInput) -> Any:
        """Build the spec's model (and, for a model that trains, the optimizer of
        `model.train`); returns an opaque handle."""

    @abstractmethod
    def count_params(self, handle: Any) -> ParamCounts: ...

    @abstractmethod
    def predict(
        self, handle: Any, images: np.ndarray, batch_size: int = 64, logits: bool = False
    ) -> np.ndarray:
        """Inference mode, no augmentation: float64 (N,) probabilities of the positive class,
        or with `logits` the pre-sigmoid outputs (models whose loss is on logits only)."""

    def train_step(
        self, handle: Any, batch: Batch, gradients: bool = False
    ) -> Callable[[], StepResult]:
        """One optimizer step on `batch` with the spec's loss; returns a thunk that waits for
        the step and gives its StepResult (with the gradients when `gradients`)."""
        raise NotImplementedError(f"backend '{self.name}' does not train models")

    def gradients(self, handle: Any, batch: Batch, dtype: str = "float64"
                  ) -> dict[str, np.ndarray]:
        """The training-mode loss's gradient per trainable variable (neutral names) at the
        current weights, computed in `dtype` on a copy of the model: no update, the handle
        untouched; no augmentation. Weight-port parity's exact reference (harness/parity.py)."""
        raise NotImplementedError(f"backend '{self.name}' does not train models")

    def activations(self, handle: Any, images: np.ndarray) -> dict[str, np.ndarray]:
        """Inference-mode output of every spec layer (and of a pretrained base's blocks, as
        `<base>/<Keras layer name>`), channels last, for weight-port parity."""
        raise NotImplementedError(f"backend '{self.name}' does not expose activations")

    def get_learning_rate(self, handle: Any) -> float:
        raise NotImplementedError(f"backend '{self.name}' has no optimizer")

    def set_learning_rate(self, handle: Any, learning_rate: float) -> None:
        raise NotImplementedError(f"backend '{self.name}' has no optimizer")

    def set_trainable(self, handle: Any, frozen: bool, trainable_from: str | None) -> None:
        """Switch what of a pretrained model trains (a `train.stages` stage begins): `frozen`
        the head only; else the base from `trainable_from` (a harness.base_layers name) on, or
        all of it when None. Frozen parts keep their weights and run BatchNorm in inference
        mode. The optimizer is re-created for the new trainable variables with the spec's
        hyper-parameters and no state (Keras' recompile after changing `trainable`); the loop
        sets the stage's learning rate after."""
        raise NotImplementedError(f"backend '{self.name}' cannot change what trains")

    def get_weights(self, handle: Any) -> dict[str, np.ndarray]:
        """Every variable of the model (trainable or not) in the neutral layout."""
        raise NotImplementedError(f"backend '{self.name}' has no neutral weight layout")

    def set_weights(self, handle: Any, weights: dict[str, np.ndarray]) -> None:
        """Load `get_weights`' layout; every name must be present with its exact shape."""
        raise NotImplementedError(f"backend '{self.name}' has no neutral weight layout")

    def get_state(self, handle: Any) -> dict[str, np.ndarray]:
        """All a resumed run needs to go on bit for bit: every variable, the optimizer's state
        and the framework's RNG state, as numpy arrays under names of the backend's choosing."""
        raise NotImplementedError(f"backend '{self.name}' cannot save a training state")

    def set_state(self, handle: Any, state: dict[str, np.ndarray]) -> None:
        """Restore what `get_state` returned (same model and recipe)."""
        raise NotImplementedError(f"backend '{self.name}' cannot restore a training state")

    def peak_memory(self) -> dict[str, Any]:
        """The framework's own peak memory (keys ending in _bytes); {} when not applicable."""
        return {}


def check_weights(
    expected: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray], backend: str
) -> None:
    """The shared check of `set_weights`: same names, same shapes, or one error naming them."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(weights) if tuple(np.shape(weights[k])) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with another shape (e.g. {k}: {tuple(np.shape(weights[k]))}, "
                f"the model has {expected[k]})"
            )
        raise ValueError(f"backend '{backend}': weights do not fit the model: {'; '.join(parts)}")
