"""Typed records that cross modules and processes: what a worker is asked, what it reports back.

    job = Job(spec=spec, key=RunKey("cnn", "torch", 0), run_hash=..., data=JobData(...), ...)
    result = RunResult.failed(job, "timeout: exceeded runtime.timeout_s = 8 s", "WorkerDied")
    EpochRecord(epoch=1, loss=0.69, ...)             # one line of a RunResult's history

The runner hands each worker a `Job` (everything the worker needs, so it checks instead of
recomputing); the worker streams progress events (`BuiltEvent`, `EpochEvent`) and ends with one
`RunResult`. harness/results.py alone turns them into JSON and back (files and progress lines);
everything else passes these objects. They are frozen; JSON round trips are exact (floats
included).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.spec import ParamCounts, Spec


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of history, in the schema shared by all backends."""

    epoch: int  # 1-based
    loss: float
    accuracy: float
    recall: float
    precision: float
    val_loss: float | None
    val_accuracy: float | None
    val_recall: float | None
    val_precision: float | None
    seconds: float  # wall time of the epoch, validation included
    train_seconds: float  # wall time of the training steps only
    images: int  # training images seen
    first_step_seconds: float | None = None  # set on epoch 1: tracing/compilation included
    val_auroc: float | None = None
    learning_rate: float | None = None  # the optimizer's rate during the epoch (float32)
    # the epoch whose weights the test set is evaluated with (checkpoint / restore_best)
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of the plan: a model on a backend with a seed."""

    model: str
    backend: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}__{self.backend}__seed{self.seed}"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobData(Record):
    """The prepared data as a worker uses it: which cache to open, what it must hold, the split.
    The runner prepares it once for all jobs; the worker neither re-splits nor rehashes."""

    cache_folder: Path
    cache_content: str  # the cache's stored content hash (pixels); the worker compares it
    labels: tuple[int, ...]  # per cache row, from the dataset's tables (they win over the cache)
    train: tuple[int, ...]  # cache rows, in the split's order (it fixes the batch stream)
    val: tuple[int, ...]  # sorted
    test: tuple[int, ...]  # sorted
    test_patient: tuple[str, ...]  # group ids of the test rows, for clustered intervals
    test_study: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # images the cache left out (on_bad_image: skip)

    @model_validator(mode="after")
    def _aligned(self) -> JobData:
        n = len(self.test)
        if len(self.test_patient) != n or len(self.test_study) != n:
            raise ValueError(f"test groups do not match the {n} test rows")
        return self


class Job(Record):
    """What the runner hands one worker process."""

    spec: Spec  # resolved (extends, --set applied)
    key: RunKey
    run_hash: str
    attempt: str  # a fresh nonce per attempt: a result counts only for the attempt that wrote it
    spec_hash: str
    data_hash: str
    code_version: str  # of this backend's training path, as planned; the worker compares it
    data: JobData
    out: Path  # where the RunResult goes
    command: tuple[str, ...] = ()  # the harness command line, for provenance
    checkpoint: Path | None = None  # where the training state goes after each epoch; None: off
    # runtime.init shared: the first backend's run writes its initial weights here, the others
    # of the same model and seed read them (None: each draws its own)
    init_weights: Path | None = None

    @property
    def run_id(self) -> str:
        return self.key.id


class RunError(Record):
    """Why a run failed; `stderr_tail` is the end of the worker's log, added by the runner."""

    type: str  # the exception's class, UserError, WorkerDied, ...
    reason: str
    stderr_tail: str = ""


class TestPredictions(Record):
    """The test set as scored: cache rows, labels, probabilities and the group of each image."""

    __test__ = False  # not a pytest test class, despite the name

    rows: tuple[int, ...]
    labels: tuple[int, ...]
    probs: tuple[float, ...]
    patient: tuple[str, ...]
    study: tuple[str, ...]

    @model_validator(mode="after")
    def _aligned(self) -> TestPredictions:
        n = len(self.rows)
        lengths = {len(self.labels), len(self.probs), len(self.patient), len(self.study)}
        if lengths != {n}:
            raise ValueError(
                f"rows ({n}), labels ({len(self.labels)}), probs ({len(self.probs)}), patient "
                f"({len(self.patient)}) and study ({len(self.study)}) differ in length"
            )
        return self


