"""End to end through the CLI, and the runner's reliability cases.

    .venv/bin/python -m pytest tests/test_runner.py -q

Uses the random baseline on a tiny generated dataset, so no framework is needed: these run in
every tox env. Faults come from a test backend (tests/faulty_backend.py) installed as a
third-party distribution with an entry point; which run misbehaves, and how, is that backend's
own configuration (FAULTY_BACKEND), unknown to the harness.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from harness.errors import UserError
from harness.plan import RunKey, Selection, make_plan, plan_runs, run_hash, training_code_version
from harness.results import read_run
from harness.spec import load_spec

TINY = """\
extends: {demo}
name: tiny
data:
  image_size: 32
  synthetic: {{patients: 16, seed: 3, min_size: 32, max_size: 48}}
seeds: [0, 1]
evaluation:
  bootstrap: {{resamples: 200}}
"""

# The test backend, installed the way a user's backend would be: a distribution on the path
# whose metadata declares an entry point in the `repro_harness.backends` group.
ENTRY_POINTS = """\
[repro_harness.backends]
faulty = faulty_backend:FaultyBackend
broken = no_such_module:Backend
"""


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(demo=ROOT / "specs" / "demo.yaml"))
    plugins = tmp_path / "plugins"
    dist = plugins / "repro_faulty_backend-0.1.dist-info"
    dist.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("faulty_backend.py"), plugins / "faulty_backend.py")
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: repro-faulty-backend\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return {"spec": spec, "out": tmp_path / "results", "cache": tmp_path / "cache",
            "plugins": plugins}


def harness(tiny: dict, *args: str, faults: str = "", backend: str = "reference",
            model: str = "baseline", wait: bool = True, timeout: float = 180):
    """`python -m harness run` on the tiny spec; `faults` configures the test backend
    (FAULTY_BACKEND="SEED:FAULT,..."), `backend` replaces the model's backends."""
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(tiny["spec"]),
        "--models",
        model,
        "--set",
        f"models.{model}.backends=[{backend}]",
        "--out",
        str(tiny["out"]),
        "--cache-dir",
        str(tiny["cache"]),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(tiny["plugins"]), "FAULTY_BACKEND": faults}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_file(tiny: dict, seed: int, backend: str = "reference", model: str = "baseline") -> Path:
    return tiny["out"] / "runs" / f"{model}__{backend}__seed{seed}.json"


def wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def test_run_writes_report_and_skips_finished_runs(tiny):
    r = harness(tiny)
    assert r.returncode == 0, r.stderr
    report = (tiny["out"] / "report.md").read_text()
    assert "| accuracy | 49.21% (Wilson 46.99-51.42) |" in report
    runs = [read_run(run_file(tiny, s)) for s in (0, 1)]
    assert [run.status for run in runs] == ["ok", "ok"]
    # the paper's rule: p ~ U[0, 1), label 1 when p >= 0.5; probabilities stored for re-analysis
    probs = runs[0].test.probs
    assert len(probs) == len(runs[0].test.labels) > 0
    assert all(0 <= p < 1 for p in probs)
    assert runs[0].test.probs != runs[1].test.probs  # seeds differ
    metrics = (tiny["out"] / "metrics.csv").read_text()
    assert "baseline__reference__seed0" in metrics
    first = run_file(tiny, 0).stat().st_mtime_ns

    r2 = harness(tiny)
    assert r2.returncode == 0
    assert "2 run(s) already done" in r2.stdout
    assert run_file(tiny, 0).stat().st_mtime_ns == first

    r3 = harness(tiny, "--fresh", "--seeds", "0")
    assert r3.returncode == 0
    assert run_file(tiny, 0).stat().st_mtime_ns != first
    # same seed, same data: the random baseline is reproducible
    assert read_run(run_file(tiny, 0)).test.probs == probs


