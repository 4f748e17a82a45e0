"""The `reference` backend: numpy only. Implements the paper's random baseline.

    python -m harness run specs/demo.yaml --models baseline

"It predicts a random value between 0 and 1 for each instance and assigns a label of 1 if the
prediction is greater than or equal to 0.5" (Sec. III.B.i): p ~ U[low, high) from a seeded
numpy Generator; the label rule (p >= threshold) belongs to the evaluation, as for every model.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.base import Backend, EpochRecord, EvalData, ModelInput, TrainData
from harness.spec import Model, ParamCounts, RandomModel, TrainSpec


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        self._rng = np.random.default_rng(0)

    def environment(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "framework": "numpy",
            "versions": {"numpy": np.__version__, "python": platform.python_version()},
            "device": "cpu",
            "determinism": {"rng": "numpy.random.default_rng(seed)"},
        }

    def seed(self, seed: int, deterministic: bool) -> None:
        self._rng = np.random.default_rng(seed)

    def build(self, model: Model, model_input: ModelInput) -> RandomModel:
        if not isinstance(model, RandomModel):
            raise ValueError(
                f"backend 'reference' only runs kind: random models; '{model.name}' is "
                f"kind: {model.kind}"
            )
        return model

    def count_params(self, handle: Any) -> ParamCounts:
        return ParamCounts(total=0, trainable=0, non_trainable=0)

    def fit(
        self,
        handle: Any,
        train: TrainData,
        val: EvalData | None,
        recipe: TrainSpec | None,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        return []  # nothing to learn

    def predict(self, handle: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return self._rng.uniform(handle.low, handle.high, size=len(images)).astype(np.float64)
