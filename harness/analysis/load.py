"""Loading: a results folder -> Bundle, and which of its runs count.

    bundle = load_bundle(Path("results/demo"))   # the only I/O of the analysis
    current, ignored, missing = classify_runs(bundle)

A run counts only when plan.json (written by `harness run` for the current spec) names its id
AND its run_hash matches; any other run file is listed as ignored, never mixed into the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from harness.errors import UserError
from harness.records import RunError, RunResult
from harness.results import read_json, read_record, read_runs
from harness.spec import Spec, spec_digest

STDERR_TAIL_LINES = 12


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
    corrupt: Mapping[str, str] = field(default_factory=dict)  # data.json / plan.json: what is wrong


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
    records, corrupt = {}, {}
    for name in ("data.json", "plan.json"):
        records[name], problem = read_record(folder / name)
        if problem is not None:
            corrupt[name] = problem
    return Bundle(
        results_dir=str(folder),
        spec=spec,
        source=raw.get("source"),
        overrides=tuple(str(o) for o in raw.get("overrides") or ()),
        data=records["data.json"],
        plan=records["plan.json"],
        runs=tuple(runs),
        unreadable=tuple(IgnoredRun(p.path.stem, p.reason) for p in problems),
        corrupt=corrupt,
    )


@dataclass(frozen=True)
class ScoredTestSet:
    """One run's test predictions as arrays: cache rows, labels, probabilities, groups."""

    rows: tuple[int, ...]
    labels: np.ndarray
    probs: np.ndarray
    patient: np.ndarray
    study: np.ndarray


def classify_runs(
    bundle: Bundle,
) -> tuple[list[RunResult], list[IgnoredRun], list[str]]:
    """(current runs, ignored runs, planned ids without a result)."""
    plan_runs = (bundle.plan or {}).get("runs")
    expected: Mapping[str, Any] = plan_runs if isinstance(plan_runs, dict) else {}
    current: list[RunResult] = []
    ignored: list[IgnoredRun] = list(bundle.unreadable)
    if bundle.plan is None and "plan.json" in bundle.corrupt:
        return _classify_without_plan(bundle, ignored)
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


def _classify_without_plan(
    bundle: Bundle, ignored: list[IgnoredRun]
) -> tuple[list[RunResult], list[IgnoredRun], list[str]]:
    """A corrupt plan.json: count the runs of this very spec (its hash) on this data (data.json's
    hash, when readable); which planned runs are missing is not known."""
    spec_hash = spec_digest(bundle.spec)[:20]
    data_hash = (bundle.data or {}).get("data_hash")
    current: list[RunResult] = []
    for run in bundle.runs:
        if run.spec_hash != spec_hash:
            ignored.append(IgnoredRun(run.run_id, "spec hash differs from spec.json (older spec)"))
        elif data_hash is not None and run.data_hash != data_hash:
            ignored.append(IgnoredRun(run.run_id, "data hash differs from data.json (other data)"))
        else:
            current.append(run)
    return current, ignored, []


def run_key(run: RunResult) -> tuple[str, str, int]:
    """(model, backend, seed)."""
    return run.key.model, run.key.backend, run.key.seed


def scored_test_set(run: RunResult) -> ScoredTestSet:
    """The run's test predictions as arrays; ValueError when absent or empty."""
    test = run.test
    if test is None:
        raise ValueError("the result holds no test predictions")
    if not test.rows:
        raise ValueError("the result's test set is empty")
    return ScoredTestSet(
        test.rows,
        np.asarray(test.labels),
        np.asarray(test.probs, dtype=np.float64),
        np.asarray(test.patient),
        np.asarray(test.study),
    )


def failed_run(run: RunResult, error: RunError | None = None) -> FailedRun:
    model, backend, seed = run_key(run)
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
