"""End to end through the CLI, and the runner's reliability cases.

Uses the random baseline on a tiny generated dataset, so no framework is needed: these run in
every tox env. Faults are injected into chosen worker processes with HARNESS_FAULT_INJECT.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from harness.plan import RunKey, plan_runs
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


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(demo=ROOT / "specs" / "demo.yaml"))
    return {"spec": spec, "out": tmp_path / "results", "cache": tmp_path / "cache"}


def harness(tiny: dict, *args: str, fault: str = "", wait: bool = True, timeout: float = 180):
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(tiny["spec"]),
        "--models",
        "baseline",
        "--out",
        str(tiny["out"]),
        "--cache-dir",
        str(tiny["cache"]),
        *args,
    ]
    env = {**os.environ, "HARNESS_FAULT_INJECT": fault}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_file(tiny: dict, seed: int) -> Path:
    return tiny["out"] / "runs" / f"baseline__reference__seed{seed}.json"


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
    assert all(run["status"] == "ok" for run in runs)
    # the paper's rule: p ~ U[0, 1), label 1 when p >= 0.5; probabilities stored for re-analysis
    probs = runs[0]["test"]["probs"]
    assert len(probs) == len(runs[0]["test"]["labels"]) > 0
    assert all(0 <= p < 1 for p in probs)
    assert runs[0]["test"]["probs"] != runs[1]["test"]["probs"]  # seeds differ
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
    assert read_run(run_file(tiny, 0))["test"]["probs"] == probs


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


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("raise", "RuntimeError: injected fault"),
        ("nan", "non-finite probabilities"),
        ("kill", "worker killed by signal SIGKILL"),
    ],
)
def test_a_failing_run_is_recorded_and_the_others_go_on(tiny, fault, reason):
    r = harness(tiny, fault=f"baseline__reference__seed0={fault}")
    assert r.returncode == 1
    assert "1 run(s) failed" in r.stderr
    failed = read_run(run_file(tiny, 0))
    assert failed["status"] == "failed"
    assert reason in failed["error"]["message"]
    assert "stderr_tail" in failed["error"]
    assert read_run(run_file(tiny, 1))["status"] == "ok"
    report = (tiny["out"] / "report.md").read_text()
    assert "## Failed runs" in report and "baseline__reference__seed0" in report
    # a failed run is retried on the next invocation
    assert harness(tiny).returncode == 0
    assert read_run(run_file(tiny, 0))["status"] == "ok"


def test_timeout_is_a_failed_run(tiny):
    r = harness(tiny, "--set", "runtime.timeout_s=8", fault="baseline__reference__seed0=hang")
    assert r.returncode == 1
    failed = read_run(run_file(tiny, 0))
    assert failed["error"]["message"] == "timeout: exceeded runtime.timeout_s = 8 s"
    assert read_run(run_file(tiny, 1))["status"] == "ok"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_finished_runs_and_resumes(tiny, sig):
    p = harness(tiny, fault="baseline__reference__seed1=hang", wait=False)
    wait_for(
        lambda: (
            run_file(tiny, 0).exists()
            and (tiny["out"] / "logs" / "baseline__reference__seed1.log").exists()
        )
    )
    time.sleep(1.0)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert read_run(run_file(tiny, 0))["status"] == "ok"
    assert not run_file(tiny, 1).exists()
    assert not list(tiny["out"].rglob(".*.tmp")) and not list(tiny["out"].glob(".job.*"))
    r = harness(tiny)
    assert r.returncode == 0
    assert "1 run(s) already done" in r.stdout
    assert read_run(run_file(tiny, 1))["status"] == "ok"


def test_kill_9_of_the_harness_then_resume(tiny):
    p = harness(tiny, fault="baseline__reference__seed1=hang", wait=False)
    wait_for(
        lambda: (
            run_file(tiny, 0).exists()
            and (tiny["out"] / "logs" / "baseline__reference__seed1.log").exists()
        )
    )
    time.sleep(1.0)
    p.kill()
    p.communicate(timeout=30)
    # a half-written file from a killed writer is never read as a result
    (tiny["out"] / "runs" / ".baseline__reference__seed1.json.abc.tmp").write_text(
        '{"complete": tr'
    )
    (tiny["out"] / "runs" / "baseline__reference__seed1.json").write_text('{"status": "ok", "comp')
    r = harness(tiny)
    assert r.returncode == 0, r.stderr
    assert read_run(run_file(tiny, 1))["status"] == "ok"
    assert not list(tiny["out"].rglob(".*.tmp"))


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
    assert max(run["test"]["probs"]) < 0.5
    # the results of the earlier configuration are kept aside, not overwritten
    kept = sorted(p.name.split(".")[0] for p in (tiny["out"] / "runs" / "superseded").iterdir())
    assert kept == ["baseline__reference__seed0", "baseline__reference__seed1"]


def test_a_fresh_attempt_that_dies_is_not_taken_for_the_old_result(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    r = harness(tiny, "--seeds", "0", "--fresh", fault="baseline__reference__seed0=kill")
    assert r.returncode == 1
    run = read_run(run_file(tiny, 0))
    assert run["status"] == "failed"
    assert run["error"]["message"] == "worker killed by signal SIGKILL"


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
    from harness.errors import UserError

    with pytest.raises(
        UserError, match="--models: unknown model 'cnnn'; this spec has: baseline, cnn, densenet"
    ):
        plan_runs(spec, models=["cnnn"])
    with pytest.raises(UserError, match="--seeds: seed 9 is not in the spec's seeds"):
        plan_runs(spec, seeds=[9])


def test_worker_envelope_is_json(tiny):
    assert harness(tiny, "--seeds", "0").returncode == 0
    run = json.loads(run_file(tiny, 0).read_text())
    assert run["complete"] is True and run["key"] == {
        "model": "baseline",
        "backend": "reference",
        "seed": 0,
    }
    assert run["resources"]["gpu"]["memory_used_peak"]["value"] is None
    assert run["provenance"]["python"]
