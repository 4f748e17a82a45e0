"""Binary classification metrics on (labels, probabilities, threshold), scalar and vectorized.

    from harness.metrics import compute_metrics
    compute_metrics(labels, probs)            # {"accuracy": 0.75, ..., "kappa": 0.49}

The prediction rule is the paper's: label 1 when p >= threshold (0.5 by default). Values are
fractions in [0, 1]. An undefined value (precision with no predicted positive, AUROC with one
class, ...) is NaN, never 0: scikit-learn's `zero_division` default (a warning and 0.0) differs,
its `zero_division=np.nan` agrees.

`compute_metrics_weighted` evaluates every metric for many weightings of the same items at once
(one row of a (B, n) count matrix per bootstrap resample); `RankedSample` is its engine, reused
by `harness.stats`. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from harness.vocab import METRICS


def check_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    """Return `metrics` as a tuple; raise ValueError naming any unknown metric."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; allowed: {', '.join(METRICS)}")
    if not names:
        raise ValueError(f"metrics: empty; allowed: {', '.join(METRICS)}")
    return names


def check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (labels as int8 0/1, probs as float64); raise ValueError otherwise."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels and probs must be 1-D; got shapes {y.shape} and {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(
            f"labels and probs must have the same length; got {y.shape[0]} and {p.shape[0]}"
        )
    if y.shape[0] == 0:
        raise ValueError("labels and probs are empty; need at least one item")
    bad_p = ~np.isfinite(p)
    if bad_p.any():
        first = int(np.flatnonzero(bad_p)[0])
        raise ValueError(
            f"probs must be finite; got {int(bad_p.sum())} non-finite value(s), "
            f"first at index {first}: {p[first]}"
        )
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be 0 or 1; got dtype {y.dtype}")
    bad_y = (y != 0) & (y != 1)
    if bad_y.any():
        values = np.unique(y[bad_y])[:5].tolist()
        raise ValueError(f"labels must be 0 or 1; got {values}")
    return y.astype(np.int8), p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined metric)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def metrics_from_counts(
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    tn: np.ndarray,
    metrics: Sequence[str] = METRICS,
) -> dict[str, np.ndarray]:
    """Confusion-count metrics (all but AUROC), elementwise over arrays of (weighted) counts."""
    out: dict[str, np.ndarray] = {}
    for name in metrics:
        if name == "accuracy":
            out[name] = _ratio(tp + tn, tp + fp + fn + tn)
        elif name == "recall":
            out[name] = _ratio(tp, tp + fn)
        elif name == "precision":
            out[name] = _ratio(tp, tp + fp)
        elif name == "specificity":
            out[name] = _ratio(tn, tn + fp)
        elif name == "f1":
            out[name] = _ratio(2 * tp, 2 * tp + fp + fn)
        elif name == "kappa":
            # Binary closed form of (po - pe) / (1 - pe); the denominator is 0 exactly when pe == 1.
            num = 2 * (tp * tn - fn * fp)
            den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
            out[name] = _ratio(num, den)
    return out


def _auroc_scalar(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUROC with midranks for ties; NaN with one class."""
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
) -> dict[str, float]:
    """Metrics of one test set; prediction = probs >= threshold; undefined values are NaN."""
    names = check_metric_names(metrics)
    y, p = check_inputs(labels, probs)
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    tp_, fp_, fn_, tn_ = (np.array(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    counts = metrics_from_counts(tp_, fp_, fn_, tn_, names)
    out = {name: float(value) for name, value in counts.items()}
    if "auroc" in names:
        out["auroc"] = _auroc_scalar(y, p)
    return {name: out[name] for name in names}


def roc_curve_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to
    (1, 1), as scikit-learn's roc_curve(drop_intermediate=False); ties move diagonally.
    ValueError without both classes."""
    y, p = check_inputs(labels, probs)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both classes in the labels")
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], pos[order]
    last = np.r_[np.flatnonzero(ps[1:] != ps[:-1]), ps.shape[0] - 1]
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(~ys)[last]
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


