"""Each optimizer of the recipe, built from its spec by a backend's table, against Keras' own:
two steps from fixed weights and gradients, the rate divided by 10 in between (reference from
tests/tools/make_keras_recipe_reference.py). Runs in the env of each framework."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, available_backends
from pydantic import TypeAdapter

from harness.spec import Optimizer

BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
KERAS = np.load(ROOT / "tests" / "data" / "keras_recipe_reference.npz")
CASES = {
    "adamw": {"name": "adamw", "learning_rate": 0.01},
    "rmsprop": {"name": "rmsprop", "learning_rate": 0.01},
    "rmsprop_centered_momentum": {"name": "rmsprop", "learning_rate": 0.01, "momentum": 0.5,
                                  "centered": True, "weight_decay": 0.1},
    "sgd_wd_momentum": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                        "weight_decay": 0.1},
    "sgd_nesterov": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "nesterov": True},
}


def _two_steps(backend: str, spec) -> np.ndarray:
    w0, g1, g2 = KERAS["opt/w0"], KERAS["opt/g1"], KERAS["opt/g2"]
    if backend == "torch":
        import torch

        from backends.torch_backend import OPTIMIZERS

        p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        opt = OPTIMIZERS[spec.name](spec, [p])
        for g, lr in ((g1, 0.01), (g2, 0.001)):
            for group in opt.param_groups:
                group["lr"] = lr
            p.grad = torch.from_numpy(g.copy())
            opt.step()
        return p.detach().numpy()
    import keras

    from backends.keras_backend import OPTIMIZERS as KERAS_OPTIMIZERS

    var = keras.Variable(w0.copy())
    opt = KERAS_OPTIMIZERS[spec.name](spec)
    opt.build([var])
    for g, lr in ((g1, 0.01), (g2, 0.001)):
        opt.learning_rate = lr
        opt.apply([keras.ops.convert_to_tensor(g)], [var])
    return np.asarray(keras.ops.convert_to_numpy(var))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_keras_over_two_steps(backend, case):
    spec = TypeAdapter(Optimizer).validate_python(CASES[case])
    got = _two_steps(backend, spec)
    expected = KERAS[f"opt/{case}"]
    assert not np.allclose(expected, KERAS["opt/w0"], atol=1e-4)  # the steps moved it
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-7)


def test_keras_defaults_are_written_out():
    adamw = TypeAdapter(Optimizer).validate_python({"name": "adamw"})
    rms = TypeAdapter(Optimizer).validate_python({"name": "rmsprop"})
    assert (adamw.learning_rate, adamw.weight_decay, adamw.epsilon) == (1e-3, 0.004, 1e-7)
    assert (rms.learning_rate, rms.rho, rms.momentum, rms.epsilon, rms.centered) == (
        1e-3, 0.9, 0.0, 1e-7, False)
