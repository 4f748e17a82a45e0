"""The runner: one fresh worker process per run, results as files, resumable.

    python -m harness run specs/demo.yaml [--models cnn --backends torch --seeds 0 --fresh]
    outcomes = run_all(plan, job_data, results_dir, cache_dir)     # harness/pipeline.py

It turns each selected run of a Plan into a Job (the plan's run hash and code version, a fresh
attempt nonce, the data prepared once) and returns one RunOutcome per run.
Runs are sequential on this machine (one GPU, or the CPU). Each worker gets its own environment
(PYTHONHASHSEED, visible devices, the backend's import-time flags), a timeout, and its stderr in
logs/. Finished runs whose run hash matches are skipped. Ctrl-C or SIGTERM stops the worker,
keeps every finished run and exits 130; the interrupted run leaves no result.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.plan import Plan, init_source, run_status
from harness.records import BuiltEvent, EpochEvent, Job, JobData, RunKey, RunResult
from harness.results import (
    RunFileError,
    checkpoint_path,
    init_path,
    parse_progress,
    read_run,
    run_path,
    write_job,
    write_run,
)
from harness.spec import Spec
from harness.tracking import RunObserver

STDERR_TAIL_LINES = 25
TERM_GRACE_S = 10.0


@dataclass
class RunOutcome:
    key: RunKey
    status: str  # ok | failed | skipped | interrupted
    seconds: float = 0.0
    reason: str | None = None


@dataclass
class Reporter:
    """Progress output: a line per run and per epoch, or one line per run when quiet."""

    quiet: bool = False
    verbose: bool = False  # every history field per epoch, and the parameter counts
    total: int = 0
    done: int = 0
    durations: list[float] = field(default_factory=list)
    write: Callable[[str], None] = lambda s: print(s, flush=True)
    observer: RunObserver | None = None  # --track: told the same progress

    def _eta(self) -> str:
        left = self.total - self.done
        if not self.durations or left <= 0:
            return ""
        return f", about {_fmt_s(left * sum(self.durations) / len(self.durations))} left"

    def start(self, key: RunKey) -> None:
        if self.observer is not None:
            self.observer.run_started(key)
        if not self.quiet:
            self.write(
                f"[{self.done + 1}/{self.total}] {key.model} / {key.backend} / "
                f"seed {key.seed}: started"
            )

    def event(self, key: RunKey, ev: BuiltEvent | EpochEvent) -> None:
        if self.observer is not None and isinstance(ev, EpochEvent):
            self.observer.epoch(key, ev)
        if self.quiet:
            return
        if isinstance(ev, BuiltEvent):
            if self.verbose:
                p = ev.params
                self.write(f"    built: {p.total:,} parameters ({p.trainable:,} trainable)")
            return
        r = ev.record
        if self.verbose:
            fields = (
                "loss",
                "accuracy",
                "recall",
                "precision",
                "val_loss",
                "val_accuracy",
                "val_recall",
                "val_precision",
            )
            values = {f: getattr(r, f) for f in fields}
            self.write(
                "    epoch {}/{}: {} ({:.1f} s, train {:.1f} s)".format(
                    r.epoch,
                    ev.epochs,
                    " ".join(f"{f} {v:.4f}" for f, v in values.items() if isinstance(v, float)),
                    r.seconds,
                    r.train_seconds,
                )
            )
            return
        left = (ev.epochs - r.epoch) * r.seconds
        val_txt = f" val_acc {r.val_accuracy:.3f}" if isinstance(r.val_accuracy, float) else ""
        self.write(
            f"    epoch {r.epoch}/{ev.epochs}: loss {r.loss:.4f} acc {r.accuracy:.3f}"
            f"{val_txt} ({r.seconds:.1f} s, run ETA {_fmt_s(left)})"
        )

    def finish(self, outcome: RunOutcome) -> None:
        if self.observer is not None:
            self.observer.run_finished(outcome.key, outcome.status)
        self.done += 1
        if outcome.status in ("ok", "failed"):
            self.durations.append(outcome.seconds)
        k = outcome.key
        why = f": {outcome.reason}" if outcome.reason else ""
        self.write(
            f"[{self.done}/{self.total}] {k.model} / {k.backend} / seed {k.seed}: "
            f"{outcome.status} ({_fmt_s(outcome.seconds)}){why}{self._eta()}"
        )


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGKILL if the harness dies (kill -9), instead of training on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_env(spec: Spec, key: RunKey, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = str(key.seed)
    env["HARNESS_CACHE"] = str(cache_dir)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # TF would grab all GPU memory
    if spec.runtime.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # the worker must import this checkout's harness/ and backends/, wherever it is started
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = (
        root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    )
    return env


class Interrupted(Exception):
    pass


def _tail(path: Path, n: int = STDERR_TAIL_LINES) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_one(
    job: Job,
    results_dir: Path,
    env: dict[str, str],
    reporter: Reporter,
    stop: threading.Event,
) -> RunOutcome:
    """Run one job in a worker; always leaves either a complete RunResult or nothing."""
    key = job.key
    log = results_dir / "logs" / f"{key.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    _supersede(job.out, job.run_hash)
    job_path = write_job(results_dir, job)
    t0 = time.time()
    clock = time.monotonic()
    reporter.start(key)
    timeout = job.spec.runtime.timeout_s
    timed_out = False
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker", str(job_path)],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # Ctrl-C reaches the harness, which stops the worker
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

        def pump() -> None:
            if proc.stdout is None:  # Popen(stdout=PIPE) always sets it
                return
            for line in proc.stdout:
                try:  # never stop draining the pipe, or the worker blocks on a full pipe
                    event = parse_progress(line)
                    if event is not None:
                        reporter.event(key, event)
                    else:
                        err.write(line)
                except Exception:  # noqa: BLE001 - progress display is best effort
                    pass

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                if stop.wait(0.2):
                    raise Interrupted
                if time.monotonic() - clock > timeout:
                    timed_out = True
                    _terminate(proc)
                    break
        except Interrupted:
            _terminate(proc)
            job_path.unlink(missing_ok=True)
            # a result this attempt finished just before the signal is complete and kept
            finished = _own_result(job)
            if finished is not None and job.checkpoint is not None:
                job.checkpoint.unlink(missing_ok=True)
            status = finished.status if finished else "interrupted"
            return RunOutcome(key, status, time.time() - t0, None)
        finally:
            _reap(proc)
            reader.join(timeout=5)
    job_path.unlink(missing_ok=True)
    seconds = time.time() - t0
    result = _own_result(job)
    if result is not None:  # written by this attempt, even if it then overran at exit
        if job.checkpoint is not None:  # done with it; a worker that died keeps its own
            job.checkpoint.unlink(missing_ok=True)
        if result.error is None:
            return RunOutcome(key, result.status, seconds, None)
        write_run(job.out, result.with_stderr_tail(_tail(log)))
        return RunOutcome(key, result.status, seconds, result.error.reason)
    # the worker died without a result: record why
    rc = proc.returncode
    if timed_out:
        reason = f"timeout: exceeded runtime.timeout_s = {timeout:g} s"
    elif rc is not None and rc < 0:
        reason = f"worker killed by signal {signal.Signals(-rc).name}"
    else:
        reason = f"worker exited with code {rc} without a result"
    write_run(job.out, RunResult.failed(job, reason, "WorkerDied", _tail(log), started=t0))
    return RunOutcome(key, "failed", seconds, reason)


def _own_result(job: Job) -> RunResult | None:
    """The complete result written by this very attempt (not one left by an earlier one)."""
    try:
        run = read_run(job.out)
    except RunFileError:
        return None
    if run is not None and run.run_hash == job.run_hash and run.attempt == job.attempt:
        return run
    return None


def _supersede(out: Path, new_hash: str) -> None:
    """Keep a finished result of another configuration, or a file this harness cannot read,
    instead of overwriting it."""
    try:
        old = read_run(out)
    except RunFileError as e:
        dest = out.parent / "superseded" / f"{out.stem}.unreadable.json"
        print(f"warning: {e}; moved to {dest}", file=sys.stderr)
    else:
        if old is None or old.run_hash == new_hash or old.status != "ok":
            return
        dest = out.parent / "superseded" / f"{out.stem}.{old.run_hash}.json"
    dest.parent.mkdir(exist_ok=True)
    os.replace(out, dest)


def _reap(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of the worker's process group (grandchildren holding a GPU or the
    pipe) once the worker itself is gone."""
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _terminate(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the worker's process group, SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def make_job(plan: Plan, key: RunKey, data: JobData, results_dir: Path,
             out: Path | None = None, checkpoints: bool = True) -> Job:
    """The job of one run of the plan (`out` elsewhere for a rerun that must not replace it)."""
    if plan.data_hash is None:
        raise ValueError("a job needs a plan with its data (Plan.with_data)")
    return Job(
        spec=plan.spec,
        key=key,
        run_hash=plan.run_hashes[key.id],
        attempt=uuid.uuid4().hex,  # a result counts only if this attempt wrote it
        spec_hash=plan.spec_hash,
        data_hash=plan.data_hash,
        code_version=plan.code_versions[key.backend],
        data=data,
        out=out or run_path(results_dir, key.id),
        command=("python", "-m", "harness", *sys.argv[1:]),
        checkpoint=checkpoint_path(results_dir, key.id)
        if checkpoints and plan.spec.runtime.checkpoint_every
        else None,
        init_weights=init_path(results_dir, key.model, key.seed)
        if init_source(plan.spec, key)
        else None,
    )


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `stop` (the running worker is stopped, then KeyboardInterrupt)."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: stop.set())
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass(frozen=True)
class DeterminismGrade:
    """A fresh-process rerun of one seed against its stored result."""

    model: str
    backend: str
    seed: int
    grade: str  # bit-identical | max abs difference X | nondeterministic (...) | not checked
    max_abs_difference: float | None
    changed_predictions: int | None  # test images whose thresholded label changed
    flags: dict[str, Any]  # the determinism flags the stored run had in force


