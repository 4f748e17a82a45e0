"""Analysis of fabricated results: current vs stale runs, seed means, verdicts, pairs, resources.

The helpers here (`make_bundle`, `fake_run`, ...) fabricate RunResults with known predictions;
tests/test_report.py reuses them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.analyze import Bundle, analyze, load_bundle
from harness.errors import UserError
from harness.metrics import compute_metrics
from harness.monitor import measured, not_measured
from harness.report import render_report
from harness.results import run_from_json
from harness.spec import Spec, load_spec
from harness.stats import (
    binomial_sd,
    bootstrap_metrics,
    bootstrap_seed_mean,
    bootstrap_seed_noise,
    clustered_mcnemar,
    mcnemar,
    paired_bootstrap_difference,
    prediction_interval,
    prediction_verdict,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parent.parent
N_TEST = 200
N_PATIENTS = 60
N_STUDIES = 90
NO_NVML = "NVML not available: NVMLError_LibraryNotFound"
OVERRIDES = ("seeds=[0, 1]", "evaluation.bootstrap.resamples=300")
CNN_PARAMS = {"total": 3309921, "trainable": 3309441, "non_trainable": 480}


def paper_spec(*extra: str) -> Spec:
    """specs/paper.yaml with 2 seeds and 300 resamples (fast)."""
    return load_spec(ROOT / "specs" / "paper.yaml", [*OVERRIDES, *extra])


def test_groups() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, patient ids, study ids) of 200 test images: 90 studies nested in 60 patients."""
    rng = np.random.default_rng(7)
    study_of_image = np.arange(N_TEST) % N_STUDIES
    patient_of_study = np.arange(N_STUDIES) % N_PATIENTS
    study_label = rng.integers(0, 2, N_STUDIES)
    labels = study_label[study_of_image]
    patient = np.array([f"patient{p:05d}" for p in patient_of_study[study_of_image]])
    study = np.array([f"{patient[i]}/study{study_of_image[i]}" for i in range(N_TEST)])
    return labels, patient, study


test_groups.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def probs_with_correct(labels: np.ndarray, n_correct: int, seed: int) -> np.ndarray:
    """Probabilities whose thresholded predictions are right on exactly n_correct images."""
    rng = np.random.default_rng(seed)
    right = np.zeros(labels.shape[0], bool)
    right[rng.permutation(labels.shape[0])[:n_correct]] = True
    predicted = np.where(right, labels, 1 - labels)
    confidence = rng.uniform(0.55, 0.95, labels.shape[0])
    return np.where(predicted == 1, confidence, 1 - confidence)


def resources(train_s: float | None, rss: float, gpu: bool = False) -> dict[str, Any]:
    """A monitor summary: CPU-only unless gpu, so every GPU entry is not measured."""
    if gpu:
        g = {"memory_used_peak": measured(5000.0, "MiB"), "utilization_mean": measured(70.0, "%"),
             "energy": measured(1200.0, "J", "NVML energy counter delta")}
        fm = {"torch_max_memory_allocated": measured(900.0, "MiB")}
    else:
        g = {k: not_measured(NO_NVML) for k in ("memory_used_peak", "utilization_mean", "energy")}
        fm = {"peak": not_measured("backend reported no framework memory statistics")}
    return {
        "schema": 1,
        "wall_s": (train_s or 0) + 5.0,
        "phases_s": {"data": 1.0, "build": 0.5, "predict": 2.0,
                     **({"train": train_s} if train_s is not None else {})},
        "throughput": {
            "train": measured(100.0 + rss / 100, "images/s") if train_s else not_measured(
                "not recorded"),
            "inference": measured(500.0, "images/s"),
        },
        "host": {"rss_peak": measured(rss, "MiB")},
        "gpu": g,
        "framework_memory": fm,
    }


