"""Training throughput of the paper CNN through backends.loop.fit (keras) vs `model.fit`.

    pytest tests/benchmarks/test_bench_keras.py --benchmark-only -s
    .tox/tf/bin/python tests/benchmarks/test_bench_keras.py compare    # one measurement, JSON

Batch 32 at 224x224, IMAGES random images, the paper's recipe (Adam 1e-4, BCE). The machines are
shared, so load drifts within a minute: the two loops are measured in ONE process, alternating
epoch by epoch (`on_epoch` runs one `model.fit` epoch on the same model and data), ROUNDS times;
the first round (tracing) is dropped and each loop's best epoch counts.
- model.fit: the paper's way: float32 arrays already scaled to [0, 1], 3 channels, no
  augmentation, Keras' own loop;
- fit: loop.fit (keras): uint8 in; the paper's augmentation (rotation, zoom, flip),
  normalization and channel replication in the compiled step; the harness's data stream.
Determinism fixes TensorFlow's thread pools at start-up, so `fit` with deterministic=True is
measured in fresh processes of its own, alternating with plain `fit` processes (best of each).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 256
SIZE = 224
BATCH = 32
ROUNDS = 4


def measure(mode: str) -> dict[str, float]:
    """Best images/s of each loop in this fresh process; mode: compare | fit | deterministic."""
    sys.path.insert(0, str(ROOT))
    from backends.registry import create

    deterministic = mode == "deterministic"
    backend = create("keras", device="cpu", deterministic=deterministic)
    backend.seed(0, deterministic)
    import keras

    from backends.base import ModelInput, TrainData
    from backends.loop import fit
    from harness.spec import load_spec

    spec = load_spec(ROOT / "specs" / "paper.yaml",
                     [f"models.cnn.train.batch_size={BATCH}", f"models.cnn.train.epochs={ROUNDS}"])
    model = spec.model("cnn")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (IMAGES, SIZE, SIZE), dtype=np.uint8)
    labels = (rng.random(IMAGES) < 0.5).astype(np.float32)
    handle = backend.build(model, ModelInput(SIZE, 3, "rescale"))

    plain: list[float] = []
    on_epoch = None
    if mode == "compare":
        net = handle.model
        net.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy",
                    jit_compile=False)
        x = np.repeat((images.astype(np.float32) / 255.0)[..., None], 3, axis=-1)

        def on_epoch(record: object) -> None:
            t0 = time.perf_counter()
            net.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0)
            plain.append(time.perf_counter() - t0)

    train = TrainData(images, np.arange(IMAGES), labels, spec.augmentation, seed=0)
    history = fit(backend, handle, model, train, None, on_epoch)
    ours = [h.train_seconds for h in history]
    out = {"fit": IMAGES / min(ours[1:]), "fit_epochs_s": ours,
           "intra_op_threads": backend.environment()["determinism"]["intra_op_threads"]}
    if plain:
        out.update({"model.fit": IMAGES / min(plain[1:]), "model.fit_epochs_s": plain})
    return out


def _run(mode: str) -> dict[str, float]:
    r = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_fit_throughput_versus_model_fit(benchmark):
    pytest.importorskip("tensorflow")
    results: dict[str, dict] = {}
    order = ("compare", "deterministic", "fit", "deterministic-2")

    def run_all() -> None:
        for key in order:
            results[key] = _run(key.split("-2")[0])

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    fit, plain = results["compare"]["fit"], results["compare"]["model.fit"]
    best_fit = max(fit, results["fit"]["fit"])
    det = max(results["deterministic"]["fit"], results["deterministic-2"]["fit"])
    ratio = fit / plain
    info = {
        "model.fit images/s": round(plain, 1),
        "loop.fit (keras) images/s": round(fit, 1),
        "ratio fit / model.fit": round(ratio, 3),
        "loop.fit (keras) deterministic images/s": round(det, 1),
        "deterministic slowdown": round(best_fit / det, 2),
        "epoch seconds": {
            f"{mode} {k}": [round(x, 2) for x in v]
            for mode, r in results.items()
            for k, v in r.items()
            if "epochs" in k
        },
    }
    benchmark.extra_info.update(info)
    for key, value in info.items():
        print(f"{key}: {value}")
    assert ratio >= 0.95, f"loop.fit (keras) reaches {ratio:.2f} of model.fit's throughput"


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure(sys.argv[1])))
