"""The runner: one fresh worker process per run, results as files, resumable.

    python -m harness run specs/demo.yaml [--models cnn --backends torch --seeds 0 --fresh]

Runs are sequential on this machine (one GPU, or the CPU). Each worker gets its own environment
(PYTHONHASHSEED, visible devices, the backend's import-time flags), a timeout, and its stderr in
logs/. Finished runs whose run hash matches are skipped. Ctrl-C or SIGTERM stops the worker,
keeps every finished run and exits 130; the interrupted run leaves no result.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.plan import RunKey, run_hash, training_code_version
from harness.results import read_run, write_json_atomic
from harness.spec import Spec, spec_digest

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

    def _eta(self) -> str:
        left = self.total - self.done
        if not self.durations or left <= 0:
            return ""
        return f", about {_fmt_s(left * sum(self.durations) / len(self.durations))} left"

    def start(self, key: RunKey) -> None:
        if not self.quiet:
            self.write(
                f"[{self.done + 1}/{self.total}] {key.model} / {key.backend} / "
                f"seed {key.seed}: started"
            )

    def event(self, key: RunKey, ev: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.verbose and ev.get("event") == "built":
            p = ev.get("params", {})
            self.write(
                f"    built: {p.get('total', 0):,} parameters ({p.get('trainable', 0):,} trainable)"
            )
        if ev.get("event") != "epoch":
            return
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
            self.write(
                "    epoch {}/{}: {} ({:.1f} s, train {:.1f} s)".format(
                    ev["epoch"],
                    ev["epochs"],
                    " ".join(f"{f} {ev[f]:.4f}" for f in fields if isinstance(ev.get(f), float)),
                    ev["seconds"],
                    ev.get("train_seconds", float("nan")),
                )
            )
            return
        left = (ev["epochs"] - ev["epoch"]) * ev["seconds"]
        val = ev.get("val_accuracy")
        val_txt = f" val_acc {val:.3f}" if isinstance(val, float) else ""
        self.write(
            f"    epoch {ev['epoch']}/{ev['epochs']}: loss {ev['loss']:.4f} "
            f"acc {ev['accuracy']:.3f}"
            f"{val_txt} ({ev['seconds']:.1f} s, run ETA {_fmt_s(left)})"
        )

    def finish(self, outcome: RunOutcome) -> None:
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
    spec: Spec,
    key: RunKey,
    job_base: dict[str, Any],
    results_dir: Path,
    reporter: Reporter,
    stop: threading.Event,
) -> RunOutcome:
    """Run one key in a worker; always leaves either a complete RunResult or nothing."""
    out = results_dir / "runs" / f"{key.id}.json"
    log = results_dir / "logs" / f"{key.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = {
        **job_base,
        "key": {"model": key.model, "backend": key.backend, "seed": key.seed},
        "run_id": key.id,
        "run_hash": job_base["hashes"][key.id],
        "attempt": uuid.uuid4().hex,  # a result counts only if this attempt wrote it
        "code_version": training_code_version(key.backend),
        "out": str(out),
    }
    job.pop("hashes")
    _supersede(out, job["run_hash"])
    fd, job_path = tempfile.mkstemp(prefix=".job.", suffix=".json", dir=results_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(job, f)
    t0 = time.time()
    clock = time.monotonic()
    reporter.start(key)
    timeout = spec.runtime.timeout_s
    timed_out = False
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker", job_path],
            stdout=subprocess.PIPE,
            stderr=err,
            env=worker_env(spec, key, Path(job_base["cache_dir"])),
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # Ctrl-C reaches the harness, which stops the worker
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:  # never stop draining the pipe, or the worker blocks on a full pipe
                    if line.startswith("@@progress "):
                        reporter.event(key, json.loads(line[len("@@progress ") :]))
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
            Path(job_path).unlink(missing_ok=True)
            # a result this attempt finished just before the signal is complete and kept
            finished = _own_result(out, job)
            status = finished["status"] if finished else "interrupted"
            return RunOutcome(key, status, time.time() - t0, None)
        finally:
            _reap(proc)
            reader.join(timeout=5)
    Path(job_path).unlink(missing_ok=True)
    seconds = time.time() - t0
    result = _own_result(out, job)
    if result is not None:  # written by this attempt, even if it then overran at exit
        reason = None if result["status"] == "ok" else result.get("error", {}).get("message")
        if result["status"] != "ok":
            result.setdefault("error", {})["stderr_tail"] = _tail(log)
            write_json_atomic(out, result)
        return RunOutcome(key, result["status"], seconds, reason)
    # the worker died without a result: record why
    rc = proc.returncode
    if timed_out:
        reason = f"timeout: exceeded runtime.timeout_s = {timeout:g} s"
    elif rc is not None and rc < 0:
        reason = f"worker killed by signal {signal.Signals(-rc).name}"
    else:
        reason = f"worker exited with code {rc} without a result"
    from harness.worker import envelope

    write_json_atomic(
        out,
        envelope(
            {**job, "started": t0},
            "failed",
            error={"type": "WorkerDied", "message": reason, "stderr_tail": _tail(log)},
        ),
    )
    return RunOutcome(key, "failed", seconds, reason)


def _own_result(out: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The complete result written by this very attempt (not one left by an earlier one)."""
    run = read_run(out)
    if run and run.get("run_hash") == job["run_hash"] and run.get("attempt") == job["attempt"]:
        return run
    return None


def _supersede(out: Path, new_hash: str) -> None:
    """Keep a finished result of another configuration instead of overwriting it."""
    old = read_run(out)
    if old is not None and old.get("run_hash") != new_hash and old.get("status") == "ok":
        dest = out.parent / "superseded" / f"{out.stem}.{old.get('run_hash')}.json"
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


def plan_status(
    spec: Spec, keys: list[RunKey], results_dir: Path, data_hash: str | None
) -> dict[str, str]:
    """For each run id: done | failed | stale (older spec or code) | pending | unknown."""
    status = {}
    for key in keys:
        run = read_run(results_dir / "runs" / f"{key.id}.json")
        if run is None:
            status[key.id] = "pending"
        elif data_hash is None:
            status[key.id] = "unknown (data not available)"
        elif run.get("run_hash") != run_hash(spec, key, data_hash):
            status[key.id] = "stale"
        else:
            status[key.id] = "done" if run.get("status") == "ok" else "failed"
    return status


def run_all(
    spec: Spec,
    keys: list[RunKey],
    results_dir: Path,
    cache_dir: Path,
    data_hash: str,
    fresh: bool = False,
    quiet: bool = False,
    verbose: bool = False,
) -> list[RunOutcome]:
    """Run every key not already done; Ctrl-C/SIGTERM raises KeyboardInterrupt after cleanup."""
    hashes = {k.id: run_hash(spec, k, data_hash) for k in keys}
    job_base = {
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec_digest(spec)[:20],
        "data_hash": data_hash,
        "cache_dir": str(cache_dir),
        "command": ["python", "-m", "harness", *sys.argv[1:]],
        "hashes": hashes,
    }
    todo = []
    outcomes = []
    for key in keys:
        run = read_run(results_dir / "runs" / f"{key.id}.json")
        if (
            not fresh
            and run
            and run.get("run_hash") == hashes[key.id]
            and run.get("status") == "ok"
        ):
            outcomes.append(RunOutcome(key, "skipped", 0.0, "already done"))
        else:
            todo.append(key)
    reporter = Reporter(quiet=quiet, verbose=verbose, total=len(todo))
    if outcomes and not quiet:
        print(
            f"{len(outcomes)} run(s) already done (same spec, data and code): skipped; "
            "--fresh reruns them"
        )
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: stop.set())
    try:
        for key in todo:
            outcome = run_one(spec, key, job_base, results_dir, reporter, stop)
            if outcome.status == "interrupted":
                print(
                    f"interrupted: {key.id} stopped; its partial work is discarded", file=sys.stderr
                )
            else:
                reporter.finish(outcome)
                outcomes.append(outcome)
            if stop.is_set():
                raise KeyboardInterrupt
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return outcomes