def fake_run(
    model: str,
    backend: str,
    seed: int,
    probs: np.ndarray,
    *,
    run_hash: str | None = None,
    train_s: float | None = 10.0,
    rss: float = 1000.0,
    params: dict[str, int] | None = None,
    epochs: int = 2,
    finished: float = 1_700_000_000.0,
) -> dict[str, Any]:
    """A complete ok RunResult as the worker writes it."""
    labels, patient, study = test_groups()
    rid = f"{model}__{backend}__seed{seed}"
    history = [] if model == "baseline" else [
        {"epoch": e + 1, "loss": 0.5, "accuracy": 0.7, "recall": 0.6, "precision": 0.7,
         "val_loss": 0.6, "val_accuracy": 0.65, "val_recall": 0.6, "val_precision": 0.6,
         "seconds": 4.0 + e, "train_seconds": 3.5 + e, "images": 800,
         "first_step_seconds": 1.0 if e == 0 else None}
        for e in range(epochs)
    ]
    framework = {"reference": "numpy", "keras": "keras/tensorflow", "torch": "pytorch"}[backend]
    return {
        "schema": 1, "run_id": rid, "key": {"model": model, "backend": backend, "seed": seed},
        "run_hash": run_hash or f"hash-{rid}", "spec_name": "paper", "spec_hash": "s",
        "data_hash": "d", "code_version": "0.1.0+gabc", "status": "ok", "started": finished - 30,
        "finished": finished, "complete": True,
        "history": history,
        "params": params or ({"total": 0, "trainable": 0, "non_trainable": 0}
                             if model == "baseline" else CNN_PARAMS),
        "environment": {"name": backend, "framework": framework,
                        "versions": {"python": "3.11.9", "numpy": "2.4.6"}, "device": "cpu",
                        "determinism": {"seed": seed, "deterministic": True}},
        "resources": resources(None if model == "baseline" else train_s, rss),
        "provenance": {"git": {"commit": "0123456789abcdef", "dirty": False},
                       "cpu": {"model": "Test CPU", "logical_cores": 2},
                       "gpu": not_measured(NO_NVML), "python": {"version": "3.11.9"},
                       "platform": {"platform": "Linux-test"}},
        "test": {"rows": list(range(1000, 1000 + N_TEST)), "labels": labels.tolist(),
                 "probs": probs.tolist(), "patient": patient.tolist(), "study": study.tolist()},
    }


def failed_run(model: str, backend: str, seed: int) -> dict[str, Any]:
    rid = f"{model}__{backend}__seed{seed}"
    return {
        "schema": 1, "run_id": rid, "key": {"model": model, "backend": backend, "seed": seed},
        "run_hash": f"hash-{rid}", "spec_name": "paper", "spec_hash": "s", "data_hash": "d",
        "code_version": "0.1.0+gabc", "status": "failed", "complete": True, "finished": 1.7e9,
        "error": {"type": "RuntimeError", "message": "out of memory: CUDA out of memory",
                  "stderr_tail": "Traceback (most recent call last):\n  File x\nRuntimeError: OOM"},
    }


def data_json() -> dict[str, Any]:
    return {
        "data_hash": "d" * 64, "dataset": "mura-v1.1", "image_size": 224, "resize": "bilinear",
        "split": {"strategy": "image", "test_fraction": 0.2, "stratify": False, "seed": 42,
                  "validation_source": "official"},
        "parts": [
            {"part": "train", "images": 7801, "positives": 3197, "studies": 3400, "patients": 3250},
            {"part": "test", "images": 1951, "positives": 790, "studies": 1700, "patients": 1650},
            {"part": "val", "images": 659, "positives": 295, "studies": 237, "patients": 207},
        ],
        "leakage": {"test": {"study": 0.921, "patient": 0.934},
                    "val": {"study": 0.0, "patient": 0.0}},
        "skipped": [],
    }


def standard_runs() -> list[dict[str, Any]]:
    """baseline/reference x2, cnn/keras x2 (about 94% right), cnn/torch x2 (about 75.5%)."""
    labels, _, _ = test_groups()
    rng = np.random.default_rng(11)
    return [
        fake_run("baseline", "reference", 0, rng.random(N_TEST)),
        fake_run("baseline", "reference", 1, rng.random(N_TEST)),
        fake_run("cnn", "keras", 0, probs_with_correct(labels, 190, 1), train_s=10.0, rss=900),
        fake_run("cnn", "keras", 1, probs_with_correct(labels, 186, 2), train_s=14.0, rss=1100),
        fake_run("cnn", "torch", 0, probs_with_correct(labels, 150, 3), train_s=20.0, rss=1500),
        fake_run("cnn", "torch", 1, probs_with_correct(labels, 152, 4), train_s=30.0, rss=1700),
    ]


