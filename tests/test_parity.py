"""Weight-port parity (harness/parity.py): the comparison, a wrong port that must fail, the CLI.

The CLI check runs each backend in its own process; here the pairs are those installed in the
env (torch -> torch in `tox -e torch`, keras-torch -> torch in `tox -e keras-torch`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
from conftest import ROOT, available_backends

from harness.parity import (
    FORWARD_TOL,
    GRAD64_TOL,
    GRAD_TOL,
    LAYER_TOL,
    compare,
    render_parity,
)
from harness.spec import load_spec

BACKENDS = available_backends()


def probe_arrays(shift: float = 0.0, grad_shift: float = 0.0, grad64_shift: float = 0.0
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = {
        "act/conv2d_1": rng.normal(size=(2, 4, 4, 3)),
        "act/dense_1": rng.normal(size=(2, 1)),
        "probs": np.array([0.25, 0.75]),
        "grad/conv2d_1/kernel": np.full((3, 3, 1, 3), 2.0),
        "grad64/conv2d_1/kernel": np.full((3, 3, 1, 3), 2.0),
        "grad/dense_1/kernel": np.full((48, 1), 1.0),
        "grad64/dense_1/kernel": np.full((48, 1), 1.0),
        "step1/dense_1/kernel": np.zeros((48, 1)),
        "loss": np.array([0.5]),
    }
    a["act/dense_1"] = a["act/dense_1"] + shift
    a["probs"] = a["probs"] + shift
    a["grad/conv2d_1/kernel"] = a["grad/conv2d_1/kernel"] * (1 + grad_shift)
    a["grad64/dense_1/kernel"] = a["grad64/dense_1/kernel"] * (1 + grad64_shift)
    return a


def test_identical_probes_pass_with_zero_differences():
    p = compare(probe_arrays(), probe_arrays(), "cnn", ("keras", "torch"), steps=1)
    assert p.status == "pass" and p.forward_pass and p.training_pass
    assert [(lay.name, lay.max_abs) for lay in p.layers] == [("conv2d_1", 0.0), ("dense_1", 0.0)]
    assert p.output_max_abs == 0.0 and p.first_divergent is None
    assert p.first_divergent_gradient is None
    assert [(s.step, s.loss_source, s.weights_max_abs) for s in p.steps] == [(1, 0.5, 0.0)]


def test_output_difference_above_tolerance_fails_and_names_the_layer():
    shift = 1e-3  # above FORWARD_TOL absolute, and above LAYER_TOL of dense_1's magnitude
    p = compare(probe_arrays(), probe_arrays(shift=shift), "cnn", ("keras", "torch"), steps=1)
    assert p.status == "fail" and p.forward_pass is False and p.training_pass is True
    assert p.output_max_abs == pytest.approx(shift, rel=1e-9)
    assert p.first_divergent == "dense_1"  # conv2d_1 is identical


def test_a_gradient_off_by_more_than_the_tolerance_fails_the_training_check():
    p = compare(probe_arrays(), probe_arrays(grad_shift=10 * GRAD_TOL), "cnn", ("a", "b"), 1)
    assert p.status == "fail" and p.forward_pass and p.training_pass is False
    assert p.worst_gradient.name == "conv2d_1/kernel"
    assert p.worst_gradient.rel == pytest.approx(10 * GRAD_TOL, rel=1e-9)  # ||a - b|| / ||a||
    assert p.first_divergent_gradient == "conv2d_1/kernel"
    # float64 agrees exactly; the target's float32 is off its own float64 by the shift
    assert p.worst_gradient.rel64 == 0.0
    assert p.worst_gradient.err32 == pytest.approx(10 * GRAD_TOL, rel=1e-9)


def test_float64_gradients_apart_fail_even_when_float32_agrees():
    """A port error smaller than float32's rounding still shows in float64: the exact check."""
    p = compare(probe_arrays(), probe_arrays(grad64_shift=100 * GRAD64_TOL), "cnn", ("a", "b"), 1)
    assert p.status == "fail" and p.forward_pass and p.training_pass is False
    by_name = {g.name: g for g in p.gradients}
    assert by_name["dense_1/kernel"].rel == 0.0
    assert by_name["dense_1/kernel"].rel64 == pytest.approx(100 * GRAD64_TOL, rel=1e-6)
    assert by_name["conv2d_1/kernel"].rel64 == 0.0
    assert p.first_divergent_gradient == "dense_1/kernel"
    assert "dense_1/kernel: 0.0e+00 (float64 1.0e-08)" in render_parity(
        {"seed": 0, "images": 2, "steps": 1, "augmentation": False, "pairs": [asdict(p)],
         "tolerances": {"forward": FORWARD_TOL, "layer": LAYER_TOL, "gradient": GRAD_TOL,
                        "gradient_float64": GRAD64_TOL}})


