"""MODEL_CARD.md for a bundle, generated from its manifest so the card and the manifest cannot disagree."""

from __future__ import annotations

from dermscore.bundle import CLASS_CODES

NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


CONSTANCY_NAMES = {"shades_of_gray": "Shades of Gray"}


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _summary_table(metrics: dict) -> list[str]:
    lines = [
        "| model | accuracy | balanced accuracy | macro F1 | mel sens. @80% spec. | mel sens. @90% spec. | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in metrics.items():
        lines.append(
            f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} | {_fmt(m['macro_f1'])} | "
            f"{_fmt(m['melanoma_sensitivity_at_80_specificity'])} | {_fmt(m['melanoma_sensitivity_at_90_specificity'])} "
            f"| {_fmt(m['expected_calibration_error'])} |"
        )
    return lines


def _per_class_table(metrics: dict) -> list[str]:
    names = list(metrics)
    lines = [
        "| class | test images | "
        + " | ".join(f"{n} recall" for n in names)
        + " | ensemble precision | ensemble F1 | ensemble ROC AUC |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |",
    ]
    ens = metrics["ensemble"]["per_class"]
    for code in CLASS_CODES:
        recalls = " | ".join(_fmt(metrics[n]["per_class"][code]["recall"]) for n in names)
        lines.append(
            f"| {code} ({NAMES[code]}) | {ens[code]['support']} | {recalls} | {_fmt(ens[code]['precision'])} | "
            f"{_fmt(ens[code]['f1'])} | {_fmt(ens[code]['roc_auc'])} |"
        )
    return lines


def _na(value, counts: str = "") -> str:
    return f"n/a ({counts})" if value is None else f"{value:.3f}"