def make_bundle(spec: Spec | None = None, runs: list[dict[str, Any]] | None = None,
                extra_plan: dict[str, str] | None = None) -> Bundle:
    """Standard runs + one stale run + one failed run; densenet on keras never ran."""
    spec = spec or paper_spec()
    runs = standard_runs() if runs is None else runs
    plan = {r["run_id"]: r["run_hash"] for r in runs}
    plan["densenet__keras__seed0"] = "hash-densenet__keras__seed0"
    plan["densenet__torch__seed0"] = "hash-densenet__torch__seed0"
    plan.update(extra_plan or {})
    stale = fake_run("densenet", "keras", 0, np.ones(N_TEST), run_hash="hash-of-an-older-spec")
    dropped = fake_run("cnn", "keras", 7, np.ones(N_TEST))  # a seed the spec no longer has
    return Bundle(
        results_dir="results/paper", spec=spec, source="specs/paper.yaml",
        overrides=OVERRIDES, data=data_json(), plan={"data_hash": "d", "runs": plan},
        runs=tuple(run_from_json(r) for r in (*runs, stale, dropped,
                                              failed_run("densenet", "torch", 0))),
    )


@pytest.fixture(scope="module")
def analysis():  # type: ignore[no-untyped-def]
    return analyze(make_bundle())


# ---------------------------------------------------------------------------------------------


def test_seed_mean_with_one_seed_equals_bootstrap_metrics() -> None:
    labels, patient, _ = test_groups()
    p = probs_with_correct(labels, 150, 3)
    for clusters in (None, patient):
        ours = bootstrap_seed_mean(labels, p[None], 0.5, n_resamples=300, clusters=clusters, rng=5)
        ref = bootstrap_metrics(labels, p, 0.5, n_resamples=300, clusters=clusters, rng=5)
        assert ours == ref


def test_seed_mean_point_is_mean_of_seed_points_and_interval_is_aligned() -> None:
    labels, patient, _ = test_groups()
    probs = np.stack([probs_with_correct(labels, k, s) for k, s in ((150, 1), (170, 2))])
    out = bootstrap_seed_mean(labels, probs, 0.5, ("accuracy",), n_resamples=400,
                              clusters=patient, rng=0)
    assert out["accuracy"].point == pytest.approx((150 + 170) / 400, abs=1e-15)
    assert out["accuracy"].unit == "patient"
    assert out["accuracy"].low < 0.8 < out["accuracy"].high
    # Aligned resamples: identical predictions in both rows give the one-seed interval.
    same = bootstrap_seed_mean(labels, np.stack([probs[0], probs[0]]), 0.5, ("accuracy",),
                               n_resamples=400, clusters=patient, rng=0)
    one = bootstrap_seed_mean(labels, probs[:1], 0.5, ("accuracy",), n_resamples=400,
                              clusters=patient, rng=0)
    assert same == one


def test_seed_mean_rejects_bad_shape() -> None:
    labels, _, _ = test_groups()
    with pytest.raises(ValueError, match=r"shape \(S, n\)"):
        bootstrap_seed_mean(labels, np.zeros(N_TEST), rng=0)


def test_stale_and_unplanned_runs_are_ignored_not_mixed(analysis) -> None:  # type: ignore[no-untyped-def]
    ignored = {r.run_id: r.reason for r in analysis.ignored}
    assert ignored == {
        "densenet__keras__seed0": "run hash differs: older spec, data or code",
        "cnn__keras__seed7": "not in the current spec's plan (older spec)",
    }
    assert {r.run_id for r in analysis.runs} == {
        f"{m}__{b}__seed{s}" for m, b in (("baseline", "reference"), ("cnn", "keras"),
                                          ("cnn", "torch")) for s in (0, 1)
    }
    assert analysis.group("densenet", "keras") is None
    keras = analysis.group("cnn", "keras")
    assert keras.seeds == (0, 1)  # seed 7's all-positive predictions are not in the mean
    assert analysis.missing == ("densenet__keras__seed0",)


def test_without_plan_nothing_counts() -> None:
    b = make_bundle()
    a = analyze(Bundle(b.results_dir, b.spec, runs=b.runs))
    assert a.runs == () and len(a.ignored) == len(b.runs)
    assert {r.reason for r in a.ignored} == {"no plan.json: cannot tell whether it is current"}


