"""Across runs: a (model, backend) over its seeds, each claim of the paper against our recipe
(prediction interval and verdict), and two backends on the same test images.

    group = analyze_group(model, backend, members, opt, notes, paper_above_chance=True)
    rows = headline(spec, groups, opt, notes)
    comparison = compare_backends(model, "keras", "torch", by_seed_a, by_seed_b, opt)

Pure functions of the per-run analyses (harness.analysis.runs) and the spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from harness.analysis.load import ScoredTestSet
from harness.analysis.runs import Level, Options, RunAnalysis
from harness.spec import Claim, Spec
from harness.stats import (
    Interval,
    McNemarResult,
    PredictionInterval,
    SeedSummary,
    Verdict,
    binomial_sd,
    bootstrap_seed_mean,
    bootstrap_seed_noise,
    paired_bootstrap_difference,
    paired_test,
    prediction_interval,
    prediction_verdict,
    summarize_seeds,
    wilson_interval,
)

Member = tuple[RunAnalysis, ScoredTestSet, dict[str, Level]]
# Proportions: the paper's sampling of them is binomial at the denominator of its counts.
PROPORTIONS = frozenset({"accuracy", "recall", "precision", "specificity"})


# ---------------------------------------------------------------------------------------------
# Across seeds


@dataclass(frozen=True)
class GroupTest:
    """The test set a group's seeds were all scored on (image level), for paired comparisons."""

    rows: tuple[int, ...]
    labels: np.ndarray
    probs: np.ndarray  # (seeds, images)
    patient: np.ndarray
    study: np.ndarray
    clusters: np.ndarray | None
    unit: str


@dataclass(frozen=True)
class GroupAnalysis:
    """One (model, backend) over its seeds."""

    model: str
    backend: str
    seeds: tuple[int, ...]
    run_ids: tuple[str, ...]
    seed_summary: Mapping[str, Mapping[str, SeedSummary]]  # level -> metric
    seed_mean: Mapping[str, Mapping[str, Interval]]  # level -> metric: test-set CI of the mean
    n_test: int
    n_studies: int | None
    seed_values: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    seed_noise: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # w per metric
    image_se: Mapping[str, float] = field(default_factory=dict)  # mean single-run image-unit SE
    study_se: Mapping[str, float] = field(default_factory=dict)  # the same at study level
    chance_auroc: Interval | None = None  # seed-mean AUROC interval (for the degenerate flag)
    degenerate: str | None = None  # why the model is flagged, or None
    degenerate_runs: tuple[str, ...] = ()  # "seed 0: predicts negative for all 222 images"
    test: GroupTest | None = field(default=None, compare=False)


def _degenerate(
    runs: Sequence[RunAnalysis], auroc: Interval | None, paper_above_chance: bool
) -> str | None:
    if runs and all(r.degenerate for r in runs):
        kinds = sorted({"negative" if r.predicted_positive == 0 else "positive" for r in runs})
        what = " or ".join(kinds)
        return (f"degenerate: every run predicts one class ({what}) for all "
                f"{runs[0].n_test:,} test images")
    if (paper_above_chance and auroc is not None and math.isfinite(auroc.low)
            and auroc.contains(0.5)):
        return (f"degenerate: no better than chance, AUROC {auroc.point:.3f} [{auroc.low:.3f}, "
                f"{auroc.high:.3f}] contains 0.5 while the paper's accuracy lies above 50%")
    return None


