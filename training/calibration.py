"""Temperature scaling of the ensemble, fitted on validation (Guo et al. 2017), and its reliability diagram.

The ensemble's probabilities are already prior-corrected (the balanced decision rule), so calibration
works on their logarithm: ``softmax(log p / T)`` (``dermscore.calibration.calibrate`` applies it). One global
T minimises the validation negative log-likelihood (scipy); the per-class variant (one T per class) is
kept only if it also wins on held-out validation folds, because seven parameters fitted on 1,280 images
(14 of them df) can overfit where one cannot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermscore.bundle import Calibration
from dermscore.calibration import calibrate
from training import metrics

FOLDS = 5
LOG_T_BOUNDS = (-3.0, 3.0)  # T between 0.05 and 20


def nll(probabilities: np.ndarray, labels: np.ndarray, temperatures: np.ndarray) -> float:
    """Mean negative log-likelihood of the calibrated probabilities."""
    calibrated = calibrate(probabilities, Calibration("temperature", tuple(np.atleast_1d(temperatures))))
    return float(-np.mean(np.log(np.maximum(calibrated[np.arange(len(labels)), labels], 1e-12))))


def fit_temperatures(probabilities: np.ndarray, labels: np.ndarray, per_class: bool) -> np.ndarray:
    """The temperature(s) minimising validation NLL, optimised in log T (so T stays positive)."""
    from scipy.optimize import minimize, minimize_scalar

    if not per_class:
        result = minimize_scalar(lambda t: nll(probabilities, labels, np.exp([t])), bounds=LOG_T_BOUNDS, method="bounded")
        return np.exp([result.x])
    k = probabilities.shape[1]
    start = np.log(fit_temperatures(probabilities, labels, False)).repeat(k)
    result = minimize(lambda t: nll(probabilities, labels, np.exp(t)), start, method="L-BFGS-B",
                      bounds=[LOG_T_BOUNDS] * k)
    return np.exp(result.x)


def held_out_nll(probabilities: np.ndarray, labels: np.ndarray, per_class: bool, seed: int = 0) -> float:
    """Mean NLL on each validation fold of a temperature fitted on the others (stratified folds)."""
    from sklearn.model_selection import StratifiedKFold

    losses = []
    for fit, held in StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(probabilities, labels):
        temperatures = fit_temperatures(probabilities[fit], labels[fit], per_class)
        losses.append(nll(probabilities[held], labels[held], temperatures) * len(held))
    return float(np.sum(losses) / len(labels))


def fit_calibration(val_probabilities: np.ndarray, val_labels: np.ndarray) -> dict:
    """The manifest's ``calibration`` field: the variant validation prefers, with what decided it.

    The per-class variant is considered only when every class has at least ``FOLDS`` validation images
    (otherwise it cannot be judged on held-out folds, and one temperature is the safe choice).
    """
    counts = np.bincount(val_labels, minlength=val_probabilities.shape[1])
    variants = ("temperature", "class-temperature") if counts.min() >= FOLDS else ("temperature",)
    folds = {variant: held_out_nll(val_probabilities, val_labels, variant == "class-temperature")
             for variant in variants} if len(variants) > 1 else {}
    method = min(folds, key=folds.get) if folds else "temperature"
    temperatures = fit_temperatures(val_probabilities, val_labels, method == "class-temperature")
    fitted = {
        "method": method,
        "temperature": round(float(temperatures[0]), 6) if method == "temperature"
        else [round(float(t), 6) for t in temperatures],
        "fitted_on": "val",
        "validation_nll": {
            "uncalibrated": round(nll(val_probabilities, val_labels, np.ones(1)), 4),
            **{f"{variant}_held_out_{FOLDS}_folds": round(loss, 4) for variant, loss in folds.items()},
        },
    }
    if folds:
        other = fit_temperatures(val_probabilities, val_labels, method != "class-temperature")
        fitted["not_chosen"] = {"method": next(v for v in folds if v != method),
                                "temperature": [round(float(t), 6) for t in other]}
    return fitted


def reliability_figure(correct: np.ndarray, confidences: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Reliability diagram (accuracy against confidence per bin) of each named confidence, as PNG.

    ``correct``: whether the reported predicted class is right; each confidence: the probability reported
    for that class (uncalibrated, calibrated), so the figure shows what a reader of the reports sees.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for (name, confidence), style in zip(confidences.items(), ("o-", "s-", "^-")):
        accuracy, mean_confidence, _ = metrics.reliability(correct, confidence)
        ece = metrics.calibration_error(correct, confidence)
        ax.plot(mean_confidence, accuracy, style, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
