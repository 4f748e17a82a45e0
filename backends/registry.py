"""Backend registry: name -> "module:Class", imported lazily (in the worker process only).

    python -m harness list          # shows this table

A machine with one framework runs that framework: nothing here imports one. `create(name)`
imports the backend's module; a known backend whose framework is missing raises `UserError`
that names the extra to install.

Third-party backends register through the entry point group `repro_harness.backends`, e.g. in
their pyproject.toml:

    [project.entry-points."repro_harness.backends"]
    mybackend = "my_package.backend:MyBackend"      # a backends.base.Backend subclass

They join REGISTRY when this module is imported (reading the metadata imports nothing; a
built-in name is never replaced). The registry is the authority on backend names: the spec
accepts exactly the names in REGISTRY.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field

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
    plugin: bool = False  # registered through the entry point group, not built in
    # the vocabulary it builds and trains (harness.vocab); None: not declared, not checked
    supports: Supports | None = None


ENTRY_POINT_GROUP = "repro_harness.backends"

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
            "keras-jax",
            {"KERAS_BACKEND": "jax"},
            "the same Keras code on Keras 3's JAX backend (jitted stateless train step)",
            "backends.jax_env",
            supports=PAPER_MODELS,
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


def _entry_point_backends() -> dict[str, BackendEntry]:
    found = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in REGISTRY or ep.name in found:
            continue
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist is not None else "an installed package"
        found[ep.name] = BackendEntry(
            ep.name, ep.value, (), "", description=f"entry point of {source}", plugin=True
        )
    return found


REGISTRY.update(_entry_point_backends())


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
        return "pip install -e '.[keras-jax]'"
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
    module_name, _, cls_name = e.target.partition(":")
    if not e.plugin:
        return getattr(importlib.import_module(module_name), cls_name)(device=device)
    try:  # someone else's code: any failure to load it is one clear line, not a traceback
        if not cls_name:
            raise ValueError("the entry point must be 'module:Class'")
        cls = getattr(importlib.import_module(module_name), cls_name)
    except Exception as ex:  # noqa: BLE001
        raise UserError(
            f"backend '{name}' (entry point {ENTRY_POINT_GROUP}: {name} = {e.target}) cannot be "
            f"loaded: {type(ex).__name__}: {ex}",
            "fix or reinstall the package that provides it",
        ) from None
    return cls(device=device)
