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


# Keras 3 on another framework (tox -e keras-torch / keras-jax): HARNESS_TEST_FRAMEWORK -> the
# backend name, the framework module, KERAS_BACKEND (Keras reads it at import; never TensorFlow)
_KERAS_ON = {"keras-torch": "torch", "keras-jax": "jax"}
if os.environ.get("HARNESS_TEST_FRAMEWORK") in _KERAS_ON:
    os.environ["KERAS_BACKEND"] = _KERAS_ON[os.environ["HARNESS_TEST_FRAMEWORK"]]


def available_backends() -> list[str]:
    """Framework backends importable here (one per tox env; never both in one process)."""
    only = os.environ.get("HARNESS_TEST_FRAMEWORK")
    if only in _KERAS_ON:  # Keras 3 on its PyTorch or JAX backend (tox -e keras-torch|keras-jax)
        found = all(importlib.util.find_spec(m) is not None for m in ("keras", _KERAS_ON[only]))
        return [only] if found else []
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
