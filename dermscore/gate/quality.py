"""Image-quality checks: blur, under- and over-exposure, too few pixels for the bundle's members.

A blurred, dark or tiny image still gets probabilities, but a reviewer should know it was a poor
picture: the image gets the review reason ``poor-quality`` and the failed checks in its ``quality``
column. The checks are cheap (a greyscale copy with a 150-pixel shorter side, one Laplacian) and run
in the decode threads of every engine (``dermscore.infer.decode_and_prepare``).

Two steps, so reports regenerated from the ledger use the rules of the dermscore that writes them:
``measure`` (at decode; the numbers travel on ``ImageRef.quality`` and are stored in the ledger) and
``problems`` (at report time, against the thresholds below and the bundle's member input sizes).

Rules and thresholds (chosen on real HAM10000 test images against blurred, darkened, brightened and
downscaled copies; figures and method in docs/quality.md, measured with benchmarks/quality_thresholds.py):

* ``blurred``: sharpness < SHARPNESS_MIN. Sharpness is the standard deviation of the 4-neighbour
  Laplacian of the grey image (shorter side resized to WORK_SIDE pixels, so it does not depend on
  the image's size) divided by its mean grey level (so darkening or brightening alone does not change it).
* ``under-exposed``: mean grey level (0 = black, 1 = white) < LUMINANCE_MIN.
* ``over-exposed``: share of near-white pixels (grey >= NEAR_WHITE of 255) > HIGHLIGHTS_MAX.
* ``too-small``: height < SIZE_FACTOR x the largest member input height, or width < SIZE_FACTOR x the
  largest member input width (the members would stretch it more than 1/SIZE_FACTOR times).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from dermscore.bundle import Member

WORK_SIDE = 150  # shorter side of the grey copy the checks look at (HAM10000's 200x150 at native size)
NEAR_WHITE = 245
SHARPNESS_MIN = 0.019
LUMINANCE_MIN = 0.30
HIGHLIGHTS_MAX = 0.15
SIZE_FACTOR = 0.5

BLURRED = "blurred"
UNDER_EXPOSED = "under-exposed"
OVER_EXPOSED = "over-exposed"
TOO_SMALL = "too-small"
OK = "ok"


def working_grey(rgb: np.ndarray) -> np.ndarray:
    """The image as float32 grey levels (0..255), resized so its shorter side is WORK_SIDE pixels.

    A large image is first averaged over k x k blocks (``Image.reduce``, the cheapest antialiased
    shrink: 600x450 goes straight to 200x150), then resized bilinearly for what is left.
    """
    image = Image.fromarray(rgb).convert("L")
    factor = min(image.size) // WORK_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    width, height = image.size
    scale = WORK_SIDE / min(width, height)
    if scale != 1.0:
        size = (max(round(width * scale), 3), max(round(height * scale), 3))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def measure(rgb: np.ndarray) -> dict[str, float]:
    """The numbers the checks need, from one decoded (H, W, 3) uint8 image; pure, no thresholds."""
    grey = working_grey(rgb)
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1])
    mean = float(grey.mean())
    return {
        "height": float(rgb.shape[0]),
        "width": float(rgb.shape[1]),
        "sharpness": float(laplacian.std()) / mean if mean >= 1.0 else 0.0,
        "luminance": mean / 255.0,
        "highlights": float((grey >= NEAR_WHITE).mean()),
    }


def minimum_size(members: Sequence[Member]) -> tuple[float, float]:
    """(height, width) below which an image is ``too-small`` for these members."""
    return (SIZE_FACTOR * max(m.input_size[0] for m in members), SIZE_FACTOR * max(m.input_size[1] for m in members))


def problems(quality: Mapping[str, float] | None, members: Sequence[Member]) -> list[str] | None:
    """The checks an image fails, in a fixed order; None when it was never measured (an old ledger row)."""
    if quality is None:
        return None
    min_height, min_width = minimum_size(members)
    failed = {
        BLURRED: quality["sharpness"] < SHARPNESS_MIN,
        UNDER_EXPOSED: quality["luminance"] < LUMINANCE_MIN,
        OVER_EXPOSED: quality["highlights"] > HIGHLIGHTS_MAX,
        TOO_SMALL: quality["height"] < min_height or quality["width"] < min_width,
    }
    return [name for name, fired in failed.items() if fired]


def label(found: list[str] | None, separator: str) -> str:
    """The report's ``quality`` cell: ``ok``, the failed checks, or empty when not measured."""
    if found is None:
        return ""
    return separator.join(found) if found else OK
