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


# ---------------------------------------------------------------------------------------------
# The recipe's per-epoch policies against Keras' own (tests/tools/make_keras_recipe_reference.py)

KERAS = np.load(ROOT / "tests" / "data" / "keras_recipe_reference.npz")
CURVE = [float(v) for v in KERAS["curve"]]


class Curve(Scripted):
    """Validation probabilities exp(-curve[e]) for an all-positive validation set, so the
    validation loss (probabilities form) of epoch e is curve[e]; records rates and weights."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__([0.1] * 1000)
        self.curve, self.epoch, self.rates, self.loaded = curve, 0, [], None

    def train_step(self, handle, batch):
        self.weights_seen = batch.weights
        return super().train_step(handle, batch)

    def predict(self, handle, images, batch_size=64, logits=False):
        self.epoch += 1
        return np.full(len(images), math.exp(-self.curve[self.epoch - 1]))

    def set_learning_rate(self, handle, learning_rate):
        self.rates.append((self.epoch, learning_rate))

    def get_weights(self, handle):
        return {"w": np.array([self.epoch], np.float32)}

    def set_weights(self, handle, weights):
        self.loaded = int(weights["w"][0])

    def get_state(self, handle):
        return {"epoch": np.array(self.epoch)}

    def set_state(self, handle, state):
        pass


def _curve_fit(*sets: str, epochs: int = 12):
    spec, model = spec_and_model(f"models.cnn.train.epochs={epochs}",
                                 "models.cnn.train.batch_size=10",
                                 "models.cnn.train.loss.form=probabilities", *sets)
    backend = Curve(CURVE)
    train = data(10, spec)
    val = EvalData(train.images[:2], np.ones(2, np.float32))
    return backend, fit(backend, model, model, train, val, clock=Clock())


@pytest.mark.parametrize(
    ("name", "sets"),
    [
        ("step", ["models.cnn.train.schedule.name=step", "models.cnn.train.schedule.every=3",
                  "models.cnn.train.schedule.gamma=0.5"]),
        ("exponential", ["models.cnn.train.schedule.name=exponential",
                         "models.cnn.train.schedule.decay_rate=0.9",
                         "models.cnn.train.schedule.decay_epochs=2"]),
        ("cosine", ["models.cnn.train.schedule.name=cosine",
                    "models.cnn.train.schedule.decay_epochs=8",
                    "models.cnn.train.schedule.alpha=0.1"]),
    ],
)
def test_schedule_sets_keras_rates_at_each_epoch_start(name, sets):
    backend, hist = _curve_fit("models.cnn.train.optimizer.learning_rate=0.01", *sets)
    # set before epoch e's validation (predict counts epochs): epoch index 0..11
    assert [e for e, _ in backend.rates] == list(range(12))
    np.testing.assert_allclose([r for _, r in backend.rates], KERAS[f"lr/{name}"], rtol=1e-6)
    assert [h.learning_rate for h in hist] == [r for _, r in backend.rates]


def test_reduce_on_plateau_follows_keras_on_a_scripted_curve():
    backend, hist = _curve_fit(
        "models.cnn.train.optimizer.learning_rate=0.01",
        "models.cnn.train.schedule.name=reduce_on_plateau", "models.cnn.train.schedule.factor=0.5",
        "models.cnn.train.schedule.patience=2", "models.cnn.train.schedule.cooldown=1",
        "models.cnn.train.schedule.min_lr=0.002",
    )
    assert [h.val_loss for h in hist] == pytest.approx(CURVE, rel=1e-12)
    # the rate after each epoch's callbacks = the next epoch's rate; Keras' sequence
    after = [h.learning_rate for h in hist[1:]]
    np.testing.assert_allclose(after, KERAS["plateau/lr"][:-1], rtol=1e-6)
    assert [e for e, _ in backend.rates] == [4, 8, 10]  # after epochs 4, 8, 10 (1-based)


def test_early_stopping_stops_at_keras_epoch_and_restores_the_best():
    backend, hist = _curve_fit(
        "models.cnn.train.early_stopping.patience=3",
        "models.cnn.train.early_stopping.min_delta=0.001",
        "models.cnn.train.early_stopping.restore_best=true",
    )
    stopped, best = int(KERAS["early/stopped"]), int(KERAS["early/best"])
    assert (stopped, best) == (4, 1)  # 0-based: 0.79995 is not 0.001 better than 0.8
    assert [h.epoch for h in hist] == list(range(1, stopped + 2))
    assert [h.epoch for h in hist if h.chosen] == [best + 1]
    assert backend.loaded == best + 1  # the weights taken after that epoch


def test_checkpoint_keeps_the_best_epoch_and_wins_over_restore_best():
    backend, hist = _curve_fit(
        "models.cnn.train.checkpoint.monitor=val_loss",
        "models.cnn.train.early_stopping.patience=100",
        "models.cnn.train.early_stopping.restore_best=true",
    )
    assert len(hist) == 12
    # strictly better only: epoch 7 (0.7 again) does not replace epoch 6
    assert [h.epoch for h in hist if h.chosen] == [6] and backend.loaded == 6


def test_constant_schedule_sets_no_rate_and_nothing_is_chosen_without_a_policy():
    backend, hist = _curve_fit(epochs=3)
    assert backend.rates == [] and backend.loaded is None
    assert not any(h.chosen for h in hist)
    assert [h.learning_rate for h in hist] == [float(np.float32(1e-4))] * 3  # paper.yaml's


def test_class_weights_weight_each_batch_and_the_validation_loss():
    spec, model = spec_and_model("models.cnn.train.epochs=1", "models.cnn.train.batch_size=10",
                                 "models.cnn.train.loss.form=probabilities",
                                 "models.cnn.train.loss.class_weight=balanced")
    backend = Curve([0.5])
    train = data(10, spec)
    labels = train.labels.copy()
    labels[:3], labels[3:] = 1, 0  # A = 3 positives, N = 7 negatives
    train = TrainData(train.images, train.index, labels, spec.augmentation, seed=0)
    val = EvalData(train.images[:4], np.array([1, 1, 0, 0], np.float32))
    hist = fit(backend, model, model, train, val, clock=Clock())
    w = backend.weights_seen
    order = train.plan(1).order
    # MURA: w1 = N / (A + N) = 0.7, w0 = A / (A + N) = 0.3
    np.testing.assert_allclose(w, np.where(labels[order] == 1, 0.7, 0.3), rtol=1e-7)
    p = math.exp(-0.5)
    by_hand = (0.7 * -math.log(p) * 2 + 0.3 * -math.log(1 - p) * 2) / 4
    assert hist[0].val_loss == pytest.approx(by_hand, rel=1e-9)


def test_pos_weight_in_the_validation_loss_from_logits():
    spec, model = spec_and_model("models.cnn.train.loss.pos_weight=3",
                                 "models.cnn.train.loss.class_weight={0: 2, 1: 1}")
    images = np.stack([np.full((4, 4), v, np.uint8) for v in (51, 204)])
    labels = np.array([0.0, 1.0], np.float32)
    loss, _ = validate(Scripted([]), model, model, EvalData(images, labels), (2.0, 1.0))
    x0, x1 = math.log(0.2 / 0.8), math.log(0.8 / 0.2)
    by_hand = (2 * -math.log(1 - 0.2) + 1 * 3 * -math.log(0.8)) / 2
    assert (x0, x1) != (0, 0) and loss == pytest.approx(by_hand, rel=1e-12)


def test_resume_keeps_plateau_early_stopping_and_checkpoint_state(tmp_path):
    """A run resumed from the state written after epoch 3 (through results' checkpoint file)
    makes the same rate reductions, stops at the same epoch and ends with the same weights."""
    from harness.results import read_checkpoint, write_checkpoint

    spec, model = spec_and_model(
        "models.cnn.train.epochs=12", "models.cnn.train.batch_size=10",
        "models.cnn.train.loss.form=probabilities",
        "models.cnn.train.schedule.name=reduce_on_plateau", "models.cnn.train.schedule.patience=1",
        "models.cnn.train.early_stopping.patience=4", "models.cnn.train.checkpoint.mode=min",
    )
    train = data(10, spec)
    val = EvalData(train.images[:2], np.ones(2, np.float32))
    whole_backend, states = Curve(CURVE), []
    whole = fit(whole_backend, model, model, train, val, clock=Clock(),
                on_checkpoint=states.append)
    path = tmp_path / "state.npz"
    write_checkpoint(path, "h", states[2])
    state = read_checkpoint(path, "h")
    assert state is not None and state.epoch == 3 and set(state.kept) == {"checkpoint"}
    resumed_backend = Curve(CURVE)
    resumed_backend.epoch = 3  # its validation curve goes on from epoch 4
    resumed = fit(resumed_backend, model, model, train, val, clock=Clock(), resume=state)
    assert [h.epoch for h in resumed] == [h.epoch for h in whole] and len(whole) < 12
    assert [h.learning_rate for h in resumed] == [h.learning_rate for h in whole]
    assert [h.chosen for h in resumed] == [h.chosen for h in whole]
    assert resumed_backend.loaded == whole_backend.loaded == 6


# -- training stages (train.stages) -----------------------------------------------------------


class Staged(Curve):
    """Curve that records what trains and the rates it is given, by epochs done."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__(curve)
        self.events: list[tuple] = []

    def set_trainable(self, handle, frozen, trainable_from):
        self.events.append(("trainable", self.epoch, frozen, trainable_from))

    def set_learning_rate(self, handle, learning_rate):
        self.events.append(("lr", self.epoch, learning_rate))

    def set_state(self, handle, state):
        self.events.append(("state", int(state["epoch"])))


STAGES = [{"epochs": 2, "learning_rate": 1e-3, "trainable_from": None},
          {"epochs": 3, "learning_rate": 1e-5, "trainable_from": "conv5"}]


def staged_model(stages=STAGES):
    from harness.spec import PretrainedModel

    spec, _ = spec_and_model()
    d = spec.model("densenet").model_dump()
    d["train"].update(epochs=None, batch_size=10, stages=stages)
    d["train"]["loss"]["form"] = "probabilities"
    return spec, PretrainedModel.model_validate(d)


def staged_fit(backend, model, spec, **kw):
    train = data(10, spec)
    val = EvalData(train.images[:2], np.ones(2, np.float32))
    return fit(backend, model, model, train, val, clock=Clock(), **kw)


def test_stages_switch_trainable_and_rate_at_each_stage_start():
    spec, model = staged_model()
    assert model.train.epochs == 5
    backend, states = Staged(CURVE), []
    hist = staged_fit(backend, model, spec, on_checkpoint=states.append)
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert backend.events == [
        ("trainable", 0, True, None), ("lr", 0, f32(1e-3)),
        ("trainable", 2, False, "conv5"), ("lr", 2, f32(1e-5)),
    ]
    assert [h.learning_rate for h in hist] == [f32(1e-3)] * 2 + [f32(1e-5)] * 3
    assert [s.recipe["stage"] for s in states] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # inside stage 2: its trainable part (fresh optimizer), then the saved state over it
        (3, [("trainable", 3, False, "conv5"), ("state", 3)]),
        # at the boundary: stage 1's structure for the saved state, then stage 2 begins
        (2, [("trainable", 2, True, None), ("state", 2),
             ("trainable", 2, False, "conv5"), ("lr", 2, float(np.float32(1e-5)))]),
    ],
)
def test_resume_re_enters_the_stage_the_state_was_saved_in(tmp_path, after, expected):
    from harness.results import read_checkpoint, write_checkpoint

    spec, model = staged_model()
    whole_backend, states = Staged(CURVE), []
    whole = staged_fit(whole_backend, model, spec, on_checkpoint=states.append)
    path = tmp_path / "state.npz"
    write_checkpoint(path, "h", states[after - 1])
    state = read_checkpoint(path, "h")
    assert state is not None and state.epoch == after
    resumed_backend = Staged(CURVE)
    resumed_backend.epoch = after
    resumed = staged_fit(resumed_backend, model, spec, resume=state)
    assert resumed_backend.events == expected
    assert [h.learning_rate for h in resumed] == [h.learning_rate for h in whole]
    assert [h.val_loss for h in resumed] == [h.val_loss for h in whole]


def test_resume_refuses_a_state_saved_in_another_stage():
    spec, model = staged_model()
    states = []
    staged_fit(Staged(CURVE), model, spec, on_checkpoint=states.append)
    _, other = staged_model([{"epochs": 4, "learning_rate": 1e-3},
                             {"epochs": 1, "learning_rate": 1e-5}])
    backend = Staged(CURVE)
    backend.epoch = 3
    with pytest.raises(ValueError, match="saved in stage 2, but the recipe puts that epoch in "
                                         "stage 1"):
        staged_fit(backend, other, spec, resume=states[2])
