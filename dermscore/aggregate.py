"""Aggregation (pure): ensemble the members, derive the decision fields, build report rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dermscore.bundle import Bundle
from dermscore.records import Scored


def ensemble(member_probabilities: Mapping[str, np.ndarray], bundle: Bundle) -> np.ndarray:
    """Weighted mean of member softmax outputs, weights from the manifest (normalised to sum to 1)."""
    weights = np.array([m.weight for m in bundle.members], dtype=np.float64)
    stacked = np.stack([np.asarray(member_probabilities[m.name], dtype=np.float64) for m in bundle.members])
    return np.tensordot(weights / weights.sum(), stacked, axes=1)


def decision(probabilities: np.ndarray, bundle: Bundle) -> dict[str, Any]:
    """Predicted class, its probability, and the summed probability of the malignant classes."""
    top = int(np.argmax(probabilities))
    malignant = [bundle.classes.index(c) for c in bundle.malignant_classes]
    return {
        "predicted_class": bundle.classes[top],
        "confidence": float(probabilities[top]),
        "malignant_probability": float(probabilities[malignant].sum()),
    }


def image_row(scored: Scored, bundle: Bundle) -> dict[str, Any]:
    """One images.csv row; column order is the report's contract (see README, 'Reports')."""
    probabilities = ensemble(scored.member_probabilities, bundle)
    ref = scored.ref
    row: dict[str, Any] = {"source": ref.location, "frame": ref.frame, "sha256": ref.sha256}
    row.update({code: float(p) for code, p in zip(bundle.classes, probabilities)})
    row.update(decision(probabilities, bundle))
    row["bundle_name"] = bundle.name
    row["bundle_version"] = bundle.version
    return row
