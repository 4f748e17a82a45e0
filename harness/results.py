"""Results on disk: one RunResult JSON per run, written atomically; the results folder layout.

    results/<spec-name>/
        report.md  metrics.csv  spec.json  data.json  plan.json
        runs/<model>__<backend>__seed<k>.json       one RunResult each
        logs/<run id>.log                            the worker's stderr

A RunResult is only ever read once complete: files are written to a temp file, fsynced and
renamed; a file that does not parse, or lacks the completion marker, is ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import UserError

SCHEMA_VERSION = 1


def write_text_atomic(path: Path, text: str) -> None:
    """temp file + fsync + rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_run(path: Path) -> dict[str, Any] | None:
    """A complete RunResult, or None for anything unreadable or incomplete."""
    try:
        run = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("complete") is not True:
        return None
    return run


def read_runs(results_dir: Path) -> list[dict[str, Any]]:
    runs_dir = results_dir / "runs"
    if not runs_dir.is_dir():
        return []
    out = []
    for p in sorted(runs_dir.glob("*.json")):
        run = read_run(p)
        if run is not None:
            out.append(run)
    return out


def clean_temp_files(results_dir: Path) -> int:
    """Remove the temp files this module and the runner leave when killed; returns how many.
    Only their own names, only in the results folder and runs/: --out may be a shared folder."""
    n = 0
    for folder in (results_dir, results_dir / "runs"):
        for pattern in (".*.tmp", ".job.*.json"):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
                n += 1
    return n


@contextmanager
def results_lock(results_dir: Path) -> Iterator[None]:
    """One harness process per results folder; a second one gets a clear error."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{results_dir}: cannot create the results folder: {e.strerror}") from None
    lock_path = results_dir / ".lock"
    f = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"{results_dir}: another harness process (pid {holder}) is using this "
                "results folder",
                "wait for it to finish, or pass --out to write elsewhere",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()
