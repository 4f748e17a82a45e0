"""Typed records and their files: exact JSON round trips, failed results, old and corrupt files.

    .venv/bin/python -m pytest tests/test_records.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from harness.analyze import analyze, load_bundle
from harness.records import (
    BuiltEvent,
    EpochEvent,
    EpochRecord,
    Job,
    JobData,
    RunError,
    RunKey,
    RunResult,
    TestPredictions,
)
from harness.results import (
    SCHEMA_VERSION,
    RunFileError,
    parse_progress,
    progress_line,
    read_job,
    read_run,
    read_runs,
    run_from_json,
    write_job,
    write_json_atomic,
    write_run,
)
from harness.spec import ParamCounts, load_spec

ROOT = Path(__file__).resolve().parent.parent
# floats whose shortest repr is long, subnormal, or next to 0 and 1
AWKWARD = (0.1 + 0.2, 5e-324, 2.2250738585072014e-308, 1 - 2**-53, 2**-1074 * 3, 1 / 3, 0.0)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    out = tmp_path_factory.mktemp("records") / "runs" / "cnn__torch__seed1.json"
    return Job(
        spec=load_spec(ROOT / "specs" / "demo.yaml"),
        key=RunKey("cnn", "torch", 1),
        run_hash="r" * 20,
        attempt="a" * 32,
        spec_hash="s" * 20,
        data_hash="d" * 32,
        code_version="c" * 16,
        data=JobData(
            cache_folder=Path("/cache/images/0123456789abcdef"),
            cache_content="p" * 64,
            labels=(0, 1, 1, 0),
            train=(3, 0),
            val=(1,),
            test=(2,),
            test_patient=("patient00001",),
            test_study=("patient00001/study1",),
        ),
        out=out,
        command=("python", "-m", "harness", "run", "specs/demo.yaml"),
    )


def epoch(e: int, loss: float = 0.5) -> EpochRecord:
    return EpochRecord(e, loss, 0.7, 0.6, 0.5, 0.4, None, 0.3, None, 2.5, 2.0, 96,
                       1.25 if e == 1 else None)


def ok_result(job: Job, probs: tuple[float, ...] = AWKWARD) -> RunResult:
    n = len(probs)
    return RunResult.ok(
        job,
        TestPredictions(rows=tuple(range(10, 10 + n)), labels=tuple(i % 2 for i in range(n)),
                        probs=probs, patient=tuple(f"p{i // 2}" for i in range(n)),
                        study=tuple(f"p{i // 2}/s{i}" for i in range(n))),
        history=(epoch(1), epoch(2)),
        params=ParamCounts(total=10, trainable=8, non_trainable=2),
        environment={"name": "torch", "versions": {"torch": "2.5"}},
        resources={"phases_s": {"train": 3.5}, "odd": float("nan")},
        provenance={"git": {"commit": "abc"}},
        started=1_700_000_000.25,
    )


def test_a_run_result_round_trips_exactly_through_its_file(job: Job) -> None:
    result = ok_result(job)
    write_run(job.out, result)
    back = read_run(job.out)
    assert back is not None
    # bit-exact probabilities: same IEEE-754 bits, not just close
    assert [p.hex() for p in back.test.probs] == [p.hex() for p in AWKWARD]
    assert back.history == result.history and back.params == result.params
    assert back.key == RunKey("cnn", "torch", 1) and back.run_id == "cnn__torch__seed1"
    assert math.isnan(back.resources["odd"])  # NaN stays NaN, not null
    assert back.model_copy(update={"resources": {}}) == result.model_copy(update={"resources": {}})


def test_random_probabilities_round_trip_bit_exact(job: Job) -> None:
    probs = tuple(np.random.default_rng(0).random(2000).tolist())
    write_run(job.out, ok_result(job, probs))
    back = read_run(job.out)
    assert np.array_equal(np.asarray(back.test.probs).view(np.uint64),
                          np.asarray(probs).view(np.uint64))


def test_a_nan_loss_history_round_trips(job: Job) -> None:
    failed = RunResult.failed(job, "loss became NaN", "FloatingPointError",
                              history=(epoch(1), epoch(2, float("nan"))))
    write_run(job.out, failed)
    back = read_run(job.out)
    assert back.history[0] == epoch(1)
    assert math.isnan(back.history[1].loss) and back.history[1].epoch == 2


def test_the_file_holds_schema_id_and_completion_marker(job: Job) -> None:
    write_run(job.out, ok_result(job))
    raw = json.loads(job.out.read_text())
    assert (raw["schema"], raw["run_id"], raw["complete"]) == (2, "cnn__torch__seed1", True)
    assert SCHEMA_VERSION == 2
    assert raw["error"] is None and raw["status"] == "ok"
    assert raw["key"] == {"model": "cnn", "backend": "torch", "seed": 1}
    assert raw["history"][0]["first_step_seconds"] == 1.25


def test_failed_takes_its_identity_from_the_job(job: Job) -> None:
    r = RunResult.failed(job, "worker killed by signal SIGKILL", "WorkerDied", "line 1\nline 2",
                         started=12.5)
    assert (r.key, r.run_hash, r.attempt, r.spec_name, r.spec_hash, r.data_hash,
            r.code_version) == (job.key, "r" * 20, "a" * 32, "demo", "s" * 20, "d" * 32,
                                "c" * 16)
    assert (r.status, r.test, r.history, r.started) == ("failed", None, (), 12.5)
    assert r.error == RunError(type="WorkerDied", reason="worker killed by signal SIGKILL",
                               stderr_tail="line 1\nline 2")
    tailed = r.with_stderr_tail("Traceback\nRuntimeError: x")
    assert tailed.error.stderr_tail == "Traceback\nRuntimeError: x"
    assert tailed.error.reason == r.error.reason and r.error.stderr_tail == "line 1\nline 2"


def test_inconsistent_records_are_refused(job: Job) -> None:
    with pytest.raises(ValidationError, match="status ok needs test predictions and no error"):
        RunResult(**{**RunResult.failed(job, "x").model_dump(), "status": "ok"})
    with pytest.raises(ValidationError, match="status failed needs an error"):
        RunResult(**{**ok_result(job).model_dump(), "status": "failed", "test": None})
    with pytest.raises(ValidationError, match=r"rows \(2\), labels \(2\), probs \(1\), patient "
                                              r"\(2\) and study \(2\) differ in length"):
        TestPredictions(rows=(1, 2), labels=(0, 1), probs=(0.5,), patient=("a", "b"),
                        study=("a/1", "b/1"))
    with pytest.raises(ValidationError, match="test groups do not match the 1 test rows"):
        JobData(**{**job.data.model_dump(), "test_study": ()})
    with pytest.raises(ValidationError, match="frozen"):
        job.data.labels = ()  # type: ignore[misc]


def test_a_job_round_trips_through_its_file(job: Job, tmp_path: Path) -> None:
    path = write_job(tmp_path, job)
    assert path.name.startswith(".job.") and path.suffix == ".json"
    # equal field by field (the spec's private source path is not part of the record)
    assert read_job(path).model_dump() == job.model_dump()


def test_progress_lines_round_trip() -> None:
    built = BuiltEvent(params=ParamCounts(total=3, trainable=2, non_trainable=1))
    ep = EpochEvent(epochs=12, record=epoch(1, float("nan")))
    assert progress_line(built) == ('@@progress {"event": "built", "params": {"total": 3, '
                                    '"trainable": 2, "non_trainable": 1}}')
    assert parse_progress(progress_line(built) + "\n") == built
    back = parse_progress(progress_line(ep))
    assert isinstance(back, EpochEvent) and back.epochs == 12
    assert math.isnan(back.record.loss) and back.record.images == 96
    assert parse_progress("Epoch 1/12 - loss: 0.5\n") is None


# ---------------------------------------------------------------------------------------------
# Old and corrupt files

SCHEMA_1_FAILED = {
    "schema": 1, "run_id": "cnn__torch__seed1", "key": {"model": "cnn", "backend": "torch",
                                                        "seed": 1},
    "run_hash": "h1", "attempt": None, "spec_name": "demo", "spec_hash": "s", "data_hash": "d",
    "code_version": "c", "status": "failed", "started": 1.0, "finished": 2.0, "complete": True,
    "error": {"type": "WorkerDied", "message": "worker killed by signal SIGKILL",
              "stderr_tail": "last line"},
}


def test_a_schema_1_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "cnn__torch__seed1.json"
    write_json_atomic(path, SCHEMA_1_FAILED)
    run = read_run(path)
    assert run.error == RunError(type="WorkerDied", reason="worker killed by signal SIGKILL",
                                 stderr_tail="last line")
    assert (run.attempt, run.finished, run.history, run.params) == (None, 2.0, (), None)
    old_tail = {**SCHEMA_1_FAILED, "error": {"type": "RuntimeError", "message": "boom"},
                "stderr_tail": "from the top level"}
    assert run_from_json(old_tail).error.stderr_tail == "from the top level"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"schema": 99}, "RunResult schema 99; this harness reads schema 1, 2. Kept as is; rerun "
                         "with the harness that wrote it, or delete it to rerun the run"),
        ({"schema": None}, "RunResult schema None; this harness reads schema 1, 2."),
        ({"status": "done"}, "not a valid RunResult: status: Input should be 'ok' or 'failed'"),
        ({"key": {"model": "cnn", "backend": "torch"}}, "not a valid RunResult: key.seed: "),
        ({"run_id": "cnn__torch__seed2"},
         "run_id 'cnn__torch__seed2' does not match its key (cnn__torch__seed1)"),
        ({"surprise": 1}, "not a valid RunResult: surprise: Extra inputs are not permitted"),
        ({"surprise": 1, "finished": "late"},
         "not a valid RunResult: finished: Input should be a valid number, unable to parse "
         "string as a number (and 1 more)"),
    ],
)
def test_a_complete_file_it_cannot_read_is_reported_with_its_path(
    tmp_path: Path, change: dict, reason: str
) -> None:
    path = tmp_path / "cnn__torch__seed1.json"
    write_json_atomic(path, {**SCHEMA_1_FAILED, **change})
    with pytest.raises(RunFileError) as e:
        read_run(path)
    assert str(e.value).startswith(f"{path}: {reason}")
    assert e.value.path == path


@pytest.mark.parametrize(
    "text",
    ['{"status": "ok", "comp', "", '{"status": "ok"}', json.dumps({**SCHEMA_1_FAILED,
                                                                  "complete": False}), "[1, 2]"],
)
def test_incomplete_or_truncated_files_are_not_results(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(text)
    assert read_run(path) is None
    assert read_run(tmp_path / "missing.json") is None


def test_load_bundle_lists_unreadable_run_files_as_ignored(tmp_path: Path, job: Job) -> None:
    spec = job.spec
    write_json_atomic(tmp_path / "spec.json", {"source": "specs/demo.yaml", "overrides": [],
                                               "spec": spec.model_dump(mode="json")})
    good = ok_result(job)
    write_run(tmp_path / "runs" / "cnn__torch__seed1.json", good)
    write_json_atomic(tmp_path / "runs" / "cnn__torch__seed0.json",
                      {**SCHEMA_1_FAILED, "schema": 7})
    write_json_atomic(tmp_path / "plan.json", {"runs": {good.run_id: good.run_hash}})
    runs, problems = read_runs(tmp_path)
    assert [r.run_id for r in runs] == ["cnn__torch__seed1"]
    assert [p.path.name for p in problems] == ["cnn__torch__seed0.json"]
    bundle = load_bundle(tmp_path)
    assert [(r.run_id, r.test) for r in bundle.runs] == [(good.run_id, good.test)]
    ignored = {(r.run_id, r.reason) for r in analyze(bundle).ignored}
    assert ("cnn__torch__seed0", "RunResult schema 7; this harness reads schema 1, 2. Kept as "
            "is; rerun with the harness that wrote it, or delete it to rerun the run") in ignored
