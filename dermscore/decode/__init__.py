"""Decode: bytes of one Source -> RGB uint8 Frames. The one place that knows file formats."""

from __future__ import annotations

import hashlib

from dermscore.decode.raster import decode_raster
from dermscore.errors import InputError
from dermscore.records import Frame, Source


def decode_source(source: Source) -> list[Frame]:
    """Read and decode a Source; raises InputError (with the failing stage) when it cannot be scored."""
    try:
        data = source.read()
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", stage="read") from exc
    if not data:
        raise InputError("the file is empty (0 bytes)", stage="read")
    sha256 = hashlib.sha256(data).hexdigest()
    return decode_raster(source.location, data, sha256)
