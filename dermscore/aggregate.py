"""Aggregation (pure): ensemble the members, derive the decision fields and flags, roll images up to lesions.

Rules (also in docs/reports.md):

* An image's probabilities are the manifest-weighted mean of its members' softmax outputs, calibrated
  when the bundle carries a ``calibration`` (``dermscore.calibration``): the class columns, confidence and
  malignant probability are then calibrated. ``predicted_class`` stays the balanced decision rule (the
  top class of the uncalibrated, prior-corrected ensemble); a global temperature never changes the top
  class, and ``confidence`` is the calibrated probability of the predicted class.
* Thresholds: each one the run does not set comes from the bundle's ``operating_points`` (fitted on
  validation by training/), else from the defaults below (bundles without operating points).
* ``out-of-distribution`` flag and review reason: ``ood_score`` (``dermscore.ood``) above the bundle's
  OOD threshold (or ``--ood-threshold``): the image is unlike the training images, so its class
  probabilities mean little.
* A lesion's probabilities are the plain (unweighted) mean of its images' ensemble probabilities: each
  image is one view of the same lesion and none is known to be better than another. Its predicted class,
  confidence and malignant probability are computed from that mean exactly as for an image (with a
  calibration: the mean of the uncalibrated probabilities, recovered from the image rows, is calibrated
  and decided like an image's, so a lesion of one image repeats its image row).
* ``malignant`` flag: malignant_probability (sum over the bundle's malignant classes) >= the malignant
  threshold.
* ``review`` flag, with the reasons in ``review_reasons``: ``low-confidence`` (top probability below the
  review threshold); ``members-disagree`` (the ensemble members' top classes differ, unless the bundle's
  operating points turn that part off, or two members' distributions are further apart than the
  disagreement threshold in Jensen-Shannon divergence, base 2, 0 = identical, 1 = disjoint); for
  lesions also ``images-disagree`` (the same test between its images),
  ``image-over-threshold`` (one image is over the malignant threshold though the lesion mean is not), and
  ``members-disagree`` inherited from any of its images; ``poor-quality`` (the image fails a check of
  ``dermscore.gate.quality``, listed in its ``quality`` column), which a lesion also inherits.

Lesion rows are computed from image rows (not from arrays), so reports can be regenerated from stored rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from dermscore.bundle import Bundle, OperatingPoints
from dermscore.calibration import calibrate, uncalibrate
from dermscore.errors import UsageError
from dermscore.gate import quality
from dermscore.lesion_map import LesionMap
from dermscore.records import ImageRef, Scored

DEFAULT_MALIGNANT_THRESHOLD = 0.30
DEFAULT_REVIEW_THRESHOLD = 0.50
DEFAULT_DISAGREEMENT_THRESHOLD = 0.20

IDENTITY_COLUMNS = (
    "patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
    "study_date", "modality", "body_site",
)
# Image rows also carry, under this key and outside the report columns, the rest of their DICOM header
# (dermscore.decode.dicom.HEADER: SOP class, patient name, ...), for the DICOM SR writer.
SOURCE_HEADER = "dicom_header"
LESION_FROM_DICOM = "dicom"
LESION_FROM_IMAGE = "image"
MIXED = "(mixed)"
FLAG_MALIGNANT = "malignant"
FLAG_REVIEW = "review"
POOR_QUALITY = "poor-quality"
FLAG_OOD = "out-of-distribution"
INHERITED_REASONS = ("members-disagree", POOR_QUALITY, FLAG_OOD)  # a lesion has them when any of its images does
SEPARATOR = ";"


@dataclass(frozen=True)
class Thresholds:
    """The decision thresholds of a run; reported in the workbook's Run sheet.

    None means "not set by the run": ``for_bundle`` fills it from the bundle's operating points (or OOD
    threshold), else from the defaults, so a bundle's fitted values apply unless the user overrides them.
    """

    malignant: float | None = None
    review: float | None = None
    disagreement: float | None = None
    ood: float | None = None  # an ood_score, not a probability; None without an OOD detector
    top_class: bool | None = None  # members-disagree also when only their top classes differ (default yes)

    def __post_init__(self) -> None:
        for option, value in (("--malignant-threshold", self.malignant), ("--review-threshold", self.review),
                              ("--disagreement-threshold", self.disagreement)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UsageError(f"{option} must be a probability between 0 and 1, got {value}.")
        if self.ood is not None and not self.ood >= 0.0:
            raise UsageError(f"--ood-threshold must be an ood_score of 0 or more, got {self.ood}.")

    def for_bundle(self, bundle: Bundle | None) -> Thresholds:
        """Every threshold set: the run's own, else the bundle's fitted value, else the default."""
        return replace(self, **{name: value for name, (value, _) in self.sources(bundle).items()})

    def sources(self, bundle: Bundle | None) -> dict[str, tuple[Any, str]]:
        """``name -> (value, where it came from)``: "run" (command line or job file), "bundle" or "default"."""
        fitted = bundle.operating_points if bundle else OperatingPoints()
        candidates = {
            "malignant": (fitted.malignant, DEFAULT_MALIGNANT_THRESHOLD),
            "review": (fitted.review, DEFAULT_REVIEW_THRESHOLD),
            "disagreement": (fitted.disagreement, DEFAULT_DISAGREEMENT_THRESHOLD),
            "ood": (bundle.ood.threshold if bundle and bundle.ood else None, None),
            "top_class": (fitted.top_class_disagreement, True),
        }
        out: dict[str, tuple[float | None, str]] = {}
        for field in fields(self):
            own, (from_bundle, default) = getattr(self, field.name), candidates[field.name]
            out[field.name] = (own, "run") if own is not None else (
                (from_bundle, "bundle") if from_bundle is not None else (default, "default"))
        return out


def member_matrix(member_probabilities: Mapping[str, np.ndarray], bundle: Bundle) -> np.ndarray:
    """(members, classes) float64, in the bundle's member order."""
    return np.stack([np.asarray(member_probabilities[m.name], dtype=np.float64) for m in bundle.members])


