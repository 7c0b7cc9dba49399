"""Size and accuracy gap of a bundle's LiteRT export (float32 and float16 weights) against Keras.

Exports the bundle (``dermscore.export.litert``, with --float16), then scores real 200x150 HAM10000
images with Keras and with both LiteRT variants (ai-edge-litert's interpreter) and prints, per member and
for the ensemble, the largest absolute probability difference and how many predicted classes change.

    python benchmarks/litert_gap.py [--model ham10000-ensemble] [--images 64] [--out /tmp/litert]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dermscore.aggregate import ensemble
from dermscore.bundle import load_bundle
from dermscore.export.litert import LITERT_JSON, export_litert, run_litert
from dermscore.preprocess import prepare
from dermscore.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "ham10000-200x150" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dermscore-litert"))
    args = parser.parse_args()
    from dermscore.infer import load_member

    bundle = load_bundle(args.model)
    started = time.perf_counter()
    export_litert(bundle, args.out, float16=True)
    export_seconds = time.perf_counter() - started
    manifest = json.loads((args.out / LITERT_JSON).read_text())
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(IMAGES.glob("*.jpg"))[: args.images]]
    prepared = [prepare(image, bundle.members) for image in rgb]
    by_variant: dict[str, dict[str, np.ndarray]] = {"keras": {}, "float32": {}, "float16": {}}
    report: dict[str, object] = {"bundle": bundle.identity, "images": len(rgb), "export_seconds": round(export_seconds, 1)}
    for member, entry in zip(bundle.members, manifest["members"]):
        batch = np.stack([p[member.name] for p in prepared])
        model = load_member(bundle.member_path(member), Runtime(device="cpu"))
        by_variant["keras"][member.name] = np.asarray(model.predict(batch, batch_size=16, verbose=0), dtype=np.float64)
        by_variant["float32"][member.name] = run_litert(args.out / entry["file"], batch)
        by_variant["float16"][member.name] = run_litert(args.out / entry["float16"]["file"], batch)
        report[member.name] = {
            "keras_bytes": bundle.member_path(member).stat().st_size,
            "float32_bytes": entry["bytes"], "float16_bytes": entry["float16"]["bytes"],
            **{f"{v}_max_abs_diff": float(np.abs(by_variant[v][member.name] - by_variant["keras"][member.name]).max())
               for v in ("float32", "float16")},
        }
    reference = np.stack([ensemble({m: by_variant["keras"][m][i] for m in by_variant["keras"]}, bundle)
                          for i in range(len(rgb))])
    for variant in ("float32", "float16"):
        got = np.stack([ensemble({m: by_variant[variant][m][i] for m in by_variant[variant]}, bundle)
                        for i in range(len(rgb))])
        report[f"ensemble_{variant}"] = {
            "max_abs_diff": float(np.abs(got - reference).max()),
            "predicted_class_changes": int((got.argmax(axis=1) != reference.argmax(axis=1)).sum()),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
