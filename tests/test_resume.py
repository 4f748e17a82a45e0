"""Resume inside a run: the loop's end-of-epoch state, restored into a fresh build, continues
bit for bit (every installed framework backend; dropout and augmentation on)."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import ROOT, available_backends
from test_runner import tiny  # noqa: F401  (the fixture)

from harness.spec import load_spec

BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")


def _setup():
    spec = load_spec(
        ROOT / "specs" / "paper.yaml",
        ["data.image_size=32", "models.cnn.layers[17].units=16", "models.cnn.train.epochs=3",
         "models.cnn.train.batch_size=8"],
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 32, 32), dtype=np.uint8)
    labels = (rng.random(60) > 0.5).astype(np.float32)
    return spec, images, labels


def _fresh(name, model):
    from backends.base import ModelInput
    from backends.registry import create

    backend = create(name, device="cpu", deterministic=True)
    backend.seed(3, True)
    return backend, backend.build(model, ModelInput(32, 3, "rescale"))


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("after", [1, 2])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(name, after):
    from backends.base import EvalData, TrainData
    from backends.loop import fit

    spec, images, labels = _setup()
    model = spec.model("cnn")
    assert model.layers[3].rate == 0.25 and spec.augmentation.enabled  # randomness in play
    train = TrainData(images, np.arange(40), labels[:40], spec.augmentation, seed=3)
    val = EvalData(images[40:], labels[40:])

    backend, handle = _fresh(name, model)
    states = []
    whole = fit(backend, handle, model, train, val, on_checkpoint=states.append)
    expected = backend.predict(handle, images[40:])
    assert [s.epoch for s in states] == [1, 2]  # none after the last epoch: the result follows
    assert states[after - 1].history == tuple(whole[:after])

    backend2, handle2 = _fresh(name, model)
    resumed = fit(backend2, handle2, model, train, val, resume=states[after - 1])
    np.testing.assert_array_equal(backend2.predict(handle2, images[40:]), expected)
    assert [h.epoch for h in resumed] == [1, 2, 3]
    assert [h.loss for h in resumed] == [h.loss for h in whole]
    assert [h.val_loss for h in resumed] == [h.val_loss for h in whole]


@pytest.mark.parametrize("name", BACKENDS)
def test_state_of_another_model_is_refused(name):
    spec, _, _ = _setup()
    backend, handle = _fresh(name, spec.model("cnn"))
    with pytest.raises(ValueError, match=f"^backend '{name}': "):
        backend.set_state(handle, {"something": np.zeros(3)})


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_kill_9_after_a_checkpoint_resumes_there_and_ends_bit_identical(tiny, name):  # noqa: F811
    """The harness is SIGKILLed (with its worker) at whatever moment follows the first
    checkpoint; the same command then resumes after the last saved epoch k (epochs k+1.. only)
    and ends with the uninterrupted run's exact predictions."""
    from test_runner import harness, run_file, wait_for

    from harness.results import read_run

    epochs = 8
    sets = ("--seeds", "0", "--set", f"models.cnn.train.epochs={epochs}",
            "--set", "models.cnn.layers[17].units=8", "-v")
    whole = harness(tiny, *sets, backend=name, model="cnn", timeout=900)
    assert whole.returncode == 0, whole.stderr
    expected = read_run(run_file(tiny, 0, name, "cnn"))

    tiny["out"] = tiny["out"].with_name("killed")
    checkpoint = tiny["out"] / "checkpoints" / f"cnn__{name}__seed0.npz"
    proc = harness(tiny, *sets, backend=name, model="cnn", wait=False)

    def saved_or_done() -> bool:
        return checkpoint.exists() or proc.poll() is not None

    wait_for(saved_or_done, timeout=600)
    proc.send_signal(signal.SIGKILL)  # kill -9 of the harness; its worker dies with it
    proc.wait()
    k = _epoch_of(checkpoint)
    if run_file(tiny, 0, name, "cnn").exists():  # it finished first: nothing to resume
        assert k is None and read_run(run_file(tiny, 0, name, "cnn")).test == expected.test
        pytest.skip("the run finished before the kill")
    assert k is not None and 1 <= k < epochs

    resumed = harness(tiny, *sets, backend=name, model="cnn", timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    progress = [line for line in resumed.stdout.splitlines()
                if line.startswith("    epoch ") and " batch (" not in line]  # not a 30 s line
    # finished epochs are not repeated (the epoch being trained at the kill is)
    assert [line.split(":")[0] for line in progress] == [
        f"    epoch {e}/{epochs}" for e in range(k + 1, epochs + 1)]
    got = read_run(run_file(tiny, 0, name, "cnn"))
    assert got.test.probs == expected.test.probs  # bit for bit
    assert [h.epoch for h in got.history] == list(range(1, epochs + 1))
    assert [h.loss for h in got.history] == [h.loss for h in expected.history]
    assert not checkpoint.exists()  # removed once the result is written


def _epoch_of(path) -> int | None:
    import json

    try:
        with np.load(path) as z:
            return int(json.loads(str(z["meta"]))["epoch"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.parametrize("every, expected", [(1, [1, 2, 3]), (2, [2]), (3, [3])])
def test_checkpoint_every_sets_which_epochs_are_saved(tmp_path, every, expected):
    """The loop hands over the state after every N-th epoch but the last (the result follows);
    results.py writes and reads it back, for this run hash only. Framework-free."""
    from test_loop import Scripted, data, spec_and_model

    from backends.loop import fit
    from harness.results import read_checkpoint, write_checkpoint

    class Stateful(Scripted):
        def get_state(self, handle):
            return {"w": np.arange(3.0)}

    spec, model = spec_and_model("models.cnn.train.epochs=4", "models.cnn.train.batch_size=5")
    states = []
    fit(Stateful([0.5] * 8), model, model, data(10, spec), None, on_checkpoint=states.append,
        checkpoint_every=every)
    assert [s.epoch for s in states] == expected
    write_checkpoint(tmp_path / "c.npz", "abc", states[-1])
    state = read_checkpoint(tmp_path / "c.npz", "abc")
    assert state.epoch == expected[-1] and [h.epoch for h in state.history] == list(
        range(1, expected[-1] + 1))
    np.testing.assert_array_equal(state.backend["w"], np.arange(3.0))
    assert read_checkpoint(tmp_path / "c.npz", "another run hash") is None
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 cut short")
    assert read_checkpoint(tmp_path / "c.npz", "abc") is None
