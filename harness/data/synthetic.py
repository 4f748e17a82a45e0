"""Generated stand-in for MURA v1.1: same layout and CSV format, radiograph-like PNGs.

    root = make_mura_tree("/tmp/fake", patients=300, seed=0)   # -> /tmp/fake (holds MURA-v1.1/)
    root = make_folder_tree("/tmp/cx", classes=("NORMAL", "PNEUMONIA"))  # {train,test,val}/<class>/
    root = ensure_synthetic(spec.data.synthetic, spec.data.body_parts, cache_dir)  # cached

Each patient has fixed traits (bone angle, width, spacing, brightness, position, background) that
every one of their images shares, plus small per-image jitter; so an image-level split leaks
patient identity, as it does on MURA. An abnormal study (label 1) carries a sign on a bone: a thin
dark fracture line, a small round lesion, or bright metal hardware, sized as fractions of the
image's short side so it survives downscaling. `difficulty` (0..1) makes the sign thinner,
smaller and fainter; each image of an abnormal study shows it with probability
`SIGN_SHOWN` (views that miss the finding). `label_noise` flips that share of study labels after
drawing the image (CSV and folder name carry the flipped label).

Every image comes from its own RNG seeded by SeedSequence([seed, patient, study, image]), and
PNGs are written with fixed Pillow options, so one seed gives the same bytes, in parallel or not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.data.mura import DATASET_DIR, image_csv_name, study_csv_name
from harness.errors import UserError
from harness.progress import Progress
from harness.vocab import BODY_PARTS

# Bump when the images or the tree change for the same parameters (invalidates cached trees).
GENERATOR_VERSION = 2
COMPLETE_MARKER = ".complete"
POSITIVE_SHARE = 0.40
SIGN_SHOWN = 0.95
PNG_COMPRESS_LEVEL = 6  # fixed (with optimize off) so the same pixels give the same bytes
# SeedSequence tags that keep the plan's streams apart from the per-image ones.
_PLAN, _TRAITS, _SIGN = 0x504C414E, 0x54524149, 0x5349474E

# Bones per body part: (count, half-width as a fraction of the short side, length fraction).
_PART_SHAPES: dict[str, tuple[int, float, float]] = {
    "WRIST": (2, 0.075, 0.80),
    "FOREARM": (2, 0.065, 1.00),
    "ELBOW": (2, 0.080, 0.70),
    "HUMERUS": (1, 0.110, 1.00),
    "SHOULDER": (1, 0.120, 0.65),
    "HAND": (4, 0.040, 0.65),
    "FINGER": (1, 0.055, 0.85),
}


@dataclass(frozen=True)
class _ImageJob:
    path: str
    seed: int
    patient: int
    study: int
    image: int
    part: str
    sign: bool
    min_size: int
    max_size: int
    difficulty: float


@dataclass(frozen=True)
class _Study:
    split: str
    part: str
    patient: int
    number: int
    label: int  # what the CSV and the folder say
    shows_sign: bool  # the true label, before label noise
    images: int
    folder: str


def _plan_studies(
    patients: int,
    seed: int,
    body_parts: Sequence[str],
    label_noise: float,
    valid_fraction: float,
) -> list[_Study]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN]))
    n_valid = int(round(valid_fraction * patients))
    studies: list[_Study] = []
    for patient in range(1, patients + 1):
        # Higher ids go to valid, as in MURA where valid patients follow train ones.
        split = "valid" if patient > patients - n_valid else "train"
        n_studies = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
        per_part: dict[str, int] = {}
        for _ in range(n_studies):
            part = str(body_parts[int(rng.integers(len(body_parts)))])
            per_part[part] = per_part.get(part, 0) + 1
            true_label = int(rng.random() < POSITIVE_SHARE)
            flipped = rng.random() < label_noise
            label = 1 - true_label if flipped else true_label
            images = int(rng.choice([1, 2, 3, 4, 5], p=[0.08, 0.19, 0.58, 0.13, 0.02]))
            number = per_part[part]
            folder = (
                f"{DATASET_DIR}/{split}/XR_{part}/patient{patient:05d}/"
                f"study{number}_{'positive' if label else 'negative'}"
            )
            studies.append(
                _Study(split, part, patient, number, label, bool(true_label), images, folder)
            )
    return studies


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _capsule_distance(
    xx: np.ndarray, yy: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each pixel to segment a-b, and the position t in [0, 1] along it."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = ((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(xx - ax - t * dx, yy - ay - t * dy), t


def _soft(edge_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a smooth ramp of width ~softness."""
    return 1.0 / (1.0 + np.exp(np.clip(edge_distance / max(softness, 1e-3), -30, 30)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly (numpy only)."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    ys = np.linspace(0, cells, h)
    xs = np.linspace(0, cells, w)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    out = (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy
    return out.astype(np.float32)


def _patient_traits(seed: int, patient: int, part: str) -> dict[str, Any]:
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, _TRAITS, patient, BODY_PARTS.index(part)])
    )
    count, half_width, length = _PART_SHAPES[part]
    return {
        "angle": float(rng.uniform(-35, 35)),
        "half_width": half_width * float(rng.uniform(0.75, 1.3)),
        "width_ratio": float(rng.uniform(0.6, 0.95)),
        "spacing": float(rng.uniform(2.3, 3.4)),
        "length": length * float(rng.uniform(0.8, 1.05)),
        "center": (float(rng.uniform(0.38, 0.62)), float(rng.uniform(0.35, 0.65))),
        "bone": float(rng.uniform(120, 190)),
        "cortex": float(rng.uniform(0.15, 0.45)),
        "tissue": float(rng.uniform(30, 55)),
        "background": float(rng.uniform(8, 40)),
        "gradient": (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20))),
        "noise": float(rng.uniform(3, 9)),
        "count": count,
        "carpals": part in ("WRIST", "HAND"),
        "marker": (int(rng.integers(4)), float(rng.uniform(0.03, 0.05))),
    }


