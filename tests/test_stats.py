"""Bootstrap against scipy.stats.bootstrap, coverage, clusters, Wilson, McNemar and verdicts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats as sps
from simulate import bootstrap_coverage, mcnemar_rejections, verdict_outcomes

from harness.metrics import METRICS, compute_metrics
from harness.stats import (
    OVERLAP_VERDICT_RULE,
    VERDICT_RULE_PREDICTION,
    Interval,
    SeedSummary,
    binomial_sd,
    bootstrap_metrics,
    bootstrap_seed_mean,
    bootstrap_seed_mean_difference,
    bootstrap_seed_noise,
    clustered_mcnemar,
    clustered_mcnemar_from_counts,
    difference_interval,
    mcnemar,
    overlap_verdict,
    paired_bootstrap_difference,
    paired_test,
    prediction_interval,
    prediction_verdict,
    study_level,
    summarize_seeds,
    wilson_interval,
)


def scipy_statistic(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    """All METRICS along the last axis, written independently of harness.metrics (the oracle)."""
    y = np.moveaxis(y, axis, -1)
    p = np.moveaxis(p, axis, -1)
    pred = p >= 0.5
    pos = y == 1
    tp = np.sum(pred & pos, -1)
    fp = np.sum(pred & ~pos, -1)
    fn = np.sum(~pred & pos, -1)
    tn = np.sum(~pred & ~pos, -1)
    n = y.shape[-1]
    ranks = sps.rankdata(p, axis=-1)
    n_pos = pos.sum(-1)
    auroc = (np.sum(ranks * pos, -1) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    po = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    return np.stack(
        [
            po,
            tp / (tp + fn),
            tp / (tp + fp),
            tn / (tn + fp),
            2 * tp / (2 * tp + fp + fn),
            auroc,
            (po - pe) / (1 - pe),
        ]
    )


def toy_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.25 * y + 0.75 * rng.random(n), 0, 1)
    return y, p


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_intervals_agree_with_scipy(method: str) -> None:
    # Different random streams, so the endpoints differ by Monte Carlo error only: with 10,000
    # resamples each and n = 1000 the largest gap over all metrics and seeds tried was 0.0025.
    y, p = toy_set(1000, seed=1)
    ours = bootstrap_metrics(y, p, 0.5, METRICS, n_resamples=10_000, method=method, rng=11)
    ref = sps.bootstrap(
        (y, p),
        scipy_statistic,
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method=method,
        rng=12,
    ).confidence_interval
    point = compute_metrics(y, p)
    for i, name in enumerate(METRICS):
        ci = ours[name]
        assert ci.point == pytest.approx(point[name], abs=1e-12)
        assert ci.low == pytest.approx(ref.low[i], abs=0.005), name
        assert ci.high == pytest.approx(ref.high[i], abs=0.005), name
        assert (ci.method, ci.confidence, ci.n_resamples, ci.unit, ci.n_dropped) == (
            method,
            0.95,
            10_000,
            "image",
            0,
        )


def test_percentile_coverage_of_known_population() -> None:
    # 1,000 test sets of 500 images from a classifier whose true accuracy is 0.75; the 95%
    # percentile interval should cover 0.75 in 93-97% of them (binomial sd 0.007 around 0.95).
    rng = np.random.default_rng(2024)
    hits = 0
    n_sets = 1000
    for _ in range(n_sets):
        y = rng.integers(0, 2, 500)
        correct = rng.random(500) < 0.75
        p = np.where(correct == (y == 1), 0.9, 0.1)
        ci = bootstrap_metrics(y, p, 0.5, ("accuracy",), n_resamples=1000, rng=rng)["accuracy"]
        hits += ci.low <= 0.75 <= ci.high
    assert 0.93 <= hits / n_sets <= 0.97


def test_same_seed_same_intervals() -> None:
    y, p = toy_set(200, seed=3)
    a = bootstrap_metrics(y, p, 0.5, METRICS, n_resamples=500, method="bca", rng=5)
    b = bootstrap_metrics(
        y, p, 0.5, METRICS, n_resamples=500, method="bca", rng=np.random.default_rng(5)
    )
    c = bootstrap_metrics(y, p, 0.5, METRICS, n_resamples=500, method="bca", rng=6)
    assert a == b
    assert a != c


def clustered_set(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100 patients x 8 images; a patient's images share the label and whether they are right."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(100), 8)
    y = np.repeat(rng.integers(0, 2, 100), 8)
    correct = np.repeat(rng.random(100) < 0.75, 8)
    p = np.where(correct == (y == 1), 0.8, 0.2) + rng.normal(0, 0.05, 800)
    return y, p, patients


def test_cluster_interval_is_wider_for_correlated_images() -> None:
    y, p, patients = clustered_set(seed=4)
    image = bootstrap_metrics(y, p, 0.5, ("accuracy", "auroc"), n_resamples=2000, rng=1)
    patient = bootstrap_metrics(
        y, p, 0.5, ("accuracy", "auroc"), n_resamples=2000, clusters=patients, rng=1
    )
    for name in ("accuracy", "auroc"):
        assert patient[name].point == image[name].point
        # 8 perfectly correlated images per patient: the honest interval is ~sqrt(8) wider.
        wide = patient[name].high - patient[name].low
        width_ratio = wide / (image[name].high - image[name].low)
        assert width_ratio > 2.0, (name, width_ratio)
    assert image["accuracy"].unit == "image"
    assert patient["accuracy"].unit == "patient"


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_singleton_clusters_equal_image_level(method: str) -> None:
    y, p = toy_set(150, seed=8)
    ids = np.array([f"patient{i:05d}" for i in np.random.default_rng(0).permutation(150)])
    image = bootstrap_metrics(y, p, 0.5, METRICS, n_resamples=400, method=method, rng=3)
    single = bootstrap_metrics(
        y, p, 0.5, METRICS, n_resamples=400, method=method, clusters=ids, unit="image", rng=3
    )
    assert single == image


def test_cluster_bootstrap_against_scipy_on_cluster_totals() -> None:
    # Accuracy resampled by patient = ratio of resampled per-patient sums; scipy resamples the
    # per-patient (correct, size) pairs.
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 6, 120)
    patients = np.repeat(np.arange(120), sizes)
    n = patients.shape[0]
    y = rng.integers(0, 2, n)
    correct = np.repeat(rng.random(120) < 0.7, sizes) | (rng.random(n) < 0.1)
    p = np.where(correct == (y == 1), 0.7, 0.3)
    ours = bootstrap_metrics(
        y, p, 0.5, ("accuracy",), n_resamples=10_000, clusters=patients, rng=1
    )["accuracy"]
    right = np.bincount(patients, weights=correct.astype(float))

    def ratio(r: np.ndarray, s: np.ndarray, axis: int = -1) -> np.ndarray:
        return r.sum(axis) / s.sum(axis)

    ref = sps.bootstrap(
        (right, sizes),
        ratio,
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        rng=2,
    ).confidence_interval
    assert ours.low == pytest.approx(ref.low, abs=0.005)
    assert ours.high == pytest.approx(ref.high, abs=0.005)


def test_undefined_resamples_are_dropped_and_counted() -> None:
    # One predicted positive among 12: about (11/12)^12 = 35% of resamples miss it and their
    # precision is undefined.
    y = np.array([1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1])
    p = np.array([0.9] + [0.1] * 11)
    ci = bootstrap_metrics(y, p, 0.5, ("precision", "accuracy"), n_resamples=2000, rng=0)
    assert 0.30 < ci["precision"].n_dropped / 2000 < 0.40
    assert ci["precision"].low == ci["precision"].high == 1.0
    assert ci["accuracy"].n_dropped == 0
    # The report must say so: more than 1% dropped.
    assert ci["precision"].dropped_share == ci["precision"].n_dropped / 2000
    assert ci["precision"].dropped_notable and not ci["accuracy"].dropped_notable
    edge = Interval(0.5, 0.4, 0.6, "percentile", 0.95, 1000, "image", n_dropped=10)
    assert edge.dropped_share == 0.01 and not edge.dropped_notable  # exactly 1% is not shown
    assert Interval(0.5, 0.4, 0.6, "percentile", 0.95, 1000, "image", n_dropped=11).dropped_notable


def test_degenerate_distribution_gives_point_interval() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.8, 0.2, 0.7])
    for method in ("percentile", "bca"):
        ci = bootstrap_metrics(y, p, 0.5, ("accuracy",), n_resamples=200, method=method, rng=0)[
            "accuracy"
        ]
        assert (ci.point, ci.low, ci.high) == (1.0, 1.0, 1.0)


def test_undefined_point_gives_nan_interval() -> None:
    ci = bootstrap_metrics(np.ones(5), np.full(5, 0.7), 0.5, ("auroc",), n_resamples=100, rng=0)[
        "auroc"
    ]
    assert math.isnan(ci.point) and math.isnan(ci.low) and math.isnan(ci.high)
    assert ci.n_dropped == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_resamples": 1}, "n_resamples must be an integer >= 2; got 1"),
        ({"confidence": 95}, "confidence must be in (0, 1); got 95"),
        ({"method": "basic"}, "method must be one of percentile, bca; got 'basic'"),
        ({"clusters": np.arange(3)}, "clusters must be 1-D with one id per item (8)"),
        ({"rng": "seed"}, "rng must be a numpy Generator or an int seed; got str"),
        ({"unit": "subject"}, "unit must be one of image, study, patient; got 'subject'"),
    ],
)
def test_bootstrap_option_errors(kwargs: dict, message: str) -> None:
    args = {"n_resamples": 10, "rng": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        bootstrap_metrics(np.array([0, 1] * 4), np.linspace(0, 1, 8), 0.5, METRICS, **args)


def test_paired_difference() -> None:
    y, pa = toy_set(400, seed=21)
    pb = np.clip(pa + np.random.default_rng(22).normal(0, 0.15, 400), 0, 1)
    same = paired_bootstrap_difference(y, pa, pa, 0.5, METRICS, n_resamples=200, rng=0)
    assert all((ci.point, ci.low, ci.high) == (0.0, 0.0, 0.0) for ci in same.values())

    ours = paired_bootstrap_difference(y, pa, pb, 0.5, METRICS, n_resamples=10_000, rng=1)
    a, b = compute_metrics(y, pa), compute_metrics(y, pb)

    def diff(yy: np.ndarray, aa: np.ndarray, bb: np.ndarray, axis: int = -1) -> np.ndarray:
        return scipy_statistic(yy, aa, axis) - scipy_statistic(yy, bb, axis)

    ref = sps.bootstrap(
        (y, pa, pb),
        diff,
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        rng=2,
    ).confidence_interval
    for i, name in enumerate(METRICS):
        assert ours[name].point == pytest.approx(a[name] - b[name], abs=1e-12)
        assert ours[name].low == pytest.approx(ref.low[i], abs=0.005), name
        assert ours[name].high == pytest.approx(ref.high[i], abs=0.005), name


def test_paired_difference_bca_runs_with_clusters() -> None:
    y, p, patients = clustered_set(seed=5)
    out = paired_bootstrap_difference(
        y,
        p,
        1 - p,
        0.5,
        ("accuracy",),
        n_resamples=500,
        method="bca",
        clusters=patients,
        unit="patient",
        rng=0,
    )
    ci = out["accuracy"]
    assert ci.low <= ci.point <= ci.high
    assert ci.unit == "patient"


def test_study_level() -> None:
    labels = np.array([1, 1, 0, 0, 0, 1])
    probs = np.array([0.9, 0.5, 0.2, 0.4, 0.3, 0.6])
    ids = np.array(["s2", "s2", "s1", "s1", "s1", "s3"])
    y, p, u = study_level(labels, probs, ids)
    assert u.tolist() == ["s1", "s2", "s3"]
    assert y.tolist() == [0, 1, 1]
    assert p == pytest.approx([0.3, 0.7, 0.6])
    with pytest.raises(ValueError, match=re.escape("1 study(ies) mix 0 and 1, e.g. ['s1']")):
        study_level(np.array([1, 0]), np.array([0.5, 0.5]), np.array(["s1", "s1"]))


def test_summarize_seeds() -> None:
    s = summarize_seeds([0.70, 0.80, 0.75])
    assert s.n == 3 and s.min == 0.70 and s.max == 0.80
    assert s.mean == pytest.approx(0.75)
    assert s.sd == pytest.approx(0.05)  # ddof=1: sqrt((0.05^2 + 0.05^2) / 2)
    one = summarize_seeds([0.7])
    assert isinstance(one, SeedSummary) and one.mean == 0.7 and math.isnan(one.sd)
    with pytest.raises(ValueError, match="non-empty"):
        summarize_seeds([])


# Wilson 95% intervals of the paper's printed results, from the counts in REFERENCE.md
# ("Statistics" and "The paper"): test set of 1,951 images, 790 positives.
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (960, 1951, 46.99, 51.42),  # baseline accuracy 49.21%
        (1465, 1951, 73.12, 76.96),  # CNN accuracy 75.09%
        (475, 790, 56.67, 63.48),  # CNN recall 60.13%
        (1541, 1951, 77.12, 80.74),  # DenseNet accuracy 78.99%
        (543, 790, 65.42, 71.87),  # DenseNet recall 68.73%
    ],
)
def test_wilson_matches_reference(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (low, high)


def test_wilson_edges() -> None:
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="need 0 <= k <= n and n > 0; got k=11, n=10"):
        wilson_interval(11, 10)


def predictions_with(b: int, c: int, both_right: int, both_wrong: int) -> tuple[np.ndarray, ...]:
    """Labels and two models' predictions with the given disagreement table."""
    n = b + c + both_right + both_wrong
    y = np.ones(n, dtype=int)
    a_right = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)]
    b_right = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)]
    return y, a_right.astype(int), b_right.astype(int)


