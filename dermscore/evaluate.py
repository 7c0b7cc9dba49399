"""Local performance metrics (pure functions over arrays): how the ensemble does on a clinic's own images.

The figures the model card reports, computed the same way so a clinic can compare them: balanced accuracy
(mean recall over the classes present in the truth; HAM10000-like case mixes are mostly ``nv``, where
plain accuracy flatters a model that always says ``nv``), per-class recall, malignant sensitivity and
specificity at the run's malignant threshold (the ``malignant`` flag as reported), and calibration of the
reported probabilities: top-label ECE over 15 equal-width bins of ``confidence`` (the calibrated
probability of the predicted class, as training/metrics.py measures the bundle) and the multi-class Brier
score. Truths ``not-a-lesion`` and ``unsure`` are counted and left out of every figure.

numpy only: dermscore never imports training/ or scikit-learn (the tests check these against
scikit-learn).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dermscore.records import NOT_A_LESION, UNSURE

ECE_BINS = 15  # training/metrics.py uses this ECE too, so local figures compare with the model card's


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (NaN when empty)."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    present = np.unique(truth)
    if not len(present):
        return float("nan")
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in present]))


def per_class_recall(truth: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> dict[str, tuple[float, int]]:
    """class -> (recall, number of true cases); recall is NaN for a class with no true case."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    out = {}
    for code in classes:
        mask = truth == code
        out[code] = (float(np.mean(predicted[mask] == code)) if mask.any() else float("nan"), int(mask.sum()))
    return out


def sensitivity_specificity(positive: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    """Share of positives flagged and of negatives not flagged (NaN where there are none)."""
    positive, flagged = np.asarray(positive, dtype=bool), np.asarray(flagged, dtype=bool)
    sensitivity = float(flagged[positive].mean()) if positive.any() else float("nan")
    specificity = float((~flagged[~positive]).mean()) if (~positive).any() else float("nan")
    return sensitivity, specificity


def calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - mean confidence| per equal-width confidence bin, weighted by the bin's size."""
    correct, confidence = np.asarray(correct, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    if not len(correct):
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(edges[1:-1], confidence)  # scikit-learn's calibration_curve binning
    total = 0.0
    for b in np.unique(which):
        mask = which == b
        total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / len(correct))


def brier_score(truth: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> float:
    """Mean over cases of the squared distance between the class probabilities and the one-hot truth."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(probabilities):
        return float("nan")
    onehot = (np.asarray(truth)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


def summarise(
    truth: np.ndarray,
    predicted: np.ndarray,
    probabilities: np.ndarray,
    confidence: np.ndarray,
    malignant_probability: np.ndarray,
    classes: Sequence[str],
    malignant_classes: Sequence[str],
    threshold: float,
) -> dict[str, float | int]:
    """Every figure for one set of cases; ``truth`` may hold ``not-a-lesion`` and ``unsure`` (counted, left out).

    ``probabilities`` is (cases, classes) in ``classes`` order, as the report's class columns.
    """
    truth = np.asarray(truth, dtype=object)
    kept = ~np.isin(truth, [NOT_A_LESION, UNSURE])
    t, p = truth[kept].astype(str), np.asarray(predicted, dtype=object)[kept].astype(str)
    out: dict[str, float | int] = {"n": int(kept.sum()), "not_a_lesion": int((truth == NOT_A_LESION).sum()),
                                   "unsure": int((truth == UNSURE).sum()),
                                   "balanced_accuracy": balanced_accuracy(t, p),
                                   "accuracy": float(np.mean(t == p)) if len(t) else float("nan")}
    recall = per_class_recall(t, p, classes)
    out.update({f"recall_{code}": r for code, (r, _) in recall.items()})
    out.update({f"n_{code}": n for code, (_, n) in recall.items()})
    flagged = np.asarray(malignant_probability, dtype=np.float64)[kept] >= threshold
    sensitivity, specificity = sensitivity_specificity(np.isin(t, list(malignant_classes)), flagged)
    out.update({"malignant_threshold": float(threshold), "malignant_sensitivity": sensitivity,
                "malignant_specificity": specificity,
                "ece": calibration_error(t == p, np.asarray(confidence, dtype=np.float64)[kept]),
                "brier": brier_score(t, np.asarray(probabilities, dtype=np.float64)[kept], classes)})
    return out

