"""Image tables of datasets the user lays out: class folders (`folder`) or a table (`csv`).

    table = load_folder_table("/data/chest_xray", {"NORMAL": 0, "PNEUMONIA": 1}, r"(person\\d+)")
    table = load_csv_table("/data/x", spec.data.csv, classes=None, group_pattern=None)
    table.attrs["base_dir"]     # the root; `path` is relative to it

Same columns as MURA's table (harness.data.mura.COLUMNS): path, label, patient, study,
study_type (the class name), split ("train" | "test" | "valid"). A folder is
root/<split>/<class>/<images> (splits train, test, val or valid) or root/<class>/<images> (all
train). The patient comes from `group_pattern` (one regex group, searched in the file name), a
csv column, or is the image itself; the study is a csv column or the image itself. Every file
must stay inside the root (symlinks too, unless data.follow_symlinks); every problem is a
one-line UserError naming the field, the file and what to do.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from harness.data.mura import COLUMNS, refuse_outside
from harness.errors import UserError
from harness.vocab import IMAGE_SUFFIXES

# split folder / csv value -> the table's split name
SPLIT_NAMES = {"train": "train", "test": "test", "val": "valid", "valid": "valid"}
DICOM_SUFFIXES = (".dcm", ".dicom")
FOLDER_LAYOUT = "root/<split>/<class>/<images> (splits train, test, val) or root/<class>/<images>"


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n])


def _resolve_root(root: str | Path | None, dataset: str) -> Path:
    what = FOLDER_LAYOUT if dataset == "folder" else "the csv file and the images it lists"
    if root is None or str(root) == "":
        raise UserError(
            f"data.root: not set; dataset {dataset} reads {what}: set data.root in the spec "
            "or pass --set data.root=DIR"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(
            f"data.root: {path} does not exist or is not a folder; dataset {dataset} reads {what}"
        )
    return path.resolve()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _visible(names: list[str]) -> list[str]:
    # archives carry stray hidden files (.DS_Store, ._x.jpeg); never data
    return sorted(n for n in names if not n.startswith("."))


def _images_under(folder: Path, follow_symlinks: bool) -> tuple[list[Path], int]:
    """Image files below folder (sorted) and the count of other files left out."""
    images: list[Path] = []
    other = 0
    for here, dirs, files in os.walk(folder, followlinks=follow_symlinks):
        dirs[:] = _visible(dirs)
        for name in _visible(files):
            if _is_image(name):
                images.append(Path(here) / name)
            else:
                other += 1
    return sorted(images), other


def _patient(pattern: re.Pattern[str] | None, path: str) -> str | None:
    if pattern is None:
        return path
    m = pattern.search(PurePosixPath(path).name)
    return m.group(1) if m and m.group(1) else None


def _apply_groups(rows: list[dict], pattern: str | None, where: str) -> None:
    """Fill each row's patient from the pattern (rows that already have one keep it)."""
    compiled = re.compile(pattern) if pattern is not None else None
    unmatched = []
    for r in rows:
        if r.get("patient"):
            continue
        r["patient"] = _patient(compiled, r["path"])
        if r["patient"] is None:
            unmatched.append(r["path"])
    if unmatched and len(unmatched) == len(rows):
        raise UserError(
            f"data.group_pattern: {pattern!r} matches no file name of the {len(rows)} images in "
            f"{where} (first: {_first([PurePosixPath(p).name for p in unmatched])}); write a regex "
            "whose one group is the patient id in these names, or leave group_pattern out"
        )
    if unmatched:
        raise UserError(
            f"data.group_pattern: {pattern!r} matches no patient in {len(unmatched)} of "
            f"{len(rows)} file names in {where} (first: {_first(unmatched)}); extend the regex "
            "(e.g. an alternation inside the one group) so every image has a patient"
        )