def test_a_missing_layer_is_a_failure_that_names_it():
    b = probe_arrays()
    del b["act/dense_1"]
    p = compare(probe_arrays(), b, "cnn", ("keras", "torch"), steps=1)
    assert (p.status, p.reason) == ("fail", "layer dense_1: missing")


@pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
@pytest.mark.parametrize("name", BACKENDS)
def test_a_wrong_port_nchw_flatten_order_fails_at_the_dense_layer(name):
    """Port the paper CNN's weights with the dense kernel's rows in NCHW order (the classic
    Keras -> PyTorch mistake): the check must fail, and name dense_1 as the first layer off."""
    from backends.base import ModelInput
    from backends.registry import create

    spec = load_spec(ROOT / "specs" / "paper.yaml",
                     ["data.image_size=32", "models.cnn.layers[17].units=8"])
    model = spec.model("cnn")
    backend = create(name, device="cpu", deterministic=True)
    backend.seed(0, True)
    right = backend.build(model, ModelInput(32, 3, "rescale"))
    weights = backend.get_weights(right)
    kernel = weights["dense_1/kernel"]  # rows in NHWC order: (h, w, c) of a (2, 2, 128) map
    h = w = 2
    c = kernel.shape[0] // (h * w)
    nchw = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
    wrong = backend.build(model, ModelInput(32, 3, "rescale"))
    backend.set_weights(wrong, {**weights, "dense_1/kernel": nchw})
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32), dtype=np.uint8)

    def probe(handle):
        out = {f"act/{k}": v for k, v in backend.activations(handle, images).items()}
        return {**out, "probs": backend.predict(handle, images), "loss": np.zeros(0)}

    p = compare(probe(right), probe(wrong), "cnn", (name, name), steps=0)
    assert p.status == "fail" and p.forward_pass is False
    assert p.first_divergent == "dense_1"
    assert p.output_max_abs > 100 * FORWARD_TOL
    by_name = {lay.name: lay for lay in p.layers}
    assert by_name["flatten_1"].max_abs == 0.0  # everything before the dense layer is equal
    assert by_name["dense_1"].rel > LAYER_TOL


def _run_parity(tiny, backends: str, *extra: str):
    cmd = [sys.executable, "-m", "harness", "parity", str(tiny["spec"]), "--models", "cnn",
           "--backends", backends, "--steps", "2", "--set", "models.cnn.layers[17].units=8",
           "--out", str(tiny["out"]), "--cache-dir", str(tiny["cache"]), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture
def tiny(tmp_path):
    from test_runner import TINY

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(demo=ROOT / "specs" / "demo.yaml"))
    return {"spec": spec, "out": tmp_path / "results", "cache": tmp_path / "cache"}


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
def test_cli_self_parity_is_exact_and_writes_parity_json(tiny):
    """One backend against itself in two processes: the port is the identity, to the bit."""
    name = BACKENDS[0]
    r = _run_parity(tiny, f"{name},{name}")
    assert r.returncode == 0, r.stderr
    result = json.loads((tiny["out"] / "parity.json").read_text())
    (pair,) = result["pairs"]
    assert (pair["model"], pair["source"], pair["target"], pair["status"]) == (
        "cnn", name, name, "pass")
    assert pair["output_max_abs"] == 0.0
    assert all(lay["max_abs"] == 0.0 for lay in pair["layers"])
    assert all(g["rel"] == 0.0 and g["rel64"] == 0.0 for g in pair["gradients"])
    assert len(pair["gradients"]) == 20  # every trainable variable of the CNN
    assert result["tolerances"]["gradient_float64"] == GRAD64_TOL
    assert "float64 in both backends" in result["method"]
    assert [s["weights_max_abs"] for s in pair["steps"]] == [0.0, 0.0]
    assert result["steps"] == 2 and result["tolerances"]["forward"] == FORWARD_TOL
    assert render_parity(result) in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HARNESS_TEST_FRAMEWORK") != "keras-torch",
                    reason="two frameworks in one env only in tox -e keras-torch")
def test_cli_parity_between_keras_and_torch_passes_forward(tiny):
    """Keras (on its torch backend) -> torch, each in its own process."""
    r = _run_parity(tiny, "keras-torch,torch")
    result = json.loads((tiny["out"] / "parity.json").read_text())
    (pair,) = result["pairs"]
    assert pair["forward_pass"] is True, r.stdout
    assert pair["output_max_abs"] <= FORWARD_TOL


def test_parity_refuses_seeds_and_bad_steps(tiny):
    base = [sys.executable, "-m", "harness", "parity", str(tiny["spec"])]
    r = subprocess.run([*base, "--seeds", "0"], cwd=ROOT, capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip()) == (
        2, "error: parity: --seeds does not apply; it uses the spec's first seed")
    r = subprocess.run([*base, "--steps", "0"], cwd=ROOT, capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip()) == (2, "error: --steps: must be at least 1; got 0")


@pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
@pytest.mark.parametrize("key", ["cnn", "densenet169"])
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_the_keras_float64_reference(name, key):
    """The training half of the parity check against committed Keras (TensorFlow) float64
    gradients (tests/tools/make_gradient_reference.py), same drawn weights: this backend's
    float64 gradients agree to GRAD64_TOL and its float32 training step's to GRAD_TOL (torch's
    channels_last BatchNorm statistics once put the CNN's at 2e-3; see BatchNorm2dNCHW).
    Keras on torch computes BatchNormalization in float32 (see the test below) unless the
    backend lifts Keras' float64 demotion while it computes them (keras_backend._float64_kept):
    with it, keras-torch meets the same float64 tolerance (measured 9e-15; 6.5e-7 without)."""
    from tools import make_gradient_reference as ref

    from backends.registry import create

    data = np.load(ROOT / "tests" / "data" / "gradient_reference.npz")
    backend = create(name, device="cpu", deterministic=True)
    handle, batch = ref.build(backend, key)
    assert np.array_equal(batch.images, data[f"{key}/images"])
    expected = {k.split("/grad64/")[1]: data[k] for k in data.files
                if k.startswith(f"{key}/grad64/")}
    assert len(expected) == {"cnn": 20, "densenet169": 2}[key]

    def rel(got: dict[str, np.ndarray], name: str) -> float:
        return float(np.linalg.norm(got[name] - expected[name]) / np.linalg.norm(expected[name]))

    g64 = backend.gradients(handle, batch, "float64")
    assert sorted(g64) == sorted(expected)
    worst64 = max(rel(g64, n) for n in expected)
    g32 = backend.train_step(handle, batch, gradients=True)().gradients
    worst32 = max((rel(g32, n), n) for n in expected)
    assert worst32[0] <= GRAD_TOL, worst32
    assert worst64 <= GRAD64_TOL, worst64


@pytest.mark.skipif(not {"keras", "keras-torch"} & set(BACKENDS),
                    reason="Keras' BatchNormalization (tox -e tf, keras-torch)")
def test_keras_batchnorm_on_float64_input_computes_in_float64_only_on_tensorflow():
    """Why keras-torch's float64 gradients miss the reference: Keras' type promotion maps
    float64 to float32 outside TensorFlow (as JAX without x64), and BatchNormalization.call
    casts its input to result_type(input, "float32") before the moments. Fails when Keras
    changes this: then keras_backend._float64_kept is no longer needed."""
    from backends.keras_backend import KERAS_BACKEND, keras

    x = np.random.default_rng(0).normal(1.0, 0.5, (4, 6, 6, 3))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    exact = (x - mean) / np.sqrt(var + 1e-3)
    layer = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float64")
    y = np.asarray(keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(x),
                                                    training=True)))
    err = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
    promoted = keras.backend.result_type("float64", "float32")
    assert y.dtype == np.float64
    if KERAS_BACKEND == "tensorflow":
        assert promoted == "float64" and err < 1e-14
    else:
        assert promoted == "float32" and 1e-9 < err < 1e-6


@pytest.mark.skipif("keras" not in BACKENDS, reason="TensorFlow's thread pools (tox -e tf)")
def test_deterministic_tensorflow_keeps_the_cores_thread_pools_and_records_them():
    """Deterministic CPU mode fixes both pools at the usable cores (not one thread: 20 of 20
    fresh-process reruns were bit-identical with 2), and environment() records the counts."""
    code = ("import json; from backends.registry import create; b = create('keras', 'cpu'); "
            "b.seed(0, True); from backends.keras_backend import CPU_THREADS; "
            "d = b.environment()['determinism']; print(json.dumps([CPU_THREADS, "
            "d['intra_op_threads'], d['inter_op_threads'], d['op_determinism'], 'note' in d]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    cores, intra, inter, op_determinism, note = json.loads(r.stdout.strip().splitlines()[-1])
    assert cores == len(os.sched_getaffinity(0))
    assert (intra, inter, op_determinism, note) == (cores, cores, True, False)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch's BatchNorm kernels (tox -e torch)")
def test_torch_batchnorm_statistics_on_channels_last_input_are_as_precise_as_nchw():
    """torch's own CPU kernel on channels_last float32 input: 1.5e-5 from float64 here (NCHW
    5e-8); the backend's BatchNorm2dNCHW computes the statistics on an NCHW copy."""
    import torch

    from backends.torch_backend import BatchNorm2dNCHW

    x64 = (torch.randn(4, 16, 64, 64, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0)) * 0.5).relu()
    exact = torch.nn.functional.batch_norm(x64, None, None, training=True, eps=1e-3)
    x = x64.float().contiguous(memory_format=torch.channels_last)

    def err(y: torch.Tensor) -> float:
        return ((y.double() - exact).norm() / exact.norm()).item()

    plain = torch.nn.BatchNorm2d(16, eps=1e-3).train()(x)
    ours = BatchNorm2dNCHW(16, eps=1e-3).train()(x)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert err(ours) < 1e-6 < 1e-5 < err(plain)
