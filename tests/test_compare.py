"""`harness compare`: folders side by side, paired where the test images are the same."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analyze import (
    N_TEST,
    data_json,
    make_bundle,
    paper_spec,
    probs_with_correct,
    standard_runs,
    test_groups,
)
from test_report import write_results

from harness.analyze import analyze
from harness.compare import compare_results, difference_rows, render_comparison
from harness.errors import UserError
from harness.metrics import compute_metrics
from harness.stats import bootstrap_seed_mean_difference, difference_interval

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("evaluation.metrics=[accuracy, recall, precision]",)


def better_torch_runs() -> list[dict]:
    """The standard runs with PyTorch's CNN right on 170 and 172 images instead of 150, 152."""
    labels, _, _ = test_groups()
    runs = standard_runs()
    for r, k in zip(runs[4:], (170, 172), strict=True):
        r["test"]["probs"] = probs_with_correct(labels, k, r["key"]["seed"] + 40).tolist()
    return runs


def moved_test_set(runs: list[dict]) -> list[dict]:
    """The same predictions, but on other cache rows: other test images (another split)."""
    out = copy.deepcopy(runs)
    for r in out:
        r["test"]["rows"] = list(range(5000, 5000 + N_TEST))
    return out


def patient_split_data() -> dict:
    d = data_json()
    d["split"] = {**d["split"], "strategy": "patient"}
    d["leakage"] = {"test": {"study": 0.0, "patient": 0.0}, "val": {"study": 0.0, "patient": 0.0}}
    return d


def analyses(second_runs: list[dict], data: dict | None = None):  # type: ignore[no-untyped-def]
    spec = paper_spec(*SMALL)
    a = analyze(make_bundle(spec=spec))
    bundle = make_bundle(spec=spec, runs=second_runs)
    if data is not None:
        bundle = type(bundle)(**{**bundle.__dict__, "data": data, "results_dir": "results/b"})
    return a, analyze(bundle)


def test_paired_when_the_test_images_are_the_same() -> None:
    a, b = analyses(better_torch_runs())
    c = compare_results([a, b])
    assert ("cnn", "torch", 1, True) in c.paired and ("cnn", "keras", 1, True) in c.paired
    row = next(r for r in c.rows if (r.model, r.backend, r.metric) == ("cnn", "torch", "accuracy"))
    first, second = row.cells
    assert first.mean == (150 + 152) / 400 and second.mean == (170 + 172) / 400
    d = second.difference
    assert d is not None and d.paired
    assert d.difference == pytest.approx(0.10, abs=1e-12)
    # The interval is difference_interval over the seeds, with the paired bootstrap SE of the
    # difference of seed means on the same resampled patients.
    labels, patient, _ = test_groups()
    ga, gb = a.group("cnn", "torch"), b.group("cnn", "torch")
    se = bootstrap_seed_mean_difference(labels, gb.test.probs, ga.test.probs, 0.5, ("accuracy",),
                                        n_resamples=300, method="bca", clusters=patient,
                                        unit="patient", rng=0)["accuracy"].se
    ref = difference_interval(gb.seed_values["image"]["accuracy"],
                              ga.seed_values["image"]["accuracy"], se, paired=True,
                              seed_noise_a=gb.seed_noise["image"]["accuracy"],
                              seed_noise_b=ga.seed_noise["image"]["accuracy"])
    assert d == ref
    assert d.excludes_zero()
    keras = next(r for r in c.rows
                 if (r.model, r.backend, r.metric) == ("cnn", "keras", "accuracy"))
    assert keras.cells[1].difference.difference == 0.0  # the same runs in both folders


def test_unpaired_when_the_test_images_differ() -> None:
    a, b = analyses(moved_test_set(better_torch_runs()), patient_split_data())
    c = compare_results([a, b])
    assert ("cnn", "torch", 1, False) in c.paired
    assert c.splits == ("image", "patient")
    assert c.leakage == (0.934, 0.0)
    row = next(r for r in c.rows if (r.model, r.backend, r.metric) == ("cnn", "torch", "accuracy"))
    d = row.cells[1].difference
    ea = a.group("cnn", "torch").seed_mean["image"]["accuracy"].se
    eb = b.group("cnn", "torch").seed_mean["image"]["accuracy"].se
    assert not d.paired and d.se_test == pytest.approx(math.sqrt(ea**2 + eb**2), rel=1e-12)
    text = render_comparison(c)
    assert "- **A**: `results/paper` (spec `paper`, split by image)" in text
    assert "- **B**: `results/b` (spec `paper`, split by patient)" in text
    assert ("Test images that share a patient with the training images: A 93.4%, B 0.0%."
            in text)
    assert "- cnn / torch, B vs A: unpaired (different test images)" in text
    assert "## cnn / torch" in text and "| metric | A | B | B - A [95%] |" in text
    b_acc = (170 + 172) / 400
    assert (f"| accuracy | 75.50% | {100 * b_acc:.2f}% | +10.00 pp [{100 * d.low:+.2f}, "
            f"{100 * d.high:+.2f}]") in text
    rows = difference_rows(c)
    assert {(r.model, r.metric, r.seed) for r in rows} >= {("cnn / torch", "accuracy", 1)}


def test_compare_needs_two_folders() -> None:
    a, _ = analyses(standard_runs())
    with pytest.raises(UserError, match="compare: needs two or more results folders; got 1"):
        compare_results([a])


def harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_cli_compare(tmp_path: Path) -> None:
    write_results(tmp_path / "a")
    write_results(tmp_path / "b")
    out_file = tmp_path / "cmp" / "leak.md"
    out = harness("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"comparison: {out_file}"
    text = out_file.read_text(encoding="utf-8")
    assert text.startswith("# Results side by side\n")
    assert "- cnn / keras, B vs A: paired (same test images)" in text
    # The same runs twice: no test-set difference at all; the folders' trainings still count as
    # independent draws, so Keras' seed spread (95% and 93%, 2 seeds: t on 1 df) widens it.
    assert "| accuracy | 94.00% | 94.00% | +0.00 pp [-6.12, +6.12] |" in text
    assert "| accuracy | 75.50% | 75.50% | +0.00 pp [+0.00, +0.00] |" in text
    assert "![Differences from A](leak-figures/differences.png)" in text
    assert (tmp_path / "cmp" / "leak-figures" / "differences.png").stat().st_size > 1000
    one = harness("compare", str(tmp_path / "a"))
    assert one.returncode == 2
    assert one.stderr.splitlines()[0] == "error: compare: needs two or more results folders; got 1"
    missing = harness("compare", str(tmp_path / "a"), str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[0] == f"error: {tmp_path / 'nope'}: no runs/ folder here"


def test_seed_means_are_the_folders_own() -> None:
    a, b = analyses(better_torch_runs())
    c = compare_results([a, b])
    labels, _, _ = test_groups()
    runs = better_torch_runs()
    torch = [compute_metrics(labels, np.array(r["test"]["probs"]))["recall"] for r in runs[4:]]
    row = next(r for r in c.rows if (r.model, r.backend, r.metric) == ("cnn", "torch", "recall"))
    assert row.cells[1].mean == pytest.approx(float(np.mean(torch)), abs=1e-15)
