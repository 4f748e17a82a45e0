"""Helpers for the data-layer tests: small generated MURA trees and duck-typed data specs."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

from harness.data.synthetic import make_mura_tree

# Small enough that a tree takes well under a second (about 140 images of at most 96 px).
SMALL: dict[str, Any] = {"patients": 30, "seed": 0, "min_size": 48, "max_size": 96}

_TREES: dict[tuple, Path] = {}


def shared_tree(tmp_path_factory: Any, **params: Any) -> Path:
    """A generated tree shared by the whole session; never modify it (use copy_tree)."""
    merged = {**SMALL, **params}
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in merged.items()))
    if key not in _TREES:
        out = tmp_path_factory.mktemp("mura")
        _TREES[key] = make_mura_tree(out, workers=1, **merged)
    return _TREES[key]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def data_spec(**overrides: Any) -> NS:
    """A data spec with the attribute names of harness.spec (small synthetic by default)."""
    spec: dict[str, Any] = {
        "dataset": "synthetic",
        "root": None,
        "body_parts": ("WRIST",),
        "image_size": 32,
        "resize": "bilinear",
        "split": NS(strategy="image", test_fraction=0.2, stratify=False, seed=0),
        "validation": NS(source="official", fraction=0.1),
        "on_bad_image": "fail",
        "synthetic": NS(patients=30, seed=0, min_size=48, max_size=96, label_noise=0.0,
                        valid_fraction=0.15, difficulty=0.5),
    }
    spec.update(overrides)
    return NS(**spec)


def augmentation(**overrides: Any) -> NS:
    values: dict[str, Any] = {"enabled": True, "rotation": 15.0, "scale": (0.9, 1.1),
                              "hflip": True, "vflip": False}
    values.update(overrides)
    return NS(**values)
