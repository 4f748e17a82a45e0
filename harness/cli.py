"""Command line: `python -m harness VERB ...`.

    python -m harness validate specs/paper.yaml        # parse, shapes, counts vs the paper, plan
    python -m harness run specs/demo.yaml [--dry-run]  # train every model x backend x seed, report
    python -m harness report results/demo              # re-render the report from runs/
    python -m harness list [SPEC]                      # models, backends, vocabulary
    python -m harness make-data DIR                    # a generated MURA-layout tree

User errors exit 2 with one line (and a hint); a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness import __version__
from harness.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from harness.spec import Spec, load_spec

RESULTS_ROOT = Path("results")


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list; got {text!r}"
            ) from None

    return parse


def _common(p: argparse.ArgumentParser, selection: bool = True) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a spec field, e.g. --set models.cnn.train.epochs=3 (repeatable)",
    )
    if selection:
        p.add_argument("--models", type=_csv(str), help="only these models (comma-separated)")
        p.add_argument("--backends", type=_csv(str), help="only these backends (comma-separated)")
        p.add_argument("--seeds", type=_csv(int), help="only these seeds (comma-separated)")
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default: results/<spec name>)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="image cache folder (default: $HARNESS_CACHE or ~/.cache/repro-harness)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="every history metric per epoch, and parameter counts as built",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="one line per run; for logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Reproduce a paper's models in Keras and PyTorch from one YAML spec.",
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser(
        "validate",
        help="check a spec: shapes, parameter counts, data, plan",
        description="Parse a spec (extends, --set), print each model's layers "
        "with shapes and parameter counts, compare them with the paper's printed "
        "counts, summarize the data split and print the run plan.",
    )
    p.add_argument("spec", type=Path)
    _common(p)
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser(
        "run",
        help="train every model x backend x seed and write the report",
        description="Plan models x backends x seeds, run each in a fresh worker "
        "process (skipping finished runs), then write results/<spec>/report.md.",
    )
    p.add_argument("spec", type=Path)
    _common(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and what is done; run nothing"
    )
    p.add_argument("--fresh", action="store_true", help="rerun runs that are already done")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser(
        "report",
        help="re-render report.md from a results folder",
        description="Recompute every statistic from runs/*.json and rewrite "
        "report.md and metrics.csv, without training.",
    )
    p.add_argument("results_dir", type=Path)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("list", help="models of a spec, backends, layer and base vocabulary")
    p.add_argument("spec", type=Path, nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser(
        "make-data",
        help="write a generated dataset in MURA v1.1's layout",
        description="Write DIR/MURA-v1.1/ with train/valid images and the four "
        "CSVs, exactly as MURA lays them out; the same seed gives the same bytes.",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--body-parts", type=_csv(str), default=["WRIST"])
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--valid-fraction", type=float, default=0.15)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.set_defaults(func=cmd_make_data)
    return parser


# ---------------------------------------------------------------------------------------------


def _cache_dir(args: argparse.Namespace) -> Path:
    from harness.data.cache import default_cache_dir

    return Path(args.cache_dir) if getattr(args, "cache_dir", None) else default_cache_dir()


def _results_dir(args: argparse.Namespace, spec: Spec) -> Path:
    return Path(args.out) if args.out else RESULTS_ROOT / spec.name


def _n(x: int) -> str:
    return f"{x:,}"


def model_tables(spec: Spec) -> tuple[str, list[str]]:
    """Keras-summary-like tables for every model, and the list of count mismatches."""
    from harness.shapes import check_output, infer_model

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
        return f"\nData: not available here: {e.message}"
    return f"\nData ({spec.data.dataset}, {spec.data.split.strategy}-level split)\n" + render_split(
        summary.describe()
    )


def plan_table(
    spec: Spec, args: argparse.Namespace, results_dir: Path, data_hash: str | None
) -> str:
    from harness.plan import plan_runs
    from harness.runner import plan_status

    keys = plan_runs(spec, args.models, args.backends, args.seeds)
    status = plan_status(spec, keys, results_dir, data_hash)
    rows = [(k.model, k.backend, k.seed, status[k.id]) for k in keys]
    done = sum(1 for s in status.values() if s == "done")
    return f"\nRun plan: {len(keys)} runs ({done} done) -> {results_dir}\n" + tabulate(
        rows, headers=["model", "backend", "seed", "status"], tablefmt="simple"
    )


def _data_hash_if_cached(spec: Spec, args: argparse.Namespace) -> str | None:
    """The data hash when the image cache exists (nothing is decoded), else None."""
    from harness.data import prepare_data

    try:
        done = prepare_data(spec.data, _cache_dir(args), progress=False, build=False)
    except UserError:
        return None
    return done.data_hash if done else None


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    tables, problems = model_tables(spec)
    print(
        f"{args.spec}: spec '{spec.name}' is valid: {len(spec.models)} models, "
        f"seeds {list(spec.seeds)}"
    )
    print(tables)
    check_counts(problems, "the table above shows every count")
    print(data_section(spec, _cache_dir(args)))
    print(plan_table(spec, args, _results_dir(args, spec), _data_hash_if_cached(spec, args)))
    print(
        f"\nAssumptions: {len(spec.assumptions)} (values the paper does not state; see the report)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from harness.data import data_record, prepare_data, render_split
    from harness.plan import plan_runs
    from harness.runner import run_all

    # SIGTERM before the runner takes over (data generation, cache build) must clean up too
    signal.signal(signal.SIGTERM, _raise_interrupt)
    spec = load_spec(args.spec, args.overrides)
    _, problems = model_tables(spec)
    check_counts(problems, f"`python -m harness validate {args.spec}` prints every count")
    keys = plan_runs(spec, args.models, args.backends, args.seeds)
    results_dir = _results_dir(args, spec)
    cache_dir = _cache_dir(args)
    if args.dry_run:
        print(data_section(spec, cache_dir))
        print(plan_table(spec, args, results_dir, _data_hash_if_cached(spec, args)))
        return 0
    from harness.report import write_report
    from harness.results import clean_temp_files, results_lock, write_json_atomic

    with results_lock(results_dir):
        clean_temp_files(results_dir)
        with spec_fields(spec):
            data = prepare_data(spec.data, cache_dir, progress=not args.quiet)
        assert data is not None
        if not args.quiet:
            print(f"Data ({spec.data.dataset}): cache {data.cache.folder}")
            print(render_split(data.describe()))
        write_json_atomic(
            results_dir / "spec.json",
            {
                "source": str(args.spec),
                "overrides": args.overrides,
                "spec": spec.model_dump(mode="json"),
            },
        )
        write_json_atomic(results_dir / "data.json", data_record(data, spec.data))
        from harness.plan import run_hash

        all_keys = plan_runs(spec)
        write_json_atomic(
            results_dir / "plan.json",
            {
                "data_hash": data.data_hash,
                "runs": {k.id: run_hash(spec, k, data.data_hash) for k in all_keys},
            },
        )
        interrupted = False
        try:
            outcomes = run_all(
                spec,
                keys,
                results_dir,
                cache_dir,
                data.data_hash,
                fresh=args.fresh,
                quiet=args.quiet,
                verbose=args.verbose,
            )
        except KeyboardInterrupt:
            interrupted = True
            outcomes = []
        report = write_report(results_dir)
        print(f"\nreport: {report}")
        if interrupted:
            print(
                "interrupted: finished runs are kept; run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed; reasons are in the report and logs/", file=sys.stderr)
        return 1
    return 0


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    if not (args.results_dir / "runs").is_dir():
        raise UserError(
            f"{args.results_dir}: no runs/ folder here",
            "pass a results folder written by `python -m harness run`, e.g. results/demo",
        )
    print(f"report: {write_report(args.results_dir)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from backends.registry import REGISTRY, missing_modules
    from harness.listing import render_listing

    if args.spec:
        spec = load_spec(args.spec, args.overrides)
        models = [(m.name, m.kind, ", ".join(m.backends), m.description or "") for m in spec.models]
        print(
            f"Models of {args.spec}:\n"
            + tabulate(models, headers=["model", "kind", "backends", "description"])
        )
        print()
    print(render_listing(REGISTRY.values(), missing_modules))
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from harness.data.synthetic import make_mura_tree
    from harness.spec import BODY_PARTS, SyntheticSpec

    parts = tuple(p.upper().removeprefix("XR_") for p in args.body_parts)
    bad = [p for p in parts if p not in BODY_PARTS]
    if bad:
        raise UserError(f"--body-parts: unknown part '{bad[0]}'; allowed: {', '.join(BODY_PARTS)}")
    options = {
        "patients": args.patients,
        "seed": args.seed,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "label_noise": args.label_noise,
        "valid_fraction": args.valid_fraction,
        "difficulty": args.difficulty,
    }
    try:  # the same limits as data.synthetic in a spec
        SyntheticSpec.model_validate(options)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        message = str(err["msg"]).replace("Input should be", "must be").replace("Value error, ", "")
        if err["loc"]:
            option = f"--{str(err['loc'][0]).replace('_', '-')}"
            message += f"; got {err.get('input')!r}"
        else:
            option, message = "--min-size/--max-size", message.replace("_", "-")
        raise UserError(f"make-data {option}: {message}") from None
    root = make_mura_tree(args.dir, body_parts=parts, **options)
    print(f"wrote {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `| head`
        os._exit(0)
