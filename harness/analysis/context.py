"""Context of the numbers: resources per (model, backend), the architecture check, the data
split and its leakage, the environment of each backend.

    groups = resource_groups(spec, analysed_runs)
    arch = architecture_check(spec, model, runs); info = data_info(bundle.data)

Values that could not be measured stay "not measured" with their reason, never 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.analysis.load import run_key
from harness.errors import UserError
from harness.monitor import is_measured, measured, not_measured
from harness.records import RunResult
from harness.shapes import infer_model
from harness.spec import Model, ParamCounts, RandomModel, Spec


@dataclass(frozen=True)
class ResourceStat:
    """One resource of one (model, backend): median and range over seeds, or why not measured."""

    quantity: str
    n_runs: int
    n_measured: int
    unit: str | None
    median: float | None
    low: float | None
    high: float | None
    reason: str | None  # why not measured (all runs, or the ones missing)
    source: str | None = None  # which counter, where several exist


@dataclass(frozen=True)
class ResourceGroup:
    model: str
    backend: str
    stats: tuple[ResourceStat, ...]


@dataclass(frozen=True)
class ArchitectureCheck:
    """Parameter counts: printed in the paper, inferred from the spec, built by each backend."""

    model: str
    printed: ParamCounts | None
    inferred: ParamCounts | None
    inferred_error: str | None
    built: Mapping[str, tuple[ParamCounts, ...]]  # backend -> distinct counts over its runs
    mismatches: tuple[str, ...]



@dataclass(frozen=True)
class DataPart:
    part: str
    images: int | None
    positives: int | None
    studies: int | None
    patients: int | None


@dataclass(frozen=True)
class DataInfo:
    """data.json, typed; any field may be missing."""

    dataset: str | None
    image_size: int | None
    resize: str | None
    data_hash: str | None
    split: Mapping[str, Any]
    parts: tuple[DataPart, ...]
    leakage: Mapping[str, Mapping[str, float | None]]  # part -> {study, patient}
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class EnvironmentInfo:
    """Per backend: (label, value) rows gathered from its runs."""

    backend: str
    rows: tuple[tuple[str, str], ...]



def _dig(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _framework_memory(res: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The backend's peak GPU memory counter: allocated, else peak, else any measured one."""
    fm = res.get("framework_memory")
    if not isinstance(fm, dict) or not fm:
        return not_measured("not reported by the backend"), None
    for want in ("allocated", "peak", ""):
        for name, m in fm.items():
            if want in name and is_measured(m):
                return m, name
    first = next(iter(fm.values()))
    return first, None


def _seconds(value: Any, reason: str) -> Any:
    return measured(float(value), "s") if isinstance(value, (int, float)) else not_measured(reason)


def resource_measures(run: RunResult, is_random: bool) -> list[tuple[str, Any, str | None]]:
    res = run.resources
    if not res:
        nm = not_measured("no resources recorded in the result")
        return [(q, nm, None) for q in RESOURCE_QUANTITIES]
    epoch_s = [h.seconds for h in run.history]
    no_train = "no training: random model" if is_random else "not recorded"
    fm, fm_source = _framework_memory(res)
    return [
        ("training time", _seconds(_dig(res, "phases_s", "train"), no_train), None),
        ("time per epoch (mean over epochs)",
         measured(float(np.mean(epoch_s)), "s") if epoch_s else not_measured(
             "no epochs" if is_random else "no epoch times in the history"), None),
        ("train throughput",
         _dig(res, "throughput", "train") or not_measured(no_train), None),
        ("inference throughput",
         _dig(res, "throughput", "inference") or not_measured("not recorded"), None),
        ("peak host memory (RSS)",
         _dig(res, "host", "rss_peak") or not_measured("not recorded"), None),
        ("framework peak GPU memory", fm, fm_source),
        ("GPU device memory peak",
         _dig(res, "gpu", "memory_used_peak") or not_measured("not recorded"), None),
        ("GPU utilization (mean)",
         _dig(res, "gpu", "utilization_mean") or not_measured("not recorded"), None),
        ("GPU energy", _dig(res, "gpu", "energy") or not_measured("not recorded"), None),
    ]


RESOURCE_QUANTITIES = (
    "training time",
    "time per epoch (mean over epochs)",
    "train throughput",
    "inference throughput",
    "peak host memory (RSS)",
    "framework peak GPU memory",
    "GPU device memory peak",
    "GPU utilization (mean)",
    "GPU energy",
)


def aggregate_resource(quantity: str, measures: list[tuple[Any, str | None]]) -> ResourceStat:
    values = [m["value"] for m, _ in measures
              if isinstance(m, dict) and isinstance(m.get("value"), (int, float))]
    reasons = [m.get("reason", "no reason given") for m, _ in measures
               if isinstance(m, dict) and not is_measured(m)]
    sources = sorted({s for _, s in measures if s})
    unit = next((m.get("unit") for m, _ in measures if is_measured(m) and isinstance(m, dict)),
                None)
    reason = "; ".join(dict.fromkeys(reasons)) or None
    if not values:
        return ResourceStat(quantity, len(measures), 0, None, None, None, None,
                            reason or "no value", None)
    return ResourceStat(
        quantity, len(measures), len(values), unit, float(np.median(values)),
        float(np.min(values)), float(np.max(values)), reason, ", ".join(sources) or None,
    )


# ---------------------------------------------------------------------------------------------
# Architecture, data, environment


def _fmt_counts(c: ParamCounts) -> str:
    return f"{c.total:,} ({c.trainable:,} trainable, {c.non_trainable:,} non-trainable)"


