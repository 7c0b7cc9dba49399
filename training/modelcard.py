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
                f"{hp['label_smoothing']}, init {hp['init']}{', warm start ' + hp['warm_start'] if hp.get('warm_start') else ''}; "
                f"best validation balanced accuracy {stage['best_val_balanced_accuracy']:.3f} at epoch {stage['best_epoch']}; "
                f"trained on {' / '.join(stage['machines']) or 'a machine that was not recorded'}."
            )
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
