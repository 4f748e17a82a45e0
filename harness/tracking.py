"""Experiment tracking: the runner's observer interface, and MLflow behind it.

    python -m harness run specs/demo.yaml --track mlflow
    mlflow ui --backend-store-uri sqlite:///results/demo/mlflow.db

`RunObserver` is what the runner calls as runs start, finish epochs and end (the Reporter
forwards its progress to it). `MlflowTracker` logs one MLflow run per harness run, nested under
one parent run per results folder: parameters (model, backend, seed, the recipe flattened, run
hash, git commit), per-epoch metrics as the epochs finish (step = epoch), the final test metrics
with their interval bounds (harness/analysis, the report's numbers), the run JSON, and on the
parent the report. Runs are tagged with their run hash and attempt: a rerun that skips finished
runs logs nothing twice, a run finished without tracking is logged from its result file, and a
new attempt of a run replaces the MLflow run of the earlier one. This is the only module that
imports mlflow (the `[mlflow]` extra), and only when tracking is asked for.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harness.errors import UserError
from harness.records import EpochEvent, EpochRecord, RunKey, RunResult
from harness.results import RunFileError, read_run, run_path

if TYPE_CHECKING:
    from harness.plan import Plan

TRACKERS = ("mlflow",)
INSTALL_HINT = "pip install -e '.[mlflow]' (from the harness folder), or pip install 'mlflow>=3'"
TAG = "harness."  # prefix of every tag the harness sets
EPOCH_FIELDS = ("loss", "accuracy", "recall", "precision", "val_loss", "val_accuracy",
                "val_recall", "val_precision", "seconds", "train_seconds")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow accepts at most 100 params per log_batch call


class RunObserver(Protocol):
    """What the runner tells an observer; calls may come from the worker's progress thread."""

    def run_started(self, key: RunKey) -> None: ...

    def epoch(self, key: RunKey, event: EpochEvent) -> None: ...

    def run_finished(self, key: RunKey, status: str) -> None: ...


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as `a.b.0.c` -> text, for MLflow parameters (whose names
    allow no brackets)."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)) and obj and any(
        isinstance(v, (Mapping, list, tuple)) for v in obj
    ):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        text = "null" if obj is None else str(list(obj) if isinstance(obj, tuple) else obj)
        out[prefix] = text[:MAX_PARAM_CHARS]
    return out


def epoch_metrics(record: EpochRecord) -> dict[str, float]:
    """The epoch's history fields that were measured (validation ones may be None)."""
    values = {f: getattr(record, f) for f in EPOCH_FIELDS}
    return {f: float(v) for f, v in values.items() if isinstance(v, (int, float))}


def final_metrics(run: RunResult, plan: Plan) -> dict[str, float]:
    """`test/<level>/<metric>` with `_low` and `_high`: the run's test metrics and their
    intervals, computed as the report computes them."""
    from harness.analysis.load import scored_test_set
    from harness.analysis.runs import analyze_run, options

    if run.test is None:
        return {}
    analysis, _ = analyze_run(run, scored_test_set(run), options(plan.spec), [])
    out: dict[str, float] = {}
    for level, points in analysis.points.items():
        for metric, value in points.items():
            name = f"test/{level}/{metric}"
            out[name] = float(value)
            iv = analysis.intervals.get(level, {}).get(metric)
            if iv is not None:
                out[f"{name}_low"] = float(iv.low)
                out[f"{name}_high"] = float(iv.high)
    return out


def default_uri(results_dir: Path) -> str:
    """A local sqlite store inside the results folder: offline, nothing to start."""
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def check_tracker(kind: str | None) -> None:
    """`--track KIND` can start here (checked before any data is prepared)."""
    if kind is None:
        return
    if kind not in TRACKERS:
        raise UserError(f"--track: unknown tracker {kind!r}; allowed: {', '.join(TRACKERS)}")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            "--track mlflow: the mlflow package is not installed in this environment",
            hint=INSTALL_HINT,
        ) from None


def open_tracker(kind: str | None, plan: Plan, results_dir: Path, source: Path) -> Any:
    """The observer for `--track KIND` (None: no tracking); a user error when it cannot start."""
    check_tracker(kind)
    return None if kind is None else MlflowTracker(plan, results_dir, source)