def shift_section(shift: dict, held_out: dict | None = None) -> list[str]:
    """Device-shift and per-source tables (``training.shift.shift_report``), and held-out-source runs."""
    ranges = shift["device_shift_ranges"]
    lines = [
        f"Test images by source: {', '.join(f'{s} {n}' for s, n in shift['sources'].items())}. Melanoma-vs-nevus AUC "
        "uses the melanoma probability over the source's melanoma and nevus images (n/a with fewer than "
        f"5 of either). The shifted copy imitates another dermoscope, settings drawn per image (seed {ranges['seed']}) "
        f"from: white balance gains on red and blue {ranges['white_balance']}, gamma {ranges['gamma']}, vignetting "
        f"(corner brightness lost) {ranges['vignetting']}, Gaussian blur sigma {ranges['blur_sigma']} px, resolution "
        f"scale {ranges['resolution']}, JPEG quality {ranges['jpeg_quality']}.",
        "",
        "| model | balanced accuracy: plain | shifted | drop | mel sens. @90% spec.: plain | shifted | "
        "mel-vs-nv AUC: plain | shifted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, model in shift["models"].items():
        d = model["device_shift"]
        ba, sens, auc = d["balanced_accuracy"], d["melanoma_sensitivity_at_90_specificity"], d["mel_vs_nv_auc"]
        lines.append(
            f"| {name} | {_fmt(ba['plain'])} | {_fmt(ba['shifted'])} | {_fmt(ba['drop'])} | {_fmt(sens['plain'])} | "
            f"{_fmt(sens['shifted'])} | {_na(auc['plain'])} | {_na(auc['shifted'])} |"
        )
    lines += [
        "",
        "| model | source | images | mel / nv | balanced accuracy: plain | shifted | mel-vs-nv AUC: plain | shifted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, model in shift["models"].items():
        for source, plain in model["per_source"].items():
            shifted = model["per_source_shifted"][source]
            counts = f"{plain['mel']} mel, {plain['nv']} nv"
            lines.append(
                f"| {name} | {source} | {plain['n']} | {plain['mel']} / {plain['nv']} | "
                f"{_fmt(plain['balanced_accuracy'])} | {_fmt(shifted['balanced_accuracy'])} | "
                f"{_na(plain['mel_vs_nv_auc'], counts)} | {_na(shifted['mel_vs_nv_auc'], counts)} |"
            )
    for source, members in (held_out or {}).items():
        lines += ["", f"Trained without {source} (a real device and clinic shift), scored on all its images:", ""]
        for member, result in members.items():
            r = result["held_out"]
            counts = f"{r['mel']} mel, {r['nv']} nv"
            lines.append(
                f"- {member}: {r['n']} images, balanced accuracy {_fmt(r['balanced_accuracy'])}, melanoma-vs-nevus "
                f"AUC {_na(r['mel_vs_nv_auc'], counts)}."
            )
    return lines


FIGURE_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "melanoma_sensitivity_at_90_specificity": "mel sens. @90% spec.",
    "expected_calibration_error": "ECE (uncalibrated)",
}


def previous_section(manifest: dict) -> list[str]:
    """Old and new figures side by side: the bundle this version replaced (``training.export.previous_bundle``)."""
    prov = manifest["provenance"]
    previous = prov["previous"]
    same = previous["split_sha256"] == prov["split"]["sha256"]
    lines = [
        f"This version replaced {previous['identity']}. "
        + ("Both are measured on the same lesion-level test images (same `split.csv`)." if same else
           "**Their test images differ** (another `split.csv`): the figures are not comparable."),
        "",
        f"| model | figure | {previous['version']} | {manifest['version']} |",
        "| --- | --- | --- | --- |",
    ]
    for name, old in previous["metrics"].items():
        new = prov["metrics"].get(name)
        if new is None:
            continue
        for key, label in FIGURE_NAMES.items():
            lines.append(f"| {name} | {label} | {_fmt(old[key])} | {_fmt(new[key])} |")
        old_shift = previous.get("shift", {}).get(name)
        new_shift = prov.get("shift", {}).get("models", {}).get(name)
        if old_shift and new_shift:
            ba = new_shift["device_shift"]["balanced_accuracy"]
            lines.append(f"| {name} | balanced accuracy, device-shifted copy | {_fmt(old_shift['shifted_balanced_accuracy'])} "
                         f"| {_fmt(ba['shifted'])} |")
            lines.append(f"| {name} | drop on the device-shifted copy | {_fmt(old_shift['drop'])} | {_fmt(ba['drop'])} |")
            for source, auc in old_shift["mel_vs_nv_auc"].items():
                if source in new_shift["per_source"]:
                    lines.append(f"| {name} | mel-vs-nv AUC within {source} | {_na(auc)} | "
                                 f"{_na(new_shift['per_source'][source]['mel_vs_nv_auc'])} |")
    return lines


def render(manifest: dict) -> str:
    """The card: what the bundle is, how it was made, how good it is on the held-out lesions, its limits."""
    prov = manifest["provenance"]
    metrics = prov["metrics"]
    split = prov["split"]
    training = prov["training"]
    ensemble = prov["ensemble"]
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "## What it is",
        "",
        f"An ensemble of {len(manifest['members'])} convolutional networks that assigns a dermatoscopic image one of "
        "seven HAM10000 diagnostic classes. " + training["summary"],
        "",
        f"**Intended use:** {manifest['intended_use']}",
        "",
        "| member | architecture | input (h x w) | preprocessing | ensemble weight | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in manifest["members"]:
        lines.append(
            f"| {m['name']} | {m['architecture']} | {m['input_size'][0]} x {m['input_size'][1]} | {m['preprocessing']} "
            f"| {m['weight']:.2f} | {m['file']} |"
        )
    if manifest.get("colour_constancy"):
        cc = manifest["colour_constancy"]
        lines += [
            "",
            f"Colour constancy: every image is normalised with {CONSTANCY_NAMES[cc['method']]} (Minkowski p = "
            f"{cc['p']:g}) after resizing and before each member's normalisation (manifest `colour_constancy`), as in "
            "training, so the light source and sensor tint of the dermoscope are divided out.",
        ]
    lines += [
        "",
        "## Data",
        "",
        prov["training_data"]["attribution"],
        "",
        f"Images used: {prov['training_data']['images']} ({prov['training_data']['source']}). "
        f"Split by lesion (no lesion on two sides), stratified by diagnosis, seed {split['seed']}, "
        f"file `{split['file']}`: train {split['images']['train']} images / {split['lesions']['train']} lesions, "
        f"validation {split['images']['val']} / {split['lesions']['val']}, test {split['images']['test']} / "
        f"{split['lesions']['test']}.",
        "",
        "## Test results (lesion-level held-out split, the shipped weights)",
        "",
        *_summary_table(metrics),
        "",
        "Balanced accuracy is the mean per-class recall (ISIC 2018 metric); chance is 0.143 and always answering "
        "nv gives 0.143 balanced accuracy at ~0.67 accuracy. ECE: expected calibration error (15 bins, top label).",
        "",
        *_per_class_table(metrics),
        "",
        "Confusion matrices (rows: true class): `figures/confusion_*.png` and `.csv`. "
        "Learning curves: `figures/learning_curves.png`, per-epoch logs `figures/history_*.csv`.",
        "",
        *(
            ["## Per source and on another dermoscope", "", *shift_section(prov["shift"], prov.get("held_out_sources")), ""]
            if "shift" in prov
            else []
        ),
        *(["## Compared with the previous version", "", *previous_section(manifest), ""] if "previous" in prov else []),
        "## Ensemble",
        "",
        f"Weights fitted on the validation split by balanced accuracy over a 0.05 grid: "
        f"{', '.join(f'{k} {v:.2f}' for k, v in ensemble['weights'].items())} (validation balanced accuracy "
        f"{ensemble['val_balanced_accuracy']:.3f}; equal weights {ensemble['equal_weights_val_balanced_accuracy']:.3f}). "
        f"Each member's output is divided by its training class prior to the power "
        f"{ensemble['prior_correction']} (fitted on validation; baked into the output layer's bias), because members "
        "were trained on class-rebalanced samples and balanced accuracy rewards prior-free scores. "
        f"Flip test-time augmentation on validation: {ensemble['val_balanced_accuracy_with_tta']:.3f} with, "
        f"{ensemble['val_balanced_accuracy_without_tta']:.3f} without; "
        + (
            "each shipped member averages its four flipped views inside the model, so the figures above and "
            "dermscore's scores include it (at four times the compute)."
            if ensemble["tta"]
            else "the figures above are without it, as dermscore scores."
        ),
        "",
        "## Training",
        "",
        f"Exported (float32 reference figures, storage check) on: {training['exported_on']}.",
        "",
    ]
    for member, info in training["members"].items():
        lines.append(
            f"- **{member}**: {info['epochs_run']} epochs in {info['seconds'] / 60:.0f} min "
            f"({info['seconds_per_epoch']:.0f} s/epoch including validation), {len(info['stages'])} stage(s):"
        )
        for number, stage in enumerate(info["stages"], start=1):
            hp = stage["hyperparameters"]
            lines.append(
                f"  {number}. `{stage['command']}`: {stage['epochs_run']} epochs of {stage['steps_per_epoch']} "
                f"steps x {stage['batch_size']} images, input {hp['input_size'][0]}x{hp['input_size'][1]}, "
                f"peak learning rate {hp['learning_rate']}, sampling power {hp['sampling_power']}, label smoothing "
                f"{hp['label_smoothing']}, init {hp['init']}{', warm start from ' + stage.get('warm_start_from', hp['warm_start']) if hp.get('warm_start') else ''}; "
                f"best validation balanced accuracy {stage['best_val_balanced_accuracy']:.3f} at epoch {stage['best_epoch']}; "
                f"trained on {' / '.join(stage['machines']) or 'a machine that was not recorded'}."
            )
    lines += _fitted_sections(manifest)
    lines += [
        "",
        f"Weights storage: {prov['weights_storage']['summary']}",
        "",
        "## Limitations",
        "",
        *[f"- {item}" for item in prov["limitations"]],
        "",
        "## A stronger bundle",
        "",
        prov["stronger_bundle"],
        "",
    ]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def _fitted_sections(manifest: dict) -> list[str]:
    """Calibration, operating points and OOD detection, for bundles fitted by ``python -m training calibrate``."""
    calibration, points, ood = manifest.get("calibration"), manifest.get("operating_points"), manifest.get("ood")
    if not (calibration and points and ood):
        return []
    fitted = manifest["provenance"].get("fitted_from_bundle", {})
    where = f"measured {fitted.get('date', 'n/a')[:10]} on {fitted.get('machine', 'a machine not recorded')}"
    test = calibration["test"]
    temperatures = calibration["temperature"]
    t_text = f"T = {temperatures:.3f}" if isinstance(temperatures, float | int) else (
        "T per class = " + ", ".join(f"{c} {t:.2f}" for c, t in zip(CLASS_CODES, temperatures)))
    nll = calibration["validation_nll"]
    lines = [
        "",
        "## Calibration",
        "",
        f"Temperature scaling of the prior-corrected ensemble, `softmax(log p / T)`, fitted on the validation split by "
        f"negative log-likelihood: **{calibration['method']}, {t_text}** (validation NLL {nll['uncalibrated']:.3f} "
        f"uncalibrated" + "".join(f"; held-out 5-fold NLL {k.split('_held')[0]} {v:.3f}" for k, v in nll.items()
                                   if k != "uncalibrated") + "). "
        f"dermscore applies it to the class probabilities, confidence and malignant probability; `predicted_class` "
        f"stays the top class of the uncalibrated prior-corrected ensemble (the balanced decision rule), and "
        f"`confidence` is the calibrated probability of that class ({test['predicted_class_changed']} of the "
        f"test images would get another top class from the calibrated probabilities)."
        + (f" The variant with the lower held-out NLL is used; the other ({calibration['not_chosen']['method']}) "
           f"would give a test ECE of "
           f"{calibration['not_chosen']['test_expected_calibration_error']:.3f}." if "not_chosen" in calibration
           else " Too few validation images per class to judge one temperature per class on held-out folds."),
        "",
        "| test split | ECE (15 bins) | mean confidence | accuracy |",
        "| --- | --- | --- | --- |",
        f"| uncalibrated | {test['expected_calibration_error_before']:.3f} | {test['mean_confidence_before']:.3f} | "
        f"{test['accuracy']:.3f} |",
        f"| calibrated | {test['expected_calibration_error_after']:.3f} | {test['mean_confidence_after']:.3f} | "
        f"{test['accuracy']:.3f} |",
        "",
        f"Reliability diagram: `figures/reliability.png` ({where}).",
        "",
        "## Operating points",
        "",
        f"Fitted on validation: malignant threshold **{points['malignant_threshold']:.3f}** on the calibrated malignant "
        f"probability (the highest with validation sensitivity >= {points['sensitivity_target']:.2f} for "
        f"{', '.join(manifest['malignant_classes'])}); review when the calibrated confidence is below "
        f"**{points['review_threshold']:.3f}**, the members disagree (Jensen-Shannon divergence "
        f">= **{points['disagreement_threshold']:.2f}**"
        + (", or different top classes" if points["members_disagree_on_top_class"] else
           "; different top classes alone no longer flag") + "), or the image is out-of-distribution: the rule catching the "
        f"most validation errors while flagging at most {_pct(points['max_review_share'])} of validation images. "
        "Command-line thresholds override each of these.",
        "",
        "| split | images | malignant sensitivity | malignant specificity | flagged for review | wrong predictions "
        "flagged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side in ("val", "test"):
        f = points[side]
        lines.append(f"| {side} | {f['images']} | {_pct(f['sensitivity'])} | {_pct(f['specificity'])} | "
                     f"{_pct(f['share_flagged'])} | {_pct(f['errors_caught'])} of {f['errors']} |")
    result = ood["test"]
    lines += [
        "",
        "## Out-of-distribution detection",
        "",
        "`ood_score`: Mahalanobis distance of the members' penultimate-layer features (concatenated"
        + (", averaged over the flipped views as the probabilities are" if ood["views"] == "flips" else "")
        + ") to the nearest class mean of the training split, with a shared Ledoit-Wolf covariance, divided by the "
        f"square root of the feature count. Fitted on {ood['fitted_on']['train_images']} training images (a seeded "
        f"random subset where fewer than the split's, to bound the CPU time of scoring them); threshold **{ood['threshold']:.3f}** = {ood['threshold_rule']}. Statistics in "
        f"`{ood['file']}` (sha256 in the manifest).",
        "",
        f"Against {result['non_dermoscopic_images']} non-dermoscopic images built from what installed packages ship "
        "(scikit-image photographs and grey-scale images, pydicom CT/MR/NM/US test slices, matplotlib sample data "
        "and rendered charts and text screens, each with random crops; `training/ood_set.py`): AUROC "
        f"**{result['auroc_against_non_dermoscopic']:.3f}** against the HAM10000 test split; at the threshold "
        f"**{_pct(result['share_of_test_flagged'])}** of the test images and {_pct(result['share_of_non_dermoscopic_flagged'])} "
        f"of the non-dermoscopic images are flagged ({where}).",
        "",
        "| score | AUROC | test images flagged | non-dermoscopic flagged |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {m['auroc']:.3f} | {_pct(m['test_flagged'])} | {_pct(m['non_dermoscopic_flagged'])} |"
          for name, m in ood["comparison"].items()),
        "",
        f"(Each score at its own threshold: the same percentile of its validation scores.) Per category of the "
        "non-dermoscopic set (shipped score, bundle threshold):",
        "",
        "| category | images | AUROC | flagged |",
        "| --- | --- | --- | --- |",
        *(f"| {c} | {v['images']} | {v['auroc']:.3f} | {_pct(v['flagged'])} |" for c, v in ood["per_category"].items()),
        "",
        "Score distributions: `figures/ood_scores.png`.",
    ]
    return lines
