"""Uncertainty around the metrics: bootstrap intervals, seeds, paired comparison, verdicts.

    from harness.stats import bootstrap_seed_mean, prediction_interval, prediction_verdict
    ci = bootstrap_seed_mean(labels, probs_by_seed, 0.5, ("accuracy",), rng=0)["accuracy"]
    pi = prediction_interval(seed_accuracies, ci.se, binomial_sd(ci.point, 1951), n_paper=1951)
    prediction_verdict(0.7509, pi)               # the report's verdict (verdict_rule_text)

The bootstrap is vectorized: every resample is a row of a (B, n) count matrix (how many times
each item is drawn) and all metrics come from matrix products on it, in chunks of rows so memory
stays near 2 M counts per chunk. With `clusters` (patient or study ids) the clusters are drawn
and each item gets its cluster's count, because one patient's images are correlated.
Pure functions, no I/O; every random draw takes an explicit Generator or seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import binomtest, chi2
from scipy.stats import t as student_t

from harness.metrics import METRICS, RankedSample, check_inputs, check_metric_names

Method = Literal["percentile", "bca"]
Unit = Literal["image", "study", "patient"]

# Counts per chunk of the (B, n) count matrix: 512 KB as int64, so each pass over a chunk stays in
# cache; chunks of 2**21 were 2-4x slower on a 2-core machine.
_CHUNK_ELEMENTS = 2**16

# Above this share of undefined (dropped) resamples an interval is conditional on the metric being
# defined in a visibly biased subset of test sets; the report says how many were dropped.
DROPPED_SHARE_SHOWN = 0.01

OVERLAP_VERDICT_RULE = (
    "reproduced: the printed value lies inside our interval; "
    "consistent: it does not, but our interval overlaps the Wilson interval of the paper's own "
    "counts; not reproduced (higher|lower): the two intervals do not overlap, and ours lies "
    "above|below the printed value; no printed value: the paper prints none; "
    "not computable: our interval is undefined (NaN)."
)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (fractions in [0, 1]).

    `n_dropped` counts resamples where the metric was undefined (e.g. precision with no predicted
    positive); the interval comes from the other `n_resamples - n_dropped`.
    """

    point: float
    low: float
    high: float
    method: str
    confidence: float
    n_resamples: int
    unit: str
    n_dropped: int = 0
    se: float = float("nan")  # bootstrap standard error: sd (ddof 1) of the defined resamples

    def contains(self, value: float) -> bool:
        """Whether `value` lies in [low, high]."""
        return bool(self.low <= value <= self.high)

    @property
    def dropped_share(self) -> float:
        """Share of resamples where the metric was undefined (dropped from the interval)."""
        return self.n_dropped / self.n_resamples if self.n_resamples else 0.0

    @property
    def dropped_notable(self) -> bool:
        """Whether so many resamples were dropped that a reader must be told (> 1%)."""
        return self.dropped_share > DROPPED_SHARE_SHOWN


