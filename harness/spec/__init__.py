"""The spec language: a paper's data, models, training recipes, claims and assumptions.

    python -m harness validate specs/paper.yaml

`load_spec(path, overrides)` reads YAML once (safe loader), resolves `extends:`, applies
`--set a.b=value` overrides and returns a frozen, fully defaulted `Spec`. Bad input raises
`UserError` with one line: file, field path, what was found, what is allowed.

One module per job: `schema` (the typed, frozen models), `resolve` (YAML, `extends:`,
`overrides:` and `--set` on plain dicts), `messages` (a validation error as one line),
`support` (a spec's backends against the registry's claims, at plan time); the closed sets
themselves are harness.vocab's. Everything is importable from here, as before the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.errors import UserError
from harness.spec.messages import (
    MAX_ERRORS,
    error_description,
    error_field,
    from_override,
    validation_errors,
    validation_message,
)
from harness.spec.resolve import (
    MERGE_KEYS,
    apply_override,
    display,
    join_path,
    merge,
    origin,
    read_yaml,
    resolve_extends,
    split_path,
)
from harness.spec.schema import (
    SGD,
    ActivationLayer,
    Adam,
    AdamW,
    Assumption,
    AugmentationSpec,
    BackendName,
    BaseNet,
    BatchNorm,
    Bootstrap,
    Checkpoint,
    Claim,
    ConstantSchedule,
    Contradiction,
    Conv2D,
    CosineSchedule,
    Counts,
    DataSpec,
    Dense,
    Dropout,
    EarlyStopping,
    Evaluation,
    ExponentialSchedule,
    Flatten,
    GlobalAvgPool,
    Layer,
    Loss,
    Model,
    ModelBase,
    Monitored,
    NotPrinted,
    Optimizer,
    Pair,
    Paper,
    ParamCounts,
    Pool2D,
    PosInt,
    PretrainedModel,
    RandomModel,
    ReduceOnPlateau,
    RMSprop,
    Runtime,
    Schedule,
    SequentialModel,
    Spec,
    SplitSpec,
    Stage,
    StepSchedule,
    Strict,
    SyntheticSpec,
    TrainSpec,
    ValidationSpec,
    spec_digest,
)
from harness.spec.support import check_backends

# The vocabulary, importable from here as before it moved to harness.vocab (new code: harness.vocab)
from harness.vocab import (
    ACTIVATIONS,
    BACKENDS,
    BASES,
    BODY_PARTS,
    INITIALIZERS,
    LAYER_TYPES,
    MODEL_KINDS,
    OPTIMIZERS,
    Activation,
    Initializer,
    Metric,
)
from harness.vocab import METRICS as METRIC_NAMES

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BASES",
    "BODY_PARTS",
    "INITIALIZERS",
    "LAYER_TYPES",
    "MERGE_KEYS",
    "METRIC_NAMES",
    "MODEL_KINDS",
    "OPTIMIZERS",
    "SGD",
    "Activation",
    "ActivationLayer",
    "Adam",
    "AdamW",
    "Assumption",
    "AugmentationSpec",
    "BackendName",
    "BaseNet",
    "BatchNorm",
    "Bootstrap",
    "Checkpoint",
    "Claim",
    "ConstantSchedule",
    "Contradiction",
    "Conv2D",
    "CosineSchedule",
    "Counts",
    "DataSpec",
    "Dense",
    "Dropout",
    "EarlyStopping",
    "Evaluation",
    "ExponentialSchedule",
    "Flatten",
    "GlobalAvgPool",
    "Initializer",
    "Layer",
    "Loss",
    "Metric",
    "Model",
    "ModelBase",
    "Monitored",
    "NotPrinted",
    "Optimizer",
    "Pair",
    "Paper",
    "ParamCounts",
    "Pool2D",
    "PosInt",
    "PretrainedModel",
    "RandomModel",
    "RMSprop",
    "ReduceOnPlateau",
    "Runtime",
    "Schedule",
    "SequentialModel",
    "Spec",
    "SplitSpec",
    "Stage",
    "StepSchedule",
    "Strict",
    "SyntheticSpec",
    "TrainSpec",
    "ValidationSpec",
    "apply_override",
    "check_backends",
    "join_path",
    "load_spec",
    "merge",
    "read_yaml",
    "resolve_extends",
    "spec_digest",
    "split_path",
    "validation_message",
]


def _check_assumption_fields(spec: Spec, raw: dict[str, Any], source: str) -> None:
    missing = object()  # a field whose value is None (data.root) is still a path
    for i, a in enumerate(spec.assumptions):
        if a.field is None:
            continue
        node: Any = spec
        for seg in split_path(a.field):
            if isinstance(seg, str) and isinstance(node, tuple):
                node = next((x for x in node if getattr(x, "name", None) == seg), missing)
            elif isinstance(seg, int) and isinstance(node, tuple):
                node = node[seg] if seg < len(node) else missing
            elif isinstance(seg, str) and isinstance(node, BaseModel):
                node = getattr(node, seg) if seg in type(node).model_fields else missing
            else:
                node = missing
            if node is missing:
                raise UserError(
                    f"{source}: assumptions[{i}].field: '{a.field}' is not a path in this spec"
                )


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Load, resolve `extends`, apply `--set` overrides and validate a spec file."""
    path = Path(path)
    source = display(path)
    files: list[tuple[str, Any]] = []
    raw = resolve_extends(path, files=files)
    raw.setdefault("name", path.stem)
    set_paths: dict[str, str] = {}
    for assignment in overrides:
        set_paths[apply_override(raw, assignment, source)] = assignment
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        lines: list[tuple[str, str]] = []  # (message, where it came from)
        by_path: dict[str, int] = {}  # a union's alternatives all fail on one path: one line
        for err in validation_errors(e):
            message, suffix = validation_message(err, raw, source), ""
            culprit = from_override(err, raw, set_paths)
            if culprit is not None:
                suffix = f" (from --set {culprit})"
            elif len(files) > 1:  # name the parent that wrote the field, not the child
                written_by = origin(files, raw, error_field(err, raw))
                if written_by is not None and written_by != source:
                    message = f"{written_by}{message.removeprefix(source)}"
                    suffix = f" (extended by {source})"
            path = error_field(err, raw)
            if path in by_path:  # e.g. "must be one of balanced; got 'even'; or must be a mapping"
                first, first_suffix = lines[by_path[path]]
                what = error_description(err)
                if what not in first:
                    lines[by_path[path]] = (f"{first}; or {what}", first_suffix)
                continue
            by_path[path] = len(lines)
            lines.append((message, suffix))
        text = [m + x for m, x in lines]
        shown = text[:MAX_ERRORS]
        if len(text) > MAX_ERRORS:
            shown.append(f"{source}: {len(text) - MAX_ERRORS} more errors not shown; fix these "
                         "first")
        raise UserError("\n".join(shown)) from None
    _check_assumption_fields(spec, raw, source)
    spec._source = source
    return spec
