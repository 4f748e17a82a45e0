"""One run in one fresh process: seed -> build -> fit -> predict(test) -> RunResult JSON.

    python -m harness.worker JOB.json          (started by harness/runner.py, never by hand)

The job file holds the resolved spec, the RunKey, the run hash, the cache folder and where to
write the result. Progress goes to stdout as lines `@@progress {json}` for the runner; everything
else the frameworks print goes to stderr (the runner keeps it in logs/). The result is written
atomically and only at the end, so a killed worker leaves nothing that looks complete.
Exit codes: 0 ok, 1 the run failed (a failed RunResult was written), 2 user error.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import EXIT_USER_ERROR, UserError
from harness.results import SCHEMA_VERSION, write_json_atomic
from harness.spec import RandomModel, Spec

FAULT_ENV = "HARNESS_FAULT_INJECT"


def inject_fault(run_id: str, stage: str) -> None:
    """Testing hook for the runner's reliability tests: `HARNESS_FAULT_INJECT=RUN_ID=FAULT`
    (comma-separated) makes that run misbehave at `stage`. Faults: raise, nan, hang, kill."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        target, _, fault = item.partition("=")
        if target != run_id:
            continue
        if fault == "raise" and stage == "fit":
            raise RuntimeError("injected fault")
        if fault == "hang" and stage == "fit":
            progress("epoch", epochs=1, epoch=1, loss=0.5, accuracy=0.5, seconds=1.0)
            time.sleep(3600)
        if fault == "kill" and stage == "fit":
            os.kill(os.getpid(), signal.SIGKILL)


def progress(event: str, **fields: Any) -> None:
    print("@@progress " + json.dumps({"event": event, **fields}, default=str), flush=True)


def _groups(table: Any, rows: np.ndarray) -> dict[str, list[str]]:
    return {
        "patient": [str(x) for x in table["patient"].to_numpy()[rows]],
        "study": [str(x) for x in table["study"].to_numpy()[rows]],
    }


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job; returns the RunResult (status ok). Raises on failure."""
    # Imported here: the backend registry may set environment variables (KERAS_BACKEND,
    # determinism flags) that must be in place before a framework is imported.
    from backends.base import EvalData, ModelInput, TrainData
    from backends.loop import PREDICT_BATCH, fit
    from backends.registry import create
    from harness.data import prepare_data
    from harness.monitor import Monitor
    from harness.provenance import collect_provenance

    spec = Spec.model_validate(job["spec"])
    key = job["key"]
    model = spec.model(key["model"])
    result: dict[str, Any] = {"history": []}

    mon = Monitor(interval_s=0.2)
    with mon:
        with mon.phase("data"):
            data = prepare_data(spec.data, Path(job["cache_dir"]), progress=False)
            assert data is not None  # build=True always returns the data
            images = data.cache.images
            labels = data.table["label"].to_numpy().astype(np.float32)
            split = data.split
        from harness.plan import training_code_version

        if training_code_version(key["backend"]) != job["code_version"]:
            raise RuntimeError(
                "the training code changed since the run was planned; rerun the harness"
            )
        if data.data_hash != job["data_hash"]:
            raise RuntimeError(
                f"the data changed since the run was planned (hash {data.data_hash} != "
                f"{job['data_hash']}); rerun the harness"
            )
        with mon.phase("build"):
            backend = create(
                key["backend"], device=spec.runtime.device, deterministic=spec.runtime.deterministic
            )
            backend.seed(key["seed"], spec.runtime.deterministic)
            model_input = ModelInput(
                spec.data.image_size, spec.data.channels, spec.normalization(model)
            )
            handle = backend.build(model, model_input)
            counts = backend.count_params(handle)
        progress("built", params=counts.__dict__)
        inject_fault(job["run_id"], "fit")

        if not isinstance(model, RandomModel):
            train = TrainData(
                images,
                split.train,
                labels[split.train],
                spec.augmentation,
                key["seed"],
                model.train.shuffle,
            )
            val = EvalData(np.asarray(images[np.sort(split.val)]), labels[np.sort(split.val)])

            def on_epoch(rec: Any) -> None:
                mon.record_epoch(epoch=rec.epoch, seconds=rec.seconds, images=rec.images)
                progress("epoch", epochs=model.train.epochs, **rec.to_dict())

            with mon.phase("train"):
                history = fit(backend, handle, model, train, val, on_epoch)
            result["history"] = [h.to_dict() for h in history]
            train_s = sum(h.train_seconds for h in history)
            first = history[0].first_step_seconds if history else None
            seen = sum(h.images for h in history)
            if first is not None:
                mon.record_subphase("first_step", first)
            if history and first is not None and seen > 0:
                per_batch = model.train.batch_size
                mon.record_throughput(
                    "train", images=max(seen - per_batch, 0), seconds=max(train_s - first, 1e-9)
                )
        test_rows = np.sort(split.test)
        test_images = np.asarray(images[test_rows])
        with mon.phase("predict"):
            t0 = time.perf_counter()
            probs = backend.predict(handle, test_images, PREDICT_BATCH)
            mon.record_throughput(
                "inference", images=len(test_rows), seconds=time.perf_counter() - t0
            )
        mon.set_framework_memory(backend.peak_memory())

    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if f"{job['run_id']}=nan" in os.environ.get(FAULT_ENV, ""):
        probs[::7] = np.nan
    if probs.shape != (len(test_rows),):
        raise RuntimeError(f"predict returned {probs.shape} for {len(test_rows)} test images")
    if not np.all(np.isfinite(probs)):
        bad = int(np.sum(~np.isfinite(probs)))
        raise FloatingPointError(f"predict returned {bad} non-finite probabilities (NaN/inf)")
    result.update(
        params=counts.__dict__,
        environment=backend.environment(),
        resources=mon.summary(),
        provenance=collect_provenance({"harness_command": job.get("command")}),
        test={
            "rows": test_rows.tolist(),
            "labels": labels[test_rows].astype(int).tolist(),
            "probs": probs.tolist(),
            **_groups(data.table, test_rows),
        },
        skipped_images=list(data.skipped),
    )
    return result


def envelope(job: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "run_id": job["run_id"],
        "key": job["key"],
        "run_hash": job["run_hash"],
        "attempt": job.get("attempt"),
        "spec_name": job["spec"]["name"],
        "spec_hash": job["spec_hash"],
        "data_hash": job["data_hash"],
        "code_version": job["code_version"],
        "status": status,
        "started": job.get("started"),
        "finished": time.time(),
        "complete": True,
        **fields,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    job["started"] = time.time()
    out = Path(job["out"])
    # SIGTERM from the runner (Ctrl-C, timeout): leave without writing anything
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    try:
        result = execute(job)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        write_json_atomic(
            out, envelope(job, "failed", error={"type": "UserError", "message": e.message})
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a failed run is a result, with its reason
        traceback.print_exc()
        message = f"{type(e).__name__}: {e}"
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            message = f"out of memory: {message}"
        write_json_atomic(
            out, envelope(job, "failed", error={"type": type(e).__name__, "message": message})
        )
        return 1
    if any(
        isinstance(v, float) and math.isnan(v) for h in result["history"] for v in (h.get("loss"),)
    ):
        write_json_atomic(
            out,
            envelope(
                job, "failed", error={"type": "FloatingPointError", "message": "loss became NaN"}
            ),
        )
        return 1
    write_json_atomic(out, envelope(job, "ok", **result))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is on disk; leave without waiting on framework threads at interpreter exit.
    os._exit(code)
