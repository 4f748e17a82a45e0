"""Preprocessed image store: every image decoded ONCE, made one-channel, resized, kept as uint8.

    cache = build_cache(table, base_dir, 224, "bilinear", default_cache_dir())
    cache.images            # np.memmap (N, 224, 224) uint8, rows in cache.paths order (sorted)

Both backends read these arrays, so resizing happens in exactly one place. Layout:
cache_dir/images/<key[:16]>/{images.npy, index.json, COMPLETE}. The key hashes the sorted file
list with sizes and mtimes, the size, the filter, the cache format and Pillow's version; any change
makes a new folder. A build writes a temp sibling folder, fsyncs, writes COMPLETE last, then
renames it into place; a folder without COMPLETE is never read.

Decoding to one channel (8 bit):
- L: as is; 1, P (without transparency), RGB, CMYK, YCbCr: Pillow `convert("L")` (ITU-R 601 luma).
- I;16 / I (16-bit PNG): full 16-bit range scaled to 8 bit, round(v / 257), clipped to 0..65535
  first (Pillow's own convert clips at 255 instead of scaling).
- RGBA, LA, PA and P with transparency: luma composited on black, round(L * A / 255), so
  transparent pixels become 0 like the background of a radiograph.
- DICOM (.dcm, .dicom; the `dicom` extra, pydicom): the stored values scaled from BitsStored
  bits to 8 (round(v * 255 / (2**bits - 1)), signed values shifted to start at 0 first),
  inverted for MONOCHROME1 (where 0 is white); colour DICOMs go through Pillow's luma.
Resizing: Pillow `resize` to a square with the spec's filter (bilinear, nearest, area = BOX,
lanczos), no reducing_gap; Pillow filters widen their support when shrinking (antialiased).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from harness.errors import UserError
from harness.progress import Progress
from harness.vocab import ON_BAD_IMAGE

CACHE_FORMAT_VERSION = 2
COMPLETE_MARKER = "COMPLETE"
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error,
                  Image.DecompressionBombError)
_CHUNK = 32


@dataclass(frozen=True)
class ImageCache:
    """An opened cache: `images[i]` is the image of `paths[i]` (label `labels[i]`)."""

    images: np.ndarray  # np.memmap, read-only, (N, S, S) uint8
    labels: np.ndarray  # int64 (N,)
    paths: tuple[str, ...]
    key: str
    folder: Path
    skipped: tuple[str, ...]
    resize: str
    image_size: int
    pixels_sha256: str = ""  # content of images.npy: the data's identity, unlike `key`

    def __len__(self) -> int:
        return len(self.paths)


def default_cache_dir() -> Path:
    """$HARNESS_CACHE, else $XDG_CACHE_HOME/repro-harness, else ~/.cache/repro-harness."""
    if os.environ.get("HARNESS_CACHE"):
        return Path(os.environ["HARNESS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "repro-harness"
    return Path.home() / ".cache" / "repro-harness"


def remove_stale_temp(parent: Path) -> list[Path]:
    """Remove the `.tmp-<key>-<pid>-<nonce>` folders of builds whose process is gone (killed
    with -9 mid-build); a live process's build is left alone. Returns what was removed."""
    removed = []
    for tmp in parent.glob(".tmp-*-*-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def die_with_parent() -> None:  # pragma: no cover - runs in a pool's worker
    """Linux: a decoding/generating worker gets SIGKILL when the harness dies (kill -9) instead
    of writing on into a temp folder the next build removes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed; a UserError if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cache directory {folder} is not writable ({err.strerror or err}); pass --cache-dir "
            "or set HARNESS_CACHE to a writable folder"
        ) from None


def raise_if_no_space(err: OSError, folder: Path, nbytes: int | None) -> None:
    """Turn a full disk (ENOSPC / EDQUOT) into a UserError; other OSErrors pass through."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"; it needs about {nbytes:,} bytes" if nbytes else ""
        raise UserError(
            f"cache directory {folder.parent}: out of disk space while writing {folder.name}"
            f"{need}; free space or pass --cache-dir / set HARNESS_CACHE to another disk"
        ) from None


def _file_list(table: pd.DataFrame, base_dir: Path) -> list[tuple[str, int, int]]:
    entries = []
    for rel in sorted(set(table["path"])):
        try:
            st = os.stat(base_dir / rel)
            entries.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            entries.append((rel, -1, -1))  # missing: becomes a bad image at decode time
    return entries


def _decoders(table: pd.DataFrame) -> dict[str, str]:
    """The DICOM decoder's version, when the table has DICOM files (it makes their pixels)."""
    if not table["path"].str.lower().str.endswith((".dcm", ".dicom")).any():
        return {}
    import pydicom

    return {"pydicom": str(pydicom.__version__)}


def cache_key(
    table: pd.DataFrame, base_dir: Path | str, image_size: int, resize: str
) -> str:
    """Content key of the cache for these files (name, size, mtime) and preprocessing."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT_VERSION,
            "pillow": PIL.__version__,
            "image_size": int(image_size),
            "resize": resize,
            "files": _file_list(table, Path(base_dir)),
            **_decoders(table),
        },
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def to_gray8(im: Image.Image) -> Image.Image:
    """One 8-bit channel from any Pillow mode (see the module docstring)."""
    mode = im.mode
    if mode == "L":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        v = np.asarray(im).astype(np.int64)
        v = np.clip(v, 0, 65535)
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        la = np.asarray(im.convert("LA") if mode != "LA" else im).astype(np.uint32)
        out = (la[..., 0] * la[..., 1] + 127) // 255
        return Image.fromarray(out.astype(np.uint8), mode="L")
    return im.convert("L")


def dicom_to_gray8(path: Path | str) -> Image.Image:
    """One 8-bit channel from a single-frame DICOM file (see the module docstring)."""
    import pydicom  # optional extra; the table loader has checked it is installed

    try:
        ds = pydicom.dcmread(path)
        v = ds.pixel_array
    except (pydicom.errors.InvalidDicomError, AttributeError, KeyError) as e:
        raise ValueError(f"not a readable DICOM image ({e})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and v.ndim == 3 and v.shape[-1] == 3:
        if photometric != "RGB":
            v = pydicom.pixels.convert_color_space(v, photometric, "RGB")
        return Image.fromarray(np.asarray(v, dtype=np.uint8), mode="RGB").convert("L")
    if v.ndim != 2:
        raise ValueError(f"DICOM with pixel shape {v.shape}: only single-frame grayscale or RGB")
    bits = int(getattr(ds, "BitsStored", 8 * v.dtype.itemsize))
    values = v.astype(np.int64)
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        values = values + (1 << (bits - 1))
    top = (1 << bits) - 1
    values = np.clip(values, 0, top)
    out = (values * 255 + top // 2) // top
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _open(path: Path | str) -> Image.Image:
    if str(path).lower().endswith((".dcm", ".dicom")):
        return dicom_to_gray8(path)
    return Image.open(path)


def load_image(path: Path | str, image_size: int, resize: str) -> tuple[np.ndarray, int, int]:
    """Decode, make one channel and resize one image; returns (pixels, width, height)."""
    with _open(path) as im:
        im.load()
        w, h = im.size
        gray = to_gray8(im)
        if gray.size != (image_size, image_size):
            gray = gray.resize((image_size, image_size), RESAMPLE[resize])
        return np.asarray(gray, dtype=np.uint8), w, h


def _decode_chunk(
    npy_path: str, start: int, files: Sequence[str], image_size: int, resize: str
) -> list[tuple[int, int, int, str | None]]:
    """Decode files into rows start.. of the memmap; returns (row, w, h, error) per file."""
    out = np.load(npy_path, mmap_mode="r+")
    results: list[tuple[int, int, int, str | None]] = []
    for i, f in enumerate(files):
        try:
            pixels, w, h = load_image(f, image_size, resize)
        except _DECODE_ERRORS as err:
            results.append((start + i, 0, 0, f"{type(err).__name__}: {err}".splitlines()[0]))
            continue
        out[start + i] = pixels
        results.append((start + i, w, h, None))
    out.flush()
    del out
    return results


def _preallocate(fd: int, nbytes: int) -> None:
    # Reserve the blocks now: writing into a sparse memmap on a full disk is a SIGBUS, not an
    # OSError, so we want ENOSPC here, before any decoding.
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bad_images_error(bad: list[tuple[str, str]], total: int) -> UserError:
    first = "; ".join(f"{p} ({why})" for p, why in bad[:3])
    return UserError(
        f"data: {len(bad)} of {total} image(s) could not be decoded (first: {first}); replace "
        "them, or set data.on_bad_image: skip to leave them out (they are listed in the report)"
    )


def open_cache(folder: Path) -> ImageCache:
    """Open a complete cache folder without reading the pixels (memmap)."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    images = np.load(folder / "images.npy", mmap_mode="r")
    if images.shape != (len(index["paths"]), index["image_size"], index["image_size"]):
        raise ValueError(f"{folder}: images.npy shape {images.shape} does not match index.json")
    return ImageCache(
        images=images,
        labels=np.asarray(index["labels"], dtype=np.int64),
        paths=tuple(index["paths"]),
        key=index["key"],
        folder=folder,
        skipped=tuple(s["path"] for s in index["skipped"]),
        resize=index["resize"],
        image_size=int(index["image_size"]),
        pixels_sha256=index.get("pixels_sha256", ""),
    )


def build_cache(
    table: pd.DataFrame,
    base_dir: Path | str,
    image_size: int,
    resize: str,
    cache_dir: Path | str,
    on_bad_image: str = "fail",
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Open the cache for these images and settings, building it first if needed."""
    if resize not in RESAMPLE:
        raise UserError(f"data.resize: got {resize!r}; allowed: {', '.join(RESAMPLE)}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise UserError(
            f"data.on_bad_image: got {on_bad_image!r}; allowed: {', '.join(ON_BAD_IMAGE)}"
        )
    base = Path(base_dir)
    parent = Path(cache_dir) / "images"
    ensure_writable(parent)
    key = cache_key(table, base, image_size, resize)
    final = parent / key[:16]
    if not (final / COMPLETE_MARKER).is_file():
        _build(table, base, image_size, resize, key, final, workers, progress)
    cache = open_cache(final)
    if cache.skipped and on_bad_image == "fail":
        index = json.loads((final / "index.json").read_text(encoding="utf-8"))
        bad = [(s["path"], s["reason"]) for s in index["skipped"]]
        raise _bad_images_error(bad, len(cache.paths) + len(bad))
    return cache


def _build(
    table: pd.DataFrame,
    base: Path,
    image_size: int,
    resize: str,
    key: str,
    final: Path,
    workers: int | None,
    progress: bool,
) -> None:
    labels_by_path = dict(zip(table["path"], table["label"].astype(int), strict=True))
    paths = sorted(labels_by_path)
    n = len(paths)
    remove_stale_temp(final.parent)
    tmp = final.parent / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    nbytes = n * image_size * image_size
    try:
        tmp.mkdir()
        npy = tmp / "images.npy"
        arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8,
                                        shape=(n, image_size, image_size))
        header = arr.offset
        del arr
        with open(npy, "r+b") as fh:
            _preallocate(fh.fileno(), header + nbytes)
        results = _decode_all(npy, [str(base / p) for p in paths], image_size, resize,
                              workers, progress)
        bad = [(paths[row], err) for row, _, _, err in results if err is not None]
        if bad and len(bad) == n:
            raise _bad_images_error(bad, n)
        keep = [row for row, _, _, err in results if err is None]
        if bad:
            # Kept either way (on_bad_image=fail raises when opening), so switching to skip
            # does not decode again.
            src = np.load(npy, mmap_mode="r")
            dst_path = tmp / "images.tmp.npy"
            dst = np.lib.format.open_memmap(dst_path, mode="w+", dtype=np.uint8,
                                            shape=(len(keep), image_size, image_size))
            for i in range(0, len(keep), 256):
                dst[i : i + 256] = src[keep[i : i + 256]]
            dst.flush()
            del src, dst
            os.replace(dst_path, npy)
        sizes = {row: (w, h) for row, w, h, err in results if err is None}
        index = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "image_size": image_size,
            "resize": resize,
            "resample": f"PIL.Image.Resampling.{RESAMPLE[resize].name}",
            "versions": {"pillow": PIL.__version__, "numpy": np.__version__},
            "paths": [paths[r] for r in keep],
            "labels": [labels_by_path[paths[r]] for r in keep],
            "sizes": [list(sizes[r]) for r in keep],
            "skipped": [{"path": p, "reason": why} for p, why in bad],
            # what the pixels are, independent of where the files lie or their mtimes
            "pixels_sha256": _file_sha256(npy),
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        for f in (npy, tmp / "index.json"):
            _fsync_path(f)
        (tmp / COMPLETE_MARKER).write_text(key + "\n", encoding="utf-8")
        _fsync_path(tmp / COMPLETE_MARKER)
        _fsync_path(tmp)
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # an incomplete folder is never trusted
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
        _fsync_path(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_no_space(err, tmp, nbytes)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _decode_all(
    npy: Path, files: list[str], image_size: int, resize: str, workers: int | None,
    progress: bool,
) -> list[tuple[int, int, int, str | None]]:
    n = len(files)
    n_workers = max(1, workers or os.cpu_count() or 1)
    results: list[tuple[int, int, int, str | None]] = []
    starts = range(0, n, _CHUNK)
    bar = Progress("caching images", n, "img", enabled=progress)
    try:
        if n_workers == 1 or n <= _CHUNK:
            for s in starts:
                results += _decode_chunk(str(npy), s, files[s : s + _CHUNK], image_size, resize)
                bar.update(min(_CHUNK, n - s))
        else:
            with ProcessPoolExecutor(max_workers=n_workers, initializer=die_with_parent) as pool:
                futures = {
                    pool.submit(_decode_chunk, str(npy), s, files[s : s + _CHUNK], image_size,
                                resize): s
                    for s in starts
                }
                try:
                    for fut in as_completed(futures):
                        chunk = fut.result()
                        results += chunk
                        bar.update(len(chunk))
                except BaseException:
                    # Ctrl-C: drop the queued chunks instead of decoding all of them first
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    results.sort()
    return results
