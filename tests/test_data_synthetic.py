"""Synthetic MURA tree: layout, determinism (also in parallel), label noise, cached generation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import SMALL, data_spec, shared_tree
from PIL import Image

import harness.data.synthetic as synthetic
from harness.data.mura import load_mura_table
from harness.data.synthetic import COMPLETE_MARKER, ensure_synthetic, make_mura_tree
from harness.errors import UserError


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_serial_and_parallel(tmp_path):
    params = {**SMALL, "patients": 12}
    a = _digest(make_mura_tree(tmp_path / "a", workers=1, **params))
    b = _digest(make_mura_tree(tmp_path / "b", workers=2, **params))
    assert len(a) > 30 and a == b
    c = _digest(make_mura_tree(tmp_path / "c", workers=1, **{**params, "seed": 1}))
    assert a != c


def test_layout_and_csv_format(tmp_path_factory):
    root = shared_tree(tmp_path_factory)
    data = root / "MURA-v1.1"
    studies = (data / "train_labeled_studies.csv").read_text().splitlines()
    assert studies[0].startswith("MURA-v1.1/train/XR_WRIST/patient")
    assert all(ln.endswith(("/,0", "/,1")) for ln in studies)
    images = (data / "valid_image_paths.csv").read_text().splitlines()
    assert all(ln.startswith("MURA-v1.1/valid/XR_WRIST/") and ln.endswith(".png") for ln in images)

    table = load_mura_table(root, ["WRIST"])
    per_patient = table.groupby("patient")["study"].nunique()
    assert per_patient.between(1, 3).all() and (per_patient > 1).any()
    per_study = table.groupby("study").size()
    assert per_study.between(1, 5).all() and (per_study >= 3).any()
    valid_patients = table.loc[table.split == "valid", "patient"].unique()
    assert len(valid_patients) == round(0.15 * SMALL["patients"])
    assert set(valid_patients).isdisjoint(table.loc[table.split == "train", "patient"])
    positive_share = table.groupby("study")["label"].first().mean()
    assert 0.2 < positive_share < 0.6

    sizes = set()
    for rel in table["path"][:40]:
        with Image.open(root / rel) as im:
            assert im.mode == "L" and im.format == "PNG"
            assert SMALL["min_size"] <= min(im.size) and max(im.size) <= SMALL["max_size"]
            sizes.add(im.size)
    assert len(sizes) > 10


def test_label_noise_flips_labels_not_images(tmp_path):
    params = {**SMALL, "patients": 10}
    clean = make_mura_tree(tmp_path / "clean", workers=1, label_noise=0.0, **params)
    noisy = make_mura_tree(tmp_path / "noisy", workers=1, label_noise=1.0, **params)
    a = load_mura_table(clean, ["WRIST"])
    b = load_mura_table(noisy, ["WRIST"])
    assert (a["study"] == b["study"]).all()
    assert (b["label"] == 1 - a["label"]).all()
    for pa, pb in zip(a["path"][:10], b["path"][:10], strict=True):
        assert (clean / pa).read_bytes() == (noisy / pb).read_bytes()


def test_several_parts_share_patient_ids(tmp_path):
    root = make_mura_tree(tmp_path, workers=1, **{**SMALL, "patients": 20},
                          body_parts=("WRIST", "ELBOW"))
    both = load_mura_table(root, ["WRIST", "ELBOW"])
    assert set(both["study_type"]) == {"XR_WRIST", "XR_ELBOW"}
    wrist = load_mura_table(root, ["WRIST"])
    assert set(wrist["study_type"]) == {"XR_WRIST"}
    per_patient = both.groupby("patient")["study_type"].nunique()
    assert (per_patient > 1).any()


def test_abnormal_images_carry_a_small_sign():
    # The same image drawn with and without the sign differs only on a small area.
    changed = []
    for image in range(1, 9):
        args = ("x.png", 0, 3, 101, image, "WRIST")
        with_sign = synthetic.render_image(synthetic._ImageJob(*args, True, 200, 200, 0.5))
        without = synthetic.render_image(synthetic._ImageJob(*args, False, 200, 200, 0.5))
        changed.append(float(np.mean(with_sign != without)))
    shown = [c for c in changed if c > 0]
    assert len(shown) >= 5  # SIGN_SHOWN < 1: some views miss the finding
    # Signs scale with the image so they survive the resize to 64 px; still a small area.
    assert all(c < 0.10 for c in shown)


def test_bad_parameters():
    with pytest.raises(UserError, match=r"max_size 600 must satisfy"):
        make_mura_tree("/nonexistent", max_size=600)
    with pytest.raises(UserError, match=r"data.synthetic.label_noise: got 2"):
        make_mura_tree("/nonexistent", label_noise=2)


def test_ensure_synthetic_generates_once(tmp_path, monkeypatch):
    spec = data_spec()
    root = ensure_synthetic(spec.synthetic, spec.body_parts, tmp_path)
    assert (root / COMPLETE_MARKER).is_file() and (root / "MURA-v1.1").is_dir()
    assert root.parent == tmp_path / "synthetic"
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".tmp")]

    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "make_mura_tree", boom)
    assert ensure_synthetic(spec.synthetic, spec.body_parts, tmp_path) == root
    spec.synthetic.seed = 1
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_synthetic(spec.synthetic, spec.body_parts, tmp_path)
    # The failed attempt leaves no temp folder behind.
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_ensure_synthetic_ignores_incomplete_folder(tmp_path):
    spec = data_spec()
    root = ensure_synthetic(spec.synthetic, spec.body_parts, tmp_path / "a")
    partial = tmp_path / "b" / "synthetic" / root.name
    (partial / "MURA-v1.1").mkdir(parents=True)
    again = ensure_synthetic(spec.synthetic, spec.body_parts, tmp_path / "b")
    assert again == partial and (again / COMPLETE_MARKER).is_file()
    assert _digest(again / "MURA-v1.1") == _digest(root / "MURA-v1.1")
