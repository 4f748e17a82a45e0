"""Backend registry: name -> "module:Class", imported lazily (in the worker process only).

    python -m harness list          # shows this table

A machine with one framework runs that framework: nothing here imports one. `create(name)`
imports the backend's module; a known backend whose framework is missing raises `UserError`
that names the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field, replace

from harness.errors import UserError
from harness.vocab import PAPER_MODELS, Supports


@dataclass(frozen=True)
class BackendEntry:
    name: str
    target: str  # "module:Class"
    requires: tuple[str, ...]  # top-level modules that must be importable
    extra: str  # pip extra that installs them
    env: dict[str, str] = field(default_factory=dict)  # set in the worker before import
    description: str = ""
    # a light module with PRE_IMPORT_ENV = {"deterministic": {...}, "default": {...}}: variables
    # the framework reads at import (oneDNN, CUBLAS workspace); users may override them
    env_module: str | None = None
    # the vocabulary it builds and trains (harness.vocab); None: not declared, checked by name only
    supports: Supports | None = None


REGISTRY: dict[str, BackendEntry] = {
    e.name: e
    for e in (
        BackendEntry(
            "reference",
            "backends.reference:ReferenceBackend",
            ("numpy",),
            "",
            description="numpy; the paper's random baseline",
            supports=Supports(kinds=("random",)),
        ),
        BackendEntry(
            "keras",
            "backends.keras_backend:KerasBackend",
            ("keras", "tensorflow"),
            "tf",
            {"KERAS_BACKEND": "tensorflow"},
            "Keras 3 on TensorFlow",
            "backends.keras_env",
            supports=PAPER_MODELS,
        ),
        BackendEntry(
            "keras-torch",
            "backends.keras_backend:KerasBackend",
            ("keras", "torch"),
            "torch] keras",
            {"KERAS_BACKEND": "torch"},
            "the same Keras code on Keras 3's PyTorch backend (eager torch-autograd train step)",
            "backends.torch_env",
            supports=PAPER_MODELS,
        ),
        BackendEntry(
            "keras-jax",
            "backends.keras_backend:KerasBackend",
            ("keras", "jax"),
            "jax",
            {"KERAS_BACKEND": "jax"},
            "the same Keras code on Keras 3's JAX backend (build/predict only, no training)",
            supports=replace(PAPER_MODELS, optimizers=(), trains=False),
        ),
        BackendEntry(
            "torch",
            "backends.torch_backend:TorchBackend",
            ("torch", "torchvision"),
            "torch",
            description="PyTorch + torchvision, Keras semantics made explicit",
            env_module="backends.torch_env",
            supports=PAPER_MODELS,
        ),
    )
}


def entry(name: str) -> BackendEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown backend '{name}'; known backends: {', '.join(REGISTRY)}"
        ) from None


def missing_modules(name: str) -> list[str]:
    """Modules the backend needs that are not installed (checked without importing them)."""
    return [m for m in entry(name).requires if importlib.util.find_spec(m) is None]


def install_hint(name: str) -> str:
    e = entry(name)
    if e.name == "keras-torch":
        return "pip install -e '.[torch]' keras"
    if e.name == "keras-jax":
        return "pip install -e . keras jax"
    return f"pip install -e '.[{e.extra}]'"


def create(name: str, device: str = "auto", deterministic: bool = True):  # type: ignore[no-untyped-def]
    """Import and instantiate a backend. Call only inside a worker process: it sets the
    environment variables the framework reads at import time."""
    e = entry(name)
    missing = missing_modules(name)
    if missing:
        raise UserError(
            f"backend '{name}' needs {', '.join(missing)}, which is not installed",
            f"install it with: {install_hint(name)}",
        )
    os.environ.update(e.env)
    if e.env_module:
        pre = importlib.import_module(e.env_module).PRE_IMPORT_ENV
        for k, v in pre.get("deterministic" if deterministic else "default", {}).items():
            os.environ.setdefault(k, v)
    module_name, cls_name = e.target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)(device=device)