def test_mcnemar_exact_small_table() -> None:
    # b=10, c=2: two-sided binomial p = 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    r = mcnemar(*predictions_with(10, 2, 50, 5))
    assert (r.b, r.c, r.exact, r.statistic) == (10, 2, True, 2.0)
    assert r.p_value == pytest.approx(158 / 4096, abs=1e-15)
    assert r.p_value == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue, abs=1e-15)
    assert mcnemar(*predictions_with(0, 0, 5, 5)).p_value == 1.0


def test_mcnemar_chi_square_large_table() -> None:
    # b=30, c=10: (|30 - 10| - 1)^2 / 40 = 9.025; chi-square(1) tail = 2 * (1 - Phi(sqrt(9.025))).
    r = mcnemar(*predictions_with(30, 10, 100, 20))
    assert (r.b, r.c, r.exact) == (30, 10, False)
    assert r.statistic == pytest.approx(9.025, abs=1e-12)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(math.sqrt(9.025)), rel=1e-9)
    assert r.p_value == pytest.approx(0.002663, abs=1e-6)
    # The boundary: b + c = 24 is exact, 25 is chi-square.
    assert mcnemar(*predictions_with(20, 4, 0, 0)).exact
    assert not mcnemar(*predictions_with(20, 5, 0, 0)).exact


