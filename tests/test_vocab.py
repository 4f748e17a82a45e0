"""One vocabulary: the schema, the tables, the registry's claims and `list` all derive from it.

    pytest tests/test_vocab.py -q          # in each tox env: checks the backend installed there

Framework-free checks: every closed set the spec schema accepts equals harness.vocab's; the
tables of the harness keyed by a set (shapes, data cache, report, stats) hold exactly its names;
the registry's `supports` claims are subsets of the vocabulary. Per installed backend: its
module's TABLES hold every name the registry says it supports, and no name outside the
vocabulary. And what `python -m harness list` prints.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin

import pytest
from conftest import ROOT, available_backends

from backends.registry import REGISTRY, missing_modules
from harness import vocab
from harness.listing import SHARED, render_listing, support_matrix
from harness.spec import schema
from harness.vocab import (
    BACKENDS,
    CATEGORIES,
    CATEGORY_NAMES,
    PAPER_MODELS,
    Supports,
)

# ---------------------------------------------------------------------------------------------
# The schema accepts exactly the vocabulary's sets

# Literal fields of the schema -> the vocabulary set; "Class.field" where a field name is ambiguous
SCHEMA_SETS: dict[str, tuple[Any, ...]] = {
    "metric": vocab.METRICS,
    "metrics": vocab.METRICS,
    "relation": vocab.CLAIM_RELATIONS,
    "strategy": vocab.SPLIT_STRATEGIES,
    "source": vocab.VALIDATION_SOURCES,
    "ValidationSpec.group": vocab.GROUP_LEVELS,
    "layout": vocab.SYNTHETIC_LAYOUTS,
    "DataSpec.classes": (0, 1),  # the labels a class name maps to
    "dataset": vocab.DATASETS,
    "body_parts": vocab.BODY_PARTS,
    "channels": vocab.CHANNELS,
    "resize": vocab.RESIZE_FILTERS,
    "normalization": vocab.NORMALIZATIONS,
    "on_bad_image": vocab.ON_BAD_IMAGE,
    "padding": vocab.PADDINGS,
    "activation": vocab.ACTIVATIONS,
    "kernel_initializer": vocab.INITIALIZERS,
    "bias_initializer": vocab.INITIALIZERS,
    "Loss.name": vocab.LOSSES,
    "form": vocab.LOSS_FORMS,
    "BaseNet.name": vocab.BASES,
    "unit": vocab.BOOTSTRAP_UNITS,
    "method": vocab.BOOTSTRAP_METHODS,
    "levels": vocab.LEVELS,
    "level": vocab.LEVELS,
    "device": vocab.DEVICES,
    "init": vocab.INIT_MODES,
    "class_weight": vocab.CLASS_WEIGHT_RULES,
    "monitor": vocab.MONITORS,
    "mode": vocab.MONITOR_MODES,
    "backends": tuple(REGISTRY),  # the registry's: built-in and entry-point backends
}
# Discriminated unions: the tags of their members together make one set
UNIONS = {"type": (schema.Layer, vocab.LAYER_TYPES), "name": (schema.Optimizer, vocab.OPTIMIZERS),
          "kind": (schema.Model, vocab.MODEL_KINDS), "schedule": (schema.Schedule, vocab.SCHEDULES)}
UNION_TAG = {"schedule": "name"}  # a union whose tag field is named like another union's


def _literals(annotation: Any) -> list[tuple[Any, ...]]:
    """The Literal argument tuples inside an annotation (through Optional, tuple, Annotated)."""
    if get_origin(annotation) is Literal:
        return [get_args(annotation)]
    return [lit for a in get_args(annotation) if a is not Ellipsis for lit in _literals(a)]


def _members(union: Any) -> tuple[type, ...]:
    return get_args(get_args(union)[0])  # Annotated[A | B | ..., Field(discriminator=...)]


def _schema_literals() -> dict[str, tuple[Any, ...]]:
    """'Class.field' -> its Literal's names, for every model of the schema (tags left out)."""
    tagged = {(cls, UNION_TAG.get(tag, tag)) for tag, (union, _) in UNIONS.items()
              for cls in _members(union)}
    out = {}
    for cls in vars(schema).values():
        if not (isinstance(cls, type) and issubclass(cls, schema.Strict)):
            continue
        for name, info in cls.model_fields.items():
            found = _literals(info.annotation)
            if found and (cls, name) not in tagged:
                assert len(found) == 1, (cls.__name__, name)
                out[f"{cls.__name__}.{name}"] = found[0]
    return out


