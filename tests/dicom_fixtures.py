"""Write real DICOM files from real images, for every transfer syntax and photometric interpretation.

Encoders: pydicom itself (native, deflated, RLE), pyjpegls through pydicom (JPEG-LS), Pillow (JPEG
baseline, JPEG 2000 with and without the reversible/irreversible colour transform) and imagecodecs
(a dev dependency: JPEG lossless and 12-bit JPEG extended, which Pillow cannot write).
Each writer returns the pixels a correct decoder should give back, as (H, W, 3) uint8.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    generate_uid,
)

VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
DERMOSCOPIC = UID("1.2.840.10008.5.1.4.1.1.77.1.7")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
GRAYSCALE_PR = UID("1.2.840.10008.5.1.4.1.1.11.1")


def real_jpegs(count: int) -> list[Path]:
    """The first ``count`` real HAM10000 JPEGs (200x150, small so tests stay fast); fails loudly without them."""
    from conftest import SMALL_200

    images = sorted((SMALL_200 / "images").glob("*.jpg"))[:count]
    if len(images) < count:
        pytest.fail(f"real data missing: expected {count} JPEGs in {SMALL_200 / 'images'}")
    return images


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def grey_of(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)


def base_dataset(rows: int, columns: int, sop_class: UID = DERMOSCOPIC, **identity: str) -> Dataset:
    """A minimal valid image object with the identity a clinic export carries."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = identity.get("sop", generate_uid())
    ds.PatientID = identity.get("patient", "PAT-001")
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = identity.get("study", generate_uid())
    ds.SeriesInstanceUID = identity.get("series", generate_uid())
    ds.StudyDate = identity.get("date", "20240131")
    ds.Modality = "XC"
    ds.Rows, ds.Columns = rows, columns
    ds.BodyPartExamined = "ARM"
    return ds


def _pixels(ds: Dataset, samples: int, photometric: str, bits: int, stored: int | None = None) -> None:
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0


def save(ds: Dataset, path: Path, syntax: UID) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def native(rgb: np.ndarray, path: Path, syntax: UID = ExplicitVRLittleEndian, planar: int = 0,
           bits: int = 8, frames: int = 1, sop_class: UID = DERMOSCOPIC, **identity: str) -> np.ndarray:
    """Uncompressed (or deflated) RGB, 8 or 16 bits, planar 0 or 1, one or more identical-size frames."""
    ds = base_dataset(*rgb.shape[:2], sop_class=sop_class, **identity)
    _pixels(ds, 3, "RGB", bits)
    ds.PlanarConfiguration = planar
    stack = np.stack([np.roll(rgb, 7 * i, axis=1) for i in range(frames)])
    values = stack.astype(np.uint16) * 257 if bits == 16 else stack
    if planar == 1:
        values = values.transpose(0, 3, 1, 2)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(values).astype("<u2" if bits == 16 else np.uint8).tobytes()
    save(ds, path, syntax)
    return stack if frames > 1 else stack[0]


