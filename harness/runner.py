"""The runner: one fresh worker process per run, results as files, resumable.

    python -m harness run specs/demo.yaml [--models cnn --backends torch --seeds 0 --fresh]
    python -m harness run specs/demo.yaml --jobs 2 | --executor ray | --executor slurm
    outcomes = run_all(plan, job_data, results_dir, cache_dir, executor=...)  # harness/pipeline.py

It turns each selected run of a Plan into a Job (the plan's run hash and code version, a fresh
attempt nonce, the data prepared once) and returns one RunOutcome per run. An executor
(harness/executors.py: local `--jobs N`, ray, slurm) starts the workers; what a run means does not
depend on which: each worker gets its own environment (PYTHONHASHSEED, visible devices, its
threads, the backend's import-time flags), a timeout, and its stderr in logs/; the result counts
only if this attempt wrote it, and a worker that died leaves a failed result with its reason.
Finished runs whose run hash matches are skipped. Ctrl-C or SIGTERM stops the running workers,
keeps every finished run and exits 130; an interrupted run leaves no result. Progress events
(built, epoch) reach the Reporter, from a local worker's pipe or a remote one's progress file.
"""

from __future__ import annotations

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

from harness.executors import (
    Ended,
    ExecutorOptions,
    Launch,
    LocalExecutor,
    RayExecutor,
    SlurmExecutor,
    make_executor,
    read_submitted,
    reap,
    start_worker,
    still_queued,
    terminate,
)
from harness.plan import Plan, init_source, run_status
from harness.progress import Progress
from harness.records import BuiltEvent, EpochEvent, Job, JobData, RunKey, RunResult, StepEvent
from harness.results import (
    RunFileError,
    checkpoint_path,
    init_path,
    parse_progress,
    read_run,
    run_path,
    set_aside,
    write_job,
    write_run,
)
from harness.spec import Spec
from harness.tracking import RunObserver

STDERR_TAIL_LINES = 25


@dataclass
class RunOutcome:
    key: RunKey
    status: str  # ok | failed | skipped | interrupted | submitted (--detach)
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
    parallel: bool = False  # several workers at once: every line names its run
    running: dict[str, str] = field(default_factory=dict)  # run id -> where it stands
    tty: bool | None = None  # progress bars (a terminal) or a line every 30 s (logs); None: ask
    bar: Progress | None = None  # the running epoch's batches (one worker at a time only)
    observer: RunObserver | None = None  # --track: told the same progress
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _line(self, key: RunKey, text: str) -> None:
        with self._lock:
            self.write(f"    {key.id}: {text.strip()}" if self.parallel else text)

    def _running(self) -> str:
        if not self.parallel or not self.running:
            return ""
        return "; running: " + ", ".join(f"{k} ({v})" for k, v in self.running.items())

    def _eta(self) -> str:
        left = self.total - self.done
        if not self.durations or left <= 0:
            return ""
        slots = max(1, len(self.running)) if self.parallel else 1
        mean = sum(self.durations) / len(self.durations)
        return f", about {_fmt_s(left * mean / slots)} left"

    def start(self, key: RunKey) -> None:
        if self.observer is not None:
            self.observer.run_started(key)
        with self._lock:
            self.running[key.id] = "started"
            if not self.quiet:
                self.write(
                    f"[{self.done + len(self.running)}/{self.total}] {key.model} / "
                    f"{key.backend} / seed {key.seed}: started{self._running()}"
                )

    def event(self, key: RunKey, ev: BuiltEvent | EpochEvent | StepEvent) -> None:
        if self.observer is not None and isinstance(ev, EpochEvent):
            self.observer.epoch(key, ev)
        with self._lock:
            if key.id in self.running:
                self.running[key.id] = (
                    "built" if isinstance(ev, BuiltEvent)
                    else f"epoch {ev.epoch}/{ev.epochs}, batch {ev.step}/{ev.steps}"
                    if isinstance(ev, StepEvent)
                    else f"epoch {ev.record.epoch}/{ev.epochs}"
                )
        if self.quiet or (self.parallel and isinstance(ev, StepEvent)):
            return  # several workers: their batches show in the "running:" list
        if isinstance(ev, StepEvent):
            desc = f"epoch {ev.epoch}/{ev.epochs}"
            if self.bar is None or self.bar.desc != desc:
                self.close_bar()
                self.bar = Progress(desc, ev.steps, "batch", tty=self.tty, write=self.write)
            self.bar.update_to(ev.step)
            return
        self.close_bar()
        if isinstance(ev, BuiltEvent):
            if self.verbose:
                p = ev.params
                self._line(key, f"    built: {p.total:,} parameters ({p.trainable:,} trainable)")
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
            self._line(
                key,
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
        self._line(
            key,
            f"    epoch {r.epoch}/{ev.epochs}: loss {r.loss:.4f} acc {r.accuracy:.3f}"
            f"{val_txt} ({r.seconds:.1f} s, run ETA {_fmt_s(left)})"
        )

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, outcome: RunOutcome) -> None:
        self.close_bar()
        if self.observer is not None:
            self.observer.run_finished(outcome.key, outcome.status)
        with self._lock:
            self.running.pop(outcome.key.id, None)
            self.done += 1
            if outcome.status in ("ok", "failed"):
                self.durations.append(outcome.seconds)
            k = outcome.key
            why = f": {outcome.reason}" if outcome.reason else ""
            self.write(
                f"[{self.done}/{self.total}] {k.model} / {k.backend} / seed {k.seed}: "
                f"{outcome.status} ({_fmt_s(outcome.seconds)}){why}{self._eta()}"
                f"{self._running()}"
            )

    def drop(self, key: RunKey) -> None:
        """A run that stopped without an outcome (interrupted)."""
        with self._lock:
            self.running.pop(key.id, None)


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


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


