"""The run verb, top to bottom: spec -> plan -> data (prepared once) -> runner -> report.

    python -m harness run specs/demo.yaml [--models cnn] [--fresh] [--dry-run] [--jobs 2]

`run(request)` returns the exit code: 0 every run ok, 1 some run failed, 130 interrupted (the
report is written in every case). The plan's run hashes are computed once, after the data is
prepared; plan.json, the skip-if-done check and every job take them from that one Plan.
The data cache is built here, once, before any worker starts (whatever executor runs them);
workers only read it and check its content hash.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.errors import EXIT_INTERRUPTED
from harness.executors import ExecutorOptions, make_executor
from harness.plan import Selection, make_plan
from harness.records import JobData
from harness.spec import load_spec
from harness.validate import (
    Where,
    check_counts,
    data_hash_if_cached,
    data_section,
    model_tables,
    plan_table,
    spec_fields,
)

if TYPE_CHECKING:
    from harness.data import PreparedData


@dataclass(frozen=True)
class RunRequest:
    spec: Path
    overrides: tuple[str, ...] = ()
    selection: Selection = Selection()
    where: Where = Where()
    fresh: bool = False
    dry_run: bool = False
    quiet: bool = False
    verbose: bool = False
    check_determinism: bool = False
    executor: ExecutorOptions = ExecutorOptions()
    track: str | None = None  # --track mlflow (harness/tracking.py)


def job_data(data: PreparedData) -> JobData:
    """What every worker needs of the prepared data."""
    test = np.sort(data.split.test)
    return JobData(
        cache_folder=data.cache.folder,
        cache_content=data.cache.pixels_sha256 or data.cache.key,
        labels=tuple(int(x) for x in data.table["label"].to_numpy()),
        train=tuple(int(x) for x in data.split.train),
        val=tuple(int(x) for x in np.sort(data.split.val)),
        test=tuple(int(x) for x in test),
        test_patient=tuple(str(x) for x in data.table["patient"].to_numpy()[test]),
        test_study=tuple(str(x) for x in data.table["study"].to_numpy()[test]),
        skipped=tuple(data.skipped),
    )


def run(request: RunRequest) -> int:
    """Plan, prepare the data once, run what is not done, write the report."""
    from harness.data import data_record, prepare_data, render_split
    from harness.results import (
        check_results_dir,
        clean_temp_files,
        read_record,
        results_lock,
        write_json_atomic,
        write_plan,
    )
    from harness.runner import check_determinism, run_all
    from harness.tracking import check_tracker, open_tracker

    # SIGTERM before the runner takes over (data generation, cache build) must clean up too
    signal.signal(signal.SIGTERM, _raise_interrupt)
    spec = load_spec(request.spec, list(request.overrides))
    _, problems = model_tables(spec)
    check_counts(problems, f"`python -m harness validate {request.spec}` prints every count")
    plan = make_plan(spec, request.selection)
    results_dir = request.where.results_dir(spec)
    check_results_dir(results_dir, "--out" if request.where.out is not None else "results folder")
    cache_dir = request.where.cache()
    # before any work: a missing extra or a missing Slurm is exit 2 with nothing computed
    executor = make_executor(request.executor, spec.runtime.device, results_dir)
    check_tracker(request.track)
    if request.dry_run:
        print(data_section(spec, cache_dir))
        print(plan_table(plan.with_data(data_hash_if_cached(spec, cache_dir)), results_dir))
        return 0

    with results_lock(results_dir):
        clean_temp_files(results_dir)
        with spec_fields(spec):
            data = prepare_data(spec.data, cache_dir, progress=not request.quiet)
        if data is None:  # build=True always returns the data
            raise RuntimeError("prepare_data(build=True) returned no data")
        if not request.quiet:
            print(f"Data ({spec.data.dataset}): cache {data.cache.folder}")
            print(render_split(data.describe()))
        plan = plan.with_data(data.data_hash)
        for name in ("data.json", "plan.json"):  # rewritten below: keep a corrupt one aside
            problem = read_record(results_dir / name)[1]
            if problem is not None:
                print(f"warning: {problem}", file=sys.stderr)
        write_json_atomic(
            results_dir / "spec.json",
            {
                "source": str(request.spec),
                "overrides": list(request.overrides),
                "spec": spec.model_dump(mode="json"),
            },
        )
        write_json_atomic(results_dir / "data.json", data_record(data, spec.data))
        write_plan(results_dir, data.data_hash, plan.run_hashes)
        tracker = open_tracker(request.track, plan, results_dir, request.spec)
        interrupted = False
        try:
            outcomes = run_all(
                plan,
                job_data(data),
                results_dir,
                cache_dir,
                fresh=request.fresh,
                quiet=request.quiet,
                verbose=request.verbose,
                executor=executor,
                observer=tracker,
            )
            submitted = [o for o in outcomes if o.status == "submitted"]
            if submitted:  # --detach: the jobs write their results; a later run collects
                print(f"detached: {len(submitted)} run(s) submitted; run the same command again "
                      f"to wait for them and write the report, or `python -m harness report "
                      f"{results_dir}` for what has finished")
                return 0
            if request.check_determinism:
                grades = check_determinism(plan, job_data(data), results_dir, cache_dir,
                                           request.quiet)
                write_json_atomic(results_dir / "determinism.json",
                                  {"grades": [dataclasses.asdict(g) for g in grades]})
                print(render_grades(grades))
        except KeyboardInterrupt:
            interrupted = True
            outcomes = []
        report, bad_results = _write_report(results_dir, outcomes)
        print(f"\nreport: {report}")
        if tracker is not None:
            failed_any = any(o.status == "failed" for o in outcomes)
            tracker.close(report, "KILLED" if interrupted else "FAILED" if failed_any
                          else "FINISHED")
            print(f"tracked: {tracker.uri} (mlflow ui --backend-store-uri {tracker.uri})")
        if interrupted:
            print(
                "interrupted: finished runs are kept; run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed; reasons are in the report and logs/", file=sys.stderr)
        return 1
    if bad_results:  # finished "ok", but the analysis could not use the result
        print(
            f"{len(bad_results)} run(s) finished but their results failed analysis "
            f"({bad_results[0]}); reasons are in the report",
            file=sys.stderr,
        )
        return 1
    return 0


def _write_report(results_dir: Path, outcomes: list[Any]) -> tuple[Path, list[str]]:
    """report.md and metrics.csv (as `report` writes them), and the runs of this invocation
    that finished ok but that the analysis counts as failed (a result it could not use)."""
    from harness.report import write_report_files

    report, analysis = write_report_files(results_dir)
    ok_now = {o.key.id for o in outcomes if o.status == "ok"}
    bad = [f"{f.run_id}: {f.message}" for f in analysis.failed if f.run_id in ok_now]
    return report, bad


def render_grades(grades: list[Any]) -> str:
    """The determinism grades as a table (also in the report)."""
    from tabulate import tabulate

    rows = [(g.model, g.backend, g.seed, g.grade) for g in grades]
    return "\nDeterminism (a fresh-process rerun of one seed, test probabilities compared bit " \
        "for bit):\n" + tabulate(rows, headers=["model", "backend", "seed", "grade"])


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
