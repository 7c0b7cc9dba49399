"""Plain records passed between stages, so each stage can be tested alone with arrays and dataclasses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_LESION_ATTRIBUTE = "SeriesInstanceUID"  # a DICOM series is one lesion unless told otherwise


@dataclass(frozen=True)
class Source:
    """Something discovery found that may hold images; nothing has been read from it yet.

    ``location`` is what reports show (a path, or ``archive.zip!member/path``); ``read`` returns its
    bytes, so folder files and zip members flow through the same decode stage.
    """

    location: str
    read: Callable[[], bytes] = field(compare=False, repr=False)
    kind: str = "file"  # file | zip-member | dicomdir-ref
    # DICOM attribute that names the lesion (--lesion-attribute); carried with the source so any
    # engine's decode step sees it without extra arguments.
    lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE


NOT_AN_IMAGE = "not an image"


@dataclass(frozen=True)
class Skipped:
    """An object deliberately not scored: a non-image DICOM object (SR, presentation state, DICOMDIR) or
    one the modality gate keeps out (CT, MR, ...). Listed in skipped.csv, never a failure.

    ``category`` is the short form reports and the run summary group by (``not an image``,
    ``DICOMDIR``, ``modality CT``); ``reason`` says in words why, and what to do to score it.
    """

    location: str
    reason: str
    category: str = NOT_AN_IMAGE


@dataclass(frozen=True)
class ImageRef:
    """Identity of one scored image: a raster file or one frame of a DICOM object (no pixels).

    Kept apart from the pixels so results can travel to reports and the ledger without holding images.
    """

    location: str
    sha256: str  # of the source's bytes, so a report row can be traced to the exact file
    frame: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict, compare=False)  # DICOM identity, body site
    lesion_id: str | None = None
    # A small PNG of the image for the workbook, made at decode only with --thumbnails, so full-size
    # pixels are never kept past preprocessing.
    thumbnail: bytes | None = field(default=None, compare=False, repr=False)
    # Image-quality measurements (dermscore.gate.quality.measure), made in the decode threads; None for
    # images scored before quality was measured. The verdict is derived from them at report time.
    quality: dict[str, float] | None = field(default=None, compare=False)


@dataclass
class Frame:
    """A decoded image ready for preprocessing."""

    ref: ImageRef
    rgb: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class Failure:
    """An input that could not be scored, with the stage that failed and a plain-words reason."""

    location: str
    stage: str
    reason: str


@dataclass
class Scored:
    """An image's per-member probabilities (class order of the bundle); the ensemble is aggregate's job.

    ``ood_score`` (``dermscore.ood``) is computed right after inference from the members' features, which
    are not kept; None for a bundle without an OOD detector.
    """

    ref: ImageRef
    member_probabilities: dict[str, np.ndarray]
    ood_score: float | None = None


# --- reviewer verdicts (dermscore.review) ----------------------------------------------------------
NOT_A_LESION = "not-a-lesion"  # the image shows no lesion (skin, a ruler, a photograph): excluded from accuracy
UNSURE = "unsure"  # the reviewer cannot tell: excluded from accuracy, counted
VERDICT_COLUMNS = ("reviewer_class", "reviewer", "reviewer_note")  # Lesions sheet and lesions.csv, in this order


def verdict_choices(classes: Sequence[str]) -> tuple[str, ...]:
    """What a reviewer may write in ``reviewer_class``: the bundle's classes, then the two non-answers."""
    return (*classes, NOT_A_LESION, UNSURE)


@dataclass(frozen=True)
class Verdict:
    """A reviewer's word on one lesion, as read from a report's Lesions sheet (any field may be empty).

    Two verdicts are equal when what the reviewer wrote is equal; when it was recorded does not count,
    so importing the same file twice changes nothing.
    """

    lesion_id: str
    reviewer_class: str | None = None
    reviewer: str | None = None
    reviewer_note: str | None = None
    recorded_at: str = field(default="", compare=False)

    def columns(self) -> dict[str, str | None]:
        """The report cells this verdict fills."""
        return {name: getattr(self, name) for name in VERDICT_COLUMNS}
