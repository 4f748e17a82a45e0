"""kill -9 at each phase of `python -m harness run`, then the same command again: nothing lost.

    .venv/bin/python tests/tools/fault_battery.py [--phase epoch] [-- extra run arguments]

For each phase a fresh results and cache folder; the command starts in its own process group;
when the phase's first file appears (generation, caching: their temp folder; epoch: the first
checkpoint; result: the first run file; report: the figures folder) the whole group gets
SIGKILL. The same command then runs to the end and must exit 0 with every run ok, no temp
leftovers, and, when it was killed inside training, a resume that did not repeat the saved
epochs. Prints one line per phase; exits 1 if any phase broke a promise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [  # the phases of training: a small CNN, 3 epochs, two seeds
    "specs/demo.yaml", "--models", "cnn", "--backends", "torch", "--seeds", "0,1",
    "--set", "data.synthetic.patients=120", "--set", "models.cnn.train.epochs=3",
]
DATA = [  # the data phases: enough images to take seconds; the random baseline, no training
    "specs/demo.yaml", "--models", "baseline", "--seeds", "0,1",
    "--set", "data.synthetic.patients=600", "--set", "data.synthetic.min_size=48",
    "--set", "data.synthetic.max_size=64",
]
ARGS = {"generation": DATA, "caching": DATA, "epoch": TRAIN, "result": TRAIN, "report": TRAIN}


def triggers(out: Path, cache: Path) -> dict[str, Callable[[], bool]]:
    return {
        "generation": lambda: any(cache.glob("synthetic/.tmp-*")),
        "caching": lambda: any(cache.glob("images/.tmp-*")),
        "epoch": lambda: any(out.glob("checkpoints/*.npz")),
        "result": lambda: any(out.glob("runs/*.json")),
        "report": lambda: (out / "figures").is_dir(),
    }


def leftovers(out: Path, cache: Path) -> list[str]:
    found = [*cache.glob("synthetic/.tmp-*"), *cache.glob("images/.tmp-*"), *out.rglob(".*.tmp"),
             *out.glob(".job.*"), *out.glob("checkpoints/*")]
    return [str(p) for p in found]


def run_phase(phase: str, work: Path, extra: list[str]) -> tuple[bool, str]:
    out, cache = work / phase / "out", work / phase / "cache"
    shutil.rmtree(work / phase, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "harness", "run", *ARGS[phase], *extra, "--out", str(out),
           "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    log = (work / f"{phase}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    hit = triggers(out, cache)[phase]
    while not hit():
        if proc.poll() is not None:
            return False, f"finished (rc {proc.returncode}) before the phase was seen"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in out.glob("checkpoints/*.npz"))
    done_before = sorted(p.name for p in out.glob("runs/*.json"))
    time.sleep(0.5)  # the worker dies with its parent (PR_SET_PDEATHSIG); let it go
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    (work / f"{phase}.rerun.log").write_text(r.stdout + r.stderr)
    problems = []
    if r.returncode != 0:
        problems.append(f"rerun exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    runs = {p.name: json.loads(p.read_text()) for p in out.glob("runs/*.json")}
    model = "cnn__torch" if ARGS[phase] is TRAIN else "baseline__reference"
    if sorted(runs) != [f"{model}__seed0.json", f"{model}__seed1.json"] or any(
            v.get("status") != "ok" for v in runs.values()):
        problems.append(f"runs: { {k: v.get('status') for k, v in runs.items()} }")
    for name in done_before:
        if f"{name}" in runs and "skipped" not in r.stdout:
            problems.append(f"{name} finished before the kill but was not skipped")
    for name in saved:
        if name.replace(".npz", ".json") in done_before:
            continue  # its result was written before the kill: nothing to resume
        resumed = (out / "logs" / name.replace(".npz", ".log")).read_text()
        if "resuming after epoch" not in resumed:
            problems.append(f"{name}: saved before the kill, the rerun did not resume from it")
    epochs = {k: [h["epoch"] for h in v.get("history", [])] for k, v in runs.items()}
    if any(e != ([1, 2, 3] if model == "cnn__torch" else []) for e in epochs.values()):
        problems.append(f"histories: {epochs}")
    if not (out / "report.md").is_file():
        problems.append("no report.md")
    if left := leftovers(out, cache):
        problems.append(f"leftovers: {left}")
    what = f"killed with checkpoints {saved} and results {done_before}"
    return not problems, what + ("; " + "; ".join(problems) if problems else "; rerun ok")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", action="append")
    p.add_argument("--work", type=Path, default=Path("/tmp/fault-battery"))
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    phases = args.phase or list(triggers(Path(), Path()))
    ok = True
    for phase in phases:
        t0 = time.time()
        good, what = run_phase(phase, args.work, args.extra)
        ok &= good
        print(f"{phase}: {'OK' if good else 'BROKEN'} ({time.time() - t0:.0f} s): {what}",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
