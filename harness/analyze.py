"""Turn a results folder into numbers: per run, across seeds, across backends, against the paper.

    python -m harness report results/demo        # load_bundle -> analyze -> render_report

    bundle = load_bundle(Path("results/demo"))   # the only I/O here: spec, data, plan, runs
    analysis = analyze(bundle)                   # pure: frozen dataclasses, no file, no clock

This module composes the jobs of harness.analysis (load -> runs -> across, with context and
prose beside them) into one Analysis, the record the report renders; its names are re-exported
here so callers import from one place. Every bootstrap draws from `evaluation.bootstrap.seed`,
so the analysis of the same files is the same, to the last digit, on every call.
"""

from __future__ import annotations

import datetime as _dt
import itertools
from dataclasses import dataclass

from harness.analysis.across import (
    BackendComparison,
    ClaimCell,
    ClaimRow,
    DifferenceSummary,
    GroupAnalysis,
    GroupTest,
    Member,
    SeedPair,
    analyze_group,
    compare_backends,
    headline,
    paper_above_chance,
)
from harness.analysis.context import (
    ArchitectureCheck,
    DataInfo,
    DataPart,
    EnvironmentInfo,
    ResourceGroup,
    ResourceStat,
    architecture_check,
    data_info,
    environment_info,
    resource_groups,
)
from harness.analysis.load import (
    Bundle,
    FailedRun,
    IgnoredRun,
    classify_runs,
    failed_run,
    load_bundle,
    run_key,
    scored_test_set,
)
from harness.analysis.prose import (
    DEGENERATE_RULE,
    distinguishable_rule,
    method_sentence,
    verdict_rule,
)
from harness.analysis.runs import RunAnalysis, analyze_run, options
from harness.records import RunError, RunResult
from harness.spec import Spec


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
    corrupt: tuple[tuple[str, str], ...] = ()  # (file, what is wrong): data.json, plan.json
    verdict_rule: str = ""
    distinguishable_rule: str = ""
    degenerate_rule: str = DEGENERATE_RULE

    def group(self, model: str, backend: str) -> GroupAnalysis | None:
        """The (model, backend) group, if any run of it finished."""
        for g in self.groups:
            if g.model == model and g.backend == backend:
                return g
        return None


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def analyze(bundle: Bundle) -> Analysis:
    """Every number of the report, from a Bundle; pure and deterministic."""
    spec = bundle.spec
    opt = options(spec)
    notes: list[str] = list(bundle.corrupt.values())
    if "plan.json" in bundle.corrupt:
        notes.append("without plan.json, a run counts when its spec hash (and data hash) match "
                     "this spec; runs not started yet are not listed; `python -m harness run` "
                     "writes plan.json again")
    current, ignored, missing = classify_runs(bundle)
    failed: list[FailedRun] = []
    analysed: list[tuple[RunAnalysis, Member, RunResult]] = []
    known_models = {m.name for m in spec.models}
    for run in current:
        if run.status != "ok":
            failed.append(failed_run(run))
            continue
        if run_key(run)[0] not in known_models:
            ignored.append(IgnoredRun(run.run_id, "model not in the current spec"))
            continue
        try:
            test = scored_test_set(run)
            ra, levels = analyze_run(run, test, opt, notes)
        except ValueError as e:
            failed.append(failed_run(run, RunError(type="BadResult", reason=str(e))))
            continue
        analysed.append((ra, (ra, test, levels), run))

    order: dict[tuple[str, str], tuple[int, int]] = {
        (m.name, str(b)): (i, j)
        for i, m in enumerate(spec.models)
        for j, b in enumerate(m.backends)
    }
    analysed.sort(key=lambda x: (order.get((x[0].model, x[0].backend), (99, 99)), x[0].seed))
    grouped: dict[tuple[str, str], list[Member]] = {}
    for ra, member, _ in analysed:
        grouped.setdefault((ra.model, ra.backend), []).append(member)
    groups = [
        analyze_group(model, backend, members, opt, notes,
                      paper_above_chance=paper_above_chance(spec, model, opt.confidence))
        for (model, backend), members in grouped.items()
    ]

    comparisons = []
    for m in spec.models:
        for a, b in itertools.combinations(m.backends, 2):
            if (m.name, a) in grouped and (m.name, b) in grouped:
                comparisons.append(compare_backends(
                    m.name, a, b,
                    {x[0].seed: x for x in grouped[(m.name, a)]},
                    {x[0].seed: x for x in grouped[(m.name, b)]},
                    opt,
                ))

    ok_runs = [x[2] for x in analysed]
    backends = list(dict.fromkeys(b for m in spec.models for b in m.backends))
    finished = [r.finished for r in current]
    failed.sort(key=lambda f: f.run_id)
    ignored.sort(key=lambda r: r.run_id)
    return Analysis(
        spec=spec,
        results_dir=bundle.results_dir,
        source=bundle.source,
        overrides=bundle.overrides,
        method_sentence=method_sentence(confidence=opt.confidence, method=opt.method,
                                        resamples=opt.resamples, unit=opt.unit, seed=opt.seed),
        runs=tuple(x[0] for x in analysed),
        groups=tuple(groups),
        headline=headline(spec, groups, opt, notes),
        comparisons=tuple(comparisons),
        resources=resource_groups(spec, [(x[0].model, x[0].backend, x[2]) for x in analysed]),
        architecture=tuple(architecture_check(spec, m, ok_runs) for m in spec.models),
        failed=tuple(failed),
        ignored=tuple(ignored),
        missing=tuple(missing),
        data=data_info(bundle.data),
        environment=environment_info(current, backends),
        finished_span=(_utc(min(finished)), _utc(max(finished))) if finished else None,
        notes=tuple(notes),
        corrupt=tuple(bundle.corrupt.items()),
        verdict_rule=verdict_rule(opt.confidence),
        distinguishable_rule=distinguishable_rule(opt.confidence, opt.unit, spec.runtime.init),
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
    "GroupTest",
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
