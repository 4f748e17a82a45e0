"""Image cache: decoding modes, reuse, invalidation, atomic builds, bad images, disk errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_fixtures import copy_tree, data_spec, shared_tree
from PIL import Image

import harness.data.cache as cache_mod
from harness.data import prepare_data, summarize_without_cache
from harness.data.cache import build_cache, cache_key, default_cache_dir, load_image
from harness.data.mura import load_mura_table
from harness.errors import UserError


@pytest.fixture
def tree(tmp_path_factory, tmp_path):
    return copy_tree(shared_tree(tmp_path_factory), tmp_path / "tree")


def _table(paths, labels=None) -> pd.DataFrame:
    labels = labels or [0] * len(paths)
    return pd.DataFrame({"path": paths, "label": labels})


def _build(table, base, cache_dir, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return build_cache(table, base, 32, "bilinear", cache_dir, **kwargs)


def test_build_matches_direct_decoding(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    cache = _build(table, tree, tmp_path / "c", workers=2)
    assert isinstance(cache.images, np.memmap) and cache.images.dtype == np.uint8
    assert cache.images.shape == (len(table), 32, 32) and not cache.images.flags.writeable
    assert list(cache.paths) == sorted(table["path"])
    labels = dict(zip(table["path"], table["label"], strict=True))
    assert cache.labels.tolist() == [labels[p] for p in cache.paths]
    for i in (0, len(cache) // 2, len(cache) - 1):
        expected, _, _ = load_image(tree / cache.paths[i], 32, "bilinear")
        np.testing.assert_array_equal(cache.images[i], expected)
    assert cache.folder == tmp_path / "c" / "images" / cache.key[:16]
    index = json.loads((cache.folder / "index.json").read_text())
    assert index["resample"] == "PIL.Image.Resampling.BILINEAR" and index["skipped"] == []
    assert set(index["versions"]) == {"pillow", "numpy"}
    with Image.open(tree / cache.paths[0]) as im:
        assert index["sizes"][0] == list(im.size)


def test_reuse_does_not_decode_and_changes_invalidate(tree, tmp_path, monkeypatch):
    table = load_mura_table(tree, ["WRIST"])
    first = _build(table, tree, tmp_path)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "load_image", no_decode)
    again = _build(table.sample(frac=1.0, random_state=0), tree, tmp_path)  # order-independent
    assert again.key == first.key and again.folder == first.folder
    other_size = cache_key(table, tree, 48, "bilinear")
    assert other_size != first.key != cache_key(table, tree, 32, "area")

    monkeypatch.undo()
    path = tree / first.paths[0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    touched = _build(table, tree, tmp_path)
    assert touched.key != first.key
    Image.new("L", (50, 60), 200).save(path)
    rewritten = _build(table, tree, tmp_path)
    assert rewritten.key not in (first.key, touched.key)
    assert (rewritten.images[0] == 200).all()


def test_incomplete_folders_are_ignored(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    key = cache_key(table, tree, 32, "bilinear")
    images = tmp_path / "images"
    killed = images / f".tmp-{key[:16]}-1-deadbeef"
    killed.mkdir(parents=True)
    (killed / "images.npy").write_bytes(b"half")
    unmarked = images / key[:16]
    unmarked.mkdir()
    (unmarked / "index.json").write_text("{broken")
    cache = _build(table, tree, tmp_path)
    assert cache.folder == unmarked and (unmarked / "COMPLETE").is_file()
    assert len(cache) == len(table)


def test_hidden_archive_files_are_never_read(tree, tmp_path):
    for png in list((tree / "MURA-v1.1").rglob("image1.png"))[:5]:
        (png.parent / "._image1.png").write_bytes(b"\x00\x05\x16\x07")
    table = load_mura_table(tree, ["WRIST"])
    assert len(_build(table, tree, tmp_path)) == len(table)


def _break_three(tree: Path, table: pd.DataFrame) -> list[str]:
    paths = sorted(table["path"])[:3]
    (tree / paths[0]).write_bytes(b"")  # zero bytes
    data = (tree / paths[1]).read_bytes()
    (tree / paths[1]).write_bytes(data[: len(data) // 2])  # truncated
    (tree / paths[2]).write_bytes(b"this is not a png at all" * 10)  # undecodable
    return paths


def test_bad_images_fail_with_the_first_three(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    bad = _break_three(tree, table)
    with pytest.raises(UserError) as err:
        _build(table, tree, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"data: 3 of {len(table)} image(s) could not be decoded (first: ")
    assert all(p in msg for p in bad)
    assert "data.on_bad_image: skip" in msg
    assert "truncated" in msg


def test_bad_images_skipped_are_recorded(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    bad = _break_three(tree, table)
    cache = _build(table, tree, tmp_path, on_bad_image="skip")
    assert cache.skipped == tuple(bad)
    assert len(cache) == len(table) - 3 and not set(bad) & set(cache.paths)
    expected, _, _ = load_image(tree / cache.paths[0], 32, "bilinear")
    np.testing.assert_array_equal(cache.images[0], expected)
    reasons = json.loads((cache.folder / "index.json").read_text())["skipped"]
    assert [r["path"] for r in reasons] == bad and all(r["reason"] for r in reasons)
    with pytest.raises(UserError, match="3 of"):  # the same cache, asked to fail
        _build(table, tree, tmp_path, on_bad_image="fail")


def test_prepare_data_drops_skipped_rows(tmp_path):
    spec = data_spec(on_bad_image="skip")
    summary = summarize_without_cache(spec, tmp_path)
    assert not (tmp_path / "images").exists()  # nothing decoded
    root = summary.base_dir
    victim = sorted(summary.table["path"])[5]
    (root / victim).write_bytes(b"")
    data = prepare_data(spec, tmp_path, progress=False)
    assert data.skipped == (victim,)
    assert victim not in set(data.table["path"])
    assert list(data.table["path"]) == list(data.cache.paths)
    assert (data.table["label"].to_numpy() == data.cache.labels).all()
    rows = data.describe()
    assert sum(r["images"] for r in rows) == len(summary.table) - 1
    again = prepare_data(spec, tmp_path, progress=False)
    assert again.data_hash == data.data_hash
    spec.split.seed = 1
    assert prepare_data(spec, tmp_path, progress=False).data_hash != data.data_hash


def test_decoding_modes(tmp_path):
    v16 = np.array([[0, 257, 65535, 32896], [1000, 40000, 128, 65280]], dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128],
                      [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    la = np.array([[[90, 255], [90, 51], [255, 0]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 10, 10, 77, 77, 77, 250, 250, 250] + [0] * (256 * 3 - 9))
    pal.putdata([2, 0, 1])
    pal.save(tmp_path / "pal.png")
    Image.new("RGB", (2, 1), (30, 60, 90)).save(tmp_path / "rgb.png")

    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    g16, w, h = load_image(tmp_path / "g16.png", 4, "nearest")  # 4x2 -> 4x4 nearest
    assert (w, h) == (4, 2)
    np.testing.assert_array_equal(g16[0], [0, 1, 255, 128])
    np.testing.assert_array_equal(g16[-1], np.rint(v16[1] / 257).astype(np.uint8))

    luma = int(np.asarray(Image.new("RGB", (1, 1), (200, 100, 50)).convert("L"))[0, 0])
    out, _, _ = load_image(tmp_path / "rgba.png", 4, "nearest")
    np.testing.assert_array_equal(out[0], [luma, 0, round(luma * 128 / 255), 0])
    out, _, _ = load_image(tmp_path / "la.png", 3, "nearest")
    np.testing.assert_array_equal(out[0], [90, 18, 0])
    out, _, _ = load_image(tmp_path / "pal.png", 3, "nearest")
    np.testing.assert_array_equal(out[0], [250, 10, 77])
    out, _, _ = load_image(tmp_path / "rgb.png", 2, "nearest")
    expected = np.asarray(Image.new("RGB", (1, 1), (30, 60, 90)).convert("L"))[0, 0]
    assert (out == expected).all()

    table = _table(["g16.png", "rgba.png", "pal.png"])
    cache = build_cache(table, tmp_path, 8, "area", tmp_path / "c", workers=1, progress=False)
    assert cache.images.shape == (3, 8, 8) and cache.resize == "area"


def test_cache_dir_not_writable(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError) as err:
        _build(table, tree, blocker / "cache")
    assert str(err.value).startswith(f"cache directory {blocker / 'cache' / 'images'} is not "
                                     "writable")
    assert "pass --cache-dir or set HARNESS_CACHE" in str(err.value)


def test_cache_dir_read_only(tree, tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(UserError, match="is not writable"):
            _build(load_mura_table(tree, ["WRIST"]), tree, readonly)
    finally:
        readonly.chmod(0o700)


def test_out_of_disk_leaves_nothing(tree, tmp_path, monkeypatch):
    table = load_mura_table(tree, ["WRIST"])

    def full(fd, nbytes):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "_preallocate", full)
    with pytest.raises(UserError) as err:
        _build(table, tree, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"cache directory {tmp_path / 'images'}: out of disk space")
    assert f"about {len(table) * 32 * 32:,} bytes" in msg
    assert list((tmp_path / "images").iterdir()) == []


def test_bad_settings(tree, tmp_path):
    table = load_mura_table(tree, ["WRIST"])
    with pytest.raises(UserError, match=r"data.resize: got 'cubic'; allowed: bilinear, nearest"):
        build_cache(table, tree, 32, "cubic", tmp_path)
    with pytest.raises(UserError, match=r"data.on_bad_image: got 'ignore'"):
        build_cache(table, tree, 32, "bilinear", tmp_path, on_bad_image="ignore")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "h"))
    assert default_cache_dir() == tmp_path / "h"
    monkeypatch.delenv("HARNESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "repro-harness"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "repro-harness"
