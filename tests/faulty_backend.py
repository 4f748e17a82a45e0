"""A third-party backend for the runner's reliability tests: numpy only, misbehaves on request.

tests/test_runner.py installs it as a distribution of its own (this module, a dist-info folder
and an entry point in the `repro_harness.backends` group) on the PYTHONPATH of the harness and
its workers, the way a user's backend would be installed. Nothing in harness/ knows about it.

    FAULTY_BACKEND="0:raise,1:hang"      # seed -> fault, read here and only here

Faults: raise (predict raises), nan-probs (predict returns NaN for every 7th image), nan-loss
(training reports a NaN loss), hang (sleeps for an hour), kill (SIGKILLs its own process),
slow (sleeps FAULTY_BACKEND_SLOW_S seconds, then behaves). Otherwise it predicts p ~ U[0, 1)
from the seed, like the reference backend, and trains nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.base import Backend, EvalData, ModelInput, TrainData
from harness.records import EpochRecord
from harness.spec import Model, ParamCounts, TrainSpec


class FaultyBackend(Backend):
    name = "faulty"

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        self._seed = 0
        self._rng = np.random.default_rng(0)

    def _fault(self) -> str:
        faults = dict(
            item.split(":", 1) for item in os.environ.get("FAULTY_BACKEND", "").split(",") if item
        )
        return faults.get(str(self._seed), "")

    def environment(self) -> dict[str, Any]:
        return {"name": self.name, "framework": "numpy", "device": "cpu"}

    def seed(self, seed: int, deterministic: bool) -> None:
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def build(self, model: Model, model_input: ModelInput) -> Model:
        return model

    def count_params(self, handle: Any) -> ParamCounts:
        return ParamCounts(total=0, trainable=0, non_trainable=0)

    def fit(
        self,
        handle: Any,
        train: TrainData,
        val: EvalData | None,
        recipe: TrainSpec,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        loss = float("nan") if self._fault() == "nan-loss" else 0.5
        history = [
            EpochRecord(e, loss, 0.5, 0.5, 0.5, None, None, None, None, 0.0, 0.0, len(train))
            for e in range(1, recipe.epochs + 1)
        ]
        for record in history:
            if on_epoch is not None:
                on_epoch(record)
        return history

    def predict(self, handle: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        fault = self._fault()
        if fault == "raise":
            raise RuntimeError("faulty backend: predict raised")
        if fault == "hang":
            time.sleep(3600)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "slow":
            time.sleep(float(os.environ.get("FAULTY_BACKEND_SLOW_S", "2")))
        probs = self._rng.uniform(0.0, 1.0, size=len(images))
        if fault == "nan-probs":
            probs[::7] = np.nan
        return probs