def _weighted_mean(members: np.ndarray, bundle: Bundle) -> np.ndarray:
    weights = np.array([m.weight for m in bundle.members], dtype=np.float64)
    return np.tensordot(weights / weights.sum(), members, axes=1)


def ensemble(member_probabilities: Mapping[str, np.ndarray], bundle: Bundle) -> np.ndarray:
    """Weighted mean of member softmax outputs, weights from the manifest (normalised to sum to 1)."""
    return _weighted_mean(member_matrix(member_probabilities, bundle), bundle)


def decision(probabilities: np.ndarray, bundle: Bundle, top: int | None = None) -> dict[str, Any]:
    """Predicted class (``top``, else the most probable), its probability, and the summed probability of
    the malignant classes."""
    top = int(np.argmax(probabilities)) if top is None else top
    malignant = [bundle.classes.index(c) for c in bundle.malignant_classes]
    return {
        "predicted_class": bundle.classes[top],
        "confidence": float(probabilities[top]),
        "malignant_probability": float(probabilities[malignant].sum()),
    }


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits along the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def max_divergence(distributions: np.ndarray) -> float:
    """Largest Jensen-Shannon divergence (bits, 0..1) between any two rows; 0 for fewer than two.

    One row against all the others at a time, so memory stays O(n) for long DICOM series.
    """
    p = np.clip(np.asarray(distributions, dtype=np.float64), 0.0, None)
    p = p / np.where(p.sum(axis=1, keepdims=True) > 0, p.sum(axis=1, keepdims=True), 1.0)
    entropy = _entropy_bits(p)
    worst = 0.0
    for i in range(len(p) - 1):
        mixture = (p[i] + p[i + 1:]) / 2.0
        js = _entropy_bits(mixture) - (entropy[i] + entropy[i + 1:]) / 2.0
        worst = max(worst, float(js.max()))
    return min(max(worst, 0.0), 1.0)


def disagree(distributions: np.ndarray, disagreement: float, top_class: bool = True) -> tuple[bool, float]:
    """Whether the rows' divergence reaches ``disagreement`` (or, with ``top_class``, their top classes
    differ), and the divergence. Callers pass a resolved threshold (``Thresholds.for_bundle``)."""
    divergence = max_divergence(distributions)
    tops = set(np.argmax(np.asarray(distributions), axis=1).tolist())
    return ((top_class and len(tops) > 1) or divergence >= disagreement), divergence


def _flags(malignant: bool, reasons: Iterable[str]) -> dict[str, str]:
    unique = list(dict.fromkeys(reasons))
    flags = ([FLAG_MALIGNANT] if malignant else []) + ([FLAG_REVIEW] if unique else []) + (
        [FLAG_OOD] if FLAG_OOD in unique else [])
    return {"flags": SEPARATOR.join(flags), "review_reasons": SEPARATOR.join(unique)}


def lesion_identity(ref: ImageRef, lesion_maps: Sequence[LesionMap] = ()) -> tuple[str, str]:
    """(lesion id, where it came from): a lesion map entry first, then the DICOM series, else the image itself."""
    for lesion_map in lesion_maps:
        found = lesion_map.lookup(ref.location)
        if found is not None:
            return found, lesion_map.kind
    if ref.lesion_id:
        return ref.lesion_id, LESION_FROM_DICOM
    return image_label(ref.location, ref.frame), LESION_FROM_IMAGE


def image_label(location: str, frame: int | str | None) -> str:
    """How one image is named in lesion ids and lists: its location, plus ``#frame`` for DICOM frames."""
    return location if frame in (None, "") else f"{location}#{frame}"


def member_column(member_name: str) -> str:
    return f"top_class_{member_name}"


def image_columns(bundle: Bundle) -> list[str]:
    """images.csv / Images sheet columns; the order is the report's contract (see docs/reports.md)."""
    return ["source", "frame", "sha256", "lesion_id", "lesion_source", *IDENTITY_COLUMNS, *bundle.classes,
            "predicted_class", "confidence", "malignant_probability",
            *(member_column(m.name) for m in bundle.members), "member_divergence", "quality",
            *(["ood_score"] if bundle.ood else []), "flags", "review_reasons",
            "bundle_name", "bundle_version"]


