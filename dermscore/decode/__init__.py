"""Decode: bytes of one Source -> RGB uint8 Frames. The one place that knows file formats.

Formats are told apart by their first bytes (``sniff``), never by file name: clinics export DICOM as
extensionless files and ``.DCM``, and a renamed PNG is still a PNG.
"""

from __future__ import annotations

import hashlib

from dermscore.decode.raster import decode_raster
from dermscore.errors import InputError
from dermscore.records import Frame, Source

HEAD_BYTES = 132  # enough for every signature below, including DICOM's "DICM" at offset 128
RASTER_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
    b"BM",  # BMP
)
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a member, or the end record of an empty archive


def sniff(head: bytes) -> str | None:
    """``dicom``, ``zip``, ``raster`` or None, from a file's first ``HEAD_BYTES`` bytes."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(ZIP_SIGNATURES):
        return "zip"
    if head.startswith(RASTER_SIGNATURES):
        return "raster"
    return None


def decode_source(source: Source) -> list[Frame]:
    """Read and decode a Source; raises InputError (with the failing stage) when it cannot be scored."""
    try:
        data = source.read()
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", stage="read") from exc
    if not data:
        raise InputError("the file is empty (0 bytes)", stage="read")
    sha256 = hashlib.sha256(data).hexdigest()
    if sniff(data[:HEAD_BYTES]) == "dicom":
        from dermscore.decode.dicom import decode_dicom  # pydicom only for runs that meet DICOM

        return decode_dicom(source.location, data, sha256, source.lesion_attribute)
    return decode_raster(source.location, data, sha256)
