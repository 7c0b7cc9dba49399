"""A test set of real non-dermoscopic images, built from what installed packages ship (nothing downloaded).

Sources: scikit-image's bundled photographs and grey-scale images (``skimage.data``: astronaut, cat,
coffee, rocket, the Hubble deep field, a retina fundus photograph, immunohistochemistry, text and page
scans, textures), pydicom's test files (CT, MR, NM and ultrasound slices, windowed to 8 bits), matplotlib's
sample data (a photograph, an MR slice, logos) and charts and text "screenshots" rendered with
matplotlib. Each base image gives several random crops and resizes (seeded), so the set has a few
hundred images of varied framing, as a folder of PNGs with a ``manifest.csv`` naming each one's category
and origin. Used only to measure the OOD detector (AUROC against the dermoscopic test split); never shipped.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = 12  # crops per base image
OUTPUT_SIZES = ((150, 200), (224, 224), (300, 400), (450, 600), (120, 160))  # (h, w)
SKIMAGE_PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "colorwheel", "logo")
SKIMAGE_MEDICAL_PHOTOS = ("retina", "immunohistochemistry", "microaneurysms")
SKIMAGE_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell", "horse", "binary_blobs",
                "checkerboard", "shepp_logan_phantom")
SKIMAGE_DOCUMENTS = ("page", "text")
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "JPEG2000.dcm", "examples_overlay.dcm",
                 "examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm", "liver_1frame.dcm")
MATPLOTLIB_SAMPLES = ("grace_hopper.jpg", "s1045.ima.gz", "logo2.png", "Minduka_Present_Blue_Pack.png")


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Any grey, boolean, float, 16-bit or RGBA array as RGB uint8, grey levels stretched to 1st-99th percentile."""
    x = np.asarray(pixels)
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[..., :3]
    if x.dtype != np.uint8:
        x = x.astype(np.float64)
        low, high = np.percentile(x, (1, 99))
        x = np.clip((x - low) / max(high - low, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def skimage_images() -> Iterator[tuple[str, str, np.ndarray]]:
    import skimage.data

    groups = (("photograph", SKIMAGE_PHOTOS), ("medical-photograph", SKIMAGE_MEDICAL_PHOTOS),
              ("grey-scale", SKIMAGE_GREY), ("document", SKIMAGE_DOCUMENTS))
    for category, names in groups:
        for name in names:
            yield category, f"skimage.data.{name}", to_rgb8(getattr(skimage.data, name)())


def pydicom_images() -> Iterator[tuple[str, str, np.ndarray]]:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut, convert_color_space

    for name in PYDICOM_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        pixels = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[0]
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        elif photometric.startswith("YBR"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        yield f"dicom-{ds.get('Modality', 'OT')}", f"pydicom test file {name}", to_rgb8(pixels)


def matplotlib_images() -> Iterator[tuple[str, str, np.ndarray]]:
    from matplotlib import cbook

    for name in MATPLOTLIB_SAMPLES:
        with cbook.get_sample_data(name, asfileobj=True) as handle:
            raw = handle.read()
        if name.endswith(".ima.gz"):  # a 256x256 16-bit MR slice, raw big-endian
            pixels = np.frombuffer(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, ">u2").reshape(256, 256)
            yield "grey-scale-medical", f"matplotlib sample {name}", to_rgb8(pixels)
        else:
            category = "photograph" if name.endswith(".jpg") else "logo"
            yield category, f"matplotlib sample {name}", to_rgb8(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def rendered_images(seed: int = 0) -> Iterator[tuple[str, str, np.ndarray]]:
    """Charts and text screens drawn with matplotlib: what a misplaced screenshot in a folder looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)

    def draw(kind: int) -> None:
        ax = plt.gca()
        if kind == 0:
            ax.plot(np.cumsum(rng.normal(size=(200, 3)), axis=0))
        elif kind == 1:
            ax.bar(range(8), rng.uniform(1, 10, 8), color=plt.cm.tab10(range(8)))
        elif kind == 2:
            ax.scatter(*rng.normal(size=(2, 300)), c=rng.uniform(size=300), cmap="viridis")
        elif kind == 3:
            ax.imshow(rng.normal(size=(20, 30)).cumsum(0), cmap="magma")
        else:
            ax.axis("off")
            lines = [f"$ dermscore run folder{i}/ --out results  # {rng.integers(1e6)}" for i in range(14)]
            ax.text(0, 1, "\n".join(lines), family="monospace", va="top", fontsize=9)

    for kind in range(5):
        for variant in range(2):
            fig = plt.figure(figsize=(6, 4.5), dpi=100, facecolor="black" if kind == 4 and variant else "white")
            draw(kind)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", facecolor=fig.get_facecolor())
            plt.close(fig)
            yield "screenshot", f"matplotlib rendering {kind}.{variant}", np.asarray(Image.open(buffer).convert("RGB"))


SOURCES: tuple[Callable[[], Iterator[tuple[str, str, np.ndarray]]], ...] = (
    skimage_images, pydicom_images, matplotlib_images, rendered_images)


def random_crops(rgb: np.ndarray, rng: np.random.Generator, count: int) -> Iterator[np.ndarray]:
    """The whole image, then random crops of 30-100% of each side, each resized to a random output size."""
    height, width = rgb.shape[:2]
    for i in range(count):
        if i == 0:
            top, left, h, w = 0, 0, height, width
        else:
            h, w = (max(8, int(side * rng.uniform(0.3, 1.0))) for side in (height, width))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        size = OUTPUT_SIZES[int(rng.integers(len(OUTPUT_SIZES)))]
        crop = Image.fromarray(np.ascontiguousarray(rgb[top:top + h, left:left + w]))
        yield np.asarray(crop.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def build(folder: Path, variants: int = VARIANTS, seed: int = 0) -> list[dict[str, str]]:
    """Write the set's PNGs and ``manifest.csv`` into ``folder`` (rebuilt only if the manifest is missing)."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for source in SOURCES:
        for category, origin, rgb in source():
            for i, crop in enumerate(random_crops(rgb, rng, variants)):
                name = f"{len(rows):04d}-{category}-{i:02d}.png"
                Image.fromarray(crop).save(folder / name)
                rows.append({"file": name, "category": category, "origin": origin})
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("file", "category", "origin"))
        writer.writeheader()
        writer.writerows(rows)
    return rows
