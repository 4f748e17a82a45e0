"""MURA v1.1 image table, read from the dataset's four CSVs (never by globbing).

    table = load_mura_table("/data", ("WRIST",))   # or root=None -> $MURA_ROOT
    table.attrs["base_dir"]                        # folder that CONTAINS MURA-v1.1

Returns one row per image: path (relative to the base folder, as in the CSVs), label (0/1, from
the study), patient, study ("train/XR_WRIST/patient00006/study1"), study_type ("XR_WRIST"),
split ("train" | "valid"). Every inconsistency between CSVs, folder names and files on disk is a
`UserError` that names the file and what to do.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from harness.errors import UserError
from harness.vocab import BODY_PARTS

DATASET_DIR = "MURA-v1.1"
SPLITS = ("train", "valid")
MURA_URL = "https://stanfordaimi.azurewebsites.net/datasets/3e00d84b-d86e-4fed-b2a4-bfe3effd661b"
LAYOUT = (
    "MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/study<k>_<positive|negative>/image<j>.png "
    "plus MURA-v1.1/{train,valid}_image_paths.csv and {train,valid}_labeled_studies.csv"
)
WHERE_FROM = (
    f"MURA v1.1 comes from Stanford AIMI after registration ({MURA_URL}); expected layout: "
    f"{LAYOUT}; set data.root in the spec or the MURA_ROOT environment variable to the folder "
    "that contains MURA-v1.1 (or to MURA-v1.1 itself); specs/demo.yaml runs the same models on "
    "generated data without MURA"
)
COLUMNS = ("path", "label", "patient", "study", "study_type", "split")


def image_csv_name(split: str) -> str:
    return f"{split}_image_paths.csv"


def study_csv_name(split: str) -> str:
    return f"{split}_labeled_studies.csv"


def resolve_mura_root(root: Path | str | None) -> Path:
    """Return the folder that contains MURA-v1.1, from data.root or $MURA_ROOT."""
    source = "data.root"
    if root is None or str(root) == "":
        root = os.environ.get("MURA_ROOT") or None
        source = "MURA_ROOT"
        if root is None:
            raise UserError(
                "data.root: not set and MURA_ROOT is not set, so MURA v1.1 cannot be found",
                hint=WHERE_FROM,
            )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"{source}: {path} does not exist or is not a folder", hint=WHERE_FROM)
    if (path / DATASET_DIR).is_dir():
        return path.resolve()
    if path.name == DATASET_DIR or (path / image_csv_name("train")).is_file():
        if path.name != DATASET_DIR:
            raise UserError(
                f"{source}: {path} holds the MURA CSVs but is not named {DATASET_DIR}; the CSV "
                f"paths start with {DATASET_DIR}/, so rename the folder to {DATASET_DIR}",
                hint=WHERE_FROM,
            )
        return path.resolve().parent
    raise UserError(
        f"{source}: {path} contains no {DATASET_DIR} folder and is not one", hint=WHERE_FROM
    )


def _read_lines(csv_path: Path) -> list[tuple[int, str]]:
    """Non-empty lines with their 1-based line numbers; a header line is dropped."""
    if not csv_path.is_file():
        raise UserError(
            f"{csv_path}: CSV file missing; a complete MURA v1.1 copy has "
            "train_image_paths.csv, train_labeled_studies.csv, valid_image_paths.csv and "
            "valid_labeled_studies.csv",
            hint=WHERE_FROM,
        )
    try:
        blob = csv_path.read_bytes()
    except PermissionError:
        raise UserError(
            f"{csv_path}: permission denied reading the CSV; make it readable by this user "
            "(e.g. chmod a+r)"
        ) from None
    except OSError as e:
        raise UserError(
            f"{csv_path}: cannot read the CSV ({e.strerror or e}); restore the file or "
            "re-extract the archive"
        ) from None
    try:  # utf-8-sig drops a byte-order mark
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise UserError(
            f"{csv_path}:{line}: not UTF-8 text (byte 0x{blob[e.start]:02x}); MURA's CSVs are "
            "plain ASCII: restore the file or re-extract the archive"
        ) from None
    # splitlines() handles CRLF and CR line ends
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln]
    if lines and _is_header(lines[0][1]):
        # MURA's own CSVs have no header; a copy saved by a spreadsheet may have one
        print(f"note: {csv_path}:{lines[0][0]}: header line {lines[0][1]!r} skipped",
              file=sys.stderr)
        lines = lines[1:]
    return lines


_HEADER_FIELD = re.compile(r"^[A-Za-z][A-Za-z_ ]*$")


def _is_header(line: str) -> bool:
    """A line of column names (`Path`, `path,label`, `image_path`): words, no path, no digit.
    Anything else, a mistyped first row included, is data and is checked as such."""
    fields = [f.strip().strip('"') for f in line.split(",")]
    return 1 <= len(fields) <= 2 and all(_HEADER_FIELD.match(f) for f in fields)


def _parse_study_dir(csv_path: Path, line_no: int, text: str, split: str) -> tuple[str, ...]:
    """Split 'MURA-v1.1/<split>/XR_<PART>/patientN/studyK_<pos|neg>' into its parts."""
    parts = PurePosixPath(text.rstrip("/")).parts
    if (
        len(parts) != 5
        or parts[0] != DATASET_DIR
        or not parts[2].startswith("XR_")
        or not parts[3].startswith("patient")
        or not parts[4].startswith("study")
    ):
        raise UserError(
            f"{csv_path}:{line_no}: path {text!r} does not follow {DATASET_DIR}/{split}/XR_<PART>/"
            "patientNNNNN/study<k>_<positive|negative>/..."
        )
    if parts[1] != split:
        raise UserError(
            f"{csv_path}:{line_no}: path {text!r} is in split {parts[1]!r} but this CSV lists "
            f"the {split!r} split"
        )
    return parts


def _folder_label(study_folder: str) -> int | None:
    if study_folder.endswith("_positive"):
        return 1
    if study_folder.endswith("_negative"):
        return 0
    return None


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n])


def _load_split(base: Path, split: str, parts_wanted: set[str]) -> tuple[list[dict], set[str]]:
    data_dir = base / DATASET_DIR
    images_csv = data_dir / image_csv_name(split)
    studies_csv = data_dir / study_csv_name(split)
    parts_found: set[str] = set()

    labels: dict[str, int] = {}
    for line_no, line in _read_lines(studies_csv):
        path_text, sep, label_text = line.rpartition(",")
        if not sep or label_text.strip() not in ("0", "1"):
            raise UserError(
                f"{studies_csv}:{line_no}: expected '<study folder>/,<0|1>', got {line!r}"
            )
        parts = _parse_study_dir(studies_csv, line_no, path_text.strip(), split)
        parts_found.add(parts[2][3:])
        if parts[2][3:] not in parts_wanted:
            continue
        study_dir = "/".join(parts)
        label = int(label_text)
        folder_label = _folder_label(parts[4])
        if folder_label is not None and folder_label != label:
            raise UserError(
                f"{studies_csv}:{line_no}: study {study_dir} has label {label} in the CSV but its "
                f"folder says {'positive' if folder_label else 'negative'}; fix the CSV or the "
                "folder name"
            )
        labels[study_dir] = label

    rows: list[dict] = []
    for line_no, line in _read_lines(images_csv):
        path_text = line.split(",", 1)[0].strip()
        parts = _parse_study_dir(images_csv, line_no, str(PurePosixPath(path_text).parent), split)
        parts_found.add(parts[2][3:])
        if parts[2][3:] not in parts_wanted:
            continue
        study_dir = "/".join(parts)
        study_name = parts[4].rsplit("_", 1)[0] if _folder_label(parts[4]) is not None else parts[4]
        rows.append(
            {
                "path": path_text,
                "study_dir": study_dir,
                "patient": parts[3],
                "study": f"{split}/{parts[2]}/{parts[3]}/{study_name}",
                "study_type": parts[2],
                "split": split,
            }
        )

    unlabeled = sorted({r["study_dir"] for r in rows} - labels.keys())
    if unlabeled:
        raise UserError(
            f"{images_csv}: {len(unlabeled)} study folder(s) have images but no line in "
            f"{studies_csv.name} (first: {_first(unlabeled)}); the CSVs do not belong together"
        )
    empty = sorted(labels.keys() - {r["study_dir"] for r in rows})
    if empty:
        raise UserError(
            f"{studies_csv}: {len(empty)} labeled stud(ies) have no image in {images_csv.name} "
            f"(first: {_first(empty)}); the CSVs do not belong together"
        )
    for r in rows:
        r["label"] = labels[r.pop("study_dir")]
    return rows, parts_found


def _check_files_exist(base: Path, paths: Iterable[str]) -> None:
    missing: list[str] = []
    denied: list[str] = []
    for p in paths:
        if not os.path.isfile(base / p):  # isfile() says False for a permission error too
            (denied if _permission_denied(base / p) else missing).append(p)
    if denied:
        raise UserError(
            f"{base / DATASET_DIR}: permission denied for {len(denied)} image file(s) listed in "
            f"the CSVs (first: {_first(denied)}); make the files and their folders readable "
            "by this user (e.g. chmod -R a+rX)"
        )
    if missing:
        raise UserError(
            f"{base / DATASET_DIR}: {len(missing)} image file(s) listed in the CSVs are missing "
            f"(first: {_first(missing)}); restore the files or re-extract the archive"
        )


def _permission_denied(path: Path) -> bool:
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def refuse_outside(folder: Path, base: Path, paths: Iterable[str]) -> None:
    """Refuse files (base/path) whose real path, symlinks followed, leaves `folder`."""
    inside = os.path.realpath(folder) + os.sep
    outside = []
    for p in paths:
        real = os.path.realpath(base / p)
        if not real.startswith(inside):
            outside.append(f"{p} -> {real}")
    if outside:
        raise UserError(
            f"{folder}: {len(outside)} file(s) are symlinks leading outside the data "
            f"folder (first: {_first(outside, 1)}); copy the files in, or set "
            "data.follow_symlinks: true to read them where they lead"
        )


def _check_inside(base: Path, paths: Iterable[str]) -> None:
    """Refuse files (CSVs, images) whose real path, symlinks followed, leaves MURA-v1.1/."""
    refuse_outside(base / DATASET_DIR, base, paths)


def load_mura_table(
    root: Path | str | None,
    body_parts: Sequence[str],
    splits: Sequence[str] = SPLITS,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """Read the image table of the given body parts and splits; `.attrs["base_dir"]` is the root."""
    wanted = {p.upper().removeprefix("XR_") for p in body_parts}
    unknown = sorted(wanted - set(BODY_PARTS))
    if unknown or not wanted:
        raise UserError(
            f"data.body_parts: got {list(body_parts)}; allowed: {', '.join(BODY_PARTS)}"
        )
    bad_splits = [s for s in splits if s not in SPLITS]
    if bad_splits:
        raise UserError(f"splits: got {bad_splits}; allowed: {', '.join(SPLITS)}")
    base = resolve_mura_root(root)

    rows: list[dict] = []
    found: set[str] = set()
    for split in splits:
        split_rows, split_found = _load_split(base, split, wanted)
        rows.extend(split_rows)
        found |= split_found
    missing_parts = sorted(wanted - {r["study_type"][3:] for r in rows})
    if missing_parts:
        raise UserError(
            f"data.body_parts: no images for {', '.join(missing_parts)} in {base / DATASET_DIR} "
            f"(splits {', '.join(splits)}); parts found: {', '.join(sorted(found)) or 'none'}"
        )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    dupes = table["path"][table["path"].duplicated()].tolist()
    if dupes:
        raise UserError(
            f"{base / DATASET_DIR}: {len(dupes)} image path(s) listed twice in the CSVs "
            f"(first: {_first(dupes)})"
        )
    _check_files_exist(base, table["path"])
    if not follow_symlinks:
        csvs = [f"{DATASET_DIR}/{name(s)}" for s in splits for name in (image_csv_name,
                                                                        study_csv_name)]
        _check_inside(base, [*csvs, *table["path"]])
    table["label"] = table["label"].astype("int64")
    table.attrs["base_dir"] = str(base)
    return table
