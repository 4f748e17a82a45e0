"""The training loop, written once for every backend (framework-free).

    from backends.loop import fit
    history = fit(backend, handle, model_spec, train_data, val_data, on_epoch=print)

Owns what Keras' `Model.fit` owns, so no backend repeats it: epochs, the harness's batch stream
(`TrainData.batches`: order and augmentation parameters fixed by the seed), the history records,
the timing of the first step (tracing/compilation included), NaN-loss detection, validation after
each epoch, `on_epoch` progress and the end-of-epoch training state (`on_checkpoint`, `resume`):
a run killed in epoch k resumes at epoch k from the state saved after epoch k - 1, and in
deterministic mode ends bit-identical to an uninterrupted run (the batch order and augmentation
come from (seed, epoch), the rest from `Backend.get_state`). A backend supplies only its steps
(backends/base.py): `train_step`, `predict`, `get_state`/`set_state`. The validation loss is
computed here, in float64, from what `predict` returns (logits when the loss is on logits), so
every backend defines it identically. No I/O here: the worker writes the states.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from backends.base import (
    Backend,
    EvalData,
    StepResult,
    TrainData,
    bce,
    bce_logits,
    epoch_metrics,
    sigmoid,
    smooth_labels,
)
from backends.recipe import Recipe, f32
from harness.records import EpochRecord, TrainState
from harness.spec import Layer, Model, PretrainedModel, SequentialModel, TrainSpec

# Inference batch for validation (and, in the worker, the test set): one size for every
# backend, since a framework may pick other kernels, and so other roundings, per batch size.
PREDICT_BATCH = 64


class NonFiniteLoss(FloatingPointError):
    """The loss stopped being finite; `history` holds the epochs completed before."""

    def __init__(self, message: str, history: tuple[EpochRecord, ...] = ()) -> None:
        super().__init__(message)
        self.history = history


def last_layer(model: Model) -> Layer:
    """The spec layer that produces the model's output (it decides the loss form)."""
    if isinstance(model, SequentialModel):
        return model.layers[-1]
    if isinstance(model, PretrainedModel):
        return model.head[-1]
    raise TypeError(f"model '{model.name}' (kind {model.kind}) has no layers to train")


def sample_weights(
    labels: np.ndarray, class_weights: tuple[float, float], dtype: type = np.float32
) -> np.ndarray | None:
    """Each sample's loss weight, w1 for label 1 and w0 for 0; None when both are 1."""
    if class_weights == (1.0, 1.0):
        return None
    w0, w1 = class_weights
    return np.where(np.asarray(labels) >= 0.5, w1, w0).astype(dtype)


def validate(
    backend: Backend,
    handle: object,
    model: Model,
    val: EvalData,
    class_weights: tuple[float, float] = (1.0, 1.0),
) -> tuple[float, np.ndarray]:
    """(mean validation loss with the training loss' definition, probabilities) in float64:
    the same class weights (those of the training labels) and pos_weight."""
    loss = model.train.loss  # type: ignore[union-attr]
    y = smooth_labels(val.labels, loss.label_smoothing)
    w = sample_weights(val.labels, class_weights, np.float64)
    if loss.on_logits(last_layer(model)):
        logits = backend.predict(handle, val.images, PREDICT_BATCH, logits=True)
        return bce_logits(y, logits, w, loss.pos_weight), sigmoid(logits)
    probs = backend.predict(handle, val.images, PREDICT_BATCH)
    return bce(y, probs, loss.epsilon, w, loss.pos_weight), probs


