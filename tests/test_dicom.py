"""DICOM decode: every transfer syntax and photometric interpretation, from real HAM10000 images."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)

import dicom_fixtures as fx
from dermscore.decode import decode_source
from dermscore.decode.dicom import check_lesion_attribute, decode_dicom, sop_class_skip_reason
from dermscore.discover import file_source
from dermscore.cli import app
from dermscore.errors import InputError, UsageError

Writer = Callable[[np.ndarray, Path], np.ndarray]


@pytest.fixture(scope="module")
def source_rgb() -> np.ndarray:
    return fx.load_rgb(fx.real_jpegs(1)[0])


def decode(path: Path, lesion_attribute: str = "SeriesInstanceUID") -> list:
    return decode_source(file_source(path, lesion_attribute=lesion_attribute))


# case -> writer returning the pixels a correct decoder gives back
CASES: dict[str, Writer] = {
    "explicit-vr-le-rgb": lambda rgb, p: fx.native(rgb, p),
    "implicit-vr-le-rgb": lambda rgb, p: fx.native(rgb, p, ImplicitVRLittleEndian),
    "deflated-rgb": lambda rgb, p: fx.native(rgb, p, DeflatedExplicitVRLittleEndian),
    "planar-configuration-1": lambda rgb, p: fx.native(rgb, p, planar=1),
    "rgb-16-bit": lambda rgb, p: fx.native(rgb, p, bits=16),
    "ybr-full": lambda rgb, p: fx.ybr_full(rgb, p),
    "ybr-full-422": lambda rgb, p: fx.ybr_full(rgb, p, subsampled=True),
    "monochrome2-8-bit": lambda rgb, p: fx.monochrome(rgb, p),
    "monochrome1-8-bit": lambda rgb, p: fx.monochrome(rgb, p, inverted=True),
    "monochrome2-12-bit": lambda rgb, p: fx.monochrome(rgb, p, bits=12),
    "monochrome2-16-bit-windowed": lambda rgb, p: fx.monochrome(rgb, p, bits=16, window=True),
    "monochrome1-16-bit-windowed": lambda rgb, p: fx.monochrome(rgb, p, bits=16, inverted=True, window=True),
    "palette-16-bit-entries": lambda rgb, p: fx.palette(rgb, p),
    "palette-8-bit-entries": lambda rgb, p: fx.palette(rgb, p, entry_bits=8),
    "rle-lossless": lambda rgb, p: fx.compressed_by_pydicom(rgb, p, RLELossless),
    "jpeg-ls-lossless": lambda rgb, p: fx.compressed_by_pydicom(rgb, p, JPEGLSLossless),
    "jpeg-baseline-ybr-full-422": lambda rgb, p: fx.jpeg_baseline(rgb, p),
    "jpeg-baseline-ybr-full": lambda rgb, p: fx.jpeg_baseline(rgb, p, subsampled=False),
    "jpeg-lossless-sv1": lambda rgb, p: fx.jpeg_by_imagecodecs(rgb, p, "lossless-sv1"),
    "jpeg-lossless-process-14": lambda rgb, p: fx.jpeg_by_imagecodecs(rgb, p, "lossless"),
    "jpeg-extended-12-bit": lambda rgb, p: fx.jpeg_by_imagecodecs(rgb, p, "extended"),
    "jpeg-2000-lossless-ybr-rct": lambda rgb, p: fx.jpeg2000(rgb, p, "YBR_RCT"),
    "jpeg-2000-lossless-rgb": lambda rgb, p: fx.jpeg2000(rgb, p, "RGB"),
    "jpeg-2000-ybr-ict": lambda rgb, p: fx.jpeg2000(rgb, p, "YBR_ICT"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_syntax_and_photometric_decodes_to_the_source_pixels(
    case: str, source_rgb: np.ndarray, tmp_path: Path
) -> None:
    """Expected pixels are the writer's: the source itself for lossless codecs, the codec's own
    decode for lossy ones (Pillow/imagecodecs), and the source's grey or palette values otherwise."""
    if "lossless-sv1" in case or "process-14" in case or "12-bit" in case:
        pytest.importorskip("imagecodecs", reason="imagecodecs (dev extra) writes lossless/12-bit JPEG fixtures")
    path = tmp_path / "IM0001"  # no extension, as clinics export them
    expected = CASES[case](source_rgb, path)
    frames = decode(path)
    assert len(frames) == 1 and frames[0].ref.frame == 1
    assert frames[0].rgb.dtype == np.uint8 and frames[0].rgb.shape == source_rgb.shape
    np.testing.assert_array_equal(frames[0].rgb, expected)
    if "windowed" not in case:  # a window changes contrast on purpose; the writer's window is checked above
        # the source image (colour) or its luminance (greyscale; MONOCHROME1 inverted back), within codec loss
        grey = "mono" in case or "12-bit" in case
        reference = np.repeat(fx.grey_of(source_rgb)[:, :, None], 3, axis=2) if grey else source_rgb
        assert np.abs(frames[0].rgb.astype(int) - reference.astype(int)).mean() < 2.0