def test_mcnemar_rejects_probabilities() -> None:
    with pytest.raises(ValueError, match="pred_a must hold 0/1 predictions"):
        mcnemar(np.array([0, 1]), np.array([0.2, 0.9]), np.array([0, 1]))


def interval(point: float, low: float, high: float) -> Interval:
    return Interval(point, low, high, "percentile", 0.95, 2000, "image")


# The paper's CNN accuracy, 75.09% printed, Wilson [73.12, 76.96] (REFERENCE.md).
CNN_PRINTED = 0.7509
CNN_WILSON = wilson_interval(1465, 1951)


@pytest.mark.parametrize(
    ("ours", "label"),
    [
        (interval(0.745, 0.726, 0.764), "reproduced"),
        (interval(0.715, 0.696, 0.7340), "consistent"),
        (interval(0.780, 0.7600, 0.799), "consistent"),
        (interval(0.700, 0.680, 0.7200), "not reproduced (lower)"),
        (interval(0.800, 0.7800, 0.820), "not reproduced (higher)"),
    ],
)
def test_verdict_labels(ours: Interval, label: str) -> None:
    v = overlap_verdict(CNN_PRINTED, ours, CNN_WILSON)
    assert v.label == label
    assert "0.7509" in v.rule_text


def test_verdict_special_cases() -> None:
    ours = interval(0.745, 0.726, 0.764)
    assert overlap_verdict(None, ours, None).label == "no printed value"
    nan = float("nan")
    assert overlap_verdict(0.75, interval(nan, nan, nan), CNN_WILSON).label == "not computable"
    # Without the paper's interval the printed point stands for it.
    lower = overlap_verdict(0.7509, interval(0.715, 0.696, 0.734), None)
    assert lower.label == "not reproduced (lower)"
    text = overlap_verdict(CNN_PRINTED, ours, CNN_WILSON).rule_text
    assert text == "printed 0.7509 lies inside our 95% percentile interval [0.7260, 0.7640]"
    assert OVERLAP_VERDICT_RULE.startswith(
        "reproduced: the printed value lies inside our interval;")


