"""MURA table loader: counts against the generated tree, format tolerance, every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from data_fixtures import copy_tree, shared_tree

from harness.data.mura import MURA_URL, load_mura_table
from harness.errors import UserError

DATA = "MURA-v1.1"


@pytest.fixture
def tree(tmp_path_factory):
    return shared_tree(tmp_path_factory)


@pytest.fixture
def own_tree(tree, tmp_path):
    return copy_tree(tree, tmp_path / "copy")


def _walk(root: Path) -> dict[str, int]:
    """Image path -> label from the folders on disk (independent of the CSVs)."""
    found = {}
    for png in sorted((root / DATA).rglob("image*.png")):
        rel = png.relative_to(root).as_posix()
        found[rel] = 1 if png.parent.name.endswith("_positive") else 0
    return found


def test_table_matches_files_on_disk(tree):
    table = load_mura_table(tree, ["WRIST"])
    assert list(table.columns) == ["path", "label", "patient", "study", "study_type", "split"]
    assert table.attrs["base_dir"] == str(tree.resolve())
    on_disk = _walk(tree)
    assert dict(zip(table["path"], table["label"], strict=True)) == on_disk
    for split in ("train", "valid"):
        part = table[table["split"] == split]
        expect = [p for p in on_disk if p.startswith(f"{DATA}/{split}/")]
        assert sorted(part["path"]) == sorted(expect)
        folders = {Path(p).parent for p in expect}
        assert part["study"].nunique() == len(folders)
        assert part["patient"].nunique() == len({f.parent.name for f in folders})
    assert set(table.loc[table.split == "train", "patient"]).isdisjoint(
        table.loc[table.split == "valid", "patient"]
    )
    row = table.iloc[0]
    assert row["study_type"] == "XR_WRIST"
    assert row["patient"].startswith("patient") and len(row["patient"]) == 12
    assert row["study"] == f"{row['split']}/XR_WRIST/{row['patient']}/" + Path(
        row["path"]
    ).parent.name.rsplit("_", 1)[0]
    assert table["label"].dtype == "int64"


def test_header_crlf_and_missing_trailing_slash_are_tolerated(tree, own_tree):
    expected = load_mura_table(tree, ["WRIST"])
    for name, header in (("train_image_paths.csv", "Path"), ("train_labeled_studies.csv",
                                                               "Path,Label")):
        csv = own_tree / DATA / name
        lines = csv.read_text().splitlines()
        lines = [ln.replace("/,", ",") for ln in lines]
        csv.write_bytes(("\r\n".join([header, *lines]) + "\r\n").encode())
    got = load_mura_table(own_tree, ["WRIST"])
    assert got.equals(expected)


def test_root_may_be_the_dataset_folder_or_come_from_env(tree, monkeypatch):
    expected = load_mura_table(tree, ["WRIST"])
    assert load_mura_table(tree / DATA, ["WRIST"]).equals(expected)
    monkeypatch.setenv("MURA_ROOT", str(tree))
    assert load_mura_table(None, ["WRIST"]).equals(expected)
    assert load_mura_table(None, ["xr_wrist"]).equals(expected)


def test_hidden_archive_files_are_never_read(own_tree):
    for png in list((own_tree / DATA).rglob("image1.png"))[:5]:
        (png.parent / "._image1.png").write_bytes(b"\x00\x05\x16\x07 not a png")
    table = load_mura_table(own_tree, ["WRIST"])
    assert not any("._" in p for p in table["path"])


def test_valid_split_only(tree):
    table = load_mura_table(tree, ["WRIST"], splits=("valid",))
    assert set(table["split"]) == {"valid"}


def test_root_not_set(monkeypatch):
    monkeypatch.delenv("MURA_ROOT", raising=False)
    with pytest.raises(UserError) as err:
        load_mura_table(None, ["WRIST"])
    text = str(err.value)
    assert text.startswith("data.root: not set and MURA_ROOT is not set")
    for needle in ("Stanford AIMI", "registration", MURA_URL, "specs/demo.yaml", "MURA_ROOT",
                   "XR_<PART>/patientNNNNN"):
        assert needle in text


def test_root_missing(tmp_path):
    with pytest.raises(UserError, match=r"data.root: .*nowhere does not exist") as err:
        load_mura_table(tmp_path / "nowhere", ["WRIST"])
    assert "specs/demo.yaml" in str(err.value)
    with pytest.raises(UserError, match="contains no MURA-v1.1 folder"):
        load_mura_table(tmp_path, ["WRIST"])


def test_csv_missing(own_tree):
    (own_tree / DATA / "valid_labeled_studies.csv").unlink()
    with pytest.raises(UserError, match=r"valid_labeled_studies.csv: CSV file missing"):
        load_mura_table(own_tree, ["WRIST"])


def test_listed_image_missing(own_tree):
    first = (own_tree / DATA / "train_image_paths.csv").read_text().splitlines()[0]
    (own_tree / first).unlink()
    with pytest.raises(UserError) as err:
        load_mura_table(own_tree, ["WRIST"])
    assert f"1 image file(s) listed in the CSVs are missing (first: {first})" in str(err.value)


def test_label_disagrees_with_folder(own_tree):
    csv = own_tree / DATA / "train_labeled_studies.csv"
    lines = csv.read_text().splitlines()
    study, label = lines[0].rsplit(",", 1)
    lines[0] = f"{study},{1 - int(label)}"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        load_mura_table(own_tree, ["WRIST"])
    msg = str(err.value)
    assert f"train_labeled_studies.csv:1: study {study.rstrip('/')} has label" in msg
    assert "fix the CSV or the folder name" in msg


def test_images_without_labeled_study(own_tree):
    csv = own_tree / DATA / "train_labeled_studies.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(UserError) as err:
        load_mura_table(own_tree, ["WRIST"])
    assert "1 study folder(s) have images but no line in train_labeled_studies.csv" in str(
        err.value
    )
    assert lines[0].split(",")[0].rstrip("/") in str(err.value)


def test_labeled_study_without_images(own_tree):
    csv = own_tree / DATA / "valid_image_paths.csv"
    lines = csv.read_text().splitlines()
    study = lines[0].rsplit("/", 1)[0]
    csv.write_text("\n".join(ln for ln in lines if not ln.startswith(study + "/")) + "\n")
    with pytest.raises(UserError, match=r"1 labeled stud\(ies\) have no image in "
                                        r"valid_image_paths.csv \(first: .*" + study[-20:]):
        load_mura_table(own_tree, ["WRIST"])


def test_no_images_for_requested_part(tree):
    with pytest.raises(UserError) as err:
        load_mura_table(tree, ["ELBOW"])
    assert str(err.value).startswith("data.body_parts: no images for ELBOW in ")
    assert "parts found: WRIST" in str(err.value)


def test_unknown_part(tree):
    with pytest.raises(UserError, match=r"data.body_parts: got \['KNEE'\]; allowed: ELBOW, "):
        load_mura_table(tree, ["KNEE"])


def test_malformed_csv_line(own_tree):
    csv = own_tree / DATA / "train_labeled_studies.csv"
    csv.write_text(csv.read_text().replace(",0\n", ",x\n", 1).replace(",1\n", ",x\n", 1))
    with pytest.raises(UserError, match=r"train_labeled_studies.csv:\d+: expected "):
        load_mura_table(own_tree, ["WRIST"])


def test_renamed_dataset_folder(own_tree):
    os.rename(own_tree / DATA, own_tree / "mura")
    with pytest.raises(UserError, match="is not named MURA-v1.1"):
        load_mura_table(own_tree / "mura", ["WRIST"])


# ---------------------------------------------------------------------------------------------
# CSV bytes and first lines (issue 13)


def test_a_mistyped_first_row_is_an_error_not_a_header(own_tree):
    csv = own_tree / DATA / "train_image_paths.csv"
    lines = csv.read_text().splitlines()
    typo = lines[0].replace(f"{DATA}/", "MURA-v11/", 1)
    csv.write_text("\n".join([typo, *lines[1:]]) + "\n")
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message == (
        f"{csv}:1: path {str(Path(typo).parent)!r} does not follow {DATA}/train/XR_<PART>/"
        "patientNNNNN/study<k>_<positive|negative>/...")


def test_a_header_is_dropped_and_said(tree, own_tree, capsys):
    csv = own_tree / DATA / "train_labeled_studies.csv"
    csv.write_text("Path,Label\n" + csv.read_text())
    assert load_mura_table(own_tree, ["WRIST"]).equals(load_mura_table(tree, ["WRIST"]))
    assert capsys.readouterr().err == f"note: {csv}:1: header line 'Path,Label' skipped\n"


def test_a_non_utf8_csv(own_tree):
    csv = own_tree / DATA / "valid_labeled_studies.csv"
    lines = csv.read_bytes().splitlines(keepends=True)
    csv.write_bytes(b"".join([lines[0], lines[1].replace(b"patient", b"pati\xe9nt", 1),
                              *lines[2:]]))
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message == (
        f"{csv}:2: not UTF-8 text (byte 0xe9); MURA's CSVs are plain ASCII: restore the file or "
        "re-extract the archive")


def test_a_csv_that_is_a_folder(own_tree):
    csv = own_tree / DATA / "train_image_paths.csv"
    csv.unlink()
    csv.mkdir()
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message.startswith(f"{csv}: CSV file missing; ")


def test_an_unreadable_csv(own_tree, monkeypatch):
    csv = own_tree / DATA / "train_labeled_studies.csv"
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == csv:  # as for a file without read permission (tests may run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message == (
        f"{csv}: permission denied reading the CSV; make it readable by this user "
        "(e.g. chmod a+r)")


def test_permission_denied_is_not_missing(own_tree, monkeypatch):
    table = load_mura_table(own_tree, ["WRIST"])
    first = sorted(table["path"])[0]
    folder = str(own_tree / Path(first).parent)
    real = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(folder + os.sep):  # as under a folder without x permission
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    denied = sorted(p for p in table["path"] if str(own_tree / p).startswith(folder + os.sep))
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message == (
        f"{own_tree / DATA}: permission denied for {len(denied)} image file(s) listed in the "
        f"CSVs (first: {', '.join(denied[:3])}); make the files and their folders readable by "
        "this user (e.g. chmod -R a+rX)")


def test_symlinks_leaving_the_data_folder_are_refused_unless_allowed(tree, own_tree, tmp_path):
    table = load_mura_table(own_tree, ["WRIST"])
    first = sorted(table["path"])[0]
    elsewhere = tmp_path / "elsewhere.png"
    (own_tree / first).rename(elsewhere)
    (own_tree / first).symlink_to(elsewhere)
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message == (
        f"{own_tree / DATA}: 1 file(s) are symlinks leading outside the data folder (first: "
        f"{first} -> {elsewhere}); copy the files in, or set data.follow_symlinks: true to read "
        "them where they lead")
    assert load_mura_table(own_tree, ["WRIST"], follow_symlinks=True).equals(table)
    # a symlink that stays inside the data folder is fine
    (own_tree / first).unlink()
    inside = own_tree / DATA / "moved.png"
    elsewhere.rename(inside)
    (own_tree / first).symlink_to(inside)
    assert load_mura_table(own_tree, ["WRIST"]).equals(table)


def test_a_csv_symlinked_from_outside_is_refused(own_tree, tmp_path):
    csv = own_tree / DATA / "valid_labeled_studies.csv"
    outside = tmp_path / "labels.csv"
    csv.rename(outside)
    csv.symlink_to(outside)
    with pytest.raises(UserError) as info:
        load_mura_table(own_tree, ["WRIST"])
    assert info.value.message.startswith(
        f"{own_tree / DATA}: 1 file(s) are symlinks leading outside the data folder (first: "
        f"{DATA}/valid_labeled_studies.csv -> {outside}); ")
