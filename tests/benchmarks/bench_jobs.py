"""`run --jobs 2` against `--jobs 1` on the same spec: wall time, and what changed in the results.

    python tests/benchmarks/bench_jobs.py [--rounds 2] [--out /tmp/bench-jobs] [PATH=VALUE ...]
    python tests/benchmarks/bench_jobs.py --rounds 0 --out /tmp/bench-jobs   # compare results only

A script, not a pytest benchmark: each measurement is a whole `python -m harness run --fresh`
(minutes), and the rounds are interleaved (1, 2, 1, 2, ...) so that the load of a shared machine
falls on both. For every run it compares the test probabilities of the two settings bit for bit
and says which thread counts each run had (environment.placement.threads, the framework's own
count): where the count is the same the results must be identical; where it changed the
floating-point reduction order may change too, and the script prints the measured difference.
Writes OUT/bench_jobs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the demo, shrunk to minutes on a 2-core CPU (see specs/demo.yaml)
DEFAULT_SET = ["models.cnn.train.epochs=4", "models.densenet.train.epochs=1",
               "data.synthetic.patients=120", "evaluation.bootstrap.resamples=200"]


def threads_of(run: dict) -> str:
    env = run.get("environment", {})
    det = env.get("determinism", {})
    framework = env.get("threads") or det.get("intra_op_threads")
    return f"{(env.get('placement') or {}).get('threads')}/{framework}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spec", default=str(ROOT / "specs" / "demo.yaml"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-jobs"))
    ap.add_argument("extra", nargs="*", help="more --set PATH=VALUE for the spec")
    args = ap.parse_args()
    sets = [x for s in DEFAULT_SET + args.extra for x in ("--set", s)]
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for jobs in (1, 2):
            out = args.out / f"jobs{jobs}"
            cmd = [sys.executable, "-m", "harness", "run", args.spec, "--fresh", "-q",
                   "--jobs", str(jobs), "--out", str(out), *sets]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONHASHSEED": "0"})
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
                return p.returncode
            times[jobs].append(wall)
            print(f"round {r + 1}: --jobs {jobs}: {wall:.1f} s", flush=True)
    rows = []
    for f in sorted((args.out / "jobs1" / "runs").glob("*.json")):
        a = json.loads(f.read_text())
        b = json.loads((args.out / "jobs2" / "runs" / f.name).read_text())
        pa, pb = a["test"]["probs"], b["test"]["probs"]
        diff = max(abs(x - y) for x, y in zip(pa, pb, strict=True))
        changed = sum((x >= 0.5) != (y >= 0.5) for x, y in zip(pa, pb, strict=True))
        rows.append({"run": f.stem, "threads_jobs1": threads_of(a), "threads_jobs2": threads_of(b),
                     "identical": pa == pb, "max_abs_diff": diff, "labels_changed": changed,
                     "workers_jobs2": b["resources"].get("workers_sharing_machine")})
    summary: dict = {"times_s": times, "runs": rows, "set": DEFAULT_SET + args.extra}
    if times[1] and times[2]:  # --rounds 0: only compare the results already in OUT
        m1, m2 = statistics.median(times[1]), statistics.median(times[2])
        summary.update({"median_jobs1_s": m1, "median_jobs2_s": m2, "speedup": m1 / m2})
        print(f"median wall: --jobs 1 {m1:.1f} s, --jobs 2 {m2:.1f} s, ratio {m1 / m2:.2f}x")
    (args.out / "bench_jobs.json").write_text(json.dumps(summary, indent=1))
    print("run | threads (harness/framework) jobs1 -> jobs2 | identical | max |diff| | "
          "labels changed")
    for row in rows:
        print(f"{row['run']} | {row['threads_jobs1']} -> {row['threads_jobs2']} | "
              f"{row['identical']} | {row['max_abs_diff']:.2e} | {row['labels_changed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
