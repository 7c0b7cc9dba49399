"""Member predictions, ensemble weights fitted on validation, and optional flip test-time augmentation.

Weights are chosen on the validation split only (never on test), by balanced accuracy, with equal
weights as the baseline the fit must beat; ties go to the weights closest to equal, which generalise
more safely than a lucky corner of the grid.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from training.export import clean_member
from training.metrics import balanced_accuracy
from training.train import MemberRun, predict

FLIPS = ((False, False), (False, True), (True, False), (True, True))  # (vertical, horizontal)
PRIOR_CORRECTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def adjust(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Divide out ``tau`` times the class prior the member was trained under (logit adjustment).

    A member trained on a sample where class c has frequency prior_c learns p(c|x) under that prior;
    balanced accuracy rewards p(x|c), i.e. the posterior divided by the prior. tau = 0 leaves the
    member as trained; export bakes the same shift into the output layer's bias, so scoring gets it.
    """
    adjusted = probs * np.asarray(prior)[None, :] ** -tau
    return adjusted / adjusted.sum(1, keepdims=True)


def member_predictions(
    run: MemberRun, sides: dict[str, np.ndarray], path: Path, which: tuple[str, ...] = ("val", "test")
) -> dict[str, np.ndarray]:
    """Probabilities of the member's best checkpoint on the ``which`` sides of ``run.images``, plain and
    flip-averaged (``<side>_tta``); cached.

    Computed in float32 whatever precision the member trained in, with the member's colour constancy:
    that is how dermscore scores.
    """
    if path.is_file() and path.stat().st_mtime >= (run.folder / "best.keras").stat().st_mtime:
        with np.load(path) as stored:
            return dict(stored)
    model = clean_member(run.folder / "best.keras", run.config)
    result = {}
    for side in which:
        views = []
        for vertical, horizontal in FLIPS:
            images = run.images[:, ::-1] if vertical else run.images
            images = images[:, :, ::-1] if horizontal else images
            views.append(predict(model, images, sides[side], run.config.preprocessing, run.config.constancy))
        result[side] = views[0]
        result[f"{side}_tta"] = np.mean(views, axis=0)
    np.savez(path, **result)
    return result


def combine(probs: list[np.ndarray], weights: tuple[float, ...]) -> np.ndarray:
    """Weighted mean of member probabilities (what dermscore computes from the manifest's weights)."""
    weights_array = np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights_array / weights_array.sum(), np.stack(probs), axes=1)


def weight_grid(n_members: int, step: float = 0.05) -> list[tuple[float, ...]]:
    """All weight vectors on the simplex with the given step (for 2 members: w, 1 - w)."""
    ticks = int(round(1 / step))
    grid = [c for c in itertools.product(range(ticks + 1), repeat=n_members - 1) if sum(c) <= ticks]
    return [tuple(round(v * step, 4) for v in (*c, ticks - sum(c))) for c in grid]


def fit_weights(val_probs: list[np.ndarray], y_val: np.ndarray, step: float = 0.05) -> dict:
    """Grid search of member weights on validation; returns the choice and the equal-weight baseline."""
    n = len(val_probs)
    equal = tuple([round(1.0 / n, 4)] * n)
    scored = []
    for weights in weight_grid(n, step):
        score = balanced_accuracy(y_val, combine(val_probs, weights).argmax(1))
        distance = float(np.abs(np.asarray(weights) - 1.0 / n).sum())
        scored.append((round(score, 6), -distance, weights))
    best_score, _, best = max(scored)
    return {
        "weights": list(best),
        "val_balanced_accuracy": best_score,
        "equal_weights_val_balanced_accuracy": round(balanced_accuracy(y_val, combine(val_probs, equal).argmax(1)), 6),
        "grid": [{"weights": list(w), "val_balanced_accuracy": s} for s, _, w in sorted(scored, key=lambda t: t[2])],
    }


def fit_ensemble(
    predictions: dict[str, dict[str, np.ndarray]], priors: dict[str, np.ndarray], y_val: np.ndarray, tta: bool = False
) -> dict:
    """Fit the prior correction and the member weights on validation; report flip TTA's effect too.

    TTA is used only when asked: ``dermscore`` scores each image once, so the bundle's figures describe
    the plain ensemble unless the caller opts in (the validation comparison tells whether it is worth it).
    Ties in the prior correction go to the smaller one (closer to the members as trained).
    """
    members = list(predictions)

    def fit(key: str, tau: float) -> dict:
        return fit_weights([adjust(predictions[m][key], priors[m], tau) for m in members], y_val)

    key = "val_tta" if tta else "val"
    by_tau = {tau: fit(key, tau) for tau in PRIOR_CORRECTIONS}
    tau = max(PRIOR_CORRECTIONS, key=lambda t: (by_tau[t]["val_balanced_accuracy"], -t))
    chosen = by_tau[tau]
    other = fit("val" if tta else "val_tta", tau)
    return {
        "members": members,
        "weights": dict(zip(members, chosen["weights"])),
        "prior_correction": tau,
        "priors": {m: [round(float(p), 6) for p in priors[m]] for m in members},
        "tta": bool(tta),
        "val_balanced_accuracy": chosen["val_balanced_accuracy"],
        "equal_weights_val_balanced_accuracy": chosen["equal_weights_val_balanced_accuracy"],
        "val_balanced_accuracy_by_prior_correction": {str(t): r["val_balanced_accuracy"] for t, r in by_tau.items()},
        "val_balanced_accuracy_without_tta": (other if tta else chosen)["val_balanced_accuracy"],
        "val_balanced_accuracy_with_tta": (chosen if tta else other)["val_balanced_accuracy"],
        "member_val_balanced_accuracy": {
            m: round(balanced_accuracy(y_val, adjust(predictions[m][key], priors[m], tau).argmax(1)), 6)
            for m in members
        },
        "grid": chosen["grid"],
    }


def save(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1))
