"""`run --track mlflow`: what lands in MLflow, read back with the real MLflow client.

    .venv/bin/python -m pytest tests/test_tracking.py -q

Runs the random baseline (reference backend) and the numpy test backend (tests/faulty_backend.py,
which trains through the shared loop, so it has epochs) on a tiny generated dataset: no
framework, so these run in every tox env. Skipped where the [mlflow] extra is not installed,
except the test of the install hint, which needs it absent and fakes that.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_runner import TINY

from harness.cli import main
from harness.errors import EXIT_USER_ERROR
from harness.results import read_run
from harness.tracking import flatten


@pytest.fixture
def tiny(tmp_path: Path) -> dict:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY.format(demo=ROOT / "specs" / "demo.yaml"))
    plugins = tmp_path / "plugins"
    dist = plugins / "repro_faulty_backend-0.1.dist-info"
    dist.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("faulty_backend.py"), plugins / "faulty_backend.py")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: repro-faulty-backend\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[repro_harness.backends]\nfaulty = faulty_backend:FaultyBackend\n")
    return {"spec": spec, "out": tmp_path / "results", "cache": tmp_path / "cache",
            "plugins": plugins}


def harness(tiny: dict, *args: str, model: str = "baseline", backend: str = "reference",
            faults: str = "", uri: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "harness", "run", str(tiny["spec"]), "--models", model,
           "--set", f"models.{model}.backends=[{backend}]", "--out", str(tiny["out"]),
           "--cache-dir", str(tiny["cache"]), "-q", *args]
    env = {**os.environ, "PYTHONPATH": str(tiny["plugins"]), "FAULTY_BACKEND": faults}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def client(uri: str):
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    return mlflow_tracking.MlflowClient(tracking_uri=uri)


def store(tiny: dict) -> str:
    return f"sqlite:///{(tiny['out'] / 'mlflow.db').resolve()}"


def runs_of(c, experiment: str = "tiny") -> tuple[object, list]:
    """(the parent run, its child runs sorted by name) of the experiment's only spec."""
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("harness.kind") == "spec"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id]
    assert len(children) == len(runs) - 1  # nothing outside the parent
    return parents[0], sorted(children, key=lambda r: r.info.run_name)


