"""``python -m training calibrate``: fit calibration, OOD detector and operating points from a bundle.

Works from the bundle alone (its ``split.csv`` and the image folder), so a shipped bundle whose training
folder is gone gets the same fields as a freshly exported one (``run_export`` calls it last). Steps:

1. score the split's images with dermscore's own Predictor (``bundle_scores``; cached in ``--work``);
2. temperature scaling on validation (``calibration``), ECE before/after on test, reliability diagram;
3. the OOD detector on the training features (``ood_fit``), its threshold on validation, AUROC against
   the non-dermoscopic set (``ood_set``) and the baselines;
4. operating points on validation (``operating_points``), their figures on test;
5. the bundle rewritten with the new manifest fields, ``ood.npz``, figures and model card (same weights).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dermscore.aggregate import ensemble
from dermscore.bundle import MANIFEST, Bundle, Calibration, load_bundle, write_manifest
from dermscore.calibration import calibrate
from dermscore.infer import features_key
from dermscore.ood import METHOD, OodDetector
from training import bundle_scores, metrics, ood_fit, ood_set, operating_points
from training.calibration import fit_calibration, reliability_figure
from training.steps import UNCALIBRATED, machine_description

OOD_FILE = "ood.npz"
LIMITATIONS_FITTED = (
    "Probabilities are calibrated and operating points fitted on the HAM10000 validation split (about 67% nv): "
    "at another case mix, population or device they are not calibrated, and sensitivity/specificity trade-offs "
    "must be validated locally.",
    "The out-of-distribution score was tested against photographs, documents, screenshots and radiology slices; "
    "clinical (non-dermatoscopic) photographs of skin were not in that test set, and a skin photograph may not "
    "be flagged.",
)
PREDICTIONS_FILE = "figures/test_predictions.csv"


def feature_views(bundle: Bundle) -> str:
    """How the bundle's members average their features: as their probabilities (flips when exported with TTA)."""
    return "flips" if bundle.provenance.get("ensemble", {}).get("tta") else "none"


def logit_layers(bundle: Bundle, views: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each member's last layer (kernel, bias): its features times these are its logits (before the softmax)."""
    import keras

    from dermscore.features import classifier_of

    layers = {}
    for member in bundle.members:
        model = keras.models.load_model(bundle.member_path(member), compile=False)
        kernel, bias = classifier_of(model, views).layers[-1].get_weights()
        layers[member.name] = (np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64))
    return layers


def member_logits(bundle: Bundle, layers: dict, side: dict[str, np.ndarray]) -> np.ndarray:
    """Weighted mean of the members' logits of their view-averaged features (the energy baseline's input)."""
    weights = np.array([m.weight for m in bundle.members]) / sum(m.weight for m in bundle.members)
    return sum(w * (side[features_key(m.name)] @ layers[m.name][0] + layers[m.name][1])
               for w, m in zip(weights, bundle.members))


def side_arrays(bundle: Bundle, scores: dict[str, np.ndarray], calibration: Calibration | None) -> dict:
    """What the operating points and figures need for one split, as dermscore computes it per image."""
    members = np.stack([scores[m.name] for m in bundle.members])
    balanced = ensemble({m.name: scores[m.name] for m in bundle.members}, bundle)
    calibrated = calibrate(balanced, calibration)
    predicted = balanced.argmax(1)
    malignant = [bundle.classes.index(c) for c in bundle.malignant_classes]
    return {
        "members": members, "balanced": balanced, "calibrated": calibrated, "labels": scores["labels"],
        "confidence": calibrated[np.arange(len(predicted)), predicted],
        "malignant_probability": calibrated[:, malignant].sum(1),
        "malignant": np.isin(scores["labels"], malignant), "wrong": predicted != scores["labels"],
    }


def fit_ood(bundle: Bundle, scores: dict[str, dict], folder: Path) -> tuple[dict, dict]:
    """The shipped detector's scores per side (from the stored float32 file) and every rival's, per side.

    ``scores`` holds ``train``, ``val``, ``test`` and ``ood`` (the non-dermoscopic set). Rivals: Mahalanobis
    on each member alone, maximum softmax probability and energy (``ood_fit``).
    """
    names = [m.name for m in bundle.members]
    evaluated = ("val", "test", "ood")

    def features(side: dict, members: list[str]) -> dict[str, np.ndarray]:
        return {m: side[features_key(m)] for m in members}

    comparison = {}
    for name in names if len(names) > 1 else ():
        alone = ood_fit.fit_detector(features(scores["train"], [name]), scores["train"]["labels"], [name])
        comparison[f"mahalanobis ({name} only)"] = {s: alone.score(features(scores[s], [name])) for s in evaluated}
    comparison["max softmax probability"] = {s: ood_fit.max_softmax_score(_ensemble(bundle, scores[s])) for s in evaluated}
    layers = logit_layers(bundle, feature_views(bundle))
    comparison["energy"] = {s: ood_fit.energy_score(member_logits(bundle, layers, scores[s])) for s in evaluated}
    detector = ood_fit.fit_detector(features(scores["train"], names), scores["train"]["labels"], names)
    stored = OodDetector.from_file(ood_fit.save_detector(detector, folder / OOD_FILE))  # as dermscore reads it
    return {s: stored.score(features(scores[s], names)) for s in evaluated}, comparison