# ---------------------------------------------------------------------------------------------
# The verdict against the paper: a prediction interval for one run on the paper's test-set size


def test_prediction_interval_by_hand() -> None:
    # Three seeds 0.74, 0.76, 0.75: m = 0.75, s = 0.01. Test-set SE e = 0.006, seed noise
    # w = 0.00004, paper n = 1951: p = sqrt(0.75 * 0.25 / 1951).
    p = math.sqrt(0.75 * 0.25 / 1951)
    pi = prediction_interval([0.74, 0.76, 0.75], 0.006, p, seed_noise=4e-5, n_paper=1951)
    training = (1 + 1 / 3) * (0.01**2 - 4e-5)  # (1 + 1/S)(s^2 - w) = 8e-5
    var = 0.006**2 + training + p**2
    df = 2 * var / ((1 + 1 / 3) * 0.01**2)  # (S - 1) V / ((1 + 1/S) s^2)
    q = sps.t.ppf(0.975, df)
    assert pi.mean == pytest.approx(0.75, abs=1e-15)
    assert pi.sd_seeds == pytest.approx(0.01, abs=1e-15)
    assert pi.sd_training == pytest.approx(math.sqrt(6e-5), rel=1e-12)
    assert pi.sd_total == pytest.approx(math.sqrt(var), rel=1e-12)
    assert pi.df == pytest.approx(df, rel=1e-12)
    assert pi.quantile == pytest.approx(q, rel=1e-12)
    half = q * math.sqrt(var)
    assert (pi.low, pi.high) == pytest.approx((0.75 - half, 0.75 + half), abs=1e-15)
    # The worked numbers, as a reviewer gets them on paper: V = 3.6e-5 + 8e-5 + 9.61e-5 =
    # 2.121e-4, df = 2 V / 1.333e-4 = 3.18, t(0.975, 3.18) = 3.082, half width 0.0449.
    assert round(pi.df, 2) == 3.18 and round(pi.quantile, 3) == 3.082
    assert (round(pi.low, 4), round(pi.high, 4)) == (0.7051, 0.7949)
    assert pi.with_training and pi.n_paper == 1951
    assert pi.describe() == (
        "[0.7051, 0.7949] = 0.7500 +/- 3.08 x 0.0146 (test 0.0060, training 0.0077 x "
        "sqrt(1 + 1/3) (s 0.0100, w 4.00e-05), paper 0.0098 at n = 1,951; 3 seeds, df 3.2)"
    )