def grade_rerun(
    a: tuple[float, ...], b: tuple[float, ...], threshold: float
) -> tuple[str, float, int]:
    """(grade, max |a - b|, labels that changed at `threshold`) for two probability lists."""
    pa, pb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if pa.shape == pb.shape and np.array_equal(pa, pb):
        return "bit-identical", 0.0, 0
    if pa.shape != pb.shape:
        return f"nondeterministic ({len(pa)} vs {len(pb)} predictions)", float("inf"), len(pa)
    diff = float(np.max(np.abs(pa - pb)))
    changed = int(np.sum((pa >= threshold) != (pb >= threshold)))
    if changed:
        grade = f"nondeterministic (max abs difference {diff:.1e}; {changed} labels change)"
        return grade, diff, changed
    return f"max abs difference {diff:.1e}", diff, 0


def check_determinism(plan: Plan, data: JobData, results_dir: Path, cache_dir: Path,
                      quiet: bool = False) -> list[DeterminismGrade]:
    """Rerun the first planned seed of every (model, backend) in a fresh process and compare its
    test probabilities with the stored result, bit for bit (`run --check-determinism`)."""
    firsts: dict[tuple[str, str], RunKey] = {}
    for key in plan.selected:
        firsts.setdefault((key.model, key.backend), key)
    reporter = Reporter(quiet=quiet, total=len(firsts))
    threshold = plan.spec.evaluation.threshold
    grades = []
    stop = threading.Event()
    with _stop_on_signals(stop):
        for key in firsts.values():
            stored = _read_ok(run_path(results_dir, key.id), plan.run_hashes[key.id])
            if stored is None or stored.test is None:
                grades.append(DeterminismGrade(key.model, key.backend, key.seed,
                                               "not checked (no finished run)", None, None, {}))
                continue
            out = results_dir / "runs" / "determinism" / f"{key.id}.json"
            job = make_job(plan, key, data, results_dir, out=out, checkpoints=False)
            outcome = run_one(job, results_dir, worker_env(plan.spec, key, cache_dir), reporter,
                              stop)
            if stop.is_set():
                raise KeyboardInterrupt
            reporter.finish(outcome)
            rerun = _read_ok(out, job.run_hash)
            flags = dict(stored.environment.get("determinism", {}))
            if rerun is None or rerun.test is None:
                grades.append(DeterminismGrade(key.model, key.backend, key.seed,
                                               f"not checked (the rerun failed: {outcome.reason})",
                                               None, None, flags))
                continue
            grade, diff, changed = grade_rerun(stored.test.probs, rerun.test.probs, threshold)
            grades.append(DeterminismGrade(key.model, key.backend, key.seed, grade, diff,
                                           changed, flags))
    return grades