def _ensemble(bundle: Bundle, data: dict) -> np.ndarray:
    return ensemble({m.name: data[m.name] for m in bundle.members}, bundle)


def ood_figures(result: dict, comparison: dict, threshold: float, categories: np.ndarray) -> dict:
    """AUROC (test split against the non-dermoscopic set) and shares flagged, for the detector and each rival
    (each at its own threshold, the same percentile of its validation scores)."""
    summary = {}
    for label, sides in {"shipped: mahalanobis (all members)": result, **comparison}.items():
        cut = ood_fit.threshold(sides["val"])
        summary[label] = {
            "auroc": round(ood_fit.auroc(sides["test"], sides["ood"]), 4),
            "test_flagged": round(float((sides["test"] > cut).mean()), 4),
            "non_dermoscopic_flagged": round(float((sides["ood"] > cut).mean()), 4),
        }
    per_category = {
        category: {"images": int((categories == category).sum()),
                   "auroc": round(ood_fit.auroc(result["test"], result["ood"][categories == category]), 4),
                   "flagged": round(float((result["ood"][categories == category] > threshold).mean()), 4)}
        for category in sorted(set(categories))
    }
    return {"methods": summary, "per_category": per_category}


def histogram_figure(result: dict, threshold: float, path: Path) -> Path:
    """ood_score distributions: validation and test dermoscopic images against the non-dermoscopic set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    upper = np.percentile(np.concatenate(list(result.values())), 99.5)
    bins = np.linspace(0, upper, 60)
    for side, label in (("test", "HAM10000 test split"), ("ood", "non-dermoscopic set")):
        ax.hist(np.minimum(result[side], upper), bins=bins, alpha=0.6, density=True, label=label)
    ax.axvline(threshold, color="black", linestyle="--", label=f"bundle threshold {threshold:.2f}")
    ax.set_xlabel("ood_score")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_predictions(path: Path, ids: np.ndarray, labels: np.ndarray, balanced: np.ndarray, classes: tuple) -> Path:
    """The test split's uncalibrated ensemble probabilities: the data behind the model card's test figures."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "label", *classes])
        for image_id, label, row in zip(ids, labels, balanced):
            writer.writerow([image_id, classes[label], *(f"{p:.6f}" for p in row)])
    return path


