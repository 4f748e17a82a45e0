"""The report's figures: files written, sizes, axes, labels, legends; nothing drawn from nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from harness.figures import (
    BACKEND_COLOURS,
    OKABE_ITO,
    DifferenceRow,
    ResultPoint,
    ResultRow,
    RocSet,
    SeedCurves,
    figure_size_px,
    plot_differences,
    plot_results,
    plot_roc,
    plot_training_curves,
)
from harness.metrics import roc_curve_points


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def curves() -> list[SeedCurves]:
    # Two seeds, 4 epochs; Keras' second seed stopped after 3 epochs (early stopping).
    loss = np.array([[0.9, 0.7, 0.6, 0.5], [1.0, 0.8, 0.7, np.nan]])
    acc = np.array([[0.55, 0.65, 0.70, 0.75], [0.50, 0.60, 0.72, np.nan]])
    out = []
    for backend, label in (("keras", "Keras"), ("torch", "PyTorch")):
        for split, shift in (("train", 0.0), ("validation", 0.05)):
            out.append(SeedCurves(backend, label, "loss", split, loss + shift))
            out.append(SeedCurves(backend, label, "accuracy", split, acc - shift))
    return out


def test_training_curves(tmp_path: Path) -> None:
    path = tmp_path / "figures" / "training-cnn.png"
    fig = plot_training_curves("cnn", curves(), path)
    assert fig is not None
    assert png_size(path) == figure_size_px(fig) == (900, 360)
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("epoch", "loss")
    assert (acc_ax.get_xlabel(), acc_ax.get_ylabel()) == ("epoch", "accuracy (%)")
    # One line per backend and split, a min-max band for each (2 seeds).
    assert len(loss_ax.lines) == 4 and len(loss_ax.collections) == 4
    labels = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert labels == ["Keras, train (mean of 2 seeds)", "Keras, validation (mean of 2 seeds)",
                      "PyTorch, train (mean of 2 seeds)", "PyTorch, validation (mean of 2 seeds)"]
    keras_train = acc_ax.lines[0]
    # Accuracy in percent; epoch 4 has only seed 0 (75%), the seed mean elsewhere.
    assert keras_train.get_xdata().tolist() == [1, 2, 3, 4]
    assert np.asarray(keras_train.get_ydata()) == pytest.approx([52.5, 62.5, 71.0, 75.0])
    assert keras_train.get_color() == BACKEND_COLOURS["keras"]
    assert keras_train.get_linestyle() == "-" and loss_ax.lines[1].get_linestyle() == "--"


def test_training_curves_nothing_to_plot(tmp_path: Path) -> None:
    path = tmp_path / "training-baseline.png"
    assert plot_training_curves("baseline", [], path) is None
    empty = [SeedCurves("reference", "reference", "loss", "train", np.full((2, 0), np.nan))]
    assert plot_training_curves("baseline", empty, path) is None
    assert not path.exists()


def result_rows() -> list[ResultRow]:
    paper = ResultPoint("paper", "paper: printed, Wilson 95%", 0.7509, 0.7312, 0.7696)
    return [
        ResultRow("cnn", "accuracy", (
            paper,
            ResultPoint("keras", "Keras: seed mean, 95% prediction", 0.76, 0.72, 0.80,
                        "reproduced"),
            ResultPoint("torch", "PyTorch: seed mean, 95% prediction", 0.82, 0.79, 0.85,
                        "not reproduced (higher)"),
        )),
        ResultRow("cnn", "recall", (
            ResultPoint("paper", "paper: printed, Wilson 95%", 0.6013, 0.5667, 0.6348),
            ResultPoint("keras", "Keras: seed mean, 95% prediction", 0.62, 0.55, 0.69,
                        "reproduced"),
            ResultPoint("torch", "PyTorch: seed mean, 95% prediction", 0.64, 0.57, 0.71,
                        "reproduced"),
        )),
        ResultRow("baseline", "accuracy", (
            ResultPoint("paper", "paper: printed, Wilson 95%", 0.4921, 0.4699, 0.5142),
            ResultPoint("reference", "reference: seed mean, 95% prediction", 0.50, 0.46, 0.54,
                        "too few seeds"),
        )),
    ]


def test_results_forest_plot(tmp_path: Path) -> None:
    path = tmp_path / "results.png"
    fig = plot_results(result_rows(), path, "Results against the paper")
    assert fig is not None
    width, height = png_size(path)
    assert width == 900 and 300 < height < 900
    cnn, baseline = fig.axes
    assert cnn.get_title(loc="left") == "cnn" and baseline.get_title(loc="left") == "baseline"
    assert [t.get_text() for t in cnn.get_yticklabels()] == ["accuracy", "recall"]
    assert cnn.get_xlabel() == "value (%)"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["paper: printed, Wilson 95%", "Keras: seed mean, 95% prediction",
                      "PyTorch: seed mean, 95% prediction",
                      "reference: seed mean, 95% prediction",
                      "hollow: not reproduced, or no verdict"]
    # Values drawn in percent; the paper's marker is black, a non-reproduced one hollow.
    markers = [ln for ln in cnn.lines if ln.get_marker() in ("D", "o")]
    assert [float(np.asarray(ln.get_xdata())[0]) for ln in markers] == pytest.approx(
        [75.09, 76.0, 82.0, 60.13, 62.0, 64.0])
    assert markers[0].get_color() == "#000000"
    assert markers[2].get_markerfacecolor() == "white"
    assert markers[1].get_markerfacecolor() == BACKEND_COLOURS["keras"]
    annotations = [t.get_text() for t in cnn.texts]
    assert "not reproduced (higher)" in annotations


def test_results_nothing_to_plot(tmp_path: Path) -> None:
    row = ResultRow("cnn", "accuracy", (ResultPoint("keras", "Keras", float("nan"),
                                                    float("nan"), float("nan")),))
    assert plot_results([], tmp_path / "r.png", "t") is None
    assert plot_results([row], tmp_path / "r.png", "t") is None
    assert not (tmp_path / "r.png").exists()


def test_roc_curve_points_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1), 2)  # rounded: ties
    fpr, tpr = roc_curve_points(y, p)
    ref_fpr, ref_tpr, _ = roc_curve(y, p, drop_intermediate=False)
    assert fpr == pytest.approx(ref_fpr) and tpr == pytest.approx(ref_tpr)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="a ROC curve needs both classes"):
        roc_curve_points(np.ones(4), np.linspace(0, 1, 4))


def test_roc_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    probs = np.clip(0.3 * y + 0.7 * rng.random((3, 200)), 0, 1)
    aucs = [roc_auc_score(y, row) for row in probs]
    curves = tuple(roc_curve_points(y, row) for row in probs)
    path = tmp_path / "roc-cnn.png"
    fig = plot_roc("cnn", [RocSet("keras", "Keras", curves, tuple(aucs)),
                           RocSet("torch", "PyTorch", curves[:1], (aucs[0],))], path)
    assert fig is not None
    assert png_size(path) == (900, 560)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "false positive rate (1 - specificity, %)"
    assert ax.get_ylabel() == "true positive rate (recall, %)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        f"Keras: AUROC {np.mean(aucs):.3f} ({min(aucs):.3f} to {max(aucs):.3f}, 3 seeds)",
        f"PyTorch: AUROC {aucs[0]:.3f}",
        "chance (AUROC 0.5)",
    ]
    assert len(ax.collections) == 1  # a band for the three seeds, none for one
    # The mean curve at FPR 0.5 is the mean of the three curves read there.
    mean_line = ax.lines[0]
    at_half = [np.interp(0.5, f, t) for f, t in curves]
    assert np.asarray(mean_line.get_ydata())[100] == pytest.approx(100 * np.mean(at_half))
    assert plot_roc("cnn", [RocSet("keras", "Keras", (), ())], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_differences_figure(tmp_path: Path) -> None:
    rows = [DifferenceRow("cnn", m, seed, v, v - 0.03, v + 0.03)
            for m, v0 in (("accuracy", 0.02), ("auroc", -0.05)) for seed, v in ((0, v0), (1, v0))]
    path = tmp_path / "differences.png"
    fig = plot_differences(rows, path, "Keras - PyTorch", "Keras", "PyTorch")
    assert fig is not None
    assert png_size(path)[0] == 900
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Keras - PyTorch (percentage points; AUROC and kappa x 100)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["accuracy", "auroc"]
    points = [ln for ln in ax.lines if ln.get_marker() in ("o", "s")]
    assert [float(np.asarray(ln.get_xdata())[0]) for ln in points] == pytest.approx(
        [2.0, 2.0, -5.0, -5.0])
    # [-1, 5] contains 0: hollow; [-8, -2] does not: filled.
    assert points[0].get_markerfacecolor() == "white"
    assert points[2].get_markerfacecolor() != "white"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["seed pair 0", "seed pair 1", "hollow: the interval contains 0"]
    assert plot_differences([], tmp_path / "d.png", "t", "A", "B") is None


def test_palette_is_okabe_ito() -> None:
    assert OKABE_ITO == ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7",
                         "#F0E442")
    assert set(BACKEND_COLOURS.values()) <= set(OKABE_ITO)


def test_report_figures_from_an_analysis() -> None:
    from test_report import small_analysis

    from harness.report_figures import _result_rows, figure_specs

    a = small_analysis()
    names = [p.figure.name for p in figure_specs(a)]
    # No training curves for the random baseline, nothing for densenet (no finished run).
    assert names == ["results.png", "roc-baseline.png", "training-cnn.png", "roc-cnn.png",
                     "differences-keras-torch.png"]
    rows = {(r.model, r.metric): r for r in _result_rows(a)}
    assert set(rows) == {("baseline", "accuracy"), ("baseline", "recall"), ("cnn", "accuracy"),
                         ("cnn", "recall")}  # printed claims of models that ran
    paper, keras, torch = rows[("cnn", "accuracy")].points
    assert (paper.value, paper.low, paper.high) == pytest.approx((0.7509, 0.7312, 0.7696),
                                                                 abs=5e-5)
    cell = next(r for r in a.headline if (r.model, r.metric) == ("cnn", "accuracy")).cells[0]
    assert (keras.value, keras.low, keras.high, keras.verdict) == (
        cell.mean, cell.prediction.low, cell.prediction.high, "too few seeds")
    assert torch.source == "torch" and torch.label == "PyTorch: seed mean, 95% prediction interval"
