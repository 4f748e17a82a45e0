"""The report's figures, as PNG files: training curves, results against the paper, ROC curves,
paired framework differences.

    python -m harness report results/demo        # report.py calls these for figures/*.png

Each `plot_*` function takes plain inputs (numpy arrays, the small records below), draws one
figure with matplotlib's object API on the Agg canvas (no pyplot, no global state, no display),
writes it to `path` as a PNG and returns the Figure so a caller or test can inspect it. When
there is nothing to plot (a random model has no training curves) it writes nothing and returns
None. Figures are 9 inches at 100 dpi: 900 px, the width GitHub shows a README's images at.
Colours are Okabe and Ito's colour-blind-safe palette; the paper is always black.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour vision
# deficiency. Black is kept for the paper.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
PAPER_COLOUR = "#000000"
BACKEND_COLOURS = {"keras": "#D55E00", "torch": "#0072B2", "reference": "#009E73",
                   "keras-torch": "#CC79A7", "keras-jax": "#E69F00"}
# Differences are of two backends, so neither backend's colour; seeds differ by marker.
DIFF_COLOUR = "#009E73"
SEED_MARKERS = ("o", "s", "^", "v", "D", "P", "X")
WIDTH_IN = 9.0
DPI = 100
# Rates are plotted as percentages; AUROC and kappa on their own 0-1 scale.
PERCENT_METRICS = frozenset({"accuracy", "recall", "precision", "specificity", "f1"})


def backend_colour(backend: str, index: int = 0) -> str:
    """The backend's fixed colour, or the palette's `index`-th for an unknown one."""
    return BACKEND_COLOURS.get(backend, OKABE_ITO[index % len(OKABE_ITO)])


def _figure(height_in: float) -> Figure:
    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path | str) -> Figure:
    """Write the PNG atomically (temp file + rename: a reader never sees half a figure)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a figure is for every reader
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fig


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS else 1.0


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT_METRICS else f"{metric} (0 to 1)"


# ---------------------------------------------------------------------------------------------
# Training curves (the paper's Fig. 2 and Fig. 5)


@dataclass(frozen=True)
class SeedCurves:
    """One quantity per epoch for every seed of one backend: values (seeds, epochs), NaN where
    a seed had stopped (early stopping)."""

    backend: str
    label: str  # legend text, e.g. "Keras"
    quantity: str  # "loss" | "accuracy" | any history key without its "val_" prefix
    split: str  # "train" | "validation"
    values: np.ndarray


