"""Results on disk: one RunResult JSON per run, written atomically; the results folder layout.

    results/<spec-name>/
        report.md  metrics.csv  spec.json  data.json  plan.json
        runs/<model>__<backend>__seed<k>.json       one RunResult each
        logs/<run id>.log                            the worker's stderr
        checkpoints/<run id>.npz                     a running run's last epoch (removed after)
        init/<model>__seed<k>.npz                    runtime.init shared: the initial weights

This module alone turns the records of harness/records.py into JSON and back: RunResult files,
job files and the worker's progress lines. A RunResult is only ever read once complete: files are
written to a temp file, fsynced and renamed, so a run file that does not parse is damaged (a
truncated copy, a full disk, an edit): RunFileError, reported and kept aside; one that lacks the
completion marker is not a result. A complete file of an older schema is migrated on
reading; one this harness cannot read raises RunFileError, naming the file and why.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydantic import TypeAdapter, ValidationError

from harness.errors import UserError
from harness.records import (
    BuiltEvent,
    EpochEvent,
    EpochRecord,
    Job,
    ProgressEvent,
    RunResult,
    StepEvent,
    TrainState,
)

# 2: error.message became error.reason; every field typed (harness.records.RunResult).
SCHEMA_VERSION = 2
READS = (1, 2)  # schemas read_run understands (older ones are migrated on reading)
PROGRESS_PREFIX = "@@progress "


class RunFileError(ValueError):
    """A complete run file that is not a RunResult this harness can read (newer harness,
    edited by hand, ...). It is reported and kept aside, never read as a result."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """temp file + fsync + rename: a reader never sees half a file, a kill leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def set_aside(path: Path, tag: str = "corrupt") -> Path:
    """Move a file this harness cannot read out of the way, never over an earlier one:
    <folder>/superseded/<name>.<tag><suffix>, then <name>.<tag>.2<suffix>, ...: the first free."""
    folder = path.parent / "superseded"
    folder.mkdir(exist_ok=True)
    n = 1
    while True:
        dest = folder / f"{path.stem}.{tag}{f'.{n}' if n > 1 else ''}{path.suffix}"
        try:
            os.link(path, dest)  # fails if dest exists: no race with another copy
        except FileExistsError:
            n += 1
            continue
        except OSError:  # no hard links here (some filesystems): rename when free
            if dest.exists():
                n += 1
                continue
            os.replace(path, dest)
            return dest
        path.unlink()
        return dest


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object in `path`, None), (None, None) when there is no file, or (None, what is
    wrong) when it is corrupt; a corrupt file is set aside (set_aside) so it is never lost."""
    if not path.exists():
        return None, None
    try:
        value = read_json(path)
    except OSError as e:
        return None, f"{path}: cannot be read ({e.strerror or e})"
    except ValueError as e:
        reason = f"not valid JSON ({e})"
    else:
        if isinstance(value, dict):
            return value, None
        reason = f"not a JSON object (found {type(value).__name__})"
    try:
        dest = set_aside(path)
    except OSError as e:
        return None, f"{path}: corrupt, {reason}; could not be moved aside ({e.strerror or e})"
    return None, f"{path}: corrupt, {reason}; kept as {dest}"


# ---------------------------------------------------------------------------------------------
# RunResult files


def run_to_json(result: RunResult) -> dict[str, Any]:
    """The file's content: the record plus its schema, id and the completion marker."""
    # python mode, not "json": that would turn NaN inside resources or environment into null
    return {"schema": SCHEMA_VERSION, "run_id": result.run_id, "complete": True,
            **result.model_dump()}


