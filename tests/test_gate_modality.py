"""The modality gate on real DICOM files: pydicom's own CT and MR objects, and objects written from real
HAM10000 images with ultrasound, ophthalmic, dermoscopic and secondary-capture SOP classes."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

import dicom_fixtures as fx
from dermscore.decode.dicom import Header, read_header
from dermscore.discover import discover
from dermscore.errors import UsageError
from dermscore.gate.modality import DEFAULT_ALLOWED, ModalityGate, implied_modality, parse_modalities
from dermscore.records import Skipped, Source

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return fx.load_rgb(fx.real_jpegs(1)[0])


def head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16 * 1024)


def test_header_gives_sop_class_and_modality_without_reading_past_the_head(rgb: np.ndarray, tmp_path: Path) -> None:
    ct = read_header(head(fx.pydicom_test_file("CT_small.dcm")))
    assert (ct.sop_class, ct.modality) == (CT_SOP_CLASS, "CT")
    assert read_header(head(fx.pydicom_test_file("MR_small.dcm"))).modality == "MR"
    fx.native(rgb, tmp_path / "deflated", DeflatedExplicitVRLittleEndian)  # the dataset is zlib-compressed
    assert read_header(head(tmp_path / "deflated")) == Header(str(fx.DERMOSCOPIC), "XC")
    fx.greyscale_object(rgb, tmp_path / "nomod", fx.SECONDARY_CAPTURE, None)
    assert read_header(head(tmp_path / "nomod")) == Header(str(fx.SECONDARY_CAPTURE), "")
    assert read_header(b"\0" * 128 + b"DICM" + b"\xff" * 40) == Header("", "")  # garbage: decode will say why


def test_default_allow_list_passes_photography_and_gates_radiology_and_other_photographs() -> None:
    gate = ModalityGate()
    assert gate.refuse(str(fx.DERMOSCOPIC), "XC") is None
    assert gate.refuse(str(fx.DERMOSCOPIC), "DMS") is None
    assert gate.refuse(str(fx.VL_PHOTOGRAPHIC), "") is None  # no Modality: the photographic class decides
    assert gate.refuse(str(fx.SECONDARY_CAPTURE), "OT") is None
    assert gate.refuse("1.2.3.4.5.999", "") is None  # unknown class, no Modality: scored like a JPEG
    code, reason = gate.refuse(CT_SOP_CLASS, "CT")
    assert code == "CT"
    assert reason.startswith("Modality CT (computed tomography): not a skin photograph")
    assert reason.endswith("--modality " + ",".join(DEFAULT_ALLOWED) + ",CT")
    assert gate.refuse(CT_SOP_CLASS, "OT")[0] == "CT"  # a CT object relabelled OT is still a CT
    assert "SOP class implies CT" in gate.refuse(CT_SOP_CLASS, "")[1]  # no Modality: the CT class decides
    assert gate.refuse(str(fx.SECONDARY_CAPTURE), "MR")[0] == "MR"  # a screenshot of an MR slice
    assert gate.refuse(str(fx.OPHTHALMIC_8BIT), "OP")[0] == "OP"  # a photograph, but of an eye
    assert implied_modality(str(fx.ULTRASOUND)) == "US"


def test_modality_option_replaces_the_allow_list() -> None:
    assert parse_modalities(["ct", "XC, dms", "CT"]) == ("CT", "XC", "DMS")
    gate = ModalityGate(parse_modalities(["CT"]))
    assert gate.refuse(CT_SOP_CLASS, "CT") is None
    assert gate.refuse(str(fx.DERMOSCOPIC), "XC")[0] == "XC"
    with pytest.raises(UsageError, match="not a DICOM Modality code"):
        parse_modalities(["C T"])
    with pytest.raises(UsageError, match="at least one"):
        parse_modalities([" , "])


def test_discovery_sets_aside_ct_mr_us_in_folders_zips_and_dicomdirs(rgb: np.ndarray, tmp_path: Path) -> None:
    root = tmp_path / "in"
    fx.native(rgb, root / "derm" / "IM1")
    fx.greyscale_object(rgb, root / "derm" / "NOMODALITY", fx.SECONDARY_CAPTURE, None)
    (root / "ct").mkdir()
    shutil.copy(fx.pydicom_test_file("CT_small.dcm"), root / "ct" / "CT1")
    shutil.copy(fx.pydicom_test_file("MR_small.dcm"), root / "MR1.dcm")
    fx.greyscale_object(rgb, root / "US1", fx.ULTRASOUND, "US")
    with zipfile.ZipFile(root / "export.zip", "w") as archive:
        archive.write(fx.pydicom_test_file("CT_small.dcm"), "series/CT2")
        archive.write(root / "derm" / "IM1", "series/IM2")
    media = root / "media"
    fx.native(rgb, media / "IMAGES" / "IM3")
    shutil.copy(fx.pydicom_test_file("MR_small.dcm"), media / "IMAGES" / "MR2")
    fx.dicomdir(media / "DICOMDIR", [fx.FileSetEntry(("IMAGES", "IM3"), "IMAGE", fx.DERMOSCOPIC),
                                     fx.FileSetEntry(("IMAGES", "MR2"), "IMAGE", "1.2.840.10008.5.1.4.1.1.4")])

    items = list(discover([root]))
    scored = sorted(Path(i.location.split("!")[-1]).name for i in items if isinstance(i, Source))
    assert scored == ["IM1", "IM2", "IM3", "NOMODALITY"]
    set_aside = {Path(i.location.split("!")[-1]).name: i.category for i in items if isinstance(i, Skipped)}
    assert set_aside == {"CT1": "modality CT", "CT2": "modality CT", "MR1.dcm": "modality MR", "MR2": "modality MR",
                         "US1": "modality US", "DICOMDIR": "DICOMDIR"}
    with_ct = [i for i in discover([root], gate=ModalityGate(("CT", "XC")))
               if isinstance(i, Source) and "CT" in Path(i.location.split("!")[-1]).name]
    assert len(with_ct) == 2
