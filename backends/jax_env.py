"""Environment variables Keras on JAX (`keras-jax`) needs set BEFORE JAX starts (imports nothing).

XLA reads XLA_FLAGS when JAX creates its backend (the first jax.devices(), in the backend's
constructor): deterministic GPU kernels (scatter, reductions) must be asked for there. On CPU,
XLA's kernels are deterministic in a given process and build; measured across processes in
README.md (keras-jax). JAX otherwise reserves 75% of GPU memory at start-up, which makes its
peak figures meaningless (as TF_FORCE_GPU_ALLOW_GROWTH for TensorFlow).
"""

from __future__ import annotations

_COMMON = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

PRE_IMPORT_ENV: dict[str, dict[str, str]] = {
    "default": dict(_COMMON),
    "deterministic": {**_COMMON, "XLA_FLAGS": "--xla_gpu_deterministic_ops=true"},
}