@dataclass(frozen=True)
class SeedSummary:
    """Spread of one metric across training seeds."""

    n: int
    mean: float
    sd: float
    min: float
    max: float


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on the disagreement table of two models on the same items.

    b: items model A gets right and B wrong; c: the reverse. `statistic` is min(b, c) for the
    exact binomial test and the chi-square statistic otherwise; `test` names which, and
    `n_clusters` is set when the test is adjusted for clusters (`clustered_mcnemar`).
    """

    b: int
    c: int
    statistic: float
    p_value: float
    exact: bool
    test: str = ""
    n_clusters: int | None = None


@dataclass(frozen=True)
class Verdict:
    """A verdict label and the sentence that justifies it."""

    label: str
    rule_text: str


def _generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng must be a numpy Generator or an int seed; got {type(rng).__name__}")


def _check_options(n_resamples: int, confidence: float, method: str) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an integer >= 2; got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be one of percentile, bca; got {method!r}")


def _unit_of_items(
    clusters: np.ndarray | None, n: int, along: np.ndarray
) -> tuple[int, np.ndarray]:
    """(number of units, unit index of each item), units numbered by first appearance along `along`.

    Without clusters every item is its own unit. Numbering along the sorted order makes the unit
    of sorted column j equal to j for singleton clusters, so those resample exactly as images.
    """
    if clusters is None:
        unit = np.empty(n, np.intp)
        unit[along] = np.arange(n)
        return n, unit
    cl = np.asarray(clusters)
    if cl.ndim != 1 or cl.shape[0] != n:
        raise ValueError(f"clusters must be 1-D with one id per item ({n}); got shape {cl.shape}")
    _, first, inverse = np.unique(cl[along], return_index=True, return_inverse=True)
    relabel = np.empty(first.shape[0], np.intp)
    relabel[np.argsort(first)] = np.arange(first.shape[0])
    unit = np.empty(n, np.intp)
    unit[along] = relabel[inverse.ravel()]
    return first.shape[0], unit


StatFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def _bootstrap_distribution(
    stat: StatFn, n_units: int, n_resamples: int, gen: np.random.Generator
) -> dict[str, np.ndarray]:
    """stat() of `n_resamples` resamples of the units, drawn as count matrices chunk by chunk."""
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // n_units))
    # int32 draws are twice as fast as int64; offsets must fit too.
    dtype = np.int32 if chunk * n_units < 2**31 else np.int64
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        draws = gen.integers(0, n_units, size=(rows, n_units), dtype=dtype)
        np.add(draws, (np.arange(rows, dtype=dtype) * n_units)[:, None], out=draws)
        counts = np.bincount(draws.ravel(), minlength=rows * n_units).reshape(rows, n_units)
        for name, values in stat(counts).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _jackknife(stat: StatFn, n_units: int) -> dict[str, np.ndarray]:
    """stat() with each unit left out in turn."""
    chunk = max(1, min(n_units, _CHUNK_ELEMENTS // n_units))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_units, chunk):
        rows = min(chunk, n_units - start)
        counts = np.ones((rows, n_units), dtype=np.int64)
        counts[np.arange(rows), np.arange(start, start + rows)] = 0
        for name, values in stat(counts).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _interval(
    point: float,
    dist: np.ndarray,
    jack: np.ndarray | None,
    method: str,
    confidence: float,
    unit: str,
) -> Interval:
    """Percentile or BCa interval from a bootstrap distribution; NaN resamples are dropped."""
    finite = dist[np.isfinite(dist)]
    n_dropped = int(dist.shape[0] - finite.shape[0])
    nan = float("nan")
    if not math.isfinite(point) or finite.shape[0] < 2:
        return Interval(point, nan, nan, method, confidence, dist.shape[0], unit, n_dropped)
    se = float(np.std(finite, ddof=1))
    alpha = (1 - confidence) / 2
    levels = np.array([alpha, 1 - alpha])
    if method == "bca":
        if jack is None:
            raise ValueError("BCa needs the jackknife estimates")
        # z0 as scipy.stats.bootstrap: ties with the point estimate count half (Efron 14.3).
        share = (np.sum(finite < point) + np.sum(finite <= point)) / (2 * finite.shape[0])
        z0 = ndtri(share)
        jk = jack[np.isfinite(jack)]
        d = jk.mean() - jk if jk.size else np.zeros(1)
        den = np.sum(d**2) ** 1.5
        # No jackknife variation means no measurable skew: no acceleration.
        a = float(np.sum(d**3) / (6 * den)) if den > 0 else 0.0
        z = ndtri(levels)
        levels = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
        if not np.all(np.isfinite(levels)):
            return Interval(point, nan, nan, method, confidence, dist.shape[0], unit, n_dropped,
                            se)
    low, high = np.quantile(finite, levels)
    return Interval(
        point, float(low), float(high), method, confidence, dist.shape[0], unit, n_dropped, se
    )


def _resolve_unit(clusters: np.ndarray | None, unit: Unit | None) -> str:
    if unit is None:
        return "image" if clusters is None else "patient"
    if unit not in ("image", "study", "patient"):
        raise ValueError(f"unit must be one of image, study, patient; got {unit!r}")
    return unit


def _intervals(
    stat: StatFn,
    n_units: int,
    names: Sequence[str],
    *,
    n_resamples: int,
    confidence: float,
    method: str,
    unit_name: str,
    gen: np.random.Generator,
) -> dict[str, Interval]:
    """Point estimate (every unit once), bootstrap distribution, jackknife for BCa, intervals."""
    point = {k: float(v[0]) for k, v in stat(np.ones((1, n_units), np.int64)).items()}
    dist = _bootstrap_distribution(stat, n_units, int(n_resamples), gen)
    jack = _jackknife(stat, n_units) if method == "bca" else {}
    return {
        name: _interval(point[name], dist[name], jack.get(name), method, confidence, unit_name)
        for name in names
    }


def bootstrap_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: Method = "percentile",
    clusters: np.ndarray | None = None,
    unit: Unit | None = None,
    rng: np.random.Generator | int,
) -> dict[str, Interval]:
    """Bootstrap interval of each metric over the test items (or over `clusters` of them).

    `clusters` holds one id per item (patient or study); clusters are resampled whole. `unit`
    names what was resampled; default "image", or "patient" when clusters are given. BCa takes
    its acceleration from the jackknife over the same units (n_units^2 work: 4 M counts for
    2,000 images). Resamples where a metric is undefined are dropped and counted in
    `Interval.n_dropped`; the interval is then conditional on the metric being defined, so a
    large `n_dropped` is a warning sign. An undefined point estimate gives NaN bounds.
    """
    names = check_metric_names(metrics)
    _check_options(n_resamples, confidence, method)
    unit_name = _resolve_unit(clusters, unit)
    gen = _generator(rng)
    sample = RankedSample(labels, probs, threshold)
    n_units, unit_of_item = _unit_of_items(clusters, sample.n, sample.order)
    unit_of_column = unit_of_item[sample.order]
    identity = n_units == sample.n and np.array_equal(unit_of_column, np.arange(sample.n))

    def stat(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        w = unit_counts if identity else unit_counts[:, unit_of_column]
        return sample.evaluate(w, names)

    return _intervals(stat, n_units, names, n_resamples=n_resamples, confidence=confidence,
                      method=method, unit_name=unit_name, gen=gen)


def paired_bootstrap_difference(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: Method = "percentile",
    clusters: np.ndarray | None = None,
    unit: Unit | None = None,
    rng: np.random.Generator | int,
) -> dict[str, Interval]:
    """Interval of metric(A) - metric(B), both models scored on the same resamples of the items."""
    names = check_metric_names(metrics)
    _check_options(n_resamples, confidence, method)
    unit_name = _resolve_unit(clusters, unit)
    gen = _generator(rng)
    sample_a = RankedSample(labels, probs_a, threshold)
    sample_b = RankedSample(labels, probs_b, threshold)
    if sample_a.n != sample_b.n:
        raise ValueError(
            f"probs_a and probs_b must have the same length; got {sample_a.n} and {sample_b.n}"
        )
    n = sample_a.n
    n_units, unit_of_item = _unit_of_items(clusters, n, np.arange(n))
    columns_a = unit_of_item[sample_a.order]
    columns_b = unit_of_item[sample_b.order]

    def stat(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        a = sample_a.evaluate(unit_counts[:, columns_a], names)
        b = sample_b.evaluate(unit_counts[:, columns_b], names)
        return {name: a[name] - b[name] for name in names}

    return _intervals(stat, n_units, names, n_resamples=n_resamples, confidence=confidence,
                      method=method, unit_name=unit_name, gen=gen)


def study_level(
    labels: np.ndarray, probs: np.ndarray, study_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probs, ids) per study, ids sorted; a study's probability is its images' mean (MURA).

    Raises ValueError when one study's images carry different labels.
    """
    y, p = check_inputs(labels, probs)
    ids = np.asarray(study_ids)
    if ids.ndim != 1 or ids.shape[0] != y.shape[0]:
        raise ValueError(
            f"study_ids must be 1-D with one id per image ({y.shape[0]}); got shape {ids.shape}"
        )
    unique, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.ravel()
    sizes = np.bincount(inverse)
    positives = np.bincount(inverse, weights=y)
    mixed = (positives > 0) & (positives < sizes)
    if mixed.any():
        bad = unique[mixed][:5].tolist()
        raise ValueError(
            f"study labels must agree across a study's images; {int(mixed.sum())} "
            f"study(ies) mix 0 and 1, e.g. {bad}"
        )
    study_probs = np.bincount(inverse, weights=p) / sizes
    return (positives > 0).astype(np.int8), study_probs, unique