class RankedSample:
    """Items sorted once by (prob, label), for evaluating many weightings of them quickly.

    Column j of a weight matrix given to `evaluate` is item `order[j]`. Sorting ascending by
    probability, negatives first within a tie, makes predicted positives a suffix of the columns
    and AUROC a row-wise dot product of the positive weights with the cumulative negative weights
    (weighted Mann-Whitney), plus a half-weight correction for tied groups that hold both classes.
    No BLAS calls: thin matrix products were slower than plain reductions, and erratic when the
    machine is busy.
    """

    def __init__(self, labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> None:
        y, p = check_inputs(labels, probs)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number; got {threshold}")
        self.n = y.shape[0]
        self.order = np.lexsort((y, p))
        ys = y[self.order]
        ps = p[self.order]
        self._split = int(np.searchsorted(ps, threshold, side="left"))
        self._neg = {"i": (ys == 0).astype(np.int64), "f": (ys == 0).astype(np.float64)}
        self._pos = {"i": (ys == 1).astype(np.int64), "f": (ys == 1).astype(np.float64)}
        # Tied groups that hold both classes: only they need the half-weight correction.
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        ends = np.r_[starts[1:], self.n]
        n_pos_in_group = np.add.reduceat(self._pos["i"], starts)
        mixed = (n_pos_in_group > 0) & (n_pos_in_group < ends - starts)
        cols = [np.arange(s, e) for s, e in zip(starts[mixed], ends[mixed], strict=True)]
        self._tie_cols = np.concatenate(cols).astype(np.intp) if cols else np.empty(0, np.intp)
        self._tie_starts = np.searchsorted(self._tie_cols, starts[mixed])

    def evaluate(
        self, weights_sorted: np.ndarray, metrics: Sequence[str] = METRICS
    ) -> dict[str, np.ndarray]:
        """Each metric, shape (B,), for weights (B, n) whose columns follow `order`."""
        w = np.asarray(weights_sorted)
        if w.ndim != 2 or w.shape[1] != self.n:
            raise ValueError(f"weights must have shape (B, {self.n}); got {w.shape}")
        # Integer counts stay integer: exact, and the cumulative sum runs faster.
        kind = "i" if w.dtype.kind in "biu" else "f"
        w = w.astype(np.int64 if kind == "i" else np.float64, copy=False)
        k = self._split
        below = w[:, :k].sum(axis=1)
        above = w[:, k:].sum(axis=1)
        cum_neg = w * self._neg[kind]
        np.cumsum(cum_neg, axis=1, out=cum_neg)
        neg_total = cum_neg[:, -1].copy()
        tn = cum_neg[:, k - 1].copy() if k > 0 else np.zeros_like(neg_total)
        fp = neg_total - tn
        fn = below - tn
        tp = above - fp
        f = np.float64
        out = metrics_from_counts(tp.astype(f), fp.astype(f), fn.astype(f), tn.astype(f), metrics)
        if "auroc" in metrics:
            # Tied negatives sort first, so cum_neg at a positive counts them all; halve below.
            cum_neg *= w
            num = np.einsum("bi,i->b", cum_neg, self._pos[kind]).astype(f)
            if self._tie_cols.size:
                sub = w[:, self._tie_cols]
                pos_g = np.add.reduceat(sub * self._pos[kind][self._tie_cols], self._tie_starts, 1)
                neg_g = np.add.reduceat(sub * self._neg[kind][self._tie_cols], self._tie_starts, 1)
                num -= 0.5 * np.einsum("bg,bg->b", pos_g, neg_g).astype(f)
            out["auroc"] = _ratio(num, (tp + fn).astype(f) * neg_total.astype(f))
        return {name: out[name] for name in metrics}


def compute_metrics_weighted(
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
) -> dict[str, np.ndarray]:
    """Every metric for each row of `weights` (B, n): item i counted weights[b, i] times.

    Integer weights give what `compute_metrics` gives on the items repeated that many times.
    """
    names = check_metric_names(metrics)
    sample = RankedSample(labels, probs, threshold)
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != sample.n:
        raise ValueError(f"weights must have shape (B, {sample.n}); got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    return sample.evaluate(w[:, sample.order], names)