def test_prediction_interval_without_seed_spread_uses_normal_quantile() -> None:
    pi = prediction_interval([0.8, 0.8, 0.8], 0.01, 0.02)
    assert math.isinf(pi.df)
    assert pi.quantile == pytest.approx(1.959964, abs=1e-6)
    assert pi.sd_total == pytest.approx(math.sqrt(0.01**2 + 0.02**2), rel=1e-12)
    # Seed noise larger than the seeds' spread: no training variance left, never negative.
    more = prediction_interval([0.79, 0.81, 0.8], 0.01, 0.02, seed_noise=1e-3)
    assert more.sd_training == 0.0
    assert more.sd_total == pytest.approx(pi.sd_total, rel=1e-12)


def test_prediction_interval_too_few_seeds_leaves_training_out() -> None:
    pi = prediction_interval([0.70, 0.80], 0.01, 0.02)
    assert not pi.with_training and pi.n_seeds == 2
    assert pi.sd_total == pytest.approx(math.sqrt(0.01**2 + 0.02**2), rel=1e-12)
    assert (pi.low, pi.high) == pytest.approx((0.75 - 1.959964 * pi.sd_total,
                                               0.75 + 1.959964 * pi.sd_total), abs=1e-6)


def test_prediction_interval_errors_and_nan() -> None:
    with pytest.raises(ValueError, match="seed_values must be a non-empty 1-D sequence"):
        prediction_interval([], 0.01, 0.01)
    with pytest.raises(ValueError, match=re.escape("confidence must be in (0, 1); got 95")):
        prediction_interval([0.5], 0.01, 0.01, confidence=95)
    nan = prediction_interval([0.5, 0.6, 0.7], float("nan"), 0.01)
    assert math.isnan(nan.low) and math.isnan(nan.high)
    assert prediction_verdict(0.6, nan).label == "not computable"
    assert binomial_sd(0.75, 1951) == pytest.approx(math.sqrt(0.1875 / 1951), rel=1e-15)
    with pytest.raises(ValueError, match="n must be positive; got 0"):
        binomial_sd(0.5, 0)


def test_prediction_verdict_labels() -> None:
    p = binomial_sd(0.75, 1951)
    pi = prediction_interval([0.74, 0.76, 0.75], 0.006, p, seed_noise=4e-5, n_paper=1951)
    assert prediction_verdict(0.7509, pi).label == "reproduced"
    assert prediction_verdict(0.7509, pi).rule_text.startswith(
        "printed 0.7509 lies inside [0.7051, 0.7949] = 0.7500 +/- 3.08 x 0.0146")
    low = prediction_verdict(0.70, pi)
    assert low.label == "not reproduced (higher)"
    assert low.rule_text.startswith("printed 0.7000 lies below [0.7051, 0.7949]")
    high = prediction_verdict(0.80, pi)
    assert high.label == "not reproduced (lower)"
    assert high.rule_text.startswith("printed 0.8000 lies above [0.7051, 0.7949]")
    assert prediction_verdict(None, pi).label == "no printed value"
    assert prediction_verdict(0.75, None).label == "not computable"
    two = prediction_interval([0.74, 0.76], 0.006, p, n_paper=1951)
    few = prediction_verdict(0.7509, two)
    assert few.label == "too few seeds"
    assert few.rule_text.startswith(
        "2 seeds: the spread across training runs cannot be estimated (needs 3); on test-set "
        "sampling alone, printed 0.7509 lies inside [")
    assert "too few seeds" in VERDICT_RULE_PREDICTION
    assert "consistent" not in prediction_verdict(0.7509, pi).label


