"""Metrics against scikit-learn and hand-worked counts; the vectorized form against the scalar."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from harness.metrics import (
    METRICS,
    RankedSample,
    compute_metrics,
    compute_metrics_weighted,
)


def sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The oracle: scikit-learn with zero_division=nan, so undefined values are NaN as ours."""
    pred = (p >= threshold).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": accuracy_score(y, pred),
        "recall": recall_score(y, pred, zero_division=np.nan),
        "precision": precision_score(y, pred, zero_division=np.nan),
        "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
        "f1": f1_score(y, pred, zero_division=np.nan),
        "auroc": roc_auc_score(y, p) if both else math.nan,
        "kappa": cohen_kappa_score(y, pred, labels=[0, 1]),
    }


def assert_same(ours: dict[str, float], ref: dict[str, float], atol: float = 1e-12) -> None:
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=atol, nan_ok=True), name


# Hand-worked: at 0.5 these give tp=3 (0.9, 0.8, 0.5), fn=1 (0.2), fp=1 (0.7), tn=3 (0.1, 0.3, 0.4).
HAND_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
HAND_P = np.array([0.9, 0.8, 0.5, 0.2, 0.7, 0.1, 0.3, 0.4])


def test_hand_worked_counts() -> None:
    m = compute_metrics(HAND_Y, HAND_P)
    assert m["accuracy"] == 6 / 8
    assert m["recall"] == 3 / 4
    assert m["precision"] == 3 / 4
    assert m["specificity"] == 3 / 4
    assert m["f1"] == 2 * 3 / (2 * 3 + 1 + 1)
    # Pairs won by each positive over the negatives {0.7, 0.1, 0.3, 0.4}: 0.9 -> 4, 0.8 -> 4,
    # 0.5 -> 3, 0.2 -> 1: 12/16.
    assert m["auroc"] == 12 / 16
    # po = 0.75, pe = (4*4 + 4*4) / 64 = 0.5 -> kappa = 0.25 / 0.5.
    assert m["kappa"] == pytest.approx(0.5, abs=1e-15)
    assert_same(m, sklearn_metrics(HAND_Y, HAND_P))


def test_threshold_boundary_is_positive() -> None:
    # The paper's rule: label 1 when p >= 0.5, so p == 0.5 is a predicted positive.
    y = np.array([1, 0])
    p = np.array([0.5, 0.5])
    m = compute_metrics(y, p)
    assert m["recall"] == 1.0
    assert m["specificity"] == 0.0
    assert m["precision"] == 0.5
    assert m["auroc"] == 0.5  # a tie counts half
    assert_same(m, sklearn_metrics(y, p))
    assert compute_metrics(y, np.nextafter(p, 0))["recall"] == 0.0


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("rounding", [None, 1])
def test_random_against_sklearn(seed: int, rounding: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    if rounding is not None:
        p = np.round(p, rounding)  # many ties, including across classes and at 0.5
    threshold = float(rng.choice([0.5, 0.3, 0.7]))
    assert_same(compute_metrics(y, p, threshold), sklearn_metrics(y, p, threshold))


def test_undefined_values_are_nan_not_zero() -> None:
    # No predicted positive: precision 0/0. sklearn's default zero_division gives 0.0 with a
    # warning; with zero_division=np.nan it agrees with us.
    y = np.array([1, 1, 0])
    p = np.array([0.1, 0.2, 0.3])
    m = compute_metrics(y, p)
    assert math.isnan(m["precision"])
    assert m["f1"] == 0.0  # 2tp / (2tp + fp + fn) = 0 / 2 is defined
    assert_same(m, sklearn_metrics(y, p))
    one_class = compute_metrics(np.array([1, 1]), np.array([0.6, 0.9]))
    assert math.isnan(one_class["auroc"])
    assert math.isnan(one_class["specificity"])
    assert math.isnan(one_class["kappa"])
    assert one_class["accuracy"] == 1.0


def test_subset_and_order_of_metrics() -> None:
    m = compute_metrics(HAND_Y, HAND_P, metrics=("auroc", "accuracy"))
    assert list(m) == ["auroc", "accuracy"]


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], [0.1], "same length; got 2 and 1"),
        (
            [0, 1],
            [0.1, float("nan")],
            "probs must be finite; got 1 non-finite value(s), first at index 1: nan",
        ),
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1; got [2]"),
        ([], [], "empty"),
    ],
)
def test_input_errors(labels: list, probs: list, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compute_metrics(np.array(labels), np.array(probs, dtype=float))


def test_unknown_metric() -> None:
    with pytest.raises(ValueError, match="unknown \\['auc'\\]; allowed: accuracy, recall"):
        compute_metrics(HAND_Y, HAND_P, metrics=("auc",))


@pytest.mark.parametrize("seed", range(6))
def test_weighted_equals_repeated_items(seed: int) -> None:
    # Integer weights = the items repeated that many times (sklearn's roc_auc_score on the
    # repeated data is the oracle for the weighted AUROC).
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 80))
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n), 1 + seed % 2)
    weights = rng.integers(0, 4, (12, n))
    got = compute_metrics_weighted(y, p, weights)
    got_float = compute_metrics_weighted(y, p, weights.astype(np.float64))
    for b in range(weights.shape[0]):
        if weights[b].sum() == 0:
            assert all(math.isnan(got[name][b]) for name in METRICS)
            continue
        ry, rp = np.repeat(y, weights[b]), np.repeat(p, weights[b])
        row = {name: got[name][b] for name in METRICS}
        assert_same(row, compute_metrics(ry, rp))
        assert_same(row, sklearn_metrics(ry, rp))
        assert_same({name: got_float[name][b] for name in METRICS}, row)


def test_weighted_unit_weights_equal_scalar_and_fractional_weights() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    p = rng.random(300)
    scalar = compute_metrics(y, p)
    ones = compute_metrics_weighted(y, p, np.ones((1, 300)))
    assert_same({k: v[0] for k, v in ones.items()}, scalar)
    # Real-valued weights: sklearn's sample_weight is the oracle.
    w = rng.random(300)
    got = compute_metrics_weighted(y, p, w[None, :])
    pred = (p >= 0.5).astype(int)
    assert got["auroc"][0] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert got["accuracy"][0] == pytest.approx(accuracy_score(y, pred, sample_weight=w), abs=1e-12)
    assert got["kappa"][0] == pytest.approx(cohen_kappa_score(y, pred, sample_weight=w), abs=1e-12)


def test_weighted_shape_and_sign_errors() -> None:
    with pytest.raises(ValueError, match=r"weights must have shape \(B, 8\); got \(8,\)"):
        compute_metrics_weighted(HAND_Y, HAND_P, np.ones(8))
    with pytest.raises(ValueError, match="finite and non-negative"):
        compute_metrics_weighted(HAND_Y, HAND_P, -np.ones((1, 8)))


def test_ranked_sample_orders_ties_negatives_first() -> None:
    sample = RankedSample(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.2, 0.9]))
    assert sample.order.tolist() == [2, 1, 0, 3]
