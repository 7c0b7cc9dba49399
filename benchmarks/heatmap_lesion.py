"""Where the heatmaps' mass lies on real test images: on the lesion, the skin around it, or the vignette.

    PYTHONPATH=. nice -n 5 python benchmarks/heatmap_lesion.py [--images 400] [--figure docs/figures/heatmaps.png]

For test-split images of the shipped bundle (``models/ham10000-ensemble/split.csv``; every k-th test image
in the file's order, k chosen to give ``--images``), ``dermscore.explain.Explainer`` computes each member's
heatmap for its top class and the ensemble's for its predicted class, exactly as ``--heatmaps`` does, and
compares it with a simple lesion mask:

* vignette: the dermoscope's dark corners, i.e. pixels darker than half the image's median grey (mean
  of R, G, B) in connected regions that touch the image's border, widened by 4% of the shorter side to
  take in the transition to the skin;
* lesion: Otsu's threshold on the blue channel over the pixels outside the vignette (pigment absorbs
  blue most), the largest dark component, holes filled.

Per map: the share of its mass inside the lesion mask, against the mask's share of the image (what a
uniform map gives); the same for the vignette. A control: the ensemble's map averaged over all the
images, the same map for every image (what a map that only knows "lesions sit near the centre" gives). Two versions of each map: ``raw``, as in the ``_raw.png``
files (the Grad-CAM map in proportion), and ``stretched`` from its minimum to its maximum, as the
overlays' colours show it. Prints a Markdown table; ``--figure`` writes a few
rows of original | ensemble overlay | InceptionV3 overlay (lesion mask outlined in white) for the docs.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.filters import threshold_otsu

from dermscore.bundle import load_bundle
from dermscore.decode import decode_source
from dermscore.discover import file_source
from dermscore.explain import ENSEMBLE, EXPLAIN_BATCH, MIN_CELLS, Explainer, overlay, proportional, stretched
from dermscore.runtime import cpu_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ham10000-200x150" / "images"
VIGNETTE_SHARE = 0.5  # vignette: darker than this share of the image's median grey, connected to the border
VIGNETTE_MARGIN = 0.04  # and this share of the image's shorter side around it (the dark-to-skin transition)
FIGURE_IMAGES = 4


def masks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lesion, vignette) boolean masks of an RGB uint8 image (see the module docstring)."""
    grey = rgb.astype(np.float32).mean(axis=2)
    dark, _ = ndimage.label(grey < VIGNETTE_SHARE * np.median(grey))
    border = np.unique(np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]]))
    vignette = np.isin(dark, border[border > 0])
    margin = round(VIGNETTE_MARGIN * min(grey.shape))
    if vignette.any() and margin:
        vignette = ndimage.binary_dilation(vignette, iterations=margin)
    blue = rgb[..., 2].astype(np.float32)
    inside = blue[~vignette]
    if inside.size == 0 or inside.min() == inside.max():
        return np.zeros_like(vignette), vignette
    candidates, count = ndimage.label((blue <= threshold_otsu(inside)) & ~vignette)
    if count == 0:
        return np.zeros_like(vignette), vignette
    sizes = ndimage.sum(np.ones_like(blue), candidates, index=range(1, count + 1))
    lesion = ndimage.binary_fill_holes(candidates == 1 + int(np.argmax(sizes))) & ~vignette
    return lesion, vignette


def shares(heatmap: np.ndarray, region: np.ndarray) -> float:
    """The share of the map's mass inside ``region`` (NaN for a map with no mass)."""
    total = float(heatmap.sum())
    return float(heatmap[region].sum()) / total if total > 0 else float("nan")