def _tail(path: Path, n: int = STDERR_TAIL_LINES) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def prepare(job: Job, results_dir: Path, env: dict[str, str]) -> Launch:
    """Everything before a worker starts: an older configuration's result kept aside, the job
    file written, the log's folder made."""
    key = job.key
    log = results_dir / "logs" / f"{key.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    _supersede(job.out, job.run_hash)
    job_path = write_job(results_dir, job)
    return Launch(job, job_path, env, log, log.with_suffix(".progress"),
                  job.spec.runtime.timeout_s)


def start_local(launch: Launch, env: dict[str, str], reporter: Reporter,
                stop: threading.Event) -> Ended:
    """One worker process on this machine, its progress piped to the reporter."""
    key, timeout = launch.job.key, launch.timeout_s
    clock = time.monotonic()
    with open(launch.log, "w", encoding="utf-8") as err:
        proc = start_worker(launch.job_path, env, subprocess.PIPE, err)

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
                    terminate(proc)
                    return Ended(proc.returncode, interrupted=True)
                if time.monotonic() - clock > timeout:
                    terminate(proc)
                    return Ended(proc.returncode, timed_out=True)
        finally:
            reap(proc)
            reader.join(timeout=5)
    return Ended(proc.returncode)


def finish(launch: Launch, ended: Ended, started: float) -> RunOutcome:
    """After the worker: always leaves either a complete RunResult or nothing (interrupted)."""
    job, key, log = launch.job, launch.job.key, launch.log
    launch.job_path.unlink(missing_ok=True)
    launch.progress.unlink(missing_ok=True)
    seconds = time.time() - started
    result = _own_result(job)
    if ended.interrupted:
        # a result this attempt finished just before the signal is complete and kept
        if result is not None and job.checkpoint is not None:
            job.checkpoint.unlink(missing_ok=True)
        return RunOutcome(key, result.status if result else "interrupted", seconds, None)
    if result is not None:  # written by this attempt, even if it then overran at exit
        if job.checkpoint is not None:  # done with it; a worker that died keeps its own
            job.checkpoint.unlink(missing_ok=True)
        if result.error is None:
            return RunOutcome(key, result.status, seconds, None)
        write_run(job.out, result.with_stderr_tail(_tail(log)))
        return RunOutcome(key, result.status, seconds, result.error.reason)
    # the worker died without a result: record why
    rc = ended.returncode
    if ended.timed_out:
        reason = f"timeout: exceeded runtime.timeout_s = {launch.timeout_s:g} s"
    elif rc is not None and rc < 0:
        reason = f"worker killed by signal {signal.Signals(-rc).name}"
    elif rc is None:
        reason = "worker lost: its task or job ended without running it to the end"
    else:
        reason = f"worker exited with code {rc} without a result"
    write_run(job.out, RunResult.failed(job, reason, "WorkerDied", _tail(log), started=started))
    return RunOutcome(key, "failed", seconds, reason)


