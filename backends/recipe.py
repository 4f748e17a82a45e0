"""The training recipe's per-epoch policies, as Keras' callbacks define them (framework-free).

    policy = Recipe(model.train, base_lr=model.train.optimizer.learning_rate)
    lr = policy.begin_epoch(epoch)        # schedule: the rate for this epoch, or None (unchanged)
    ...train, validate -> record...
    stop = policy.end_epoch(epoch, record, weights)   # plateau, early stopping, checkpoint

The loop (backends/loop.py) runs them in this order every epoch: schedule -> train epoch ->
validate -> reduce_on_plateau -> early stopping -> checkpoint. Each policy is a line-by-line
transcription of its Keras source (keras/src/callbacks/ and keras/src/optimizers/schedules/, 3.x):
- step, exponential, cosine: LearningRateScheduler calling the schedule with the 0-based epoch at
  the epoch's start (ExponentialDecay staircase / not, CosineDecay with alpha as the floor);
- reduce_on_plateau: ReduceLROnPlateau.on_epoch_end (wait, cooldown, best; the rate read back
  from the optimizer's float32 variable, never below min_lr);
- early_stopping: EarlyStopping.on_epoch_end (wait counts from the first epoch, stops when
  wait >= patience after epoch 0, baseline, start_from_epoch, restore_best_weights);
- checkpoint: ModelCheckpoint(save_best_only=True): weights of every strictly better epoch.
`MonitorCallback._is_improvement`: monitor - min_delta < best when minimizing (min_delta taken
negative), monitor - min_delta > best when maximizing; no best yet is an improvement.

Learning rates are float32 values, as a Keras optimizer's variable stores them. The state
(`state()` / `Recipe.restore`) is JSON-able numbers plus the kept weights, so a resumed run goes
on with the same counters, best values and weights (harness.records.TrainState).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from harness.records import EpochRecord
from harness.spec import (
    Checkpoint,
    CosineSchedule,
    EarlyStopping,
    ExponentialSchedule,
    Monitored,
    ReduceOnPlateau,
    StepSchedule,
    TrainSpec,
)

Weights = dict[str, np.ndarray]


def f32(x: float) -> float:
    """x as a float32 variable holds it (Keras' learning rate), back as a Python float."""
    return float(np.float32(x))


def scheduled_rate(recipe: TrainSpec, base_lr: float, epoch: int) -> float | None:
    """The rate a per-epoch schedule sets at the start of 0-based `epoch`; None when the
    schedule does not set one at epoch start (constant, reduce_on_plateau)."""
    s = recipe.schedule
    if isinstance(s, StepSchedule):  # ExponentialDecay(decay_steps=every, staircase=True)
        return f32(base_lr * s.gamma ** math.floor(epoch / s.every))
    if isinstance(s, ExponentialSchedule):
        p = epoch / s.decay_epochs
        return f32(base_lr * s.decay_rate ** (math.floor(p) if s.staircase else p))
    if isinstance(s, CosineSchedule):
        steps = s.decay_epochs or recipe.epochs
        done = min(epoch, steps) / steps
        return f32(base_lr * ((1 - s.alpha) * 0.5 * (1 + math.cos(math.pi * done)) + s.alpha))
    return None


def monitored(record: EpochRecord, monitor: str) -> float | None:
    """The record's value of `monitor` (None or nan: not available this epoch)."""
    value = getattr(record, monitor)
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class _Watch:
    """MonitorCallback's comparison, with the best value seen so far."""

    maximize: bool
    min_delta: float
    best: float | None = None

    @classmethod
    def of(cls, spec: Monitored, min_delta: float, baseline: float | None = None) -> _Watch:
        return cls(spec.maximize(), min_delta, baseline)

    def improves(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return True
        if self.maximize:
            return value - self.min_delta > reference
        return value + self.min_delta < reference  # Keras: min_delta *= -1 when minimizing


@dataclass
class Plateau:
    spec: ReduceOnPlateau
    watch: _Watch
    wait: int = 0
    cooldown_counter: int = 0

    def end_epoch(self, value: float | None, lr: float) -> float | None:
        """ReduceLROnPlateau.on_epoch_end: the reduced rate, or None to keep `lr`."""
        if value is None:
            return None
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.watch.improves(value, self.watch.best):
            self.watch.best = value
            self.wait = 0
        elif not self.cooldown_counter > 0:
            self.wait += 1
            if self.wait >= self.spec.patience:
                old = f32(lr)
                if old > np.float32(self.spec.min_lr):
                    self.cooldown_counter = self.spec.cooldown
                    self.wait = 0
                    return f32(max(old * self.spec.factor, self.spec.min_lr))
        return None


@dataclass
class Stopper:
    spec: EarlyStopping
    watch: _Watch
    wait: int = 0
    best_epoch: int = 0  # 1-based; 0: none yet
    stopped_epoch: int = 0

    def end_epoch(self, epoch: int, value: float | None) -> tuple[bool, bool]:
        """EarlyStopping.on_epoch_end at 1-based `epoch`: (stop, keep this epoch's weights)."""
        e = epoch - 1  # Keras counts from 0
        if value is None or e < self.spec.start_from_epoch:
            return False, False
        keep = self.best_epoch == 0 and self.spec.restore_best  # the first weights seen
        if keep:
            self.best_epoch = epoch
        self.wait += 1
        if self.watch.improves(value, self.watch.best):
            self.watch.best = value
            self.best_epoch = epoch
            if self.spec.baseline is None or self.watch.improves(value, self.spec.baseline):
                self.wait = 0
            return False, self.spec.restore_best
        if self.wait >= self.spec.patience and e > 0:
            self.stopped_epoch = epoch
            return True, keep
        return False, keep


@dataclass
class Keeper:
    """ModelCheckpoint(save_best_only=True): the epoch whose weights it last saved."""

    spec: Checkpoint
    watch: _Watch
    best_epoch: int = 0

    def end_epoch(self, epoch: int, value: float | None) -> bool:
        if value is None or not self.watch.improves(value, self.watch.best):
            return False
        self.watch.best = value
        self.best_epoch = epoch
        return True


@dataclass
class Recipe:
    """The per-epoch policies of one model's training recipe, with their state."""

    recipe: TrainSpec
    base_lr: float
    lr: float = 0.0
    plateau: Plateau | None = None
    stopper: Stopper | None = None
    keeper: Keeper | None = None
    # the weights early stopping (restore_best) and the checkpoint keep, by policy name
    kept: dict[str, Weights] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lr = f32(self.base_lr)
        r = self.recipe
        if isinstance(r.schedule, ReduceOnPlateau):
            self.plateau = Plateau(r.schedule, _Watch.of(r.schedule, r.schedule.min_delta))
        if r.early_stopping is not None:
            es = r.early_stopping
            self.stopper = Stopper(es, _Watch.of(es, es.min_delta))
        if r.checkpoint is not None:
            ck = r.checkpoint
            self.keeper = Keeper(ck, _Watch.of(ck, 0.0, ck.initial_value_threshold))

    @property
    def wants_weights(self) -> bool:
        return self.keeper is not None or (
            self.stopper is not None and self.stopper.spec.restore_best
        )

    def begin_epoch(self, epoch: int) -> float | None:
        """The schedule's rate for 1-based `epoch` when it sets one (the loop applies it)."""
        lr = scheduled_rate(self.recipe, self.base_lr, epoch - 1)
        if lr is not None:
            self.lr = lr
        return lr

    def end_epoch(
        self,
        epoch: int,
        record: EpochRecord,
        weights: Callable[[], Weights],
        set_lr: Callable[[float], None],
    ) -> bool:
        """Plateau, then early stopping, then checkpoint (Keras' callback order in the loop's
        list); `weights()` is called at most once, only when a policy keeps them. True: stop."""
        got: Weights | None = None

        def take() -> Weights:
            nonlocal got
            if got is None:
                got = weights()
            return got

        if self.plateau is not None:
            new = self.plateau.end_epoch(monitored(record, self.plateau.spec.monitor), self.lr)
            if new is not None:
                self.lr = new
                set_lr(new)
        stop = False
        if self.stopper is not None:
            stop, keep = self.stopper.end_epoch(
                epoch, monitored(record, self.stopper.spec.monitor)
            )
            if keep:
                self.kept["early_stopping"] = take()
        if self.keeper is not None and self.keeper.end_epoch(
            epoch, monitored(record, self.keeper.spec.monitor)
        ):
            self.kept["checkpoint"] = take()
        return stop

    def final_weights(self) -> tuple[int | None, Weights | None]:
        """(chosen 1-based epoch, its weights) to end with: the checkpoint's best, else early
        stopping's best when restore_best; (None, None): the last epoch's weights stay."""
        if self.keeper is not None and "checkpoint" in self.kept:
            return self.keeper.best_epoch, self.kept["checkpoint"]
        if self.stopper is not None and "early_stopping" in self.kept:
            return self.stopper.best_epoch, self.kept["early_stopping"]
        return None, None

    # -- resume ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The counters and best values (JSON-able); the kept weights are `kept`."""
        out: dict[str, Any] = {"lr": self.lr}
        for name in ("plateau", "stopper", "keeper"):
            policy = getattr(self, name)
            if policy is not None:
                fields = asdict(policy)
                fields.pop("spec")
                out[name] = fields
        return out

    def restore(self, state: dict[str, Any], kept: dict[str, Weights]) -> None:
        self.lr = float(state["lr"])
        for name in ("plateau", "stopper", "keeper"):
            policy = getattr(self, name)
            if policy is None:
                continue
            fields = dict(state[name])
            policy.watch = _Watch(**fields.pop("watch"))
            for key, value in fields.items():
                setattr(policy, key, value)
        self.kept = dict(kept)
