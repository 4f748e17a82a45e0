"""Planning: which (model, backend, seed) runs a spec asks for, and which are already done.

    python -m harness run specs/demo.yaml --dry-run

    plan = make_plan(spec, Selection(models=["cnn"]))    # keys, code versions, spec hash
    plan = plan.with_data(data.data_hash)                # + every run's hash, computed once
    plan.run_hashes[key.id]; run_status(plan, results_dir)

A run is identified by its `run_hash`: the parts of the spec that affect training (the model, data,
augmentation, runtime determinism and device, the seed, the backend), the data hash (content of the
image cache and the split) and the version of the code that trains (backends/ and the harness
modules on the training path). Evaluation settings (bootstrap, metrics) are not in it: changing
them re-analyses results, it does not retrain.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from harness.errors import UserError
from harness.records import RunKey
from harness.results import RunFileError, read_run, run_path
from harness.spec import Spec, spec_digest

__all__ = ["Plan", "RunKey", "Selection", "make_plan", "plan_runs", "run_hash", "run_status",
           "training_code_version"]

ROOT = Path(__file__).resolve().parent.parent
# The code whose change must invalidate finished runs: what builds, feeds and trains models.
# Each backend adds its own module(s), so editing the Keras backend does not rerun torch runs.
TRAINING_CODE = (
    "backends/base.py",
    "backends/registry.py",
    "harness/data",
    "harness/worker.py",
    "harness/spec.py",
)
# Fields of a model that name or describe it without changing what is trained.
NOT_TRAINING = ("name", "description", "printed_params", "backends")


@dataclass(frozen=True)
class Selection:
    """The --models/--backends/--seeds options; None selects all."""

    models: Sequence[str] | None = None
    backends: Sequence[str] | None = None
    seeds: Sequence[int] | None = None


@dataclass(frozen=True)
class Plan:
    """Every run a spec asks for, the selected ones, and (once the data is known) their hashes.
    plan.json, the skip-if-done check and every job take their hashes from one Plan."""

    spec: Spec
    runs: tuple[RunKey, ...]  # all of the spec's runs (plan.json)
    selected: tuple[RunKey, ...]  # the ones to run now
    spec_hash: str
    code_versions: Mapping[str, str]  # backend -> training_code_version(backend)
    data_hash: str | None = None  # None: the data is not prepared (validate, --dry-run)
    run_hashes: Mapping[str, str] = field(default_factory=dict)  # run id -> run hash

    def with_data(self, data_hash: str | None) -> Plan:
        """The plan with every run's hash for this data (none when data_hash is None)."""
        if data_hash is None:
            return dataclasses.replace(self, data_hash=None, run_hashes={})
        hashes = {
            k.id: run_hash(self.spec, k, data_hash, self.code_versions[k.backend])
            for k in self.runs
        }
        return dataclasses.replace(self, data_hash=data_hash, run_hashes=hashes)


def make_plan(spec: Spec, selection: Selection = Selection()) -> Plan:
    """The spec's runs and the selected ones; --models/--backends/--seeds errors are raised here,
    before any data is prepared."""
    runs = tuple(plan_runs(spec))
    selected = tuple(plan_runs(spec, selection.models, selection.backends, selection.seeds))
    return Plan(
        spec=spec,
        runs=runs,
        selected=selected,
        spec_hash=spec_digest(spec)[:20],
        code_versions={b: training_code_version(b) for b in sorted({k.backend for k in runs})},
    )


def run_status(plan: Plan, results_dir: Path) -> dict[str, str]:
    """For each selected run id: done | failed | stale (older spec, data or code) | pending |
    unreadable (a file this harness cannot read) | unknown (the data is not prepared)."""
    status = {}
    for key in plan.selected:
        try:
            run = read_run(run_path(results_dir, key.id))
        except RunFileError:
            status[key.id] = "unreadable"
            continue
        if run is None:
            status[key.id] = "pending"
        elif plan.data_hash is None:
            status[key.id] = "unknown (data not available)"
        elif run.run_hash != plan.run_hashes[key.id]:
            status[key.id] = "stale"
        else:
            status[key.id] = "done" if run.status == "ok" else "failed"
    return status


def _pick(kind: str, asked: Sequence[str] | None, known: Sequence[str]) -> list[str]:
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
    models: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[RunKey]:
    """models x backends x seeds, filtered by the --models/--backends/--seeds options."""
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
    h = hashlib.sha256()
    if backend is not None:
        from backends.registry import entry  # framework-free: names modules, imports none

        e = entry(backend)
        for module in (e.target.split(":")[0], e.env_module):
            if module:
                rels.append(module.replace(".", "/") + ".py")
        if e.plugin:  # code outside this checkout: its distribution's name and version stand in
            h.update(f"{e.target} {e.description}".encode())
    for rel in rels:
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_hash(spec: Spec, key: RunKey, data_hash: str, code_version: str) -> str:
    """The hash of one run (Plan.with_data computes it for every run of a plan)."""
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
        "code": code_version,
    }
    return spec_digest(payload)[:20]
