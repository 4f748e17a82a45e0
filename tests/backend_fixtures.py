"""Helpers shared by the backend tests (conformance suite and per-framework files): small specs,
a one-pixel linear model whose logits are known by hand, BCE by hand, smooth test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from conftest import ROOT

from harness.spec import AugmentationSpec, SequentialModel, Spec, load_spec

PAPER = ROOT / "specs" / "paper.yaml"
NO_AUG = AugmentationSpec(enabled=False)


def paper(*sets: str) -> Spec:
    """specs/paper.yaml with --set overrides."""
    return load_spec(PAPER, list(sets))


def tiny_cnn_spec(*sets: str) -> Spec:
    """The paper's CNN at 32 px with a dense layer of 8 units, batch 8."""
    return paper("data.image_size=32", "models.cnn.layers[17].units=8",
                 "models.cnn.train.batch_size=8", *sets)


def spec_with(tmp_path: Path, body: str, size: int, channels: int = 3) -> Spec:
    """A spec extending paper.yaml with extra models (YAML text under `models:`)."""
    path = tmp_path / "extra.yaml"
    path.write_text(
        f"extends: {PAPER}\ndata: {{image_size: {size}, channels: {channels}}}\n"
        f"models:\n{body}"
    )
    return load_spec(path)


def sequential(layers: list[dict[str, Any]], optimizer: str = "adam", lr: float = 1e-3,
               batch_size: int = 4, **loss: Any) -> SequentialModel:
    return SequentialModel.model_validate({
        "name": "m", "kind": "sequential", "layers": layers,
        "train": {"optimizer": {"name": optimizer, "learning_rate": lr}, "epochs": 1,
                  "batch_size": batch_size, "shuffle": False, "loss": loss},
    })


# A 1x1-pixel model whose logit is 0.5 * pixel - 3 (set with UNIT_WEIGHTS): pixels 86, 0, 7
# give the logits 40, -3, 0.5 (LOGITS).
UNIT_IMAGES = np.array([86, 0, 7], np.uint8).reshape(3, 1, 1)
LOGITS = np.array([40.0, -3.0, 0.5])
LOGIT_LABELS = np.array([0.0, 1.0, 1.0])
UNIT_WEIGHTS = {"dense_1/kernel": np.array([[0.5]], np.float32),
                "dense_1/bias": np.array([-3.0], np.float32)}


def linear_unit(form: str = "auto", lr: float = 1e-12, smoothing: float = 0.0,
                last: str = "dense") -> SequentialModel:
    """flatten -> dense(1, sigmoid), or flatten -> dense(1) -> activation(sigmoid); plain SGD."""
    layers = "[{type: flatten}, {type: dense, units: 1, activation: sigmoid}]"
    if last == "activation":
        layers = ("[{type: flatten}, {type: dense, units: 1}, "
                  "{type: activation, activation: sigmoid}]")
    return sequential(yaml.safe_load(layers), "sgd", lr, batch_size=3, form=form,
                      label_smoothing=smoothing)


def stable_bce(labels: Any, logits: Any, label_smoothing: float = 0.0) -> np.ndarray:
    """max(x, 0) - x y + log(1 + exp(-|x|)) per sample, float64: the logits form, by hand."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def clipped_bce(labels: Any, probs: Any, epsilon: float = 1e-7,
                label_smoothing: float = 0.0) -> np.ndarray:
    """The probabilities form, by hand, with float32's clip bounds (as in Keras)."""
    lo, hi = float(np.float32(epsilon)), float(np.float32(1 - epsilon))
    p = np.clip(np.asarray(probs, np.float64), lo, hi)
    y = np.asarray(labels, np.float64) * (1 - label_smoothing) + 0.5 * label_smoothing
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Low-frequency images (sums of broad blobs): bilinear resampling is well conditioned."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((n, h, w))
    for i in range(n):
        for _ in range(4):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sd = rng.uniform(0.2, 0.4) * min(h, w)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            out[i] += rng.uniform(40, 120) * np.exp(-r2 / (2 * sd**2))
    return np.clip(out, 0, 255).astype(np.uint8)


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size)).astype(np.uint8)