def load_folder_table(
    root: str | Path | None,
    classes: Mapping[str, int],
    group_pattern: str | None = None,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """The image table of root/<split>/<class>/<images> or root/<class>/<images>."""
    base = _resolve_root(root, "folder")
    allowed = ", ".join(classes)
    top = _visible([e.name for e in os.scandir(base) if e.is_dir()])
    loose = [n for n in _visible([e.name for e in os.scandir(base) if e.is_file()]) if _is_image(n)]
    split_dirs = [n for n in top if n.lower() in SPLIT_NAMES]
    if split_dirs:
        other = [n for n in top if n.lower() not in SPLIT_NAMES]
        if other:
            raise UserError(
                f"data.root: {base / other[0]} is not a split folder (train, test, val) beside "
                f"{', '.join(split_dirs)}; move it out, or set data.root to one level where "
                f"{FOLDER_LAYOUT}"
            )
        parts = [(base / n, SPLIT_NAMES[n.lower()]) for n in split_dirs]
    else:
        parts = [(base, "train")]
    if loose:
        raise UserError(
            f"data.root: {len(loose)} image(s) in {base} lie outside any class folder, so they "
            f"have no label (first: {_first(loose)}); the layout is {FOLDER_LAYOUT}"
        )
    rows: list[dict[str, Any]] = []
    left_out = 0
    for folder, split in parts:
        if folder != base:
            loose = [n for n in _visible(os.listdir(folder)) if _is_image(n)
                     and (folder / n).is_file()]
            if loose:
                raise UserError(
                    f"data.root: {len(loose)} image(s) in {folder} lie outside any class folder, "
                    f"so they have no label (first: {_first(loose)}); move them into one of "
                    f"{allowed}"
                )
        names = _visible([e.name for e in os.scandir(folder) if e.is_dir()])
        if not names:
            raise UserError(
                f"data.root: {folder} holds no class folder; expected {allowed} ({FOLDER_LAYOUT})"
            )
        for name in names:
            if name not in classes:
                raise UserError(
                    f"data.classes: class folder {folder / name} is not in data.classes "
                    f"({allowed}); add it with its label (0 or 1), or move it out"
                )
            images, n_other = _images_under(folder / name, follow_symlinks)
            left_out += n_other
            if not images:
                raise UserError(
                    f"data.root: class folder {folder / name} holds no image "
                    f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
                )
            for image in images:
                rel = image.relative_to(base).as_posix()
                rows.append({"path": rel, "label": int(classes[name]), "patient": None,
                             "study": rel, "study_type": name, "split": split})
    if left_out:
        print(f"note: {base}: {left_out} file(s) in class folders are not images "
              f"({', '.join(IMAGE_SUFFIXES)}) and were left out", file=sys.stderr)
    for name in classes:
        if not any(r["study_type"] == name and r["split"] == "train" for r in rows):
            where = f"{base}/train" if split_dirs else str(base)
            raise UserError(
                f"data.classes: class {name!r} has no image in {where}; add its folder or "
                "remove it from data.classes"
            )
    _apply_groups(rows, group_pattern, str(base))
    return _finish(rows, base, follow_symlinks, str(base))


def _read_csv(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise UserError(
            f"data.csv.file: {csv_path} does not exist; name a csv file under data.root"
        )
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                           encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"data.csv.file: {csv_path}: cannot read the table ({text})") from None


def load_csv_table(
    root: str | Path | None,
    csv_spec: Any,
    classes: Mapping[str, int] | None = None,
    group_pattern: str | None = None,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """The image table of a csv of paths (relative to root) and labels; see the module doc."""
    base = _resolve_root(root, "csv")
    csv_path = Path(csv_spec.file)
    csv_path = csv_path if csv_path.is_absolute() else base / csv_path
    frame = _read_csv(csv_path)
    columns = list(frame.columns)
    for field in ("path_column", "label_column", "patient_column", "study_column",
                  "split_column"):
        name = getattr(csv_spec, field)
        if name is not None and name not in columns:
            raise UserError(
                f"data.csv.{field}: column {name!r} is not in {csv_path}; its columns: "
                f"{', '.join(map(str, columns)) or 'none'}"
            )
    if frame.empty:
        raise UserError(f"data.csv.file: {csv_path} has no rows")
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(frame.to_dict("records")):
        line = f"{csv_path}:{i + 2}"  # line 1 is the header
        path = str(rec[csv_spec.path_column]).strip()
        if not path:
            raise UserError(f"data.csv.path_column: {line}: empty path")
        norm = os.path.normpath(path)
        if os.path.isabs(path) or norm == ".." or norm.startswith(".." + os.sep):
            raise UserError(
                f"data.csv.path_column: {line}: path {path!r} leaves data.root {base}; paths "
                "must be relative to data.root and stay inside it"
            )
        text = str(rec[csv_spec.label_column]).strip()
        if classes is not None:
            if text not in classes:
                raise UserError(
                    f"data.classes: {line}: label {text!r} is not in data.classes "
                    f"({', '.join(classes)})"
                )
            label = int(classes[text])
        elif text in ("0", "1"):
            label = int(text)
        else:
            raise UserError(
                f"data.csv.label_column: {line}: label {text!r} must be 0 or 1 (or map names to "
                "0/1 with data.classes)"
            )
        split = "train"
        if csv_spec.split_column is not None:
            value = str(rec[csv_spec.split_column]).strip()
            if value.lower() not in SPLIT_NAMES:
                raise UserError(
                    f"data.csv.split_column: {line}: split {value!r} must be one of "
                    f"{', '.join(SPLIT_NAMES)}"
                )
            split = SPLIT_NAMES[value.lower()]
        row = {"path": PurePosixPath(norm.replace(os.sep, "/")).as_posix(), "label": label,
               "patient": None, "study": None, "study_type": text, "split": split}
        for field, column in (("patient", csv_spec.patient_column),
                              ("study", csv_spec.study_column)):
            if column is not None:
                value = str(rec[column]).strip()
                if not value:
                    raise UserError(f"data.csv.{field}_column: {line}: empty {field}")
                row[field] = value
        row["study"] = row["study"] or row["path"]
        rows.append(row)
    for label in (0, 1):
        if not any(r["label"] == label and r["split"] == "train" for r in rows):
            raise UserError(
                f"data.csv.label_column: {csv_path}: no training row has label {label}; both "
                "classes need training images"
            )
    _apply_groups(rows, group_pattern, str(csv_path))
    return _finish(rows, base, follow_symlinks, str(csv_path))


def _finish(rows: list[dict], base: Path, follow_symlinks: bool, where: str) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    dupes = table["path"][table["path"].duplicated()].tolist()
    if dupes:
        raise UserError(f"{where}: {len(dupes)} image path(s) listed twice (first: "
                        f"{_first(dupes)})")
    missing = [p for p in table["path"] if not os.path.isfile(base / p)]
    if missing:
        raise UserError(
            f"{where}: {len(missing)} image file(s) are missing under {base} (first: "
            f"{_first(missing)}); restore them or fix the paths"
        )
    bad = [p for p in table["path"] if not _is_image(p)]
    if bad:
        raise UserError(
            f"{where}: {len(bad)} file(s) are not PNG, JPEG or DICOM by name (first: "
            f"{_first(bad)}); allowed suffixes: {', '.join(IMAGE_SUFFIXES)}"
        )
    dicom = [p for p in table["path"] if p.lower().endswith(DICOM_SUFFIXES)]
    if dicom:
        try:
            import pydicom  # noqa: F401  (optional extra)
        except ImportError:
            raise UserError(
                f"{where}: {len(dicom)} DICOM file(s) (first: {_first(dicom, 1)}) need pydicom: "
                "pip install 'repro-harness[dicom]' (or pip install pydicom)"
            ) from None
    if not follow_symlinks:
        refuse_outside(base, base, table["path"])
    table["label"] = table["label"].astype("int64")
    table.attrs["base_dir"] = str(base)
    return table
