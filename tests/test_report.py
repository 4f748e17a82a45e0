"""The markdown report and metrics.csv: frozen expected text, targeted lines, the CLI verb.

The expected file was generated once from `small_analysis()` and read line by line; regenerate
it after an intended change with

    HARNESS_REGENERATE=1 python -m pytest tests/test_report.py -k expected
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analyze import (
    N_TEST,
    data_json,
    failed_run,
    fake_run,
    make_bundle,
    paper_spec,
    probs_with_correct,
    resources,
    standard_runs,
    test_groups,
)

from harness.analyze import Analysis, Bundle, analyze
from harness.report import (
    CSV_COLUMNS,
    fmt_difference,
    fmt_interval,
    fmt_value,
    render_metrics_csv,
    render_report,
)
from harness.results import run_from_json, write_json_atomic
from harness.stats import Interval

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).parent / "expected" / "report_small.md"
SMALL = ("evaluation.metrics=[accuracy, recall, precision]",)


def small_analysis() -> Analysis:
    return analyze(make_bundle(spec=paper_spec(*SMALL)))


@pytest.fixture(scope="module")
def report() -> str:
    return render_report(small_analysis())


def test_report_equals_expected_text(report: str) -> None:
    if os.environ.get("HARNESS_REGENERATE"):
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(report, encoding="utf-8")
    assert report == EXPECTED.read_text(encoding="utf-8")


def test_render_is_pure_and_repeatable() -> None:
    a = small_analysis()
    assert render_report(a) == render_report(a)


def test_sections_in_order(report: str) -> None:
    titles = [line for line in report.splitlines() if line.startswith("## ")]
    assert titles == [
        "## Summary", "## Headline", "## Runs", "## Across seeds", "## Keras vs PyTorch",
        "## Study level",
        "## Data", "## Architecture check", "## Resources", "## Failed runs", "## Ignored runs",
        "## The paper's internal contradiction", "## Assumptions", "## Environment",
    ]
    assert report.startswith("# Anomaly Detection in Radiographs: reproduction report\n")


def test_headline_rows(report: str) -> None:
    assert ("| accuracy | 49.21% (Wilson 46.99-51.42) | 48.50% [43.21, 53.79] (test sets only) "
            "| too few seeds, -0.71 pp |") in report
    assert ("| accuracy | 75.09% (Wilson 73.12-76.96) | 94.00% [91.26, 96.74] (test sets only) | "
            "too few seeds, +18.91 pp | 75.50% [70.86, 80.14] (test sets only) | too few seeds, "
            "+0.41 pp |") in report
    # A prediction interval is clipped to the metric's range.
    assert "| precision | not printed | 96.26% [90.99, 100.00] (test sets only) | — |" in report
    assert "| accuracy | 78.99% (Wilson 77.12-80.74) | no runs | — | no runs | — |" in report
    assert "**Verdict rule.** The paper printed ONE training run scored on ITS test set" in report
    assert ("- cnn accuracy, Keras: too few seeds: 2 seeds: the spread across training runs "
            "cannot be estimated (needs 3); on test-set sampling alone, printed 0.7509 lies "
            "outside [0.9126, 0.9674] = 0.9400 +/- 1.96 x 0.0140 (test 0.0129, paper 0.0054 at "
            "n = 1,951; 2 seeds, df inf)") in report


def test_summary_sentences(report: str) -> None:
    summary = report.split("## Summary\n\n")[1].split("\n\n## ")[0].splitlines()
    assert summary == [
        "- **baseline** (2 seeds per framework, too few for a verdict: needs 3): accuracy "
        "reference (numpy) 48.50% (paper 49.21%); recall reference (numpy) 44.59% (paper "
        "48.61%).",
        "- **cnn** (2 seeds per framework, too few for a verdict: needs 3): accuracy Keras "
        "94.00% and PyTorch 75.50% (paper 75.09%); recall Keras 92.79% and PyTorch 74.77% (paper "
        "60.13%). Keras and PyTorch are distinguishable on accuracy, recall and precision (every "
        "seed pair's paired interval excludes 0).",
        "- **densenet**: no finished run yet.",
        "- The split is by image, as in the paper: 93.40% of the test images share a patient with "
        "the training images (92.10% a study), so the test set is not independent of training "
        "and its numbers are optimistic; `python -m harness compare` sets them beside a "
        "patient-grouped split.",
        "- 6 of 7 runs finished. 1 run failed: `densenet__torch__seed0` (RuntimeError); 1 "
        "planned not run yet.",
    ]


def test_summary_with_verdicts_and_degenerate_models() -> None:
    labels, _, _ = test_groups()
    runs = [fake_run("cnn", b, s, probs_with_correct(labels, k, 10 * i + s))
            for i, (b, ks) in enumerate((("keras", (190, 186, 188)), ("torch", (150, 152, 151))))
            for s, k in enumerate(ks)]
    runs += [fake_run("densenet", b, s, np.full(N_TEST, 0.2)) for b in ("keras", "torch")
             for s in (0, 1, 2)]
    a = analyze(make_bundle(spec=paper_spec("seeds=[0, 1, 2]", *SMALL), runs=runs))
    text = render_report(a)
    lines = text.split("## Summary\n\n")[1].split("\n\n## ")[0].splitlines()
    assert lines[1] == (
        "- **cnn** (3 seeds per framework): accuracy (paper 75.09%) not reproduced (higher) in "
        "Keras (94.00%) and reproduced in PyTorch (75.50%); recall (paper 60.13%) not reproduced "
        "(higher) in both (Keras 92.19%, PyTorch 77.48%). Keras and PyTorch are distinguishable "
        "on accuracy, recall and precision (every seed pair's paired interval excludes 0).")
    assert lines[2].endswith(
        "**Keras is degenerate: every run predicts one class (negative) for all 200 test images; "
        "PyTorch is degenerate: every run predicts one class (negative) for all 200 test "
        "images.**")
    assert lines[4] == ("- 12 of 13 runs finished. 1 run failed: `densenet__torch__seed0` "
                        "(RuntimeError); 6 runs predict one class for every test image: "
                        "densenet on Keras (3 of 3 seeds); densenet on PyTorch (3 of 3 seeds).")
    # ... and in its table, and each degenerate run in the per-run table.
    assert "| recall | 68.73% (Wilson 65.42-71.87) | 0.00% [" in text
    assert "not reproduced (lower), -68.73 pp; **degenerate** |" in text
    assert "**Keras is degenerate: every run predicts one class (negative)" in text
    assert "; **degenerate**: predicts negative for all 200 test images |" in text


def test_method_sentence_true_for_each_unit() -> None:
    sentences = {
        unit: analyze(make_bundle(spec=paper_spec(*SMALL, f"evaluation.bootstrap.unit={unit}")))
        .method_sentence for unit in ("image", "study", "patient")}
    assert "resamples of the test set's patients (whole patients are drawn, since one " \
        "patient's images are correlated;" in sentences["patient"]
    assert "resamples of the test set's studies (whole studies are drawn, since a study's " \
        "views are correlated; studies of one patient are still treated as independent" \
        in sentences["study"]
    assert "resamples of the test set's images (single images are drawn as if independent; " \
        "images of one study or patient are correlated and this correlation is NOT handled" \
        in sentences["image"]
    assert all(s.startswith("Intervals are 95% BCa bootstrap intervals from 300 resamples")
               for s in sentences.values())


def test_dropped_resamples_are_shown() -> None:
    iv = Interval(1.0, 1.0, 1.0, "bca", 0.95, 1000, "patient", n_dropped=350)
    assert fmt_interval("precision", iv) == "100.00% [100.00, 100.00] (35% of resamples undefined)"
    few = Interval(0.5, 0.4, 0.6, "bca", 0.95, 1000, "patient", n_dropped=10)
    assert fmt_interval("precision", few) == "50.00% [40.00, 60.00]"
    nan = float("nan")
    none = Interval(nan, nan, nan, "bca", 0.95, 1000, "patient", n_dropped=1000)
    assert fmt_interval("precision", none) == "undefined [undefined]"


def test_long_tables_are_folded(report: str) -> None:
    assert "<details><summary>Per run: 6 runs</summary>\n\n| model | backend | seed |" in report
    assert "<details><summary>Resources per model and backend</summary>\n\n|" in report
    assert report.count("<details>") == report.count("</details>") == 7


def test_not_measured_never_zero(report: str) -> None:
    gpu = next(line for line in report.splitlines() if line.startswith("| GPU device memory"))
    assert gpu.count("not measured (NVML not available: NVMLError_LibraryNotFound)") == 3
    resources = report.split("## Resources")[1].split("\n## ")[0]
    assert not re.search(r"(?<![\d.,])0(\.0+)?( MiB| J| W| s|%)", resources)
    fm = next(line for line in report.splitlines() if line.startswith("| framework peak GPU"))
    assert "not measured (backend reported no framework memory statistics)" in fm


def test_gpu_run_shows_measured_memory() -> None:
    runs = standard_runs()
    for r in runs[4:]:
        r["resources"] = resources(20.0, 1500.0, gpu=True)
    text = render_report(analyze(make_bundle(spec=paper_spec(*SMALL), runs=runs)))
    fm = next(line for line in text.splitlines() if line.startswith("| framework peak GPU"))
    assert fm.endswith("| 900.0 MiB [torch_max_memory_allocated] |")
    energy = next(line for line in text.splitlines() if line.startswith("| GPU energy"))
    assert energy.endswith("| 1,200.0 J |")


def test_leakage_and_failure_text(report: str) -> None:
    assert ("92.10% of test images have another image of the same study in train; 93.40% share "
            "a patient with train.") in report
    assert "A patient-grouped split (`--set data.split.strategy=patient`)" in report
    assert ("| `densenet__torch__seed0` | RuntimeError | out of memory: CUDA out of memory |"
            in report)
    assert "| `densenet__keras__seed0` | run hash differs: older spec, data or code |" in report


def test_empty_results_still_render() -> None:
    spec = paper_spec(*SMALL)
    text = render_report(analyze(Bundle("results/paper", spec, plan={"runs": {}})))
    assert "No run has finished yet: the table shows the paper's values only." in text
    assert "| accuracy | 75.09% (Wilson 73.12-76.96) | no runs | — | no runs | — |" in text
    assert "## Failed runs" not in text and "## Keras vs PyTorch" not in text
    only_failed = Bundle("results/paper", spec, plan={"runs": {"cnn__keras__seed0": "h"}},
                         runs=(run_from_json({**failed_run("cnn", "keras", 0), "run_hash": "h"}),))
    text = render_report(analyze(only_failed))
    assert "## Failed runs" in text and "No finished run of the current spec." in text


def test_formatting() -> None:
    iv = Interval(0.7132, 0.681, 0.744, "percentile", 0.95, 100, "patient")
    assert fmt_interval("accuracy", iv) == "71.32% [68.10, 74.40]"
    assert fmt_interval("auroc", iv) == "0.713 [0.681, 0.744]"
    assert fmt_value("recall", float("nan")) == "undefined"
    assert fmt_difference("accuracy", -0.0377) == "-3.77 pp"
    nan = Interval(0.5, float("nan"), float("nan"), "percentile", 0.95, 100, "image")
    assert fmt_interval("precision", nan) == "50.00% [undefined]"


def test_metrics_csv_rows() -> None:
    a = small_analysis()
    rows = list(csv.DictReader(io.StringIO(render_metrics_csv(a))))
    assert tuple(rows[0]) == CSV_COLUMNS
    # 6 runs x 3 metrics x (image: patient + image unit, study: patient) + 3 groups x 2 levels x 3
    # + the prediction intervals of 3 groups x 3 metrics
    assert len(rows) == 6 * 3 * 3 + 3 * 2 * 3 + 3 * 3
    pred = next(r for r in rows if r["run_id"] == "cnn__keras__prediction"
                and r["metric"] == "accuracy")
    assert (pred["seed"], pred["level"], pred["method"]) == (
        "prediction", "image", "prediction interval (verdict: too few seeds)")
    assert (float(pred["low"]), float(pred["high"])) == pytest.approx((0.9126, 0.9674), abs=5e-5)
    row = next(r for r in rows if r["run_id"] == "cnn__keras__seed0" and r["level"] == "image"
               and r["metric"] == "accuracy" and r["unit"] == "patient")
    assert float(row["value"]) == 0.95 and row["method"] == "bca"
    mean = next(r for r in rows if r["run_id"] == "cnn__torch__mean" and r["level"] == "image"
                and r["metric"] == "accuracy")
    assert float(mean["value"]) == 0.755 and mean["seed"] == "mean"


# ---------------------------------------------------------------------------------------------
# The CLI verb, in a subprocess


def write_results(folder: Path) -> None:
    spec = paper_spec(*SMALL)
    write_json_atomic(folder / "spec.json", {"source": "specs/paper.yaml", "overrides": list(SMALL),
                                             "spec": spec.model_dump(mode="json")})
    write_json_atomic(folder / "data.json", data_json())
    runs = standard_runs()
    write_json_atomic(folder / "plan.json", {"data_hash": "d", "runs": {
        r["run_id"]: r["run_hash"] for r in runs}})
    for r in runs:
        write_json_atomic(folder / "runs" / f"{r['run_id']}.json", r)
    stale = fake_run("cnn", "torch", 5, np.zeros(N_TEST))
    write_json_atomic(folder / "runs" / f"{stale['run_id']}.json", stale)


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_report_writes_report_and_csv(tmp_path: Path) -> None:
    folder = tmp_path / "paper"
    write_results(folder)
    out = harness("report", str(folder))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"report: {folder / 'report.md'}"
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert "| accuracy | 49.21% (Wilson 46.99-51.42) | 48.50% [" in text
    assert "| `cnn__torch__seed5` | not in the current spec's plan (older spec) |" in text
    rows = list(csv.DictReader((folder / "metrics.csv").open(encoding="utf-8")))
    assert {r["run_id"] for r in rows} >= {"cnn__keras__seed0", "cnn__torch__mean"}
    assert "cnn__torch__seed5" not in {r["run_id"] for r in rows}
    assert not list(folder.glob(".*.tmp"))
    # The figures, drawn into figures/ and linked relatively; the random baseline has no
    # training curves, densenet (never run) has no figure at all.
    names = sorted(f.name for f in (folder / "figures").glob("*.png"))
    assert names == ["differences-keras-torch.png", "results.png", "roc-baseline.png",
                     "roc-cnn.png", "training-cnn.png"]
    for name in names:
        assert "![" in text and f"](figures/{name})" in text
    # A re-render removes a figure the analysis no longer makes, and nothing else.
    (folder / "figures" / "training-densenet.png").write_bytes(b"old")
    (folder / "figures" / "notes.txt").write_text("mine")
    assert harness("report", str(folder)).returncode == 0
    assert not (folder / "figures" / "training-densenet.png").exists()
    assert (folder / "figures" / "notes.txt").read_text() == "mine"


def test_cli_report_without_runs_folder(tmp_path: Path) -> None:
    out = harness("report", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == f"error: {tmp_path}: no runs/ folder here"
    assert "Traceback" not in out.stderr


def test_cli_report_without_spec_json(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    out = harness("report", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {tmp_path}: no spec.json; run `python -m harness run SPEC` first")


def test_written_spec_json_round_trips(tmp_path: Path) -> None:
    write_results(tmp_path)
    d = json.loads((tmp_path / "spec.json").read_text(encoding="utf-8"))
    assert d["spec"]["evaluation"]["metrics"] == ["accuracy", "recall", "precision"]


def test_checks_written_beside_the_runs_become_report_sections(tmp_path) -> None:
    import json

    from harness.report import checks_sections

    (tmp_path / "runs").mkdir()
    (tmp_path / "determinism.json").write_text(json.dumps({"grades": [
        {"model": "cnn", "backend": "torch", "seed": 0, "grade": "bit-identical",
         "max_abs_difference": 0.0, "changed_predictions": 0,
         "flags": {"use_deterministic_algorithms": True}}]}))
    (tmp_path / "parity.json").write_text("{not json")
    sections = checks_sections(tmp_path)
    assert sections[0].startswith("## parity.json\n\n")
    assert "is unreadable" in sections[0]
    assert sections[1].splitlines()[0] == "## Determinism, measured"
    row = "| cnn | PyTorch | 0 | bit-identical | use_deterministic_algorithms True |"
    assert row in sections[1]
