"""isic.csv: the image rows in the ISIC 2018 Task 3 submission layout, so the challenge's own scoring
tools can read a run's results.

Layout: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one row per scored image, the probabilities copied from
the image rows (the ensemble's, never recomputed). The ``image`` column is the file stem, as the
challenge names its images (``ISIC_0024306``):

* a zip member is named by its member's stem (``batch.zip!day1/ISIC_1.jpg`` -> ``ISIC_1``);
* a DICOM object with several frames gets one row per frame, ``<stem>_frame<n>``; a single-frame object
  is just its stem;
* two inputs that would get the same name are never merged or dropped: the first keeps the name, the
  later ones get ``__2``, ``__3``, ... in report order, and the renaming is reported as a warning naming
  both sources (images.csv has the full source of every row).

A bundle whose classes are not exactly the seven ISIC 2018 classes gets no isic.csv (with a warning):
the layout has no place for other classes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from dermscore.bundle import Bundle
from dermscore.report.csv import write_csv

ISIC_CSV = "isic.csv"
ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_COLUMNS = ("image", *ISIC_CLASSES)
ARCHIVE_MEMBER = "!"  # discovery names a zip member ``archive.zip!member/path``
RENAMED_SEPARATOR = "__"


def stem(location: str) -> str:
    """The file stem of a report location, for plain files and zip members alike (any path separator)."""
    name = location.rsplit(ARCHIVE_MEMBER, 1)[-1].replace("\\", "/")
    return PurePosixPath(name).stem


def image_names(image_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``image`` value of each row, in row order, unique (see the module docstring for the rules)."""
    frames = Counter(str(row["source"]) for row in image_rows)
    wanted = [
        stem(str(row["source"])) + (f"_frame{row['frame']}" if frames[str(row["source"])] > 1 else "")
        for row in image_rows
    ]
    taken: dict[str, str] = {}  # name -> source that holds it
    names = []
    for row, name in zip(image_rows, wanted):
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}{RENAMED_SEPARATOR}{n}"
        if unique != name:
            warnings.warn(
                f"isic.csv: {row['source']} and {taken[name]} both have the image name {name!r}; "
                f"the later one is written as {unique!r}. Rename one of the files to keep challenge names.",
                UserWarning, stacklevel=2,
            )
        taken[unique] = str(row["source"])
        names.append(unique)
    return names


def isic_rows(image_rows: Sequence[Mapping[str, Any]], bundle: Bundle) -> list[dict[str, Any]]:
    """One ISIC row per image row: the unique image name and the row's own class probabilities."""
    by_isic = {code.upper(): code for code in bundle.classes}
    return [{"image": name, **{isic: row[by_isic[isic]] for isic in ISIC_CLASSES}}
            for name, row in zip(image_names(image_rows), image_rows)]


def write_isic_csv(folder: Path, bundle: Bundle, image_rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """Write ``folder/isic.csv``; None (and a warning) when the bundle's classes are not ISIC 2018's."""
    if sorted(code.upper() for code in bundle.classes) != sorted(ISIC_CLASSES):
        warnings.warn(
            f"isic.csv not written: bundle {bundle.name} has classes {', '.join(bundle.classes)}, not the seven "
            f"ISIC 2018 Task 3 classes {', '.join(ISIC_CLASSES)}.",
            UserWarning, stacklevel=2,
        )
        return None
    return write_csv(Path(folder) / ISIC_CSV, ISIC_COLUMNS, isic_rows(image_rows, bundle))