def plot_training_curves(
    model: str, curves: Sequence[SeedCurves], path: Path | str,
    quantities: Sequence[str] = ("loss", "accuracy"),
) -> Figure | None:
    """Loss and accuracy per epoch, train (solid) and validation (dashed), one colour per
    backend: the seed mean as a line, the min-max over seeds as a band. None without curves."""
    have = [c for c in curves if c.quantity in quantities and c.values.size
            and np.isfinite(c.values).any()]
    if not have:
        return None
    shown = [q for q in quantities if any(c.quantity == q for c in have)]
    fig = _figure(3.6)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    backends = list(dict.fromkeys(c.backend for c in have))
    for ax, quantity in zip(axes, shown, strict=True):
        for c in (c for c in have if c.quantity == quantity):
            values = np.asarray(c.values, dtype=np.float64)
            if values.ndim == 1:
                values = values[None, :]
            scale = 100.0 if quantity in PERCENT_METRICS else 1.0
            values = values * scale
            epochs = np.arange(1, values.shape[1] + 1)
            defined = np.isfinite(values).any(axis=0)
            # Columns where no seed is defined are left out, so no all-NaN reduction happens.
            sub = values[:, defined]
            mean, low, high = np.nanmean(sub, 0), np.nanmin(sub, 0), np.nanmax(sub, 0)
            colour = backend_colour(c.backend, backends.index(c.backend))
            style = "-" if c.split == "train" else "--"
            n_seeds = values.shape[0]
            ax.plot(epochs[defined], mean, style, color=colour, lw=1.8,
                    marker="o" if c.split == "train" else "s", ms=3,
                    label=f"{c.label}, {c.split}" + (f" (mean of {n_seeds} seeds)"
                                                     if n_seeds > 1 else ""))
            if n_seeds > 1:
                ax.fill_between(epochs[defined], low, high, color=colour,
                                alpha=0.15 if c.split == "train" else 0.08, lw=0)
        unit = " (%)" if quantity in PERCENT_METRICS else ""
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{quantity}{unit}")
        ax.set_title(quantity)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{model}: training curves (lines: seed mean; bands: min to max over seeds)",
                 fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Results against the paper (the paper's Fig. 6, as a forest plot of the verdicts)


@dataclass(frozen=True)
class ResultPoint:
    """One value with its interval on a row of the results figure."""

    source: str  # "paper" or a backend name
    label: str  # legend text
    value: float
    low: float
    high: float
    verdict: str | None = None  # ours: the verdict label


@dataclass(frozen=True)
class ResultRow:
    model: str
    metric: str
    points: tuple[ResultPoint, ...]


def plot_results(rows: Sequence[ResultRow], path: Path | str, title: str) -> Figure | None:
    """A forest plot: one panel per model, one row per metric, the paper's value with its Wilson
    interval (black) beside each backend's seed mean with its verdict interval. A hollow marker
    is a verdict other than "reproduced". None without rows."""
    rows = [r for r in rows if any(math.isfinite(p.value) for p in r.points)]
    if not rows:
        return None
    models = list(dict.fromkeys(r.model for r in rows))
    per_model = {m: [r for r in rows if r.model == m] for m in models}
    n_points = max(len(r.points) for r in rows)
    heights = [max(1, len(v)) * (0.32 * n_points + 0.3) + 0.6 for v in per_model.values()]
    fig = _figure(sum(heights) + 0.9)
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=heights)[:, 0]
    sources = list(dict.fromkeys(p.source for r in rows for p in r.points))
    backends = [s for s in sources if s != "paper"]
    for ax, model in zip(axes, models, strict=True):
        mrows = per_model[model]
        ticks, ticklabels = [], []
        for i, row in enumerate(mrows):
            base = -i * (n_points + 1)
            ticks.append(base - (len(row.points) - 1) / 2)
            ticklabels.append(row.metric)
            scale = _scale(row.metric)
            for j, p in enumerate(row.points):
                y = base - j
                colour = (PAPER_COLOUR if p.source == "paper"
                          else backend_colour(p.source, backends.index(p.source)))
                if math.isfinite(p.low) and math.isfinite(p.high):
                    ax.plot([scale * p.low, scale * p.high], [y, y], color=colour, lw=2.2,
                            solid_capstyle="butt")
                if not math.isfinite(p.value):
                    continue
                hollow = p.verdict is not None and p.verdict != "reproduced"
                marker = "D" if p.source == "paper" else "o"
                ax.plot([scale * p.value], [y], marker, ms=7, color=colour,
                        mfc="white" if hollow else colour, mew=1.6)
                if p.verdict is not None:
                    ax.annotate(p.verdict, (scale * p.value, y), xytext=(8, 4),
                                textcoords="offset points", fontsize=7.5, color="#333333")
        ax.set_yticks(ticks, ticklabels)
        ax.set_title(model, loc="left", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        units = {("%" if r.metric in PERCENT_METRICS else "0 to 1") for r in mrows}
        ax.set_xlabel("value (%)" if units == {"%"} else "value (rates in %, AUROC and kappa "
                      "0 to 1)")
        ax.set_ylim(min(ticks) - n_points / 2 - 0.3, max(ticks) + n_points / 2 + 0.3)
    handles, labels = [], []
    for source in sources:
        label = next(p.label for r in rows for p in r.points if p.source == source)
        colour = (PAPER_COLOUR if source == "paper"
                  else backend_colour(source, backends.index(source)))
        handles.append(Line2D([], [], color=colour, lw=2.2,
                              marker="D" if source == "paper" else "o", ms=7))
        labels.append(label)
    if any(p.verdict not in (None, "reproduced") for r in rows for p in r.points):
        handles.append(Line2D([], [], ls="", marker="o", ms=7, color="#555555", mfc="white",
                              mew=1.6))
        labels.append("hollow: not reproduced, or no verdict")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# ROC curves


@dataclass(frozen=True)
class RocSet:
    """One backend's ROC curves, one (false positive rates, true positive rates) per seed, from
    `harness.metrics.roc_curve_points`, and each seed's AUROC."""

    backend: str
    label: str
    curves: tuple[tuple[np.ndarray, np.ndarray], ...]
    aurocs: tuple[float, ...]


FPR_GRID = np.linspace(0.0, 1.0, 201)


def plot_roc(model: str, sets: Sequence[RocSet], path: Path | str) -> Figure | None:
    """ROC curves, one colour per backend: the mean over seeds of the true positive rate at each
    false positive rate, with the min-max band; AUROC (mean over seeds, and range) in the
    legend. None without a curve."""
    usable = [s for s in sets if s.curves]
    if not usable:
        return None
    fig = _figure(5.6)
    ax = fig.subplots()
    for i, s in enumerate(usable):
        # Each curve read at the grid's false positive rates (linear between its corners).
        t = np.array([np.interp(FPR_GRID, fpr, tpr) for fpr, tpr in s.curves])
        aucs = [a for a in s.aurocs if math.isfinite(a)]
        colour = backend_colour(s.backend, i)
        auc = ""
        if aucs:
            auc = f": AUROC {np.mean(aucs):.3f}" + (
                f" ({min(aucs):.3f} to {max(aucs):.3f}, {len(aucs)} seeds)" if len(aucs) > 1
                else "")
        ax.plot(100 * FPR_GRID, 100 * t.mean(axis=0), color=colour, lw=1.8,
                label=f"{s.label}{auc}")
        if len(s.curves) > 1:
            ax.fill_between(100 * FPR_GRID, 100 * t.min(axis=0), 100 * t.max(axis=0),
                            color=colour, alpha=0.15, lw=0)
    ax.plot([0, 100], [0, 100], ":", color="#777777", lw=1, label="chance (AUROC 0.5)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity, %)")
    ax.set_ylabel("true positive rate (recall, %)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{model}: ROC curves on the test set (mean over seeds, band: min to max)",
                 fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Paired differences between two backends


@dataclass(frozen=True)
class DifferenceRow:
    """metric(A) - metric(B) of one seed pair on the same test images, with its interval."""

    model: str
    metric: str
    seed: int
    value: float
    low: float
    high: float


def plot_differences(
    rows: Sequence[DifferenceRow], path: Path | str, title: str, label_a: str, label_b: str,
    series_labels: Mapping[int, str] | None = None,
) -> Figure | None:
    """One panel per model: each metric's difference per seed pair (or per `series_labels`
    entry, e.g. the results folders of `harness compare`) with its interval, on one scale
    (percentage points; AUROC and kappa x 100), and the zero line. None without rows."""
    rows = [r for r in rows if math.isfinite(r.value)]
    if not rows:
        return None
    models = list(dict.fromkeys(r.model for r in rows))
    per_model = {m: [r for r in rows if r.model == m] for m in models}
    heights = [0.17 * len(v) + 0.15 * len({r.metric for r in v}) + 0.7
               for v in per_model.values()]
    fig = _figure(sum(heights) + 0.8)
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=heights)[:, 0]
    seeds = sorted({r.seed for r in rows})
    for ax, model in zip(axes, models, strict=True):
        mrows = per_model[model]
        metrics = list(dict.fromkeys(r.metric for r in mrows))
        ticks, labels = [], []
        y = 0.0
        for metric in metrics:
            mine = [r for r in mrows if r.metric == metric]
            ys = []
            for r in mine:
                marker = SEED_MARKERS[seeds.index(r.seed) % len(SEED_MARKERS)]
                excludes = (r.low > 0 or r.high < 0) and math.isfinite(r.low)
                if math.isfinite(r.low) and math.isfinite(r.high):
                    ax.plot([100 * r.low, 100 * r.high], [y, y], color=DIFF_COLOUR, lw=2)
                ax.plot([100 * r.value], [y], marker, color=DIFF_COLOUR, ms=6,
                        mfc=DIFF_COLOUR if excludes else "white", mew=1.5)
                ys.append(y)
                y -= 1
            ticks.append(float(np.mean(ys)))
            labels.append(metric)
            y -= 0.8
        ax.axvline(0, color="#444444", lw=1)
        ax.set_yticks(ticks, labels)
        ax.set_title(model, loc="left", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel(f"{label_a} - {label_b} (percentage points; AUROC and kappa x 100)")
    handles = [Line2D([], [], ls="", marker=SEED_MARKERS[i % len(SEED_MARKERS)], ms=6.5,
                      color=DIFF_COLOUR) for i in range(len(seeds))]
    labels = [(series_labels or {}).get(s, f"seed pair {s}") for s in seeds]
    handles.append(Line2D([], [], ls="", marker="o", ms=6.5, color=DIFF_COLOUR, mfc="white",
                          mew=1.5))
    labels.append("hollow: the interval contains 0")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)),
               fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def figure_size_px(fig: Figure) -> tuple[int, int]:
    """(width, height) of the saved PNG in pixels."""
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


__all__ = [
    "BACKEND_COLOURS",
    "DifferenceRow",
    "OKABE_ITO",
    "ResultPoint",
    "ResultRow",
    "RocSet",
    "SeedCurves",
    "figure_size_px",
    "plot_differences",
    "plot_results",
    "plot_roc",
    "plot_training_curves",
]
