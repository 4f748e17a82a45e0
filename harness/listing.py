"""What `python -m harness list` prints: the backends, what each supports, the spec vocabulary.

    python -m harness list

`render_listing(entries, missing_modules)` returns the text; the CLI hands it the registry's
entries (name, description, supports) and the registry's `missing_modules`, so nothing here
imports a backend or a framework. Every name comes from harness.vocab: the matrix shows the
categories a backend claims (`Supports`), the lines below it every other closed set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from tabulate import tabulate

from harness import vocab
from harness.vocab import CATEGORIES, CATEGORY_NAMES, Supports

# The closed sets that do not depend on the backend, as `list` titles them.
SHARED: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("Paddings", vocab.PADDINGS),
    ("Losses", vocab.LOSSES),
    ("Loss forms", vocab.LOSS_FORMS),
    ("Metrics", vocab.METRICS),
    ("Levels", vocab.LEVELS),
    ("Claim relations", vocab.CLAIM_RELATIONS),
    ("Datasets", vocab.DATASETS),
    ("Body parts", vocab.BODY_PARTS),
    ("Channels", vocab.CHANNELS),
    ("Resize filters", vocab.RESIZE_FILTERS),
    ("Normalizations", vocab.NORMALIZATIONS),
    ("Split strategies", vocab.SPLIT_STRATEGIES),
    ("Validation sources", vocab.VALIDATION_SOURCES),
    ("Validation groups", vocab.GROUP_LEVELS),
    ("Generated data layouts", vocab.SYNTHETIC_LAYOUTS),
    ("Image files (folder, csv)", vocab.IMAGE_SUFFIXES),
    ("On bad image", vocab.ON_BAD_IMAGE),
    ("Bootstrap units", vocab.BOOTSTRAP_UNITS),
    ("Bootstrap methods", vocab.BOOTSTRAP_METHODS),
    ("Devices", vocab.DEVICES),
    ("Initial weights", vocab.INIT_MODES),
    ("Class weights", vocab.CLASS_WEIGHT_RULES),
    ("Schedules", vocab.SCHEDULES),
    ("Monitors", vocab.MONITORS),
    ("Monitor modes", vocab.MONITOR_MODES),
)
YES, NO, UNDECLARED = "yes", "-", "?"


class BackendInfo(Protocol):
    """What the listing reads of a registry entry (backends.registry.BackendEntry)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def supports(self) -> Supports | None: ...


def _cell(supports: Supports | None, category: str, name: str) -> str:
    if supports is None:
        return UNDECLARED
    claimed = supports.trains if category == "trains" else name in getattr(supports, category)
    return YES if claimed else NO


def support_matrix(entries: Iterable[BackendInfo]) -> str:
    """One row per name of each category a backend can claim, one column per backend."""
    entries = list(entries)
    rows = [
        [CATEGORY_NAMES[category] if i == 0 else "", name,
         *(_cell(e.supports, category, name) for e in entries)]
        for category, names in CATEGORIES.items()
        for i, name in enumerate(names)
    ]
    rows.append(["training", "", *(_cell(e.supports, "trains", "") for e in entries)])
    return tabulate(rows, headers=["category", "name", *(e.name for e in entries)])


def render_listing(
    entries: Iterable[BackendInfo], missing_modules: Callable[[str], list[str]]
) -> str:
    """The whole `list` output (without a spec's models)."""
    entries = list(entries)
    installed = []
    for e in entries:
        missing = missing_modules(e.name)
        installed.append(
            (e.name, e.description, "yes" if not missing else f"no (needs {', '.join(missing)})")
        )
    out = ["Backends:", tabulate(installed, headers=["backend", "what", "installed"])]
    out += [
        "",
        f"What each backend supports ({YES}; {NO}: not supported; {UNDECLARED}: not declared):",
        support_matrix(entries),
        "",
        "For every backend:",
    ]
    out += [f"{title}: {', '.join(str(n) for n in names)}" for title, names in SHARED]
    return "\n".join(out)
