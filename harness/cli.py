"""Command line: `python -m harness VERB ...`.

    python -m harness validate specs/paper.yaml        # parse, shapes, counts vs the paper, plan
    python -m harness run specs/demo.yaml [--dry-run]  # train every model x backend x seed, report
    python -m harness report results/demo              # re-render the report from runs/
    python -m harness compare results/demo results/demo-patient-split [--out FILE]
    python -m harness list [SPEC]                      # models, backends, vocabulary
    python -m harness make-data DIR                    # a generated MURA-layout tree
    python -m harness make-data DIR --layout folder    # or DIR/{train,test,val}/<class>/

This module parses arguments and calls one function per verb (validate: harness/validate.py,
run: harness/pipeline.py, report: harness/report.py, compare: harness/compare.py). User errors
exit 2 with one line (and a hint); a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness import __version__
from harness.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError
from harness.plan import Selection
from harness.spec import load_spec
from harness.validate import ValidateRequest, Where, validate
from harness.vocab import SYNTHETIC_LAYOUTS


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list; got {text!r}"
            ) from None

    return parse


def _option_list(option: str, text: str | None, kind: type = str) -> list[Any] | None:
    """--models/--backends/--seeds: None when not given; an empty item is an error, not 'all'."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise UserError(
            f"{option}: empty list (got {text!r}); name at least one, comma-separated, "
            f"or leave {option} out to select all"
        )
    if not all(items):
        raise UserError(f"{option}: empty item in {text!r}; write names separated by single commas")
    if kind is int:
        bad = [x for x in items if not re.fullmatch(r"\d+", x)]
        if bad:
            raise UserError(
                f"{option}: '{bad[0]}' is not a seed; seeds are integers in [0, 4294967295]"
            )
        return [int(x) for x in items]
    return items


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
        p.add_argument("--models", help="only these models (comma-separated)")
        p.add_argument("--backends", help="only these backends (comma-separated)")
        p.add_argument("--seeds", help="only these seeds (comma-separated)")
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


def _executor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "executors", "what runs the workers (README: Running on a cluster); the options can also "
        "sit in --executor-config FILE.yaml (keys executor, jobs, cluster, partition, time, gpus, "
        "cpus, account, address, detach), the command line wins")
    g.add_argument("--executor", choices=("local", "slurm", "ray"), default=None,
                   help="local worker processes (default), a Slurm job array through submitit, "
                   "or Ray tasks")
    g.add_argument("--executor-config", type=Path, default=None, metavar="FILE.yaml")
    g.add_argument("-j", "--jobs", default=None, metavar="N|auto",
                   help="local: N workers at once, each with its share of the CPU cores; auto = "
                   "one worker per visible GPU (pinned with CUDA_VISIBLE_DEVICES), and 1 on a "
                   "CPU-only machine, where the frameworks already use every core and more "
                   "workers only split them (default 1)")
    g.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="slurm: submit to Slurm (default) or run the same job array through "
                   "submitit's local backend, on this machine")
    g.add_argument("--partition", default=None, help="slurm: the partition")
    g.add_argument("--time", default=None, metavar="MINUTES", help="slurm: time limit per run "
                   "(default 60)")
    g.add_argument("--gpus", default=None, metavar="N", help="slurm/ray: GPUs per run "
                   "(default 0)")
    g.add_argument("--cpus", default=None, metavar="N", help="slurm/ray: CPU cores per run "
                   "(default 1; also each worker's thread count)")
    g.add_argument("--account", default=None, help="slurm: the account to charge")
    g.add_argument("--address", default=None, help="ray: the cluster to join (default: start "
                   "a local Ray)")
    g.add_argument("--detach", action="store_true", default=None,
                   help="slurm: submit and return; a later `run` (same command) or `report` "
                   "collects the results")


