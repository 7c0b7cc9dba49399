"""Lesion identity from CSV files: which images show the same lesion when DICOM series cannot say.

Two layouts are read: ``--lesion-map`` (columns ``image`` and ``lesion_id``) and a HAM10000-style
``--metadata`` file (columns ``image_id`` and ``lesion_id``). An image key matches a scored image by
its full location, else its file name, else its file stem, so a map written for one folder layout
keeps working when the folder is moved or zipped. Reading the file is the only I/O; lookups are pure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dermscore.errors import UsageError

LESION_MAP = "lesion-map"
METADATA = "metadata"
IMAGE_COLUMN = {LESION_MAP: "image", METADATA: "image_id"}
LESION_COLUMN = "lesion_id"


@dataclass(frozen=True)
class LesionMap:
    """Image key -> lesion id, read from one CSV file; ``kind`` is reported as the lesion's source."""

    kind: str
    path: Path
    lesions: dict[str, str]

    def lookup(self, location: str) -> str | None:
        """The lesion id for an image location (``dir/x.jpg``, ``a.zip!dir/x.jpg``), or None."""
        name = PurePosixPath(location.replace("\\", "/").rsplit("!", 1)[-1]).name
        for key in (location, name, PurePosixPath(name).stem):
            if key in self.lesions:
                return self.lesions[key]
        return None


def _read_rows(reader: csv.DictReader, image_column: str, lesions: dict[str, str], where: str) -> None:
    missing = {image_column, LESION_COLUMN} - set(reader.fieldnames or ())
    if missing:
        raise UsageError(
            f"{where}: needs a header with columns '{image_column}' and '{LESION_COLUMN}'; "
            f"missing {sorted(missing)} (found {reader.fieldnames or 'no header'})."
        )
    for row in reader:
        image = (row[image_column] or "").strip()
        lesion = (row[LESION_COLUMN] or "").strip()
        if not image or not lesion:
            continue  # an image with no lesion id is its own lesion, as if it were not listed
        known = lesions.setdefault(image, lesion)
        if known != lesion:
            raise UsageError(
                f"{where}, line {reader.line_num}: image {image!r} is given lesion {lesion!r} but an earlier "
                f"line gave {known!r}; an image belongs to one lesion. Fix the file."
            )


def read_lesion_map(path: Path, kind: str = LESION_MAP) -> LesionMap:
    """Parse a lesion CSV; refuses missing columns and an image given two different lesion ids."""
    if kind not in IMAGE_COLUMN:
        raise ValueError(f"unknown lesion map kind {kind!r}; expected one of {sorted(IMAGE_COLUMN)}")
    image_column = IMAGE_COLUMN[kind]
    option = f"--{kind}"
    try:
        handle = open(path, encoding="utf-8-sig", newline="")  # utf-8-sig: Excel saves CSV with a BOM
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot open the file ({exc.strerror or exc}).") from exc
    lesions: dict[str, str] = {}
    with handle:
        try:
            _read_rows(csv.DictReader(handle), image_column, lesions, f"{option} {path}")
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UsageError(f"{option} {path}: not a UTF-8 CSV file ({exc}).") from exc
    return LesionMap(kind=kind, path=Path(path), lesions=lesions)


def read_lesion_maps(lesion_map: Path | None = None, metadata: Path | None = None) -> list[LesionMap]:
    """The maps a run was given, in lookup order: an explicit ``--lesion-map`` wins over ``--metadata``."""
    return [read_lesion_map(path, kind) for path, kind in ((lesion_map, LESION_MAP), (metadata, METADATA)) if path]
