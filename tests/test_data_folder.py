"""dataset folder and csv: tables, split strategy official, validation.group, the generated
folder layout, DICOM decoding, and every one-line error by its text."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from harness.data import (
    FOLDER_GROUP_PATTERN,
    load_csv_table,
    load_folder_table,
    make_folder_tree,
    prepare_data,
    split_indices,
    summarize_without_cache,
)
from harness.data.cache import _decoders, load_image
from harness.errors import UserError
from harness.spec import DataSpec
from harness.spec.messages import validation_errors, validation_message

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}
PATTERN = r"(person\d+)_"


def _png(path: Path, value: int = 100, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(path)


def _tree(root: Path, layout: dict[str, dict[str, list[str]]]) -> Path:
    """root/<split>/<class>/<name> from {split: {class: [names]}} ("" split: root/<class>/)."""
    for split, classes in layout.items():
        for cls, names in classes.items():
            for i, name in enumerate(names):
                _png(root / split / cls / name, 40 + 10 * i)
    return root


def _chest(root: Path) -> Path:
    return _tree(root, {
        "train": {"NORMAL": ["person1_a.png", "person1_b.png", "person2_a.png"],
                  "PNEUMONIA": ["person3_a.png", "person4_a.png", "person4_b.png"]},
        "test": {"NORMAL": ["person5_a.png"], "PNEUMONIA": ["person6_a.png", "person6_b.png"]},
        "val": {"NORMAL": ["person7_a.png"], "PNEUMONIA": ["person8_a.png"]},
    })


def _spec(**data: Any) -> DataSpec:
    return DataSpec.model_validate({"dataset": "folder", "classes": CLASSES, **data})


class _Wrap(BaseModel):
    data: DataSpec


def _message(**data: Any) -> str:
    raw = {"data": {"dataset": "folder", "classes": CLASSES, **data}}
    with pytest.raises(ValidationError) as err:
        _Wrap.model_validate(raw)
    first = validation_errors(err.value)[0]
    return validation_message(first, raw, "s.yaml")


# ---------------------------------------------------------------------------------------------
# The folder table


def test_folder_table_with_splits_and_patients(tmp_path: Path) -> None:
    table = load_folder_table(_chest(tmp_path), CLASSES, PATTERN)
    assert len(table) == 11
    assert table.groupby("split").size().to_dict() == {"test": 3, "train": 6, "valid": 2}
    assert table.groupby("split")["label"].sum().to_dict() == {"test": 2, "train": 3, "valid": 1}
    row = table.set_index("path").loc["train/PNEUMONIA/person4_b.png"]
    assert (row["label"], row["patient"], row["study"], row["split"]) == (
        1, "person4", "train/PNEUMONIA/person4_b.png", "train")
    assert table["patient"].nunique() == 8
    assert table.attrs["base_dir"] == str(tmp_path.resolve())


def test_flat_folder_is_all_train_and_each_image_its_own_patient(tmp_path: Path) -> None:
    _tree(tmp_path, {"": {"NORMAL": ["a.png", "b.jpeg"], "PNEUMONIA": ["c.png"]}})
    (tmp_path / "NORMAL" / ".DS_Store").write_bytes(b"x")  # hidden: never data
    table = load_folder_table(tmp_path, CLASSES)
    assert list(table["path"]) == ["NORMAL/a.png", "NORMAL/b.jpeg", "PNEUMONIA/c.png"]
    assert list(table["split"]) == ["train"] * 3
    assert list(table["patient"]) == list(table["path"])


@pytest.mark.parametrize(("make", "pattern", "expected"), [
    (lambda r: _png(r / "train" / "CAT" / "x.png"), None,
     "data.classes: class folder {root}/train/CAT is not in data.classes (NORMAL, PNEUMONIA); "
     "add it with its label (0 or 1), or move it out"),
    (lambda r: _png(r / "train" / "loose.png"), None,
     "data.root: 1 image(s) in {root}/train lie outside any class folder, so they have no label "
     "(first: loose.png); move them into one of NORMAL, PNEUMONIA"),
    (lambda r: [p.unlink() for p in (r / "test" / "NORMAL").iterdir()], None,
     "data.root: class folder {root}/test/NORMAL holds no image (.png, .jpg, .jpeg, .dcm, "
     ".dicom); add images or remove the folder"),
    (lambda r: (r / "extra").mkdir(), None,
     "data.root: {root}/extra is not a split folder (train, test, val) beside test, train, val; "
     "move it out, or set data.root to one level where root/<split>/<class>/<images> "
     "(splits train, test, val) or root/<class>/<images>"),
    (lambda r: None, r"(IM-\d+)",
     "data.group_pattern: '(IM-\\\\d+)' matches no file name of the 11 images in {root} (first: "
     "person5_a.png, person6_a.png, person6_b.png); write a regex whose one group is the patient "
     "id in these names, or leave group_pattern out"),
    (lambda r: _png(r / "train" / "NORMAL" / "IM-0001.png"), PATTERN,
     "data.group_pattern: '(person\\\\d+)_' matches no patient in 1 of 12 file names in {root} "
     "(first: train/NORMAL/IM-0001.png); extend the regex (e.g. an alternation inside the one "
     "group) so every image has a patient"),
])
def test_folder_errors(tmp_path: Path, make: Any, pattern: str | None, expected: str) -> None:
    root = _chest(tmp_path / "cx")
    make(root)
    with pytest.raises(UserError) as err:
        load_folder_table(root, CLASSES, pattern)
    assert err.value.message == expected.format(root=root.resolve())


def test_class_without_training_images(tmp_path: Path) -> None:
    _tree(tmp_path, {"train": {"NORMAL": ["a.png"]}, "test": {"PNEUMONIA": ["b.png"]}})
    with pytest.raises(UserError) as err:
        load_folder_table(tmp_path, CLASSES)
    assert err.value.message == (
        f"data.classes: class 'PNEUMONIA' has no image in {tmp_path.resolve()}/train; add its "
        "folder or remove it from data.classes")


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_folder_table(None, CLASSES)
    assert err.value.message.startswith("data.root: not set; dataset folder reads root/<split>/")
    with pytest.raises(UserError) as err:
        load_folder_table(tmp_path / "nope", CLASSES)
    assert err.value.message.startswith(f"data.root: {tmp_path / 'nope'} does not exist or is "
                                        "not a folder")


def test_symlink_leaving_root_is_refused_unless_followed(tmp_path: Path) -> None:
    root = _chest(tmp_path / "cx")
    _png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "train" / "NORMAL" / "person9_a.png")
    with pytest.raises(UserError) as err:
        load_folder_table(root, CLASSES, PATTERN)
    assert err.value.message.startswith(
        f"{root.resolve()}: 1 file(s) are symlinks leading outside the data folder (first: "
        f"train/NORMAL/person9_a.png -> {tmp_path.resolve() / 'outside.png'}); copy the files "
        "in, or set data.follow_symlinks: true")
    assert len(load_folder_table(root, CLASSES, PATTERN, follow_symlinks=True)) == 12


# ---------------------------------------------------------------------------------------------
# The csv table


def _csv_root(tmp_path: Path, text: str) -> Path:
    for name, value in (("a.png", 10), ("b.png", 20), ("sub/c.png", 30), ("d.png", 40)):
        _png(tmp_path / "img" / name, value)
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
    return tmp_path


def _csv(**fields: Any) -> Any:
    return DataSpec.model_validate({"dataset": "csv", "csv": {"file": "labels.csv", **fields}}).csv


def test_csv_table_with_columns(tmp_path: Path) -> None:
    root = _csv_root(tmp_path, "file,y,pid,part\nimg/a.png,NORMAL,p1,train\n"
                                "img/b.png,PNEUMONIA,p1,train\nimg/sub/c.png,NORMAL,p2,test\n"
                                "img/d.png,PNEUMONIA,p3,val\n")
    spec = _csv(path_column="file", label_column="y", patient_column="pid", split_column="part")
    table = load_csv_table(root, spec, classes=CLASSES)
    assert list(table["label"]) == [0, 1, 0, 1]
    assert list(table["patient"]) == ["p1", "p1", "p2", "p3"]
    assert list(table["split"]) == ["train", "train", "test", "valid"]
    assert list(table["study"]) == list(table["path"])


@pytest.mark.parametrize(("text", "fields", "expected"), [
    ("path,label\nimg/a.png,0\n", {"label_column": "y"},
     "data.csv.label_column: column 'y' is not in {root}/labels.csv; its columns: path, label"),
    ("path,label\nimg/a.png,0\nimg/b.png,2\n", {},
     "data.csv.label_column: {root}/labels.csv:3: label '2' must be 0 or 1 (or map names to 0/1 "
     "with data.classes)"),
    ("path,label\n../x.png,0\n", {},
     "data.csv.path_column: {root}/labels.csv:2: path '../x.png' leaves data.root {root}; paths "
     "must be relative to data.root and stay inside it"),
    ("path,label\nimg/a.png,0\nimg/b.png,1\nimg/e.png,1\n", {},
     "{root}/labels.csv: 1 image file(s) are missing under {root} (first: img/e.png); restore "
     "them or fix the paths"),
    ("path,label,s\nimg/a.png,0,train\nimg/b.png,1,holdout\n", {"split_column": "s"},
     "data.csv.split_column: {root}/labels.csv:3: split 'holdout' must be one of train, test, "
     "val, valid"),
    ("path,label\nimg/a.png,0\nimg/b.png,0\n", {},
     "data.csv.label_column: {root}/labels.csv: no training row has label 1; both classes need "
     "training images"),
])
def test_csv_errors(tmp_path: Path, text: str, fields: dict, expected: str) -> None:
    root = _csv_root(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_csv_table(root, _csv(**fields))
    assert err.value.message == expected.format(root=root.resolve())


# ---------------------------------------------------------------------------------------------
# Schema: the new fields' one-line errors


@pytest.mark.parametrize(("data", "expected"), [
    ({"classes": None}, "s.yaml: data.classes: required for dataset folder (class folder name -> "
                        "0 or 1, e.g. {NORMAL: 0, PNEUMONIA: 1})"),
    ({"classes": {"A": 1, "B": 1}}, "s.yaml: data.classes: must map names to 0 and 1, both used "
                                    "(e.g. {NORMAL: 0, PNEUMONIA: 1}); got {'A': 1, 'B': 1}"),
    ({"group_pattern": "person(\\d+"}, "s.yaml: data.group_pattern: is not a valid regular "
     "expression (missing ), unterminated subpattern at position 6); got 'person(\\\\d+'"),
    ({"group_pattern": "(a)(b)"}, "s.yaml: data.group_pattern: must have exactly one group (...) "
                                  "giving the patient; got 2 in '(a)(b)'"),
    ({"dataset": "csv", "classes": None}, "s.yaml: data.csv: required for dataset csv (file, "
                                          "path_column, label_column, ...)"),
    ({"dataset": "mura-v1.1", "classes": None, "group_pattern": "(x)"},
     "s.yaml: data.group_pattern: only for datasets folder and csv (and synthetic with layout "
     "folder); mura-v1.1 has its own labels and patients"),
    ({"validation": {"group": "person"}},
     "s.yaml: data.validation.group: must be one of image, study, patient; got 'person'"),
])
def test_schema_messages(data: dict, expected: str) -> None:
    assert _message(**data) == expected


# ---------------------------------------------------------------------------------------------
# Split strategy official and validation.group


def test_official_split_uses_the_test_folder(tmp_path: Path) -> None:
    spec = _spec(root=str(_chest(tmp_path)), group_pattern=PATTERN,
                 split={"strategy": "official"})
    summary = summarize_without_cache(spec, tmp_path / "cache")
    rows = {r["split"]: r for r in summary.describe()}
    assert (rows["train"]["images"], rows["test"]["images"], rows["val"]["images"]) == (6, 3, 2)
    assert rows["test"]["positives"] == 2
    assert rows["test"]["patient_in_train"] == 0.0


def test_validation_group_keeps_patients_apart() -> None:
    import pandas as pd

    n = 60
    table = pd.DataFrame({
        "path": [f"i{i:03d}.png" for i in range(n)], "label": [i % 2 for i in range(n)],
        "patient": [f"p{i // 3}" for i in range(n)], "study": [f"i{i:03d}" for i in range(n)],
        "split": ["train"] * 50 + ["test"] * 10,
    })
    image = split_indices(table, "official", 0.2, False, 0, "train", 0.3)
    grouped = split_indices(table, "official", 0.2, False, 0, "train", 0.3,
                            validation_group="patient")
    assert list(grouped.test) == list(range(50, 60))
    assert sorted([*grouped.train, *grouped.val]) == list(range(50))
    assert grouped.leakage_val.patient == 0.0
    assert image.leakage_val.patient > 0.5  # images of one patient on both sides
    with pytest.raises(UserError, match=r"^data.validation.source: 'official' but the dataset "
                                        r"has no validation part"):
        split_indices(table, "official", 0.2, False, 0, "official", 0.1)


def test_official_split_on_mura_tests_on_the_valid_set(tmp_path: Path) -> None:
    spec = DataSpec.model_validate({
        "dataset": "synthetic", "image_size": 16, "split": {"strategy": "official"},
        "validation": {"source": "train", "group": "patient"},
        "synthetic": {"patients": 20, "min_size": 32, "max_size": 48},
    })
    summary = summarize_without_cache(spec, tmp_path)
    table, split = summary.table, summary.split
    assert set(table["split"].to_numpy()[split.test]) == {"valid"}
    assert len(split.test) == int((table["split"] == "valid").sum())
    assert split.leakage_val.patient == 0.0
    official = spec.model_copy(update={"validation": spec.validation.model_copy(
        update={"source": "official"})})
    with pytest.raises(UserError) as err:
        summarize_without_cache(official, tmp_path)
    assert err.value.message.startswith(
        "data.validation.source: 'official' is MURA's valid set, which split.strategy 'official' "
        "already uses as the test set; use data.validation.source: train")


def test_official_split_without_a_test_folder(tmp_path: Path) -> None:
    _tree(tmp_path, {"": {"NORMAL": ["a.png"], "PNEUMONIA": ["b.png"]}})
    spec = _spec(root=str(tmp_path), split={"strategy": "official"})
    with pytest.raises(UserError) as err:
        summarize_without_cache(spec, tmp_path / "cache")
    assert err.value.message.startswith(
        "data.split.strategy: 'official' but the dataset has no test part of its own")


# ---------------------------------------------------------------------------------------------
# Generated folder layout, cache


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_generated_folder_tree_same_seed_same_bytes(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"patients": 12, "seed": 3, "min_size": 32, "max_size": 48,
                          "valid_fraction": 0.1, "test_fraction": 0.25}
    a = make_folder_tree(tmp_path / "a", workers=1, **kw)
    b = make_folder_tree(tmp_path / "b", workers=2, **kw)
    assert _digest(a) == _digest(b)
    assert sorted(p.name for p in a.iterdir()) == ["test", "train", "val"]
    table = load_folder_table(a, CLASSES, FOLDER_GROUP_PATTERN)
    by_split = table.groupby("split")["patient"].nunique().to_dict()
    assert by_split == {"test": 3, "train": 8, "valid": 1}  # 25% and 10% of 12 patients
    no_val = make_folder_tree(tmp_path / "c", workers=1, **{**kw, "valid_fraction": 0.0})
    assert sorted(p.name for p in no_val.iterdir()) == ["test", "train"]
    with pytest.raises(UserError) as err:
        make_folder_tree(a, **kw)
    assert err.value.message.startswith(f"{a / 'train'}: already exists; make-data never "
                                        "overwrites data")


def test_cache_keys_on_the_folder_dataset_contents(tmp_path: Path) -> None:
    root = _chest(tmp_path / "cx")
    spec = _spec(root=str(root), group_pattern=PATTERN, image_size=8,
                 split={"strategy": "official"})
    first = prepare_data(spec, tmp_path / "cache", progress=False)
    assert first is not None and len(first.cache) == 11
    image = root / "test" / "NORMAL" / "person5_a.png"
    _png(image, value=200, size=14)  # other pixels, other size
    second = prepare_data(spec, tmp_path / "cache", progress=False)
    assert second is not None
    assert second.cache.key != first.cache.key
    assert second.data_hash != first.data_hash
    row = list(second.cache.paths).index("test/NORMAL/person5_a.png")
    assert int(second.cache.images[row].min()) == 200


# ---------------------------------------------------------------------------------------------
# DICOM


def _dicom(path: Path, pixels: np.ndarray, bits: int, photometric: str) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("photometric", "expected"), [
    ("MONOCHROME2", [0, 64, 128, 255]),  # 0, 1028, 2056, 4095 of 12 bits: round(v * 255 / 4095)
    ("MONOCHROME1", [255, 191, 127, 0]),  # 0 is white
])
def test_dicom_scaled_from_stored_bits(tmp_path: Path, photometric: str, expected: list) -> None:
    path = tmp_path / "x.dcm"
    _dicom(path, np.array([[0, 1028], [2056, 4095]]), 12, photometric)
    pixels, w, h = load_image(path, 2, "nearest")
    assert (w, h) == (2, 2)
    assert pixels.ravel().tolist() == expected


def test_dicom_in_a_folder_dataset(tmp_path: Path) -> None:
    _dicom(tmp_path / "NORMAL" / "a.dcm", np.full((4, 4), 1000), 12, "MONOCHROME2")
    _png(tmp_path / "PNEUMONIA" / "b.png")
    table = load_folder_table(tmp_path, CLASSES)
    assert list(table["path"]) == ["NORMAL/a.dcm", "PNEUMONIA/b.png"]
    pixels, _, _ = load_image(tmp_path / "NORMAL" / "a.dcm", 4, "bilinear")
    assert pixels.ravel().tolist() == [62] * 16  # round(1000 * 255 / 4095)
    import pydicom

    # the cache key holds the decoder's version, as it makes these pixels; PNGs alone do not
    assert _decoders(table) == {"pydicom": pydicom.__version__}
    assert _decoders(table.iloc[1:]) == {}


# ---------------------------------------------------------------------------------------------
# The command line: make-data --layout folder, validate catches a bad folder before any worker


def _harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_make_data_folder_then_validate_refuses_a_stray_class(tmp_path: Path) -> None:
    out = tmp_path / "cx"
    proc = _harness("make-data", str(out), "--layout", "folder", "--patients", "10",
                    "--min-size", "32", "--max-size", "40", "--classes", "NORMAL,PNEUMONIA")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["NORMAL", "PNEUMONIA"]
    _png(out / "train" / "COVID" / "person99_x_1.png")
    proc = _harness("validate", "specs/chest-xray.yaml", "--set", f"data.root={out}",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "res"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: specs/chest-xray.yaml: data.classes: class folder {out}/train/COVID is not in "
        "data.classes (NORMAL, PNEUMONIA)")


def test_synthetic_folder_layout_is_read_as_a_folder_dataset(tmp_path: Path) -> None:
    spec = DataSpec.model_validate({
        "dataset": "synthetic", "image_size": 16, "split": {"strategy": "official"},
        "validation": {"source": "official"},
        "synthetic": {"layout": "folder", "patients": 20, "min_size": 32, "max_size": 40,
                      "test_fraction": 0.2, "valid_fraction": 0.1},
    })
    summary = summarize_without_cache(spec, tmp_path)
    rows = {r["split"]: r for r in summary.describe()}
    assert (rows["test"]["patients"], rows["val"]["patients"], rows["train"]["patients"]) == (
        4, 2, 14)
    assert rows["test"]["patient_in_train"] == 0.0
    assert set(summary.table["study_type"]) == {"NORMAL", "PNEUMONIA"}
    assert summary.table["path"].str.endswith(".jpeg").all()