def test_seed_noise_matches_per_seed_variances() -> None:
    # w = S/(S-1) x mean over seeds of Var*(m_s - mean): by its definition, from the same
    # resamples, equal to S/(S-1) x (mean_s Var*(m_s) - Var*(mean)) up to the ddof of var.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    probs = np.clip(0.3 * y + 0.7 * rng.random((3, 300)), 0, 1)
    w = bootstrap_seed_noise(y, probs, 0.5, ("accuracy",), n_resamples=4000, rng=5)["accuracy"]
    per_seed = [bootstrap_metrics(y, p, 0.5, ("accuracy",), n_resamples=4000, rng=9)["accuracy"]
                for p in probs]
    mean = bootstrap_seed_mean(y, probs, 0.5, ("accuracy",), n_resamples=4000, rng=9)["accuracy"]
    expected = 3 / 2 * (np.mean([iv.se**2 for iv in per_seed]) - mean.se**2)
    # Different resamples for each seed's own interval: Monte Carlo error only (~10% of w).
    assert w == pytest.approx(expected, rel=0.2)
    assert w > 0
    same = bootstrap_seed_noise(y, np.stack([probs[0]] * 3), 0.5, ("accuracy",),
                                n_resamples=200, rng=0)
    assert same["accuracy"] == pytest.approx(0.0, abs=1e-30)  # identical seeds never differ
    one = bootstrap_seed_noise(y, probs[:1], 0.5, ("accuracy",), n_resamples=200, rng=0)
    assert math.isnan(one["accuracy"])


def test_seed_mean_se_is_sd_of_resamples() -> None:
    y, p = toy_set(400, seed=2)
    iv = bootstrap_metrics(y, p, 0.5, ("accuracy",), n_resamples=5000, rng=1)["accuracy"]
    acc = compute_metrics(y, p)["accuracy"]
    # The bootstrap SE of a proportion approaches sqrt(acc (1 - acc) / n).
    assert iv.se == pytest.approx(math.sqrt(acc * (1 - acc) / 400), rel=0.05)


@pytest.mark.parametrize("sd_train", [0.0, 0.02, 0.038])
def test_verdict_rule_coverage_when_the_paper_ran_our_recipe(sd_train: float) -> None:
    # The simulated paper ran exactly our recipe (tests/simulate.py: ~2,000 test images in
    # patients of 1-5, 3 seeds, paper 1,951 images binomial). The new rule must call it
    # "reproduced" in about 95% of 600 worlds (binomial sd 0.9 points); the old rule, the seed
    # mean's interval against the paper's Wilson interval, must be shown to fail where the
    # issue measured it (with seed variance: 30% here, 35% in the issue).
    new, old = verdict_outcomes(sd_train, 600, seed=11)
    share = new["reproduced"] / 600
    # With no training variance the rule is conservative (measured 97.8% here): the seeds'
    # spread is then all test noise, and s^2 - w on S - 1 = 2 degrees of freedom still widens
    # the interval by a t quantile. Where training variance exists it holds 95-96%.
    low, high = (0.95, 0.985) if sd_train == 0 else (0.93, 0.97)
    assert low <= share <= high, (sd_train, dict(new))
    assert set(new) <= {"reproduced", "not reproduced (higher)", "not reproduced (lower)"}
    if sd_train > 0.03:
        assert old["reproduced"] / 600 < 0.5, dict(old)


# ---------------------------------------------------------------------------------------------
# McNemar adjusted for clusters

# Durkalski et al. (2003), psychiatry data (29 psychiatrists, 1-8 items each): per cluster the
# items A "right" and B "wrong" (b_k), the reverse (c_k), and the cluster size (n_k). Published
# chi-square statistics: McNemar 11.85, Obuchowski 7.19, Durkalski 7.54 (as checked by the R
# package clust.bin.pair's tests). Thyroid data of Obuchowski (1998), 21 patients: McNemar 4.5,
# Obuchowski 2.86, Durkalski 2.32.
PSYCHIATRY_B = [0, 1, 1, 1, 0, 3, 3, 3, 1, 0, 0, 1, 0, 0, 0,
                0, 0, 0, 3, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0]
PSYCHIATRY_C = [4, 2, 3, 2, 1, 3, 0, 2, 2, 4, 2, 4, 3, 2, 1,
                3, 1, 2, 0, 0, 0, 2, 1, 2, 2, 0, 0, 1, 1]
PSYCHIATRY_N = [7, 6, 7, 6, 4, 6, 5, 8, 4, 7, 3, 6, 7, 6, 5,
                4, 6, 5, 4, 3, 5, 4, 4, 2, 3, 2, 2, 3, 1]
THYROID_B = [0] * 8 + [1] + [0] * 12
THYROID_C = [2, 1, 0, 0, 1] + [0] * 9 + [2, 0, 0, 1, 0, 0, 0]
THYROID_N = [3, 3, 3, 1, 3, 4, 3, 2, 2, 1, 3, 2, 3, 2, 2, 3, 3, 3, 2, 1, 2]


