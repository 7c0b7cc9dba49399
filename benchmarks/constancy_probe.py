"""How much a bundle's members depend on the absolute colour that Shades of Gray removes.

    PYTHONPATH=. python benchmarks/constancy_probe.py [--bundle models/ham10000-ensemble] [--work training-work]

Scores each member of the bundle, as stored (its built-in flips and prior correction included), on the test
images of the work folder's ``split.csv`` twice: prepared as the bundle says, and with Shades of Gray (p = 6)
applied at test time although the member was not trained with it. No retraining. A member that learnt the
lesion's shape and texture loses little; one that learnt each image's colour cast (which camera took it)
loses much. Prints balanced accuracy, melanoma sensitivity at 90% specificity and the melanoma-vs-nevus AUC
for both, as JSON lines. The work folder needs ``index.csv`` and ``split.csv`` (``python -m training split``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import keras

from dermscore.bundle import ColourConstancy, load_bundle
from training import data, metrics, shift, split
from training.train import predict

SHADES_OF_GRAY = ColourConstancy("shades_of_gray", 6.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/ham10000-ensemble"))
    parser.add_argument("--work", type=Path, default=Path("training-work"))
    args = parser.parse_args()
    records = data.read_index(args.work / "index.csv")
    test = split.split_indices(records, split.read_split(args.work / "split.csv"))["test"]
    y = data.labels_of(records)[test]
    bundle = load_bundle(args.bundle)
    for member in bundle.members:
        images = data.load_image_cache(records, member.input_size, "bilinear", args.work / "cache")
        model = keras.models.load_model(bundle.member_path(member), compile=False)
        for label, constancy in (("as the bundle prepares", bundle.colour_constancy), ("with shades of gray p=6", SHADES_OF_GRAY)):
            probs = predict(model, images, test, member.preprocessing, constancy)
            figures = metrics.evaluate(y, probs)
            print(json.dumps({
                "member": member.name, "input": label, "images": len(test),
                "balanced_accuracy": round(figures["balanced_accuracy"], 4),
                "mel_sens_at_90_spec": round(figures["melanoma_sensitivity_at_90_specificity"], 4),
                "mel_vs_nv_auc": shift.mel_vs_nv_auc(y, probs)["mel_vs_nv_auc"],
            }), flush=True)


if __name__ == "__main__":
    main()