class MlflowTracker:
    """One MLflow parent run per results folder, one child run per harness run."""

    def __init__(self, plan: Plan, results_dir: Path, source: Path) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param = Metric, Param
        self.plan = plan
        self.results_dir = results_dir.resolve()
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = env_uri or default_uri(self.results_dir)
        self._lock = threading.Lock()
        self._live: dict[str, str] = {}  # run id of the harness -> MLflow run id (this session)
        self._steps: dict[str, set[int]] = {}  # MLflow run id -> epochs logged
        self.failures: list[str] = []
        where = "MLFLOW_TRACKING_URI" if env_uri else "the default store"
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(plan.spec.name, local=_is_local(self.uri))
            self.parent_id = self._parent(source)
            self._children = self._find_children()
        except Exception as e:  # noqa: BLE001 - any store failure is the user's URI or server
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--track mlflow: cannot use the tracking store {self.uri} ({where}): {first}",
                hint="set MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// path, "
                "or unset it for a store inside the results folder",
            ) from None

    # -- setup ------------------------------------------------------------------------------

    def _experiment(self, name: str, local: bool) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)
        # a local store would put artifacts in ./mlruns of whatever folder the harness ran from;
        # a server keeps its own artifact root
        location = (self.results_dir / "mlartifacts").as_uri() if local else None
        return str(self.client.create_experiment(name, artifact_location=location))

    def _parent(self, source: Path) -> str:
        folder = str(self.results_dir)
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG}results_dir` = '{_quote(folder)}' "
            f"and tags.`{TAG}kind` = 'spec'",
            max_results=1,
        )
        tags = {
            f"{TAG}kind": "spec",
            f"{TAG}results_dir": folder,
            f"{TAG}spec": str(source),
            f"{TAG}spec_hash": self.plan.spec_hash,
            f"{TAG}data_hash": self.plan.data_hash or "",
        }
        if found:
            run_id = str(found[0].info.run_id)
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
            return run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.plan.spec.name)
        return str(run.info.run_id)

    def _find_children(self) -> dict[str, Any]:
        """Run hash -> the MLflow run of the latest attempt logged under this parent."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
            max_results=50000,
        )
        return {h: r for r in runs if (h := r.data.tags.get(f"{TAG}run_hash")) is not None}

    # -- the observer ------------------------------------------------------------------------

    def run_started(self, key: RunKey) -> None:
        self._guard(f"{key.id}: start", self._start, key)

    def epoch(self, key: RunKey, event: EpochEvent) -> None:
        self._guard(f"{key.id}: epoch {event.record.epoch}", self._epoch, key, event.record)

    def run_finished(self, key: RunKey, status: str) -> None:
        self._guard(f"{key.id}: finish", self._finish, key, status)

    def close(self, report: Path | None, status: str) -> None:
        """Log runs finished without tracking (skipped ones included), mark runs of this session
        that never finished as killed, attach the report to the parent and end it."""
        for key in self.plan.selected:
            self._guard(f"{key.id}: from its result file", self._sync, key)
        with self._lock:
            for run_id in self._live.values():
                self._call(f"{run_id}: end", self.client.set_terminated, run_id, "KILLED")
            self._live.clear()
        for name in ("report.md", "metrics.csv"):
            path = self.results_dir / name
            if report is not None and path.is_file():
                self._call(f"parent: {name}", self.client.log_artifact, self.parent_id, str(path))
        self._call("parent: end", self.client.set_terminated, self.parent_id, status)
        if self.failures:
            print(f"warning: {len(self.failures)} MLflow call(s) failed; the first: "
                  f"{self.failures[0]}", file=sys.stderr)

    # -- the work ----------------------------------------------------------------------------

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        with self._lock:
            self._call(what, fn, *args)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Tracking never costs a run: a failing call is counted, said once, and skipped."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracking server's trouble is not the run's
            if not self.failures:
                print(f"warning: MLflow tracking: {what}: {e}", file=sys.stderr)
            self.failures.append(f"{what}: {e}")
            return None

    def _create(self, key: RunKey) -> str:
        """A fresh child run for `key`, replacing an earlier attempt's."""
        run_hash = self.plan.run_hashes[key.id]
        old = self._children.pop(run_hash, None)
        if old is not None:
            self.client.delete_run(old.info.run_id)
        tags = {
            "mlflow.parentRunId": self.parent_id,
            f"{TAG}kind": "run",
            f"{TAG}run_hash": run_hash,
            f"{TAG}model": key.model,
            f"{TAG}backend": key.backend,
            f"{TAG}seed": str(key.seed),
        }
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=key.id)
        run_id = str(run.info.run_id)
        params = {"model": key.model, "backend": key.backend, "seed": str(key.seed),
                  "run_hash": run_hash, "code_version": self.plan.code_versions[key.backend],
                  "data_hash": self.plan.data_hash or "", **self._recipe(key)}
        items = [self._Param(k, v) for k, v in params.items()]
        try:
            for i in range(0, len(items), BATCH):
                self.client.log_batch(run_id, params=items[i:i + BATCH])
        except Exception:
            self.client.delete_run(run_id)  # no half-made run left behind
            raise
        self._steps[run_id] = set()
        return run_id

    def _recipe(self, key: RunKey) -> dict[str, str]:
        model = next(m for m in self.plan.spec.models if m.name == key.model)
        dumped = model.model_dump(mode="json", exclude={"name", "description", "backends"})
        return flatten(dumped)

    def _start(self, key: RunKey) -> None:
        self._live[key.id] = self._create(key)

    def _epoch(self, key: RunKey, record: EpochRecord) -> None:
        run_id = self._live.get(key.id)
        if run_id is not None:
            self._log_epochs(run_id, [record])

    def _log_epochs(self, run_id: str, records: Sequence[EpochRecord]) -> None:
        import time

        now = int(time.time() * 1000)
        done = self._steps.setdefault(run_id, set())
        metrics = [
            self._Metric(name, value, now, r.epoch)
            for r in records if r.epoch not in done
            for name, value in epoch_metrics(r).items()
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        done.update(r.epoch for r in records)

    def _finish(self, key: RunKey, status: str) -> None:
        run_id = self._live.pop(key.id, None)
        if run_id is None:
            return
        run = self._result(key)
        if run is None:  # the worker left no result of this configuration
            self.client.set_terminated(run_id, "KILLED" if status == "interrupted" else "FAILED")
            return
        self._complete(run_id, run)

    def _complete(self, run_id: str, run: RunResult) -> None:
        """What a finished result adds: epochs not seen live (a resumed run's first ones), git
        commit, test metrics with intervals, the run JSON; then the run's end state."""
        self._log_epochs(run_id, run.history)
        commit = (run.provenance.get("git") or {}).get("commit")
        if commit and "git_commit" not in self.client.get_run(run_id).data.params:
            self.client.log_param(run_id, "git_commit", str(commit))
        self.client.set_tag(run_id, f"{TAG}attempt", run.attempt or "")
        self.client.set_tag(run_id, f"{TAG}status", run.status)
        if run.error is not None:
            self.client.set_tag(run_id, f"{TAG}error", run.error.reason[:5000])
        now = int(run.finished * 1000)
        metrics = [self._Metric(k, v, now, 0) for k, v in final_metrics(run, self.plan).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.log_artifact(run_id, str(run_path(self.results_dir, run.run_id)), "run")
        self.client.set_terminated(run_id, "FINISHED" if run.status == "ok" else "FAILED",
                                   end_time=now)
        self._children[run.run_hash] = self.client.get_run(run_id)

    def _result(self, key: RunKey) -> RunResult | None:
        try:
            run = read_run(run_path(self.results_dir, key.id))
        except RunFileError:
            return None
        if run is None or run.run_hash != self.plan.run_hashes[key.id]:
            return None
        return run

    def _sync(self, key: RunKey) -> None:
        """Log a finished result that MLflow does not have (or has from another attempt)."""
        if key.id in self._live:
            return
        run = self._result(key)
        if run is None:
            return
        tracked = self._children.get(run.run_hash)
        if tracked is not None and tracked.data.tags.get(f"{TAG}attempt") == run.attempt:
            return
        self._complete(self._create(key), run)


def _is_local(uri: str) -> bool:
    """A store on this machine (sqlite, a file store or a plain path), not a server."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    return scheme in ("", "file") or scheme.startswith("sqlite")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
