"""Operating points fitted on validation: the malignant threshold and the review rule.

* Malignant threshold: the highest threshold on the calibrated malignant probability whose validation
  sensitivity (true class among the bundle's malignant classes) is at least the target (0.90): every
  image at or above it is flagged ``malignant``.
* Review rule: dermscore flags ``review`` for ``low-confidence`` (calibrated top probability below the
  review threshold) or ``members-disagree`` (their Jensen-Shannon divergence reaches the disagreement
  threshold, or, unless the rule switches it off, their top classes differ) or ``out-of-distribution``
  (fixed before this fit, so its flags count against the budget). The grid search keeps the rule that
  catches the most wrong predictions on validation while flagging at most 25% of its images; on a tie,
  the fewer flags. The shipped members' top classes differ on 37% of validation images, so dermscore's
  old rule alone could not meet the budget.

The figures on the test split (sensitivity, specificity, share flagged, share of errors caught) are
computed from the same rule dermscore applies (``dermscore.aggregate``), on the same cached outputs.
"""

from __future__ import annotations

import numpy as np

from dermscore.aggregate import disagree

SENSITIVITY_TARGET = 0.90
MAX_REVIEW_SHARE = 0.25
DISAGREEMENT_GRID = (*np.round(np.arange(0.05, 0.55, 0.05), 2), 1.0)


def malignant_threshold(malignant_probability: np.ndarray, malignant: np.ndarray, target: float) -> float:
    """Highest t with sensitivity(p >= t) >= target on these images."""
    positives = np.sort(np.asarray(malignant_probability)[np.asarray(malignant, dtype=bool)])[::-1]
    needed = int(np.ceil(target * len(positives)))
    return float(positives[max(needed - 1, 0)])


def members_disagree(members: np.ndarray, disagreement: float, top_class: bool) -> np.ndarray:
    """(n,) the ``members-disagree`` reason for (members, n, classes) probabilities, as dermscore decides it."""
    return np.array([disagree(members[:, i], disagreement, top_class)[0] for i in range(members.shape[1])])


def review_flags(side: dict, rule: dict) -> np.ndarray:
    """dermscore's review flag for every image of ``side`` under ``rule`` (see ``fit_operating_points``)."""
    disagreeing = members_disagree(side["members"], rule["disagreement_threshold"], rule["members_disagree_on_top_class"])
    return (side["confidence"] < rule["review_threshold"]) | disagreeing | side["ood"]


def fit_review(side: dict, max_share: float) -> dict:
    """The review rule catching the most validation errors within ``max_share`` flagged: review and
    disagreement thresholds, and whether differing top classes alone flag (dermscore's default) or not."""
    confidence, wrong = side["confidence"], side["wrong"]
    best: tuple | None = None
    for top_class, disagreement in ((t, d) for t in (True, False) for d in DISAGREEMENT_GRID):
        disagreeing = members_disagree(side["members"], float(disagreement), top_class) | side["ood"]
        # Candidate review thresholds: every distinct confidence (flag strictly below it), plus 0 (none).
        for review in np.concatenate([[0.0], np.unique(confidence)]):
            flagged = (confidence < review) | disagreeing
            share = flagged.mean()
            if share > max_share:
                break  # a higher review threshold only flags more
            key = (int((flagged & wrong).sum()), -share)
            if best is None or key > best[0]:
                best = (key, {"review_threshold": float(review),  # unrounded: rounding up would flag one more
                              "disagreement_threshold": float(disagreement), "members_disagree_on_top_class": top_class})
    if best is None:  # only when out-of-distribution flags alone exceed the budget
        raise ValueError(f"more than {max_share:.0%} of validation images are flagged before any review rule applies")
    return best[1]


def figures(
    malignant_probability: np.ndarray, malignant: np.ndarray, flagged: np.ndarray, wrong: np.ndarray, threshold: float
) -> dict[str, float]:
    """Sensitivity and specificity of the malignant flag, share flagged for review and share of errors caught."""
    positive = np.asarray(malignant, dtype=bool)
    called = np.asarray(malignant_probability) >= threshold
    return {
        "sensitivity": round(float(called[positive].mean()), 4),
        "specificity": round(float((~called[~positive]).mean()), 4),
        "share_malignant": round(float(called.mean()), 4),
        "share_flagged": round(float(flagged.mean()), 4),
        "errors_caught": round(float(flagged[wrong].mean()), 4) if wrong.any() else float("nan"),
        "images": int(len(positive)),
        "errors": int(wrong.sum()),
    }


def fit_operating_points(val: dict, test: dict, target: float = SENSITIVITY_TARGET) -> dict:
    """The manifest's ``operating_points``: thresholds from ``val``, figures on ``val`` and ``test``.

    Each side is a dict with ``malignant_probability``, ``malignant`` (bool), ``confidence`` (calibrated
    probability of the predicted class), ``members`` (members, n, classes), ``wrong`` (bool) and ``ood``
    (bool: flagged out-of-distribution at the bundle's threshold).
    """
    threshold = malignant_threshold(val["malignant_probability"], val["malignant"], target)
    out = {"malignant_threshold": threshold, **fit_review(val, MAX_REVIEW_SHARE),
           "sensitivity_target": target, "max_review_share": MAX_REVIEW_SHARE, "fitted_on": "val"}
    for name, side in (("val", val), ("test", test)):
        flagged = review_flags(side, out)
        out[name] = figures(side["malignant_probability"], side["malignant"], flagged, side["wrong"], threshold)
    return out
