"""The backend interface: few methods, numpy in and out. No framework import here.

The harness worker (harness/worker.py) drives a backend like this:

    backend = registry.create("torch", device="auto")
    backend.seed(seed, deterministic=True)
    handle = backend.build(model_spec, ModelInput(224, 3, "rescale"))
    counts = backend.count_params(handle)
    history = backend.fit(handle, train_data, val_data, model_spec.train, on_epoch)
    probs = backend.predict(handle, test_images, batch_size)
    backend.peak_memory()

Input semantics every backend implements identically (the harness decides, backends apply):
- Images arrive as uint8 (N, H, W), one channel, already resized by the shared cache.
- Training batches come from `TrainData.batches(epoch, batch_size)`: the harness fixes the order
  and the per-sample augmentation parameters from (seed, epoch); see harness/data/augment.py for
  the exact geometry (flip, then rotate counter-clockwise about the centre, then zoom; bilinear;
  constant fill 0; pixel centres at integer indices). `apply_augmentation_numpy` there is the
  oracle the backend tests compare against.
- Per sample, in this order: uint8 -> float32 in [0, 255] -> augmentation (train only) ->
  normalization -> replicate the channel to `ModelInput.channels`.
  Normalization: "rescale" x/255; "imagenet" x/255 then (x - mean) / std per RGB channel with
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (keras.applications "torch" mode);
  "none" leaves 0..255.
- The last, partial batch of an epoch is kept (as Keras does).
- History metrics are computed with `epoch_metrics` below from the probabilities the model
  produced, so both backends define "accuracy" the same way (threshold 0.5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from harness.data.augment import EpochPlan, epoch_plan
from harness.records import EpochRecord
from harness.spec import AugmentationSpec, Model, ParamCounts, TrainSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInput:
    image_size: int
    channels: int  # 1 or 3
    normalization: str  # rescale | imagenet | none


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 (B, H, W)
    labels: np.ndarray  # float32 (B,)
    angle: np.ndarray  # float32 degrees (B,)
    scale: np.ndarray  # float32 (B,)
    hflip: np.ndarray  # bool (B,)
    vflip: np.ndarray  # bool (B,)


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
            )


def epoch_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, recall, precision for the history (nan where undefined, never 0)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp = float(np.sum(pred & y))
    acc = float(np.mean(pred == y)) if len(y) else float("nan")
    recall = tp / y.sum() if y.sum() else float("nan")
    precision = tp / pred.sum() if pred.sum() else float("nan")
    return {"accuracy": acc, "recall": float(recall), "precision": float(precision)}


def bce(labels: np.ndarray, probs: np.ndarray, epsilon: float = 1e-7) -> float:
    """Keras binary cross-entropy on probabilities clipped to [eps, 1 - eps] (mean)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), epsilon, 1 - epsilon)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


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
    """One framework behind the harness. Numpy in, numpy out."""

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
        """Build the spec's model; returns an opaque handle."""

    @abstractmethod
    def count_params(self, handle: Any) -> ParamCounts: ...

    @abstractmethod
    def fit(
        self,
        handle: Any,
        train: TrainData,
        val: EvalData | None,
        recipe: TrainSpec,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        """Train per the recipe on the harness's data stream; validate after each epoch."""

    @abstractmethod
    def predict(self, handle: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Probabilities of the positive class, float64 (N,), inference mode, no augmentation."""

    def peak_memory(self) -> dict[str, Any]:
        """The framework's own peak memory (keys ending in _bytes); {} when not applicable."""
        return {}
