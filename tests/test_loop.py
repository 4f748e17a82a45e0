"""The shared training loop (backends/loop.py), driven by a scripted numpy backend.

No framework: what the loop owns (epochs, batches, one-step-behind fetching, NaN detection,
validation loss, history, first-step timing) is checked here once for every backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from conftest import ROOT

from backends.base import Backend, Batch, EvalData, ModelInput, StepResult, TrainData
from backends.loop import PREDICT_BATCH, fit, validate
from harness.spec import ParamCounts, load_spec


class Scripted(Backend):
    """Losses from a script; probabilities = mean pixel / 255; logits = their logit."""

    name = "scripted"

    def __init__(self, losses: list[float]) -> None:
        super().__init__("cpu")
        self.losses = list(losses)
        self.calls: list[tuple[str, int]] = []  # ("step", batch size) / ("fetch", step) / ...

    def environment(self) -> dict:
        return {}

    def seed(self, seed: int, deterministic: bool) -> None:
        pass

    def build(self, model, model_input: ModelInput):
        return model

    def count_params(self, handle) -> ParamCounts:
        return ParamCounts(total=0, trainable=0, non_trainable=0)

    def train_step(self, handle, batch: Batch) -> Callable[[], StepResult]:
        self.calls.append(("step", len(batch.labels)))
        n = sum(1 for c in self.calls if c[0] == "step")
        loss = self.losses[n - 1]

        def done() -> StepResult:
            self.calls.append(("fetch", n))
            return StepResult(loss, batch.images.mean(axis=(1, 2)) / 255.0)

        return done

    def predict(self, handle, images, batch_size=64, logits=False):
        self.calls.append(("predict-logits" if logits else "predict", batch_size))
        p = np.asarray(images, np.float64).mean(axis=(1, 2)) / 255.0
        return np.log(p / (1 - p)) if logits else p


def spec_and_model(*sets: str):
    spec = load_spec(ROOT / "specs" / "paper.yaml", ["data.image_size=8", *sets])
    return spec, spec.model("cnn")


def data(n: int, spec, value: int = 100) -> TrainData:
    images = np.full((n, 4, 4), value, dtype=np.uint8)
    images[: n // 2] = 200
    labels = np.zeros(n, np.float32)
    labels[: n // 2] = 1
    return TrainData(images, np.arange(n), labels, spec.augmentation, seed=0)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_epochs_batches_partial_batch_and_history():
    spec, model = spec_and_model("models.cnn.train.epochs=2", "models.cnn.train.batch_size=4")
    backend = Scripted([0.5, 0.25, 1.0] * 2)
    seen = []
    hist = fit(backend, model, model, data(10, spec), None, seen.append, clock=Clock())
    steps = [c for c in backend.calls if c[0] == "step"]
    assert steps == [("step", 4), ("step", 4), ("step", 2)] * 2
    assert [h.epoch for h in hist] == [1, 2] and seen == hist
    # the batch-size-weighted mean: (4 * 0.5 + 4 * 0.25 + 2 * 1.0) / 10
    assert hist[0].loss == pytest.approx(0.5, abs=1e-15)
    assert hist[0].images == 10
    # p = 200/255 (label 1) or 100/255 (label 0): every sample right at threshold 0.5
    assert (hist[0].accuracy, hist[0].recall, hist[0].precision) == (1.0, 1.0, 1.0)
    assert hist[0].val_loss is None and hist[0].val_accuracy is None
    assert hist[1].first_step_seconds is None


def test_on_step_sees_every_step_with_the_epoch_total_after_its_result():
    spec, model = spec_and_model("models.cnn.train.epochs=2", "models.cnn.train.batch_size=4")
    backend = Scripted([0.5, 0.25, 1.0] * 2)
    seen = []
    fit(backend, model, model, data(10, spec), None, clock=Clock(),
        on_step=lambda done, total: seen.append((done, total, backend.calls[-1])))
    fetched = [("fetch", 1), ("fetch", 2), ("fetch", 3), ("fetch", 4), ("fetch", 5), ("fetch", 6)]
    assert seen == [(d, 3, f) for d, f in zip([1, 2, 3, 1, 2, 3], fetched, strict=True)]


def test_steps_are_fetched_one_behind_except_the_timed_first():
    spec, model = spec_and_model("models.cnn.train.epochs=1", "models.cnn.train.batch_size=2")
    backend = Scripted([0.1] * 4)
    fit(backend, model, model, data(8, spec), None, clock=Clock())
    assert backend.calls == [
        ("step", 2), ("fetch", 1),  # the first step is waited for: its time includes tracing
        ("step", 2), ("step", 2), ("fetch", 2), ("step", 2), ("fetch", 3), ("fetch", 4),
    ]


def test_first_step_time_comes_from_the_clock():
    spec, model = spec_and_model("models.cnn.train.epochs=1", "models.cnn.train.batch_size=4")
    clock = Clock()  # every reading advances one second
    hist = fit(Scripted([0.1, 0.1]), model, model, data(8, spec), None, clock=clock)
    # t_epoch=1, t_step=2, first step done at 3; step 2 at 4; train done at 5; record at 6
    assert hist[0].first_step_seconds == 1.0
    assert hist[0].train_seconds == 4.0
    assert hist[0].seconds == 5.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_names_epoch_and_step(bad):
    spec, model = spec_and_model("models.cnn.train.epochs=2", "models.cnn.train.batch_size=4")
    backend = Scripted([0.5, 0.5, 0.5, bad, 0.5, 0.5])
    with pytest.raises(FloatingPointError, match=r"^loss became NaN at epoch 2 step 1$"):
        fit(backend, model, model, data(10, spec), None, clock=Clock())


def test_validation_loss_from_logits_for_a_sigmoid_output():
    """form auto + Dense(sigmoid) last: the stable BCE of the logits, label smoothing applied."""
    spec, model = spec_and_model("models.cnn.train.loss.label_smoothing=0.2")
    images = np.stack([np.full((4, 4), v, np.uint8) for v in (51, 204)])
    labels = np.array([0.0, 1.0], np.float32)
    backend = Scripted([])
    loss, probs = validate(backend, model, model, EvalData(images, labels))
    assert backend.calls == [("predict-logits", PREDICT_BATCH)]
    y = labels.astype(np.float64) * 0.8 + 0.1
    x = np.log(np.array([0.2, 0.8]) / np.array([0.8, 0.2]))
    pairs = zip(x, y, strict=True)
    by_hand = [max(xi, 0) - xi * yi + math.log1p(math.exp(-abs(xi))) for xi, yi in pairs]
    assert loss == pytest.approx(np.mean(by_hand), rel=1e-12)
    np.testing.assert_allclose(probs, [0.2, 0.8], rtol=1e-12)


def test_validation_loss_on_clipped_probabilities_otherwise():
    spec, model = spec_and_model("models.cnn.train.loss.form=probabilities")
    images = np.stack([np.full((4, 4), v, np.uint8) for v in (51, 255)])
    labels = np.array([0.0, 0.0], np.float32)
    backend = Scripted([])
    loss, probs = validate(backend, model, model, EvalData(images, labels))
    assert backend.calls == [("predict", PREDICT_BATCH)]
    eps = model.train.loss.epsilon
    by_hand = (-math.log(1 - 0.2) - math.log(eps)) / 2  # p = 1 is clipped to 1 - eps
    assert loss == pytest.approx(by_hand, rel=1e-9)
    np.testing.assert_array_equal(probs, [0.2, 1.0])


def test_validation_runs_after_every_epoch_into_the_history():
    spec, model = spec_and_model("models.cnn.train.epochs=3", "models.cnn.train.batch_size=5")
    backend = Scripted([0.3] * 6)
    train = data(10, spec)
    val = EvalData(train.images[:4], train.labels[:4])  # all positives at p = 200/255
    hist = fit(backend, model, model, train, val, clock=Clock())
    assert [c[0] for c in backend.calls].count("predict-logits") == 3
    assert all(h.val_accuracy == 1.0 and h.val_recall == 1.0 for h in hist)
    x = math.log(200 / 55)
    assert hist[0].val_loss == pytest.approx(x * 0 + math.log1p(math.exp(-x)), rel=1e-12)