def lesion_columns(bundle: Bundle) -> list[str]:
    """lesions.csv / Lesions sheet columns; the order is the report's contract (see docs/reports.md)."""
    return ["lesion_id", "lesion_source", "n_images", "patient_id", "body_site", *bundle.classes,
            "predicted_class", "confidence", "malignant_probability", "image_divergence", "flags",
            "review_reasons", "images", "bundle_name", "bundle_version"]


def image_row(
    scored: Scored, bundle: Bundle, thresholds: Thresholds = Thresholds(), lesion_maps: Sequence[LesionMap] = ()
) -> dict[str, Any]:
    """One images.csv row: identity, ensemble probabilities, decision, per-member top class and flags."""
    thresholds = thresholds.for_bundle(bundle)
    members = member_matrix(scored.member_probabilities, bundle)
    balanced = _weighted_mean(members, bundle)
    probabilities = calibrate(balanced, bundle.calibration)
    ref = scored.ref
    lesion_id, lesion_source = lesion_identity(ref, lesion_maps)
    row: dict[str, Any] = {"source": ref.location, "frame": ref.frame, "sha256": ref.sha256,
                           "lesion_id": lesion_id, "lesion_source": lesion_source}
    row.update({key: _text(ref.attributes.get(key)) for key in IDENTITY_COLUMNS})
    row.update({code: float(p) for code, p in zip(bundle.classes, probabilities)})
    row.update(decision(probabilities, bundle, top=int(np.argmax(balanced))))
    for member, member_probabilities in zip(bundle.members, members):
        row[member_column(member.name)] = bundle.classes[int(np.argmax(member_probabilities))]
    members_disagree, row["member_divergence"] = disagree(members, thresholds.disagreement, bool(thresholds.top_class))
    poor = quality.problems(ref.quality, bundle.members)
    row["quality"] = quality.label(poor, SEPARATOR)
    if bundle.ood:  # the column exists only for bundles with a detector: older bundles' rows stay as they were
        row["ood_score"] = scored.ood_score
    out_of_distribution = scored.ood_score is not None and thresholds.ood is not None and scored.ood_score > thresholds.ood
    reasons = (["low-confidence"] if row["confidence"] < thresholds.review else []) + (
        ["members-disagree"] if members_disagree else []) + ([POOR_QUALITY] if poor else []) + (
        [FLAG_OOD] if out_of_distribution else [])
    row.update(_flags(row["malignant_probability"] >= thresholds.malignant, reasons))
    row["bundle_name"] = bundle.name
    row["bundle_version"] = bundle.version
    row[SOURCE_HEADER] = {key: value for key, value in ref.attributes.items() if key not in IDENTITY_COLUMNS}
    return row


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _common(rows: Sequence[Mapping[str, Any]], key: str) -> str | None:
    """The value all images of a lesion share, MIXED when they differ (a hint the lesion map is wrong)."""
    values = {row.get(key) for row in rows if row.get(key) not in (None, "")}
    if not values:
        return None
    return values.pop() if len(values) == 1 else MIXED


def lesion_rows(
    image_rows: Iterable[Mapping[str, Any]], bundle: Bundle, thresholds: Thresholds = Thresholds()
) -> list[dict[str, Any]]:
    """One row per lesion id, in order of first appearance, from the image rows (see module docstring)."""
    thresholds = thresholds.for_bundle(bundle)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in image_rows:
        groups.setdefault(str(row["lesion_id"]), []).append(row)
    out = []
    for lesion_id, rows in groups.items():
        images = np.array([[float(r[c]) for c in bundle.classes] for r in rows], dtype=np.float64)
        balanced = uncalibrate(images, bundle.calibration).mean(axis=0)
        probabilities = calibrate(balanced, bundle.calibration)
        lesion: dict[str, Any] = {"lesion_id": lesion_id, "lesion_source": rows[0]["lesion_source"],
                                  "n_images": len(rows), "patient_id": _common(rows, "patient_id"),
                                  "body_site": _common(rows, "body_site")}
        lesion.update({code: float(p) for code, p in zip(bundle.classes, probabilities)})
        lesion.update(decision(probabilities, bundle, top=int(np.argmax(balanced))))
        images_disagree, lesion["image_divergence"] = disagree(images, thresholds.disagreement)
        malignant = lesion["malignant_probability"] >= thresholds.malignant
        reasons = ["low-confidence"] if lesion["confidence"] < thresholds.review else []
        if images_disagree:
            reasons.append("images-disagree")
        if not malignant and any(float(r["malignant_probability"]) >= thresholds.malignant for r in rows):
            reasons.append("image-over-threshold")
        image_reasons = {reason for r in rows for reason in str(r.get("review_reasons") or "").split(SEPARATOR)}
        reasons.extend(reason for reason in INHERITED_REASONS if reason in image_reasons)
        lesion.update(_flags(malignant, reasons))
        lesion["images"] = " | ".join(image_label(str(r["source"]), r.get("frame")) for r in rows)
        lesion["bundle_name"] = bundle.name
        lesion["bundle_version"] = bundle.version
        out.append(lesion)
    return out
