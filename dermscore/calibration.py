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


def calibrate(probabilities: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """Calibrated probabilities (last axis = classes); unchanged (the same array) without a calibration."""
    if calibration is None:
        return probabilities
    logits = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), FLOOR)) / np.asarray(calibration.temperatures)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)
