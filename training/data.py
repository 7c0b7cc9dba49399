"""Dataset index and image cache.

The index is the one list of usable images that every later step refers to. Problems (unknown
diagnosis, image missing or undecodable, duplicated rows, images nobody listed) are collected and
reported instead of being dropped silently, because a quietly shrinking dataset biases every figure
computed from it. The cache decodes and resizes each image once with ``dermscore.preprocess.resize``
(the function scoring uses), so epochs only read uint8 arrays and training sees the same pixels as
inference.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dermscore.bundle import CLASS_CODES
from dermscore.preprocess import resize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INDEX_FIELDS = ("image_id", "lesion_id", "dx", "age", "sex", "localization", "path")


@dataclass(frozen=True)
class Record:
    """One usable image with its labels and metadata (strings as in the CSV; age may be empty)."""

    image_id: str
    lesion_id: str
    dx: str
    age: str
    sex: str
    localization: str
    path: str

    @property
    def label(self) -> int:
        return CLASS_CODES.index(self.dx)


@dataclass(frozen=True)
class Problem:
    """Why a metadata row or an image file could not be used."""

    image_id: str
    kind: str  # unknown_label | missing_image | unreadable_image | duplicate_row | unlisted_image
    detail: str


def image_folders(root: Path) -> list[Path]:
    """Folders holding images: the official layout (``HAM10000_images_part_1/_part_2``), ``images/``, or root."""
    root = Path(root)
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("ham10000_images"))
    if (root / "images").is_dir():
        candidates.append(root / "images")
    return candidates or [root]


def _find_images(folders: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(path.stem, path)
    return found


def _readable(path: Path) -> str | None:
    """None when the image decodes fully, else the reason (a truncated JPEG only fails on load)."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def build_index(metadata_csv: Path, folders: list[Path] | None = None) -> tuple[list[Record], list[Problem]]:
    """Match metadata rows to image files; return the usable records and every problem found."""
    metadata_csv = Path(metadata_csv)
    folders = folders or image_folders(metadata_csv.parent)
    files = _find_images(folders)
    records: list[Record] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(metadata_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            image_id, dx = row["image_id"].strip(), row["dx"].strip()
            if image_id in seen:
                problems.append(Problem(image_id, "duplicate_row", "image_id listed more than once; first row kept"))
                continue
            seen.add(image_id)
            if dx not in CLASS_CODES:
                problems.append(Problem(image_id, "unknown_label", f"dx {dx!r} is not one of {CLASS_CODES}"))
                continue
            path = files.get(image_id)
            if path is None:
                problems.append(Problem(image_id, "missing_image", f"no image file in {[str(f) for f in folders]}"))
                continue
            reason = _readable(path)
            if reason:
                problems.append(Problem(image_id, "unreadable_image", f"{path}: {reason}"))
                continue
            records.append(
                Record(
                    image_id=image_id,
                    lesion_id=row["lesion_id"].strip(),
                    dx=dx,
                    age=row.get("age", "").strip(),
                    sex=row.get("sex", "").strip(),
                    localization=row.get("localization", "").strip(),
                    path=str(path.resolve()),
                )
            )
    for image_id in sorted(set(files) - seen):
        problems.append(Problem(image_id, "unlisted_image", f"{files[image_id]} has no metadata row"))
    return records, problems


def write_index(records: list[Record], problems: list[Problem], folder: Path) -> tuple[Path, Path]:
    """Write ``index.csv`` and ``index_problems.csv`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    index_path, problems_path = folder / "index.csv", folder / "index_problems.csv"
    with open(index_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=INDEX_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    with open(problems_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("image_id", "kind", "detail"))
        writer.writeheader()
        writer.writerows(asdict(p) for p in problems)
    return index_path, problems_path


def read_index(path: Path) -> list[Record]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [Record(**{k: row[k] for k in INDEX_FIELDS}) for row in csv.DictReader(handle)]


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([r.label for r in records], dtype=np.int64)


def load_image_cache(records: list[Record], size: tuple[int, int], method: str, folder: Path) -> np.ndarray:
    """uint8 (N, h, w, 3) images in ``records`` order, decoded and resized once and kept as ``.npy``.

    The cache key includes the image ids, so a changed index never reuses a stale cache.
    """
    ids = "\n".join(r.image_id for r in records).encode()
    key = hashlib.sha256(ids).hexdigest()[:12]
    path = Path(folder) / f"images_{size[0]}x{size[1]}_{method}_{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    array = np.empty((len(records), size[0], size[1], 3), dtype=np.uint8)
    for i, record in enumerate(records):
        with Image.open(record.path) as image:
            array[i] = resize(np.asarray(image.convert("RGB")), size, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps({"count": len(records), "size": list(size), "method": method}))
    return np.load(path, mmap_mode="r")
