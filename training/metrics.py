"""Classification metrics as the ISIC 2018 challenge reports them, computed with scikit-learn.

Balanced accuracy (mean per-class recall) is the headline because HAM10000 is ~67% nv: a model that
always says nv has 0.67 accuracy and 0.14 balanced accuracy. scikit-learn (BSD-3-Clause, the field's
standard) computes the statistics; tests/test_metrics.py shows the model card's figures are those of the
numpy implementations these replaced.
"""

from __future__ import annotations

import warnings

import numpy as np

from dermscore.bundle import CLASS_CODES
from dermscore.evaluate import ECE_BINS, calibration_error  # one ECE for the model card and `dermscore evaluate`


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = len(CLASS_CODES)) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    return sk_confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=np.arange(n_classes)).astype(np.int64)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():  # a predicted class absent from y_true is expected, and ignored as before
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores)))


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    from sklearn.metrics import roc_curve

    positive = np.asarray(positive, dtype=bool)
    n_neg = int((~positive).sum())
    if n_neg == 0 or not positive.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(positive, np.asarray(scores), drop_intermediate=False)
    # Counted in images, not compared as fractions, so a specificity met exactly is not lost to rounding.
    allowed = n_neg - int(np.ceil(specificity * n_neg))
    return float(tpr[np.rint(fpr * n_neg) <= allowed].max())


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    return calibration_error(probs.argmax(1) == np.asarray(y_true), probs.max(1), bins)


def reliability(correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per non-empty equal-width bin: accuracy, mean confidence and image count (scikit-learn's binning)."""
    from sklearn.calibration import calibration_curve

    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)  # calibration_curve's bins
    correct = np.asarray(correct, dtype=int)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform", pos_label=1)
    return accuracy, mean_confidence, counts[counts > 0]


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