def summarize_seeds(values: Sequence[float]) -> SeedSummary:
    """n, mean, sd (ddof=1; NaN for one seed), min and max of one metric across seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence; got shape {v.shape}")
    sd = float(np.std(v, ddof=1)) if v.shape[0] > 1 else float("nan")
    return SeedSummary(int(v.shape[0]), float(v.mean()), sd, float(v.min()), float(v.max()))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (Wilson 1927), as fractions."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0; got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    z = float(ndtri(1 - (1 - confidence) / 2))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n a bound is exactly 0 or 1; the formula can miss it by one ulp.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def mcnemar(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> McNemarResult:
    """McNemar's test of two models' predictions on the same items (Dietterich 1998).

    Exact two-sided binomial test when b + c < 25; otherwise chi-square with continuity
    correction, (max(|b - c| - 1, 0))^2 / (b + c), on 1 degree of freedom.
    """
    y, a, b_pred = _check_predictions(labels, pred_a, pred_b)
    right_a = a == y
    right_b = b_pred == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c < 25:
        p_value = binomtest(b, b + c, 0.5).pvalue if b + c > 0 else 1.0
        return McNemarResult(b, c, float(min(b, c)), float(p_value), True, "exact binomial")
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return McNemarResult(b, c, float(statistic), float(chi2.sf(statistic, 1)), False,
                         "chi-square, continuity-corrected")


def _check_predictions(
    labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, pred_a, pred_b) as int8 0/1 arrays of one shape; ValueError otherwise."""
    y, _ = check_inputs(labels, np.zeros(np.shape(labels)[:1]))
    preds = []
    for name, pred in (("pred_a", pred_a), ("pred_b", pred_b)):
        arr = np.asarray(pred)
        if arr.shape != y.shape:
            raise ValueError(f"{name} must have the labels' shape {y.shape}; got {arr.shape}")
        if arr.dtype.kind not in "biuf" or np.any((arr != 0) & (arr != 1)):
            raise ValueError(f"{name} must hold 0/1 predictions; got {np.unique(arr)[:5].tolist()}")
        preds.append(arr.astype(np.int8))
    return y, preds[0], preds[1]