def test_images(split: Path, wanted: int) -> list[Path]:
    with open(split, newline="", encoding="utf-8") as handle:
        ids = [row["image_id"] for row in csv.DictReader(handle) if row["split"] == "test"]
    step = max(len(ids) // wanted, 1)
    return [DATA / f"{image_id}.jpg" for image_id in ids[::step][:wanted]]


def figure(panels: list[tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, str]], path: Path) -> None:
    """Rows of original | overlays, the lesion mask outlined in white (the vignette's edge in black),
    labelled with the class; saved with a dithered 256-colour palette to stay small."""
    height, width = panels[0][0].shape[:2]
    label, gap = 14, 6
    columns = 1 + len(panels[0][1])
    sheet = Image.new("RGB", (columns * (width + gap) - gap, len(panels) * (height + label + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (rgb, heatmaps, lesion, vignette, text) in enumerate(panels):
        top = i * (height + label + 4)
        sheet.paste(Image.fromarray(rgb), (0, top + label))
        for j, heatmap in enumerate(heatmaps, start=1):
            shown = overlay(rgb, heatmap)
            shown[lesion ^ ndimage.binary_erosion(lesion, iterations=1)] = 255
            shown[vignette ^ ndimage.binary_erosion(vignette, iterations=1)] = 0
            sheet.paste(Image.fromarray(shown), (j * (width + gap), top + label))
        draw.text((2, top), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256, method=Image.Quantize.FASTOCTREE, kmeans=2, dither=Image.Dither.FLOYDSTEINBERG).save(
        path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "models" / "ham10000-ensemble"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--min-cells", type=int, default=MIN_CELLS,
                        help="dermscore.explain.choose_layer's rule: the explained layer's grid has at least this many "
                             "cells on its shorter side")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    paths = test_images(Path(args.bundle) / "split.csv", args.images)
    started = time.perf_counter()
    explainer = Explainer(bundle, min_cells=args.min_cells)
    layers = ", ".join(f"{name} {maps.layer.name} ({maps.layer.grid[0]} x {maps.layer.grid[1]}, {maps.score})"
                       for name, maps in explainer.members().items())
    load_seconds = time.perf_counter() - started
    print(f"Grad-CAM at {layers}")
    who = [*(m.name for m in bundle.members), ENSEMBLE]
    results: dict[str, dict[str, list[float]]] = {w: {} for w in who}
    areas: dict[str, list[float]] = {"lesion": [], "vignette": []}
    panels = []
    shown_classes: set[str] = set()
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (lesion, vignette, ensemble map) per image
    explain_seconds, first_seconds = 0.0, 0.0
    for start in range(0, len(paths), EXPLAIN_BATCH):
        rgbs = [decode_source(file_source(path))[0].rgb for path in paths[start:start + EXPLAIN_BATCH]]
        tick = time.perf_counter()
        batch = explainer.explain_many(rgbs)
        if start == 0:  # the first call traces and compiles the gradient functions
            first_seconds = time.perf_counter() - tick
        else:
            explain_seconds += time.perf_counter() - tick
        for path, rgb, explained in zip(paths[start:start + EXPLAIN_BATCH], rgbs, batch):
            lesion, vignette = masks(rgb)
            areas["lesion"].append(float(lesion.mean()))
            areas["vignette"].append(float(vignette.mean()))
            for name in who:
                heatmap = explained.maps[name].astype(np.float64)
                for kind, version in (("raw", proportional(heatmap)), ("stretched", stretched(heatmap))):
                    results[name].setdefault(f"{kind} lesion", []).append(shares(version, lesion))
                    results[name].setdefault(f"{kind} vignette", []).append(shares(version, vignette))
            kept.append((lesion, vignette, proportional(explained.maps[ENSEMBLE].astype(np.float64))))
            # A few images of different predicted classes with a lesion mask of a sensible size.
            predicted = explained.classes[ENSEMBLE]
            if (args.figure and len(panels) < FIGURE_IMAGES and 0.05 < lesion.mean() < 0.6
                    and predicted not in shown_classes):
                shown_classes.add(predicted)
                label = f"{path.stem}: {predicted}; ensemble | inceptionv3"
                panels.append((rgb, [explained.maps[ENSEMBLE], explained.maps[bundle.members[0].name]], lesion,
                               vignette, label))
    lesion_area = np.array(areas["lesion"])
    vignette_area = np.array(areas["vignette"])
    with_vignette = vignette_area > 0.01
    print(f"{len(paths)} test images of {bundle.name} {bundle.version}, {datetime.now(timezone.utc):%Y-%m-%d}, "
          f"{cpu_model()} ({platform.machine()}), shared; members loaded in {load_seconds:.1f} s, "
          f"first batch of {min(EXPLAIN_BATCH, len(paths))} (tracing) {first_seconds:.1f} s, then "
          f"{explain_seconds / max(len(paths) - EXPLAIN_BATCH, 1):.2f} s per image for all maps, {EXPLAIN_BATCH} "
          "images per call")
    print(f"lesion mask: mean {lesion_area.mean():.3f} of the image (what a uniform map puts on it); vignette in "
          f"{with_vignette.sum()} images, mean {vignette_area[with_vignette].mean() if with_vignette.any() else 0:.3f} "
          "of those images\n")
    print("| map | version | mass on lesion (mean) | lesion area (mean) | mass / area (median) | "
          "images with mass > area | mass in vignette (images with one) | vignette area |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in who:
        for kind in ("raw", "stretched"):
            on_lesion = np.array(results[name][f"{kind} lesion"])
            in_vignette = np.array(results[name][f"{kind} vignette"])
            valid = ~np.isnan(on_lesion) & (lesion_area > 0)
            ratio = np.median(on_lesion[valid] / lesion_area[valid])
            above = np.mean(on_lesion[valid] > lesion_area[valid])
            vig = np.nanmean(in_vignette[with_vignette]) if with_vignette.any() else float("nan")
            vig_area = vignette_area[with_vignette].mean() if with_vignette.any() else float("nan")
            print(f"| {name} | {kind} | {np.nanmean(on_lesion[valid]):.3f} | {lesion_area[valid].mean():.3f} | "
                  f"{ratio:.2f} | {above:.1%} | {vig:.3f} | {vig_area:.3f} |")
    if len({m.shape for _, _, m in kept}) == 1:  # one image size: the image-independent control applies
        valid = lesion_area > 0
        for kind, version in (("raw", proportional), ("stretched", stretched)):
            average = np.mean([version(m) for _, _, m in kept], axis=0)
            on_lesion = np.array([shares(average, lesion) for lesion, _, _ in kept])
            print(f"| control: the ensemble's average map, the same for every image | {kind} | "
                  f"{on_lesion[valid].mean():.3f} | {lesion_area[valid].mean():.3f} | "
                  f"{np.median(on_lesion[valid] / lesion_area[valid]):.2f} | "
                  f"{np.mean(on_lesion[valid] > lesion_area[valid]):.1%} | "
                  f"{np.mean([shares(average, v) for _, v, _ in kept if v.mean() > 0.01]):.3f} | "
                  f"{vignette_area[with_vignette].mean():.3f} |")
    if args.figure:
        figure(panels, args.figure)
        print(f"\nfigure: {args.figure} ({args.figure.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