def _executor(args: argparse.Namespace) -> Any:
    from harness.executors import load_executor_config, make_options

    config = load_executor_config(args.executor_config) if args.executor_config else {}
    given = {"executor": args.executor, "jobs": args.jobs, "cluster": args.cluster,
             "partition": args.partition, "time": args.time, "gpus": args.gpus,
             "cpus": args.cpus, "account": args.account, "address": args.address,
             "detach": args.detach}
    where = str(args.executor_config) if args.executor_config else "run"
    return make_options(given, config, where)


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
    p.add_argument(
        "--check-determinism",
        action="store_true",
        help="then rerun one seed per model x backend in a fresh process and grade it "
        "(bit-identical / max abs difference / nondeterministic); writes determinism.json",
    )
    _executor_options(p)
    p.add_argument(
        "--track",
        choices=["mlflow"],
        default=None,
        help="log every run to MLflow as it trains (MLFLOW_TRACKING_URI, default "
        "sqlite:///<results>/mlflow.db); needs the [mlflow] extra",
    )
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser(
        "parity",
        help="prove the backends compute the same model: port weights, compare layer by layer",
        description="Build each model in the first backend, port its weights to the others "
        "(neutral layout, one process per framework), compare every layer's activations on "
        "cached test images and a few training steps; write results/<spec>/parity.json.",
    )
    p.add_argument("spec", type=Path)
    _common(p)
    p.add_argument("--steps", type=int, default=3, help="training steps compared (default 3)")
    p.set_defaults(func=cmd_parity)

    p = verbs.add_parser(
        "report",
        help="re-render report.md from a results folder",
        description="Recompute every statistic from runs/*.json and rewrite "
        "report.md and metrics.csv, without training.",
    )
    p.add_argument("results_dir", type=Path)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser(
        "compare",
        help="two or more results folders side by side",
        description="Set results folders beside each other per model, backend and metric: "
        "each folder's seed mean and its difference from the first, paired where the test "
        "images are the same. Writes markdown (default: compare.md in the first folder) and "
        "its figure.",
    )
    p.add_argument("results_dirs", type=Path, nargs="+", metavar="RESULTS_DIR")
    p.add_argument("--out", type=Path, default=None, help="the markdown file to write")
    p.set_defaults(func=cmd_compare)

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
    p.add_argument("--layout", choices=SYNTHETIC_LAYOUTS, default="mura",
                   help="mura: DIR/MURA-v1.1/ with its CSVs; folder: DIR/{train,test,val}/<class>/"
                   "<images> (JPEG), as dataset: folder reads it")
    p.add_argument("--classes", type=_csv(str), default=["NORMAL", "PNEUMONIA"],
                   help="folder layout: the class folders of label 0 and 1")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="folder layout: share of patients written to test/")
    p.set_defaults(func=cmd_make_data)
    return parser


# ---------------------------------------------------------------------------------------------


def _where(args: argparse.Namespace) -> Where:
    return Where(out=args.out, cache_dir=args.cache_dir)


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        models=_option_list("--models", args.models),
        backends=_option_list("--backends", args.backends),
        seeds=_option_list("--seeds", args.seeds, int),
    )


def cmd_validate(args: argparse.Namespace) -> int:
    return validate(
        ValidateRequest(args.spec, tuple(args.overrides), _selection(args), _where(args))
    )


def cmd_run(args: argparse.Namespace) -> int:
    from harness.pipeline import RunRequest, run

    return run(
        RunRequest(
            args.spec,
            tuple(args.overrides),
            _selection(args),
            _where(args),
            fresh=args.fresh,
            dry_run=args.dry_run,
            quiet=args.quiet,
            verbose=args.verbose,
            check_determinism=args.check_determinism,
            executor=_executor(args),
            track=args.track,
        )
    )


def cmd_parity(args: argparse.Namespace) -> int:
    from harness.parity import parity_verb

    if args.seeds is not None:
        raise UserError("parity: --seeds does not apply; it uses the spec's first seed")
    selection = _selection(args)
    return parity_verb(args.spec, tuple(args.overrides), selection.models, selection.backends,
                       args.steps, _where(args))


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    if not (args.results_dir / "runs").is_dir():
        raise UserError(
            f"{args.results_dir}: no runs/ folder here",
            "pass a results folder written by `python -m harness run`, e.g. results/demo",
        )
    print(f"report: {write_report(args.results_dir)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import write_comparison

    if len(args.results_dirs) < 2:
        raise UserError(
            f"compare: needs two or more results folders; got {len(args.results_dirs)}",
            "e.g. python -m harness compare results/demo results/demo-patient-split",
        )
    for folder in args.results_dirs:
        if not (folder / "runs").is_dir():
            raise UserError(
                f"{folder}: no runs/ folder here",
                "pass results folders written by `python -m harness run`, e.g. results/demo",
            )
    print(f"comparison: {write_comparison(args.results_dirs, args.out)}")
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

    from harness.data.synthetic import make_folder_tree, make_mura_tree
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
    folder = {"classes": tuple(args.classes), "test_fraction": args.test_fraction}
    try:  # the same limits as data.synthetic in a spec
        SyntheticSpec.model_validate({**options, **folder, "layout": args.layout})
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        message = str(err["msg"]).replace("Input should be", "must be").replace("Value error, ", "")
        if err["loc"]:
            option = f"--{str(err['loc'][0]).replace('_', '-')}"
            message += f"; got {err.get('input')!r}"
        else:
            option, message = "--min-size/--max-size", message.replace("_", "-")
        raise UserError(f"make-data {option}: {message}") from None
    if args.layout == "folder":
        root = make_folder_tree(args.dir, body_parts=parts, progress=True, **options, **folder)
    else:
        root = make_mura_tree(args.dir, body_parts=parts, progress=True, **options)
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
