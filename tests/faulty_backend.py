"""A third-party backend for the runner's reliability tests: numpy only, misbehaves on request.

tests/test_runner.py installs it as a distribution of its own (this module, a dist-info folder
and an entry point in the `repro_harness.backends` group) on the PYTHONPATH of the harness and
its workers, the way a user's backend would be installed. Nothing in harness/ knows about it.

    FAULTY_BACKEND="0:raise,1:hang"      # seed -> fault, read here and only here

Faults: raise (predict raises), nan-probs (predict returns NaN for every 7th image), nan-loss
(the training loss turns NaN in epoch 2), hang (sleeps for an hour), kill (SIGKILLs its
own process), slow (sleeps FAULTY_BACKEND_SLOW_S seconds, then behaves), jitter / flip
(predictions with noise from the OS: tiny / label-changing). Otherwise it
predicts p ~ U[0, 1) from the seed, like the reference backend; its training steps report
loss 0.5 and the labels as probabilities, and change nothing.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.base import Backend, Batch, ModelInput, StepResult
from harness.spec import Model, ParamCounts


class FaultyBackend(Backend):
    name = "faulty"

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        self._seed = 0
        self._rng = np.random.default_rng(0)
        self._validated = False

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

    def train_step(self, handle: Any, batch: Batch, gradients: bool = False
                   ) -> Callable[[], StepResult]:
        # nan-loss: finite through epoch 1, NaN once the first validation has run
        loss = float("nan") if self._fault() == "nan-loss" and self._validated else 0.5
        return lambda: StepResult(loss, np.asarray(batch.labels, np.float64))

    def predict(self, handle: Any, images: np.ndarray, batch_size: int = 64,
                logits: bool = False) -> np.ndarray:
        if logits:  # the loop's validation: p ~ U[0.2, 0.8), as logits
            self._validated = True
            p = self._rng.uniform(0.2, 0.8, size=len(images))
            return np.log(p / (1 - p))
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
        if fault == "jitter":  # a nondeterministic backend: noise from the OS, not the seed
            probs = np.clip(probs + np.frombuffer(os.urandom(8 * len(probs)), np.uint64)
                            / 2.0**64 * 1e-9, 0.0, 1.0)
        if fault == "flip":  # nondeterministic enough to change labels
            probs = np.frombuffer(os.urandom(8 * len(probs)), np.uint64) / 2.0**64
        if fault == "nan-probs":
            probs[::7] = np.nan
        return probs