class RunResult(Record):
    """One run's outcome; status ok carries test predictions, status failed an error."""

    key: RunKey
    run_hash: str
    attempt: str | None = None  # None: written before attempts were recorded
    spec_name: str
    spec_hash: str
    data_hash: str
    code_version: str
    status: Literal["ok", "failed"]
    error: RunError | None = None
    history: tuple[EpochRecord, ...] = ()
    test: TestPredictions | None = None
    params: ParamCounts | None = None
    environment: dict[str, Any] = Field(default_factory=dict)  # backend.environment()
    resources: dict[str, Any] = Field(default_factory=dict)  # Monitor.summary()
    provenance: dict[str, Any] = Field(default_factory=dict)  # collect_provenance()
    skipped_images: tuple[str, ...] = ()
    started: float | None = None  # time.time() when the worker started
    finished: float

    @model_validator(mode="after")
    def _consistent(self) -> RunResult:
        if self.status == "ok" and (self.test is None or self.error is not None):
            raise ValueError("status ok needs test predictions and no error")
        if self.status == "failed" and self.error is None:
            raise ValueError("status failed needs an error")
        return self

    @property
    def run_id(self) -> str:
        return self.key.id

    @classmethod
    def _of(cls, job: Job, **fields: Any) -> RunResult:
        return cls(
            key=job.key,
            run_hash=job.run_hash,
            attempt=job.attempt,
            spec_name=job.spec.name,
            spec_hash=job.spec_hash,
            data_hash=job.data_hash,
            code_version=job.code_version,
            finished=time.time(),
            **fields,
        )

    @classmethod
    def ok(cls, job: Job, test: TestPredictions, **fields: Any) -> RunResult:
        """A finished run of `job`; fields: history, params, environment, resources, ..."""
        return cls._of(job, status="ok", test=test, **fields)

    @classmethod
    def failed(
        cls,
        job: Job,
        reason: str,
        error_type: str = "RuntimeError",
        stderr_tail: str = "",
        **fields: Any,
    ) -> RunResult:
        """A failed run of `job`, with its reason; fields: started, history, ..."""
        error = RunError(type=error_type, reason=reason, stderr_tail=stderr_tail)
        return cls._of(job, status="failed", error=error, **fields)

    def with_stderr_tail(self, tail: str) -> RunResult:
        """The same result with the end of the worker's log attached to its error."""
        if self.error is None:
            return self
        error = self.error.model_copy(update={"stderr_tail": tail})
        return self.model_copy(update={"error": error})


class BuiltEvent(Record):
    """Progress: the model is built."""

    event: Literal["built"] = "built"
    params: ParamCounts


class EpochEvent(Record):
    """Progress: an epoch finished."""

    event: Literal["epoch"] = "epoch"
    epochs: int  # planned
    record: EpochRecord


class StepEvent(Record):
    """Progress: `step` of the epoch's `steps` training batches are done (sent throttled)."""

    event: Literal["step"] = "step"
    epoch: int
    epochs: int  # planned
    step: int
    steps: int


ProgressEvent = Annotated[BuiltEvent | EpochEvent | StepEvent, Field(discriminator="event")]


@dataclass(frozen=True)
class TrainState:
    """Where a run's training stands after `epoch` complete epochs: what the loop hands the
    worker after each epoch and takes back to resume (results.py writes it as .npz)."""

    epoch: int
    history: tuple[EpochRecord, ...]
    backend: dict[str, np.ndarray]  # Backend.get_state: weights, optimizer, RNG
    # the recipe's per-epoch policies (backends/recipe.py): counters and best values, and the
    # weights they keep by policy name (neutral layout)
    recipe: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
