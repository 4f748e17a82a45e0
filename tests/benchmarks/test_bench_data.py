"""Data-layer benchmarks (pytest-benchmark; skipped by default, run with --benchmark-only).

    pytest tests/benchmarks/test_bench_data.py --benchmark-only -s

- cache build: MURA-like PNGs (320..512 px, longest side <= 512) -> 224 x 224, 1 and 2 workers
- cache open: 10,400 x 224 x 224 (random bytes written directly), must stay well under 1 s
- demo data generation: 300 patients, 160..256 px (seconds, size on disk)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.data.cache import COMPLETE_MARKER, build_cache, cache_key
from harness.data.mura import load_mura_table
from harness.data.synthetic import make_mura_tree

BENCH_PATIENTS = int(os.environ.get("HARNESS_BENCH_PATIENTS", "60"))


@pytest.fixture(scope="module")
def mura_like(tmp_path_factory):
    root = make_mura_tree(tmp_path_factory.mktemp("bench"), patients=BENCH_PATIENTS, seed=0,
                          min_size=320, max_size=512)
    return root, load_mura_table(root, ["WRIST"])


@pytest.mark.parametrize("workers", [1, 2])
def test_bench_cache_build(benchmark, mura_like, tmp_path, workers):
    root, table = mura_like
    runs = iter(range(100))

    def fresh_dir():
        return (table, root, 224, "bilinear", tmp_path / f"run{next(runs)}"), {
            "workers": workers, "progress": False}

    cache = benchmark.pedantic(build_cache, setup=fresh_dir, rounds=3, iterations=1)
    assert len(cache) == len(table)
    rate = len(table) / benchmark.stats.stats.median
    benchmark.extra_info.update(images=len(table), images_per_s=round(rate, 1),
                                load_avg=os.getloadavg()[0])
    print(f"\ncache build, workers={workers}: {len(table)} images, {rate:.0f} images/s")


def test_bench_cache_open(benchmark, tmp_path):
    n, size = 10_400, 224
    base = tmp_path / "files"
    base.mkdir()
    paths = [f"img{i:05d}.png" for i in range(n)]
    for p in paths:
        (base / p).touch()  # never decoded: the cache is already there
    table = pd.DataFrame({"path": paths, "label": np.arange(n) % 2})
    key = cache_key(table, base, size, "bilinear")
    folder = tmp_path / "cache" / "images" / key[:16]
    folder.mkdir(parents=True)
    arr = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                    shape=(n, size, size))
    rng = np.random.default_rng(0)
    for i in range(0, n, 1000):
        arr[i : i + 1000] = rng.integers(0, 256, size=(min(1000, n - i), size, size),
                                         dtype=np.uint8)
    arr.flush()
    del arr
    index = {"format": 1, "key": key, "image_size": size, "resize": "bilinear",
             "paths": sorted(paths), "labels": [int(p[3:8]) % 2 for p in sorted(paths)],
             "sizes": [[512, 512]] * n, "skipped": []}
    (folder / "index.json").write_text(json.dumps(index))
    (folder / COMPLETE_MARKER).write_text(key)

    def open_it():
        return build_cache(table, base, size, "bilinear", tmp_path / "cache", progress=False)

    cache = benchmark(open_it)
    assert isinstance(cache.images, np.memmap) and cache.images.shape == (n, size, size)
    assert benchmark.stats.stats.max < 1.0
    print(f"\ncache open: {n} x {size} x {size}, median {benchmark.stats.stats.median:.3f} s")


def test_bench_demo_generation(benchmark, tmp_path):
    runs = iter(range(100))

    def generate():
        out = tmp_path / f"demo{next(runs)}"
        make_mura_tree(out, patients=300, seed=0, min_size=160, max_size=256)
        return out

    out = benchmark.pedantic(generate, rounds=1, iterations=1)
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    images = sum(1 for p in files if p.suffix == ".png")
    benchmark.extra_info.update(images=images, megabytes=round(size_mb, 1),
                                seconds=round(benchmark.stats.stats.median, 1))
    print(f"\ndemo data: {images} images, {size_mb:.1f} MB, "
          f"{benchmark.stats.stats.median:.1f} s")
    assert images > 1000