def run_from_json(obj: Any, where: Path | str = "run") -> RunResult:
    """A RunResult from a parsed file (older schemas migrated); RunFileError otherwise."""
    if not isinstance(obj, dict):
        raise RunFileError(where, f"expected a JSON object; got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema not in READS:
        raise RunFileError(
            where,
            f"RunResult schema {schema!r}; this harness reads schema "
            f"{', '.join(map(str, READS))}. Kept as is; rerun with the harness that wrote it, "
            "or delete it to rerun the run",
        )
    fields = {k: v for k, v in obj.items() if k not in ("schema", "run_id", "complete")}
    if schema == 1:
        fields = _from_schema_1(fields)
    try:
        result = RunResult.model_validate(fields)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        at = ".".join(str(x) for x in first["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RunFileError(where, f"not a valid RunResult: {at}: {first['msg']}{more}") from None
    if "run_id" in obj and obj["run_id"] != result.run_id:
        raise RunFileError(where, f"run_id {obj['run_id']!r} does not match its key "
                                  f"({result.run_id})")
    return result


def _from_schema_1(fields: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (hand-built dicts): error.message -> error.reason; a stderr tail at the top
    level moves into the error."""
    out = dict(fields)
    tail = out.pop("stderr_tail", None)
    error = out.get("error")
    if isinstance(error, dict):
        error = dict(error)
        if "message" in error:
            error["reason"] = error.pop("message")
        if tail is not None and "stderr_tail" not in error:
            error["stderr_tail"] = tail
        out["error"] = error
    return out


def run_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / "runs" / f"{run_id}.json"


def write_run(path: Path, result: RunResult) -> None:
    write_json_atomic(path, run_to_json(result))


def read_run(path: Path) -> RunResult | None:
    """The complete RunResult at `path`; None when there is none (missing, or a half-written
    file without the completion marker); RunFileError for a complete file it cannot read."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or e})") from None
    try:
        obj = json.loads(text.decode("utf-8"))
    except ValueError as e:  # results are renamed into place whole: this is damage, not a writer
        raise RunFileError(
            path, f"not valid JSON (truncated or damaged: {e}); kept aside, its run is rerun"
        ) from None
    if not isinstance(obj, dict) or obj.get("complete") is not True:
        return None
    return run_from_json(obj, path)


def read_runs(results_dir: Path) -> tuple[list[RunResult], list[RunFileError]]:
    """Every complete RunResult of runs/, and the complete files that could not be read."""
    runs_dir = results_dir / "runs"
    if not runs_dir.is_dir():
        return [], []
    runs, problems = [], []
    for p in sorted(runs_dir.glob("*.json")):
        try:
            run = read_run(p)
        except RunFileError as e:
            problems.append(e)
            continue
        if run is not None:
            runs.append(run)
    return runs, problems


# ---------------------------------------------------------------------------------------------
# Jobs, progress lines, the plan


def write_job(folder: Path, job: Job) -> Path:
    """The job file a worker reads, under a temp name (clean_temp_files removes leftovers)."""
    fd, name = tempfile.mkstemp(prefix=".job.", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(job.model_dump(mode="json"), f)
    return Path(name)


def read_job(path: Path) -> Job:
    return Job.model_validate(read_json(path))


_PROGRESS: TypeAdapter[ProgressEvent] = TypeAdapter(ProgressEvent)


def progress_line(event: BuiltEvent | EpochEvent | StepEvent) -> str:
    """One line of the worker's stdout for the runner."""
    return PROGRESS_PREFIX + json.dumps(event.model_dump(), allow_nan=True)


def parse_progress(line: str) -> BuiltEvent | EpochEvent | StepEvent | None:
    """The event of a progress line; None for any other line (the frameworks' output)."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    return _PROGRESS.validate_python(json.loads(line[len(PROGRESS_PREFIX) :]))


def write_plan(results_dir: Path, data_hash: str, run_hashes: Mapping[str, str]) -> None:
    """plan.json: the run hash of every run the current spec plans (analyze counts only these)."""
    write_json_atomic(
        results_dir / "plan.json", {"data_hash": data_hash, "runs": dict(run_hashes)}
    )


def checkpoint_path(results_dir: Path, run_id: str) -> Path:
    return results_dir / "checkpoints" / f"{run_id}.npz"


def init_path(results_dir: Path, model: str, seed: int) -> Path:
    return results_dir / "init" / f"{model}__seed{seed}.npz"


def write_arrays_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz of `arrays`, atomically (temp file + fsync + rename): a kill at any moment
    leaves the previous file or this one, never half of one."""
    # numpy's stub types **kwds as bool
    _write_atomic(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def read_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz written by write_arrays_atomic; None when missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def write_checkpoint(path: Path, run_hash: str, state: TrainState) -> None:
    """The training state after `state.epoch` epochs (one file per run, replaced each time)."""
    meta = {"run_hash": run_hash, "epoch": state.epoch,
            "history": [h.to_dict() for h in state.history], "recipe": state.recipe}
    arrays = {f"backend/{k}": v for k, v in state.backend.items()}
    for policy, weights in state.kept.items():
        arrays.update({f"kept/{policy}/{k}": v for k, v in weights.items()})
    write_arrays_atomic(path, {**arrays, "meta": np.array(json.dumps(meta, allow_nan=True))})


def read_checkpoint(path: Path, run_hash: str) -> TrainState | None:
    """The state a checkpoint holds when it belongs to this very run (same run hash); None
    when there is none, or it is of another configuration or unreadable (the run starts over)."""
    arrays = read_arrays(path)
    try:
        meta = json.loads(str(arrays["meta"])) if arrays is not None else {}
    except (KeyError, ValueError):  # not one of ours
        return None
    if arrays is None or meta.get("run_hash") != run_hash:
        return None
    backend = {k.removeprefix("backend/"): v for k, v in arrays.items() if k.startswith("backend/")}
    kept: dict[str, dict[str, np.ndarray]] = {}
    for k, v in arrays.items():
        if k.startswith("kept/"):
            policy, name = k.removeprefix("kept/").split("/", 1)
            kept.setdefault(policy, {})[name] = v
    history = tuple(EpochRecord(**h) for h in meta["history"])
    return TrainState(int(meta["epoch"]), history, backend, meta.get("recipe", {}), kept)


def clean_temp_files(results_dir: Path) -> int:
    """Remove the temp files this module and the runner leave when killed; returns how many.
    Only their own names, only in the results folder and runs/: --out may be a shared folder."""
    n = 0
    for folder in (results_dir, results_dir / "runs", results_dir / "checkpoints"):
        for pattern in (".*.tmp", ".job.*.json"):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
                n += 1
    return n


# folders the harness never writes into, whatever --out says
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib32",
                  "/lib64", "/usr", "/run", "/var/run")


def check_results_dir(folder: Path, option: str = "--out") -> None:
    """Refuse a results folder that cannot or must not be written, before anything starts:
    the root folder, a system folder, a file, a folder this user cannot write."""
    resolved = folder.expanduser().resolve()
    what = None
    if resolved == Path(resolved.anchor):
        what = "the root folder"
    elif any(resolved == Path(s) or Path(s) in resolved.parents for s in SYSTEM_FOLDERS):
        what = "a system folder"
    elif resolved.exists() and not resolved.is_dir():
        what = "a file, not a folder"
    else:
        ancestor = resolved
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            what = f"under {ancestor}, which is a file"
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            what = ("not writable by this user" if ancestor == resolved
                    else f"under {ancestor}, which this user cannot write")
    if what is not None:
        raise UserError(
            f"{option}: {folder} is {what}; name a folder of your own for the results "
            "(default: results/<spec name>)"
        )


@contextmanager
def results_lock(results_dir: Path) -> Iterator[None]:
    """One harness process per results folder; a second one gets a clear error."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{results_dir}: cannot create the results folder: {e.strerror}") from None
    lock_path = results_dir / ".lock"
    try:
        f = open(lock_path, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as e:
        raise UserError(
            f"{results_dir}: cannot write in the results folder ({e.strerror or e}); "
            "pass --out with a writable folder"
        ) from None
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
