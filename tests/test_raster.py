"""Raster decoding: every Pillow mode arrives as the RGB a viewer would show, EXIF orientation applied."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermscore.decode.raster import decode_raster
from dermscore.errors import InputError


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def real_rgb(sample_images: list[Path]) -> Image.Image:
    return Image.open(sample_images[0]).convert("RGB").resize((120, 90))


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0), ("TIFF", 0), ("BMP", 0), ("JPEG", 12)])
def test_formats_decode_to_the_source_pixels(real_rgb: Image.Image, fmt: str, tolerance: int) -> None:
    frames = decode_raster("x", _encode(real_rgb, fmt), "h")
    assert len(frames) == 1
    got = frames[0].rgb.astype(int)
    assert got.shape == (90, 120, 3)
    assert np.abs(got - np.asarray(real_rgb, dtype=int)).mean() <= tolerance


def test_exif_orientation_is_applied(real_rgb: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    data = _encode(real_rgb, "JPEG", exif=exif.tobytes(), quality=95)
    rgb = decode_raster("x", data, "h")[0].rgb
    assert rgb.shape == (120, 90, 3)
    expected = np.asarray(real_rgb.transpose(Image.Transpose.ROTATE_270), dtype=int)
    assert np.abs(rgb.astype(int) - expected).mean() < 12


def test_palette_greyscale_rgba_cmyk_and_16bit_become_rgb(real_rgb: Image.Image) -> None:
    cases = {
        "P": _encode(real_rgb.convert("P"), "PNG"),
        "L": _encode(real_rgb.convert("L"), "PNG"),
        "RGBA": _encode(real_rgb.convert("RGBA"), "PNG"),
        "CMYK": _encode(real_rgb.convert("CMYK"), "TIFF"),
    }
    grey16 = (np.asarray(real_rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    cases["I;16"] = _encode(Image.fromarray(grey16), "PNG")
    for mode, data in cases.items():
        rgb = decode_raster(mode, data, "h")[0].rgb
        assert rgb.dtype == np.uint8 and rgb.shape == (90, 120, 3), mode
    grey = decode_raster("g", cases["L"], "h")[0].rgb
    np.testing.assert_array_equal(decode_raster("g16", cases["I;16"], "h")[0].rgb, grey)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_transparent_pixels_are_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgb = decode_raster("t", _encode(image, "PNG"), "h")[0].rgb
    assert (rgb == 255).all()


def test_truncated_jpeg_is_an_input_error(sample_images: list[Path]) -> None:
    data = sample_images[0].read_bytes()
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_raster("t", data[: len(data) // 3], "h")


def test_pixel_cap_guards_against_decompression_bombs(real_rgb: Image.Image) -> None:
    with pytest.raises(InputError, match="pixel cap"):
        decode_raster("big", _encode(real_rgb, "PNG"), "h", max_pixels=100)
