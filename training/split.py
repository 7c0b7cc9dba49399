"""Lesion-level train / validation / test split.

HAM10000 holds several images of many lesions; if one lesion sat on both sides of a split, the test
would partly measure recall of training images. So whole lesions are assigned, stratified by
diagnosis (every image of a lesion has the same dx), with a fixed seed, and the result is written to a
CSV that evaluation and the bundle's provenance refer to.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from dermscore.bundle import CLASS_CODES
from training.data import Record

SIDES = ("train", "val", "test")


def lesion_split(records: list[Record], val: float = 0.15, test: float = 0.15, seed: int = 42) -> dict[str, str]:
    """Map image_id -> side. Per diagnosis, lesions are shuffled and dealt by their image counts."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val={val} and test={test} must be fractions summing to less than 1")
    lesions: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        lesions[record.lesion_id].append(record)
    by_class: dict[str, list[str]] = defaultdict(list)
    for lesion_id, members in lesions.items():
        diagnoses = {r.dx for r in members}
        if len(diagnoses) != 1:
            raise ValueError(f"lesion {lesion_id} has images with different diagnoses {sorted(diagnoses)}")
        by_class[members[0].dx].append(lesion_id)
    rng = np.random.default_rng(seed)
    side_of: dict[str, str] = {}
    for dx in CLASS_CODES:
        ids = sorted(by_class.get(dx, []))
        rng.shuffle(ids)
        total = sum(len(lesions[i]) for i in ids)
        targets = {"test": test * total, "val": val * total}
        taken = {"test": 0, "val": 0}
        for lesion_id in ids:
            n = len(lesions[lesion_id])
            # Fill test first, then val, each while it stays closest to its target image count.
            side = next(
                (s for s in ("test", "val") if abs(taken[s] + n - targets[s]) < abs(taken[s] - targets[s])), "train"
            )
            if side != "train":
                taken[side] += n
            for record in lesions[lesion_id]:
                side_of[record.image_id] = side
    return side_of


def write_split(records: list[Record], side_of: dict[str, str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image_id", "lesion_id", "dx", "split"))
        for record in records:
            writer.writerow((record.image_id, record.lesion_id, record.dx, side_of[record.image_id]))
    return path


def read_split(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["image_id"]: row["split"] for row in csv.DictReader(handle)}


def split_indices(records: list[Record], side_of: dict[str, str]) -> dict[str, np.ndarray]:
    """Positions in ``records`` of each side; records absent from the split file are an error."""
    missing = [r.image_id for r in records if r.image_id not in side_of]
    if missing:
        raise ValueError(f"{len(missing)} indexed images are not in the split file (e.g. {missing[:3]}); re-run split")
    return {s: np.array([i for i, r in enumerate(records) if side_of[r.image_id] == s], dtype=np.int64) for s in SIDES}


def split_summary(records: list[Record], side_of: dict[str, str], path: Path | None = None) -> dict:
    """Counts per side and class (for provenance), plus the split file's sha256 when given."""
    counts = {s: {dx: 0 for dx in CLASS_CODES} for s in SIDES}
    lesion_sets: dict[str, set[str]] = {s: set() for s in SIDES}
    for record in records:
        side = side_of[record.image_id]
        counts[side][record.dx] += 1
        lesion_sets[side].add(record.lesion_id)
    summary: dict = {
        "images": {s: sum(c.values()) for s, c in counts.items()},
        "lesions": {s: len(v) for s, v in lesion_sets.items()},
        "per_class": counts,
    }
    if path is not None:
        summary["file"] = path.name
        summary["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return summary