def test_failed_runs_are_listed_with_reason(analysis) -> None:  # type: ignore[no-untyped-def]
    (f,) = analysis.failed
    assert (f.run_id, f.error_type, f.message) == (
        "densenet__torch__seed0", "RuntimeError", "out of memory: CUDA out of memory")
    assert f.stderr_tail[-1] == "RuntimeError: OOM"


def test_headline_mean_is_mean_of_seed_metrics(analysis) -> None:  # type: ignore[no-untyped-def]
    runs = {r["run_id"]: r for r in standard_runs()}
    for model, backend in (("cnn", "keras"), ("cnn", "torch"), ("baseline", "reference")):
        per_seed = [
            compute_metrics(np.array(runs[f"{model}__{backend}__seed{s}"]["test"]["labels"]),
                            np.array(runs[f"{model}__{backend}__seed{s}"]["test"]["probs"]))
            for s in (0, 1)
        ]
        row = next(r for r in analysis.headline if (r.model, r.metric) == (model, "accuracy"))
        cell = next(c for c in row.cells if c.backend == backend)
        assert cell.mean == np.mean([m["accuracy"] for m in per_seed])
        g = analysis.group(model, backend)
        assert g.seed_summary["image"]["recall"].mean == np.mean([m["recall"] for m in per_seed])
    keras = next(r for r in analysis.headline if (r.model, r.metric) == ("cnn", "accuracy"))
    assert keras.cells[0].mean == (190 + 186) / 400
    assert keras.cells[1].mean == (150 + 152) / 400


def test_headline_interval_is_aligned_seed_mean_bootstrap(analysis) -> None:  # type: ignore[no-untyped-def]
    runs = {r["run_id"]: r for r in standard_runs()}
    labels, patient, _ = test_groups()
    probs = np.stack([runs[f"cnn__torch__seed{s}"]["test"]["probs"] for s in (0, 1)])
    spec = paper_spec()
    assert spec.evaluation.bootstrap.method == "bca"  # the default (tests/test_stats.py)
    ref = bootstrap_seed_mean(labels, probs, 0.5, spec.evaluation.metrics, n_resamples=300,
                              method="bca", clusters=patient, unit="patient", rng=0)
    assert analysis.group("cnn", "torch").seed_mean["image"] == ref


def test_paper_wilson_intervals(analysis) -> None:  # type: ignore[no-untyped-def]
    rows = {(r.model, r.metric): r for r in analysis.headline}
    lo, hi = rows[("baseline", "accuracy")].wilson
    assert (round(lo, 4), round(hi, 4)) == (0.4699, 0.5142)
    lo, hi = rows[("cnn", "accuracy")].wilson
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (73.12, 76.96)
    lo, hi = rows[("cnn", "recall")].wilson
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (56.67, 63.48)
    assert rows[("cnn", "accuracy")].counts == (1465, 1951)
    assert rows[("cnn", "precision")].status == "not printed"
    assert rows[("cnn", "auroc")].status == "not reported"
    assert rows[("cnn", "precision")].printed is None


def test_two_seeds_are_too_few_for_a_verdict(analysis) -> None:  # type: ignore[no-untyped-def]
    rows = {(r.model, r.metric): r for r in analysis.headline}
    keras, torch = rows[("cnn", "accuracy")].cells
    assert keras.verdict.label == torch.verdict.label == "too few seeds"
    assert keras.diff_pp == pytest.approx(94.0 - 75.09)
    # The context: on test-set sampling alone 75.09% is far below Keras' 94% and inside
    # PyTorch's interval around 75.5%.
    assert "printed 0.7509 lies outside [" in keras.verdict.rule_text
    assert "printed 0.7509 lies inside [" in torch.verdict.rule_text
    assert not keras.prediction.with_training
    assert rows[("cnn", "precision")].cells[0].verdict.label == "no printed value"
    dense = rows[("densenet", "accuracy")]
    assert [c.verdict.label for c in dense.cells] == ["no runs", "no runs"]


