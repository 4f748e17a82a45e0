"""Turn a results folder into numbers: per run, across seeds, across backends, against the paper.

    python -m harness report results/demo        # load_bundle -> analyze -> render_report

    bundle = load_bundle(Path("results/demo"))   # the only I/O here: spec, data, plan, runs
    analysis = analyze(bundle)                   # pure: frozen dataclasses, no file, no clock

A run counts only when plan.json (written by `harness run` for the current spec) names its id
AND its run_hash matches; any other run file is listed as ignored, never mixed into the numbers.
Every bootstrap draws from `evaluation.bootstrap.seed` (the same stream for every run), so the
analysis of the same files is the same, to the last digit, on every call.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from harness.errors import UserError
from harness.metrics import compute_metrics
from harness.monitor import is_measured, measured, not_measured
from harness.records import RunError, RunResult
from harness.results import read_json, read_runs
from harness.shapes import infer_model
from harness.spec import Claim, Model, ParamCounts, RandomModel, Spec
from harness.stats import (
    VERDICT_RULE,
    Interval,
    McNemarResult,
    SeedSummary,
    Verdict,
    bootstrap_metrics,
    bootstrap_seed_mean,
    mcnemar,
    paired_bootstrap_difference,
    study_level,
    summarize_seeds,
    verdict,
    wilson_interval,
)

STDERR_TAIL_LINES = 12


def distinguishable_rule(confidence: float) -> str:
    """The rule that calls two backends distinguishable, in words."""
    return (
        f"Two backends are called distinguishable on a metric when the {confidence:.0%} "
        "paired-bootstrap interval of their difference (same resampled test units for both) "
        "excludes 0, on the same side, for every seed pair; otherwise they are not "
        f"distinguishable at the {confidence:.0%} level. McNemar's test on the thresholded "
        "predictions of the same images is shown beside it as a second view. Seeds do not "
        "carry across frameworks (each draws its own initial weights), so pairs are matched "
        "by seed index only for bookkeeping."
    )


# ---------------------------------------------------------------------------------------------
# Input: what a results folder holds


@dataclass(frozen=True)
class Bundle:
    """Everything read from a results folder; `runs` are its complete RunResults, `unreadable`
    the complete run files this harness cannot read (listed as ignored, with the reason)."""

    results_dir: str
    spec: Spec
    source: str | None = None
    overrides: tuple[str, ...] = ()
    data: Mapping[str, Any] | None = None
    plan: Mapping[str, Any] | None = None
    runs: tuple[RunResult, ...] = ()
    unreadable: tuple[IgnoredRun, ...] = ()


def _read_optional(path: Path) -> Mapping[str, Any] | None:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load_bundle(results_dir: Path | str) -> Bundle:
    """Read spec.json, data.json, plan.json and runs/*.json of a results folder."""
    folder = Path(results_dir)
    spec_path = folder / "spec.json"
    if not spec_path.is_file():
        raise UserError(f"{folder}: no spec.json; run `python -m harness run SPEC` first")
    try:
        raw = read_json(spec_path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{spec_path}: not readable JSON ({e}); rerun `python -m harness run SPEC`"
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
        raise UserError(f"{spec_path}: no 'spec' mapping; rerun `python -m harness run SPEC`")
    try:
        spec = Spec.model_validate(raw["spec"])
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise UserError(
            f"{spec_path}: spec.{where}: {first['msg']}; it was written by another version of "
            "the harness, rerun `python -m harness run SPEC`"
        ) from None
    runs, problems = read_runs(folder)
    return Bundle(
        results_dir=str(folder),
        spec=spec,
        source=raw.get("source"),
        overrides=tuple(str(o) for o in raw.get("overrides") or ()),
        data=_read_optional(folder / "data.json"),
        plan=_read_optional(folder / "plan.json"),
        runs=tuple(runs),
        unreadable=tuple(IgnoredRun(p.path.stem, p.reason) for p in problems),
    )


# ---------------------------------------------------------------------------------------------
# Output: the analysis, in frozen records


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


@dataclass(frozen=True)
class ClaimCell:
    """Our seed mean for one backend beside the printed value."""

    backend: str
    mean: float | None  # None: no finished run
    interval: Interval | None
    diff_pp: float | None  # (ours - printed) in percentage points
    verdict: Verdict


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


@dataclass(frozen=True)
class SeedPair:
    """Backend A vs B, matched by seed index, on the same test images."""

    seed: int
    run_a: str
    run_b: str
    differences: Mapping[str, Interval]  # metric(A) - metric(B)
    mcnemar: McNemarResult


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


@dataclass(frozen=True)
class ResourceStat:
    """One resource of one (model, backend): median and range over seeds, or why not measured."""

    quantity: str
    n_runs: int
    n_measured: int
    unit: str | None
    median: float | None
    low: float | None
    high: float | None
    reason: str | None  # why not measured (all runs, or the ones missing)
    source: str | None = None  # which counter, where several exist


@dataclass(frozen=True)
class ResourceGroup:
    model: str
    backend: str
    stats: tuple[ResourceStat, ...]


@dataclass(frozen=True)
class ArchitectureCheck:
    """Parameter counts: printed in the paper, inferred from the spec, built by each backend."""

    model: str
    printed: ParamCounts | None
    inferred: ParamCounts | None
    inferred_error: str | None
    built: Mapping[str, tuple[ParamCounts, ...]]  # backend -> distinct counts over its runs
    mismatches: tuple[str, ...]


@dataclass(frozen=True)
class FailedRun:
    run_id: str
    model: str
    backend: str
    seed: int | None
    error_type: str
    message: str
    stderr_tail: tuple[str, ...]


@dataclass(frozen=True)
class IgnoredRun:
    run_id: str
    reason: str


@dataclass(frozen=True)
class DataPart:
    part: str
    images: int | None
    positives: int | None
    studies: int | None
    patients: int | None


@dataclass(frozen=True)
class DataInfo:
    """data.json, typed; any field may be missing."""

    dataset: str | None
    image_size: int | None
    resize: str | None
    data_hash: str | None
    split: Mapping[str, Any]
    parts: tuple[DataPart, ...]
    leakage: Mapping[str, Mapping[str, float | None]]  # part -> {study, patient}
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class EnvironmentInfo:
    """Per backend: (label, value) rows gathered from its runs."""

    backend: str
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Analysis:
    spec: Spec
    results_dir: str
    source: str | None
    overrides: tuple[str, ...]
    method_sentence: str
    runs: tuple[RunAnalysis, ...]
    groups: tuple[GroupAnalysis, ...]
    headline: tuple[ClaimRow, ...]
    comparisons: tuple[BackendComparison, ...]
    resources: tuple[ResourceGroup, ...]
    architecture: tuple[ArchitectureCheck, ...]
    failed: tuple[FailedRun, ...]
    ignored: tuple[IgnoredRun, ...]
    missing: tuple[str, ...]  # planned runs without a result yet
    data: DataInfo | None
    environment: tuple[EnvironmentInfo, ...]
    finished_span: tuple[str, str] | None  # first and last run end, UTC
    notes: tuple[str, ...] = ()
    verdict_rule: str = VERDICT_RULE
    distinguishable_rule: str = ""

    def group(self, model: str, backend: str) -> GroupAnalysis | None:
        """The (model, backend) group, if any run of it finished."""
        for g in self.groups:
            if g.model == model and g.backend == backend:
                return g
        return None


# ---------------------------------------------------------------------------------------------
# Which runs count


@dataclass(frozen=True)
class _TestSet:
    rows: tuple[int, ...]
    labels: np.ndarray
    probs: np.ndarray
    patient: np.ndarray
    study: np.ndarray


def _classify(
    bundle: Bundle,
) -> tuple[list[RunResult], list[IgnoredRun], list[str]]:
    """(current runs, ignored runs, planned ids without a result)."""
    plan_runs = (bundle.plan or {}).get("runs")
    expected: Mapping[str, Any] = plan_runs if isinstance(plan_runs, dict) else {}
    current: list[RunResult] = []
    ignored: list[IgnoredRun] = list(bundle.unreadable)
    for run in bundle.runs:
        rid = run.run_id
        if bundle.plan is None:
            ignored.append(IgnoredRun(rid, "no plan.json: cannot tell whether it is current"))
        elif rid not in expected:
            ignored.append(IgnoredRun(rid, "not in the current spec's plan (older spec)"))
        elif run.run_hash != expected[rid]:
            ignored.append(IgnoredRun(rid, "run hash differs: older spec, data or code"))
        else:
            current.append(run)
    seen = {r.run_id for r in current}
    missing = [rid for rid in expected if rid not in seen]
    return current, ignored, missing


def _key(run: RunResult) -> tuple[str, str, int]:
    return run.key.model, run.key.backend, run.key.seed


def _test_set(run: RunResult) -> _TestSet:
    """The run's test predictions as arrays; ValueError when absent or empty."""
    test = run.test
    if test is None:
        raise ValueError("the result holds no test predictions")
    if not test.rows:
        raise ValueError("the result's test set is empty")
    return _TestSet(
        test.rows,
        np.asarray(test.labels),
        np.asarray(test.probs, dtype=np.float64),
        np.asarray(test.patient),
        np.asarray(test.study),
    )


def _failed(run: RunResult, error: RunError | None = None) -> FailedRun:
    model, backend, seed = _key(run)
    err = error if error is not None else (run.error or RunError(type="unknown", reason=""))
    return FailedRun(
        run_id=run.run_id,
        model=model,
        backend=backend,
        seed=seed,
        error_type=err.type,
        message=err.reason or "no message recorded",
        stderr_tail=tuple(err.stderr_tail.splitlines()[-STDERR_TAIL_LINES:]),
    )


# ---------------------------------------------------------------------------------------------
# Per run


@dataclass(frozen=True)
class _Options:
    metrics: tuple[str, ...]
    levels: tuple[str, ...]
    threshold: float
    resamples: int
    confidence: float
    method: str
    unit: str
    seed: int


def _options(spec: Spec) -> _Options:
    ev = spec.evaluation
    b = ev.bootstrap
    return _Options(tuple(ev.metrics), tuple(ev.levels), ev.threshold, b.resamples,
                    b.confidence, b.method, b.unit, b.seed)


@dataclass(frozen=True)
class _Level:
    """One level's items: labels, per-item probabilities, resampling clusters."""

    labels: np.ndarray
    probs: np.ndarray
    clusters: np.ndarray | None
    unit: str
    ids: np.ndarray | None = None  # study ids at study level


def _image_level(test: _TestSet, unit: str) -> _Level:
    clusters = {"patient": test.patient, "study": test.study}.get(unit)
    return _Level(test.labels, test.probs, clusters, unit)


def _study_level(test: _TestSet, unit: str) -> _Level:
    labels, probs, ids = study_level(test.labels, test.probs, test.study)
    if unit == "patient":
        _, first = np.unique(test.study, return_index=True)  # same sorted order as `ids`
        return _Level(labels, probs, test.patient[first], "patient", ids)
    return _Level(labels, probs, None, "study", ids)


def _bootstrap(level: _Level, opt: _Options, *, clusters: bool = True) -> dict[str, Interval]:
    return bootstrap_metrics(
        level.labels, level.probs, opt.threshold, opt.metrics,
        n_resamples=opt.resamples, confidence=opt.confidence, method=opt.method,  # type: ignore[arg-type]
        clusters=level.clusters if clusters else None,
        unit=(level.unit if clusters else "image"),  # type: ignore[arg-type]
        rng=opt.seed,
    )


def _analyze_run(
    run: RunResult, test: _TestSet, opt: _Options, notes: list[str]
) -> tuple[RunAnalysis, dict[str, _Level]]:
    model, backend, seed = _key(run)
    rid = run.run_id
    levels: dict[str, _Level] = {"image": _image_level(test, opt.unit)}
    if "study" in opt.levels:
        try:
            levels["study"] = _study_level(test, opt.unit)
        except ValueError as e:
            notes.append(f"{rid}: no study-level numbers: {e}")
    points: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, Interval]] = {}
    for name, lv in levels.items():
        if name not in opt.levels and name != "image":
            continue
        points[name] = compute_metrics(lv.labels, lv.probs, opt.threshold, opt.metrics)
        intervals[name] = _bootstrap(lv, opt)
    image = levels["image"]
    image_unit = intervals["image"] if image.clusters is None else _bootstrap(
        image, opt, clusters=False
    )
    history = run.history
    phases = run.resources.get("phases_s") or {}
    train_s = phases.get("train")
    study = levels.get("study")
    return (
        RunAnalysis(
            run_id=rid,
            model=model,
            backend=backend,
            seed=seed,
            n_test=int(test.labels.shape[0]),
            n_studies=None if study is None else int(study.labels.shape[0]),
            epochs=len(history),
            train_s=float(train_s) if isinstance(train_s, (int, float)) else None,
            points=points,
            intervals=intervals,
            image_unit=image_unit,
        ),
        levels,
    )


# ---------------------------------------------------------------------------------------------
# Across seeds


def _analyze_group(
    model: str,
    backend: str,
    members: list[tuple[RunAnalysis, _TestSet, dict[str, _Level]]],
    opt: _Options,
    notes: list[str],
) -> GroupAnalysis:
    members = sorted(members, key=lambda m: m[0].seed)
    runs = [m[0] for m in members]
    summary: dict[str, dict[str, SeedSummary]] = {}
    seed_mean: dict[str, dict[str, Interval]] = {}
    same_test = all(m[1].rows == members[0][1].rows for m in members)
    if not same_test:
        notes.append(
            f"{model} on {backend}: the seeds were scored on different test images; no interval "
            "of the seed mean"
        )
    for level in ("image", "study"):
        have = [m for m in members if level in m[0].points]
        if len(have) != len(members):
            continue
        summary[level] = {
            metric: summarize_seeds([m[0].points[level][metric] for m in members])
            for metric in opt.metrics
        }
        if same_test:
            lv = members[0][2][level]
            probs = np.stack([m[2][level].probs for m in members])
            seed_mean[level] = bootstrap_seed_mean(
                lv.labels, probs, opt.threshold, opt.metrics,
                n_resamples=opt.resamples, confidence=opt.confidence,
                clusters=lv.clusters, unit=lv.unit, rng=opt.seed,  # type: ignore[arg-type]
            )
    return GroupAnalysis(
        model=model,
        backend=backend,
        seeds=tuple(r.seed for r in runs),
        run_ids=tuple(r.run_id for r in runs),
        seed_summary=summary,
        seed_mean=seed_mean,
        n_test=runs[0].n_test,
        n_studies=runs[0].n_studies,
    )


# ---------------------------------------------------------------------------------------------
# Against the paper


def _primary_claim(spec: Spec, model: str, metric: str) -> Claim | None:
    for claim in spec.paper.claims:
        if claim.primary and claim.model == model and claim.metric == metric:
            return claim
    return None


def _not_printed(spec: Spec, model: str, metric: str) -> bool:
    return any(
        np_.metric == metric and (not np_.models or model in np_.models)
        for np_ in spec.paper.not_printed
    )


def _headline(
    spec: Spec, groups: Sequence[GroupAnalysis], opt: _Options, notes: list[str]
) -> tuple[ClaimRow, ...]:
    by_key = {(g.model, g.backend): g for g in groups}
    rows: list[ClaimRow] = []
    for m in spec.models:
        for metric in opt.metrics:
            claim = _primary_claim(spec, m.name, metric)
            wilson = None
            counts = None
            if claim is not None and claim.counts is not None:
                counts = (claim.counts.k, claim.counts.n)
                wilson = wilson_interval(claim.counts.k, claim.counts.n, opt.confidence)
            printed = claim.value if claim is not None else None
            status = (
                "printed" if claim is not None
                else "not printed" if _not_printed(spec, m.name, metric)
                else "not reported"
            )
            cells = []
            for backend in m.backends:
                g = by_key.get((m.name, backend))
                iv = g.seed_mean.get("image", {}).get(metric) if g is not None else None
                if g is None or "image" not in g.seed_summary:
                    cells.append(ClaimCell(backend, None, None, None,
                                           Verdict("no runs", "no finished run of this backend")))
                    continue
                mean = g.seed_summary["image"][metric].mean
                if iv is None:
                    v = Verdict("not computable", "no interval of the seed mean")
                else:
                    v = verdict(printed, iv, wilson)
                diff = None if printed is None else (mean - printed) * 100
                cells.append(ClaimCell(backend, mean, iv, diff, v))
            rows.append(ClaimRow(
                model=m.name, metric=metric, status=status, printed=printed,
                printed_text=claim.printed if claim is not None else None,
                counts=counts, wilson=wilson,
                where=claim.where if claim is not None else None, cells=tuple(cells),
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


def _compare(
    model: str,
    a: str,
    b: str,
    members_a: Mapping[int, tuple[RunAnalysis, _TestSet, dict[str, _Level]]],
    members_b: Mapping[int, tuple[RunAnalysis, _TestSet, dict[str, _Level]]],
    opt: _Options,
) -> BackendComparison:
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
        mc = mcnemar(lv.labels, (ta.probs >= opt.threshold).astype(np.int8),
                     (tb.probs >= opt.threshold).astype(np.int8))
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


# ---------------------------------------------------------------------------------------------
# Resources


def _dig(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _framework_memory(res: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The backend's peak GPU memory counter: allocated, else peak, else any measured one."""
    fm = res.get("framework_memory")
    if not isinstance(fm, dict) or not fm:
        return not_measured("not reported by the backend"), None
    for want in ("allocated", "peak", ""):
        for name, m in fm.items():
            if want in name and is_measured(m):
                return m, name
    first = next(iter(fm.values()))
    return first, None


def _seconds(value: Any, reason: str) -> Any:
    return measured(float(value), "s") if isinstance(value, (int, float)) else not_measured(reason)


def _resource_measures(run: RunResult, is_random: bool) -> list[tuple[str, Any, str | None]]:
    res = run.resources
    if not res:
        nm = not_measured("no resources recorded in the result")
        return [(q, nm, None) for q in RESOURCE_QUANTITIES]
    epoch_s = [h.seconds for h in run.history]
    no_train = "no training: random model" if is_random else "not recorded"
    fm, fm_source = _framework_memory(res)
    return [
        ("training time", _seconds(_dig(res, "phases_s", "train"), no_train), None),
        ("time per epoch (mean over epochs)",
         measured(float(np.mean(epoch_s)), "s") if epoch_s else not_measured(
             "no epochs" if is_random else "no epoch times in the history"), None),
        ("train throughput",
         _dig(res, "throughput", "train") or not_measured(no_train), None),
        ("inference throughput",
         _dig(res, "throughput", "inference") or not_measured("not recorded"), None),
        ("peak host memory (RSS)",
         _dig(res, "host", "rss_peak") or not_measured("not recorded"), None),
        ("framework peak GPU memory", fm, fm_source),
        ("GPU device memory peak",
         _dig(res, "gpu", "memory_used_peak") or not_measured("not recorded"), None),
        ("GPU utilization (mean)",
         _dig(res, "gpu", "utilization_mean") or not_measured("not recorded"), None),
        ("GPU energy", _dig(res, "gpu", "energy") or not_measured("not recorded"), None),
    ]


RESOURCE_QUANTITIES = (
    "training time",
    "time per epoch (mean over epochs)",
    "train throughput",
    "inference throughput",
    "peak host memory (RSS)",
    "framework peak GPU memory",
    "GPU device memory peak",
    "GPU utilization (mean)",
    "GPU energy",
)


def _aggregate(quantity: str, measures: list[tuple[Any, str | None]]) -> ResourceStat:
    values = [m["value"] for m, _ in measures
              if isinstance(m, dict) and isinstance(m.get("value"), (int, float))]
    reasons = [m.get("reason", "no reason given") for m, _ in measures
               if isinstance(m, dict) and not is_measured(m)]
    sources = sorted({s for _, s in measures if s})
    unit = next((m.get("unit") for m, _ in measures if is_measured(m) and isinstance(m, dict)),
                None)
    reason = "; ".join(dict.fromkeys(reasons)) or None
    if not values:
        return ResourceStat(quantity, len(measures), 0, None, None, None, None,
                            reason or "no value", None)
    return ResourceStat(
        quantity, len(measures), len(values), unit, float(np.median(values)),
        float(np.min(values)), float(np.max(values)), reason, ", ".join(sources) or None,
    )


# ---------------------------------------------------------------------------------------------
# Architecture, data, environment


def _fmt_counts(c: ParamCounts) -> str:
    return f"{c.total:,} ({c.trainable:,} trainable, {c.non_trainable:,} non-trainable)"


def _architecture(spec: Spec, model: Model, runs: Sequence[RunResult]) -> ArchitectureCheck:
    printed = model.printed_params
    try:
        inferred: ParamCounts | None = infer_model(spec, model).counts
        error = None
    except UserError as e:
        inferred, error = None, e.message
    built: dict[str, tuple[ParamCounts, ...]] = {}
    for backend in model.backends:
        found = [r.params for r in runs if _key(r)[:2] == (model.name, backend)]
        built[backend] = tuple(dict.fromkeys(c for c in found if c is not None))
    problems = []
    if printed is not None and inferred is not None and printed != inferred:
        problems.append(
            f"inferred {_fmt_counts(inferred)} differs from printed {_fmt_counts(printed)}"
        )
    ref, ref_name = (inferred, "inferred") if inferred is not None else (printed, "printed")
    for name, counts in built.items():
        if len(counts) > 1:
            problems.append(f"{name} built different counts across seeds")
        for c in counts:
            if ref is not None and c != ref:
                problems.append(f"{name} built {_fmt_counts(c)}; {ref_name} {_fmt_counts(ref)}")
    return ArchitectureCheck(model.name, printed, inferred, error, built, tuple(problems))


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _frac(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _data_info(data: Mapping[str, Any] | None) -> DataInfo | None:
    if data is None:
        return None
    parts = []
    for p in data.get("parts") or []:
        if isinstance(p, dict):
            parts.append(DataPart(str(p.get("part", p.get("split", "?"))), _int(p.get("images")),
                                  _int(p.get("positives")), _int(p.get("studies")),
                                  _int(p.get("patients"))))
    leakage: dict[str, dict[str, float | None]] = {}
    for part, leak in (data.get("leakage") or {}).items():
        if isinstance(leak, dict):
            leakage[str(part)] = {"study": _frac(leak.get("study")),
                                  "patient": _frac(leak.get("patient"))}
    split = data.get("split")
    return DataInfo(
        dataset=data.get("dataset"),
        image_size=_int(data.get("image_size")),
        resize=data.get("resize"),
        data_hash=data.get("data_hash"),
        split=dict(split) if isinstance(split, dict) else {},
        parts=tuple(parts),
        leakage=leakage,
        skipped=tuple(str(s) for s in data.get("skipped") or ()),
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if "value" in value and value.get("value") is None:
            return f"not measured ({value.get('reason', 'no reason given')})"
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or None
    return str(value)


def _gpu_text(gpu: Any) -> str | None:
    if not isinstance(gpu, dict):
        return _text(gpu)
    if "devices" in gpu:
        names = ", ".join(
            f"{d.get('name')}" + (f" ({d['memory_total_mib']:.0f} MiB)"
                                  if isinstance(d.get("memory_total_mib"), (int, float)) else "")
            for d in gpu["devices"]
        )
        return f"{names}; driver {gpu.get('driver_version')}, CUDA {gpu.get('cuda_driver_version')}"
    return _text(gpu)


def _environment_rows(run: RunResult) -> list[tuple[str, str | None]]:
    env = run.environment
    prov = run.provenance
    versions = env.get("versions") or {}
    git = prov.get("git") or {}
    cpu = prov.get("cpu") or {}
    device = env.get("device")
    if env.get("device_name"):
        device = f"{device} ({env['device_name']})"
    git_text = None
    if "commit" in git:
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        git_text = f"{str(git['commit'])[:12]}{dirty}"
    elif git:
        git_text = _text(git)
    cpu_text = None
    if cpu:
        cpu_text = f"{cpu.get('model')} ({cpu.get('logical_cores')} logical cores)"
    return [
        ("framework", env.get("framework")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v) or None),
        ("device", device),
        ("determinism", _text({k: v for k, v in (env.get("determinism") or {}).items()
                               if k != "seed"} or None)),
        ("code version", run.code_version),
        ("git commit", git_text),
        ("CPU", cpu_text),
        ("GPU", _gpu_text(prov.get("gpu"))),
        ("Python", _dig(prov, "python", "version")),
        ("platform", _dig(prov, "platform", "platform")),
    ]


def _environment(
    runs: Sequence[RunResult], backends: Sequence[str]
) -> tuple[EnvironmentInfo, ...]:
    out = []
    for backend in backends:
        mine = [r for r in runs if _key(r)[1] == backend and r.environment]
        if not mine:
            continue
        values: dict[str, list[str]] = {}
        for run in mine:
            for label, value in _environment_rows(run):
                if value is not None:
                    values.setdefault(label, [])
                    if str(value) not in values[label]:
                        values[label].append(str(value))
        out.append(EnvironmentInfo(backend, tuple((k, " / ".join(v)) for k, v in values.items())))
    return tuple(out)


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def method_sentence(opt: _Options) -> str:
    """How every interval in the report was computed, in one paragraph."""
    unit = {"patient": "patients", "study": "studies", "image": "images"}[opt.unit]
    headline = "percentile" if opt.method == "bca" else opt.method
    return (
        f"Intervals are {opt.confidence:.0%} {opt.method} bootstrap intervals from "
        f"{opt.resamples:,} resamples of the test set's {unit} (whole {unit} are drawn, since "
        f"one patient's images are correlated; bootstrap seed {opt.seed}). A model's headline "
        f"value is the mean over its training seeds; its interval is the {headline} interval of "
        f"that mean over the same resamples, every seed scored on the same resampled {unit}. "
        "The spread across seeds (sd, min, max) is reported apart from it."
    )


# ---------------------------------------------------------------------------------------------


def analyze(bundle: Bundle) -> Analysis:
    """Every number of the report, from a Bundle; pure and deterministic."""
    spec = bundle.spec
    opt = _options(spec)
    notes: list[str] = []
    current, ignored, missing = _classify(bundle)
    failed: list[FailedRun] = []
    analysed: list[tuple[RunAnalysis, _TestSet, dict[str, _Level], RunResult]] = []
    known_models = {m.name for m in spec.models}
    for run in current:
        if run.status != "ok":
            failed.append(_failed(run))
            continue
        if _key(run)[0] not in known_models:
            ignored.append(IgnoredRun(run.run_id, "model not in the current spec"))
            continue
        try:
            test = _test_set(run)
            ra, levels = _analyze_run(run, test, opt, notes)
        except ValueError as e:
            failed.append(_failed(run, RunError(type="BadResult", reason=str(e))))
            continue
        analysed.append((ra, test, levels, run))

    order: dict[tuple[str, str], tuple[int, int]] = {
        (m.name, str(b)): (i, j)
        for i, m in enumerate(spec.models)
        for j, b in enumerate(m.backends)
    }
    analysed.sort(key=lambda x: (order.get((x[0].model, x[0].backend), (99, 99)), x[0].seed))
    grouped: dict[tuple[str, str], list[tuple[RunAnalysis, _TestSet, dict[str, _Level]]]] = {}
    for ra, test, levels, _ in analysed:
        grouped.setdefault((ra.model, ra.backend), []).append((ra, test, levels))
    groups = [
        _analyze_group(model, backend, members, opt, notes)
        for (model, backend), members in grouped.items()
    ]

    comparisons = []
    for m in spec.models:
        for a, b in itertools.combinations(m.backends, 2):
            if (m.name, a) in grouped and (m.name, b) in grouped:
                comparisons.append(_compare(
                    m.name, a, b,
                    {x[0].seed: x for x in grouped[(m.name, a)]},
                    {x[0].seed: x for x in grouped[(m.name, b)]},
                    opt,
                ))

    ok_runs = [x[3] for x in analysed]
    resources = []
    for model, backend in grouped:
        is_random = isinstance(spec.model(model), RandomModel)
        per_run = [_resource_measures(x[3], is_random) for x in analysed
                   if (x[0].model, x[0].backend) == (model, backend)]
        stats = tuple(
            _aggregate(q, [(r[i][1], r[i][2]) for r in per_run])
            for i, q in enumerate(RESOURCE_QUANTITIES)
        )
        resources.append(ResourceGroup(model, backend, stats))

    backends = list(dict.fromkeys(b for m in spec.models for b in m.backends))
    finished = [r.finished for r in current]
    failed.sort(key=lambda f: f.run_id)
    ignored.sort(key=lambda r: r.run_id)
    return Analysis(
        spec=spec,
        results_dir=bundle.results_dir,
        source=bundle.source,
        overrides=bundle.overrides,
        method_sentence=method_sentence(opt),
        runs=tuple(x[0] for x in analysed),
        groups=tuple(groups),
        headline=_headline(spec, groups, opt, notes),
        comparisons=tuple(comparisons),
        resources=tuple(resources),
        architecture=tuple(_architecture(spec, m, ok_runs) for m in spec.models),
        failed=tuple(failed),
        ignored=tuple(ignored),
        missing=tuple(missing),
        data=_data_info(bundle.data),
        environment=_environment(current, backends),
        finished_span=(_utc(min(finished)), _utc(max(finished))) if finished else None,
        notes=tuple(notes),
        distinguishable_rule=distinguishable_rule(opt.confidence),
    )


__all__ = [
    "Analysis",
    "ArchitectureCheck",
    "BackendComparison",
    "Bundle",
    "ClaimCell",
    "ClaimRow",
    "DataInfo",
    "DataPart",
    "DifferenceSummary",
    "EnvironmentInfo",
    "FailedRun",
    "GroupAnalysis",
    "IgnoredRun",
    "ResourceGroup",
    "ResourceStat",
    "RunAnalysis",
    "SeedPair",
    "analyze",
    "distinguishable_rule",
    "load_bundle",
    "method_sentence",
]
