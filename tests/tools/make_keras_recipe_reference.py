"""Write tests/data/keras_recipe_reference.npz: Keras' own recipe behaviour, as the reference.

    HARNESS_TEST_FRAMEWORK=tf python tests/tools/make_keras_recipe_reference.py

- lr/<name>: the learning rates Keras' schedules give at epochs 0..11 (LearningRateScheduler
  calls them with the 0-based epoch): step (ExponentialDecay staircase), exponential, cosine;
- plateau/lr: the rate after each epoch of ReduceLROnPlateau on the scripted `CURVE`;
- early/stopped, early/best: EarlyStopping's stop epoch and best epoch (0-based; -1 none);
- opt/<name>/<var>: variables after two steps of each optimizer from fixed weights and
  gradients, the rate divided by 10 between the steps (it exposes where a velocity holds lr).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "keras_recipe_reference.npz"
CURVE = [1.0, 0.8, 0.79995, 0.81, 0.82, 0.7, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]
LR = 0.01
SCHEDULES = {
    "step": keras.optimizers.schedules.ExponentialDecay(LR, 3, 0.5, staircase=True),
    "exponential": keras.optimizers.schedules.ExponentialDecay(LR, 2, 0.9),
    "cosine": keras.optimizers.schedules.CosineDecay(LR, 8, alpha=0.1),
}
OPTIMIZERS = {
    "adamw": lambda: keras.optimizers.AdamW(learning_rate=LR),
    "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate=LR),
    "rmsprop_centered_momentum": lambda: keras.optimizers.RMSprop(
        learning_rate=LR, momentum=0.5, centered=True, weight_decay=0.1
    ),
    "sgd_wd_momentum": lambda: keras.optimizers.SGD(
        learning_rate=LR, momentum=0.9, weight_decay=0.1
    ),
    "sgd_nesterov": lambda: keras.optimizers.SGD(learning_rate=LR, momentum=0.9, nesterov=True),
}


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def main() -> None:
    out: dict[str, np.ndarray] = {"curve": np.asarray(CURVE)}
    for name, schedule in SCHEDULES.items():
        out[f"lr/{name}"] = np.array([float(schedule(e)) for e in range(12)])

    model = _model()
    plateau = keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2, cooldown=1,
                                                min_lr=0.002)
    plateau.set_model(model)
    plateau.on_train_begin()
    lrs = []
    for e, v in enumerate(CURVE):
        plateau.on_epoch_end(e, {"val_loss": v})
        lrs.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    out["plateau/lr"] = np.array(lrs)

    model = _model()
    early = keras.callbacks.EarlyStopping(patience=3, min_delta=0.001, restore_best_weights=True)
    early.set_model(model)
    early.on_train_begin()
    stopped = -1
    for e, v in enumerate(CURVE):
        early.on_epoch_end(e, {"val_loss": v})
        if model.stop_training:
            stopped = e
            break
    out["early/stopped"] = np.array(stopped)
    out["early/best"] = np.array(early.best_epoch)

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    g1 = rng.normal(size=(3, 4)).astype(np.float32)
    g2 = rng.normal(size=(3, 4)).astype(np.float32)
    out.update({"opt/w0": w0, "opt/g1": g1, "opt/g2": g2})
    for name, make in OPTIMIZERS.items():
        var = keras.Variable(w0)
        opt = make()
        opt.build([var])
        opt.apply([keras.ops.convert_to_tensor(g1)], [var])
        opt.learning_rate = LR / 10
        opt.apply([keras.ops.convert_to_tensor(g2)], [var])
        out[f"opt/{name}"] = np.asarray(keras.ops.convert_to_numpy(var))
    np.savez(OUT, **out)
    print(f"wrote {OUT}: {sorted(out)}")


if __name__ == "__main__":
    main()