def three_seed_analysis():  # type: ignore[no-untyped-def]
    """cnn with 3 seeds a backend: Keras right on 190, 186, 188 of 200 images, PyTorch on 150,
    152, 151 (75.5%); the paper printed 75.09% (1,465/1,951)."""
    labels, _, _ = test_groups()
    runs = [fake_run("cnn", b, s, probs_with_correct(labels, k, 10 * i + s))
            for i, (b, ks) in enumerate((("keras", (190, 186, 188)), ("torch", (150, 152, 151))))
            for s, k in enumerate(ks)]
    spec = paper_spec("seeds=[0, 1, 2]")
    return analyze(make_bundle(spec=spec, runs=runs)), runs


def test_verdicts_follow_the_prediction_rule() -> None:
    a, runs = three_seed_analysis()
    labels, patient, _ = test_groups()
    acc = next(r for r in a.headline if (r.model, r.metric) == ("cnn", "accuracy"))
    keras, torch = acc.cells
    assert keras.verdict.label == "not reproduced (higher)"  # 94% vs printed 75.09%
    assert torch.verdict.label == "reproduced"  # 75.5% on 200 images: 75.09% is inside
    # Every verdict is prediction_verdict of the printed value and the interval built, by hand
    # here, from the seed values, the bootstrap SE and seed noise, and the paper's n of 1,951.
    metrics = paper_spec().evaluation.metrics
    for cell, backend in ((keras, "keras"), (torch, "torch")):
        mine = [r for r in runs if r["key"]["backend"] == backend]
        probs = np.stack([r["test"]["probs"] for r in mine])
        values = [compute_metrics(labels, p)["accuracy"] for p in probs]
        se = bootstrap_seed_mean(labels, probs, 0.5, metrics, n_resamples=300, method="bca",
                                 clusters=patient, unit="patient", rng=0)["accuracy"].se
        w = bootstrap_seed_noise(labels, probs, 0.5, metrics, n_resamples=300,
                                 clusters=patient, rng=0)["accuracy"]
        pi = prediction_interval(values, se, binomial_sd(float(np.mean(values)), 1951),
                                 seed_noise=w, n_paper=1951, limits=(0.0, 1.0))
        assert cell.prediction == pi
        assert cell.verdict == prediction_verdict(0.7509, pi)
        assert pi.with_training and pi.n_seeds == 3
    assert keras.prediction.low > 0.7509 > torch.prediction.low


def test_degenerate_models_are_flagged() -> None:
    runs = [*standard_runs(),
            fake_run("densenet", "keras", 0, np.full(N_TEST, 0.2)),
            fake_run("densenet", "keras", 1, np.full(N_TEST, 0.3)),
            fake_run("densenet", "torch", 0, np.full(N_TEST, 0.2)),
            fake_run("densenet", "torch", 1, np.full(N_TEST, 0.9))]
    a = analyze(make_bundle(runs=runs))
    keras, torch = a.group("densenet", "keras"), a.group("densenet", "torch")
    assert keras.degenerate == ("degenerate: every run predicts one class (negative) for all "
                                "200 test images")
    assert torch.degenerate == ("degenerate: every run predicts one class (negative or "
                                "positive) for all 200 test images")
    assert torch.degenerate_runs == ("seed 0: predicts negative for all 200 test images",
                                     "seed 1: predicts positive for all 200 test images")
    assert a.group("cnn", "keras").degenerate is None
    # The random baseline is at chance, but so is the paper's (49.21%, Wilson 46.99-51.42):
    # not flagged. A trained model at chance whose paper's accuracy lies above 50% is.
    assert a.group("baseline", "reference").degenerate is None
    chance = [fake_run("cnn", "keras", s, np.random.default_rng(s).random(N_TEST))
              for s in (0, 1)]
    b = analyze(make_bundle(spec=paper_spec("evaluation.metrics=[accuracy, recall]"),
                            runs=chance))
    g = b.group("cnn", "keras")
    assert g.degenerate is not None and g.degenerate.startswith(
        "degenerate: no better than chance, AUROC 0.")
    assert g.chance_auroc.contains(0.5)


def test_contradiction_claims_are_not_verdicts(analysis) -> None:  # type: ignore[no-untyped-def]
    # The paper's "accuracy exceeding 80%" for the CNN is primary: false; the headline compares
    # the table's 75.09% only.
    acc = next(r for r in analysis.headline if (r.model, r.metric) == ("cnn", "accuracy"))
    assert acc.printed == 0.7509


