"""runtime.init: shared: every backend of a model starts seed s from the first backend's seeded
initial weights (neutral layout), so the paired comparison is paired by seed for real.

Each tox env has one framework, so the second backend here is the same framework registered a
second time under another name (an entry point, as a user's backend would be): the follower
must start from the leader's weights, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, available_backends

from harness.plan import RunKey, init_source, run_hash
from harness.results import read_run
from harness.spec import load_spec

BACKENDS = [b for b in available_backends() if b in ("keras", "torch")]
TARGETS = {
    "keras": "backends.keras_backend:KerasBackend",
    "torch": "backends.torch_backend:TorchBackend",
}
TINY = """\
extends: {demo}
name: tiny-shared
data:
  image_size: 32
  synthetic: {{patients: 16, seed: 3, min_size: 32, max_size: 48}}
models:
  - name: cnn
    backends: [{leader}, {follower}]
    train: {{epochs: 1}}
seeds: [0]
runtime: {{init: {init}}}
overrides:
  - models.cnn.layers[17].units=8
"""


def test_init_source_and_run_hash():
    spec = load_spec(ROOT / "specs" / "demo.yaml", ["runtime.init=shared"])
    key = RunKey("cnn", "torch", 0)
    assert init_source(spec, key) == "keras"  # the model's first backend
    assert init_source(spec, RunKey("baseline", "reference", 0)) is None  # nothing to share
    per_backend = load_spec(ROOT / "specs" / "demo.yaml")
    assert init_source(per_backend, key) is None
    assert run_hash(spec, key, "d", "c") != run_hash(per_backend, key, "d", "c")


def _setup(tmp_path, leader, init):
    follower = f"{leader}2"
    plugins = tmp_path / "plugins"
    dist = plugins / "repro_alias-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: repro-alias\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[repro_harness.backends]\n{follower} = {TARGETS[leader]}\n")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(demo=ROOT / "specs" / "demo.yaml", leader=leader,
                                follower=follower, init=init))
    return spec, plugins, follower


def _run(spec, plugins, out, cache, *args):
    env = {**os.environ, "PYTHONPATH": str(plugins)}
    cmd = [sys.executable, "-m", "harness", "run", str(spec), "--models", "cnn", "--out",
           str(out), "--cache-dir", str(cache), "-q", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
@pytest.mark.parametrize("leader", BACKENDS)
def test_followers_start_from_the_leaders_weights(tmp_path, leader):
    spec, plugins, follower = _setup(tmp_path, leader, "shared")
    out, cache = tmp_path / "results", tmp_path / "cache"
    # the follower alone: the leader's initial weights are not there yet
    r = _run(spec, plugins, out, cache, "--backends", follower)
    assert r.returncode == 1
    failed = read_run(out / "runs" / f"cnn__{follower}__seed0.json")
    assert failed.error.reason == (
        f"runtime.init: shared: cnn__{follower}__seed0 starts from the initial weights of "
        f"cnn__{leader}__seed0, which are not in {out / 'init' / 'cnn__seed0.npz'}")
    r = _run(spec, plugins, out, cache)
    assert r.returncode == 0, r.stderr
    a = read_run(out / "runs" / f"cnn__{leader}__seed0.json")
    b = read_run(out / "runs" / f"cnn__{follower}__seed0.json")
    assert a.provenance["extra"]["init"].startswith(f"shared from {leader} (sha256 ")
    # the same weights, by their hash
    assert a.provenance["extra"]["init"] == b.provenance["extra"]["init"]
    assert a.test.probs == b.test.probs  # same framework, same start: the same run, bit for bit


@pytest.mark.slow
@pytest.mark.skipif(not BACKENDS, reason="no framework installed in this env")
def test_per_backend_records_that_each_draws_its_own(tmp_path):
    spec, plugins, _ = _setup(tmp_path, BACKENDS[0], "per_backend")
    r = _run(spec, plugins, tmp_path / "results", tmp_path / "cache", "--backends", BACKENDS[0])
    assert r.returncode == 0, r.stderr
    run = read_run(tmp_path / "results" / "runs" / f"cnn__{BACKENDS[0]}__seed0.json")
    init = run.provenance["extra"]["init"]
    assert init == "per_backend (each framework draws its own initial weights)"
    assert not (tmp_path / "results" / "init").exists()