def test_jpeg_ls_near_lossless_stays_within_its_declared_error(source_rgb: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "near.dcm"
    fx.compressed_by_pydicom(source_rgb, path, JPEGLSNearLossless, jls_error=2)
    rgb = decode(path)[0].rgb
    assert np.abs(rgb.astype(int) - source_rgb.astype(int)).max() <= 2


def test_multi_frame_gives_one_numbered_frame_per_image_with_identity(source_rgb: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "multi.DCM"
    series = "1.2.826.0.1.3680043.8.498.1"
    expected = fx.native(source_rgb, path, frames=3, sop_class=fx.MULTIFRAME_TRUE_COLOR_SC, series=series,
                         patient="P-7", study="1.2.3", sop="1.2.3.4", date="20240229")
    frames = decode(path)
    assert [f.ref.frame for f in frames] == [1, 2, 3]
    for frame, pixels in zip(frames, expected):
        np.testing.assert_array_equal(frame.rgb, pixels)
        assert frame.ref.lesion_id == series
        assert frame.ref.attributes == {
            "patient_id": "P-7", "study_instance_uid": "1.2.3", "series_instance_uid": series,
            "sop_instance_uid": "1.2.3.4", "study_date": "20240229", "modality": "XC", "body_site": "ARM",
            # the rest of the header the DICOM SR needs (absent ones empty)
            "sop_class_uid": fx.MULTIFRAME_TRUE_COLOR_SC, "patient_name": "Test^Patient", "patient_birth_date": "",
            "patient_sex": "", "study_time": "", "study_id": "", "accession_number": "", "referring_physician_name": "",
        }


def test_body_site_prefers_the_coded_anatomic_region_and_lesion_follows_the_chosen_attribute(
    source_rgb: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "coded"
    fx.native(source_rgb, path)
    ds = dcmread(path)
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D8200", "SRT", "Forearm"
    ds.AnatomicRegionSequence = [region]
    ds.AccessionNumber = "ACC-42"
    dcmwrite(path, ds, enforce_file_format=True)
    frame = decode(path, lesion_attribute="AccessionNumber")[0]
    assert frame.ref.attributes["body_site"] == "Forearm"
    assert frame.ref.lesion_id == "ACC-42"
    assert decode(path, lesion_attribute="StudyDescription")[0].ref.lesion_id is None  # absent: its own lesion
    assert check_lesion_attribute("AccessionNumber") == "AccessionNumber"
    with pytest.raises(UsageError, match="not a DICOM keyword"):
        check_lesion_attribute("SeriesUID")


def test_bad_dicom_objects_fail_with_plain_reasons(source_rgb: np.ndarray, tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    fx.native(source_rgb, good)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    no_pixels = fx.non_image(tmp_path / "sr.dcm")
    unsupported = fx.encapsulated([b"\x00\x00\x01\xb3" + bytes(60)], dcmread(good), tmp_path / "mpeg.dcm",
                                  UID("1.2.840.10008.1.2.4.100"))  # MPEG2 video
    too_many_frames = tmp_path / "frames.dcm"
    fx.native(source_rgb, too_many_frames, frames=5)
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(good.read_bytes()[:300])
    expectations = {
        truncated: "truncated",
        no_pixels: "no pixel data",
        unsupported: "unsupported transfer syntax",
        header_only: "no pixel data.*may be truncated",
    }
    for path, reason in expectations.items():
        with pytest.raises(InputError, match=reason):
            decode(path)
    pixels = source_rgb.shape[0] * source_rgb.shape[1]
    with pytest.raises(InputError, match="over the .* pixel cap for one object"):
        decode_dicom(str(too_many_frames), too_many_frames.read_bytes(), "sha", max_pixels=pixels)  # 5 frames > 4 x 1
    with pytest.raises(InputError, match="pixel cap .possible decompression bomb"):
        decode_dicom(str(too_many_frames), too_many_frames.read_bytes(), "sha", max_pixels=pixels - 1)


def test_non_image_sop_classes_are_recognised_and_image_classes_are_not() -> None:
    assert "Basic Text SR" in sop_class_skip_reason(fx.BASIC_TEXT_SR)
    assert "Presentation State" in sop_class_skip_reason(fx.GRAYSCALE_PR)
    assert "DICOMDIR" in sop_class_skip_reason("1.2.840.10008.1.3.10")
    for image_class in (fx.DERMOSCOPIC, fx.VL_PHOTOGRAPHIC, fx.SECONDARY_CAPTURE, fx.MULTIFRAME_TRUE_COLOR_SC):
        assert sop_class_skip_reason(image_class) is None
    assert sop_class_skip_reason("1.2.3.4.5.6.999") is None  # unknown: tried as an image


def test_dicom_written_by_dcmtk_img2dcm_decodes_to_the_jpeg_it_wraps(tmp_path: Path) -> None:
    """Another tool's DICOM (dcmtk, Debian package ``dcmtk``): JPEG baseline wrapped as YBR_FULL_422,
    then re-encoded by dcmtk itself as JPEG lossless, JPEG-LS and RLE."""
    if shutil.which("img2dcm") is None:
        pytest.skip("dcmtk is not installed (apt-get install dcmtk): no third-party DICOM writer")
    jpeg = fx.real_jpegs(2)[1]
    wrapped = tmp_path / "img2dcm.dcm"
    subprocess.run(["img2dcm", str(jpeg), str(wrapped)], check=True, capture_output=True)
    frame = decode(wrapped)[0]
    np.testing.assert_array_equal(frame.rgb, fx.load_rgb(jpeg))
    assert frame.ref.attributes["series_instance_uid"] == frame.ref.lesion_id != ""

    plain = tmp_path / "plain.dcm"
    subprocess.run(["dcmdjpeg", str(wrapped), str(plain)], check=True, capture_output=True)
    reference = decode(plain)[0].rgb
    assert np.abs(reference.astype(int) - frame.rgb.astype(int)).mean() < 2.0  # dcmtk's libjpeg vs Pillow's
    for tool, options in (("dcmcjpeg", ["+el"]), ("dcmcjpeg", ["+e1"]), ("dcmcjpls", []), ("dcmcrle", [])):
        out = tmp_path / f"{tool}{''.join(options)}.dcm"
        subprocess.run([tool, *options, str(plain), str(out)], check=True, capture_output=True)
        np.testing.assert_array_equal(decode(out)[0].rgb, reference, err_msg=f"{tool} {options}")



def test_cli_refuses_an_unknown_lesion_attribute_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--lesion-attribute", "SeriesUID"])
    assert result.exit_code == 2
    assert "'SeriesUID' is not a DICOM keyword" in result.output