def test_paired_difference_sign_and_mcnemar(analysis) -> None:  # type: ignore[no-untyped-def]
    (c,) = analysis.comparisons
    assert (c.model, c.backend_a, c.backend_b) == ("cnn", "keras", "torch")
    assert [p.seed for p in c.pairs] == [0, 1]
    acc = next(s for s in c.summaries if s.metric == "accuracy")
    assert acc.mean_difference == pytest.approx(((190 - 150) + (186 - 152)) / 400)
    assert acc.distinguishable and acc.n_excluding_zero == 2
    assert "accuracy" in c.distinguishable_on
    assert c.sentence.startswith("keras and torch are distinguishable at the 95% level on")
    runs = {r["run_id"]: r for r in standard_runs()}
    labels, patient, _ = test_groups()
    pa = np.array(runs["cnn__keras__seed0"]["test"]["probs"])
    pb = np.array(runs["cnn__torch__seed0"]["test"]["probs"])
    ref = paired_bootstrap_difference(labels, pa, pb, 0.5, paper_spec().evaluation.metrics,
                                      n_resamples=300, method="bca", clusters=patient,
                                      unit="patient", rng=0)
    assert c.pairs[0].differences == ref
    assert c.pairs[0].differences["accuracy"].point == pytest.approx(40 / 200)
    # The bootstrap resamples patients, so McNemar is adjusted for them (Obuchowski).
    ya, yb = (pa >= 0.5).astype(int), (pb >= 0.5).astype(int)
    assert c.pairs[0].mcnemar == clustered_mcnemar(labels, ya, yb, patient)
    assert c.pairs[0].mcnemar.n_clusters == 60
    image = analyze(make_bundle(spec=paper_spec("evaluation.bootstrap.unit=image")))
    assert image.comparisons[0].pairs[0].mcnemar == mcnemar(labels, ya, yb)


def test_identical_backends_are_not_distinguishable() -> None:
    labels, _, _ = test_groups()
    runs = []
    for s in (0, 1):
        p = probs_with_correct(labels, 160, s)
        runs += [fake_run("cnn", "keras", s, p), fake_run("cnn", "torch", s, p)]
    (c,) = analyze(make_bundle(runs=runs)).comparisons
    assert c.distinguishable_on == ()
    assert c.sentence == ("keras and torch are not distinguishable at the 95% level on any "
                          "metric (2 seed pairs).")
    assert all(p.mcnemar.p_value == 1.0 for p in c.pairs)


def test_a_study_level_claim_is_compared_at_study_level() -> None:
    # paper.claims[2] is the CNN's accuracy (75.09%); marked study level, the headline and the
    # verdict take the seed mean of the study-level accuracy, the rest stays at image level
    a = analyze(make_bundle(spec=paper_spec("paper.claims[2].level=study")))
    rows = {(r.model, r.metric): r for r in a.headline}
    acc, recall = rows[("cnn", "accuracy")], rows[("cnn", "recall")]
    assert (acc.level, recall.level) == ("study", "image")
    for i, backend in enumerate(("keras", "torch")):
        g = a.group("cnn", backend)
        study, image = g.seed_summary["study"]["accuracy"].mean, g.seed_summary["image"][
            "accuracy"].mean
        assert study != image
        assert acc.cells[i].mean == study
        assert acc.cells[i].interval == g.seed_mean["study"]["accuracy"]
        assert acc.cells[i].diff_pp == pytest.approx((study - 0.7509) * 100)
        assert recall.cells[i].mean == g.seed_summary["image"]["recall"].mean
    image_acc = {(r.model, r.metric): r for r in analyze(make_bundle()).headline}[
        ("cnn", "accuracy")]
    assert image_acc.level == "image" and image_acc.cells[0].mean == (190 + 186) / 400
    report = render_report(a, [])
    assert "| accuracy | 75.09% (Wilson 73.12-76.96), study level |" in report
    assert "at the level of the paper's value (image unless marked study level)" in report


