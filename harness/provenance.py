"""Where a result came from: versions, machine, GPU driver, git commit, command, determinism env.

    from harness.provenance import collect_provenance, code_version
    prov = collect_provenance(extra={"framework": backend.describe()})   # JSON-serializable dict
    key = code_version()   # "0.1.0+g1a2b3c4d5e6f" or "0.1.0+g1a2b3c4d5e6f-dirty.9f8e7d6c"

Framework versions are read from installed package metadata; tensorflow, keras and torch are
never imported here. Anything that cannot be determined is {"value": None, "reason": "..."},
the same not-measured shape as harness.monitor.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from harness import __version__

GIT_TIMEOUT_S = 5.0
CODE_DIRS = ("harness", "backends")

# Distribution names to try per package: the TF CPU wheel is "tensorflow-cpu", and so on.
PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "scikit-learn": ("scikit-learn",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"),
    "keras": ("keras", "keras-nightly"),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "nvidia-ml-py": ("nvidia-ml-py",),
    "psutil": ("psutil",),
}

DETERMINISM_ENV = (
    "PYTHONHASHSEED",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUBLAS_WORKSPACE_CONFIG",
    "TF_ENABLE_ONEDNN_OPTS",
    "TF_DETERMINISTIC_OPS",
    "TF_CUDNN_DETERMINISTIC",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "KERAS_BACKEND",
    "TF_FORCE_GPU_ALLOW_GROWTH",
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _not_measured(reason: str) -> dict[str, Any]:
    return {"value": None, "reason": reason}


def package_version(name: str) -> str | None:
    """Installed version of `name` (trying its known distribution names), or None."""
    for dist in PACKAGES.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else platform.processor(), else the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    """stdout of `git -C REPO_ROOT args`; raises RuntimeError with a one-line reason."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise RuntimeError("git not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"git {args[0]} timed out after {GIT_TIMEOUT_S:g} s") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"git {args[0]} failed: {first}")
    return out.stdout


@functools.lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """Commit and dirtiness of the repository holding this file (cached per process).

    {"commit": sha, "dirty": bool, "files": [paths of .py code files]} or a not-measured dict.
    "dirty" counts untracked files too, since untracked code runs all the same.
    """
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=normal")
        files = _git(
            "ls-files", "--cached", "--others", "--exclude-standard", "--", *CODE_DIRS
        ).splitlines()
    except RuntimeError as exc:
        return _not_measured(str(exc))
    return {
        "commit": commit,
        "dirty": bool(status.strip()),
        "files": sorted(f for f in files if f.endswith(".py")),
    }


def _code_files() -> list[Path]:
    git = git_info()
    if "files" in git:
        return [REPO_ROOT / f for f in git["files"]]
    return sorted(
        p for d in CODE_DIRS for p in (REPO_ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
    )


def code_hash(files: list[Path] | None = None, root: Path | None = None) -> str:
    """Short sha256 over the paths (relative to root) and contents of the code files."""
    root = root or REPO_ROOT
    h = hashlib.sha256()
    for path in files if files is not None else _code_files():
        try:
            data = path.read_bytes()
        except OSError:
            # Listed by git but deleted in the working tree: that is a change too.
            data = b"<missing>"
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(data)
        h.update(b"\0")
    return h.hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Identify the running code: version + commit, plus a content hash when the tree is dirty.

    Results are reused only when this string matches, so edited code gets a new version.
    """
    git = git_info()
    if "commit" not in git:
        return f"{__version__}+nogit.{code_hash()}"
    version = f"{__version__}+g{git['commit'][:12]}"
    if git["dirty"]:
        version += f"-dirty.{code_hash()}"
    return version


def gpu_info() -> dict[str, Any]:
    """GPU names, memory, driver and CUDA driver version via NVML, or not measured."""
    try:
        import pynvml
    except ImportError:
        return _not_measured("NVML not available: pynvml (nvidia-ml-py) not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "not measured"
        return _not_measured(f"NVML not available: {type(exc).__name__}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            cuda_version: str | None = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except (AttributeError, pynvml.NVMLError):
            cuda_version = None
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            dev: dict[str, Any] = {"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle))}
            try:
                dev["memory_total_mib"] = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1048576
            except pynvml.NVMLError:
                dev["memory_total_mib"] = None
            devices.append(dev)
        if not devices:
            return _not_measured("no GPU visible (NVML sees 0 devices)")
        return {
            "devices": devices,
            "driver_version": driver,
            "cuda_driver_version": cuda_version,
        }
    except Exception as exc:  # noqa: BLE001
        return _not_measured(f"NVML error: {type(exc).__name__}: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def collect_provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to say where a result came from; `extra` (backend facts) -> "extra"."""
    git = git_info()
    ram = psutil.virtual_memory().total
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
        },
        "hostname": socket.gethostname(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False),
        },
        "ram_total_mib": ram / 1048576,
        "packages": {name: package_version(name) for name in PACKAGES},
        "git": ({"commit": git["commit"], "dirty": git["dirty"]} if "commit" in git else dict(git)),
        "argv": list(sys.argv),
        "env": {name: os.environ.get(name) for name in DETERMINISM_ENV},
        "gpu": gpu_info(),
        "extra": dict(extra) if extra else {},
    }
