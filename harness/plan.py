"""Planning: which (model, backend, seed) runs a spec asks for, and which are already done.

    python -m harness run specs/demo.yaml --dry-run

A run is identified by its `run_hash`: the parts of the spec that affect training (the model, data,
augmentation, runtime determinism and device, the seed, the backend), the data hash (content of the
image cache and the split) and the version of the code that trains (backends/ and the harness
modules on the training path). Evaluation settings (bootstrap, metrics) are not in it: changing
them re-analyses results, it does not retrain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.errors import UserError
from harness.spec import Spec, check_backends, spec_digest

ROOT = Path(__file__).resolve().parent.parent
# The code whose change must invalidate finished runs: what builds, feeds and trains models.
# Each backend adds its own module(s), so editing the Keras backend does not rerun torch runs.
TRAINING_CODE = (
    "backends/base.py",
    "backends/registry.py",
    "harness/data",
    "harness/worker.py",
    "harness/spec",
    "harness/vocab.py",
)
# Fields of a model that name or describe it without changing what is trained.
NOT_TRAINING = ("name", "description", "printed_params", "backends")


@dataclass(frozen=True, order=True)
class RunKey:
    model: str
    backend: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}__{self.backend}__seed{self.seed}"


def _pick(kind: str, asked: list[str] | None, known: Sequence[str]) -> list[str]:
    if not asked:
        return list(known)
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise UserError(
            f"--{kind}: unknown {kind[:-1]} '{unknown[0]}'; this spec has: {', '.join(known)}"
        )
    return [k for k in known if k in asked]


def plan_runs(
    spec: Spec,
    models: list[str] | None = None,
    backends: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[RunKey]:
    """models x backends x seeds, filtered by the --models/--backends/--seeds options."""
    from backends.registry import REGISTRY  # framework-free: names and claims, imports none

    check_backends(spec, {e.name: e.supports for e in REGISTRY.values()})
    chosen = _pick("models", models, [m.name for m in spec.models])
    all_backends = sorted({b for m in spec.models for b in m.backends})
    chosen_backends = _pick("backends", backends, all_backends)
    if seeds:
        unknown_seeds = [s for s in seeds if s not in spec.seeds]
        if unknown_seeds:
            raise UserError(
                f"--seeds: seed {unknown_seeds[0]} is not in the spec's seeds "
                f"{list(spec.seeds)}; add it with --set seeds=[...]"
            )
    chosen_seeds = [s for s in spec.seeds if not seeds or s in seeds]
    keys = [
        RunKey(m.name, b, s)
        for m in spec.models
        if m.name in chosen
        for b in m.backends
        if b in chosen_backends
        for s in chosen_seeds
    ]
    return keys


@lru_cache(maxsize=8)
def training_code_version(backend: str | None = None) -> str:
    """sha256 (short) of the source files on the training path (of one backend, if named)."""
    rels = list(TRAINING_CODE)
    if backend is not None:
        from backends.registry import entry  # framework-free: names modules, imports none

        e = entry(backend)
        for module in (e.target.split(":")[0], e.env_module):
            if module:
                rels.append(module.replace(".", "/") + ".py")
    h = hashlib.sha256()
    for rel in rels:
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_hash(spec: Spec, key: RunKey, data_hash: str) -> str:
    data = spec.data.model_dump(mode="json")
    data.pop("root", None)  # where the data lives is not what it is: data_hash covers content
    model = spec.model(key.model).model_dump(mode="json", exclude=set(NOT_TRAINING))
    payload = {
        "model": model,
        "data": data,
        "augmentation": spec.augmentation.model_dump(mode="json"),
        "runtime": {"deterministic": spec.runtime.deterministic, "device": spec.runtime.device},
        "backend": key.backend,
        "seed": key.seed,
        "data_hash": data_hash,
        "code": training_code_version(key.backend),
    }
    return spec_digest(payload)[:20]