def ybr_full(rgb: np.ndarray, path: Path, subsampled: bool = False) -> np.ndarray:
    """Native YBR_FULL, or YBR_FULL_422 packed as Y0 Y1 Cb Cr (chroma shared by pixel pairs)."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = base_dataset(*rgb.shape[:2])
    _pixels(ds, 3, "YBR_FULL_422" if subsampled else "YBR_FULL", 8)
    if subsampled:
        y = ybr[:, :, 0].reshape(ybr.shape[0], -1, 2)
        chroma = ybr[:, 0::2, 1:]
        ybr = ybr.copy()
        ybr[:, 1::2, 1:] = chroma  # what a 4:2:2 sender keeps: the even pixel's chroma
        packed = np.concatenate([y, chroma], axis=2)
        ds.PixelData = np.ascontiguousarray(packed).tobytes()
    else:
        ds.PixelData = ybr.tobytes()
    save(ds, path, ExplicitVRLittleEndian)
    return convert_color_space(ybr, "YBR_FULL", "RGB")


def monochrome(rgb: np.ndarray, path: Path, inverted: bool = False, bits: int = 8,
               window: bool = False) -> np.ndarray:
    """Greyscale in 8 bits, or 12 stored bits in 16, optionally MONOCHROME1 or with a VOI window."""
    grey = grey_of(rgb)
    ds = base_dataset(*rgb.shape[:2], sop_class=SECONDARY_CAPTURE)
    _pixels(ds, 1, "MONOCHROME1" if inverted else "MONOCHROME2", bits)
    top = 2**bits - 1
    stored = (grey.astype(np.uint32) * top // 255).astype(np.uint16 if bits > 8 else np.uint8)
    if inverted:
        stored = (top - stored).astype(stored.dtype)
    shown = np.rint(stored.astype(np.float64) * 255 / top)
    if window:
        # A window over the lower half of the range: values there stretch to the full output.
        ds.WindowCenter, ds.WindowWidth = (top + 1) / 4, (top + 1) / 2
        shown = np.rint(stored.astype(np.float64) / ((top + 1) / 2 - 1) * 255)
    expected = np.clip(shown, 0, 255).astype(np.uint8)
    if inverted:
        expected = 255 - expected
    ds.PixelData = stored.astype("<u2" if bits > 8 else np.uint8).tobytes()
    save(ds, path, ExplicitVRLittleEndian)
    return np.repeat(expected[:, :, None], 3, axis=2)


def palette(rgb: np.ndarray, path: Path, entry_bits: int = 16) -> np.ndarray:
    """PALETTE COLOR: Pillow's 256-colour quantisation with 8- or 16-bit lookup table entries."""
    quantised = Image.fromarray(rgb).quantize(256)
    indices = np.asarray(quantised, dtype=np.uint8)
    table = np.array(quantised.getpalette()[: 256 * 3], dtype=np.uint16).reshape(-1, 3)
    table = np.vstack([table, np.zeros((256 - len(table), 3), dtype=np.uint16)])
    ds = base_dataset(*rgb.shape[:2])
    _pixels(ds, 1, "PALETTE COLOR", 8)
    entries = table * 257 if entry_bits == 16 else table
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, entry_bits])
        data = entries[:, i].astype("<u2").tobytes() if entry_bits == 16 else entries[:, i].astype(np.uint8).tobytes()
        setattr(ds, f"{colour}PaletteColorLookupTableData", data)
    ds.PixelData = indices.tobytes()
    save(ds, path, ExplicitVRLittleEndian)
    return table.astype(np.uint8)[indices]


def compressed_by_pydicom(rgb: np.ndarray, path: Path, syntax: UID, **kwargs: object) -> np.ndarray:
    """RLE (pydicom's encoder) or JPEG-LS (pyjpegls) of native RGB; returns the source pixels."""
    ds = base_dataset(*rgb.shape[:2])
    _pixels(ds, 3, "RGB", 8)
    ds.PixelData = rgb.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(syntax, **kwargs)
    save(ds, path, syntax)
    return rgb


def encapsulated(frames: list[bytes], ds: Dataset, path: Path, syntax: UID) -> Path:
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.LossyImageCompression = "01" if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000) else "00"
    return save(ds, path, syntax)


def jpeg_baseline(rgb: np.ndarray, path: Path, subsampled: bool = True) -> np.ndarray:
    """Pillow's JPEG (quality 95), 4:2:2 (YBR_FULL_422) or 4:4:4 (YBR_FULL); returns Pillow's own decode."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, subsampling=1 if subsampled else 0)
    ds = base_dataset(*rgb.shape[:2])
    _pixels(ds, 3, "YBR_FULL_422" if subsampled else "YBR_FULL", 8)
    encapsulated([buffer.getvalue()], ds, path, JPEGBaseline8Bit)
    return load_rgb(io.BytesIO(buffer.getvalue()))  # type: ignore[arg-type]


def jpeg_by_imagecodecs(rgb: np.ndarray, path: Path, kind: str) -> np.ndarray:
    """``lossless-sv1``/``lossless`` (RGB, process 14) or ``extended`` (12-bit greyscale, process 4)."""
    import imagecodecs

    ds = base_dataset(*rgb.shape[:2])
    if kind == "extended":
        grey12 = (grey_of(rgb).astype(np.uint32) * 4095 // 255).astype(np.uint16)
        _pixels(ds, 1, "MONOCHROME2", 16, stored=12)
        data = imagecodecs.jpeg8_encode(grey12, level=95, bitspersample=12)
        encapsulated([data], ds, path, JPEGExtended12Bit)
        decoded = imagecodecs.jpeg8_decode(data).astype(np.float64)
        return np.repeat(np.clip(np.rint(decoded * 255 / 4095), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    _pixels(ds, 3, "RGB", 8)
    data = imagecodecs.jpeg8_encode(rgb, lossless=True, predictor=1 if kind == "lossless-sv1" else 6,
                                    colorspace="RGB", outcolorspace="RGB")
    encapsulated([data], ds, path, JPEGLosslessSV1 if kind == "lossless-sv1" else JPEGLossless)
    return rgb


def jpeg2000(rgb: np.ndarray, path: Path, photometric: str) -> np.ndarray:
    """Pillow/OpenJPEG codestream: YBR_RCT (lossless + reversible transform), YBR_ICT (lossy +
    irreversible transform) or RGB (lossless, no transform); returns Pillow's decode of it."""
    buffer = io.BytesIO()
    lossy = photometric == "YBR_ICT"
    Image.fromarray(rgb).save(buffer, "JPEG2000", no_jp2=True, irreversible=lossy,
                              mct=0 if photometric == "RGB" else 1,
                              **({"quality_mode": "rates", "quality_layers": [8]} if lossy else {}))
    ds = base_dataset(*rgb.shape[:2])
    _pixels(ds, 3, photometric, 8)
    encapsulated([buffer.getvalue()], ds, path, JPEG2000 if lossy else JPEG2000Lossless)
    return load_rgb(io.BytesIO(buffer.getvalue()))  # type: ignore[arg-type]


def non_image(path: Path, sop_class: UID = BASIC_TEXT_SR) -> Path:
    """A structured report or presentation state: a real DICOM object with no pixels."""
    ds = base_dataset(1, 1, sop_class=sop_class)
    del ds.Rows, ds.Columns
    ds.Modality = "SR" if sop_class == BASIC_TEXT_SR else "PR"
    return save(ds, path, ExplicitVRLittleEndian)


@dataclass(frozen=True)
class FileSetEntry:
    file_id: tuple[str, ...]
    record_type: str  # IMAGE | SR DOCUMENT | PRESENTATION
    sop_class: UID


def dicomdir(path: Path, entries: list[FileSetEntry]) -> Path:
    """A DICOMDIR listing ``entries`` (file IDs relative to its folder; escapes allowed for tests)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.FileSetID = "DERMSCORE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    records = []
    for entry in entries:
        record = Dataset()
        record.OffsetOfTheNextDirectoryRecord = 0
        record.RecordInUseFlag = 0xFFFF
        record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
        record.DirectoryRecordType = entry.record_type
        record.ReferencedFileID = list(entry.file_id)
        record.ReferencedSOPClassUIDInFile = entry.sop_class
        record.ReferencedSOPInstanceUIDInFile = generate_uid()
        record.ReferencedTransferSyntaxUIDInFile = ExplicitVRLittleEndian
        records.append(record)
    ds.DirectoryRecordSequence = Sequence(records)
    return save(ds, path, ExplicitVRLittleEndian)



ULTRASOUND = UID("1.2.840.10008.5.1.4.1.1.6.1")
OPHTHALMIC_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")


def pydicom_test_file(name: str) -> Path:
    """A real object pydicom ships (``CT_small.dcm``: CT Image Storage, ``MR_small.dcm``: MR Image Storage)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom's test file {name} is missing from this pydicom installation")
    return Path(path)


def greyscale_object(rgb: np.ndarray, path: Path, sop_class: UID, modality: str | None) -> Path:
    """A greyscale image object of any SOP class and Modality (None: no Modality attribute at all),
    as an ultrasound frame or a non-conformant export would be."""
    ds = base_dataset(*rgb.shape[:2], sop_class=sop_class)
    _pixels(ds, 1, "MONOCHROME2", 8)
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    ds.PixelData = grey_of(rgb).tobytes()
    return save(ds, path, ExplicitVRLittleEndian)
