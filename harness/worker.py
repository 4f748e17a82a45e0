"""One run in one fresh process: seed -> build -> fit -> predict(test) -> RunResult JSON.

    python -m harness.worker JOB.json          (started by harness/runner.py, never by hand)

The job file is a harness.records.Job: the resolved spec, the RunKey, the run hash, the attempt,
the prepared data (cache folder, its content hash, the split's rows) and where to write the
result. The worker checks what the runner planned (the cache still holds that content, the
training code is the planned version) instead of preparing the data again. Progress goes to
stdout as progress lines (harness.results.progress_line) for the runner; everything else the
frameworks print goes to stderr (the runner keeps it in logs/). The result is written atomically
and only at the end, so a killed worker leaves nothing that looks complete.
Exit codes: 0 ok, 1 the run failed (a failed RunResult was written), 2 user error.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from harness.errors import EXIT_USER_ERROR, UserError
from harness.records import BuiltEvent, EpochEvent, EpochRecord, Job, RunResult, TestPredictions
from harness.results import progress_line, read_job, write_run
from harness.spec import RandomModel


def emit(event: BuiltEvent | EpochEvent) -> None:
    print(progress_line(event), flush=True)


def open_images(job: Job) -> np.ndarray:
    """The cache's images (memory-mapped), after checking it is the data the run was planned on
    and the training code is the planned version; RuntimeError otherwise."""
    from harness.data.cache import open_cache
    from harness.plan import training_code_version

    if training_code_version(job.key.backend) != job.code_version:
        raise RuntimeError("the training code changed since the run was planned; rerun the harness")
    try:
        cache = open_cache(job.data.cache_folder)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"the image cache {job.data.cache_folder} cannot be opened ({e}); rerun the harness"
        ) from None
    content = cache.pixels_sha256 or cache.key
    if content != job.data.cache_content or len(cache) != len(job.data.labels):
        raise RuntimeError(
            f"the image cache {job.data.cache_folder} changed since the run was planned "
            f"(content {content} != {job.data.cache_content}); rerun the harness"
        )
    return cache.images


def execute(job: Job, started: float) -> RunResult:
    """Run one job; returns its RunResult (ok, or failed for a NaN loss). Raises on failure."""
    # Imported here: the backend registry may set environment variables (KERAS_BACKEND,
    # determinism flags) that must be in place before a framework is imported.
    from backends.base import EvalData, ModelInput, TrainData
    from backends.registry import create
    from harness.monitor import Monitor
    from harness.provenance import collect_provenance

    spec, key, rows = job.spec, job.key, job.data
    model = spec.model(key.model)
    history: list[EpochRecord] = []

    mon = Monitor(interval_s=0.2)
    with mon:
        with mon.phase("data"):
            images = open_images(job)
            labels = np.asarray(rows.labels, dtype=np.float32)
            train_rows = np.asarray(rows.train, dtype=np.int64)
            val_rows = np.asarray(rows.val, dtype=np.int64)
            test_rows = np.asarray(rows.test, dtype=np.int64)
        with mon.phase("build"):
            backend = create(
                key.backend, device=spec.runtime.device, deterministic=spec.runtime.deterministic
            )
            backend.seed(key.seed, spec.runtime.deterministic)
            model_input = ModelInput(
                spec.data.image_size, spec.data.channels, spec.normalization(model)
            )
            handle = backend.build(model, model_input)
            counts = backend.count_params(handle)
        emit(BuiltEvent(params=counts))

        if not isinstance(model, RandomModel):
            train = TrainData(
                images,
                train_rows,
                labels[train_rows],
                spec.augmentation,
                key.seed,
                model.train.shuffle,
            )
            val = EvalData(np.asarray(images[val_rows]), labels[val_rows])

            def on_epoch(rec: EpochRecord) -> None:
                mon.record_epoch(epoch=rec.epoch, seconds=rec.seconds, images=rec.images)
                emit(EpochEvent(epochs=model.train.epochs, record=rec))

            with mon.phase("train"):
                history = backend.fit(handle, train, val, model.train, on_epoch)
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
            if any(math.isnan(h.loss) for h in history):
                return RunResult.failed(
                    job, "loss became NaN", "FloatingPointError", started=started,
                    history=tuple(history),
                )
        test_images = np.asarray(images[test_rows])
        with mon.phase("predict"):
            t0 = time.perf_counter()
            probs = backend.predict(handle, test_images)
            mon.record_throughput(
                "inference", images=len(test_rows), seconds=time.perf_counter() - t0
            )
        mon.set_framework_memory(backend.peak_memory())

    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if probs.shape != (len(test_rows),):
        raise RuntimeError(f"predict returned {probs.shape} for {len(test_rows)} test images")
    if not np.all(np.isfinite(probs)):
        bad = int(np.sum(~np.isfinite(probs)))
        raise FloatingPointError(f"predict returned {bad} non-finite probabilities (NaN/inf)")
    return RunResult.ok(
        job,
        TestPredictions(
            rows=rows.test,
            labels=tuple(int(x) for x in labels[test_rows]),
            probs=tuple(probs.tolist()),
            patient=rows.test_patient,
            study=rows.test_study,
        ),
        history=tuple(history),
        params=counts,
        environment=backend.environment(),
        resources=mon.summary(),
        provenance=collect_provenance({"harness_command": list(job.command)}),
        skipped_images=rows.skipped,
        started=started,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    job = read_job(Path(argv[0]))
    # SIGTERM from the runner (Ctrl-C, timeout): leave without writing anything
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    try:
        result = execute(job, started)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        write_run(job.out, RunResult.failed(job, e.message, "UserError", started=started))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a failed run is a result, with its reason
        traceback.print_exc()
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
            reason = f"out of memory: {reason}"
        write_run(job.out, RunResult.failed(job, reason, type(e).__name__, started=started))
        return 1
    write_run(job.out, result)
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is on disk; leave without waiting on framework threads at interpreter exit.
    os._exit(code)