def fit_bundle(
    bundle_path: Path, data: Path, work: Path, version: str | None, train_limit: int | None,
    ood_crops: int = ood_set.VARIANTS, log: Callable[[str], None] = print, backend: str = "auto",
) -> dict:
    """Fit everything from ``bundle_path`` and rewrite it in place as ``version`` (the weight files untouched);
    the split is scored on dermscore's ``backend`` (``bundle_scores.Scorer``)."""
    bundle = load_bundle(bundle_path)
    scorer = bundle_scores.Scorer(bundle, feature_views(bundle), work, log, backend)
    scores = bundle_scores.score_splits(scorer, data, train_limit)
    ood_folder = work / f"ood-set-{ood_crops}"
    ood_rows = ood_set.build(ood_folder, ood_crops)
    scores["ood"] = scorer(ood_folder.name, [ood_folder / r["file"] for r in ood_rows])
    staging = bundle.path.with_name(bundle.path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    weights = {bundle.member_path(m).name for m in bundle.members}
    shutil.copytree(bundle.path, staging, copy_function=lambda src, dst: _link_or_copy(src, dst, weights))
    figures = staging / "figures"
    figures.mkdir(exist_ok=True)

    # Calibration on validation; ECE and reliability on test.
    val0, test0 = side_arrays(bundle, scores["val"], None), side_arrays(bundle, scores["test"], None)
    calibration = fit_calibration(val0["balanced"], val0["labels"])
    parsed = Calibration(calibration["method"], tuple(np.atleast_1d(calibration["temperature"]).tolist()))
    val, test = side_arrays(bundle, scores["val"], parsed), side_arrays(bundle, scores["test"], parsed)
    calibration["test"] = {
        "expected_calibration_error_before": round(_ece(test0), 4),
        "expected_calibration_error_after": round(_ece(test), 4),
        "mean_confidence_before": round(float(test0["confidence"].mean()), 4),
        "mean_confidence_after": round(float(test["confidence"].mean()), 4),
        "accuracy": round(float((~test["wrong"]).mean()), 4),
        "predicted_class_changed": int((test["calibrated"].argmax(1) != test["balanced"].argmax(1)).sum()),
    }
    rival = calibration.get("not_chosen")
    if rival:
        rival["test_expected_calibration_error"] = round(_ece(side_arrays(
            bundle, scores["test"], Calibration(rival["method"], tuple(rival["temperature"])))), 4)
    reliability_figure(~test["wrong"], {"uncalibrated": test0["confidence"], "calibrated": test["confidence"]},
                       f"{bundle.name}: test split ({len(test['labels'])} images)", figures / "reliability.png")

    # OOD detector on the training features, threshold on validation.
    ood_result, comparison = fit_ood(bundle, scores, staging)
    threshold = ood_fit.threshold(ood_result["val"])
    categories = np.array([r["category"] for r in ood_rows])
    ood_summary = ood_figures(ood_result, comparison, threshold, categories)
    histogram_figure(ood_result, threshold, figures / "ood_scores.png")
    val["ood"], test["ood"] = ood_result["val"] > threshold, ood_result["test"] > threshold
    ood_field = {
        "method": METHOD, "file": OOD_FILE, "views": feature_views(bundle), "threshold": round(threshold, 6),
        "threshold_rule": f"{ood_fit.THRESHOLD_PERCENTILE:g}th percentile of the validation images' ood_score",
        "fitted_on": {"train_images": int(len(scores["train"]["labels"])), "val_images": int(len(val["labels"]))},
        "test": {"auroc_against_non_dermoscopic": ood_summary["methods"]["shipped: mahalanobis (all members)"]["auroc"],
                 "share_of_test_flagged": round(float(test["ood"].mean()), 4),
                 "share_of_non_dermoscopic_flagged": round(float((ood_result["ood"] > threshold).mean()), 4),
                 "non_dermoscopic_images": int(len(ood_rows))},
        "comparison": ood_summary["methods"], "per_category": ood_summary["per_category"],
    }

    points = operating_points.fit_operating_points(val, test)
    points["test"]["ood_share_flagged"] = ood_field["test"]["share_of_test_flagged"]
    write_predictions(staging / PREDICTIONS_FILE, scores["test"]["image_ids"], test["labels"], test["balanced"],
                      bundle.classes)
    manifest = json.loads((bundle.path / MANIFEST).read_text(encoding="utf-8"))
    manifest.update(version=version or manifest["version"], calibration=calibration, ood=ood_field,
                    operating_points=points)
    manifest["provenance"]["limitations"] = [
        *(item for item in manifest["provenance"].get("limitations", [])
          if item != UNCALIBRATED and item not in LIMITATIONS_FITTED),  # a refit states them once
        *LIMITATIONS_FITTED,
    ]
    manifest["provenance"]["fitted_from_bundle"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_description(),
        "scored_with": "dermscore's decoding, preprocessing and Predictor (training/bundle_scores.py), "
        + (f"{scorer.predictor.backend} backend" if "predictor" in vars(scorer) else "outputs cached by an earlier run"),
        "train_images_scored": int(len(scores["train"]["labels"])),
        "test_metrics_as_dermscore_scores": metrics.evaluate(test["labels"], test["balanced"]),
    }
    _publish(staging, manifest, bundle.path)
    return {"bundle": bundle.path, "calibration": calibration, "ood": ood_field["test"], "operating_points": points["test"]}


def _ece(side: dict) -> float:
    """ECE of what dermscore reports: confidence is the calibrated probability of the predicted class."""
    return metrics.calibration_error(~side["wrong"], side["confidence"])


def _link_or_copy(source: str, target: str, weights: set[str]) -> str:
    """Weight files are hard-linked where possible (the new bundle holds the very same bytes, without a copy);
    every other file is copied, because some are rewritten in place and a link would change the original."""
    if Path(source).name in weights:
        try:
            os.link(source, target)
            return target
        except OSError:
            pass
    return shutil.copy2(source, target)


def _publish(staging: Path, manifest: dict, out: Path) -> None:
    """Write manifest (hashes recomputed from the files) and model card in staging, then swap it in."""
    from training import modelcard  # noqa: PLC0415

    write_manifest(staging, manifest)
    written = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
    (staging / "MODEL_CARD.md").write_text(modelcard.render(written), encoding="utf-8")
    backup = out.with_name(out.name + ".previous")
    shutil.rmtree(backup, ignore_errors=True)
    out.replace(backup)
    staging.replace(out)
    shutil.rmtree(backup)