def run_one(
    job: Job,
    results_dir: Path,
    env: dict[str, str],
    reporter: Reporter,
    stop: threading.Event,
) -> RunOutcome:
    """Run one job in a local worker; always leaves either a complete RunResult or nothing."""
    launch = prepare(job, results_dir, env)
    t0 = time.time()
    reporter.start(job.key)
    return finish(launch, start_local(launch, env, reporter, stop), t0)


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
        dest = set_aside(out, "unreadable")  # a second bad copy never replaces the first
        print(f"warning: {e}; moved to {dest}", file=sys.stderr)
        return
    if old is None or old.run_hash == new_hash or old.status != "ok":
        return
    dest = out.parent / "superseded" / f"{out.stem}.{old.run_hash}.json"
    dest.parent.mkdir(exist_ok=True)
    os.replace(out, dest)


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
    executor: ExecutorOptions | LocalExecutor | RayExecutor | SlurmExecutor | None = None,
    observer: RunObserver | None = None,
) -> list[RunOutcome]:
    """Run every selected run of the plan not already done, through `executor` (default: local,
    one worker at a time), telling `observer` (--track) the progress; Ctrl-C/SIGTERM raises
    KeyboardInterrupt after cleanup."""
    if plan.data_hash is None:
        raise ValueError("run_all needs a plan with its data (Plan.with_data)")
    if executor is None or isinstance(executor, ExecutorOptions):
        executor = make_executor(executor or ExecutorOptions(), plan.spec.runtime.device,
                                 results_dir)
    status = run_status(plan, results_dir)
    todo = []
    outcomes = []
    for key in plan.selected:
        if not fresh and status[key.id] == "done":
            outcomes.append(RunOutcome(key, "skipped", 0.0, "already done"))
            # killed between writing the result and removing the training state: done with it
            checkpoint_path(results_dir, key.id).unlink(missing_ok=True)
        else:
            todo.append(key)
    parallel = not isinstance(executor, LocalExecutor) or executor.jobs > 1
    reporter = Reporter(quiet=quiet, verbose=verbose, total=len(todo), parallel=parallel,
                        observer=observer)
    if outcomes and not quiet:
        print(
            f"{len(outcomes)} run(s) already done (same spec, data and code): skipped; "
            "--fresh reruns them"
        )
    stop = threading.Event()
    with _stop_on_signals(stop):
        if not fresh:
            todo = _await_submitted(plan, todo, results_dir, reporter, outcomes, stop)
        if isinstance(executor, LocalExecutor) and executor.jobs > 1 and not quiet:
            threads = executor.threads
            print(f"local executor: {executor.jobs} workers at once"
                  + (f", {threads} thread(s) each" if threads else "")
                  + (f", GPUs {','.join(executor.gpus)}" if executor.gpus else ""))
        launches = []
        for key in todo:
            job = make_job(plan, key, data, results_dir)
            if fresh and job.checkpoint is not None:
                job.checkpoint.unlink(missing_ok=True)  # --fresh redoes the whole run
            launches.append(prepare(job, results_dir, worker_env(plan.spec, key, cache_dir)))
        started: dict[str, float] = {}
        remote = not isinstance(executor, LocalExecutor)
        if remote:  # submitted at once; the clock includes the queue
            for launch in launches:
                started[launch.job.key.id] = time.time()
                reporter.start(launch.job.key)

        def start(launch: Launch, env: dict[str, str]) -> Ended:
            started[launch.job.key.id] = time.time()
            reporter.start(launch.job.key)
            return start_local(launch, env, reporter, stop)

        def done(launch: Launch, ended: Ended) -> None:
            outcome = finish(launch, ended, started[launch.job.key.id])
            if outcome.status == "interrupted":
                reporter.drop(launch.job.key)
                print(f"interrupted: {launch.job.key.id} stopped; its partial work is discarded",
                      file=sys.stderr)
            else:
                reporter.finish(outcome)
                outcomes.append(outcome)

        def event(launch: Launch, line: str) -> None:
            try:
                ev = parse_progress(line)
            except Exception:  # noqa: BLE001 - progress display is best effort
                return
            if ev is not None:
                reporter.event(launch.job.key, ev)

        try:
            if launches:
                executor.run(launches, start, done, event, stop)
        finally:
            finished = {o.key.id for o in outcomes}
            for launch in launches:  # never started (Ctrl-C): no job file left behind
                if launch.job.key.id not in started and launch.job.key.id not in finished:
                    launch.job_path.unlink(missing_ok=True)
        if isinstance(executor, SlurmExecutor) and executor.detach:
            for launch in launches:
                reporter.drop(launch.job.key)
                outcomes.append(RunOutcome(launch.job.key, "submitted", 0.0, None))
        if stop.is_set():
            raise KeyboardInterrupt
    return outcomes


def _await_submitted(plan: Plan, todo: list[RunKey], results_dir: Path, reporter: Reporter,
                     outcomes: list[RunOutcome], stop: threading.Event) -> list[RunKey]:
    """Runs an earlier `--detach` submitted that are still queued or running: wait for their
    results instead of submitting them again. Returns the runs still to do."""
    submitted = read_submitted(results_dir)
    waiting = {key.id: key for key in todo
               if submitted.get(key.id, {}).get("run_hash") == plan.run_hashes[key.id]
               and still_queued(submitted[key.id])}
    if not waiting:
        return todo
    print(f"waiting for {len(waiting)} run(s) submitted earlier (--detach): "
          f"{', '.join(waiting)}")
    t0 = time.time()
    while waiting and not stop.is_set():
        for run_id, key in list(waiting.items()):
            entry = submitted[run_id]
            try:
                run = read_run(run_path(results_dir, run_id))
            except RunFileError:
                run = None
            if run is not None and run.attempt == entry.get("attempt"):
                del waiting[run_id]
                reason = run.error.reason if run.error else None
                outcome = RunOutcome(key, run.status, time.time() - t0, reason)
                reporter.finish(outcome)
                outcomes.append(outcome)
            elif not still_queued(entry):
                del waiting[run_id]  # gone without a result: run it again
        stop.wait(1.0)
    if stop.is_set():
        raise KeyboardInterrupt
    done = {o.key.id for o in outcomes}
    return [key for key in todo if key.id not in done]
