"""Resume inside a run: the loop's end-of-epoch state, restored into a fresh build, continues
bit for bit (every installed framework backend; dropout and augmentation on)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, available_backends

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
