"""Environment variables the Keras backend needs set BEFORE TensorFlow is imported.

    from backends.keras_env import PRE_IMPORT_ENV
    os.environ.update(PRE_IMPORT_ENV["deterministic" if deterministic else "default"])

Read by the harness worker before it imports `backends.keras_backend`; imports nothing heavy, so
reading it never loads TensorFlow. Determinism on CPU itself is enforced at run time by
`KerasBackend.seed` (one intra-op and one inter-op thread + op determinism): see the module
docstring of backends/keras_backend.py for the choice and its measured cost.
"""

from __future__ import annotations

_COMMON = {
    # TF otherwise reserves all GPU memory at start-up, which makes its peak figures meaningless
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
}

PRE_IMPORT_ENV: dict[str, dict[str, str]] = {
    "default": dict(_COMMON),
    "deterministic": {
        **_COMMON,
        # the legacy switch, read at import: covers ops that run before seed() is called
        "TF_DETERMINISTIC_OPS": "1",
    },
}

# set by the harness's executors: this worker's share of the CPU cores (`KerasBackend` applies it
# to TensorFlow's intra- and inter-op pools before the first op); unset, TF's default
THREADS_ENV = "HARNESS_THREADS"
