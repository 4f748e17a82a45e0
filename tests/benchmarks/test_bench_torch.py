"""Training throughput of backends.loop.fit (torch) against hand-written PyTorch loops.

    tox -e bench-torch
    pytest tests/benchmarks/test_bench_torch.py --benchmark-only -s     # -s prints the figures

Same process, same data, rounds interleaved (the hand loops run in pedantic's untimed `setup`
before every timed backend round), so machine load drifts hit all three alike. Both loops do the
same work per batch: uint8 -> float, rotate/zoom/flip with grid_sample, x/255, grey -> RGB,
forward, clipped BCE, backward, Adam. "best" is the fastest hand setting found on the 2-core CPU
(channels_last); "default" is the same loop in torch's default NCHW layout, for context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import torch.nn.functional as F  # noqa: E402
from conftest import ROOT  # noqa: E402
from torch import nn  # noqa: E402

from backends.base import ModelInput, TrainData  # noqa: E402
from backends.loop import fit  # noqa: E402
from backends.torch_backend import TorchBackend  # noqa: E402
from harness.spec import load_spec  # noqa: E402

SIZE, BATCH, ROUNDS = 224, 32, 3
IMAGES = {"cnn": 256, "densenet": 160}  # per timed round (8 and 5 batches)
TARGET_RATIO = 0.95


def hand_cnn() -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for f in (16, 32, 64, 128):
        layers += [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(f, 1e-3, 0.01),
                   nn.MaxPool2d(2), nn.Dropout(0.25)]
        c = f
    layers += [nn.Flatten(), nn.Linear(128 * 14 * 14, 128), nn.ReLU(), nn.Linear(128, 1),
               nn.Sigmoid()]
    return nn.Sequential(*layers)


class HandDenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(torchvision.models.densenet169(weights=None).features, nn.ReLU())
        self.base.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(1664, 1), nn.Sigmoid())

    def train(self, mode: bool = True) -> HandDenseNet:
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.base(x)
        return self.head(x.mean((2, 3)))


def hand_epoch(net: nn.Module, opt: torch.optim.Optimizer, train: TrainData,
               channels_last: bool) -> int:
    """The loop one would write by hand for the same work (flips folded into theta)."""
    plan = train.plan(1)
    net.train()
    n = 0
    for start in range(0, len(train), BATCH):
        pos = plan.order[start : start + BATCH]
        x = torch.from_numpy(train.images[train.index[pos]]).unsqueeze(1).float()
        a = np.deg2rad(plan.angle[pos].astype(np.float64))
        s = plan.scale[pos].astype(np.float64)
        fx = np.where(plan.hflip[pos], -1.0, 1.0)
        fy = np.where(plan.vflip[pos], -1.0, 1.0)
        theta = np.zeros((len(pos), 2, 3), np.float32)
        theta[:, 0, 0], theta[:, 0, 1] = fx * np.cos(a) / s, -fx * np.sin(a) / s
        theta[:, 1, 0], theta[:, 1, 1] = fy * np.sin(a) / s, fy * np.cos(a) / s
        grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, align_corners=True)
        x = (x / 255.0).expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
        y = torch.from_numpy(train.labels[pos])
        p = net(x).reshape(-1).clamp(1e-7, 1 - 1e-7)
        loss = F.binary_cross_entropy(p, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(pos)
    return n


def make_hand(kind: str, channels_last: bool, lr: float) -> Callable[[TrainData], int]:
    torch.manual_seed(0)
    net = hand_cnn() if kind == "cnn" else HandDenseNet()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr, eps=1e-7)
    return lambda train: hand_epoch(net, opt, train, channels_last)


def data(n: int, spec) -> TrainData:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = (96 + 64 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.float32)
    images = np.clip(base[None] + rng.normal(0, 20, (n, SIZE, SIZE)), 0, 255).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.float32)
    return TrainData(images, np.arange(n), labels, spec.augmentation, seed=0)


def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


@pytest.mark.parametrize("model_name", ["cnn", "densenet"])
def test_training_throughput_vs_hand_loop(benchmark, model_name):
    spec = load_spec(ROOT / "specs" / "paper.yaml", ["models.densenet.base.weights=none"])
    model = spec.model(model_name)
    model = model.model_copy(update={"train": model.train.model_copy(update={"epochs": 1})})
    lr = model.train.optimizer.learning_rate
    norm = "imagenet" if model_name == "densenet" else "rescale"
    train = data(IMAGES[model_name], spec)
    warm = data(BATCH, spec)

    backend = TorchBackend(device="cpu")
    backend.seed(0, deterministic=True)
    handle = backend.build(model, ModelInput(SIZE, 3, norm))
    hands = {"best": make_hand(model_name, True, lr), "default": make_hand(model_name, False, lr)}
    fit(backend, handle, model, warm, None)
    for run in hands.values():
        run(warm)

    rates: dict[str, list[float]] = {"best": [], "default": []}

    def setup() -> None:
        for key, run in hands.items():
            rates[key].append(timed(lambda run=run: run(train)))

    benchmark.pedantic(lambda: fit(backend, handle, model, train, None), setup=setup,
                       rounds=ROUNDS, iterations=1, warmup_rounds=0)
    n = len(train)
    ours = {"best": n / benchmark.stats.stats.min, "median": n / benchmark.stats.stats.median}
    figures = {
        "images_per_round": n,
        "threads": torch.get_num_threads(),
        "channels_last": handle.channels_last,
        "backend_images_per_s": round(ours["best"], 2),
        "backend_images_per_s_median": round(ours["median"], 2),
        "hand_best_images_per_s": round(max(rates["best"]), 2),
        "hand_best_images_per_s_median": round(float(np.median(rates["best"])), 2),
        "hand_default_images_per_s": round(max(rates["default"]), 2),
        "ratio_vs_best": round(ours["best"] / max(rates["best"]), 3),
        "ratio_vs_best_median": round(ours["median"] / float(np.median(rates["best"])), 3),
        "channels_last_speedup": round(max(rates["best"]) / max(rates["default"]), 3),
    }
    benchmark.extra_info.update(figures)
    print(f"\n{model_name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert math.isfinite(figures["ratio_vs_best"])
    assert max(figures["ratio_vs_best"], figures["ratio_vs_best_median"]) >= TARGET_RATIO, figures
