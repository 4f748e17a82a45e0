"""Typed records that cross modules and processes: what a run produced, epoch by epoch.

    from harness.records import EpochRecord
    EpochRecord(epoch=1, loss=0.69, ...).to_dict()      # one line of a RunResult's history

results.py alone reads and writes them as JSON; everything else passes these objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of history, in the schema shared by all backends."""

    epoch: int  # 1-based
    loss: float
    accuracy: float
    recall: float
    precision: float
    val_loss: float | None
    val_accuracy: float | None
    val_recall: float | None
    val_precision: float | None
    seconds: float  # wall time of the epoch, validation included
    train_seconds: float  # wall time of the training steps only
    images: int  # training images seen
    first_step_seconds: float | None = None  # set on epoch 1: tracing/compilation included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