def overlap_verdict(
    printed: float | None,
    ours: Interval,
    printed_interval: tuple[float, float] | None = None,
) -> Verdict:
    """The superseded rule (OVERLAP_VERDICT_RULE), kept so the simulations can show how it fails:
    it ignores training variance (tests/tools/coverage.py). The report uses prediction_verdict.

    reproduced: printed in [ours.low, ours.high]. consistent: not, but our interval overlaps the
    paper's own (Wilson) interval. not reproduced (higher|lower): no overlap; ours lies above or
    below. no printed value: printed is None. Without a printed interval the printed value stands
    for it, so only "reproduced" or "not reproduced" can result.
    """
    if printed is None:
        return Verdict("no printed value", "the paper prints no value for this metric")
    ci = f"our {ours.confidence:.0%} {ours.method} interval [{ours.low:.4f}, {ours.high:.4f}]"
    if not (math.isfinite(ours.low) and math.isfinite(ours.high)):
        return Verdict("not computable", f"printed {printed:.4f}; our interval is undefined")
    if ours.contains(printed):
        return Verdict("reproduced", f"printed {printed:.4f} lies inside {ci}")
    lo, hi = printed_interval if printed_interval is not None else (printed, printed)
    theirs = f"the paper's interval [{lo:.4f}, {hi:.4f}]"
    if ours.low <= hi and lo <= ours.high:
        return Verdict(
            "consistent", f"printed {printed:.4f} lies outside {ci}, which overlaps {theirs}"
        )
    side = "higher" if ours.low > hi else "lower"
    return Verdict(
        f"not reproduced ({side})",
        f"{ci} lies {'above' if side == 'higher' else 'below'} {theirs} (printed {printed:.4f})",
    )


