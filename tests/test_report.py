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
    resources,
    standard_runs,
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
        "## Headline", "## Runs", "## Across seeds", "## Keras vs PyTorch", "## Study level",
        "## Data", "## Architecture check", "## Resources", "## Failed runs", "## Ignored runs",
        "## The paper's internal contradiction", "## Assumptions", "## Environment",
    ]
    assert report.startswith("# Anomaly Detection in Radiographs: reproduction report\n")


def test_headline_rows(report: str) -> None:
    assert "| accuracy | 49.21% (Wilson 46.99-51.42) | 48.50% [" in report
    assert ("| accuracy | 75.09% (Wilson 73.12-76.96) | 94.00% [91.22, 96.23] | "
            "not reproduced (higher), +18.91 pp | 75.50% [") in report
    assert "| precision | not printed | 96.26% [" in report
    assert "| accuracy | 78.99% (Wilson 77.12-80.74) | no runs | — | no runs | — |" in report
    assert "**Verdict rule.** reproduced: the printed value lies inside our interval" in report


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
    assert len(rows) == 6 * 3 * 3 + 3 * 2 * 3
    row = next(r for r in rows if r["run_id"] == "cnn__keras__seed0" and r["level"] == "image"
               and r["metric"] == "accuracy" and r["unit"] == "patient")
    assert float(row["value"]) == 0.95 and row["method"] == "percentile"
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
