"""A pydicom pixel-data decoder plugin for JPEG lossless and 12-bit JPEG extended, via imagecodecs.

Pillow (already the JPEG baseline and JPEG 2000 plugin) cannot read either, and pydicom's other
choices are GPL-licensed (pylibjpeg-libjpeg) or refuse 12-bit data (GDCM). imagecodecs (BSD-3) wraps
libjpeg-turbo 3, which reads both. pydicom calls ``is_available`` and ``_decode_frame`` per its
decoder plugin contract; ``register`` adds the plugin once, at import of ``dermscore.decode.dicom``.
"""

from __future__ import annotations

from importlib.util import find_spec

from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

LABEL = "imagecodecs"
SYNTAXES = (uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1",) for syntax in SYNTAXES}


def is_available(syntax: str) -> bool:
    return syntax in SYNTAXES and find_spec("imagecodecs") is not None


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """Decode one frame without colour conversion; pydicom then applies YBR -> RGB when asked."""
    import imagecodecs

    colourspace = "GRAY" if runner.samples_per_pixel == 1 else "RGB"  # same in and out: no conversion
    arr = imagecodecs.jpeg8_decode(src, colorspace=colourspace, outcolorspace=colourspace)
    runner.set_option("bits_allocated", 8 if arr.dtype.itemsize == 1 else 16)
    runner.set_option("planar_configuration", 0)
    return arr.tobytes()


def register() -> None:
    for syntax in SYNTAXES:
        decoder = get_decoder(syntax)
        if LABEL not in decoder.available_plugins and not any(d.startswith(LABEL) for d in decoder.missing_dependencies):
            decoder.add_plugin(LABEL, (__name__, "_decode_frame"))