def test_the_plan_is_written_once_for_every_run_and_jobs_carry_its_hashes(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    plan = json.loads((tiny["out"] / "plan.json").read_text())
    # every run of the spec, not only the selected one (analyze counts runs against it)
    assert sorted(plan["runs"]) == sorted(
        f"{m}__{b}__seed{s}" for m, b in (("baseline", "reference"), ("cnn", "keras"),
                                          ("cnn", "torch"), ("densenet", "keras"),
                                          ("densenet", "torch")) for s in (0, 1))
    run = read_run(run_file(tiny, 0))
    assert run.run_hash == plan["runs"]["baseline__reference__seed0"]
    assert run.data_hash == plan["data_hash"]


def test_dry_run_lists_plan_and_done_runs(tiny):
    r = harness(tiny, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "pending" in r.stdout and not run_file(tiny, 0).exists()
    assert "study also in train" in r.stdout
    harness(tiny, "--seeds", "0")
    r = harness(tiny, "--dry-run")
    lines = [x.split() for x in r.stdout.splitlines() if x.startswith("baseline")]
    assert ["baseline", "reference", "0", "done"] in lines
    assert ["baseline", "reference", "1", "pending"] in lines


def _n_nan(n: int) -> int:
    return len(range(0, n, 7))  # the test backend's nan-probs fault: every 7th image


@pytest.mark.parametrize(
    ("fault", "model", "error_type", "reason"),
    [
        ("raise", "baseline", "RuntimeError", "RuntimeError: faulty backend: predict raised"),
        ("nan-probs", "baseline", "FloatingPointError",
         "FloatingPointError: predict returned {nan} non-finite probabilities (NaN/inf)"),
        ("nan-loss", "cnn", "FloatingPointError", "loss became NaN at epoch 2 step 1"),
        ("kill", "baseline", "WorkerDied", "worker killed by signal SIGKILL"),
    ],
)
def test_a_failing_run_is_recorded_and_the_others_go_on(tiny, fault, model, error_type, reason):
    r = harness(tiny, "--set", "models.cnn.train.epochs=2", faults=f"0:{fault}",
                backend="faulty", model=model)
    assert r.returncode == 1
    assert "1 run(s) failed" in r.stderr
    ok = read_run(run_file(tiny, 1, "faulty", model))
    assert ok.status == "ok"
    failed = read_run(run_file(tiny, 0, "faulty", model))
    assert failed.status == "failed"
    assert failed.error.type == error_type
    reason = reason.format(nan=_n_nan(len(ok.test.rows)))
    assert failed.error.reason == reason
    assert failed.attempt is not None and failed.attempt != ok.attempt
    log = (tiny["out"] / "logs" / f"{model}__faulty__seed0.log").read_text()
    assert failed.error.stderr_tail == "\n".join(log.splitlines()[-25:])
    if fault == "raise":
        assert failed.error.stderr_tail.splitlines()[-1] == reason
    if fault == "nan-loss":  # the epochs before the NaN are kept
        assert [h.epoch for h in failed.history] == [1]
        assert failed.history[0].loss == 0.5
    report = (tiny["out"] / "report.md").read_text()
    assert "## Failed runs" in report
    assert f"| `{model}__faulty__seed0` | {error_type} | {reason} |" in report
    # a failed run is retried on the next invocation
    assert harness(tiny, backend="faulty", model=model).returncode == 0
    assert read_run(run_file(tiny, 0, "faulty", model)).status == "ok"


def test_progress_events_reach_the_terminal(tiny):
    r = harness(tiny, "--seeds", "0", "-v", "--set", "models.cnn.train.epochs=2",
                backend="faulty", model="cnn")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "    built: 0 parameters (0 trainable)" in lines
    epochs = [line for line in lines if line.startswith("    epoch ")]
    # training: loss 0.5 and the labels as probabilities (the loop's metrics: all 1); the
    # validation comes from the backend's seeded draws; times are whatever the clock said
    value = r"(\d\.\d{4}|nan)"
    pattern = (r"    epoch {e}/2: loss 0\.5000 accuracy 1\.0000 recall 1\.0000 precision 1\.0000 "
               rf"val_loss {value} val_accuracy {value} val_recall {value} "
               rf"val_precision {value} \(\d+\.\d s, train \d+\.\d s\)")
    assert len(epochs) == 2
    for e, line in enumerate(epochs, start=1):
        assert re.fullmatch(pattern.replace("{e}", str(e)), line), line


def test_an_unknown_backend_lists_builtin_and_entry_point_backends(tiny):
    r = harness(tiny, backend="nope")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].endswith(
        "models[0].backends[0]: must be one of reference, keras, keras-torch, keras-jax, torch, "
        "faulty, broken; got 'nope' (from --set models.baseline.backends=[nope])"
    )
    assert "Traceback" not in r.stderr


def test_list_shows_entry_point_backends(tiny):
    env = {**os.environ, "PYTHONPATH": str(tiny["plugins"])}
    r = subprocess.run([sys.executable, "-m", "harness", "list"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split("  ")[0] for line in r.stdout.splitlines()[3:10]]
    assert rows == ["reference", "keras", "keras-torch", "keras-jax", "torch", "faulty", "broken"]
    assert "entry point of repro-faulty-backend 0.1" in r.stdout


def test_an_entry_point_that_does_not_import_is_a_clear_failed_run(tiny):
    r = harness(tiny, "--seeds", "0", backend="broken")
    assert r.returncode == 1
    failed = read_run(run_file(tiny, 0, "broken"))
    assert (failed.error.type, failed.error.reason) == (
        "UserError",
        "backend 'broken' (entry point repro_harness.backends: broken = no_such_module:Backend) "
        "cannot be loaded: ModuleNotFoundError: No module named 'no_such_module'",
    )
    assert "Traceback" not in failed.error.stderr_tail


def test_timeout_is_a_failed_run(tiny):
    r = harness(tiny, "--set", "runtime.timeout_s=8", faults="0:hang", backend="faulty")
    assert r.returncode == 1
    failed = read_run(run_file(tiny, 0, "faulty"))
    assert (failed.error.type, failed.error.reason) == (
        "WorkerDied", "timeout: exceeded runtime.timeout_s = 8 s")
    assert read_run(run_file(tiny, 1, "faulty")).status == "ok"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_finished_runs_and_resumes(tiny, sig):
    p = harness(tiny, faults="1:hang", backend="faulty", wait=False)
    wait_for(
        lambda: (
            run_file(tiny, 0, "faulty").exists()
            and (tiny["out"] / "logs" / "baseline__faulty__seed1.log").exists()
        )
    )
    time.sleep(1.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted: baseline__faulty__seed1 stopped; its partial work is discarded" in err
    assert read_run(run_file(tiny, 0, "faulty")).status == "ok"
    assert not run_file(tiny, 1, "faulty").exists()
    assert not list(tiny["out"].rglob(".*.tmp")) and not list(tiny["out"].glob(".job.*"))
    r = harness(tiny, backend="faulty")
    assert r.returncode == 0
    assert "1 run(s) already done" in r.stdout
    assert read_run(run_file(tiny, 1, "faulty")).status == "ok"


def test_kill_9_of_the_harness_then_resume(tiny):
    p = harness(tiny, faults="1:hang", backend="faulty", wait=False)
    wait_for(
        lambda: (
            run_file(tiny, 0, "faulty").exists()
            and (tiny["out"] / "logs" / "baseline__faulty__seed1.log").exists()
        )
    )
    time.sleep(1.0)
    p.kill()
    p.communicate(timeout=30)
    # a half-written file from a killed writer is never read as a result
    runs = tiny["out"] / "runs"
    (runs / ".baseline__faulty__seed1.json.abc.tmp").write_text('{"complete": tr')
    (runs / "baseline__faulty__seed1.json").write_text('{"status": "ok", "comp')
    r = harness(tiny, backend="faulty")
    assert r.returncode == 0, r.stderr
    assert "1 run(s) already done" in r.stdout
    assert read_run(run_file(tiny, 1, "faulty")).status == "ok"
    assert not list(tiny["out"].rglob(".*.tmp")) and not list(tiny["out"].glob(".job.*"))


def test_runs_of_an_older_spec_are_not_mixed_in(tiny):
    assert harness(tiny).returncode == 0
    r = harness(tiny, "--set", "seeds=[0]")
    assert r.returncode == 0
    report = (tiny["out"] / "report.md").read_text()
    assert "## Ignored runs" in report
    assert "`baseline__reference__seed1` | not in the current spec's plan" in report
    r = harness(tiny, "--set", "seeds=[0, 1]", "--set", "models.baseline.high=0.5")
    assert r.returncode == 0
    assert "already done" not in r.stdout  # the model changed: both reruns
    run = read_run(run_file(tiny, 0))
    assert max(run.test.probs) < 0.5
    # the results of the earlier configuration are kept aside, not overwritten
    kept = sorted(p.name.split(".")[0] for p in (tiny["out"] / "runs" / "superseded").iterdir())
    assert kept == ["baseline__reference__seed0", "baseline__reference__seed1"]


def test_a_result_this_harness_cannot_read_is_kept_aside_and_rerun(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    path = run_file(tiny, 0)
    future = {**json.loads(path.read_text()), "schema": 99}
    path.write_text(json.dumps(future))
    r = harness(tiny, "--seeds", "0", "--dry-run")
    rows = [x.split() for x in r.stdout.splitlines()]
    assert ["baseline", "reference", "0", "unreadable"] in rows
    r = harness(tiny, "--seeds", "0")
    assert r.returncode == 0, r.stderr
    aside = tiny["out"] / "runs" / "superseded" / "baseline__reference__seed0.unreadable.json"
    assert f"warning: {path}: RunResult schema 99; this harness reads schema 1, 2." in r.stderr
    assert json.loads(aside.read_text()) == future
    assert read_run(path).status == "ok"


def test_a_fresh_attempt_that_dies_is_not_taken_for_the_old_result(tiny):
    assert harness(tiny, "--seeds", "0", backend="faulty").returncode == 0
    r = harness(tiny, "--seeds", "0", "--fresh", faults="0:kill", backend="faulty")
    assert r.returncode == 1
    run = read_run(run_file(tiny, 0, "faulty"))
    assert run.status == "failed"
    assert run.error.reason == "worker killed by signal SIGKILL"


def test_a_second_harness_on_the_same_results_is_refused(tiny):
    tiny["out"].mkdir(parents=True)
    with open(tiny["out"] / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242")
        f.flush()
        r = harness(tiny)
    assert r.returncode == 2
    assert "another harness process (pid 4242) is using this results folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_report_regenerates_without_training(tiny):
    assert harness(tiny).returncode == 0
    report = tiny["out"] / "report.md"
    report.unlink()
    r = subprocess.run(
        [sys.executable, "-m", "harness", "report", str(tiny["out"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "| accuracy | 49.21% (Wilson 46.99-51.42) |" in report.read_text()


def test_plan_filters_and_errors():
    spec = load_spec(ROOT / "specs" / "paper.yaml")
    keys = plan_runs(spec, models=["cnn"], backends=["torch"], seeds=[1])
    assert keys == [RunKey("cnn", "torch", 1)]
    assert len(plan_runs(spec)) == 3 * 1 + 3 * 2 + 3 * 2
    with pytest.raises(
        UserError, match="--models: unknown model 'cnnn'; this spec has: baseline, cnn, densenet"
    ):
        plan_runs(spec, models=["cnnn"])
    with pytest.raises(UserError, match="--seeds: seed 9 is not in the spec's seeds"):
        plan_runs(spec, seeds=[9])


def test_plan_hashes_every_run_once_and_selects_some():
    spec = load_spec(ROOT / "specs" / "paper.yaml")
    plan = make_plan(spec, Selection(models=["cnn"], seeds=[1]))
    assert plan.selected == (RunKey("cnn", "keras", 1), RunKey("cnn", "torch", 1))
    assert len(plan.runs) == 15 and plan.run_hashes == {} and plan.data_hash is None
    hashed = plan.with_data("d" * 32)
    assert sorted(hashed.run_hashes) == sorted(k.id for k in plan.runs)
    key = RunKey("cnn", "torch", 1)
    assert hashed.run_hashes[key.id] == run_hash(spec, key, "d" * 32,
                                                 training_code_version("torch"))
    assert hashed.with_data("e" * 32).run_hashes[key.id] != hashed.run_hashes[key.id]
    with pytest.raises(UserError, match="--backends: unknown backend 'tf'"):
        make_plan(spec, Selection(backends=["tf"]))


def test_the_result_file_is_json_with_its_schema(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    run = json.loads(run_file(tiny, 0).read_text())
    assert (run["schema"], run["complete"], run["run_id"]) == (
        2, True, "baseline__reference__seed0")
    assert run["key"] == {"model": "baseline", "backend": "reference", "seed": 0}
    assert run["params"] == {"total": 0, "trainable": 0, "non_trainable": 0}
    assert run["resources"]["gpu"]["memory_used_peak"]["value"] is None
    assert run["provenance"]["python"]


def test_a_result_the_analysis_cannot_use_is_not_ok(tiny):
    """A run that finished "ok" but whose result the analysis refuses makes the exit code 1."""
    from harness.pipeline import _write_report
    from harness.records import RunKey
    from harness.runner import RunOutcome

    assert harness(tiny, "--seeds", "0").returncode == 0
    path = run_file(tiny, 0)
    obj = json.loads(path.read_text())
    obj["test"] = {k: [] for k in obj["test"]}
    path.write_text(json.dumps(obj))
    outcome = RunOutcome(RunKey("baseline", "reference", 0), "ok")
    report, bad = _write_report(tiny["out"], [outcome])
    assert bad == ["baseline__reference__seed0: the result's test set is empty"]
    assert report == tiny["out"] / "report.md" and report.is_file()
    skipped = RunOutcome(RunKey("baseline", "reference", 0), "skipped")
    assert _write_report(tiny["out"], [skipped])[1] == []  # an older result: the report says so


def test_a_truncated_result_is_reported_and_kept_aside(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    path = run_file(tiny, 0)
    damaged = path.read_text()[:100]
    path.write_text(damaged)
    r = subprocess.run([sys.executable, "-m", "harness", "report", str(tiny["out"])], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = (tiny["out"] / "report.md").read_text()
    assert "`baseline__reference__seed0` | not valid JSON (truncated or damaged: " in report
    r = harness(tiny, "--seeds", "0")
    assert r.returncode == 0, r.stderr
    assert f"warning: {path}: not valid JSON (truncated or damaged: " in r.stderr
    aside = tiny["out"] / "runs" / "superseded" / "baseline__reference__seed0.unreadable.json"
    assert aside.read_text() == damaged
    assert read_run(path).status == "ok"


def test_a_second_unreadable_copy_does_not_replace_the_first(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    path = run_file(tiny, 0)
    aside = tiny["out"] / "runs" / "superseded"
    for damaged in ("first damaged copy", "second damaged copy"):
        path.write_text(damaged)
        r = harness(tiny, "--seeds", "0")
        assert r.returncode == 0, r.stderr
    assert sorted((p.name, p.read_text()) for p in aside.iterdir()) == [
        ("baseline__reference__seed0.unreadable.2.json", "second damaged copy"),
        ("baseline__reference__seed0.unreadable.json", "first damaged copy"),
    ]


def report_of(tiny) -> tuple[subprocess.CompletedProcess, str]:
    r = subprocess.run([sys.executable, "-m", "harness", "report", str(tiny["out"])], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return r, (tiny["out"] / "report.md").read_text()


def test_a_corrupt_plan_does_not_make_every_finished_run_ignored(tiny):
    assert harness(tiny).returncode == 0
    plan = tiny["out"] / "plan.json"
    plan.write_text('{"runs": {"baseline__refer')
    r, report = report_of(tiny)
    assert r.returncode == 0, r.stderr
    assert "Runs: 2 finished, 0 failed, 0 ignored;" in report
    assert f"- {plan}: corrupt, not valid JSON (Unterminated string starting at: " in report
    aside = tiny["out"] / "superseded" / "plan.corrupt.json"
    assert f"kept as {aside}" in report
    assert aside.read_text() == '{"runs": {"baseline__refer'
    # a run of another configuration is still told apart, by its spec hash
    r = harness(tiny, "--seeds", "0", "--set", "models.baseline.high=0.5")
    assert r.returncode == 0, r.stderr
    plan.write_text("[]")
    r, report = report_of(tiny)
    assert "Runs: 1 finished, 0 failed, 1 ignored;" in report
    assert "`baseline__reference__seed1` | spec hash differs from spec.json (older spec)" in report
    assert (tiny["out"] / "superseded" / "plan.corrupt.2.json").read_text() == "[]"


def test_a_corrupt_data_record_is_reported_as_corrupt_and_kept_aside(tiny):
    assert harness(tiny).returncode == 0
    data = tiny["out"] / "data.json"
    data.write_text('{"split": ')
    r, report = report_of(tiny)
    assert r.returncode == 0, r.stderr
    assert "Runs: 2 finished, 0 failed, 0 ignored, 8 planned but not run yet;" in report
    assert "No data.json" not in report
    assert f"data.json is corrupt ({data}: corrupt, not valid JSON (Expecting value: " in report
    assert (tiny["out"] / "superseded" / "data.corrupt.json").read_text() == '{"split": '
    # `run` keeps a corrupt one aside too before it writes the record again
    data.write_text("null")
    r = harness(tiny)
    assert r.returncode == 0, r.stderr
    assert f"warning: {data}: corrupt, not a JSON object (found NoneType); kept as " in r.stderr
    assert (tiny["out"] / "superseded" / "data.corrupt.2.json").read_text() == "null"
    assert "data_hash" in json.loads(data.read_text())


@pytest.mark.parametrize(
    "faults, grades",
    [
        ("", {0: "bit-identical"}),
        ("0:jitter", {0: r"max abs difference \d\.\de-\d\d"}),
        ("0:flip", {0: r"nondeterministic \(max abs difference \d\.\de-\d\d; \d+ labels change\)"}),
    ],
)
def test_check_determinism_grades_a_fresh_rerun_of_one_seed(tiny, faults, grades):
    r = harness(tiny, "--check-determinism", faults=faults, backend="faulty")
    assert r.returncode == 0, r.stderr
    graded = json.loads((tiny["out"] / "determinism.json").read_text())["grades"]
    assert [(g["model"], g["backend"], g["seed"]) for g in graded] == [("baseline", "faulty", 0)]
    assert re.fullmatch(grades[0], graded[0]["grade"]), graded[0]["grade"]
    assert "Determinism (a fresh-process rerun of one seed" in r.stdout
    # the rerun never replaces the result the report uses
    assert (tiny["out"] / "runs" / "determinism" / "baseline__faulty__seed0.json").exists()
    assert read_run(run_file(tiny, 0, "faulty")).status == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["synthetic", "images"])  # data generation, cache build
def test_kill_9_while_the_data_is_prepared_leaves_nothing_half_made(tiny, folder):
    """The harness is SIGKILLed once the phase's temp folder appears (the phase has begun and
    cannot be done: hundreds of images are left); the same command then finishes every run."""
    more = ("--set", "data.synthetic.patients=400")
    proc = harness(tiny, *more, wait=False)
    parent = tiny["cache"] / folder
    wait_for(lambda: any(parent.glob(".tmp-*")) or proc.poll() is not None, timeout=300)
    proc.send_signal(signal.SIGKILL)  # kill -9 of the harness: its pool workers die with it
    proc.wait()
    entries = sorted(p.name for p in parent.iterdir())
    assert len(entries) == 1 and entries[0].startswith(".tmp-")  # killed inside the phase
    assert not (tiny["out"] / "runs").exists()
    r = harness(tiny, *more)
    assert r.returncode == 0, r.stderr
    assert [read_run(run_file(tiny, s)).status for s in (0, 1)] == ["ok", "ok"]
    entries = sorted(p.name for p in parent.iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")  # the stale temp folder is gone


def test_quiet_prints_one_line_per_run_and_no_progress(tiny):
    r = harness(tiny, "-q", "--set", "data.synthetic.patients=40")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout
    assert re.fullmatch(r"\[1/2\] baseline / reference / seed 0: ok \([0-9.]+ s\), about "
                        r"[0-9.]+ s left", lines[0])
    assert re.fullmatch(r"\[2/2\] baseline / reference / seed 1: ok \([0-9.]+ s\)", lines[1])
    assert lines[2:] == ["", f"report: {tiny['out'] / 'report.md'}"]
    assert "images" not in r.stderr and "%" not in r.stderr  # no bar, no progress line


def test_the_training_state_of_a_run_found_done_is_removed(tiny):
    """A kill between writing a result and removing the run's checkpoint leaves both; the next
    command skips the run and removes the stale state."""
    assert harness(tiny, "--seeds", "0").returncode == 0
    stale = tiny["out"] / "checkpoints" / "baseline__reference__seed0.npz"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"state of a finished run")
    r = harness(tiny, "--seeds", "0")
    assert r.returncode == 0, r.stderr
    assert "1 run(s) already done" in r.stdout
    assert not stale.exists()