def test_study_level_aggregates_per_study(analysis) -> None:  # type: ignore[no-untyped-def]
    r = analysis.runs[0]
    assert r.n_test == N_TEST and r.n_studies == N_STUDIES
    g = analysis.group("cnn", "keras")
    assert g.n_studies == N_STUDIES
    study = g.seed_mean["study"]["accuracy"]
    assert study.unit == "patient" and study.low <= study.point <= study.high
    # study unit: the studies themselves are resampled
    a = analyze(make_bundle(spec=paper_spec("evaluation.bootstrap.unit=study")))
    assert a.group("cnn", "keras").seed_mean["study"]["accuracy"].unit == "study"
    assert a.runs[0].intervals["image"]["accuracy"].unit == "study"


def test_image_unit_interval_is_reported_beside_the_clustered_one(analysis) -> None:  # type: ignore[no-untyped-def]
    for r in analysis.runs:
        assert r.intervals["image"]["accuracy"].unit == "patient"
        assert r.image_unit["accuracy"].unit == "image"
        assert r.image_unit["accuracy"].point == r.intervals["image"]["accuracy"].point


def test_resources_median_and_not_measured(analysis) -> None:  # type: ignore[no-untyped-def]
    by = {(g.model, g.backend): {s.quantity: s for s in g.stats} for g in analysis.resources}
    torch = by[("cnn", "torch")]
    assert torch["training time"].median == 25.0
    assert (torch["training time"].low, torch["training time"].high) == (20.0, 30.0)
    assert torch["peak host memory (RSS)"].median == 1600.0
    assert torch["time per epoch (mean over epochs)"].median == 4.5
    gpu = torch["GPU device memory peak"]
    assert gpu.n_measured == 0 and gpu.median is None and gpu.reason == NO_NVML
    fm = torch["framework peak GPU memory"]
    assert fm.median is None and fm.reason == "backend reported no framework memory statistics"
    base = by[("baseline", "reference")]
    assert base["training time"].reason == "no training: random model"


def test_architecture_check(analysis) -> None:  # type: ignore[no-untyped-def]
    arch = {a.model: a for a in analysis.architecture}
    cnn = arch["cnn"]
    assert cnn.printed == cnn.inferred and cnn.inferred.total == 3_309_921
    assert cnn.built["keras"] == (cnn.inferred,) and cnn.mismatches == ()
    assert arch["densenet"].inferred.total == 12_644_545
    assert arch["densenet"].built == {"keras": (), "torch": ()}
    runs = standard_runs()
    runs[4]["params"] = {"total": 3309921, "trainable": 3309921, "non_trainable": 0}
    bad = {a.model: a for a in analyze(make_bundle(runs=runs)).architecture}["cnn"]
    assert len(bad.mismatches) == 2
    assert bad.mismatches[0] == "torch built different counts across seeds"
    assert bad.mismatches[1].startswith("torch built 3,309,921 (3,309,921 trainable, 0 non")


def test_data_and_environment(analysis) -> None:  # type: ignore[no-untyped-def]
    d = analysis.data
    assert d.dataset == "mura-v1.1" and [p.part for p in d.parts] == ["train", "test", "val"]
    assert d.leakage["test"] == {"study": 0.921, "patient": 0.934}
    env = {e.backend: dict(e.rows) for e in analysis.environment}
    assert env["torch"]["framework"] == "pytorch"
    assert env["keras"]["git commit"] == "0123456789ab"
    assert env["torch"]["GPU"] == f"not measured ({NO_NVML})"


def test_bad_result_becomes_a_failure_not_a_crash() -> None:
    runs = standard_runs()
    runs[0]["test"] = {k: [] for k in runs[0]["test"]}
    a = analyze(make_bundle(runs=runs))
    assert [(f.run_id, f.error_type, f.message) for f in a.failed if f.error_type == "BadResult"
            ] == [("baseline__reference__seed0", "BadResult", "the result's test set is empty")]
    assert a.group("baseline", "reference").seeds == (1,)
    assert math.isnan(a.group("baseline", "reference").seed_summary["image"]["accuracy"].sd)


def test_analysis_is_deterministic() -> None:
    assert analyze(make_bundle()) == analyze(make_bundle())


def test_load_bundle_without_spec_json(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_bundle(tmp_path)
    assert e.value.message == f"{tmp_path}: no spec.json; run `python -m harness run SPEC` first"


def test_wilson_of_printed_counts() -> None:
    assert tuple(round(x, 4) for x in wilson_interval(960, 1951)) == (0.4699, 0.5142)