def analyze_group(
    model: str,
    backend: str,
    members: list[Member],
    opt: Options,
    notes: list[str],
    *,
    paper_above_chance: bool = False,
) -> GroupAnalysis:
    """Seed summary, seed-mean intervals (with SE and seed noise), degenerate flag."""
    members = sorted(members, key=lambda m: m[0].seed)
    runs = [m[0] for m in members]
    summary: dict[str, dict[str, SeedSummary]] = {}
    values: dict[str, dict[str, tuple[float, ...]]] = {}
    seed_mean: dict[str, dict[str, Interval]] = {}
    noise: dict[str, dict[str, float]] = {}
    same_test = all(m[1].rows == members[0][1].rows for m in members)
    if not same_test:
        notes.append(
            f"{model} on {backend}: the seeds were scored on different test images; no interval "
            "of the seed mean"
        )
    chance = None
    for level in ("image", "study"):
        have = [m for m in members if level in m[0].points]
        if len(have) != len(members):
            continue
        values[level] = {metric: tuple(m[0].points[level][metric] for m in members)
                         for metric in opt.metrics}
        summary[level] = {metric: summarize_seeds(v) for metric, v in values[level].items()}
        if same_test:
            lv = members[0][2][level]
            probs = np.stack([m[2][level].probs for m in members])
            seed_mean[level] = bootstrap_seed_mean(
                lv.labels, probs, opt.threshold, opt.metrics,
                n_resamples=opt.resamples, confidence=opt.confidence,
                method=opt.method,  # type: ignore[arg-type]
                clusters=lv.clusters, unit=lv.unit, rng=opt.seed,  # type: ignore[arg-type]
            )
            noise[level] = bootstrap_seed_noise(
                lv.labels, probs, opt.threshold, opt.metrics, n_resamples=opt.resamples,
                clusters=lv.clusters, rng=opt.seed,
            ) if len(members) > 1 else {metric: 0.0 for metric in opt.metrics}
            if level == "image" and paper_above_chance:
                chance = seed_mean[level]["auroc"] if "auroc" in opt.metrics else (
                    bootstrap_seed_mean(
                        lv.labels, probs, opt.threshold, ("auroc",), n_resamples=opt.resamples,
                        confidence=opt.confidence, clusters=lv.clusters,
                        unit=lv.unit, rng=opt.seed,  # type: ignore[arg-type]
                    )["auroc"])
    image_se = {metric: float(np.mean([r.image_unit[metric].se for r in runs]))
                for metric in opt.metrics}
    study_se = {metric: float(np.mean([r.intervals["study"][metric].se for r in runs]))
                for metric in opt.metrics} if "study" in summary else {}
    test = None
    if same_test:
        first = members[0][1]
        lv = members[0][2]["image"]
        test = GroupTest(first.rows, first.labels, np.stack([m[1].probs for m in members]),
                         first.patient, first.study, lv.clusters, lv.unit)
    return GroupAnalysis(
        model=model,
        backend=backend,
        seeds=tuple(r.seed for r in runs),
        run_ids=tuple(r.run_id for r in runs),
        seed_summary=summary,
        seed_mean=seed_mean,
        n_test=runs[0].n_test,
        n_studies=runs[0].n_studies,
        seed_values=values,
        seed_noise=noise,
        image_se=image_se,
        study_se=study_se,
        chance_auroc=chance,
        degenerate=_degenerate(runs, chance, paper_above_chance),
        degenerate_runs=tuple(f"seed {r.seed}: {r.degenerate}" for r in runs if r.degenerate),
        test=test,
    )


# ---------------------------------------------------------------------------------------------
# Against the paper


@dataclass(frozen=True)
class ClaimCell:
    """Our seed mean for one backend beside the printed value, and the verdict on it."""

    backend: str
    mean: float | None  # None: no finished run
    interval: Interval | None  # the seed mean's test-set interval
    diff_pp: float | None  # (ours - printed) in percentage points
    verdict: Verdict
    prediction: PredictionInterval | None = None  # what one run would score at the paper's n


@dataclass(frozen=True)
class ClaimRow:
    """One headline row: a model's metric, the paper's value, ours per backend."""

    model: str
    metric: str
    status: str  # printed | not printed | not reported
    printed: float | None
    printed_text: str | None
    counts: tuple[int, int] | None
    wilson: tuple[float, float] | None
    where: str | None
    cells: tuple[ClaimCell, ...]
    level: str = "image"  # the claim's level: ours is taken at the same level


def primary_claim(spec: Spec, model: str, metric: str) -> Claim | None:
    for claim in spec.paper.claims:
        if claim.primary and claim.model == model and claim.metric == metric:
            return claim
    return None


def _not_printed(spec: Spec, model: str, metric: str) -> bool:
    return any(
        np_.metric == metric and (not np_.models or model in np_.models)
        for np_ in spec.paper.not_printed
    )


def paper_above_chance(spec: Spec, model: str, confidence: float) -> bool:
    """Whether the paper's own (Wilson) interval of this model's accuracy lies above 50%."""
    claim = primary_claim(spec, model, "accuracy")
    if claim is None:
        return False
    if claim.counts is None:
        return claim.value > 0.5
    return wilson_interval(claim.counts.k, claim.counts.n, confidence)[0] > 0.5


def _prediction(
    g: GroupAnalysis, metric: str, claim: Claim | None, opt: Options, level: str = "image"
) -> PredictionInterval | None:
    iv = g.seed_mean.get(level, {}).get(metric)
    values = g.seed_values.get(level, {}).get(metric)
    if iv is None or values is None:
        return None
    mean = float(np.mean(values))
    n_paper = None
    if claim is not None and claim.counts is not None and metric in PROPORTIONS:
        n_paper = claim.counts.n
        sd_paper = binomial_sd(mean, n_paper) if math.isfinite(mean) else math.nan
    else:
        sd_paper = (g.study_se if level == "study" else g.image_se).get(metric, math.nan)
    return prediction_interval(values, iv.se, sd_paper,
                               seed_noise=g.seed_noise.get(level, {}).get(metric, 0.0),
                               confidence=opt.confidence, n_paper=n_paper,
                               limits=(-1.0, 1.0) if metric == "kappa" else (0.0, 1.0))


