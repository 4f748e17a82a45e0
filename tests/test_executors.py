"""Executors: local `--jobs N`, Ray on a real local instance, Slurm via submitit's local backend.

    HARNESS_TEST_FRAMEWORK=torch python -m pytest tests/test_executors.py -q

Framework-free: the reference backend and the test backend of tests/test_runner.py (numpy only)
on a tiny generated dataset. The ray and submitit tests need the `[ray]` and `[slurm]` extras
(the torch tox env has them) and skip where they are not installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_runner import harness, run_file, tiny, wait_for  # noqa: F401 - the fixture

from harness.errors import UserError
from harness.executors import ExecutorOptions, make_options, resolve_jobs
from harness.results import read_run


def probs(setup: dict, seed: int, backend: str = "reference") -> tuple[float, ...]:
    run = read_run(run_file(setup, seed, backend))
    assert run is not None and run.test is not None
    return run.test.probs


def test_jobs_2_runs_two_workers_at_once_with_their_share_of_the_cores(tiny,  # noqa: F811
                                                                      monkeypatch):
    monkeypatch.setenv("FAULTY_BACKEND_SLOW_S", "3")
    r = harness(tiny, "--jobs", "2", "--set", "seeds=[0,1,2]", faults="0:slow,1:slow,2:slow",
                backend="faulty")
    assert r.returncode == 0, r.stderr
    assert "local executor: 2 workers at once" in r.stdout
    assert "running: baseline__faulty__seed" in r.stdout  # progress names the other worker
    runs = [read_run(run_file(tiny, s, "faulty")) for s in (0, 1, 2)]
    assert [x.status for x in runs] == ["ok", "ok", "ok"]
    cores = len(os.sched_getaffinity(0))
    for run in runs:
        place = run.environment["placement"]
        assert place == {"executor": "local", "workers_sharing_machine": 2,
                         "threads": max(1, cores // 2), "gpu": None, "cpu_cores": cores}
        assert run.resources["workers_sharing_machine"] == 2
    # seeds 0 and 1 started together: each started before the other finished
    a, b = runs[0], runs[1]
    assert a.started < b.finished and b.started < a.finished
    parallel = {s: probs(tiny, s, "faulty") for s in (0, 1, 2)}
    r = harness(tiny, "--fresh", "--set", "seeds=[0,1,2]", backend="faulty")
    assert r.returncode == 0, r.stderr
    assert read_run(run_file(tiny, 0, "faulty")).environment["placement"]["threads"] is None
    assert {s: probs(tiny, s, "faulty") for s in (0, 1, 2)} == parallel


def test_interrupt_with_two_workers_keeps_finished_runs_and_resumes(tiny):  # noqa: F811
    p = harness(tiny, "--jobs", "2", "--set", "seeds=[0,1,2]", faults="1:hang,2:hang",
                backend="faulty", wait=False)
    wait_for(lambda: run_file(tiny, 0, "faulty").exists()
             and (tiny["out"] / "logs" / "baseline__faulty__seed2.log").exists())
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    for seed in (1, 2):
        assert f"interrupted: baseline__faulty__seed{seed} stopped" in err
        assert not run_file(tiny, seed, "faulty").exists()
    assert read_run(run_file(tiny, 0, "faulty")).status == "ok"
    assert not list(tiny["out"].glob(".job.*")) and not list(tiny["out"].rglob(".*.tmp"))
    r = harness(tiny, "--jobs", "2", "--set", "seeds=[0,1,2]", backend="faulty")
    assert r.returncode == 0, r.stderr
    assert "1 run(s) already done" in r.stdout


def test_a_failing_run_does_not_stop_the_other_workers(tiny):  # noqa: F811
    r = harness(tiny, "--jobs", "2", "--set", "seeds=[0,1,2]", faults="1:kill",
                backend="faulty")
    assert r.returncode == 1
    failed = read_run(run_file(tiny, 1, "faulty"))
    assert (failed.error.type, failed.error.reason) == ("WorkerDied",
                                                         "worker killed by signal SIGKILL")
    assert [read_run(run_file(tiny, s, "faulty")).status for s in (0, 2)] == ["ok", "ok"]


def test_jobs_auto_is_one_worker_without_a_gpu_and_one_per_gpu_with_them(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_jobs("auto", "auto") == (1, [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert resolve_jobs("auto", "auto") == (2, ["2", "5"])
    assert resolve_jobs("auto", "cpu") == (1, [])
    assert resolve_jobs(3, "gpu") == (3, ["2", "5"])


@pytest.mark.parametrize("given, message", [
    ({"jobs": "0"}, "run: jobs: must be a positive integer or auto; got '0'"),
    ({"jobs": "two"}, "run: jobs: must be a positive integer or auto; got 'two'"),
    ({"detach": True}, "run: --cluster, --partition, --account and --detach are Slurm options; "
                       "got them with executor local"),
    ({"executor": "ray", "jobs": "2"}, "run: --jobs is for the local executor; ray runs every "
                                       "pending run at once, as its resources allow"),
    ({"executor": "slurm", "cpus": "0"}, "run: cpus: must be an integer >= 1; got '0'"),
    ({"address": "h:1"}, "run: --address is a Ray option; got it with executor local"),
])
def test_bad_executor_options_are_one_line_errors(given, message):
    with pytest.raises(UserError) as e:
        make_options(given, {}, "run")
    assert e.value.message == message


def test_the_executor_config_file_sets_options_and_the_command_line_wins(tiny, tmp_path):  # noqa: F811
    from harness.executors import load_executor_config

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("executor: slurm\npartition: gpu\ntime: 30\ngpus: 1\naccount: lab\n")
    opts = make_options({"time": "90"}, load_executor_config(cfg), str(cfg))
    assert opts == ExecutorOptions(name="slurm", partition="gpu", time_min=90, gpus=1,
                                   account="lab")
    cfg.write_text("executor: slurm\nqueue: gpu\n")
    r = harness(tiny, "--executor-config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {cfg}: unknown key 'queue'; allowed: executor, jobs, ")


def _no_module(tmp_path: Path, name: str) -> str:
    """A PYTHONPATH entry on which `import name` fails as if it were not installed."""
    d = tmp_path / f"no-{name}"
    d.mkdir()
    (d / f"{name}.py").write_text(f'raise ImportError("No module named {name}")\n')
    return str(d)


@pytest.mark.parametrize("args, module, extra", [
    (("--executor", "slurm", "--cluster", "local"), "submitit", "slurm"),
    (("--executor", "ray"), "ray", "ray"),
])
def test_an_executor_without_its_extra_fails_with_the_install_hint(tiny, tmp_path, args,  # noqa: F811
                                                                   module, extra):
    cmd = [sys.executable, "-m", "harness", "run", str(tiny["spec"]), "--models", "baseline",
           "--out", str(tiny["out"]), "--cache-dir", str(tiny["cache"]), *args]
    env = {**os.environ, "PYTHONPATH": _no_module(tmp_path, module)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"error: --executor {extra} needs the '{module}' package, which is not installed",
        f"  hint: pip install -e '.[{extra}]'"]
    assert not (tiny["out"] / "runs").exists() and not tiny["cache"].exists()  # nothing started


def test_slurm_without_slurm_is_an_error_never_a_local_run(tiny, tmp_path):  # noqa: F811
    pytest.importorskip("submitit")
    env_path = ":".join(p for p in os.environ["PATH"].split(":")
                        if not (Path(p) / "sbatch").exists())
    cmd = [sys.executable, "-m", "harness", "run", str(tiny["spec"]), "--models", "baseline",
           "--out", str(tiny["out"]), "--cache-dir", str(tiny["cache"]), "--executor", "slurm"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PATH": env_path}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == (
        "error: --executor slurm: no Slurm on this machine (sbatch is not on PATH)")
    assert not (tiny["out"] / "runs").exists()


def _report_rows(setup: dict) -> list[str]:
    return (setup["out"] / "metrics.csv").read_text().splitlines()


@pytest.mark.slow
def test_slurm_job_array_through_submitits_local_backend(tiny):  # noqa: F811
    pytest.importorskip("submitit")
    r = harness(tiny)
    assert r.returncode == 0, r.stderr
    sequential, rows = {s: probs(tiny, s) for s in (0, 1)}, _report_rows(tiny)
    r = harness(tiny, "--fresh", "--executor", "slurm", "--cluster", "local", "--cpus", "1")
    assert r.returncode == 0, r.stderr
    assert "slurm: submitted 2 run(s) as job array" in r.stdout
    assert {s: probs(tiny, s) for s in (0, 1)} == sequential
    assert _report_rows(tiny) == rows
    place = read_run(run_file(tiny, 0)).environment["placement"]
    assert (place["executor"], place["threads"]) == ("slurm-local", 1)
    submitted = json.loads((tiny["out"] / "submitted.json").read_text())
    assert sorted(submitted) == ["baseline__reference__seed0", "baseline__reference__seed1"]
    assert list((tiny["out"] / "slurm").glob("*_submitted.pkl"))  # submitit's own job files


@pytest.mark.slow
def test_slurm_detach_returns_and_a_later_run_collects(tiny, monkeypatch):  # noqa: F811
    pytest.importorskip("submitit")
    monkeypatch.setenv("FAULTY_BACKEND_SLOW_S", "30")  # still running when the second run starts
    # output to a file: the jobs of submitit's local backend inherit it, a pipe would stay open
    log = tiny["out"].parent / "detach.log"
    cmd = [sys.executable, "-m", "harness", "run", str(tiny["spec"]), "--models", "baseline",
           "--set", "models.baseline.backends=[faulty]", "--out", str(tiny["out"]),
           "--cache-dir", str(tiny["cache"]), "--executor", "slurm", "--cluster", "local",
           "--detach"]
    env = {**os.environ, "PYTHONPATH": str(tiny["plugins"]), "FAULTY_BACKEND": "0:slow,1:slow"}
    with open(log, "w") as f:
        assert subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=f, timeout=120
                              ).returncode == 0, log.read_text()
    assert "detached: 2 run(s) submitted" in log.read_text()
    assert not run_file(tiny, 0, "faulty").exists()  # returned while the jobs run
    submitted = json.loads((tiny["out"] / "submitted.json").read_text())
    r = harness(tiny, "--executor", "slurm", "--cluster", "local", backend="faulty")
    assert r.returncode == 0, r.stderr
    for seed in (0, 1):  # the detached attempts' results, not a second submission
        run = read_run(run_file(tiny, seed, "faulty"))
        run_id = f"baseline__faulty__seed{seed}"
        assert run.attempt == submitted[run_id]["attempt"]
    assert "waiting for 2 run(s) submitted earlier (--detach)" in r.stdout
    assert "slurm: submitted" not in r.stdout
    assert (tiny["out"] / "report.md").exists()


@pytest.mark.slow
def test_ray_runs_one_task_per_run_on_a_local_ray(tiny, monkeypatch):  # noqa: F811
    ray = pytest.importorskip("ray")
    from harness.pipeline import RunRequest, run
    from harness.plan import Selection
    from harness.validate import Where

    request = RunRequest(tiny["spec"], ("models.baseline.backends=[reference]",),
                         Selection(models=["baseline"]), Where(tiny["out"], tiny["cache"]),
                         quiet=True)
    assert run(request) == 0
    sequential, rows = {s: probs(tiny, s) for s in (0, 1)}, _report_rows(tiny)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        fresh = dataclasses.replace(request, fresh=True,
                                    executor=ExecutorOptions(name="ray", cpus=1))
        assert run(fresh) == 0
        assert ray.cluster_resources()["CPU"] == 2.0  # the test's Ray, not one of its own
    finally:
        ray.shutdown()
    assert {s: probs(tiny, s) for s in (0, 1)} == sequential
    assert _report_rows(tiny) == rows
    place = read_run(run_file(tiny, 1)).environment["placement"]
    assert (place["executor"], place["threads"]) == ("ray", 1)
