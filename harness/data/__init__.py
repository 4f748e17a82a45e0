"""Data layer: dataset table -> preprocessed image cache -> train/test/validation split.

    data = prepare_data(spec.data, cache_dir)           # used by `harness run`
    data.cache.images[data.split.test]                  # uint8 (N, S, S), memmap
    summary = summarize_without_cache(spec.data, cache_dir)   # `validate`, `run --dry-run`

`table` rows are aligned with `cache.images` (sorted by path). Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.data.augment import EpochPlan, apply_augmentation_numpy, epoch_plan
from harness.data.cache import (
    COMPLETE_MARKER,
    ImageCache,
    build_cache,
    cache_key,
    default_cache_dir,
    open_cache,
)
from harness.data.folder import load_csv_table, load_folder_table
from harness.data.mura import load_mura_table, resolve_mura_root
from harness.data.split import Leakage, Split, describe_split, split_indices
from harness.data.synthetic import (
    FOLDER_GROUP_PATTERN,
    ensure_synthetic,
    make_folder_tree,
    make_mura_tree,
)
from harness.errors import UserError
from harness.vocab import DATASETS

__all__ = [
    "DataSummary",
    "EpochPlan",
    "ImageCache",
    "Leakage",
    "PreparedData",
    "Split",
    "apply_augmentation_numpy",
    "build_cache",
    "data_record",
    "render_split",
    "default_cache_dir",
    "describe_split",
    "epoch_plan",
    "ensure_synthetic",
    "load_csv_table",
    "load_folder_table",
    "load_mura_table",
    "load_table",
    "make_folder_tree",
    "make_mura_tree",
    "official_test_part",
    "prepare_data",
    "resolve_mura_root",
    "split_indices",
    "summarize_without_cache",
]


def _mura_layout(data_spec: Any) -> bool:
    return data_spec.dataset == "mura-v1.1" or (
        data_spec.dataset == "synthetic"
        and getattr(data_spec.synthetic, "layout", "mura") == "mura"
    )


def official_test_part(data_spec: Any) -> str:
    """The table's split value that strategy official tests on: MURA's valid set, else test."""
    return "valid" if _mura_layout(data_spec) else "test"


def load_table(
    data_spec: Any, cache_dir: Path | str, progress: bool = False
) -> tuple[pd.DataFrame, Path]:
    """The image table (sorted by path) and the folder its paths are relative to
    (`progress`: show the generation of a synthetic tree)."""
    follow = getattr(data_spec, "follow_symlinks", False)
    if data_spec.dataset == "synthetic":
        root: Path | str | None = ensure_synthetic(
            data_spec.synthetic, data_spec.body_parts, cache_dir, progress=progress
        )
    elif data_spec.dataset in ("mura-v1.1", "folder", "csv"):
        root = data_spec.root
    else:
        raise UserError(
            f"data.dataset: got {data_spec.dataset!r}; allowed: {', '.join(DATASETS)}"
        )
    if _mura_layout(data_spec):
        table = load_mura_table(root, data_spec.body_parts, follow_symlinks=follow)
    elif data_spec.dataset == "csv":
        table = load_csv_table(root, data_spec.csv, data_spec.classes, data_spec.group_pattern,
                               follow_symlinks=follow)
    else:
        classes = data_spec.classes
        pattern = data_spec.group_pattern
        if data_spec.dataset == "synthetic":  # the generator's names unless the spec has its own
            negative, positive = data_spec.synthetic.classes
            classes = classes or {negative: 0, positive: 1}
            pattern = pattern or FOLDER_GROUP_PATTERN
        table = load_folder_table(root, classes, pattern, follow_symlinks=follow)
    base = Path(table.attrs["base_dir"])
    # Sorted by path, the order the cache stores rows in: the split then depends only on the
    # set of images, not on the CSVs' line order.
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    table.attrs["base_dir"] = str(base)
    return table, base


def _split(table: pd.DataFrame, data_spec: Any) -> Split:
    s, v = data_spec.split, data_spec.validation
    return split_indices(
        table, s.strategy, s.test_fraction, s.stratify, s.seed, v.source, v.fraction,
        validation_group=getattr(v, "group", None), official_test=official_test_part(data_spec),
    )


def _split_params(data_spec: Any) -> dict[str, Any]:
    s, v = data_spec.split, data_spec.validation
    return {
        "strategy": s.strategy, "test_fraction": float(s.test_fraction),
        "stratify": bool(s.stratify), "seed": int(s.seed), "validation_source": v.source,
        "validation_fraction": float(v.fraction),
        # only when set, so the data hash of specs written before the field stays the same
        **({"validation_group": v.group} if getattr(v, "group", None) is not None else {}),
    }


@dataclass(frozen=True)
class DataSummary:
    """Split sizes and leakage from the CSVs alone (no image decoded)."""

    table: pd.DataFrame
    split: Split
    base_dir: Path

    def describe(self) -> list[dict]:
        return describe_split(self.table, self.split)


@dataclass(frozen=True)
class PreparedData:
    table: pd.DataFrame  # row i <-> cache.images[i]
    cache: ImageCache
    split: Split
    data_hash: str
    skipped: tuple[str, ...]

    def describe(self) -> list[dict]:
        """Rows (split, images, positives, studies, patients, study/patient_in_train)."""
        return describe_split(self.table, self.split)


def summarize_without_cache(data_spec: Any, cache_dir: Path | str) -> DataSummary:
    """Table and split without decoding images (synthetic trees are generated if missing)."""
    table, base = load_table(data_spec, cache_dir)
    return DataSummary(table=table, split=_split(table, data_spec), base_dir=base)


def prepare_data(
    data_spec: Any, cache_dir: Path | str, progress: bool = True, build: bool = True
) -> PreparedData | None:
    """Resolve the dataset, build or open the image cache, and split.

    With build=False an existing cache is opened and None is returned when there is none
    (`run --dry-run` asks which runs are done without decoding anything).
    """
    table, base = load_table(data_spec, cache_dir, progress=progress and build)
    if build:
        cache = build_cache(
            table, base, data_spec.image_size, data_spec.resize, cache_dir,
            on_bad_image=data_spec.on_bad_image, progress=progress,
        )
    else:
        key = cache_key(table, base, data_spec.image_size, data_spec.resize)
        folder = Path(cache_dir) / "images" / key[:16]
        if not (folder / COMPLETE_MARKER).is_file():
            return None
        cache = open_cache(folder)
    # Align the table with the cache rows (sorted paths, skipped images left out).
    table = table.set_index("path", drop=False).loc[list(cache.paths)].reset_index(drop=True)
    table.attrs["base_dir"] = str(base)
    labels = table["label"].to_numpy(dtype=np.int64)
    if not np.array_equal(labels, cache.labels):
        # Labels are not part of the cache key (pixels do not depend on them): the CSVs win.
        cache = dataclasses.replace(cache, labels=labels)
    split = _split(table, data_spec)
    h = hashlib.sha256()
    # content, not file stats: the same pixels copied elsewhere or touched keep their runs
    h.update((cache.pixels_sha256 or cache.key).encode())
    h.update(json.dumps([cache.image_size, cache.resize]).encode())
    h.update("\n".join(table["path"].astype(str)).encode())
    h.update(json.dumps(_split_params(data_spec), sort_keys=True).encode())
    # labels, groups and the split all change what a run learns and is scored on
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update("\n".join(table["patient"].astype(str) + "/" + table["study"].astype(str)).encode())
    for part in (split.train, split.test, split.val):
        h.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
        h.update(b"|")
    return PreparedData(
        table=table, cache=cache, split=split, data_hash=h.hexdigest()[:32], skipped=cache.skipped,
    )


def render_split(rows: list[dict]) -> str:
    """The split table printed by `validate`, `run` and `run --dry-run`."""
    from tabulate import tabulate

    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.1f}%"

    table = [
        (r["split"], f"{r['images']:,}", f"{r['positives']:,}", f"{r['studies']:,}",
         f"{r['patients']:,}", pct(r["study_in_train"]), pct(r["patient_in_train"]))
        for r in rows
    ]
    return tabulate(
        table,
        headers=["part", "images", "positives", "studies", "patients",
                 "study also in train", "patient also in train"],
        tablefmt="simple",
    )


def data_record(data: PreparedData, data_spec: Any) -> dict[str, Any]:
    """What results/<spec>/data.json holds: the split, its leakage and the data's identity."""
    rows = data.describe()
    return {
        "data_hash": data.data_hash,
        "cache_key": data.cache.key,
        "dataset": data_spec.dataset,
        "body_parts": list(data_spec.body_parts),
        "image_size": int(data_spec.image_size),
        "resize": data_spec.resize,
        "split": _split_params(data_spec),
        "parts": [
            {k: r[k] for k in ("images", "positives", "studies", "patients")} | {"part": r["split"]}
            for r in rows
        ],
        "leakage": {
            r["split"]: {"study": r["study_in_train"], "patient": r["patient_in_train"]}
            for r in rows
            if r["study_in_train"] is not None
        },
        "skipped": list(data.skipped),
    }