def architecture_check(spec: Spec, model: Model, runs: Sequence[RunResult]) -> ArchitectureCheck:
    printed = model.printed_params
    try:
        inferred: ParamCounts | None = infer_model(spec, model).counts
        error = None
    except UserError as e:
        inferred, error = None, e.message
    built: dict[str, tuple[ParamCounts, ...]] = {}
    for backend in model.backends:
        found = [r.params for r in runs if run_key(r)[:2] == (model.name, backend)]
        built[backend] = tuple(dict.fromkeys(c for c in found if c is not None))
    problems = []
    if printed is not None and inferred is not None and printed != inferred:
        problems.append(
            f"inferred {_fmt_counts(inferred)} differs from printed {_fmt_counts(printed)}"
        )
    ref, ref_name = (inferred, "inferred") if inferred is not None else (printed, "printed")
    for name, counts in built.items():
        if len(counts) > 1:
            problems.append(f"{name} built different counts across seeds")
        for c in counts:
            if ref is not None and c != ref:
                problems.append(f"{name} built {_fmt_counts(c)}; {ref_name} {_fmt_counts(ref)}")
    return ArchitectureCheck(model.name, printed, inferred, error, built, tuple(problems))


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _frac(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def data_info(data: Mapping[str, Any] | None) -> DataInfo | None:
    if data is None:
        return None
    parts = []
    for p in data.get("parts") or []:
        if isinstance(p, dict):
            parts.append(DataPart(str(p.get("part", p.get("split", "?"))), _int(p.get("images")),
                                  _int(p.get("positives")), _int(p.get("studies")),
                                  _int(p.get("patients"))))
    leakage: dict[str, dict[str, float | None]] = {}
    for part, leak in (data.get("leakage") or {}).items():
        if isinstance(leak, dict):
            leakage[str(part)] = {"study": _frac(leak.get("study")),
                                  "patient": _frac(leak.get("patient"))}
    split = data.get("split")
    return DataInfo(
        dataset=data.get("dataset"),
        image_size=_int(data.get("image_size")),
        resize=data.get("resize"),
        data_hash=data.get("data_hash"),
        split=dict(split) if isinstance(split, dict) else {},
        parts=tuple(parts),
        leakage=leakage,
        skipped=tuple(str(s) for s in data.get("skipped") or ()),
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if "value" in value and value.get("value") is None:
            return f"not measured ({value.get('reason', 'no reason given')})"
        return ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or None
    return str(value)


def _gpu_text(gpu: Any) -> str | None:
    if not isinstance(gpu, dict):
        return _text(gpu)
    if "devices" in gpu:
        names = ", ".join(
            f"{d.get('name')}" + (f" ({d['memory_total_mib']:.0f} MiB)"
                                  if isinstance(d.get("memory_total_mib"), (int, float)) else "")
            for d in gpu["devices"]
        )
        return f"{names}; driver {gpu.get('driver_version')}, CUDA {gpu.get('cuda_driver_version')}"
    return _text(gpu)


def _environment_rows(run: RunResult) -> list[tuple[str, str | None]]:
    env = run.environment
    prov = run.provenance
    versions = env.get("versions") or {}
    git = prov.get("git") or {}
    cpu = prov.get("cpu") or {}
    device = env.get("device")
    if env.get("device_name"):
        device = f"{device} ({env['device_name']})"
    git_text = None
    if "commit" in git:
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        git_text = f"{str(git['commit'])[:12]}{dirty}"
    elif git:
        git_text = _text(git)
    cpu_text = None
    if cpu:
        cpu_text = f"{cpu.get('model')} ({cpu.get('logical_cores')} logical cores)"
    return [
        ("framework", env.get("framework")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v) or None),
        ("device", device),
        ("determinism", _text({k: v for k, v in (env.get("determinism") or {}).items()
                               if k != "seed"} or None)),
        ("code version", run.code_version),
        ("git commit", git_text),
        ("CPU", cpu_text),
        ("GPU", _gpu_text(prov.get("gpu"))),
        ("Python", _dig(prov, "python", "version")),
        ("platform", _dig(prov, "platform", "platform")),
    ]


def environment_info(
    runs: Sequence[RunResult], backends: Sequence[str]
) -> tuple[EnvironmentInfo, ...]:
    out = []
    for backend in backends:
        mine = [r for r in runs if run_key(r)[1] == backend and r.environment]
        if not mine:
            continue
        values: dict[str, list[str]] = {}
        for run in mine:
            for label, value in _environment_rows(run):
                if value is not None:
                    values.setdefault(label, [])
                    if str(value) not in values[label]:
                        values[label].append(str(value))
        out.append(EnvironmentInfo(backend, tuple((k, " / ".join(v)) for k, v in values.items())))
    return tuple(out)


def resource_groups(
    spec: Spec, runs: Sequence[tuple[str, str, RunResult]]
) -> tuple[ResourceGroup, ...]:
    """One ResourceGroup per (model, backend), in the order given: (model, backend, run)."""
    order = list(dict.fromkeys((m, b) for m, b, _ in runs))
    out = []
    for model, backend in order:
        is_random = isinstance(spec.model(model), RandomModel)
        per_run = [resource_measures(r, is_random) for m, b, r in runs
                   if (m, b) == (model, backend)]
        stats = tuple(
            aggregate_resource(q, [(r[i][1], r[i][2]) for r in per_run])
            for i, q in enumerate(RESOURCE_QUANTITIES)
        )
        out.append(ResourceGroup(model, backend, stats))
    return tuple(out)
