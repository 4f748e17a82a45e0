"""Two or more results folders side by side: `python -m harness compare A B [...] [--out FILE]`.

    python -m harness compare results/demo results/demo-patient-split --out compare.md

Per model, backend and metric: each folder's seed mean, and its difference from the first
folder with a 95% interval of the difference of the two recipes' expected scores (test sets and
training seeds, `harness.stats.difference_interval`). The difference is PAIRED when both folders
scored the same test images (same cache rows, patients, studies and labels: a paired bootstrap
of the difference on the same resampled units) and UNPAIRED otherwise (the two test-set standard
errors add). The folders' trainings count as independent draws of their recipes, so each side's
spread across seeds enters even when the runs are the same. `compare_results` is pure given the
analyses; `write_comparison` is the edge: it
reads the folders, writes the markdown file and its figures beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.analysis.prose import unit_plural
from harness.analyze import Analysis, GroupAnalysis, analyze, load_bundle
from harness.errors import UserError
from harness.figures import DifferenceRow, plot_differences
from harness.results import write_text_atomic
from harness.stats import (
    DifferenceInterval,
    bootstrap_seed_mean_difference,
    difference_interval,
)


@dataclass(frozen=True)
class CompareCell:
    """One metric of one (model, backend) in one folder, and its difference from the first."""

    folder: int  # index into Comparison.folders
    mean: float
    n_seeds: int
    difference: DifferenceInterval | None  # None for the first folder


@dataclass(frozen=True)
class CompareRow:
    model: str
    backend: str
    metric: str
    cells: tuple[CompareCell, ...]


@dataclass(frozen=True)
class Comparison:
    folders: tuple[str, ...]
    specs: tuple[str, ...]
    splits: tuple[str, ...]  # split strategy of each folder
    leakage: tuple[float | None, ...]  # share of test images sharing a patient with train
    paired: tuple[tuple[str, str, int, bool], ...]  # (model, backend, folder, paired?)
    rows: tuple[CompareRow, ...]
    confidence: float
    notes: tuple[str, ...]


def _same_images(a: GroupAnalysis, b: GroupAnalysis) -> bool:
    ta, tb = a.test, b.test
    return (ta is not None and tb is not None and ta.rows == tb.rows
            and np.array_equal(ta.labels, tb.labels) and np.array_equal(ta.patient, tb.patient)
            and np.array_equal(ta.study, tb.study))


def _difference(
    ref: GroupAnalysis, other: GroupAnalysis, metric: str, paired: bool, analysis: Analysis
) -> DifferenceInterval | None:
    sa, sb = other.seed_summary.get("image", {}), ref.seed_summary.get("image", {})
    if metric not in sa or metric not in sb:
        return None
    values_a = other.seed_values["image"][metric]
    values_b = ref.seed_values["image"][metric]
    if paired and other.test is not None and ref.test is not None:
        b = analysis.spec.evaluation.bootstrap
        iv = bootstrap_seed_mean_difference(
            other.test.labels, other.test.probs, ref.test.probs,
            analysis.spec.evaluation.threshold, (metric,), n_resamples=b.resamples,
            confidence=b.confidence, method=b.method, clusters=other.test.clusters,
            unit=other.test.unit,  # type: ignore[arg-type]
            rng=b.seed,
        )[metric]
        se = iv.se
    else:
        ea = other.seed_mean.get("image", {}).get(metric)
        eb = ref.seed_mean.get("image", {}).get(metric)
        se = math.sqrt(ea.se**2 + eb.se**2) if ea is not None and eb is not None else math.nan
    return difference_interval(
        values_a, values_b, se, paired=paired,
        seed_noise_a=other.seed_noise.get("image", {}).get(metric, 0.0),
        seed_noise_b=ref.seed_noise.get("image", {}).get(metric, 0.0),
        confidence=analysis.spec.evaluation.bootstrap.confidence,
        limits=(-2.0, 2.0) if metric == "kappa" else (-1.0, 1.0),
    )


def compare_results(analyses: Sequence[Analysis]) -> Comparison:
    """Every (model, backend, metric) that the first folder and another share; pure."""
    if len(analyses) < 2:
        raise UserError("compare: needs two or more results folders; got "
                        f"{len(analyses)}")
    first = analyses[0]
    notes: list[str] = []
    titles = {a.spec.paper.title for a in analyses}
    if len(titles) > 1:
        notes.append("the folders reproduce different papers: " + "; ".join(sorted(titles)))
    rows: list[CompareRow] = []
    paired_info: list[tuple[str, str, int, bool]] = []
    metrics = [m for m in first.spec.evaluation.metrics]
    for g in first.groups:
        others = [(i, a.group(g.model, g.backend)) for i, a in enumerate(analyses) if i > 0]
        present = [(i, o) for i, o in others if o is not None]
        if not present:
            continue
        pairing = {i: _same_images(g, o) for i, o in present}
        paired_info += [(g.model, g.backend, i, p) for i, p in pairing.items()]
        for metric in metrics:
            if metric not in g.seed_summary.get("image", {}):
                continue
            cells = [CompareCell(0, g.seed_summary["image"][metric].mean, len(g.seeds), None)]
            for i, o in present:
                s = o.seed_summary.get("image", {}).get(metric)
                if s is None:
                    continue
                cells.append(CompareCell(
                    i, s.mean, len(o.seeds),
                    _difference(g, o, metric, pairing[i], analyses[i]),
                ))
            rows.append(CompareRow(g.model, g.backend, metric, tuple(cells)))
    for a in analyses[1:]:
        missing = [f"{g.model}/{g.backend}" for g in first.groups if a.group(g.model, g.backend)
                   is None]
        if missing:
            notes.append(f"{a.results_dir} has no finished run of {', '.join(missing)}")
    splits = tuple(str((a.data.split.get("strategy") if a.data else None)
                       or a.spec.data.split.strategy) for a in analyses)
    leakage = tuple(
        (a.data.leakage.get("test", {}).get("patient") if a.data else None) for a in analyses
    )
    return Comparison(
        folders=tuple(a.results_dir for a in analyses),
        specs=tuple(a.spec.name for a in analyses),
        splits=splits,
        leakage=leakage,
        paired=tuple(paired_info),
        rows=tuple(rows),
        confidence=first.spec.evaluation.bootstrap.confidence,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


PERCENT = frozenset({"accuracy", "recall", "precision", "specificity", "f1"})


def _value(metric: str, v: float) -> str:
    if not math.isfinite(v):
        return "undefined"
    return f"{100 * v:.2f}%" if metric in PERCENT else f"{v:.3f}"


def _diff(metric: str, d: DifferenceInterval | None) -> str:
    if d is None or not math.isfinite(d.low):
        return "—"
    scale, unit = (100, " pp") if metric in PERCENT else (1, "")
    fmt = ".2f" if metric in PERCENT else ".3f"
    text = (f"{scale * d.difference:+{fmt}}{unit} [{scale * d.low:+{fmt}}, "
            f"{scale * d.high:+{fmt}}]")
    if not d.with_training:
        text += " (test sets only: fewer than 2 seeds)"
    return text + (" *" if d.excludes_zero() else "")


def render_comparison(c: Comparison, figures: Sequence[tuple[str, str]] = ()) -> str:
    """The comparison as markdown (pure); `figures` are (title, relative path) to embed."""
    names = [f"`{f}` (spec `{s}`, split by {sp})" for f, s, sp in
             zip(c.folders, c.specs, c.splits, strict=True)]
    conf = f"{c.confidence:.0%}"
    out = ["# Results side by side", ""]
    out += [f"- **{chr(65 + i)}**: {n}" for i, n in enumerate(names)]
    leak = [f"{chr(65 + i)} {100 * x:.1f}%" for i, x in enumerate(c.leakage) if x is not None]
    if leak:
        out += ["", "Test images that share a patient with the training images: "
                + ", ".join(leak) + ". A leaked split scores the model partly on patients it "
                "has seen."]
    out += ["", f"Each cell is a folder's seed mean at image level; the differences are "
            f"against A, with the {conf} interval of the difference of the two recipes' "
            "expected scores: the test sets' sampling (a paired bootstrap of the difference when "
            "both folders scored the same test images, the two standard errors combined "
            "otherwise) plus each side's spread across training seeds over its number of seeds. "
            "`*`: the interval excludes 0."]
    for (model, backend, i, paired) in c.paired:
        out.append(f"- {model} / {backend}, {chr(65 + i)} vs A: "
                   + ("paired (same test images)" if paired else "unpaired (different test "
                                                                 "images)"))
    for title, path in figures:
        out += ["", f"![{title}]({path})"]
    groups = list(dict.fromkeys((r.model, r.backend) for r in c.rows))
    for model, backend in groups:
        rows = [r for r in c.rows if (r.model, r.backend) == (model, backend)]
        idx = sorted({cell.folder for r in rows for cell in r.cells})
        headers = ["metric"] + [f"{chr(65 + i)}" for i in idx] + [
            f"{chr(65 + i)} - A [{conf}]" for i in idx if i > 0]
        body = []
        for r in rows:
            by = {cell.folder: cell for cell in r.cells}
            line = [r.metric] + [_value(r.metric, by[i].mean) if i in by else "—" for i in idx]
            line += [_diff(r.metric, by[i].difference) if i in by else "—" for i in idx if i > 0]
            body.append(line)
        out += ["", f"## {model} / {backend}", "",
                "| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        out += ["| " + " | ".join(body_row) + " |" for body_row in body]
    if c.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in c.notes]
    return "\n".join(out) + "\n"


def difference_rows(c: Comparison) -> list[DifferenceRow]:
    """The differences as rows of `harness.figures.plot_differences` (series = folder)."""
    out = []
    for r in c.rows:
        for cell in r.cells:
            d = cell.difference
            if d is not None and math.isfinite(d.difference):
                out.append(DifferenceRow(f"{r.model} / {r.backend}", r.metric, cell.folder,
                                         d.difference, d.low, d.high))
    return out


def write_comparison(folders: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Analyse each folder, write the comparison (default: compare.md in the first folder) and
    its figure (`<name>-figures/differences.png` beside it); returns the markdown file."""
    analyses = [analyze(load_bundle(Path(f))) for f in folders]
    c = compare_results(analyses)
    target = Path(out) if out is not None else Path(folders[0]) / "compare.md"
    fig_dir = target.parent / f"{target.stem}-figures"
    figures: list[tuple[str, str]] = []
    rows = difference_rows(c)
    labels = {i: f"{chr(65 + i)} - A ({c.specs[i]})" for i in range(1, len(c.folders))}
    path = fig_dir / "differences.png"
    if plot_differences(rows, path, "Differences from A (interval: test sets and training seeds)",
                        "other", "A", series_labels=labels) is not None:
        figures.append(("Differences from A", f"{fig_dir.name}/differences.png"))
    write_text_atomic(target, render_comparison(c, figures))
    return target


__all__ = ["CompareCell", "CompareRow", "Comparison", "compare_results", "difference_rows",
           "render_comparison", "unit_plural", "write_comparison"]
