"""Executors: what starts the workers of `run_all` -- local processes, Ray tasks, a Slurm job array.

    python -m harness run specs/demo.yaml --jobs 2                  # local, two workers at once
    python -m harness run specs/demo.yaml --executor ray [--address HOST:PORT]
    python -m harness run specs/demo.yaml --executor slurm --partition gpu --gpus 1 [--detach]
    python -m harness run specs/demo.yaml --executor slurm --cluster local  # submitit, locally

The runner keeps the semantics (run hash, skip-if-done, the job file and its attempt nonce, the
failed result of a worker that died, checkpoints, Ctrl-C); an executor only starts
`python -m harness.worker JOB.json` somewhere and says how it ended (`Ended`). Every worker gets
the environment the runner computes plus its placement: HARNESS_THREADS / OMP_NUM_THREADS (its share
of the CPU cores, applied by each backend), CUDA_VISIBLE_DEVICES (its GPU), HARNESS_WORKERS (how
many workers share the machine); the worker records them in its result (environment.placement).
Remote executors (ray, slurm) need the results folder on a filesystem the nodes share; progress
comes back through a progress file per run beside its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError

EXECUTORS = ("local", "slurm", "ray")
TERM_GRACE_S = 10.0
POLL_S = 0.5


@dataclass(frozen=True)
class ExecutorOptions:
    """What `run --executor ...` asked for (command line over --executor-config file)."""

    name: str = "local"
    jobs: int | str = 1  # an integer >= 1, or "auto"
    cluster: str | None = None  # slurm: None (Slurm itself) or "local" (submitit's local backend)
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    account: str | None = None
    address: str | None = None  # ray: an existing cluster; None starts a local one
    detach: bool = False


CONFIG_KEYS = ("executor", "jobs", "cluster", "partition", "time", "gpus", "cpus", "account",
               "address", "detach")


def load_executor_config(path: Path) -> dict[str, Any]:
    """The executor config file (YAML mapping of CONFIG_KEYS); UserError on anything else."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"--executor-config {path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--executor-config {path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of {', '.join(CONFIG_KEYS)}; "
                        f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in CONFIG_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; allowed: {', '.join(CONFIG_KEYS)}")
    return dict(raw)


def make_options(given: dict[str, Any], config: dict[str, Any], where: str) -> ExecutorOptions:
    """Options from the command line (`given`, None = not given) over the config file."""
    merged = {k: v for k, v in config.items()}
    merged.update({k: v for k, v in given.items() if v is not None})
    name = str(merged.get("executor", "local"))
    if name not in EXECUTORS:
        raise UserError(f"{where}: executor: must be one of {', '.join(EXECUTORS)}; got '{name}'")
    jobs = merged.get("jobs", 1)
    if str(jobs) == "auto":
        jobs = "auto"
    elif not (isinstance(jobs, int) or str(jobs).isdigit()) or int(jobs) < 1:
        raise UserError(f"{where}: jobs: must be a positive integer or auto; got {jobs!r}")
    else:
        jobs = int(jobs)
    cluster = merged.get("cluster")
    if cluster not in (None, "slurm", "local"):
        raise UserError(f"{where}: cluster: must be slurm or local; got {cluster!r}")
    ints = {}
    for key, low in (("time", 1), ("gpus", 0), ("cpus", 1)):
        value = merged.get(key, {"time": 60, "gpus": 0, "cpus": 1}[key])
        if not str(value).isdigit() or int(value) < low:
            raise UserError(f"{where}: {key}: must be an integer >= {low}; got {value!r}")
        ints[key] = int(value)
    if name != "slurm" and (cluster or merged.get("detach") or merged.get("partition")
                            or merged.get("account")):
        raise UserError(f"{where}: --cluster, --partition, --account and --detach are Slurm "
                        f"options; got them with executor {name}", "add --executor slurm")
    if name != "ray" and merged.get("address"):
        raise UserError(f"{where}: --address is a Ray option; got it with executor {name}",
                        "add --executor ray")
    if name != "local" and jobs != 1:
        raise UserError(f"{where}: --jobs is for the local executor; {name} runs every pending "
                        "run at once, as its resources allow", "drop --jobs")
    return ExecutorOptions(
        name=name, jobs=jobs, cluster=None if cluster == "slurm" else cluster,
        partition=merged.get("partition"), time_min=ints["time"], gpus=ints["gpus"],
        cpus=ints["cpus"], account=merged.get("account"), address=merged.get("address"),
        detach=bool(merged.get("detach", False)),
    )


def require(module: str, extra: str, option: str) -> Any:
    """Import an optional dependency, or a UserError with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{option} needs the '{module}' package, which is not installed",
                        f"pip install -e '.[{extra}]'") from None


# ---------------------------------------------------------------------------------------------
# placement: which cores and GPU a worker gets


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every NVML device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int | str, device: str) -> tuple[int, list[str]]:
    """(workers at once, GPU ids to pin them to; empty on CPU). `auto`: one per visible GPU,
    1 on CPU (the frameworks already use every core; more workers only split them)."""
    gpus = [] if device == "cpu" else visible_gpus()
    if jobs == "auto":
        return (len(gpus), gpus) if gpus else (1, [])
    return int(jobs), gpus


def placement_env(slot: int, workers: int, gpus: list[str], threads: int | None) -> dict[str, str]:
    """The environment variables that place worker `slot` of `workers`."""
    env = {"HARNESS_WORKERS": str(workers), "HARNESS_SLOT": str(slot)}
    if threads is not None:
        env.update({"HARNESS_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads)})
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        env["HARNESS_GPU"] = gpus[slot % len(gpus)]
    return env


def placement() -> dict[str, Any]:
    """What the worker records of its placement (read from its environment)."""
    env = os.environ

    def num(name: str) -> int | None:
        value = env.get(name)
        return int(value) if value and value.isdigit() else None

    return {
        "executor": env.get("HARNESS_EXECUTOR", "local"),
        "workers_sharing_machine": num("HARNESS_WORKERS") or 1,
        "threads": num("HARNESS_THREADS"),  # None: the framework's default
        "gpu": env.get("HARNESS_GPU"),
        "cpu_cores": cpu_count(),
    }


# ---------------------------------------------------------------------------------------------
# running one worker process (locally, or inside a Ray task / Slurm job)


@dataclass(frozen=True)
class Ended:
    """How one worker process ended: its exit code (None: never ran) and whether it overran."""

    returncode: int | None
    timed_out: bool = False
    interrupted: bool = False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGKILL if its parent dies (kill -9), instead of training on."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_worker(job_path: Path, env: dict[str, str], stdout: Any, stderr: Any
                 ) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.worker", str(job_path)],
        stdout=stdout,
        stderr=stderr,
        env=env,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,  # Ctrl-C reaches the harness, which stops the worker
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill what is left of the worker's process group (grandchildren holding a GPU or the
    pipe) once the worker itself is gone."""
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def terminate(proc: subprocess.Popen[str], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM to the worker's process group, SIGKILL after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def remote_worker(job_path: str, env_overrides: dict[str, str], log: str, progress: str,
                  timeout_s: float) -> tuple[int | None, bool]:
    """Run one worker where this function runs (a Ray task, a Slurm job): its progress lines go
    to `progress`, its stderr to `log`. Returns (exit code, timed out). SIGTERM (a cancelled
    job) stops the worker first."""
    env = {**os.environ, **env_overrides}
    with open(progress, "w", encoding="utf-8") as out, open(log, "w", encoding="utf-8") as err:
        proc = start_worker(Path(job_path), env, out, err)
        previous = signal.signal(signal.SIGTERM, lambda *_: terminate(proc))
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            terminate(proc)
            return proc.returncode, True
        finally:
            signal.signal(signal.SIGTERM, previous)
            reap(proc)
    return proc.returncode, False


# ---------------------------------------------------------------------------------------------
# the executors


@dataclass
class Launch:
    """One job handed to an executor: its job file, its environment, where its log goes."""

    job: Any  # harness.records.Job
    job_path: Path
    env: dict[str, str]  # the full environment the runner computed (before placement)
    log: Path
    progress: Path
    timeout_s: float


# start(launch, env) -> Ended for the local executor; the runner supplies it (pipes, progress)
StartLocal = Callable[[Launch, dict[str, str]], Ended]
# done(launch, ended) -> None: the runner finishes the run (result, outcome, progress line)
Done = Callable[[Launch, Ended], None]
# event(launch, line) -> None: a progress line read from a remote worker's progress file
Event = Callable[[Launch, str], None]


@dataclass
class LocalExecutor:
    """`--jobs N` workers at once on this machine, each with its share of the cores (or its
    GPU); threads of the harness wait on the worker processes."""

    jobs: int
    gpus: list[str] = field(default_factory=list)
    cores: int = field(default_factory=cpu_count)
    name: str = "local"

    @property
    def threads(self) -> int | None:
        """Each worker's thread count; None for one worker (the framework's default, as before)."""
        if self.jobs <= 1 or self.gpus:
            return None
        return max(1, self.cores // self.jobs)

    def run(self, launches: list[Launch], start: StartLocal, done: Done, event: Event,
            stop: threading.Event) -> None:
        slots = list(range(max(1, self.jobs)))
        free = list(reversed(slots))
        lock = threading.Lock()

        def one(launch: Launch) -> None:
            with lock:
                slot = free.pop()
            try:
                if stop.is_set():
                    return  # never started: nothing to finish
                env = {**launch.env, **placement_env(slot, len(slots), self.gpus, self.threads)}
                done(launch, start(launch, env))
            finally:
                with lock:
                    free.append(slot)

        with ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="harness-slot") as pool:
            pending: set[Future[None]] = {pool.submit(one, launch) for launch in launches}
            while pending:  # the main thread stays free to take Ctrl-C (it sets `stop`)
                finished, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()  # a bug in the runner surfaces here


class _ProgressTail:
    """Reads the new complete lines of remote workers' progress files."""

    def __init__(self) -> None:
        self.offsets: dict[Path, int] = {}

    def lines(self, path: Path) -> list[str]:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offsets.get(path, 0))
                text = f.read()
        except OSError:
            return []
        complete, _, _rest = text.rpartition("\n")
        if not complete and not text.endswith("\n"):
            return []
        self.offsets[path] = self.offsets.get(path, 0) + len(complete.encode("utf-8")) + 1
        return complete.split("\n")


def _overrides(env: dict[str, str]) -> dict[str, str]:
    """What the runner changed relative to this process's environment: a remote node keeps its
    own PATH, HOME and the like."""
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


@dataclass
class RayExecutor:
    """One Ray task per run with its CPU/GPU resources; `address` None starts a local Ray (or
    joins the one this process already started)."""

    address: str | None = None
    cpus: int = 1
    gpus: int = 0
    name: str = "ray"

    def run(self, launches: list[Launch], start: StartLocal, done: Done, event: Event,
            stop: threading.Event) -> None:
        ray = require("ray", "ray", "--executor ray")
        started_here = not ray.is_initialized()  # else: the caller's Ray (a test, a notebook)
        if started_here:
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            for s, h in handlers.items():  # Ray installs its own; Ctrl-C must reach the runner
                signal.signal(s, h)
        try:
            self._run(ray, launches, done, event, stop)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, ray: Any, launches: list[Launch], done: Done, event: Event,
             stop: threading.Event) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        # the task imports this checkout's harness (one the nodes see on the shared filesystem)
        task = ray.remote(remote_worker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0,
            runtime_env={"env_vars": {"PYTHONPATH": root}})
        refs = {}
        for launch in launches:
            env = {**launch.env, **placement_env(0, 1, [], self.cpus), "HARNESS_EXECUTOR": "ray"}
            env.pop("HARNESS_SLOT", None)
            if self.gpus:  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs
                env.pop("CUDA_VISIBLE_DEVICES", None)
            refs[task.remote(str(launch.job_path), _overrides(env), str(launch.log),
                             str(launch.progress), launch.timeout_s)] = launch
        tail = _ProgressTail()
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
            for launch in refs.values():
                for line in tail.lines(launch.progress):
                    event(launch, line)
            for ref in ready:
                launch = refs.pop(ref)
                try:
                    rc, timed_out = ray.get(ref)
                    ended = Ended(rc, timed_out)
                except Exception as e:  # noqa: BLE001 - the task died (node lost, killed)
                    print(f"ray: task of {launch.job.key.id} failed: {e}", file=sys.stderr)
                    ended = Ended(None)
                done(launch, ended)
            if stop.is_set():
                for ref in refs:
                    ray.cancel(ref, force=True)
                for launch in refs.values():
                    done(launch, Ended(None, interrupted=True))
                return


SUBMITTED = "submitted.json"


@dataclass
class SlurmExecutor:
    """One Slurm job array (submitit) for the pending runs; `cluster` "local" sends the same
    array through submitit's local backend (real subprocesses on this machine)."""

    results_dir: Path
    cluster: str | None = None
    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int = 1
    account: str | None = None
    detach: bool = False
    name: str = "slurm"

    def check(self) -> None:
        """Before any work: the extra is installed and Slurm is there (or --cluster local)."""
        require("submitit", "slurm", "--executor slurm")
        if self.cluster is None and shutil.which("sbatch") is None:
            raise UserError(
                "--executor slurm: no Slurm on this machine (sbatch is not on PATH)",
                "run on a Slurm login node, or add --cluster local to use submitit's local "
                "backend, or use --jobs N",
            )

    def run(self, launches: list[Launch], start: StartLocal, done: Done, event: Event,
            stop: threading.Event) -> None:
        submitit = require("submitit", "slurm", "--executor slurm")
        folder = self.results_dir / "slurm"
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster or "slurm")
        params: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus,
                                  "name": f"harness-{self.results_dir.name}"}
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.account:
            params["slurm_account"] = self.account
        executor.update_parameters(**params)
        jobs = []
        with executor.batch():  # one job array
            for launch in launches:
                env = {**launch.env, **placement_env(0, 1, [], self.cpus),
                       "HARNESS_EXECUTOR": f"slurm{'-local' if self.cluster else ''}"}
                env.pop("HARNESS_SLOT", None)
                if self.gpus:
                    env.pop("CUDA_VISIBLE_DEVICES", None)  # Slurm sets the job's GPUs
                jobs.append(executor.submit(remote_worker, str(launch.job_path), _overrides(env),
                                            str(launch.log), str(launch.progress),
                                            launch.timeout_s))
        record = {launch.job.key.id: {"job_id": str(job.job_id), "attempt": launch.job.attempt,
                                      "run_hash": launch.job.run_hash,
                                      "cluster": self.cluster or "slurm"}
                  for launch, job in zip(launches, jobs, strict=True)}
        _write_submitted(self.results_dir, record)
        first = str(jobs[0].job_id).split("_")[0] if jobs else "-"
        print(f"slurm: submitted {len(jobs)} run(s) as job array {first} "
              f"({'submitit local backend' if self.cluster else 'Slurm'}); logs in {folder}")
        if self.detach:
            return
        tail = _ProgressTail()
        running = dict(zip(jobs, launches, strict=True))
        while running:
            for launch in running.values():
                for line in tail.lines(launch.progress):
                    event(launch, line)
            for job in [j for j in running if j.done()]:
                launch = running.pop(job)
                try:
                    rc, timed_out = job.result()
                    ended = Ended(rc, timed_out)
                except Exception as e:  # noqa: BLE001 - the job died (preempted, killed)
                    print(f"slurm: job {job.job_id} of {launch.job.key.id} failed: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          file=sys.stderr)
                    ended = Ended(None)
                done(launch, ended)
            if stop.is_set():
                for job in running:
                    job.cancel(check=False)
                for launch in running.values():
                    done(launch, Ended(None, interrupted=True))
                return
            if running:
                time.sleep(POLL_S)


def _write_submitted(results_dir: Path, record: dict[str, Any]) -> None:
    from harness.results import write_json_atomic

    old = read_submitted(results_dir)
    write_json_atomic(results_dir / SUBMITTED, {**old, **record})


def read_submitted(results_dir: Path) -> dict[str, Any]:
    """Runs a Slurm executor submitted (`--detach`): run id -> job id, attempt, run hash."""
    try:
        data = json.loads((results_dir / SUBMITTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def still_queued(entry: dict[str, Any]) -> bool:
    """Whether a submitted job may still write its result (Slurm: squeue knows it; submitit
    local: its process is alive)."""
    job_id = str(entry.get("job_id", ""))
    if entry.get("cluster") == "local":
        if not job_id.isdigit():
            return False
        try:
            os.kill(int(job_id), 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    if shutil.which("squeue") is None:
        return False
    out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def make_executor(options: ExecutorOptions, device: str, results_dir: Path
                  ) -> LocalExecutor | RayExecutor | SlurmExecutor:
    """The executor the options ask for; checks what it needs before any work is done."""
    if options.name == "ray":
        require("ray", "ray", "--executor ray")
        return RayExecutor(options.address, options.cpus, options.gpus)
    if options.name == "slurm":
        slurm = SlurmExecutor(results_dir, options.cluster, options.partition, options.time_min,
                              options.gpus, options.cpus, options.account, options.detach)
        slurm.check()
        return slurm
    jobs, gpus = resolve_jobs(options.jobs, device)
    return LocalExecutor(jobs, gpus)
