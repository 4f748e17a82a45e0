"""Per run: one finished run's metrics with bootstrap intervals at each level, its training
history, its ROC curve, and whether it is degenerate (one predicted class for every image).

    opt = options(spec)
    ra, levels = analyze_run(run, scored_test_set(run), opt, notes)

Every bootstrap draws from `evaluation.bootstrap.seed`, so the same files give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from harness.analysis.load import ScoredTestSet, run_key
from harness.metrics import compute_metrics, roc_curve_points
from harness.records import RunResult
from harness.spec import Spec
from harness.stats import Interval, bootstrap_metrics, study_level

# The history keys the training-curve figure draws (train and validation loss and accuracy).
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class Options:
    """The evaluation settings every number uses (spec.evaluation, flattened)."""

    metrics: tuple[str, ...]
    levels: tuple[str, ...]
    threshold: float
    resamples: int
    confidence: float
    method: str
    unit: str
    seed: int


def options(spec: Spec) -> Options:
    ev = spec.evaluation
    b = ev.bootstrap
    return Options(tuple(ev.metrics), tuple(ev.levels), ev.threshold, b.resamples,
                   b.confidence, b.method, b.unit, b.seed)


@dataclass(frozen=True)
class Level:
    """One level's items: labels, per-item probabilities, resampling clusters."""

    labels: np.ndarray
    probs: np.ndarray
    clusters: np.ndarray | None
    unit: str
    ids: np.ndarray | None = None  # study ids at study level


def image_level(test: ScoredTestSet, unit: str) -> Level:
    clusters = {"patient": test.patient, "study": test.study}.get(unit)
    return Level(test.labels, test.probs, clusters, unit)


def study_level_of(test: ScoredTestSet, unit: str) -> Level:
    labels, probs, ids = study_level(test.labels, test.probs, test.study)
    if unit == "patient":
        _, first = np.unique(test.study, return_index=True)  # same sorted order as `ids`
        return Level(labels, probs, test.patient[first], "patient", ids)
    return Level(labels, probs, None, "study", ids)


def bootstrap_level(level: Level, opt: Options, *, clusters: bool = True) -> dict[str, Interval]:
    """The level's interval of every metric, resampling its clusters (or single images)."""
    return bootstrap_metrics(
        level.labels, level.probs, opt.threshold, opt.metrics,
        n_resamples=opt.resamples, confidence=opt.confidence, method=opt.method,  # type: ignore[arg-type]
        clusters=level.clusters if clusters else None,
        unit=(level.unit if clusters else "image"),  # type: ignore[arg-type]
        rng=opt.seed,
    )


@dataclass(frozen=True)
class RunAnalysis:
    """One current run that finished: its metrics with intervals at each level."""

    run_id: str
    model: str
    backend: str
    seed: int
    n_test: int
    n_studies: int | None
    epochs: int
    train_s: float | None
    points: Mapping[str, Mapping[str, float]]  # level -> metric -> value (compute_metrics)
    intervals: Mapping[str, Mapping[str, Interval]]  # level -> metric -> spec-unit interval
    image_unit: Mapping[str, Interval]  # image level, resampling images
    predicted_positive: int = 0  # test images predicted positive (image level)
    degenerate: str | None = None  # why the run is degenerate, e.g. "predicts negative for all"
    chosen_epoch: int | None = None  # the epoch whose weights were tested (checkpoint/restore_best)
    history: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # HISTORY_KEYS
    roc_auc: float = math.nan  # from the ROC curve, whether or not auroc is a report metric
    # (false positive rates, true positive rates); arrays, so left out of ==
    roc: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False)


def degenerate_reason(predicted_positive: int, n: int) -> str | None:
    """'predicts negative for all N test images' (or positive), or None."""
    if predicted_positive == 0:
        return f"predicts negative for all {n:,} test images"
    if predicted_positive == n:
        return f"predicts positive for all {n:,} test images"
    return None


def _curves(run: RunResult) -> dict[str, tuple[float, ...]]:
    out = {}
    for key in HISTORY_KEYS:
        values = [getattr(h, key) for h in run.history]
        out[key] = tuple(math.nan if v is None else float(v) for v in values)
    return out


def analyze_run(
    run: RunResult, test: ScoredTestSet, opt: Options, notes: list[str]
) -> tuple[RunAnalysis, dict[str, Level]]:
    """The run's RunAnalysis and its levels (kept for the seed and backend comparisons)."""
    model, backend, seed = run_key(run)
    rid = run.run_id
    levels: dict[str, Level] = {"image": image_level(test, opt.unit)}
    if "study" in opt.levels:
        try:
            levels["study"] = study_level_of(test, opt.unit)
        except ValueError as e:
            notes.append(f"{rid}: no study-level numbers: {e}")
    points: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    for name, lv in levels.items():
        if name not in opt.levels and name != "image":
            continue
        points[name] = compute_metrics(lv.labels, lv.probs, opt.threshold, opt.metrics)
        intervals[name] = bootstrap_level(lv, opt)
    image = levels["image"]
    image_unit = intervals["image"] if image.clusters is None else bootstrap_level(
        image, opt, clusters=False
    )
    phases = run.resources.get("phases_s") or {}
    train_s = phases.get("train")
    study = levels.get("study")
    n = int(test.labels.shape[0])
    positive = int(np.sum(test.probs >= opt.threshold))
    roc = None
    auc = math.nan
    if 0 < int(np.sum(test.labels)) < n:
        fpr, tpr = roc_curve_points(test.labels, test.probs)
        roc = (fpr, tpr)
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return (
        RunAnalysis(
            run_id=rid,
            model=model,
            backend=backend,
            seed=seed,
            n_test=n,
            n_studies=None if study is None else int(study.labels.shape[0]),
            epochs=len(run.history),
            chosen_epoch=next((h.epoch for h in run.history if h.chosen), None),
            train_s=float(train_s) if isinstance(train_s, (int, float)) else None,
            points=points,
            intervals=intervals,
            image_unit=image_unit,
            predicted_positive=positive,
            degenerate=degenerate_reason(positive, n),
            history=_curves(run),
            roc_auc=auc,
            roc=roc,
        ),
        levels,
    )
