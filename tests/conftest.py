"""Shared test setup: caches out of home, the backends this env can run, small specs."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_tmp = Path(tempfile.gettempdir()) / "harness-test-home"
for var, sub in (("KERAS_HOME", "keras"), ("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "mpl"),
                 ("HARNESS_CACHE", "cache")):
    os.environ.setdefault(var, str(_tmp / sub))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_FRAMEWORK_BACKENDS = {"keras": "tensorflow", "torch": "torch"}


if os.environ.get("HARNESS_TEST_FRAMEWORK") == "keras-torch":
    # Keras reads its backend at import: torch here, never TensorFlow
    os.environ["KERAS_BACKEND"] = "torch"


def available_backends() -> list[str]:
    """Framework backends importable here (one per tox env; never both in one process)."""
    only = os.environ.get("HARNESS_TEST_FRAMEWORK")
    if only == "keras-torch":  # Keras 3 on its PyTorch backend (tox -e keras-torch)
        found = all(importlib.util.find_spec(m) is not None for m in ("keras", "torch"))
        return ["keras-torch"] if found else []
    names = []
    for name, module in _FRAMEWORK_BACKENDS.items():
        if only and {"tf": "keras", "torch": "torch"}.get(only) != name:
            continue
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    # TensorFlow and torch in one process can segfault: without a choice, test one framework
    return names if only else names[:1]


@pytest.fixture
def repo_root() -> Path:
    return ROOT
