"""One conformance suite for every framework backend (scikit-learn's estimator checks, for us).

Runs in each tox env for the framework installed there: `tox -e tf` checks keras, `tox -e torch`
checks torch. Builds small models from spec objects and asserts real values.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, available_backends

from harness.shapes import infer_model
from harness.spec import load_spec

BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")


def tiny_spec(tmp_path, extra_sets=()):
    """The paper spec shrunk to 32 px, with a small CNN (same layer vocabulary)."""
    sets = [
        "data.image_size=32",
        "models.cnn.layers[17].units=16",
        *extra_sets,
    ]
    return load_spec(ROOT / "specs" / "paper.yaml", sets)


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


def make_backend(name):
    from backends.registry import create

    return create(name, device="cpu", deterministic=True)


def separable(n, size, seed):
    """Bright blob top-left (label 0) or bottom-right (label 1) on noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(labels)
    imgs = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    q = size // 4
    for i, y in enumerate(labels):
        r0 = q // 2 if y == 0 else size - q - q // 2
        imgs[i, r0 : r0 + q, r0 : r0 + q] = 220
    return imgs, labels


def test_cnn_counts_equal_inference_and_paper(backend_name):
    from backends.base import ModelInput

    spec = load_spec(ROOT / "specs" / "paper.yaml")
    model = spec.model("cnn")
    b = make_backend(backend_name)
    b.seed(0, True)
    handle = b.build(model, ModelInput(224, 3, "rescale"))
    c = b.count_params(handle)
    inf = infer_model(spec, model).counts
    assert (c.total, c.trainable, c.non_trainable) == (inf.total, inf.trainable, inf.non_trainable)
    assert (c.total, c.trainable, c.non_trainable) == (3_309_921, 3_309_441, 480)


def test_predict_range_length_and_history_schema(backend_name, tmp_path):
    from backends.base import EvalData, ModelInput, TrainData

    spec = tiny_spec(tmp_path, ["models.cnn.train.epochs=2", "models.cnn.train.batch_size=8"])
    model = spec.model("cnn")
    imgs, labels = separable(40, 32, 0)
    b = make_backend(backend_name)
    b.seed(0, True)
    handle = b.build(model, ModelInput(32, 3, "rescale"))
    seen = []
    train = TrainData(imgs, np.arange(30), labels[:30], spec.augmentation, seed=0)
    hist = b.fit(handle, train, EvalData(imgs[30:], labels[30:]), model.train, seen.append)
    assert [h.epoch for h in hist] == [1, 2] and [h.epoch for h in seen] == [1, 2]
    assert all(h.images == 30 for h in hist)
    assert all(
        np.isfinite(h.loss) and h.val_loss is not None and np.isfinite(h.val_loss) for h in hist
    )
    assert hist[0].first_step_seconds is not None and hist[0].first_step_seconds > 0
    p = b.predict(handle, imgs[30:])
    assert p.shape == (10,) and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))


def test_learns_a_separable_set(backend_name, tmp_path):
    from backends.base import EvalData, ModelInput, TrainData

    spec = tiny_spec(
        tmp_path,
        [
            "models.cnn.train.epochs=6",
            "models.cnn.train.batch_size=16",
            "models.cnn.train.optimizer.learning_rate=0.003",
            "augmentation.enabled=false",
        ],
    )
    model = spec.model("cnn")
    imgs, labels = separable(200, 32, 1)
    b = make_backend(backend_name)
    b.seed(0, True)
    handle = b.build(model, ModelInput(32, 3, "rescale"))
    train = TrainData(imgs, np.arange(160), labels[:160], spec.augmentation, seed=0)
    b.fit(handle, train, EvalData(imgs[160:], labels[160:]), model.train)
    acc = float(np.mean((b.predict(handle, imgs[160:]) >= 0.5) == labels[160:].astype(bool)))
    assert acc >= 0.9, f"accuracy {acc:.3f} on a separable set"


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from backends.registry import create
    from backends.base import ModelInput, TrainData, EvalData
    from harness.spec import load_spec
    spec = load_spec({spec!r}, ["data.image_size=32", "models.cnn.layers[17].units=16",
                                "models.cnn.train.epochs=1", "models.cnn.train.batch_size=8"])
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 255, size=(48, 32, 32)).astype(np.uint8)
    labels = (np.arange(48) % 2).astype(np.float32)
    b = create({name!r}, device="cpu", deterministic=True)
    b.seed(7, True)
    h = b.build(spec.model("cnn"), ModelInput(32, 3, "rescale"))
    b.fit(h, TrainData(imgs, np.arange(40), labels[:40], spec.augmentation, seed=7),
          EvalData(imgs[40:], labels[40:]), spec.model("cnn").train)
    print("RESULT " + json.dumps(b.predict(h, imgs[40:]).tolist()))
    """
)


@pytest.mark.slow
def test_same_seed_is_bit_identical_across_processes(backend_name):
    code = DETERMINISM_SCRIPT.format(
        root=str(ROOT), spec=str(ROOT / "specs" / "paper.yaml"), name=backend_name
    )
    outs = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
            env={**__import__("os").environ, "PYTHONHASHSEED": "0"},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
        outs.append(json.loads(line[7:]))
    assert outs[0] == outs[1]  # exact float equality: bit-identical
