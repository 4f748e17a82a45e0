"""The report's figures from an Analysis: results/<spec>/figures/*.png.

    python -m harness report results/demo        # write_report -> write_figures

`figure_specs(analysis)` is pure: it turns the analysis into the plain inputs of
harness.figures (which figure, its file name, its data). `write_figures` is the edge: it draws
them into a folder, removes figures of an earlier render that this one no longer makes, and
returns the ones written, for the report to embed with relative links.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from harness.analyze import Analysis
from harness.figures import (
    DifferenceRow,
    ResultPoint,
    ResultRow,
    RocSet,
    SeedCurves,
    plot_differences,
    plot_results,
    plot_roc,
    plot_training_curves,
)

BACKEND_TITLES = {"keras": "Keras", "torch": "PyTorch", "reference": "reference (numpy)",
                  "keras-torch": "Keras on torch", "keras-jax": "Keras on JAX"}
# What a render may remove: only names this module writes.
_OURS = ("results.png", "training-*.png", "roc-*.png", "differences-*.png")


def _title(backend: str) -> str:
    return BACKEND_TITLES.get(backend, backend)


@dataclass(frozen=True)
class FigureFile:
    """One figure of the report: its heading, file name (in figures/), what it shows."""

    title: str
    name: str
    caption: str
    model: str | None = None  # per-model figures


@dataclass(frozen=True)
class _Planned:
    figure: FigureFile
    draw: Callable[[Path], object]


def _result_rows(a: Analysis) -> list[ResultRow]:
    conf = f"{a.spec.evaluation.bootstrap.confidence:.0%}"
    rows = []
    for r in a.headline:
        if r.status != "printed" or r.printed is None:
            continue
        lo, hi = r.wilson if r.wilson is not None else (r.printed, r.printed)
        points = [ResultPoint("paper", f"paper: printed value, Wilson {conf}" if r.wilson
                              else "paper: printed value", r.printed, lo, hi)]
        for c in r.cells:
            if c.mean is None:
                continue
            pi = c.prediction
            low, high = (pi.low, pi.high) if pi is not None else (math.nan, math.nan)
            label = (f"{_title(c.backend)}: seed mean, {conf} prediction interval")
            points.append(ResultPoint(c.backend, label, c.mean, low, high, c.verdict.label))
        if len(points) > 1:  # a model with no finished run has nothing to set beside the paper
            rows.append(ResultRow(r.model, r.metric, tuple(points)))
    return rows


def _training_curves(a: Analysis, model: str) -> list[SeedCurves]:
    out = []
    for g in a.groups:
        if g.model != model:
            continue
        runs = [r for r in a.runs if (r.model, r.backend) == (g.model, g.backend)]
        for quantity in ("loss", "accuracy"):
            for split, key in (("train", quantity), ("validation", f"val_{quantity}")):
                series = [r.history.get(key, ()) for r in runs]
                length = max((len(s) for s in series), default=0)
                if length == 0:
                    continue
                values = np.full((len(series), length), np.nan)
                for i, s in enumerate(series):
                    values[i, :len(s)] = s
                out.append(SeedCurves(g.backend, _title(g.backend), quantity, split, values))
    return out


def _roc_sets(a: Analysis, model: str) -> list[RocSet]:
    out = []
    for g in a.groups:
        if g.model != model:
            continue
        runs = [r for r in a.runs if (r.model, r.backend) == (g.model, g.backend)
                and r.roc is not None]
        if runs:
            out.append(RocSet(g.backend, _title(g.backend),
                              tuple(r.roc for r in runs if r.roc is not None),
                              tuple(r.points["image"].get("auroc", math.nan) for r in runs)))
    return out


def _difference_rows(a: Analysis, backend_a: str, backend_b: str) -> list[DifferenceRow]:
    rows = []
    for c in a.comparisons:
        if (c.backend_a, c.backend_b) != (backend_a, backend_b):
            continue
        for s in c.summaries:
            for p in c.pairs:
                iv = p.differences[s.metric]
                rows.append(DifferenceRow(c.model, s.metric, p.seed, iv.point, iv.low, iv.high))
    return rows


def _draw_results(rows: list[ResultRow], path: Path) -> object:
    return plot_results(rows, path, "Results against the paper (verdict intervals)")


def _draw_training(model: str, curves: list[SeedCurves], path: Path) -> object:
    return plot_training_curves(model, curves, path)


def _draw_roc(model: str, sets: list[RocSet], path: Path) -> object:
    return plot_roc(model, sets, path)


def _draw_differences(rows: list[DifferenceRow], a: str, b: str, path: Path) -> object:
    return plot_differences(rows, path, f"{a} - {b}, paired on the same test images", a, b)


def figure_specs(a: Analysis) -> list[_Planned]:
    """Which figures this analysis makes, each with its drawing function; pure."""
    plans: list[_Planned] = []
    results = _result_rows(a)
    if results:
        plans.append(_Planned(
            FigureFile("Results against the paper", "results.png",
                       "Each printed value (black, with the Wilson interval of its own counts) "
                       "beside our seed mean per framework with its prediction interval, the "
                       "interval the verdict uses; a hollow marker is a verdict other than "
                       "reproduced. The counterpart of the paper's Fig. 6."),
            partial(_draw_results, results)))
    for m in a.spec.models:
        curves = _training_curves(a, m.name)
        if curves and any(np.isfinite(c.values).any() for c in curves):
            plans.append(_Planned(
                FigureFile(f"{m.name}: training curves", f"training-{m.name}.png",
                           "Loss and accuracy per epoch, train (solid) and validation (dashed); "
                           "line: seed mean, band: min to max over seeds. The counterpart of the "
                           "paper's Fig. 2 and 5.", m.name),
                partial(_draw_training, m.name, curves)))
        sets = _roc_sets(a, m.name)
        if sets:
            plans.append(_Planned(
                FigureFile(f"{m.name}: ROC curves", f"roc-{m.name}.png",
                           "ROC curves on the test set per framework (mean over seeds, band: "
                           "min to max), AUROC in the legend.", m.name),
                partial(_draw_roc, m.name, sets)))
    pairs = list(dict.fromkeys((c.backend_a, c.backend_b) for c in a.comparisons if c.pairs))
    for ba, bb in pairs:
        rows = _difference_rows(a, ba, bb)
        if rows:
            ta, tb = _title(ba), _title(bb)
            plans.append(_Planned(
                FigureFile(f"{ta} vs {tb}", f"differences-{ba}-{bb}.png",
                           f"{ta} minus {tb} per metric and seed pair on the same test images, "
                           "with the paired bootstrap interval; a filled marker is an interval "
                           "that excludes 0."),
                partial(_draw_differences, rows, ta, tb)))
    return plans


def write_figures(a: Analysis, folder: Path | str) -> tuple[FigureFile, ...]:
    """Draw every figure of `a` into `folder`; remove our figures this render did not make."""
    target = Path(folder)
    written: list[FigureFile] = []
    for plan in figure_specs(a):
        if plan.draw(target / plan.figure.name) is not None:
            written.append(plan.figure)
    keep = {f.name for f in written}
    if target.is_dir():
        for pattern in _OURS:
            for old in target.glob(pattern):
                if old.name not in keep:
                    old.unlink()
    return tuple(written)


__all__ = ["FigureFile", "figure_specs", "write_figures"]
