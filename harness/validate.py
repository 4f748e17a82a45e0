"""The validate verb: a spec's layer tables and counts vs the paper, its data split, its run plan.

    python -m harness validate specs/paper.yaml [--set PATH=VALUE] [--models cnn]

`validate(request)` prints and returns the exit code; `run` (harness/pipeline.py) reuses the
count check, the data summary and the plan table. Nothing here decodes an image or trains.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from harness.errors import UserError
from harness.plan import Plan, Selection, make_plan, run_status
from harness.results import check_results_dir
from harness.spec import Spec, load_spec

RESULTS_ROOT = Path("results")


@dataclass(frozen=True)
class Where:
    """The --out and --cache-dir options (None: the defaults)."""

    out: Path | None = None
    cache_dir: Path | None = None

    def results_dir(self, spec: Spec) -> Path:
        return self.out if self.out is not None else RESULTS_ROOT / spec.name

    def cache(self) -> Path:
        from harness.data.cache import default_cache_dir

        return self.cache_dir if self.cache_dir is not None else default_cache_dir()


@dataclass(frozen=True)
class ValidateRequest:
    spec: Path
    overrides: tuple[str, ...] = ()
    selection: Selection = Selection()
    where: Where = Where()


def _n(x: int) -> str:
    return f"{x:,}"


def model_tables(spec: Spec) -> tuple[str, list[str]]:
    """Keras-summary-like tables for every model, and the list of count mismatches."""
    from harness.shapes import check_output, infer_model, stage_counts

    out: list[str] = []
    problems: list[str] = []
    for i, model in enumerate(spec.models):
        inf = infer_model(spec, model, i)
        check_output(spec, inf, i)
        out.append(f"\nModel '{model.name}' ({model.kind}; backends: {', '.join(model.backends)})")
        if inf.rows:
            rows = [
                (f"{r.name} ({r.kind})", str((None, *r.shape)), _n(r.params.total))
                for r in inf.rows
            ]
            rows.insert(0, ("input", str((None, *inf.input_shape)), "0"))
            out.append(
                tabulate(
                    rows,
                    headers=["Layer (type)", "Output Shape", "Param #"],
                    tablefmt="simple",
                    colalign=("left", "left", "right"),
                )
            )
        c = inf.counts
        out.append(
            f"Total params: {_n(c.total)}  Trainable: {_n(c.trainable)}  "
            f"Non-trainable: {_n(c.non_trainable)}"
        )
        for k, (stage, sc) in enumerate(stage_counts(spec, model, i)):
            out.append(
                f"  stage {k + 1} ({stage.epochs} epochs, lr {stage.learning_rate:g}): "
                f"Trainable: {_n(sc.trainable)}  Non-trainable: {_n(sc.non_trainable)}"
            )
        if model.printed_params is not None:
            p = model.printed_params
            rows2 = []
            for name, printed, ours in (
                ("total", p.total, c.total),
                ("trainable", p.trainable, c.trainable),
                ("non-trainable", p.non_trainable, c.non_trainable),
            ):
                diff = ours - printed
                rows2.append(
                    (
                        name,
                        _n(printed),
                        _n(ours),
                        f"{diff:+,}" if diff else "0",
                        "ok" if not diff else "MISMATCH",
                    )
                )
                if diff:
                    problems.append(
                        f"{spec.source}: models[{i}].printed_params."
                        f"{name.replace('-', '_')}: the paper "
                        f"prints {_n(printed)}; the spec's layers give {_n(ours)} ({diff:+,})"
                    )
            out.append(
                tabulate(
                    rows2,
                    headers=["params", "printed (paper)", "inferred (spec)", "difference", ""],
                    tablefmt="simple",
                )
            )
    return "\n".join(out), problems


@contextmanager
def spec_fields(spec: Spec) -> Iterator[None]:
    """Errors that name a spec field (data.root, ...) also name the spec file."""
    try:
        yield
    except UserError as e:
        if e.message.split(":", 1)[0].split(".", 1)[0] in Spec.model_fields:
            e.message = f"{spec.source}: {e.message}"
        raise


def check_counts(problems: list[str], where: str) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            problems[0] + more, f"fix the layers, the printed_params or your --set options; {where}"
        )


def data_section(spec: Spec, cache_dir: Path) -> str:
    """Split sizes, positives and leakage, without decoding images; or why not available."""
    from harness.data import render_split, summarize_without_cache

    try:
        with spec_fields(spec):
            summary = summarize_without_cache(spec.data, cache_dir)
    except UserError as e:
        if data_root_configured(spec):
            raise  # a configured root that is broken is an error; only an unset one is skipped
        return f"\nData: not available here: {e.message}"
    return f"\nData ({spec.data.dataset}, {spec.data.split.strategy}-level split)\n" + render_split(
        summary.describe()
    )


def data_root_configured(spec: Spec) -> bool:
    """True when the spec reads data from a root it names (data.root, or $MURA_ROOT for MURA)."""
    if spec.data.dataset in ("folder", "csv"):
        return bool(spec.data.root)
    return spec.data.dataset == "mura-v1.1" and bool(spec.data.root or os.environ.get("MURA_ROOT"))


def data_hash_if_cached(spec: Spec, cache_dir: Path) -> str | None:
    """The data hash when the image cache exists (nothing is decoded), else None."""
    from harness.data import prepare_data

    try:
        done = prepare_data(spec.data, cache_dir, progress=False, build=False)
    except UserError:
        return None
    return done.data_hash if done else None


def plan_table(plan: Plan, results_dir: Path) -> str:
    """The selected runs and whether each is done, as `validate` and `run --dry-run` print it."""
    status = run_status(plan, results_dir)
    rows = [(k.model, k.backend, k.seed, status[k.id]) for k in plan.selected]
    done = sum(1 for s in status.values() if s == "done")
    return f"\nRun plan: {len(plan.selected)} runs ({done} done) -> {results_dir}\n" + tabulate(
        rows, headers=["model", "backend", "seed", "status"], tablefmt="simple"
    )


def validate(request: ValidateRequest) -> int:
    """Print the spec's tables, data and plan; UserError on a count mismatch."""
    spec = load_spec(request.spec, list(request.overrides))
    results_dir = request.where.results_dir(spec)
    check_results_dir(results_dir, "--out" if request.where.out is not None else "results folder")
    tables, problems = model_tables(spec)
    print(
        f"{request.spec}: spec '{spec.name}' is valid: {len(spec.models)} models, "
        f"seeds {list(spec.seeds)}"
    )
    print(tables)
    check_counts(problems, "the table above shows every count")
    cache_dir = request.where.cache()
    print(data_section(spec, cache_dir))
    plan = make_plan(spec, request.selection).with_data(data_hash_if_cached(spec, cache_dir))
    print(plan_table(plan, results_dir))
    print(
        f"\nAssumptions: {len(spec.assumptions)} (values the paper does not state; see the report)"
    )
    return 0
