"""Calibration (pure): the bundle's temperature scaling applied to ensemble probabilities.

Why: the prior-corrected ensemble ranks classes for balanced accuracy, but its probabilities are not
frequencies (the 2026.11.26 model card measured a test ECE of 0.195: mean confidence 0.51 against 0.68
accuracy). training/ fits a temperature on validation (``python -m training calibrate``) and the
manifest carries it; scoring only applies it. ``softmax(log p / T)``: T < 1 sharpens, T > 1 softens; one
global T keeps every image's class ranking, one T per class (the per-class variant) may not.
"""

from __future__ import annotations

import numpy as np

from dermscore.bundle import Calibration

FLOOR = 1e-12  # log(0) guard: a member may put exactly zero on a class
NEWTON_STEPS = 50  # uncalibrate's root finding: quadratic convergence, far more steps than it needs


def calibrate(probabilities: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """Calibrated probabilities (last axis = classes); unchanged (the same array) without a calibration."""
    if calibration is None:
        return probabilities
    logits = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), FLOOR)) / np.asarray(calibration.temperatures)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def uncalibrate(calibrated: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """The uncalibrated probabilities that ``calibrate`` maps to ``calibrated`` (its inverse).

    Lesion rows are computed from image rows (whose class columns are calibrated) but must average the
    uncalibrated probabilities and decide by the balanced rule, as an image does. ``calibrate`` divides
    log p by T and renormalises, so log p_c = T_c (log q_c + s) for the one shift s that makes p sum to
    1; s solves a convex, increasing equation (logsumexp of T_c (log q_c + s) = 0), found by Newton.
    """
    if calibration is None:
        return calibrated
    t = np.asarray(calibration.temperatures, dtype=np.float64)
    # Calibrated probabilities of classes sharpened by T < 1 reach far below FLOOR; only a true 0 is guarded.
    scaled = t * np.log(np.maximum(np.asarray(calibrated, dtype=np.float64), np.finfo(np.float64).tiny))
    shift = np.zeros(scaled.shape[:-1] + (1,))
    for _ in range(NEWTON_STEPS):
        logits = scaled + t * shift
        top = logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits - top)
        total = weights.sum(axis=-1, keepdims=True)
        excess = top + np.log(total)  # log of sum p, 0 at the solution
        shift = shift - excess / ((weights / total) * t).sum(axis=-1, keepdims=True)
    logits = scaled + t * shift
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)
