"""Provenance: keys and values, no framework imports, git facts, code_version."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from harness import __version__
from harness import provenance as prov

REPO = Path(prov.__file__).resolve().parent.parent


def make_fake_nvml(count: int) -> types.ModuleType:
    """A pynvml stand-in with the calls gpu_info makes (80 GiB devices, CUDA 12.4 driver)."""
    m = types.ModuleType("pynvml")
    m.NVMLError = type("NVMLError", (Exception,), {})  # type: ignore[attr-defined]
    m.calls = []  # type: ignore[attr-defined]
    m.nvmlInit = lambda: m.calls.append("init")  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: m.calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: b"Fake GPU 80GB"  # type: ignore[attr-defined]
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(total=80 * 1048576 * 1024, used=0)
    )
    return m


@pytest.fixture(autouse=True)
def _fresh_caches():
    prov.git_info.cache_clear()
    prov.code_version.cache_clear()
    yield
    prov.git_info.cache_clear()
    prov.code_version.cache_clear()


def test_collect_provenance_keys_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    p = prov.collect_provenance(extra={"framework": {"name": "numpy-only"}})
    assert json.loads(json.dumps(p)) == p
    assert set(p) >= {
        "timestamp_utc", "code_version", "python", "platform", "hostname", "cpu",
        "ram_total_mib", "packages", "git", "argv", "env", "gpu", "extra",
    }  # fmt: skip
    assert p["python"]["version"] == platform.python_version()
    assert p["python"]["implementation"] == platform.python_implementation()
    assert p["packages"]["numpy"] == np.__version__
    for name in ("tensorflow", "keras", "torch", "torchvision", "jax"):
        assert p["packages"][name] == prov.package_version(name)
    assert p["cpu"]["logical_cores"] == os.cpu_count()
    assert p["cpu"]["model"]
    assert p["ram_total_mib"] > 100
    assert p["env"]["PYTHONHASHSEED"] == "0"
    assert p["env"]["KERAS_BACKEND"] is None
    assert set(prov.DETERMINISM_ENV) == set(p["env"])
    assert p["argv"] == sys.argv
    assert p["extra"] == {"framework": {"name": "numpy-only"}}
    assert p["code_version"] == prov.code_version()
    ts = p["timestamp_utc"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", ts)


def test_missing_package_is_none() -> None:
    assert prov.package_version("surely-not-an-installed-package-xyz") is None


def test_collect_provenance_imports_no_framework() -> None:
    code = (
        "import harness.provenance as p; p.collect_provenance(); import sys; "
        "bad = [m for m in ('tensorflow', 'torch', 'keras', 'jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_git_facts_match_git() -> None:
    g = prov.git_info()
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("git not installed")
    if head.returncode != 0:
        assert g["value"] is None and "git" in g["reason"]
        return
    assert g["commit"] == head.stdout.strip()
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
    )
    assert g["dirty"] == bool(status.stdout.strip())
    assert "harness/provenance.py" in g["files"]
    assert all(f.endswith(".py") for f in g["files"])


def test_code_version_format_and_speed() -> None:
    t0 = time.perf_counter()
    v = prov.code_version()
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5  # typically ~40 ms: three git calls and hashing a few files
    commit = r"g[0-9a-f]{12}(-dirty\.[0-9a-f]{8})?"
    pattern = rf"{re.escape(__version__)}\+({commit}|nogit\.[0-9a-f]{{8}})"
    assert re.fullmatch(pattern, v), v
    g = prov.git_info()
    if g.get("dirty"):
        assert v.endswith(f"-dirty.{prov.code_hash()}")


def test_code_hash_changes_with_content_and_name(tmp_path: Path) -> None:
    (tmp_path / "harness").mkdir()
    a = tmp_path / "harness" / "a.py"
    a.write_text("x = 1\n")
    h1 = prov.code_hash([a], root=tmp_path)
    assert prov.code_hash([a], root=tmp_path) == h1
    a.write_text("x = 2\n")
    h2 = prov.code_hash([a], root=tmp_path)
    assert h2 != h1
    b = tmp_path / "harness" / "b.py"
    b.write_text("x = 2\n")
    assert prov.code_hash([b], root=tmp_path) != h2
    b.unlink()
    assert prov.code_hash([b], root=tmp_path) != h2  # deleted but listed: still a version


def test_outside_a_git_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "m.py").write_text("y = 1\n")
    monkeypatch.setattr(prov, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    g = prov.git_info()
    assert g["value"] is None
    assert g["reason"].startswith("git rev-parse failed: fatal: not a git repository")
    v = prov.code_version()
    assert v == f"{__version__}+nogit.{prov.code_hash([tmp_path / 'harness' / 'm.py'])}"
    p = prov.collect_provenance()
    assert p["git"]["value"] is None and "not a git repository" in p["git"]["reason"]


def test_without_git_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    g = prov.git_info()
    assert g == {"value": None, "reason": "git not found on PATH"}
    assert "+nogit." in prov.code_version()


def test_gpu_not_measured_without_driver() -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    except Exception:
        pass
    g = prov.gpu_info()
    assert g["value"] is None and g["reason"].startswith("NVML not available")


def test_gpu_info_through_stand_in_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake_nvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    g = prov.gpu_info()
    assert g == {
        "devices": [
            {"index": 0, "name": "Fake GPU 80GB", "memory_total_mib": 81920.0},
            {"index": 1, "name": "Fake GPU 80GB", "memory_total_mib": 81920.0},
        ],
        "driver_version": "550.54.15",
        "cuda_driver_version": "12.4",
    }
    assert fake.calls == ["init", "shutdown"]
    assert prov.collect_provenance()["gpu"] == g
