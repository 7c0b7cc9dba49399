"""How often each image-quality rule fires on real HAM10000 images and on degraded copies of them.

The figures behind the thresholds in ``dermscore/gate/quality.py`` (docs/quality.md). Genuine images:
the shipped bundle's test split (200x150), the other 200x150 images, and the 124 600x450 originals.
Degraded copies of the test split and the originals: Gaussian blur (sigma given for a 150-pixel shorter
side and scaled with the image), darkened and brightened (every channel times a gain, clipped) and
shrunk to 67x50 pixels. ``too-small`` is judged against the shipped bundle's members.

    python benchmarks/quality_thresholds.py            # about 5 minutes on a 2-core Xeon
    python benchmarks/quality_thresholds.py --timing   # only the cost per image
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from dermscore.bundle import load_bundle
from dermscore.decode import decode_source
from dermscore.discover import file_source
from dermscore.gate.quality import BLURRED, OVER_EXPOSED, TOO_SMALL, UNDER_EXPOSED, measure, problems
from dermscore.preprocess import prepare

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RULES = (BLURRED, UNDER_EXPOSED, OVER_EXPOSED, TOO_SMALL)


def blur(sigma: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(rgb: np.ndarray) -> np.ndarray:
        radius = sigma * min(rgb.shape[:2]) / 150
        return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))
    return apply


def gain(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(rgb: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(rgb.astype(np.float32) * factor), 0, 255).astype(np.uint8)
    return apply


def shrink(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((67, 50), Image.Resampling.BILINEAR))


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "genuine": lambda rgb: rgb,
    "blur sigma 1": blur(1.0), "blur sigma 1.5": blur(1.5), "blur sigma 2": blur(2.0), "blur sigma 3": blur(3.0),
    "gain 0.5 (-1 EV)": gain(0.5), "gain 0.35 (-1.5 EV)": gain(0.35), "gain 0.25 (-2 EV)": gain(0.25),
    "gain 1.5 (+0.6 EV)": gain(1.5), "gain 2 (+1 EV)": gain(2.0), "gain 3 (+1.6 EV)": gain(3.0),
    "shrunk to 67x50": shrink,
}


def load(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def rates(images: list[np.ndarray], variant: Callable[[np.ndarray], np.ndarray], members: list) -> dict[str, float]:
    found = [problems(measure(variant(rgb)), members) or [] for rgb in images]
    out = {rule: 100.0 * np.mean([rule in f for f in found]) for rule in RULES}
    out["any"] = 100.0 * np.mean([bool(f) for f in found])
    return out


def table(title: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"\n{title}: % of images each rule fires on",
             "| copy | " + " | ".join(RULES) + " | any |", "|---" * (len(RULES) + 2) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in (*RULES, "any")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle whose members decide too-small (default: shipped)")
    parser.add_argument("--timing", action="store_true", help="only the cost per image, not the firing rates")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    members = list(bundle.members)
    small = DATA / "ham10000-200x150" / "images"
    if args.timing:
        print(timing(small, members))
        return
    with open(REPO / "models" / "ham10000-ensemble" / "split.csv", encoding="utf-8") as handle:
        split = {row["image_id"]: row["split"] for row in csv.DictReader(handle)}
    test = load([small / f"{i}.jpg" for i, s in sorted(split.items()) if s == "test"])
    rest = load(sorted(p for p in small.glob("*.jpg") if split.get(p.stem) != "test"))
    originals = load(sorted((DATA / "ham10000-600x450-sample" / "images").glob("*.jpg")))

    genuine = VARIANTS["genuine"]
    print(table("Genuine images", {f"test split 200x150 ({len(test)})": rates(test, genuine, members),
                                   f"train+val 200x150 ({len(rest)})": rates(rest, genuine, members),
                                   f"originals 600x450 ({len(originals)})": rates(originals, genuine, members)}))
    print(table(f"Test split 200x150, {len(test)} images",
                {name: rates(test, v, members) for name, v in VARIANTS.items()}))
    print(table(f"Originals 600x450, {len(originals)} images",
                {name: rates(originals, v, members) for name, v in VARIANTS.items()}))

    print(timing(small, members))


def timing(small: Path, members: list, rounds: int = 3) -> str:
    """Per-image cost of ``measure`` against the rest of a decode thread's work (decode, preprocessing)."""
    files = {"200x150": sorted(small.glob("*.jpg"))[:124],
             "600x450": sorted((DATA / "ham10000-600x450-sample" / "images").glob("*.jpg"))}
    lines = []
    for name, paths in files.items():
        sources = [file_source(p) for p in paths]
        images = [frame.rgb for source in sources for frame in decode_source(source)]
        steps = {"decode": lambda: [decode_source(s) for s in sources],
                 "preprocess": lambda: [prepare(rgb, members) for rgb in images],
                 "quality": lambda: [measure(rgb) for rgb in images]}
        ms = {}
        for step, work in steps.items():
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
            ms[step] = 1000 * float(np.median(times)) / len(paths)
        share = 100 * ms["quality"] / sum(ms.values())
        lines.append(f"{name}: decode {ms['decode']:.2f} ms, preprocess {ms['preprocess']:.2f} ms, quality "
                     f"{ms['quality']:.2f} ms per image (median of {rounds} rounds): quality is {share:.0f}% of "
                     "a decode thread's work")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
