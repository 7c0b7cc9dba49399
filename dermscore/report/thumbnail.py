"""Small PNG thumbnails for the workbook's Lesions sheet (``--thumbnails``).

Made right after decode from the full image, so the run keeps a few kilobytes per image instead of
the pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_PIXELS = 64


def make_thumbnail(rgb: np.ndarray, size: int = THUMBNAIL_PIXELS) -> bytes:
    """PNG bytes of the image shrunk to fit a ``size`` x ``size`` box, aspect ratio kept."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