def metrics_csv(tiny: dict) -> dict[tuple[str, str, str], dict[str, str]]:
    """metrics.csv rows by (run id, level, metric), with the spec's resampling unit (patient)."""
    with open(tiny["out"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(r["run_id"], r["level"], r["metric"]): r for r in rows
            if r.get("run_id") and r["unit"] == "patient"}


def test_flatten_names_every_leaf() -> None:
    recipe = {"train": {"optimizer": {"name": "adam", "learning_rate": 1e-4},
                        "class_weight": None, "stages": [{"epochs": 2}, {"epochs": 3}]},
              "backends": ("keras", "torch")}
    assert flatten(recipe) == {
        "train.optimizer.name": "adam",
        "train.optimizer.learning_rate": "0.0001",
        "train.class_weight": "null",
        "train.stages.0.epochs": "2",
        "train.stages.1.epochs": "3",
        "backends": "['keras', 'torch']",
    }


def test_runs_nested_under_the_spec_with_params_metrics_and_artifacts(tiny) -> None:
    c = client("sqlite://")  # skips without mlflow
    r = harness(tiny, "--track", "mlflow")
    assert r.returncode == 0, r.stderr
    uri = store(tiny)
    assert f"tracked: {uri} (mlflow ui --backend-store-uri {uri})" in r.stdout
    c = client(uri)
    parent, children = runs_of(c)
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert parent.data.tags["harness.results_dir"] == str(tiny["out"].resolve())
    assert sorted(a.path for a in c.list_artifacts(parent.info.run_id)) == [
        "metrics.csv", "report.md"]
    report = c.download_artifacts(parent.info.run_id, "report.md", str(tiny["out"].parent))
    assert Path(report).read_text() == (tiny["out"] / "report.md").read_text()
    assert [ch.info.run_name for ch in children] == [
        "baseline__reference__seed0", "baseline__reference__seed1"]
    rows = metrics_csv(tiny)
    for seed, ch in enumerate(children):
        result = read_run(tiny["out"] / "runs" / f"baseline__reference__seed{seed}.json")
        assert ch.info.status == "FINISHED"
        p = ch.data.params
        assert (p["model"], p["backend"], p["seed"]) == ("baseline", "reference", str(seed))
        assert p["run_hash"] == result.run_hash == ch.data.tags["harness.run_hash"]
        assert p["git_commit"] == result.provenance["git"]["commit"]
        assert (p["kind"], p["low"], p["high"]) == ("random", "0.0", "1.0")
        assert ch.data.tags["harness.attempt"] == result.attempt
        # the report's own numbers: point and interval of every metric at both levels
        m = ch.data.metrics
        for level in ("image", "study"):
            for metric in ("accuracy", "recall", "auroc", "kappa"):
                row = rows[(result.run_id, level, metric)]
                assert m[f"test/{level}/{metric}"] == pytest.approx(float(row["value"]), abs=1e-9)
                assert m[f"test/{level}/{metric}_low"] == pytest.approx(float(row["low"]),
                                                                        abs=1e-9)
                assert m[f"test/{level}/{metric}_high"] == pytest.approx(float(row["high"]),
                                                                         abs=1e-9)
        art = c.download_artifacts(ch.info.run_id, f"run/{result.run_id}.json",
                                   str(tiny["out"].parent))
        assert json.loads(Path(art).read_text())["run_hash"] == result.run_hash

    # a rerun skips both runs and logs nothing twice: the same two MLflow runs
    again = harness(tiny, "--track", "mlflow")
    assert again.returncode == 0, again.stderr
    parent2, children2 = runs_of(c)
    assert parent2.info.run_id == parent.info.run_id
    assert [ch.info.run_id for ch in children2] == [ch.info.run_id for ch in children]
    # --fresh: a new attempt replaces each run's MLflow run (still one per run hash)
    fresh = harness(tiny, "--track", "mlflow", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    _, children3 = runs_of(c)
    assert len(children3) == 2
    assert not {ch.info.run_id for ch in children3} & {ch.info.run_id for ch in children}
    for seed, ch in enumerate(children3):
        result = read_run(tiny["out"] / "runs" / f"baseline__reference__seed{seed}.json")
        assert ch.data.tags["harness.attempt"] == result.attempt


def test_epochs_are_logged_per_step_and_a_failed_run_is_replaced_by_its_retry(tiny) -> None:
    uri = f"sqlite:///{(tiny['out'].parent / 'elsewhere.db').resolve()}"
    c = client(uri)
    r = harness(tiny, "--track", "mlflow", "--set", "models.cnn.train.epochs=3", model="cnn",
                backend="faulty", faults="0:raise", uri=uri)
    assert r.returncode == 1, r.stderr
    assert not (tiny["out"] / "mlflow.db").exists()  # MLFLOW_TRACKING_URI wins
    # a local store keeps the artifacts in the results folder, never in the working folder
    assert (tiny["out"] / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()
    parent, children = runs_of(c)
    assert parent.info.status == "FAILED"
    failed, ok = children
    assert failed.info.status == "FAILED"
    assert failed.data.tags["harness.error"] == "RuntimeError: faulty backend: predict raised"
    result = read_run(tiny["out"] / "runs" / "cnn__faulty__seed1.json")
    assert ok.info.status == "FINISHED"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"):
        history = c.get_metric_history(ok.info.run_id, name)
        assert [(h.step, h.value) for h in sorted(history, key=lambda h: h.step)] == [
            (e.epoch, getattr(e, name)) for e in result.history]
    assert [e.epoch for e in result.history] == [1, 2, 3]
    assert ok.data.params["train.epochs"] == "3"
    assert ok.data.params["train.optimizer.name"] == "adam"
    assert ok.data.params["layers.0.type"] == "conv2d"
    # the retry of the failed run replaces its MLflow run; the finished one stays as it was
    retry = harness(tiny, "--track", "mlflow", "--set", "models.cnn.train.epochs=3",
                    model="cnn", backend="faulty", uri=uri)
    assert retry.returncode == 0, retry.stderr
    parent2, (seed0, seed1) = runs_of(c)
    assert parent2.info.status == "FINISHED"
    assert seed1.info.run_id == ok.info.run_id
    assert seed0.info.run_id != failed.info.run_id and seed0.info.status == "FINISHED"
    assert [h.step for h in c.get_metric_history(seed0.info.run_id, "loss")] == [1, 2, 3]


def test_runs_finished_without_tracking_are_logged_from_their_files(tiny) -> None:
    c = client("sqlite://")
    assert harness(tiny).returncode == 0
    assert not (tiny["out"] / "mlflow.db").exists()
    r = harness(tiny, "--track", "mlflow")
    assert r.returncode == 0, r.stderr
    assert "2 run(s) already done" not in r.stdout  # -q
    _, children = runs_of(client(store(tiny)))
    assert [ch.info.status for ch in children] == ["FINISHED", "FINISHED"]
    result = read_run(tiny["out"] / "runs" / "baseline__reference__seed0.json")
    assert children[0].data.tags["harness.attempt"] == result.attempt
    assert "test/image/accuracy" in children[0].data.metrics
    del c


def test_without_mlflow_the_option_is_refused_with_the_install_hint(
    tiny, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    code = main(["run", str(tiny["spec"]), "--models", "baseline", "--out", str(tiny["out"]),
                 "--cache-dir", str(tiny["cache"]), "--track", "mlflow"])
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --track mlflow: the mlflow package is not installed in this environment",
        "  hint: pip install -e '.[mlflow]' (from the harness folder), or pip install "
        "'mlflow>=3'",
    ]
    assert not (tiny["out"] / "runs").exists()  # refused before any data or run


def test_an_unusable_tracking_store_is_refused_before_any_run(tiny) -> None:
    client("sqlite://")
    r = harness(tiny, "--track", "mlflow", uri="nosuchscheme://x")
    assert r.returncode == EXIT_USER_ERROR
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith("error: --track mlflow: cannot use the tracking store "
                           "nosuchscheme://x (MLFLOW_TRACKING_URI): ")
    assert not list((tiny["out"] / "runs").glob("*.json"))