@pytest.mark.parametrize(
    ("b", "c", "n", "obuchowski", "durkalski"),
    [
        (PSYCHIATRY_B, PSYCHIATRY_C, PSYCHIATRY_N, 7.19, 7.54),
        (THYROID_B, THYROID_C, THYROID_N, 2.86, 2.32),
    ],
)
def test_clustered_mcnemar_published_values(
    b: list[int], c: list[int], n: list[int], obuchowski: float, durkalski: float
) -> None:
    image = clustered_mcnemar_from_counts(np.array(b), np.array(c), np.array(n))
    cluster = clustered_mcnemar_from_counts(np.array(b), np.array(c), np.array(n),
                                            weighting="cluster")
    assert round(image.statistic, 2) == obuchowski
    assert round(cluster.statistic, 2) == durkalski
    assert image.p_value == pytest.approx(sps.chi2.sf(image.statistic, 1), rel=1e-12)
    assert (image.b, image.c, image.n_clusters) == (sum(b), sum(c), len(b))
    assert image.test == f"clustered (Obuchowski), {len(b)} clusters"
    assert cluster.test == f"clustered (Durkalski), {len(b)} clusters"


def test_clustered_mcnemar_from_items_matches_counts() -> None:
    # Unfold the psychiatry table into items: cluster k has b_k (A right, B wrong), c_k (A
    # wrong, B right) and the rest concordant (both right).
    ids, a, b = [], [], []
    for k, (bk, ck, nk) in enumerate(zip(PSYCHIATRY_B, PSYCHIATRY_C, PSYCHIATRY_N, strict=True)):
        ids += [f"p{k:02d}"] * nk
        a += [1] * bk + [0] * ck + [1] * (nk - bk - ck)
        b += [0] * bk + [1] * ck + [1] * (nk - bk - ck)
    y = np.ones(len(a), dtype=int)
    r = clustered_mcnemar(y, np.array(a), np.array(b), np.array(ids))
    assert round(r.statistic, 2) == 7.19
    assert (r.b, r.c) == (sum(PSYCHIATRY_B), sum(PSYCHIATRY_C))
    # The plain test on the same items, b = 21 and c = 50: (|b - c| - 1)^2 / (b + c) with the
    # continuity correction (11.85 without it, as published).
    plain = mcnemar(y, np.array(a), np.array(b))
    assert (plain.b, plain.c) == (21, 50)
    assert plain.statistic == pytest.approx(28**2 / 71, rel=1e-12)
    assert paired_test(y, np.array(a), np.array(b), None) == plain
    assert paired_test(y, np.array(a), np.array(b), np.array(ids)) == r


def test_clustered_mcnemar_singletons_and_edges() -> None:
    # One item per cluster: (K-1)/K x McNemar's statistic without continuity correction.
    y, a, b = predictions_with(30, 10, 100, 20)
    r = clustered_mcnemar(y, a, b, np.arange(y.shape[0]))
    assert r.statistic == pytest.approx(159 / 160 * (30 - 10) ** 2 / 40, rel=1e-12)
    # No discordance at all, or discordances that cancel inside every cluster: no evidence.
    none = clustered_mcnemar(np.ones(4), np.ones(4), np.ones(4), np.array([0, 0, 1, 1]))
    assert (none.statistic, none.p_value) == (0.0, 1.0)
    cancel = clustered_mcnemar(np.ones(4), np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]),
                               np.array([0, 0, 1, 1]))
    assert (cancel.b, cancel.c, cancel.p_value) == (2, 2, 1.0)
    message = "clusters must be 1-D with one id per item (4)"
    with pytest.raises(ValueError, match=re.escape(message)):
        clustered_mcnemar(np.ones(4), np.ones(4), np.ones(4), np.arange(3))
    with pytest.raises(ValueError, match="weighting must be one of image, cluster; got 'x'"):
        clustered_mcnemar(np.ones(4), np.ones(4), np.ones(4), np.arange(4),
                          weighting="x")  # type: ignore[arg-type]


def test_clustered_mcnemar_holds_its_level_where_plain_does_not() -> None:
    # Two equally accurate models on MURA-like clusters (1-5 images a patient, latent
    # intra-patient correlation 0.4; tests/simulate.py). 1,000 null worlds: a 5% test should
    # reject 5% (binomial sd 0.7 points); plain McNemar ignores the clusters and rejects more.
    rates = mcnemar_rejections(1000, seed=3)
    assert 0.035 <= rates["clustered (Obuchowski)"] <= 0.065, rates
    assert rates["plain"] >= 0.075, rates


def test_bca_covers_better_than_percentile_on_small_test_sets() -> None:
    # 30 test images, binormal scores with AUROC 0.80 (tests/simulate.py); 600 test sets, the
    # same for both methods (binomial sd 0.9 points). The percentile interval under-covers the
    # true AUROC and specificity; BCa is near the nominal 95%. The evidence for BCa as the
    # default (`evaluation.bootstrap.method`); tests/tools/coverage.py has the long table.
    cov = bootstrap_coverage(30, 600, seed=5, n_resamples=500)
    for metric in ("auroc", "specificity"):
        assert cov["percentile"][metric] < 0.94, cov
        assert 0.94 <= cov["bca"][metric] <= 0.985, cov
        assert abs(cov["bca"][metric] - 0.95) < abs(cov["percentile"][metric] - 0.95), cov


