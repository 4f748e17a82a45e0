"""Train / test / validation indices over an image table, with leakage figures.

    split = split_indices(table, "image", 0.2, False, 0, "official", 0.1)
    split.test            # int64 row indices into table
    split.leakage_test    # Leakage(study=0.92, patient=0.93): share of test images seen in train

Test comes out of the OFFICIAL train rows (split == "train"). Strategy "image" is the paper's
random split: sklearn `train_test_split(rows, test_size, random_state=seed, shuffle=True,
stratify=labels or None)`, so 9,752 images give 1,951 test images. "study" / "patient" split whole
groups: groups are shuffled with the seed and the test set takes the prefix whose image count is
closest to the fraction (per label stratum of the group's majority label when stratified).
Strategy "official" takes the dataset's own test part instead (`official_test`: "valid" for
MURA, whose valid set is the test set then; "test" for a folder's test/ or a csv split column).
Validation "official" is the dataset's validation part (MURA's valid set, a folder's val/, a csv
split value val); "train" splits the remaining train rows again with seed + 1, keeping
`validation_group` (image | study | patient) together; by default the split strategy's group
(image for official).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.vocab import GROUP_LEVELS, SPLIT_STRATEGIES, VALIDATION_SOURCES


@dataclass(frozen=True)
class Leakage:
    """Share of a part's images whose study / patient also has images in train."""

    study: float
    patient: float


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray
    leakage_test: Leakage
    leakage_val: Leakage


def _check_fraction(field: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise UserError(f"{field}: got {value}; allowed: a fraction strictly between 0 and 1")


def _grouped(
    rows: np.ndarray, groups: np.ndarray, labels: np.ndarray, fraction: float, stratify: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"row": rows, "group": groups, "label": labels})
    per_group = frame.groupby("group", sort=True).agg(n=("row", "size"), pos=("label", "mean"))
    if stratify:
        strata = (per_group["pos"] >= 0.5).astype(int).to_numpy()
    else:
        strata = np.zeros(len(per_group), dtype=int)
    names = per_group.index.to_numpy()
    sizes = per_group["n"].to_numpy()
    test_groups: list[np.ndarray] = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        members = members[rng.permutation(len(members))]
        target = fraction * sizes[members].sum()
        cumulative = np.concatenate([[0], np.cumsum(sizes[members])])
        cut = int(np.argmin(np.abs(cumulative - target)))
        test_groups.append(names[members[:cut]])
    in_test = frame["group"].isin(np.concatenate(test_groups)).to_numpy()
    return np.sort(rows[~in_test]), np.sort(rows[in_test])


