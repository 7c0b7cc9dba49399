"""training/metrics.py on scikit-learn gives the figures the model card reports.

The shipped bundle carries its test split's ensemble probabilities as dermscore computes them
(``figures/test_predictions.csv``, written by ``python -m training calibrate``). On them, the numpy
implementations that scikit-learn replaced (kept here only as the reference) and the scikit-learn ones must
agree on every figure, and both must reproduce the figures recorded in the manifest at export time.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import REPO
from dermscore.bundle import CLASS_CODES, read_bundle
from training import metrics

BUNDLE = REPO / "models" / "ham10000-ensemble"


def _predictions() -> tuple[np.ndarray, np.ndarray]:
    path = BUNDLE / "figures" / "test_predictions.csv"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python -m training calibrate` on the shipped bundle")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([CLASS_CODES.index(r["label"]) for r in rows])
    return labels, np.array([[float(r[c]) for c in CLASS_CODES] for r in rows])


# --- the numpy reference implementations (as in training/metrics.py before scikit-learn) ---

def reference_confusion(y_true, y_pred, n=len(CLASS_CODES)):
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def reference_balanced_accuracy(y_true, y_pred):
    matrix = reference_confusion(y_true, y_pred)
    support = matrix.sum(1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def reference_roc_auc(positive, scores):
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(np.asarray(scores)[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def reference_sensitivity_at_specificity(positive, scores, specificity):
    positive = np.asarray(positive, dtype=bool)
    negatives = np.sort(np.asarray(scores)[~positive])
    threshold = negatives[max(int(np.ceil(specificity * len(negatives))) - 1, 0)]
    return float(np.mean(np.asarray(scores)[positive] > threshold))


def reference_ece(y_true, probs, bins=15):
    confidence, correct = probs.max(1), probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return float(sum(
        (which == b).mean() * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in range(bins) if (which == b).any()))


def test_scikit_learn_gives_the_reference_figures_on_the_shipped_test_predictions() -> None:
    labels, probabilities = _predictions()
    predicted = probabilities.argmax(1)
    assert np.array_equal(metrics.confusion_matrix(labels, predicted), reference_confusion(labels, predicted))
    assert metrics.balanced_accuracy(labels, predicted) == pytest.approx(reference_balanced_accuracy(labels, predicted),
                                                                         abs=1e-12)
    for c in range(len(CLASS_CODES)):
        assert metrics.roc_auc(labels == c, probabilities[:, c]) == pytest.approx(
            reference_roc_auc(labels == c, probabilities[:, c]), abs=1e-12)
        for specificity in (0.8, 0.9, 0.95):
            assert metrics.sensitivity_at_specificity(labels == c, probabilities[:, c], specificity) == pytest.approx(
                reference_sensitivity_at_specificity(labels == c, probabilities[:, c], specificity), abs=1e-12)
    assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(
        reference_ece(labels, probabilities), abs=1e-12)


def test_the_model_card_figures_are_reproduced_from_the_shipped_predictions() -> None:
    labels, probabilities = _predictions()
    recorded = read_bundle(BUNDLE).provenance["metrics"]["ensemble"]
    assert metrics.evaluate(labels, probabilities) == recorded


def test_ties_and_exact_specificities_are_handled_like_the_reference() -> None:
    positive = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.2, 0.2, 0.3, 0.5, 0.0, 0.4, 0.2, 0.6])
    assert metrics.roc_auc(positive, scores) == pytest.approx(reference_roc_auc(positive, scores))
    for specificity in (0.5, 0.8, 0.9, 1.0):  # 0.8 of 10 negatives is met exactly
        assert metrics.sensitivity_at_specificity(positive, scores, specificity) == pytest.approx(
            reference_sensitivity_at_specificity(positive, scores, specificity))
    assert np.isnan(metrics.roc_auc(np.ones(3, bool), np.arange(3.0)))
