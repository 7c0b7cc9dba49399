"""Raster images (JPEG, PNG, TIFF, BMP) via Pillow, normalised to 8-bit RGB the way a viewer shows them."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermscore.errors import InputError
from dermscore.records import Frame, ImageRef

# Dermoscopy images are at most a few tens of megapixels; anything far beyond is a decompression bomb.
MAX_PIXELS = 100_000_000


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to (H, W, 3) uint8; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_raster(location: str, data: bytes, sha256: str, max_pixels: int = MAX_PIXELS) -> list[Frame]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    f"image is {width}x{height} = {width * height:,} pixels, over the {max_pixels:,} pixel cap "
                    "(possible decompression bomb)",
                    stage="decode",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
        except InputError:
            raise
        except UnidentifiedImageError as exc:
            raise InputError("not a recognised image (expected JPEG, PNG, TIFF or BMP data)", stage="decode") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image too large (possible decompression bomb): {exc}", stage="decode") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"corrupt or truncated image data: {exc}", stage="decode") from exc
    return [Frame(ImageRef(location=location, sha256=sha256), rgb)]