def _read_ok(path: Path, run_hash: str) -> RunResult | None:
    try:
        run = read_run(path)
    except RunFileError:
        return None
    return run if run is not None and run.status == "ok" and run.run_hash == run_hash else None


def run_all(
    plan: Plan,
    data: JobData,
    results_dir: Path,
    cache_dir: Path,
    fresh: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    observer: RunObserver | None = None,
) -> list[RunOutcome]:
    """Run every selected run of the plan not already done, telling `observer` (--track) the
    progress; Ctrl-C/SIGTERM raises KeyboardInterrupt after cleanup."""
    if plan.data_hash is None:
        raise ValueError("run_all needs a plan with its data (Plan.with_data)")
    status = run_status(plan, results_dir)
    todo = []
    outcomes = []
    for key in plan.selected:
        if not fresh and status[key.id] == "done":
            outcomes.append(RunOutcome(key, "skipped", 0.0, "already done"))
        else:
            todo.append(key)
    reporter = Reporter(quiet=quiet, verbose=verbose, total=len(todo), observer=observer)
    if outcomes and not quiet:
        print(
            f"{len(outcomes)} run(s) already done (same spec, data and code): skipped; "
            "--fresh reruns them"
        )
    stop = threading.Event()
    with _stop_on_signals(stop):
        for key in todo:
            job = make_job(plan, key, data, results_dir)
            if fresh and job.checkpoint is not None:
                job.checkpoint.unlink(missing_ok=True)  # --fresh redoes the whole run
            outcome = run_one(job, results_dir, worker_env(plan.spec, key, cache_dir), reporter,
                              stop)
            if outcome.status == "interrupted":
                print(
                    f"interrupted: {key.id} stopped; its partial work is discarded", file=sys.stderr
                )
            else:
                reporter.finish(outcome)
                outcomes.append(outcome)
            if stop.is_set():
                raise KeyboardInterrupt
    return outcomes