def render_image(job: _ImageJob) -> np.ndarray:
    """Draw one radiograph-like uint8 image (H, W) for a job; pure function of the job."""
    tr = _patient_traits(job.seed, job.patient, job.part)
    rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, job.patient, job.study, job.image])
    )
    w = int(rng.integers(job.min_size, job.max_size + 1))
    h = int(rng.integers(job.min_size, job.max_size + 1))
    short = float(min(w, h))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = job.difficulty

    img = tr["background"] + tr["gradient"][0] * (xx / w - 0.5) + tr["gradient"][1] * (yy / h - 0.5)
    img = img + 6.0 * _smooth_noise(rng, h, w, 4)

    # Bone axis: patient angle plus per-image jitter (the "view" changes a little).
    angle = math.radians(tr["angle"] + rng.uniform(-5, 5))
    ux, uy = math.sin(angle), math.cos(angle)  # along the bone (mostly vertical)
    nx, ny = uy, -ux  # across the bones
    cx = (tr["center"][0] + rng.uniform(-0.04, 0.04)) * w
    cy = (tr["center"][1] + rng.uniform(-0.04, 0.04)) * h
    half_len = 0.45 * tr["length"] * (abs(ux) * w + abs(uy) * h)
    count = tr["count"]
    bones: list[tuple[tuple[float, float], tuple[float, float], float]] = []
    for k in range(count):
        offset = (k - (count - 1) / 2) * tr["spacing"] * tr["half_width"] * short
        radius = tr["half_width"] * short * (1.0 if k == 0 else tr["width_ratio"])
        shift = (0.08 * k) * half_len  # bones end at different heights
        a = (cx + offset * nx - (half_len - shift) * ux, cy + offset * ny - (half_len - shift) * uy)
        b = (cx + offset * nx + half_len * ux, cy + offset * ny + half_len * uy)
        bones.append((a, b, radius))

    # Soft tissue: one wide, dim capsule around all bones.
    spread = (count - 1) / 2 * tr["spacing"] * tr["half_width"] * short
    tissue_r = spread + 2.6 * tr["half_width"] * short
    dist, _ = _capsule_distance(
        xx, yy, (cx - 1.3 * half_len * ux, cy - 1.3 * half_len * uy),
        (cx + 1.3 * half_len * ux, cy + 1.3 * half_len * uy),
    )
    img = img + tr["tissue"] * _soft(dist - tissue_r, 0.08 * short)

    bone_mask = np.zeros((h, w), np.float32)
    for a, b, radius in bones:
        dist, _ = _capsule_distance(xx, yy, a, b)
        inside = _soft(dist - radius, 0.06 * radius + 0.6)
        # Brighter rim (cortex) than centre (marrow), as a tube seen from the side.
        rel = np.clip(dist / radius, 0, 1)
        profile = 1.0 - tr["cortex"] + tr["cortex"] * rel**2
        img = img + tr["bone"] * inside * profile
        bone_mask = np.maximum(bone_mask, inside)
    if tr["carpals"]:
        # Small round bones beyond the distal ends (wrist / hand), not overlapping the shafts.
        r0 = tr["half_width"] * short
        ex, ey = cx + (half_len + 1.6 * r0) * ux, cy + (half_len + 1.6 * r0) * uy
        carpals = np.zeros((h, w), np.float32)
        for k in range(3):
            r = r0 * rng.uniform(0.45, 0.6)
            off = (k - 1) * 1.3 * r0 + rng.uniform(-0.2, 0.2) * r0
            px, py = ex + off * nx, ey + off * ny
            blob = _soft(np.hypot(xx - px, yy - py) - r, 0.15 * r + 0.6)
            carpals = np.maximum(carpals, blob)
        img = img + 0.75 * tr["bone"] * carpals
        bone_mask = np.maximum(bone_mask, carpals)

    # Distractors on every image, whatever the label: a side marker in a corner (bright, like
    # hardware) and faint lines crossing the whole image (like film artefacts).
    corner, size = tr["marker"]
    if rng.random() < 0.7:
        mx = (0.08 if corner % 2 == 0 else 0.92) * w
        my = (0.08 if corner < 2 else 0.92) * h
        box = np.maximum(np.abs(xx - mx) - size * short, np.abs(yy - my) - 0.6 * size * short)
        img = img + 150 * _soft(box, 0.8)
    for _ in range(int(rng.integers(0, 3))):
        theta = rng.uniform(0, math.pi)
        px, py = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        line = np.abs((xx - px) * math.cos(theta) + (yy - py) * math.sin(theta))
        img = img + rng.choice([-1.0, 1.0]) * 10 * _soft(line - 0.6, 0.5)

    # The sign has its own stream, so an image with and without it differs only on the sign.
    sign_rng = np.random.default_rng(
        np.random.SeedSequence([job.seed, _SIGN, job.patient, job.study, job.image])
    )
    if job.sign and sign_rng.random() < SIGN_SHOWN:
        img = _draw_sign(img, xx, yy, sign_rng, bones, bone_mask, tr, d, short, (ux, uy), (nx, ny))

    img = img + rng.normal(0.0, tr["noise"], size=(h, w)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_sign(
    img: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    rng: np.random.Generator,
    bones: list[tuple[tuple[float, float], tuple[float, float], float]],
    bone_mask: np.ndarray,
    tr: dict[str, Any],
    d: float,
    short: float,
    along: tuple[float, float],
    across: tuple[float, float],
) -> np.ndarray:
    # Sizes are fractions of the short side, so a sign keeps its size relative to the bone when
    # the image is downscaled (to 64 px in the demo, where a 2-px line would vanish).
    a, b, radius = bones[int(rng.integers(len(bones)))]
    t = rng.uniform(0.2, 0.8)
    px, py = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
    kind = rng.choice(3, p=[0.5, 0.3, 0.2])
    if kind == 0:
        # Fracture: a dark line across the bone, only where there is bone.
        tilt = rng.uniform(-0.6, 0.6)
        dx = across[0] * math.cos(tilt) + along[0] * math.sin(tilt)
        dy = across[1] * math.cos(tilt) + along[1] * math.sin(tilt)
        dist, _ = _capsule_distance(
            xx, yy, (px - 1.3 * radius * dx, py - 1.3 * radius * dy),
            (px + 1.3 * radius * dx, py + 1.3 * radius * dy),
        )
        width = _lerp(0.035, 0.012, d) * short * rng.uniform(0.8, 1.2)
        depth = _lerp(1.0, 0.45, d) * rng.uniform(0.85, 1.0)
        line = _soft(dist - width, 0.1 * width + 0.4) * bone_mask
        return img - depth * tr["bone"] * line
    if kind == 1:
        # Lesion: a round bright or dark spot inside the bone.
        r = _lerp(0.09, 0.04, d) * short * rng.uniform(0.8, 1.2)
        off = rng.uniform(-0.4, 0.4) * radius
        qx, qy = px + off * across[0], py + off * across[1]
        spot = _soft(np.hypot(xx - qx, yy - qy) - r, 0.15 * r + 0.4) * bone_mask
        amp = _lerp(110, 45, d) * rng.choice([-1.0, 1.0], p=[0.7, 0.3])
        return img + amp * spot
    # Hardware: a bright metal plate along the bone, with screw heads.
    half_len = _lerp(0.25, 0.12, d) * short * rng.uniform(0.85, 1.15)
    half_w = _lerp(0.05, 0.025, d) * short
    dist, _ = _capsule_distance(
        xx, yy, (px - half_len * along[0], py - half_len * along[1]),
        (px + half_len * along[0], py + half_len * along[1]),
    )
    local_x = (xx - px) * across[0] + (yy - py) * across[1]
    plate = _soft(np.maximum(np.abs(local_x) - half_w, dist - half_w), 0.6)
    for k in (-0.6, 0.0, 0.6):
        sx, sy = px + k * half_len * along[0], py + k * half_len * along[1]
        plate = np.maximum(plate, _soft(np.hypot(xx - sx, yy - sy) - 1.6 * half_w, 0.6))
    return img + _lerp(160, 80, d) * plate


def _write_image(job: _ImageJob, root: str) -> None:
    arr = render_image(job)
    Image.fromarray(arr, mode="L").save(
        os.path.join(root, job.path), format="PNG", optimize=False,
        compress_level=PNG_COMPRESS_LEVEL,
    )


def _write_chunk(jobs: list[_ImageJob], root: str) -> int:
    for job in jobs:
        _write_image(job, root)
    return len(jobs)


def make_mura_tree(
    out_dir: Path | str,
    *,
    patients: int = 300,
    seed: int = 0,
    body_parts: Sequence[str] = ("WRIST",),
    min_size: int = 160,
    max_size: int = 512,
    label_noise: float = 0.0,
    valid_fraction: float = 0.15,
    difficulty: float = 0.5,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Write out_dir/MURA-v1.1/ (images + the four CSVs) and return out_dir; `progress` shows
    the images written (harness.progress)."""
    parts = tuple(p.upper().removeprefix("XR_") for p in body_parts)
    unknown = [p for p in parts if p not in BODY_PARTS]
    if unknown or not parts:
        raise UserError(
            f"data.body_parts: got {list(body_parts)}; allowed: {', '.join(BODY_PARTS)}"
        )
    if not 1 <= min_size <= max_size <= 512:
        raise UserError(
            f"data.synthetic: min_size {min_size} / max_size {max_size} must satisfy "
            "1 <= min_size <= max_size <= 512 (MURA's longest side is 512)"
        )
    if patients < 2:
        raise UserError(f"data.synthetic.patients: got {patients}; needs at least 2")
    for name, value in (("label_noise", label_noise), ("valid_fraction", valid_fraction),
                        ("difficulty", difficulty)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"data.synthetic.{name}: got {value}; allowed: 0 to 1")

    final_out = Path(out_dir)
    target = _writable_target(final_out)
    # everything is written into a temporary sibling of MURA-v1.1/, renamed once complete:
    # an existing tree is never touched, and an interrupted run leaves no half tree behind
    tmp = final_out / f".{DATASET_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_tree(tmp, patients, seed, parts, min_size, max_size, label_noise,
                    valid_fraction, difficulty, workers, progress)
        os.rename(tmp / DATASET_DIR, target)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{final_out}: out of disk space while generating the tree; free space or name "
                "a folder on another disk"
            ) from None
        raise UserError(
            f"{final_out}: cannot write the generated tree ({err.strerror or err}); "
            "name a writable folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final_out


def _writable_target(out: Path) -> Path:
    """out/MURA-v1.1, refused when out is not a folder or the tree already exists."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; name a new or empty folder")
    target = out / DATASET_DIR
    if target.exists() or target.is_symlink():
        raise UserError(
            f"{target}: already exists; make-data never overwrites a MURA tree (its CSVs are "
            "the labels): name another folder, or remove this one first"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{out}: cannot create the folder ({err.strerror or err}); name a writable folder"
        ) from None
    return target


def _write_tree(
    out: Path, patients: int, seed: int, parts: tuple[str, ...], min_size: int, max_size: int,
    label_noise: float, valid_fraction: float, difficulty: float, workers: int | None,
    progress: bool = False,
) -> None:
    studies = _plan_studies(patients, seed, parts, label_noise, valid_fraction)
    jobs: list[_ImageJob] = []
    image_lines: dict[str, list[str]] = {"train": [], "valid": []}
    study_lines: dict[str, list[str]] = {"train": [], "valid": []}
    # MURA's CSVs list parts, then patients, then studies, then images in order.
    for st in sorted(studies, key=lambda s: (s.part, s.patient, s.number)):
        (out / st.folder).mkdir(parents=True, exist_ok=True)
        study_lines[st.split].append(f"{st.folder}/,{st.label}")
        for j in range(1, st.images + 1):
            path = f"{st.folder}/image{j}.png"
            image_lines[st.split].append(path)
            study_key = BODY_PARTS.index(st.part) * 100 + st.number
            jobs.append(
                _ImageJob(path, seed, st.patient, study_key, j, st.part, st.shows_sign,
                          min_size, max_size, difficulty)
            )
    for split in ("train", "valid"):
        (out / DATASET_DIR).mkdir(parents=True, exist_ok=True)
        for name, lines in ((image_csv_name(split), image_lines[split]),
                            (study_csv_name(split), study_lines[split])):
            (out / DATASET_DIR / name).write_text(
                "".join(line + "\n" for line in lines), encoding="utf-8"
            )

    _write_images(jobs, out, _write_chunk, workers, progress)


def _write_images(
    jobs: list[_ImageJob], root: Path, write_chunk: Callable[[list[_ImageJob], str], int],
    workers: int | None, progress: bool,
) -> None:
    """Render and write the images (a pool of `workers` processes that die with the harness),
    with a progress bar; `write_chunk(jobs, root)` writes some and returns how many."""
    n_workers = workers or os.cpu_count() or 1
    bar = Progress("generating images", len(jobs), "img", enabled=progress)
    try:
        if n_workers <= 1 or len(jobs) < 32:
            for i in range(0, len(jobs), 8):
                bar.update(write_chunk(jobs[i : i + 8], str(root)))
        else:
            chunk = max(8, len(jobs) // (n_workers * 8))
            from harness.data.cache import die_with_parent

            with ProcessPoolExecutor(max_workers=n_workers, initializer=die_with_parent) as pool:
                futures = [
                    pool.submit(write_chunk, jobs[i : i + chunk], str(root))
                    for i in range(0, len(jobs), chunk)
                ]
                for f in futures:
                    bar.update(f.result())
    finally:
        bar.close()


# Kermany et al.'s file names (person<N>_<bacteria|virus>_<k>.jpeg, IM-<NNNN>-<kkkk>.jpeg), whose
# patient this regex's one group gives; the generated folder layout writes the same names.
FOLDER_GROUP_PATTERN = r"^((?:NORMAL2-)?IM-\d+|person\d+)"
FOLDER_SPLITS = ("train", "test", "val")
JPEG_QUALITY = 95  # fixed (optimize off): the same pixels give the same bytes


@dataclass(frozen=True)
class _FolderImage:
    split: str
    label: int  # the folder it is written to (after label noise)
    job: _ImageJob


def _plan_folder(
    patients: int, seed: int, classes: tuple[str, str], part: str, label_noise: float,
    valid_fraction: float, test_fraction: float, min_size: int, max_size: int,
    difficulty: float,
) -> list[_FolderImage]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN, 2]))
    n_test = max(1, int(round(test_fraction * patients)))
    n_val = int(round(valid_fraction * patients))
    out: list[_FolderImage] = []
    for patient in range(1, patients + 1):
        # the highest ids go to test, the next ones to val, as patients follow each other
        split = ("test" if patient > patients - n_test
                 else "val" if patient > patients - n_test - n_val else "train")
        true_label = int(rng.random() < POSITIVE_SHARE)
        label = 1 - true_label if rng.random() < label_noise else true_label
        kind = "bacteria" if rng.random() < 0.65 else "virus"
        for k in range(1, int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) + 1):
            name = (f"person{patient}_{kind}_{k}.jpeg" if label
                    else f"IM-{patient:04d}-{k:04d}.jpeg")
            path = f"{split}/{classes[label]}/{name}"
            job = _ImageJob(path, seed, patient, 1, k, part, bool(true_label), min_size,
                            max_size, difficulty)
            out.append(_FolderImage(split, label, job))
    return out


