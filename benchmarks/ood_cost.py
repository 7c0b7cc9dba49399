"""What the OOD score costs: members with and without their feature output, plus the detector, alternated.

    PYTHONPATH=. python benchmarks/ood_cost.py [--bundle models/ham10000-ensemble] [--rounds 4] [--batches 2]

Both Predictors are loaded at once (ONNX Runtime on CPU: the bundle's exports with and without the
feature output, from the cache) and score the same real HAM10000 images in alternating rounds, because
a shared 2-core VM drifts by tens of percent within minutes. The detector's own time (``OodDetector.score``
on the batch's features) is measured separately. The issue's bar: under 5% of the run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from dermscore.bundle import load_bundle
from dermscore.infer import Predictor, features_key
from dermscore.preprocess import prepare, stack_inputs
from dermscore.runtime import cpu_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000-200x150" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="models/ham10000-ensemble")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="batches per round and setting")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    if bundle.ood is None:
        raise SystemExit(f"{bundle.path} has no OOD detector: nothing to measure")
    with_features = Predictor(bundle)
    without = Predictor(replace(bundle, ood=None))
    images = sorted(DATA.glob("*.jpg"))[: with_features.batch_size]
    batch = stack_inputs([prepare(np.asarray(Image.open(p).convert("RGB")), bundle.members, bundle.colour_constancy)
                          for p in images],
                         bundle.members)
    for predictor in (with_features, without):  # warm-up
        predictor(batch)
    times: dict[str, list[float]] = {"with features": [], "without": [], "detector": []}
    features = {m: with_features(batch)[features_key(m)] for m in with_features.detector.members}
    for _ in range(args.rounds):
        for name, predictor in (("with features", with_features), ("without", without)):
            start = time.perf_counter()
            for _ in range(args.batches):
                predictor(batch)
            times[name].append((time.perf_counter() - start) / (args.batches * len(images)))
        start = time.perf_counter()
        for _ in range(args.batches):
            with_features.detector.score(features)
        times["detector"].append((time.perf_counter() - start) / (args.batches * len(images)))
    print(f"{bundle.name} {bundle.version}, batch {len(images)}, {with_features.backend}; {cpu_model()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for name, values in times.items():
        print(f"{name:14s} per image: median {1000 * np.median(values):7.2f} ms  rounds "
              + " ".join(f"{1000 * v:.2f}" for v in values))
    base = np.median(times["without"])
    extra = np.median(times["with features"]) - base + np.median(times["detector"])
    print(f"OOD cost: {100 * extra / base:+.1f}% of model-only scoring time (members + detector against members only)")


if __name__ == "__main__":
    main()