@dataclass
class _Steps:
    """What one epoch's steps produced, checked as it arrives."""

    epoch: int
    on_step: Callable[[int, int], None] | None = None
    total: int = 0
    losses: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def add(self, result: StepResult, step: int, labels: np.ndarray) -> None:
        if not math.isfinite(result.loss):
            raise NonFiniteLoss(f"loss became NaN at epoch {self.epoch} step {step}")
        self.losses.append(result.loss)
        self.sizes.append(len(labels))
        self.probs.append(np.asarray(result.probs, dtype=np.float64).reshape(-1))
        self.labels.append(labels)
        if self.on_step is not None:
            self.on_step(len(self.losses), self.total)

    def labels_and_probs(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.labels:
            return np.zeros(0, np.float32), np.zeros(0)
        return np.concatenate(self.labels), np.concatenate(self.probs)


def fit(
    backend: Backend,
    handle: object,
    model: Model,
    train: TrainData,
    val: EvalData | None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    resume: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> list[EpochRecord]:
    """Train up to `model.train.epochs` epochs on the harness's stream; validate after each.

    With `train.stages`, the stages are an outer sequence over the epochs: at a stage's first
    epoch `Backend.set_trainable` switches what trains (a fresh optimizer: Keras' recompile) and
    the stage's learning rate is set; a resumed run re-enters the stage its state was saved in.
    Every epoch runs the same hook sequence: schedule (the epoch's learning rate) -> train
    epoch -> validate -> the recipe's callbacks (reduce_on_plateau, early stopping, checkpoint;
    backends/recipe.py). Early stopping ends the loop; at the end the checkpoint's best weights
    (else early stopping's, with restore_best) are loaded, and that epoch's record is `chosen`.

    With `resume`, restores that state and goes on with the next epoch; `on_checkpoint`
    receives the state after every `checkpoint_every`-th epoch but the last; `on_step` gets
    (steps done, steps in the epoch) after each training step's result arrives. Raises
    NonFiniteLoss (a FloatingPointError) naming the epoch and step when the loss stops being
    finite; it carries the history of the epochs before.
    """
    recipe = model.train  # type: ignore[union-attr]
    policy = Recipe(recipe, recipe.optimizer.learning_rate)
    class_weights = recipe.loss.class_weights(train.labels)
    history: list[EpochRecord] = []
    first = 1
    stage: int | None = None  # the index of the stage in force (recipe.stages)
    if resume is not None:
        if recipe.stages:
            # the saved optimizer state is the one of the stage its epoch ran in
            stage = _enter_stage(backend, handle, recipe, resume.epoch, resume)
        backend.set_state(handle, resume.backend)
        history, first = list(resume.history), resume.epoch + 1
        if resume.recipe:
            policy.restore(resume.recipe, resume.kept)
    for epoch in range(first, recipe.epochs + 1):
        if recipe.stages and recipe.stage_of(epoch) != stage:
            stage = _enter_stage(backend, handle, recipe, epoch)
            policy.lr = f32(recipe.stages[stage].learning_rate)
            backend.set_learning_rate(handle, policy.lr)
        lr = policy.begin_epoch(epoch)
        if lr is not None:
            backend.set_learning_rate(handle, lr)
        record = _epoch(backend, handle, model, train, val, epoch, epoch == first, clock,
                        class_weights, history, on_step)
        record = replace(record, learning_rate=policy.lr)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        stop = policy.end_epoch(
            epoch, record, lambda: backend.get_weights(handle),
            lambda rate: backend.set_learning_rate(handle, rate),
        )
        if stop:
            break
        if on_checkpoint is not None and epoch < recipe.epochs and epoch % checkpoint_every == 0:
            state = policy.state() if stage is None else {**policy.state(), "stage": stage}
            on_checkpoint(TrainState(epoch, tuple(history), backend.get_state(handle),
                                     state, dict(policy.kept)))
    chosen, weights = policy.final_weights()
    if weights is not None:
        backend.set_weights(handle, weights)
    if chosen is not None:
        history = [replace(h, chosen=h.epoch == chosen) for h in history]
    return history


def _enter_stage(
    backend: Backend,
    handle: object,
    recipe: TrainSpec,
    epoch: int,
    resume: TrainState | None = None,
) -> int:
    """Make the stage of 1-based `epoch` trainable (a fresh optimizer); its index. With
    `resume`, the stage the saved state names must be that one (else the state is not this
    recipe's)."""
    index = recipe.stage_of(epoch)
    if resume is not None and resume.recipe.get("stage", index) != index:
        raise ValueError(
            f"the training state after epoch {epoch} was saved in stage "
            f"{resume.recipe['stage'] + 1}, but the recipe puts that epoch in stage {index + 1}"
        )
    s = recipe.stages[index]  # type: ignore[index]
    backend.set_trainable(handle, s.head_only, s.trainable_from)
    return index


def _epoch(
    backend: Backend,
    handle: object,
    model: Model,
    train: TrainData,
    val: EvalData | None,
    epoch: int,
    timed: bool,
    clock: Callable[[], float],
    class_weights: tuple[float, float],
    history: list[EpochRecord],
    on_step: Callable[[int, int], None] | None = None,
) -> EpochRecord:
    """One epoch's training steps and validation, as its history record."""
    recipe = model.train  # type: ignore[union-attr]
    t_epoch = clock()
    first_step: float | None = None
    steps = _Steps(epoch, on_step=on_step, total=-(-len(train.index) // recipe.batch_size))
    pending: tuple[Callable[[], StepResult], int, np.ndarray] | None = None
    try:
        for step, batch in enumerate(train.batches(epoch, recipe.batch_size), start=1):
            w = sample_weights(batch.labels, class_weights)
            if w is not None:
                batch = replace(batch, weights=w)
            t_step = clock()
            done = backend.train_step(handle, batch)
            if timed and step == 1:  # wait for it: its time includes tracing
                steps.add(done(), step, batch.labels)
                first_step = clock() - t_step
                continue
            if pending is not None:  # fetched one step behind: the device never idles
                steps.add(pending[0](), pending[1], pending[2])
            pending = (done, step, batch.labels)
        if pending is not None:
            steps.add(pending[0](), pending[1], pending[2])
    except NonFiniteLoss as e:
        raise NonFiniteLoss(str(e), tuple(history)) from None
    train_seconds = clock() - t_epoch

    losses, sizes = steps.losses, steps.sizes
    n = int(sum(sizes))
    metrics = epoch_metrics(*steps.labels_and_probs())
    v_loss = v_acc = v_rec = v_prec = v_auc = None
    if val is not None and len(val.labels):
        v_loss, v_probs = validate(backend, handle, model, val, class_weights)
        vm = epoch_metrics(val.labels, v_probs)
        v_acc, v_rec, v_prec, v_auc = vm["accuracy"], vm["recall"], vm["precision"], vm["auroc"]
    return EpochRecord(
        epoch=epoch,
        loss=float(np.dot(losses, sizes) / n) if n else float("nan"),
        accuracy=metrics["accuracy"],
        recall=metrics["recall"],
        precision=metrics["precision"],
        val_loss=v_loss,
        val_accuracy=v_acc,
        val_recall=v_rec,
        val_precision=v_prec,
        val_auroc=v_auc,
        seconds=clock() - t_epoch,
        train_seconds=train_seconds,
        images=n,
        first_step_seconds=first_step,
    )
