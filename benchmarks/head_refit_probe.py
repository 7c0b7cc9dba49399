"""Whether refitting only the members' last layer on frozen features makes a bundle stronger or less device-bound.

    PYTHONPATH=. python benchmarks/head_refit_probe.py [--bundle models/ham10000-ensemble] [--work training-work]

The cheapest retraining there is, and the one a 2-core CPU can do in an hour: keep each member's backbone,
take the features its classifier's last (softmax) layer reads, and fit that layer again as a multinomial
logistic regression on the training split's features, in four variants:

- ``plain:class``: the training images, classes weighted equally (balanced accuracy is the target);
- ``plain:group``: every (source, class) group weighted equally within its class, so recognising the
  camera (MoleMax images are almost all nevi) no longer pays (last-layer retraining against a spurious
  feature, as in Kirichenko et al. 2022, "Last layer re-training is sufficient for robustness to
  spurious correlations");
- ``plain+shift:*``: the same with a device-shifted copy of every training image added (``training.shift``,
  seed 11, so not the evaluation's draws), so directions that move with the camera's colour cost loss.

The regularisation C of each variant is chosen on the validation split's balanced accuracy, and so are the
ensemble weights; the test split is only reported, with the shipped layer as the baseline, plain and on the
evaluation's device-shifted copy (seed 2026, the one ``python -m training evaluate`` scores). Members that
average their four flipped views (the bundle's ``ood.views``) are scored the same way: the softmax of each
view, averaged. Prints one JSON line per member and variant (validation, test) and per ensemble.
Features are kept in ``WORK/head_refit`` so a rerun only refits.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression

from dermscore.bundle import Bundle, Member, load_bundle
from dermscore.features import classifier_of, flip_views
from dermscore.preprocess import correct_colour, normalize
from training import data, metrics, shift, split
from training.ensemble import combine, fit_weights

TRAIN_SHIFT_SEED = 11
C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
VARIANTS = tuple(itertools.product(("plain", "plain+shift"), ("class", "group")))
SOURCES_SHOWN = ("rosendahl", "vidir_modern", "vidir_molemax")


def member_features(bundle: Bundle, member: Member, images: dict[str, np.ndarray], cache: Path) -> dict[str, np.ndarray]:
    """(n, views, k) inputs of the member's last layer for each image set, and that layer's weights.

    Training images get one view (the image as stored): the regression has enough of them, and the
    member's training already saw every flip.
    """
    path = cache / f"{member.name}_{member.sha256[:12]}.npz"
    if path.is_file():
        return dict(np.load(path))
    views = bundle.ood.views if bundle.ood else "none"
    classifier = classifier_of(keras.models.load_model(bundle.member_path(member), compile=False), views)
    last = classifier.layers[-1]
    extractor = keras.Model(classifier.inputs, last.input)
    out = {}
    for name, array in images.items():
        batches = []
        for start in range(0, len(array), 64):
            x = normalize(correct_colour(np.asarray(array[start:start + 64]), bundle.colour_constancy), member.preprocessing)
            stack = [x] if name.startswith("train") or views == "none" else flip_views(x)
            batches.append(np.stack([extractor.predict_on_batch(np.ascontiguousarray(v)) for v in stack], 1))
        out[name] = np.concatenate(batches).astype(np.float32)
        print(json.dumps({"member": member.name, "features": name, "images": len(array)}), flush=True)
    out["W"], out["b"] = (np.asarray(w, dtype=np.float64) for w in last.get_weights())
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def softmax_over_views(features: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    z = features @ W + b
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).mean(1)


def sample_weights(y: np.ndarray, sources: np.ndarray, by: str) -> np.ndarray:
    """Classes weighted equally; with ``group``, also each source within a class."""
    w = np.zeros(len(y))
    for c in np.unique(y):
        groups = np.unique(sources[y == c]) if by == "group" else [None]
        for g in groups:
            mask = (y == c) if g is None else (y == c) & (sources == g)
            w[mask] = 1.0 / (len(groups) * mask.sum())
    return w / w.mean()


def fit_layer(X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised features, folded back into a Dense layer's kernel and bias."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    fitted = LogisticRegression(C=C, max_iter=3000).fit((X - mu) / sd, y, sample_weight=w)
    return fitted.coef_.T / sd[:, None], fitted.intercept_ - (mu / sd) @ fitted.coef_.T


def figures(y: np.ndarray, sources: np.ndarray, plain: np.ndarray, shifted: np.ndarray | None = None) -> dict:
    result = metrics.evaluate(y, plain)
    by_source = shift.per_source(y, plain, sources)
    out = {
        "balanced_accuracy": round(result["balanced_accuracy"], 3),
        "mel_sens_at_90_spec": round(result["melanoma_sensitivity_at_90_specificity"], 3),
        "mel_vs_nv_auc": shift.mel_vs_nv_auc(y, plain)["mel_vs_nv_auc"],
        "mel_vs_nv_auc_by_source": {s: by_source.get(s, {}).get("mel_vs_nv_auc") for s in SOURCES_SHOWN},
    }
    if shifted is not None:
        after = metrics.evaluate(y, shifted)["balanced_accuracy"]
        out.update(shifted_balanced_accuracy=round(after, 3), drop=round(result["balanced_accuracy"] - after, 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/ham10000-ensemble"))
    parser.add_argument("--work", type=Path, default=Path("training-work"))
    parser.add_argument("--sources", type=Path, default=Path("../shared/data/ham10000-200x150") / shift.SOURCES_FILE)
    args = parser.parse_args()
    records = data.read_index(args.work / "index.csv")
    sides = split.split_indices(records, split.read_split(args.work / "split.csv"))
    labels = data.labels_of(records)
    sources = shift.sources_of([r.image_id for r in records], shift.read_sources(args.sources))
    tests = [records[i] for i in sides["test"]]
    evaluation_shift = shift.DeviceShift()
    test_files = shift.write_shifted_copy(
        {r.image_id: Path(r.path) for r in tests}, shift.shifted_folder(args.work, evaluation_shift), evaluation_shift)
    train_shift = shift.DeviceShift(seed=TRAIN_SHIFT_SEED)
    files = shift.write_shifted_copy(
        {r.image_id: Path(r.path) for r in records}, shift.shifted_folder(args.work, train_shift), train_shift)
    bundle = load_bundle(args.bundle)
    cache = args.work / "head_refit"
    probs: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # variant -> member -> val / test / test_shifted
    for member in bundle.members:
        plain = data.load_image_cache(records, member.input_size, member.resize, args.work / "cache")
        shifted = data.load_image_cache(
            [replace(r, path=str(files[r.image_id])) for r in records], member.input_size, member.resize, cache)
        shifted_test = data.load_image_cache(
            [replace(r, path=str(test_files[r.image_id])) for r in tests], member.input_size, member.resize,
            args.work / "cache" / "device_shift")
        f = member_features(bundle, member, {
            "train": plain[sides["train"]], "train_shifted": shifted[sides["train"]], "val": plain[sides["val"]],
            "test": plain[sides["test"]], "test_shifted": shifted_test}, cache)

        def scored(W: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
            return {k: softmax_over_views(f[k], W, b) for k in ("val", "test", "test_shifted")}

        probs.setdefault("shipped", {})[member.name] = scored(f["W"], f["b"])
        for inputs, by in VARIANTS:
            parts = ["train"] + (["train_shifted"] if inputs == "plain+shift" else [])
            X = np.concatenate([f[p].reshape(-1, f[p].shape[-1]) for p in parts])
            index = np.tile(np.repeat(sides["train"], f["train"].shape[1]), len(parts))
            w = sample_weights(labels[index], sources[index], by)
            candidates = []
            for C in C_GRID:
                p = scored(*fit_layer(X, labels[index], w, C))
                candidates.append((metrics.balanced_accuracy(labels[sides["val"]], p["val"].argmax(1)), C, p))
            val_ba, C, chosen = max(candidates, key=lambda t: t[:2])
            probs.setdefault(f"{inputs}:{by}", {})[member.name] = chosen
            print(json.dumps({"member": member.name, "variant": f"{inputs}:{by}", "C": C,
                              "val_balanced_accuracy_by_C": {c: round(v, 3) for v, c, _ in candidates}}), flush=True)
    for variant, by_member in probs.items():
        names = list(by_member)
        weights = tuple(fit_weights([by_member[m]["val"] for m in names], labels[sides["val"]])["weights"])
        rows = {**by_member, "ensemble": {k: combine([by_member[m][k] for m in names], weights) for k in ("val", "test", "test_shifted")}}
        for name, p in rows.items():
            print(json.dumps({
                "variant": variant, "model": name, **({"weights": dict(zip(names, weights))} if name == "ensemble" else {}),
                "val": figures(labels[sides["val"]], sources[sides["val"]], p["val"]),
                "test": figures(labels[sides["test"]], sources[sides["test"]], p["test"], p["test_shifted"]),
            }), flush=True)


if __name__ == "__main__":
    main()
