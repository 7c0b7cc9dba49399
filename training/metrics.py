"""Classification metrics in numpy (no scikit-learn dependency), as the ISIC 2018 challenge reports them.

Balanced accuracy (mean per-class recall) is the headline because HAM10000 is ~67% nv: a model that
always says nv has 0.67 accuracy and 0.14 balanced accuracy.
"""

from __future__ import annotations

import numpy as np

from dermscore.bundle import CLASS_CODES


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(CLASS_CODES)) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    matrix = confusion_matrix(y_true, y_pred)
    support = matrix.sum(1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties count half); NaN when one class is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    positive = np.asarray(positive, dtype=bool)
    negatives = np.sort(np.asarray(scores)[~positive])
    if len(negatives) == 0 or positive.sum() == 0:
        return float("nan")
    # Threshold t (predict positive when score > t) with at least `specificity` of negatives <= t.
    k = int(np.ceil(specificity * len(negatives))) - 1
    threshold = negatives[max(k, 0)]
    return float(np.mean(np.asarray(scores)[positive] > threshold))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(error)


def evaluate(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Every figure the model card reports, for one set of predictions."""
    y_true = np.asarray(y_true)
    y_pred = probs.argmax(1)
    matrix = confusion_matrix(y_true, y_pred)
    per_class = {}
    for c, code in enumerate(CLASS_CODES):
        tp = matrix[c, c]
        predicted, support = matrix[:, c].sum(), matrix[c].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if support and (precision + recall) > 0 else 0.0
        per_class[code] = {
            "support": int(support),
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "roc_auc": round(roc_auc(y_true == c, probs[:, c]), 4),
        }
    mel = CLASS_CODES.index("mel")
    return {
        "n": int(len(y_true)),
        "accuracy": round(float(np.mean(y_pred == y_true)), 4),
        "balanced_accuracy": round(balanced_accuracy(y_true, y_pred), 4),
        "macro_f1": round(float(np.mean([v["f1"] for v in per_class.values()])), 4),
        "melanoma_sensitivity_at_80_specificity": round(
            sensitivity_at_specificity(y_true == mel, probs[:, mel], 0.8), 4
        ),
        "melanoma_sensitivity_at_90_specificity": round(
            sensitivity_at_specificity(y_true == mel, probs[:, mel], 0.9), 4
        ),
        "expected_calibration_error": round(expected_calibration_error(y_true, probs), 4),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }
