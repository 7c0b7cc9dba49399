"""DICOM: classify objects cheaply, list DICOMDIR references, and decode image frames to RGB uint8.

Pixel data goes through pydicom's own decoder chain (``pydicom.pixels``), which picks whichever
installed plugin handles the transfer syntax (pydicom itself for native, deflated and RLE; Pillow for
JPEG baseline/extended and JPEG 2000; pyjpegls for JPEG-LS; GDCM for JPEG lossless) and converts
YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT to RGB. What is left here is what the model needs beyond that:
palette lookup, greyscale windowing and inversion, and bringing 12/16-bit values to 8 bits.

Bit-depth rule (documented in docs/inputs.md): colour and greyscale samples are mapped linearly from
their stored range (0..2**BitsStored-1, shifted for signed data) to 0..255. Greyscale objects that
carry a VOI window or VOI LUT are first windowed with it (after their Rescale/Modality LUT), since
that is how the sender asked for them to be shown; MONOCHROME1 is then inverted so dark is dark.
PALETTE COLOR uses its lookup tables and maps their entry depth to 0..255.
"""

from __future__ import annotations

import io
import posixpath
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, iter_pixels
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dermscore.decode import jpeg_plugin
from dermscore.decode.raster import MAX_PIXELS
from dermscore.errors import InputError, UsageError
from dermscore.records import DEFAULT_LESION_ATTRIBUTE, Frame, ImageRef

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
MODALITY_TAG = Tag(0x0008, 0x0060)

# ImageRef.attributes keys (the report's column names) -> DICOM keywords.
IDENTITY = {
    "patient_id": "PatientID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "study_date": "StudyDate",
    "modality": "Modality",
}
# More of the header, kept for writers that answer in DICOM (the SR, dermscore.report.dicom_sr) but not
# shown as report columns: an SR must carry its sources' patient and study identity and SOP classes.
HEADER = {
    "sop_class_uid": "SOPClassUID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_time": "StudyTime",
    "study_id": "StudyID",
    "accession_number": "AccessionNumber",
    "referring_physician_name": "ReferringPhysicianName",
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")  # pydicom's decoders deliver these as RGB

# All frames of an object are decoded together (decode returns them as one list): cap their sum too.
FRAMES_PIXEL_FACTOR = 4

jpeg_plugin.register()


def check_lesion_attribute(keyword: str) -> str:
    """Refuse a misspelt keyword up front, rather than silently giving every image its own lesion."""
    if tag_for_keyword(keyword) is None:
        raise UsageError(
            f"--lesion-attribute {keyword!r} is not a DICOM keyword; use a dictionary keyword such as "
            "SeriesInstanceUID, StudyInstanceUID or AccessionNumber."
        )
    return keyword


def sop_class_skip_reason(sop_class_uid: str) -> str | None:
    """Why an object of this SOP class is not scored, or None when it may hold an image.

    Classes pydicom does not know (private, newer than its dictionary) are tried as images: if they
    hold no pixels, decode says so in errors.csv rather than dropping them unseen.
    """
    uid = UID(sop_class_uid)
    if sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR file-set index (its referenced images are scored)"
    if uid.name == str(uid) or "Image" in uid.name:
        return None
    return f"not an image: {uid.name}"


@dataclass(frozen=True)
class Header:
    """What discovery learns about a DICOM object from its first bytes, before anything is decoded."""

    sop_class: str  # Media Storage SOP Class UID (else the dataset's SOP Class UID); "" when unreadable
    modality: str  # Modality (0008,0060), upper case; "" when absent, empty or not within the head


def read_header(head: bytes) -> Header:
    """SOP class and Modality from the start of a DICOM file (discovery's ``META_BYTES`` head).

    Reads the file meta group, then the dataset only up to Modality (0008,0060), which comes within
    the first elements of every object (the dataset is in ascending tag order), so no pixel data and
    no more bytes than the head are ever read. A deflated dataset is inflated as far as the head goes.
    Anything unreadable leaves a field empty; decode then reports the real problem.
    """
    stream = io.BytesIO(head)
    try:
        read_preamble(stream, False)
        meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError):
        return Header("", "")
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    syntax = UID(str(meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            stream = io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream.read()))
        ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                          stop_when=lambda tag, vr, length: tag > MODALITY_TAG)
        modality = str(ds.get("Modality", "") or "").strip().upper()
        sop_class = sop_class or str(ds.get("SOPClassUID", "") or "")
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError, TypeError, zlib.error):
        modality = ""
    return Header(sop_class, modality)


@dataclass(frozen=True)
class Reference:
    """One file a DICOMDIR points at: its path relative to the DICOMDIR's folder, and whether it is scored."""

    path: str  # POSIX, normalised; may start with "../" when it points outside the file-set
    skip_reason: str | None


def fileset_references(data: bytes) -> list[Reference]:
    """Every referenced file in a DICOMDIR, in record order; the caller resolves them and refuses escapes."""
    try:
        ds = dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"unreadable DICOMDIR: {exc}", stage="discover") from exc
    if "DirectoryRecordSequence" not in ds:
        raise InputError("not a DICOMDIR: it has no directory records", stage="discover")
    references = []
    for record in ds.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue  # patient, study and series records reference no file
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        path = posixpath.normpath("/".join(str(p).replace("\\", "/") for p in parts))
        sop_class = str(record.get("ReferencedSOPClassUIDInFile", ""))
        record_type = str(record.get("DirectoryRecordType", ""))
        if sop_class:
            skip_reason = sop_class_skip_reason(sop_class)
        else:
            skip_reason = None if record_type == "IMAGE" else f"not an image: DICOMDIR {record_type} record"
        references.append(Reference(path, skip_reason))
    return references


def identity(ds: Dataset) -> dict[str, str]:
    """The report's DICOM identity columns and the SR's header attributes; body site prefers the coded
    Anatomic Region."""
    attributes = {key: str(ds.get(keyword, "") or "") for key, keyword in {**IDENTITY, **HEADER}.items()}
    region = ds.get("AnatomicRegionSequence")
    coded = str(region[0].get("CodeMeaning", "")) if region else ""
    attributes["body_site"] = coded or str(ds.get("BodyPartExamined", "") or "")
    return attributes


def lesion_of(ds: Dataset, keyword: str) -> str | None:
    """The lesion an object belongs to; None (its own lesion) when the attribute is absent or empty."""
    value = ds.get(keyword)
    return str(value) if value not in (None, "") else None


def _check_decodable(ds: Dataset, max_pixels: int) -> int:
    """Fail early with a plain reason (no pixels, no codec, too big); returns the number of frames."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        name = UID(str(ds.get("SOPClassUID", ""))).name or "unknown SOP class"
        raise InputError(
            f"DICOM object has no pixel data ({name}): nothing to score; if it should be an image, the file "
            "may be truncated",
            stage="decode",
        )
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise InputError(
            f"unsupported transfer syntax {syntax} ({syntax.name}); ask the sender for an uncompressed, "
            "JPEG, JPEG-LS, JPEG 2000 or RLE export",
            stage="decode",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise InputError(f"no installed codec for {syntax.name} (missing {missing})", stage="decode")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise InputError(
            f"image is {columns}x{rows} = {rows * columns:,} pixels, over the {max_pixels:,} pixel cap "
            "(possible decompression bomb)",
            stage="decode",
        )
    if rows * columns == 0:
        raise InputError("DICOM object declares an empty image (Rows or Columns is 0)", stage="decode")
    if frames * rows * columns > FRAMES_PIXEL_FACTOR * max_pixels:
        raise InputError(
            f"{frames} frames of {columns}x{rows} are {frames * rows * columns:,} pixels, over the "
            f"{FRAMES_PIXEL_FACTOR * max_pixels:,} pixel cap for one object (all its frames are held at once)",
            stage="decode",
        )
    return frames


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    low = -(2 ** (bits - 1)) if int(ds.get("PixelRepresentation", 0)) == 1 else 0
    return float(low), float(low + 2**bits - 1)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if values.dtype == np.uint8 and (low, high) == (0.0, 255.0):
        return values
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    low, high = _stored_range(ds)
    values = arr
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds, prefer_lut=True)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Windowing keeps the modality-transformed range, whose ends are the transformed stored ends.
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds, prefer_lut=False)
        ends = apply_modality_lut(np.array([low, high]), ds)
        low, high = float(np.min(ends)), float(np.max(ends))
    grey = _to_uint8(values, low, high)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


def to_rgb8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """One frame as decoded by pydicom (with ``as_rgb``: colour already RGB) -> (H, W, 3) uint8."""
    photometric = str(ds.PhotometricInterpretation)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and arr.ndim == 2:
        return _grey(arr, ds)
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        rgb = apply_color_lut(arr, ds)
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_uint8(rgb, 0.0, float(2 ** (16 if depth > 8 else 8) - 1))
    if photometric in COLOUR and arr.ndim == 3 and arr.shape[2] == 3:
        return _to_uint8(arr, *_stored_range(ds))
    raise InputError(
        f"unsupported photometric interpretation {photometric} with pixel array shape {arr.shape}; "
        "expected RGB, YBR_*, MONOCHROME1/2 or PALETTE COLOR",
        stage="decode",
    )


def decode_dicom(
    location: str,
    data: bytes,
    sha256: str,
    lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE,
    max_pixels: int = MAX_PIXELS,
) -> list[Frame]:
    """Every frame of one DICOM object as a Frame (1-based ``frame``), with its identity attached."""
    try:
        ds = dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"corrupt or truncated DICOM file: {exc}", stage="decode") from exc
    frame_count = _check_decodable(ds, max_pixels)
    attributes = identity(ds)
    lesion_id = lesion_of(ds, lesion_attribute)
    frames = []
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        # Ours first where Pillow would only fail noisily (12-bit) or not at all (lossless).
        plugin = jpeg_plugin.LABEL if syntax in jpeg_plugin.SYNTAXES and jpeg_plugin.is_available(syntax) else ""
        for index, arr in enumerate(iter_pixels(ds, decoding_plugin=plugin)):
            ref = ImageRef(location, sha256, frame=index + 1, attributes=dict(attributes), lesion_id=lesion_id)
            frames.append(Frame(ref, to_rgb8(arr, ds)))
    except InputError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, EOFError, OSError, KeyError, AttributeError) as exc:
        raise InputError(f"corrupt, truncated or undecodable DICOM pixel data: {exc}", stage="decode") from exc
    if len(frames) != frame_count:
        raise InputError(f"DICOM declares {frame_count} frames but only {len(frames)} could be read", stage="decode")
    return frames