def _divide(
    table: pd.DataFrame, rows: np.ndarray, strategy: str, fraction: float, stratify: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    labels = table["label"].to_numpy()[rows]
    if strategy == "image":
        from sklearn.model_selection import train_test_split  # slow import, only needed here

        n_test = math.ceil(fraction * len(rows))
        if len(rows) < 2 or n_test >= len(rows):
            return (rows[:0], rows) if n_test >= len(rows) else (rows, rows[:0])
        counts = np.bincount(labels, minlength=2)
        can_stratify = stratify and counts[counts > 0].min() >= 2
        keep, hold = train_test_split(
            rows, test_size=fraction, random_state=seed, shuffle=True,
            stratify=labels if can_stratify else None,
        )
        return np.sort(keep), np.sort(hold)
    groups = table[strategy].to_numpy()[rows]
    return _grouped(rows, groups, labels, fraction, stratify, seed)


def _leakage(table: pd.DataFrame, train: np.ndarray, part: np.ndarray) -> Leakage:
    if len(part) == 0:
        return Leakage(0.0, 0.0)
    shares = []
    for column in ("study", "patient"):
        seen = set(table[column].to_numpy()[train])
        shares.append(float(np.mean([v in seen for v in table[column].to_numpy()[part]])))
    return Leakage(study=shares[0], patient=shares[1])


def split_indices(
    table: pd.DataFrame,
    strategy: str,
    test_fraction: float,
    stratify: bool,
    seed: int,
    validation_source: str,
    validation_fraction: float,
    validation_group: str | None = None,
    official_test: str = "test",
) -> Split:
    """Split the table's official train rows into train/test (+ val); see the module docstring."""
    if strategy not in SPLIT_STRATEGIES:
        raise UserError(
            f"data.split.strategy: got {strategy!r}; allowed: {', '.join(SPLIT_STRATEGIES)}"
        )
    if validation_source not in VALIDATION_SOURCES:
        raise UserError(
            f"data.validation.source: got {validation_source!r}; allowed: "
            f"{', '.join(VALIDATION_SOURCES)}"
        )
    if validation_group is not None and validation_group not in GROUP_LEVELS:
        raise UserError(
            f"data.validation.group: got {validation_group!r}; allowed: {', '.join(GROUP_LEVELS)}"
        )
    _check_fraction("data.split.test_fraction", test_fraction)
    if validation_source == "train":
        _check_fraction("data.validation.fraction", validation_fraction)
    split_col = table["split"].to_numpy()
    pool = np.flatnonzero(split_col == "train").astype(np.int64)
    if len(pool) == 0:
        raise UserError("data.split: the official train set has no images for these body parts")
    if strategy == "official":
        train = pool
        test = np.flatnonzero(split_col == official_test).astype(np.int64)
        if len(test) == 0:
            raise UserError(
                "data.split.strategy: 'official' but the dataset has no test part of its own "
                "(MURA's valid set, a folder's test/, a csv split value test); use strategy "
                "image, study or patient to split one off the training part"
            )
        if validation_source == "official" and official_test == "valid":
            raise UserError(
                "data.validation.source: 'official' is MURA's valid set, which split.strategy "
                "'official' already uses as the test set; use data.validation.source: train "
                "(with data.validation.group: patient)"
            )
    else:
        train, test = _divide(table, pool, strategy, test_fraction, stratify, seed)
    if validation_source == "official":
        val = np.flatnonzero(split_col == "valid").astype(np.int64)
        if len(val) == 0:
            raise UserError(
                "data.validation.source: 'official' but the dataset has no validation part "
                "(MURA's valid set for these body parts, a folder's val/, a csv split value "
                "val); use data.validation.source: train"
            )
    else:
        group = validation_group or (strategy if strategy != "official" else "image")
        train, val = _divide(table, train, group, validation_fraction, stratify, seed + 1)
    sizes = f"train {len(train)}, test {len(test)}, validation {len(val)} images"
    if len(train) == 0 and strategy == "official":
        raise UserError(
            f"data.validation.fraction: {validation_fraction} leaves no training images "
            f"({sizes}); lower it"
        )
    if len(test) == 0 or len(train) == 0:
        raise UserError(
            f"data.split.test_fraction: {test_fraction} with strategy {strategy!r} leaves an empty "
            f"part ({sizes} of {len(pool)} official train images); choose a fraction that leaves "
            "both train and test non-empty"
        )
    if len(val) == 0:
        raise UserError(
            f"data.validation.fraction: {validation_fraction} with strategy {strategy!r} leaves "
            f"the validation set empty ({sizes}); raise it or use data.validation.source: official"
        )
    return Split(
        train=train.astype(np.int64),
        test=test.astype(np.int64),
        val=val.astype(np.int64),
        leakage_test=_leakage(table, train, test),
        leakage_val=_leakage(table, train, val),
    )


def describe_split(table: pd.DataFrame, split: Split) -> list[dict]:
    """Per part: images, positives, studies, patients, and (test/val) the leakage shares."""
    rows = []
    for name, idx, leak in (
        ("train", split.train, None),
        ("test", split.test, split.leakage_test),
        ("val", split.val, split.leakage_val),
    ):
        part = table.iloc[idx]
        rows.append(
            {
                "split": name,
                "images": int(len(idx)),
                "positives": int(part["label"].sum()),
                "studies": int(part["study"].nunique()),
                "patients": int(part["patient"].nunique()),
                "study_in_train": None if leak is None else leak.study,
                "patient_in_train": None if leak is None else leak.patient,
            }
        )
    return rows