def test_every_closed_set_of_the_schema_is_the_vocabulary_s() -> None:
    literals = _schema_literals()
    assert {"Conv2D.padding", "BaseNet.name", "Runtime.device", "DataSpec.channels"} \
        <= set(literals)
    for where, names in literals.items():
        expected = SCHEMA_SETS.get(where, SCHEMA_SETS.get(where.split(".")[1]))
        assert expected is not None, f"{where}: a closed set that is not in SCHEMA_SETS"
        assert names == expected, where  # same names, same order (messages list them)


@pytest.mark.parametrize("tag", sorted(UNIONS))
def test_union_tags_are_the_vocabulary_s(tag: str) -> None:
    union, expected = UNIONS[tag]
    field = UNION_TAG.get(tag, tag)
    tags = [t for cls in _members(union) for t in get_args(cls.model_fields[field].annotation)]
    assert sorted(tags) == sorted(expected)


def test_default_backends_are_built_in() -> None:
    for cls in (schema.RandomModel, schema.SequentialModel, schema.PretrainedModel):
        assert set(cls.model_fields["backends"].default) <= set(BACKENDS)
    assert schema.SequentialModel.model_fields["backends"].default == ("keras", "torch")


# ---------------------------------------------------------------------------------------------
# Tables of the harness keyed by a vocabulary set hold exactly its names


def test_harness_tables_are_keyed_by_the_vocabulary() -> None:
    from harness import metrics, report, shapes, stats
    from harness.data import cache

    assert list(shapes.BASE_TABLE) == list(vocab.BASES)
    assert list(shapes._KIND) == list(vocab.LAYER_TYPES)
    assert list(cache.RESAMPLE) == list(vocab.RESIZE_FILTERS)
    assert metrics.METRICS is vocab.METRICS
    assert set(report.BACKEND_TITLES) == set(vocab.BACKENDS)
    assert set(report.DATASET_TITLES) == set(vocab.DATASETS)
    assert report.PERCENT_METRICS == set(vocab.METRICS) - {"auroc", "kappa"}
    assert get_args(stats.Unit) == vocab.BOOTSTRAP_UNITS
    assert get_args(stats.Method) == vocab.BOOTSTRAP_METHODS


# ---------------------------------------------------------------------------------------------
# The registry's claims


def test_supports_has_one_field_per_category() -> None:
    assert [f.name for f in fields(Supports)] == [*CATEGORIES, "trains"]
    assert list(CATEGORY_NAMES) == list(CATEGORIES)


BUILT_IN = [name for name, e in REGISTRY.items() if not e.plugin]