def _write_jpeg_chunk(jobs: list[_ImageJob], root: str) -> int:
    for job in jobs:
        Image.fromarray(render_image(job), mode="L").save(
            os.path.join(root, job.path), format="JPEG", quality=JPEG_QUALITY, optimize=False,
        )
    return len(jobs)


def make_folder_tree(
    out_dir: Path | str,
    *,
    patients: int = 300,
    seed: int = 0,
    body_parts: Sequence[str] = ("WRIST",),
    classes: Sequence[str] = ("NORMAL", "PNEUMONIA"),
    min_size: int = 160,
    max_size: int = 512,
    label_noise: float = 0.0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.15,
    difficulty: float = 0.5,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Write out_dir/{train,test,val}/<class>/<images> (JPEG, Kermany's file names)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; name a new or empty folder")
    taken = [n for n in FOLDER_SPLITS if (out / n).exists() or (out / n).is_symlink()]
    if taken:
        raise UserError(
            f"{out / taken[0]}: already exists; make-data never overwrites data (its folders are "
            "the labels): name another folder, or remove this one first"
        )
    if patients < 4:
        raise UserError(f"data.synthetic.patients: got {patients}; needs at least 4")
    part = str(body_parts[0]).upper().removeprefix("XR_")
    if part not in BODY_PARTS:
        raise UserError(
            f"data.body_parts: got {list(body_parts)}; allowed: {', '.join(BODY_PARTS)}"
        )
    images = _plan_folder(patients, seed, (str(classes[0]), str(classes[1])), part, label_noise,
                          valid_fraction, test_fraction, min_size, max_size, difficulty)
    if {i.label for i in images if i.split == "train"} != {0, 1}:
        raise UserError(
            f"data.synthetic.patients: {patients} patients leave a class without training "
            "images; use more patients"
        )
    tmp = out / f".folder.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i in images:
            (tmp / i.job.path).parent.mkdir(parents=True, exist_ok=True)
        _write_images([i.job for i in images], tmp, _write_jpeg_chunk, workers, progress)
        for split in FOLDER_SPLITS:
            if (tmp / split).is_dir():
                os.rename(tmp / split, out / split)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{out}: out of disk space while generating the images; free space or name a "
                "folder on another disk"
            ) from None
        raise UserError(
            f"{out}: cannot write the generated images ({err.strerror or err}); name a writable "
            "folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def synthetic_params(synthetic_spec: Any, body_parts: Sequence[str]) -> dict[str, Any]:
    """The generator parameters that define a tree (and its cache key)."""
    if getattr(synthetic_spec, "layout", "mura") == "folder":
        return {
            "layout": "folder",
            "patients": int(synthetic_spec.patients),
            "seed": int(synthetic_spec.seed),
            "body_parts": [p.upper().removeprefix("XR_") for p in body_parts],
            "classes": list(synthetic_spec.classes),
            "min_size": int(synthetic_spec.min_size),
            "max_size": int(synthetic_spec.max_size),
            "label_noise": float(synthetic_spec.label_noise),
            "valid_fraction": float(synthetic_spec.valid_fraction),
            "test_fraction": float(synthetic_spec.test_fraction),
            "difficulty": float(synthetic_spec.difficulty),
        }
    return {
        "patients": int(synthetic_spec.patients),
        "seed": int(synthetic_spec.seed),
        "body_parts": [p.upper().removeprefix("XR_") for p in body_parts],
        "min_size": int(synthetic_spec.min_size),
        "max_size": int(synthetic_spec.max_size),
        "label_noise": float(synthetic_spec.label_noise),
        "valid_fraction": float(synthetic_spec.valid_fraction),
        "difficulty": float(getattr(synthetic_spec, "difficulty", 0.5)),
    }


def ensure_synthetic(
    synthetic_spec: Any, body_parts: Sequence[str], cache_dir: Path | str,
    workers: int | None = None, progress: bool = False,
) -> Path:
    """Generate (once) the tree for these parameters under cache_dir/synthetic/; return its root."""
    from harness.data.cache import ensure_writable, raise_if_no_space, remove_stale_temp

    params = synthetic_params(synthetic_spec, body_parts)
    blob = json.dumps({"params": params, "generator": GENERATOR_VERSION}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    parent = Path(cache_dir) / "synthetic"
    ensure_writable(parent)
    final = parent / key
    if (final / COMPLETE_MARKER).is_file():
        return final
    remove_stale_temp(parent)
    tmp = parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if params.get("layout") == "folder":
            make_folder_tree(tmp, workers=workers, progress=progress,
                             **{k: v for k, v in params.items() if k != "layout"})
        else:
            make_mura_tree(tmp, workers=workers, progress=progress, **params)
        (tmp / "params.json").write_text(blob + "\n", encoding="utf-8")
        (tmp / COMPLETE_MARKER).write_text("", encoding="utf-8")
        if (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(tmp)  # another process finished first; its tree may be in use
            return final
        if final.exists():
            shutil.rmtree(final)  # a folder without the marker is a leftover
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / COMPLETE_MARKER).is_file():
            return final  # another process finished the same tree first
        raise_if_no_space(err, tmp, None)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
