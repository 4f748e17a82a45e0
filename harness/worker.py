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

import hashlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import EXIT_USER_ERROR, UserError
from harness.executors import placement
from harness.plan import init_source
from harness.records import (
    BuiltEvent,
    EpochEvent,
    EpochRecord,
    Job,
    RunResult,
    StepEvent,
    TestPredictions,
    TrainState,
)
from harness.results import (
    progress_line,
    read_arrays,
    read_checkpoint,
    read_job,
    write_arrays_atomic,
    write_checkpoint,
    write_run,
)
from harness.spec import RandomModel

STEP_EVENTS_EVERY_S = 0.5  # a few progress updates per second at most, whatever the batch rate


def emit(event: BuiltEvent | EpochEvent | StepEvent) -> None:
    print(progress_line(event), flush=True)


def step_emitter(epochs: int, first_epoch: int = 1, clock: Any = time.monotonic) -> Any:
    """The loop's on_step: a StepEvent at most every STEP_EVENTS_EVERY_S, none for the last step
    (the epoch's own event follows it)."""
    last = [clock()]
    epoch = [first_epoch - 1]

    def on_step(done: int, total: int) -> None:
        if done == 1:
            epoch[0] += 1
        now = clock()
        if done < total and now - last[0] >= STEP_EVENTS_EVERY_S:
            last[0] = now
            emit(StepEvent(epoch=epoch[0], epochs=epochs, step=done, steps=total))

    return on_step


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


def can_checkpoint(backend: Any) -> bool:
    """Whether the backend implements get_state/set_state (third-party ones may not)."""
    from backends.base import Backend

    return all(getattr(type(backend), m) is not getattr(Backend, m)
               for m in ("get_state", "set_state"))


def share_initial_weights(job: Job, backend: Any, handle: Any) -> str:
    """runtime.init shared: the model's first backend writes its seeded initial weights, the
    others start from them (neutral layout). Returns what the result records."""
    source = init_source(job.spec, job.key)
    path = job.init_weights
    if source is None or path is None:
        return "per_backend (each framework draws its own initial weights)"
    if job.key.backend == source:
        weights = backend.get_weights(handle)
        write_arrays_atomic(path, weights)
    else:
        found = read_arrays(path)
        if found is None:
            first = f"{job.key.model}__{source}__seed{job.key.seed}"
            raise UserError(
                f"runtime.init: shared: {job.run_id} starts from the initial weights of {first}, "
                f"which are not in {path}",
                f"run the model's first backend ({source}) too, e.g. drop --backends",
            )
        backend.set_weights(handle, found)
        weights = found
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return f"shared from {source} (sha256 {digest.hexdigest()[:16]} of the neutral weights)"


def execute(job: Job, started: float) -> RunResult:
    """Run one job; returns its RunResult (ok, or failed for a NaN loss). Raises on failure."""
    # Imported here: the backend registry may set environment variables (KERAS_BACKEND,
    # determinism flags) that must be in place before a framework is imported.
    from backends.base import EvalData, ModelInput, TrainData
    from backends.loop import PREDICT_BATCH, NonFiniteLoss, fit
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
            init = share_initial_weights(job, backend, handle)
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

            every, path = spec.runtime.checkpoint_every, job.checkpoint
            if path is not None and not can_checkpoint(backend):
                print(f"backend '{key.backend}' cannot save a training state: no checkpoints, a "
                      "killed run starts over", file=sys.stderr)
                path = None
            resume = read_checkpoint(path, job.run_hash) if path is not None else None
            if resume is not None:
                print(f"resuming after epoch {resume.epoch} from {path}", file=sys.stderr)

            def on_checkpoint(state: TrainState) -> None:
                if path is not None:
                    write_checkpoint(path, job.run_hash, state)

            with mon.phase("train"):
                try:
                    on_step = step_emitter(model.train.epochs, resume.epoch + 1 if resume else 1)
                    history = fit(backend, handle, model, train, val, on_epoch,
                                  resume=resume,
                                  on_checkpoint=on_checkpoint if path and every else None,
                                  checkpoint_every=max(every, 1), on_step=on_step)
                except NonFiniteLoss as e:  # a result of its own: the epochs before are kept
                    return RunResult.failed(
                        job, str(e), "FloatingPointError", started=started, history=e.history
                    )
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
        test_images = np.asarray(images[test_rows])
        with mon.phase("predict"):
            t0 = time.perf_counter()
            probs = backend.predict(handle, test_images, PREDICT_BATCH)
            mon.record_throughput(
                "inference", images=len(test_rows), seconds=time.perf_counter() - t0
            )
        mon.set_framework_memory(backend.peak_memory())

    where = placement()
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
        environment={**backend.environment(), "placement": where},
        # per-worker figures: how many workers shared the machine while they were taken
        resources={**mon.summary(), "workers_sharing_machine": where["workers_sharing_machine"]},
        provenance=collect_provenance({"harness_command": list(job.command), "init": init}),
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