def test_built_in_backends_are_the_vocabulary_s() -> None:
    assert BUILT_IN == list(BACKENDS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_registry_claims_are_subsets_of_the_vocabulary(name: str) -> None:
    supports = REGISTRY[name].supports
    assert supports is not None, f"built-in backend {name} declares no supports"
    for category, claimed in supports.claims().items():
        assert set(claimed) <= set(CATEGORIES[category]), (name, category)
        assert len(set(claimed)) == len(claimed), (name, category)


def test_what_each_backend_claims() -> None:
    claims = {name: REGISTRY[name].supports for name in BUILT_IN}
    assert claims == {
        "reference": Supports(kinds=("random",)),
        "keras": PAPER_MODELS,
        "keras-torch": PAPER_MODELS,
        "keras-jax": PAPER_MODELS,
        "torch": PAPER_MODELS,
    }
    assert PAPER_MODELS.claims() == {**CATEGORIES, "kinds": ("sequential", "pretrained")}
    assert PAPER_MODELS.trains


# ---------------------------------------------------------------------------------------------
# Each installed backend's TABLES against its claims

TABLE_CATEGORIES = [c for c in CATEGORIES if c != "kinds"]  # kinds: the backend's build dispatches
# Tables the backend does not have yet, though it claims the names (Keras takes them as strings)
PENDING = {
    ("backends.keras_backend", "activations"): "the Keras backend has no activation table yet "
    "(issue 10: the lead adds it; Keras takes the names as strings today)",
    ("backends.keras_backend", "initializers"): "the Keras backend has no initializer table yet "
    "(issue 10: the lead adds it; Keras takes the names as strings today)",
}


def _installed() -> list[str]:
    return ["reference", *available_backends()]


@pytest.mark.parametrize("category", TABLE_CATEGORIES)
@pytest.mark.parametrize("name", _installed())
def test_backend_tables_match_its_claims(
    name: str, category: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = REGISTRY[name]
    for key, value in entry.env.items():  # what the worker sets before the import
        monkeypatch.setenv(key, value)
    module_name = entry.target.split(":")[0]
    tables = getattr(importlib.import_module(module_name), "TABLES", {})
    assert entry.supports is not None
    claimed = getattr(entry.supports, category)
    if category not in tables:
        if claimed and (module_name, category) in PENDING:
            pytest.skip(PENDING[module_name, category])
        assert not claimed, f"{name} claims {category} {list(claimed)} but has no table for them"
        return
    keys = list(tables[category])
    outside = [k for k in keys if k not in CATEGORIES[category]]
    assert not outside, f"{module_name} TABLES[{category!r}] has names outside the vocabulary"
    missing = [c for c in claimed if c not in keys]
    assert not missing, f"{name} claims {category} {missing} that its table lacks"


# ---------------------------------------------------------------------------------------------
# What `python -m harness list` prints


def test_listing_covers_every_vocabulary_set_once() -> None:
    sets = [v for k, v in vars(vocab).items() if k.isupper() and isinstance(v, tuple)]
    listed = [*CATEGORIES.values(), *(names for _, names in SHARED), BACKENDS]
    assert sorted(map(repr, listed)) == sorted(map(repr, sets))


def test_support_matrix_rows() -> None:
    lines = support_matrix(REGISTRY.values()).splitlines()
    assert lines[0].split() == ["category", "name", *REGISTRY]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == sum(map(len, CATEGORIES.values())) + 1
    assert rows[0] == ["model", "kind", "random", "yes", "-", "-", "-", "-"]
    assert rows[1] == ["sequential", "-", "yes", "yes", "yes", "yes"]
    assert ["optimizer", "adam", "-", "yes", "yes", "yes", "yes"] in rows
    assert ["sgd", "-", "yes", "yes", "yes", "yes"] in rows
    assert ["densenet169", "-", "yes", "yes", "yes", "yes"] in rows
    assert rows[-1] == ["training", "-", "yes", "yes", "yes", "yes"]


class _Entry:
    def __init__(self, name: str, supports: Supports | None) -> None:
        self.name, self.description, self.supports = name, f"the {name} backend", supports


def test_listing_of_a_backend_without_claims() -> None:
    entries = [_Entry("mine", None), _Entry("tiny", Supports(kinds=("sequential",), trains=True))]
    text = render_listing(entries, lambda name: ["jax"] if name == "mine" else [])
    lines = text.splitlines()
    assert lines[:5] == [
        "Backends:",
        "backend    what              installed",
        "---------  ----------------  --------------",
        "mine       the mine backend  no (needs jax)",
        "tiny       the tiny backend  yes",
    ]
    assert lines[6] == "What each backend supports (yes; -: not supported; ?: not declared):"
    rows = [line.split() for line in lines[9:9 + sum(map(len, CATEGORIES.values())) + 1]]
    assert rows[0] == ["model", "kind", "random", "?", "-"]
    assert rows[1] == ["sequential", "?", "yes"]
    assert rows[3] == ["layer", "type", "conv2d", "?", "-"]
    assert rows[-1] == ["training", "?", "yes"]
    tail = lines[lines.index("For every backend:") + 1:]
    assert tail == [f"{title}: {', '.join(map(str, names))}" for title, names in SHARED]
    assert tail[3] == "Metrics: accuracy, recall, precision, specificity, f1, auroc, kappa"
    assert tail[8] == "Channels: 1, 3"


def test_list_runs_without_importing_a_framework() -> None:
    code = (
        "import sys; from harness.cli import main; main(['list']); "
        "print(sorted(m for m in ('tensorflow', 'torch', 'keras', 'jax') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "[]"
    assert lines[0] == "Backends:"
    assert render_listing(REGISTRY.values(), missing_modules).splitlines()[6:] == lines[6:-1]