# ---------------------------------------------------------------------------------------------
# Two recipes side by side (harness compare)


def test_seed_mean_difference_paired() -> None:
    y, pa = toy_set(400, seed=21)
    rng = np.random.default_rng(22)
    pb = np.clip(pa + rng.normal(0, 0.15, 400), 0, 1)
    pc = np.clip(pa + rng.normal(0, 0.15, 400), 0, 1)
    same = bootstrap_seed_mean_difference(y, np.stack([pa, pb]), np.stack([pa, pb]), 0.5,
                                          ("accuracy",), n_resamples=200, rng=0)["accuracy"]
    assert (same.point, same.low, same.high, same.se) == (0.0, 0.0, 0.0, 0.0)
    # One seed a side: the paired difference of two models (other draws, same distribution).
    one = bootstrap_seed_mean_difference(y, pa[None], pb[None], 0.5, ("accuracy", "auroc"),
                                         n_resamples=8000, rng=1)
    ref = paired_bootstrap_difference(y, pa, pb, 0.5, ("accuracy", "auroc"), n_resamples=8000,
                                      rng=2)
    for name in ("accuracy", "auroc"):
        assert one[name].point == pytest.approx(ref[name].point, abs=1e-12)
        assert one[name].low == pytest.approx(ref[name].low, abs=0.005)
        assert one[name].high == pytest.approx(ref[name].high, abs=0.005)
    two = bootstrap_seed_mean_difference(y, np.stack([pa, pb]), pc[None], 0.5, ("accuracy",),
                                         n_resamples=200, rng=0)["accuracy"]
    acc = [compute_metrics(y, p)["accuracy"] for p in (pa, pb, pc)]
    assert two.point == pytest.approx((acc[0] + acc[1]) / 2 - acc[2], abs=1e-12)
    with pytest.raises(ValueError, match="probs_a and probs_b must score the same items"):
        bootstrap_seed_mean_difference(y, pa[None], pb[None, :300], rng=0)


def test_difference_interval_by_hand() -> None:
    # A: 0.80, 0.82, 0.84 (s 0.02), B: 0.70, 0.71, 0.72 (s 0.01); unpaired test SE 0.015.
    d = difference_interval([0.80, 0.82, 0.84], [0.70, 0.71, 0.72], 0.015, paired=False,
                            seed_noise_a=1e-4)
    t_a2 = 0.02**2 - 1e-4  # 3e-4
    var = 0.015**2 + t_a2 / 3 + 0.01**2 / 3
    df = 2 * var / (0.02**2 / 3 + 0.01**2 / 3)
    q = sps.t.ppf(0.975, df)
    assert d.difference == pytest.approx(0.11, abs=1e-12)
    assert d.sd_total == pytest.approx(math.sqrt(var), rel=1e-12)
    assert d.df == pytest.approx(df, rel=1e-12) and d.quantile == pytest.approx(q, rel=1e-12)
    half = q * math.sqrt(var)
    assert (d.low, d.high) == pytest.approx((0.11 - half, 0.11 + half), abs=1e-15)
    # V = 2.25e-4 + 1e-4 + 3.33e-5 = 3.583e-4; df = 2 V / 1.667e-4 = 4.30
    assert round(d.df, 2) == 4.3 and d.excludes_zero() and not d.paired
    single = difference_interval([0.8], [0.7, 0.72], 0.015, paired=True)
    assert not single.with_training
    assert single.sd_total == pytest.approx(0.015, rel=1e-12)
    assert single.quantile == pytest.approx(1.959964, abs=1e-6)
    flat = difference_interval([0.5, 0.5], [0.5, 0.5], 0.01, paired=True)
    assert math.isinf(flat.df) and not flat.excludes_zero()


def test_prediction_interval_is_clipped_to_the_metric_range() -> None:
    pi = prediction_interval([0.97, 0.99, 0.98], 0.01, 0.01, limits=(0.0, 1.0))
    assert pi.high == 1.0 and pi.low == pytest.approx(0.98 - pi.quantile * pi.sd_total)
    assert "clipped to the metric's range" in pi.describe()
    assert "clipped" not in prediction_interval([0.5, 0.6, 0.7], 0.01, 0.01).describe()


def test_difference_interval_is_clipped_to_the_range() -> None:
    d = difference_interval([0.0, 1.0, 0.5], [0.5, 0.5, 0.5], 0.05, paired=False,
                            limits=(-1.0, 1.0))
    assert (d.low, d.high) == (-1.0, 1.0)
    assert d.quantile * d.sd_total > 1.0  # before clipping it is wider than the range
