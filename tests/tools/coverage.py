"""The long coverage experiments behind the report's statistics, printed as markdown tables.

    python tests/tools/coverage.py                 # everything, about 30-60 min on 2 busy cores
    python tests/tools/coverage.py --only verdict --sims 500   # one table, fewer worlds

Not part of the test run (tests/test_stats.py runs short, seeded versions of each): this prints
(1) how often the verdict rule calls a paper that ran exactly our recipe "reproduced", new rule
and old, per training sd, metric and number of seeds; (2) the type-I error of plain and clustered
McNemar on MURA-like clusters; (3) the coverage of percentile and BCa bootstrap intervals at small
test sets. The worlds simulated are described in tests/simulate.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for simulate
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for harness

from simulate import World, bootstrap_coverage, mcnemar_rejections, verdict_outcomes  # noqa: E402


def _se(share: float, n: int) -> float:
    return (share * (1 - share) / n) ** 0.5


def verdict_table(n_sims: int, seed: int) -> None:
    print(f"### Verdict rule: a paper that ran exactly our recipe ({n_sims} worlds a row)\n")
    print("| metric | seeds | sd_train (points) | new: reproduced | new: not reproduced | "
          "old: reproduced | old: consistent | old: not reproduced |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    worlds = {"accuracy": World(), "recall": World(metric="recall", mu=0.60, n_paper=790)}
    for metric, world in worlds.items():
        for n_seeds in (3, 5):
            for sd in (0.0, 0.02, 0.038):
                t0 = time.perf_counter()
                new, old = verdict_outcomes(sd, n_sims, seed, world=world, n_seeds=n_seeds)
                rep = new["reproduced"] / n_sims
                not_rep = 1 - rep
                print(f"| {metric} | {n_seeds} | {100 * sd:.1f} | {100 * rep:.1f}% "
                      f"(± {100 * _se(rep, n_sims):.1f}) | {100 * not_rep:.1f}% | "
                      f"{100 * old['reproduced'] / n_sims:.1f}% | "
                      f"{100 * old['consistent'] / n_sims:.1f}% | "
                      f"{100 * (n_sims - old['reproduced'] - old['consistent']) / n_sims:.1f}% |",
                      flush=True)
                print(f"<!-- {time.perf_counter() - t0:.0f} s -->", file=sys.stderr)
    print()


def mcnemar_table(n_sims: int, seed: int) -> None:
    print(f"### McNemar under a true null, nominal 5% ({n_sims} worlds a row, ~2,000 images in "
          "patients of 1-5)\n")
    print("| intra-patient correlation | plain | clustered (Obuchowski) | clustered (Durkalski) |")
    print("| --- | --- | --- | --- |")
    for icc in (0.0, 0.2, 0.4):
        r = mcnemar_rejections(n_sims, seed, icc=icc)
        print(f"| {icc} | " + " | ".join(f"{100 * v:.1f}%" for v in r.values()) + " |",
              flush=True)
    print()


def bootstrap_table(n_sims: int, seed: int) -> None:
    print(f"### Bootstrap interval coverage of the true metric, nominal 95% ({n_sims} test sets "
          "a row, binormal scores, AUROC 0.80)\n")
    print("| test images | method | AUROC | recall | specificity |")
    print("| --- | --- | --- | --- | --- |")
    for n in (30, 100, 500):
        r = bootstrap_coverage(n, n_sims, seed)
        for method, cov in r.items():
            print(f"| {n} | {method} | " + " | ".join(f"{100 * v:.1f}%" for v in cov.values())
                  + " |", flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=2000, help="worlds per row (default 2000)")
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--only", choices=("verdict", "mcnemar", "bootstrap"))
    args = ap.parse_args()
    if args.only in (None, "verdict"):
        verdict_table(args.sims, args.seed)
    if args.only in (None, "mcnemar"):
        mcnemar_table(args.sims, args.seed)
    if args.only in (None, "bootstrap"):
        bootstrap_table(args.sims, args.seed)


if __name__ == "__main__":
    main()
