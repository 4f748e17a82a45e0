"""Measure whether deterministic runs are bit-identical across fresh processes, N times.

    PYTHONPATH=. python tests/tools/measure_determinism.py OUT_DIR [N] [--set PATH=VALUE ...]

Trains specs/demo.yaml (shrunk by the --set arguments; default: CNN 2 epochs, DenseNet 1
epoch, 64 px, seed 0, backend keras) once, then runs `python -m harness run --check-determinism`
N times: each reruns every (model, backend) in a fresh worker process and grades its test
probabilities against the stored run with the harness's own grading (harness/runner.py
`grade_rerun`). Prints one JSON line per repetition (grades and the thread counts recorded) and a
summary; exits 1 when any rerun was not bit-identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SET = ["models.cnn.train.epochs=2", "models.densenet.train.epochs=1", "seeds=[0]"]


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    n = int(argv[1]) if len(argv) > 1 and not argv[1].startswith("--") else 10
    sets = DEFAULT_SET + [a.split("=", 1)[1] if a.startswith("--set=") else a
                          for a in argv[1:] if "=" in a]
    base = [sys.executable, "-m", "harness", "run", str(ROOT / "specs" / "demo.yaml"),
            "--backends", "keras", "--models", "cnn,densenet", "--out", str(out), "-q"]
    for s in sets:
        base += ["--set", s]
    t0 = time.monotonic()
    subprocess.run(base, check=True, cwd=ROOT)
    print(f"first run: {time.monotonic() - t0:.0f} s", flush=True)
    grades: list[str] = []
    for k in range(n):
        t0 = time.monotonic()
        subprocess.run(base + ["--check-determinism"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        result = json.loads((out / "determinism.json").read_text(encoding="utf-8"))
        rows = result["grades"] if isinstance(result, dict) else result
        line = [{"model": g["model"], "backend": g["backend"], "grade": g["grade"],
                 "threads": [g["flags"].get("intra_op_threads"),
                             g["flags"].get("inter_op_threads")]} for g in rows]
        grades += [g["grade"] for g in rows]
        print(json.dumps({"rep": k + 1, "s": round(time.monotonic() - t0), "grades": line}),
              flush=True)
    identical = sum(g == "bit-identical" for g in grades)
    print(f"SUMMARY {identical} of {len(grades)} reruns bit-identical")
    return 0 if identical == len(grades) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