def headline(
    spec: Spec, groups: Sequence[GroupAnalysis], opt: Options, notes: list[str]
) -> tuple[ClaimRow, ...]:
    """One row per model and metric: the printed value, our seed means, the verdicts."""
    by_key = {(g.model, g.backend): g for g in groups}
    rows: list[ClaimRow] = []
    for m in spec.models:
        for metric in opt.metrics:
            claim = primary_claim(spec, m.name, metric)
            wilson = None
            counts = None
            if claim is not None and claim.counts is not None:
                counts = (claim.counts.k, claim.counts.n)
                wilson = wilson_interval(claim.counts.k, claim.counts.n, opt.confidence)
            printed = claim.value if claim is not None else None
            level = claim.level if claim is not None else "image"
            status = (
                "printed" if claim is not None
                else "not printed" if _not_printed(spec, m.name, metric)
                else "not reported"
            )
            cells = []
            for backend in m.backends:
                g = by_key.get((m.name, backend))
                if g is None or level not in g.seed_summary:
                    cells.append(ClaimCell(backend, None, None, None,
                                           Verdict("no runs", "no finished run of this backend")))
                    continue
                iv = g.seed_mean.get(level, {}).get(metric)
                mean = g.seed_summary[level][metric].mean
                pi = _prediction(g, metric, claim, opt, level)
                if iv is None and printed is not None:
                    v = Verdict("not computable", "no interval of the seed mean")
                else:
                    v = prediction_verdict(printed, pi)
                diff = None if printed is None else (mean - printed) * 100
                cells.append(ClaimCell(backend, mean, iv, diff, v, pi))
            rows.append(ClaimRow(
                model=m.name, metric=metric, status=status, printed=printed,
                printed_text=claim.printed if claim is not None else None,
                counts=counts, wilson=wilson,
                where=claim.where if claim is not None else None, cells=tuple(cells),
                level=level,
            ))
    for claim in spec.paper.claims:
        if claim.primary and claim.metric not in opt.metrics:
            notes.append(
                f"the paper's {claim.model} {claim.metric} ({claim.printed or claim.value}) is not "
                "compared: the metric is not in evaluation.metrics"
            )
    return tuple(rows)


# ---------------------------------------------------------------------------------------------
# Across backends


@dataclass(frozen=True)
class SeedPair:
    """Backend A vs B, matched by seed index, on the same test images."""

    seed: int
    run_a: str
    run_b: str
    differences: Mapping[str, Interval]  # metric(A) - metric(B)
    mcnemar: McNemarResult  # plain on images, clustered (Obuchowski) on patients or studies


@dataclass(frozen=True)
class DifferenceSummary:
    metric: str
    mean_difference: float
    n_pairs: int
    n_excluding_zero: int
    distinguishable: bool


@dataclass(frozen=True)
class BackendComparison:
    """Two backends that ran the same model."""

    model: str
    backend_a: str
    backend_b: str
    pairs: tuple[SeedPair, ...]
    summaries: tuple[DifferenceSummary, ...]
    distinguishable_on: tuple[str, ...]
    sentence: str
    note: str | None = None


def compare_backends(
    model: str,
    a: str,
    b: str,
    members_a: Mapping[int, Member],
    members_b: Mapping[int, Member],
    opt: Options,
) -> BackendComparison:
    """Paired bootstrap of each metric's difference and McNemar's test, per seed pair."""
    pairs: list[SeedPair] = []
    skipped: list[int] = []
    for seed in sorted(set(members_a) & set(members_b)):
        ra, ta, la = members_a[seed]
        rb, tb, _ = members_b[seed]
        if ta.rows != tb.rows or not np.array_equal(ta.labels, tb.labels):
            skipped.append(seed)
            continue
        lv = la["image"]
        diffs = paired_bootstrap_difference(
            lv.labels, ta.probs, tb.probs, opt.threshold, opt.metrics,
            n_resamples=opt.resamples, confidence=opt.confidence,
            method=opt.method, clusters=lv.clusters, unit=lv.unit,  # type: ignore[arg-type]
            rng=opt.seed,
        )
        mc = paired_test(lv.labels, (ta.probs >= opt.threshold).astype(np.int8),
                         (tb.probs >= opt.threshold).astype(np.int8), lv.clusters)
        pairs.append(SeedPair(seed, ra.run_id, rb.run_id, diffs, mc))
    summaries = []
    for metric in opt.metrics:
        ivs = [p.differences[metric] for p in pairs]
        above = sum(1 for iv in ivs if iv.low > 0)
        below = sum(1 for iv in ivs if iv.high < 0)
        points = [iv.point for iv in ivs if math.isfinite(iv.point)]
        summaries.append(DifferenceSummary(
            metric=metric,
            mean_difference=float(np.mean(points)) if points else float("nan"),
            n_pairs=len(ivs),
            n_excluding_zero=above + below,
            distinguishable=bool(ivs) and (above == len(ivs) or below == len(ivs)),
        ))
    on = tuple(s.metric for s in summaries if s.distinguishable)
    level = f"{opt.confidence:.0%}"
    if not pairs:
        sentence = f"{a} and {b}: no seed finished in both, nothing to compare."
    elif on:
        sentence = (f"{a} and {b} are distinguishable at the {level} level on "
                    f"{', '.join(on)} (every seed pair's interval excludes 0).")
    else:
        sentence = (f"{a} and {b} are not distinguishable at the {level} level on any metric "
                    f"({len(pairs)} seed pair{'s' if len(pairs) != 1 else ''}).")
    note = (f"seeds {', '.join(map(str, skipped))} were scored on different test images and are "
            "left out") if skipped else None
    return BackendComparison(model, a, b, tuple(pairs), tuple(summaries), on, sentence, note)