def bootstrap_seed_mean(
    labels: np.ndarray,
    probs_by_seed: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: Method = "percentile",
    clusters: np.ndarray | None = None,
    unit: Unit | None = None,
    rng: np.random.Generator | int,
) -> dict[str, Interval]:
    """Interval of the mean over seeds of each metric, on aligned resamples.

    `probs_by_seed` has shape (S, n): S trainings scored on the same n test items. Every resample
    draws the test units once and scores all S seeds on it, so the interval reflects the test
    set's sampling error of the seed mean (the seeds' own spread is `summarize_seeds`). Units are
    numbered along seed 0's sort order, so with S = 1 this equals `bootstrap_metrics` (percentile)
    given the same rng and method. A resample where any seed's metric is undefined is dropped.
    `Interval.se` is the bootstrap standard error of the seed mean, the test-set term of
    `prediction_interval`.
    """
    names = check_metric_names(metrics)
    _check_options(n_resamples, confidence, method)
    unit_name = _resolve_unit(clusters, unit)
    per_seed, n_units = _per_seed_stat(labels, probs_by_seed, threshold, names, clusters)

    def stat(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        values = per_seed(unit_counts)
        return {name: np.mean(values[name], axis=0) for name in names}

    return _intervals(stat, n_units, names, n_resamples=n_resamples, confidence=confidence,
                      method=method, unit_name=unit_name, gen=_generator(rng))


def _per_seed_stat(
    labels: np.ndarray,
    probs_by_seed: np.ndarray,
    threshold: float,
    names: tuple[str, ...],
    clusters: np.ndarray | None,
) -> tuple[Callable[[np.ndarray], dict[str, np.ndarray]], int]:
    """(unit counts (B, U) -> metric -> (S, B) values of every seed, number of units U)."""
    probs = np.asarray(probs_by_seed, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs_by_seed must have shape (S, n) with S >= 1; got {probs.shape}")
    samples = [RankedSample(labels, row, threshold) for row in probs]
    n = samples[0].n
    # Units numbered along seed 0's order: the same draws as bootstrap_metrics for one seed.
    n_units, unit_of_item = _unit_of_items(clusters, n, samples[0].order)
    columns = [unit_of_item[s.order] for s in samples]

    def per_seed(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        values = [s.evaluate(unit_counts[:, c], names) for s, c in zip(samples, columns,
                                                                        strict=True)]
        return {name: np.stack([v[name] for v in values]) for name in names}

    return per_seed, n_units


def bootstrap_seed_noise(
    labels: np.ndarray,
    probs_by_seed: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
    *,
    n_resamples: int = 2000,
    clusters: np.ndarray | None = None,
    rng: np.random.Generator | int,
) -> dict[str, float]:
    """w per metric: the variance across seeds that our test set's sampling alone produces.

    S trainings scored on the same test items differ partly because they get different items
    wrong, and a finite test set makes that visible as spread even with no training variance.
    Over bootstrap resamples of the test units, each seed's deviation from the seed mean varies;
    w = S/(S-1) x the mean over seeds of that variance is what this adds, in expectation, to the
    sample variance s^2 across seeds, so s^2 - w estimates the training variance alone
    (`prediction_interval`'s `seed_noise`). NaN for one seed or when fewer than 2 resamples are
    defined.
    """
    names = check_metric_names(metrics)
    _check_options(n_resamples, 0.95, "percentile")
    per_seed, n_units = _per_seed_stat(labels, probs_by_seed, threshold, names, clusters)
    n_seeds = int(np.asarray(probs_by_seed).shape[0])

    def stat(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        values = per_seed(unit_counts)
        out = {}
        for name in names:
            dev = values[name] - values[name].mean(axis=0)
            for i in range(n_seeds):
                out[f"{name}\0{i}"] = dev[i]
        return out

    if n_seeds < 2:
        return {name: float("nan") for name in names}
    dist = _bootstrap_distribution(stat, n_units, int(n_resamples), _generator(rng))
    out = {}
    for name in names:
        dev = np.stack([dist[f"{name}\0{i}"] for i in range(n_seeds)])
        dev = dev[:, np.all(np.isfinite(dev), axis=0)]
        out[name] = (float(np.mean(np.var(dev, axis=1, ddof=1)) * n_seeds / (n_seeds - 1))
                     if dev.shape[1] >= 2 else float("nan"))
    return out


# ---------------------------------------------------------------------------------------------
# Against the paper: what one run of our recipe would score on a test set of the paper's size

# Below this many seeds the sd across training runs is too poorly estimated (1 degree of freedom
# gives a t quantile of 12.7) to say anything; the verdict says so instead.
MIN_SEEDS = 3


def verdict_rule_text(confidence: float = 0.95, min_seeds: int = MIN_SEEDS) -> str:
    """The verdict rule in one paragraph, with the numbers a reviewer needs to check it by hand."""
    q = f"{1 - (1 - confidence) / 2:.1%}".replace(".0%", "%")
    return (
        "The paper printed ONE training run scored on ITS test set, so we ask whether the printed "
        "value is a plausible score of one run of our recipe on a test set of the paper's size. "
        "From our S training seeds: m, their mean; s, their sd (ddof 1); e, the bootstrap "
        "standard error of m on our test set (resampling the report's unit); w, the part of s^2 "
        "that our test set alone produces (seeds get different images wrong; from the same "
        "bootstrap), so t^2 = max(s^2 - w, 0) is the training variance. The paper's own test-set "
        "sampling is p = sqrt(m(1-m)/n), n the denominator of its counts k/n (without counts, "
        "or for AUROC and kappa, our single-run image-level bootstrap standard error stands in "
        "for it). Printed minus m then has variance V = e^2 + (1 + 1/S) t^2 + p^2: our test "
        "set, the paper's run being one draw of training (t^2), the uncertainty of our mean over "
        "S seeds (t^2/S), and the paper's test set. Our prediction interval is m +/- q sqrt(V), "
        f"q the {q} Student-t quantile with df = (S-1) max(1, V / ((1 + 1/S) s^2)) (the "
        "normal quantile when s = 0). "
        "**reproduced**: the printed value lies inside the interval; "
        "**not reproduced (higher|lower)**: it lies outside, our interval lying above|below it; "
        f"**too few seeds**: S < {min_seeds}, the training variance cannot be estimated and no "
        "verdict is given (the interval of the test sets alone is shown for context); "
        "**no printed value**: the paper prints none; **not computable**: our value or its "
        "standard error is undefined. There is no \"consistent\" tier any more: it meant "
        "overlap with the paper's own interval, and the paper's sampling is now inside V."
    )


VERDICT_RULE_PREDICTION = verdict_rule_text()


@dataclass(frozen=True)
class PredictionInterval:
    """Where one run of our recipe would score on the paper's test-set size, and its parts.

    `low`/`high` include the training terms only when `with_training` (n_seeds >= MIN_SEEDS);
    otherwise they are the interval of the test sets alone (context, not a verdict).
    """

    mean: float  # m: seed mean on our test set
    n_seeds: int  # S
    sd_seeds: float  # s (ddof 1); NaN with one seed
    se_test: float  # e: bootstrap standard error of m
    sd_paper: float  # p: the paper's test-set sampling sd
    n_paper: int | None  # the paper's denominator, when its counts are known
    sd_total: float  # sqrt(V)
    df: float  # Welch-Satterthwaite degrees of freedom (inf when s = 0 or without training)
    quantile: float  # q
    low: float
    high: float
    confidence: float
    with_training: bool
    seed_noise: float = 0.0  # w: the seeds' variance that our test set alone produces

    @property
    def sd_training(self) -> float:
        """t = sqrt(max(s^2 - w, 0)): the sd across training runs, our test set's share removed."""
        return math.sqrt(max(self.sd_seeds**2 - self.seed_noise, 0.0))

    def contains(self, value: float) -> bool:
        """Whether `value` lies in [low, high]."""
        return bool(self.low <= value <= self.high)

    def describe(self) -> str:
        """The interval's arithmetic, for a reader who checks it by hand."""
        n = f" at n = {self.n_paper:,}" if self.n_paper is not None else ""
        parts = f"test {self.se_test:.4f}"
        if self.with_training:
            parts += (f", training {self.sd_training:.4f} x sqrt(1 + 1/{self.n_seeds}) "
                      f"(s {self.sd_seeds:.4f}, w {self.seed_noise:.2e})")
        parts += f", paper {self.sd_paper:.4f}{n}"
        df = "inf" if math.isinf(self.df) else f"{self.df:.1f}"
        half = self.quantile * self.sd_total
        clipped = (" clipped to the metric's range"
                   if self.low > self.mean - half or self.high < self.mean + half else "")
        return (f"[{self.low:.4f}, {self.high:.4f}] = {self.mean:.4f} +/- {self.quantile:.2f} x "
                f"{self.sd_total:.4f}{clipped} ({parts}; {self.n_seeds} seeds, df {df})")


def binomial_sd(p: float, n: int) -> float:
    """Sampling sd of a proportion p estimated from n items, sqrt(p(1-p)/n)."""
    if n <= 0:
        raise ValueError(f"n must be positive; got {n}")
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def prediction_interval(
    seed_values: Sequence[float],
    se_test: float,
    sd_paper: float,
    *,
    seed_noise: float = 0.0,
    confidence: float = 0.95,
    n_paper: int | None = None,
    min_seeds: int = MIN_SEEDS,
    limits: tuple[float, float] = (-math.inf, math.inf),
) -> PredictionInterval:
    """Interval for one run of our recipe on a test set of the paper's size (verdict_rule_text).

    `seed_values`: the metric of each training seed on our test set; `se_test`: the bootstrap
    standard error of their mean (`bootstrap_seed_mean(...)[metric].se`); `sd_paper`: the paper's
    test-set sampling sd (`binomial_sd(mean, n)` from its counts); `seed_noise`: the part of the
    seeds' variance our test set alone produces (`bootstrap_seed_noise`), taken off s^2 so the
    test set is not counted twice. `limits`: the metric's range ((0, 1) for a rate or AUROC,
    (-1, 1) for kappa); the bounds are clipped to it, which changes no verdict (a printed value
    lies in the range). Undefined inputs give NaN bounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    v = np.asarray(seed_values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"seed_values must be a non-empty 1-D sequence; got shape {v.shape}")
    n_seeds = int(v.shape[0])
    mean = float(v.mean())
    sd = float(np.std(v, ddof=1)) if n_seeds > 1 else float("nan")
    if n_seeds > 1 and np.ptp(v) == 0:
        sd = 0.0  # equal seeds: exactly no spread, not a rounding residue of the mean
    with_training = n_seeds >= min_seeds
    nan = float("nan")
    alpha = (1 - confidence) / 2
    if not all(math.isfinite(x) for x in (mean, se_test, sd_paper)) or (
        with_training and not (math.isfinite(sd) and math.isfinite(seed_noise))
    ):
        return PredictionInterval(mean, n_seeds, sd, se_test, sd_paper, n_paper, nan, nan, nan,
                                  nan, nan, confidence, with_training, seed_noise)
    inflate = 1 + 1 / n_seeds
    training = inflate * max(sd**2 - seed_noise, 0.0) if with_training else 0.0
    var = se_test**2 + training + sd_paper**2
    if with_training and sd > 0:
        # s^2 has S - 1 degrees of freedom, the bootstrap and binomial terms many more: the df
        # grow from S - 1 (training alone) with the share of V that is known well. Linear in
        # that share, not squared as in Welch-Satterthwaite: with plug-in s^2 and S = 3 the
        # squared form covered only 92% when training is most of V, the linear one 94-96% at
        # every share (tests/tools/coverage.py).
        # Never below S - 1: with s^2 - w clipped at 0, V can be smaller than (1 + 1/S) s^2.
        df = (n_seeds - 1) * max(1.0, var / (inflate * sd**2))
        q = float(student_t.ppf(1 - alpha, df))
    else:
        df = math.inf
        q = float(ndtri(1 - alpha))
    half = q * math.sqrt(var)
    low, high = max(mean - half, limits[0]), min(mean + half, limits[1])
    return PredictionInterval(mean, n_seeds, sd, float(se_test), float(sd_paper), n_paper,
                              math.sqrt(var), df, q, low, high, confidence,
                              with_training, float(seed_noise))


def prediction_verdict(printed: float | None, pi: PredictionInterval | None) -> Verdict:
    """The verdict of one claim by verdict_rule_text: is `printed` inside `pi`?"""
    if printed is None:
        return Verdict("no printed value", "the paper prints no value for this metric")
    if pi is None or not (math.isfinite(pi.low) and math.isfinite(pi.high)):
        return Verdict("not computable",
                       f"printed {printed:.4f}; our value or its standard error is undefined")
    inside = pi.contains(printed)
    if not pi.with_training:
        where = "inside" if inside else "outside"
        return Verdict(
            "too few seeds",
            f"{_plural_seeds(pi.n_seeds)}: the spread across training runs cannot be estimated "
            f"(needs {MIN_SEEDS}); on test-set sampling alone, printed {printed:.4f} lies {where} "
            f"{pi.describe()}",
        )
    if inside:
        return Verdict("reproduced", f"printed {printed:.4f} lies inside {pi.describe()}")
    side = "higher" if pi.low > printed else "lower"
    return Verdict(
        f"not reproduced ({side})",
        f"printed {printed:.4f} lies {'below' if side == 'higher' else 'above'} {pi.describe()}",
    )


def _plural_seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------------------------
# Paired test of two models on the same items, clusters allowed


def clustered_mcnemar(
    labels: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    clusters: np.ndarray,
    *,
    weighting: Literal["image", "cluster"] = "image",
) -> McNemarResult:
    """McNemar's test adjusted for clustered items (images nested in patients or studies).

    Per cluster k: b_k items A gets right and B wrong, c_k the reverse, n_k items; K clusters.
    weighting "image" (Obuchowski 1998, "On the comparison of correlated proportions for
    clustered data", Stat Med 17:1495-1507, in the form used by Durkalski et al. 2003 and Yang et
    al. 2010): X^2 = (K-1)/K (sum b_k - sum c_k)^2 / sum (b_k - c_k)^2; every image counts once,
    so it tests the image-level accuracies the report compares. weighting "cluster" (Durkalski,
    Palesch, Lipsitz and Rust 2003, "Analysis of clustered matched-pair data", Stat Med
    22:2417-2428): X^2 = (sum d_k)^2 / sum d_k^2 with d_k = (b_k - c_k)/n_k; every cluster
    counts once. Both are chi-square with 1 degree of freedom under the null, asymptotically in
    K. The variance comes from the clusters' own discordance, so a patient whose images all go
    the same way counts as one piece of evidence, not n_k. With one item per cluster "image" is
    (K-1)/K times McNemar's statistic without continuity correction.
    """
    y, a, b_pred = _check_predictions(labels, pred_a, pred_b)
    cl = np.asarray(clusters)
    if cl.ndim != 1 or cl.shape[0] != y.shape[0]:
        raise ValueError(
            f"clusters must be 1-D with one id per item ({y.shape[0]}); got shape {cl.shape}"
        )
    if weighting not in ("image", "cluster"):
        raise ValueError(f"weighting must be one of image, cluster; got {weighting!r}")
    _, inverse = np.unique(cl, return_inverse=True)
    inverse = inverse.ravel()
    right_a = a == y
    right_b = b_pred == y
    bk = np.bincount(inverse, weights=right_a & ~right_b).astype(np.float64)
    ck = np.bincount(inverse, weights=~right_a & right_b).astype(np.float64)
    return clustered_mcnemar_from_counts(bk, ck, np.bincount(inverse).astype(np.float64),
                                         weighting=weighting)


def clustered_mcnemar_from_counts(
    bk: np.ndarray,
    ck: np.ndarray,
    nk: np.ndarray,
    *,
    weighting: Literal["image", "cluster"] = "image",
) -> McNemarResult:
    """`clustered_mcnemar` from per-cluster discordance counts b_k, c_k and sizes n_k."""
    bk, ck, nk = (np.asarray(x, dtype=np.float64) for x in (bk, ck, nk))
    if not (bk.shape == ck.shape == nk.shape) or bk.ndim != 1 or bk.shape[0] == 0:
        raise ValueError(
            f"bk, ck and nk must be 1-D of one length; got {bk.shape}, {ck.shape}, {nk.shape}"
        )
    n_clusters = int(bk.shape[0])
    d = bk - ck if weighting == "image" else (bk - ck) / nk
    den = float(np.sum(d**2))
    if den == 0:  # every cluster's discordances cancel: no evidence either way
        statistic = 0.0
    else:
        statistic = float(np.sum(d) ** 2 / den)
        if weighting == "image":
            statistic *= (n_clusters - 1) / n_clusters
    name = "Obuchowski" if weighting == "image" else "Durkalski"
    return McNemarResult(int(bk.sum()), int(ck.sum()), statistic, float(chi2.sf(statistic, 1)),
                         False, f"clustered ({name}), {n_clusters:,} clusters", n_clusters)


def paired_test(
    labels: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    clusters: np.ndarray | None,
) -> McNemarResult:
    """McNemar's test for the bootstrap unit: plain on images, clustered on patients or studies."""
    if clusters is None:
        return mcnemar(labels, pred_a, pred_b)
    return clustered_mcnemar(labels, pred_a, pred_b, clusters)


# ---------------------------------------------------------------------------------------------
# Two results side by side (`harness compare`): the difference of two recipes' seed means


def bootstrap_seed_mean_difference(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: Method = "percentile",
    clusters: np.ndarray | None = None,
    unit: Unit | None = None,
    rng: np.random.Generator | int,
) -> dict[str, Interval]:
    """Interval of mean_A - mean_B, the seed means of two groups scored on the SAME test items.

    `probs_a` (S_A, n) and `probs_b` (S_B, n); every resample scores all seeds of both groups on
    the same drawn units (paired), so the interval and its `se` hold the test set's sampling of
    the difference only (the seeds' own spread is added by `difference_interval`).
    """
    names = check_metric_names(metrics)
    _check_options(n_resamples, confidence, method)
    unit_name = _resolve_unit(clusters, unit)
    a = np.atleast_2d(np.asarray(probs_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(probs_b, dtype=np.float64))
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"probs_a and probs_b must score the same items; got shapes {a.shape} and {b.shape}"
        )
    per_seed, n_units = _per_seed_stat(labels, np.vstack([a, b]), threshold, names, clusters)
    n_a = a.shape[0]

    def stat(unit_counts: np.ndarray) -> dict[str, np.ndarray]:
        values = per_seed(unit_counts)
        return {name: values[name][:n_a].mean(axis=0) - values[name][n_a:].mean(axis=0)
                for name in names}

    return _intervals(stat, n_units, names, n_resamples=n_resamples, confidence=confidence,
                      method=method, unit_name=unit_name, gen=_generator(rng))


@dataclass(frozen=True)
class DifferenceInterval:
    """mean_A - mean_B of two recipes, with the test-set and training parts of its uncertainty."""

    difference: float
    se_test: float  # of the difference: paired bootstrap, or sqrt(e_A^2 + e_B^2) unpaired
    sd_training_a: float  # t_A = sqrt(max(s_A^2 - w_A, 0)); NaN below 2 seeds
    sd_training_b: float
    n_a: int
    n_b: int
    paired: bool
    sd_total: float
    df: float
    quantile: float
    low: float
    high: float
    confidence: float
    with_training: bool  # False when either side has fewer than 2 seeds

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0."""
        return bool(self.low > 0 or self.high < 0)


def difference_interval(
    values_a: Sequence[float],
    values_b: Sequence[float],
    se_test: float,
    *,
    paired: bool,
    seed_noise_a: float = 0.0,
    seed_noise_b: float = 0.0,
    confidence: float = 0.95,
    limits: tuple[float, float] = (-math.inf, math.inf),
) -> DifferenceInterval:
    """Interval of the difference of two recipes' expected scores (their seed means).

    V = se_test^2 + t_A^2 / S_A + t_B^2 / S_B, with t^2 = max(s^2 - w, 0) as in
    `prediction_interval`; q is the Student-t quantile with df = (S_min - 1) max(1, V / (s_A^2/S_A
    + s_B^2/S_B)), the normal one when both spreads are 0. With fewer than 2 seeds on a side the
    training terms cannot be estimated: `with_training` is False and the interval holds the
    test sets alone. `limits`: the range a difference can take ((-1, 1) for rates), to clip to.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    va = np.asarray(values_a, dtype=np.float64)
    vb = np.asarray(values_b, dtype=np.float64)
    if va.ndim != 1 or vb.ndim != 1 or va.size == 0 or vb.size == 0:
        raise ValueError("values_a and values_b must be non-empty 1-D sequences")
    n_a, n_b = int(va.size), int(vb.size)
    diff = float(va.mean() - vb.mean())

    def spread(v: np.ndarray) -> float:
        if v.size < 2:
            return float("nan")
        return 0.0 if np.ptp(v) == 0 else float(np.std(v, ddof=1))

    s_a, s_b = spread(va), spread(vb)
    with_training = n_a >= 2 and n_b >= 2
    t_a = math.sqrt(max(s_a**2 - seed_noise_a, 0.0)) if with_training else float("nan")
    t_b = math.sqrt(max(s_b**2 - seed_noise_b, 0.0)) if with_training else float("nan")
    nan = float("nan")
    if not (math.isfinite(diff) and math.isfinite(se_test)):
        return DifferenceInterval(diff, se_test, t_a, t_b, n_a, n_b, paired, nan, nan, nan, nan,
                                  nan, confidence, with_training)
    training = t_a**2 / n_a + t_b**2 / n_b if with_training else 0.0
    var = se_test**2 + training
    raw = s_a**2 / n_a + s_b**2 / n_b if with_training else 0.0
    alpha = (1 - confidence) / 2
    if raw > 0:
        df = (min(n_a, n_b) - 1) * max(1.0, var / raw)
        q = float(student_t.ppf(1 - alpha, df))
    else:
        df, q = math.inf, float(ndtri(1 - alpha))
    half = q * math.sqrt(var)
    low, high = max(diff - half, limits[0]), min(diff + half, limits[1])
    return DifferenceInterval(diff, float(se_test), t_a, t_b, n_a, n_b, paired, math.sqrt(var),
                              df, q, low, high, confidence, with_training)
