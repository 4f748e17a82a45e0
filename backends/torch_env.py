"""Environment variables the worker sets BEFORE importing torch (imports nothing heavy).

    env = {**os.environ, **PRE_IMPORT_ENV["deterministic" if deterministic else "default"]}

cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle; deterministic GPU matmuls need
it set before CUDA initialises, which is too late inside `TorchBackend.seed` in general.
"""

from __future__ import annotations

PRE_IMPORT_ENV: dict[str, dict[str, str]] = {
    "deterministic": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "default": {},
}

# set by the harness's executors: this worker's share of the CPU cores (`TorchBackend.seed` applies
# it with torch.set_num_threads); unset, torch keeps its default (every core)
THREADS_ENV = "HARNESS_THREADS"
