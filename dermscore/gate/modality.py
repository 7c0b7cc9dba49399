"""The modality gate: DICOM objects that are not skin photographs are set aside, not scored.

A CT slice or an ultrasound frame scored as a skin lesion gives a confident, meaningless class (issue
16 saw a CT slice flagged malignant), so such objects never reach the model. The decision uses only
what discovery already read (``dermscore.decode.dicom.read_header``: the file meta group and the
dataset up to Modality, within the first 16 KiB), so a radiology series costs no pixel decoding.

Rule (docs/inputs.md; docs/quality.md has the design notes):

* An object passes when every modality it names is on the allow-list: its Modality attribute
  (0008,0060) and the modality its SOP class implies (CT Image Storage implies CT, Ophthalmic
  Photography implies OP, ...). Both are checked, so a CT object relabelled ``OT`` is still a CT.
* Default allow-list: ``XC`` (external-camera photography), ``DMS`` (dermoscopy), ``OT`` (other, what
  many photo exporters write), ``SC`` (secondary capture, a non-standard value common in exports) and
  ``VL`` (visible light, a retired value older photo systems still write). Ophthalmic photography
  (``OP``), endoscopy (``ES``) and microscopy (``GM``, ``SM``) are photographs too, but not of skin:
  they are gated.
* An object with no Modality (absent or empty; the attribute is mandatory, so this is a non-conformant
  export) is judged by its SOP class alone: a radiology class is gated; a photographic, secondary
  capture or unknown class passes, like a JPEG would, and its empty ``modality`` column shows it.
* ``--modality`` replaces the allow-list (``--modality CT --modality XC`` or ``--modality CT,XC``),
  so a job file states exactly what it scores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dermscore.errors import UsageError

DEFAULT_ALLOWED: tuple[str, ...] = ("XC", "DMS", "OT", "SC", "VL")

MODALITY_NAMES = {
    "BMD": "bone densitometry", "CR": "computed radiography", "CT": "computed tomography",
    "DMS": "dermoscopy", "DX": "digital radiography", "ES": "endoscopy", "GM": "general microscopy",
    "IO": "intra-oral radiography", "IVOCT": "intravascular optical coherence tomography",
    "IVUS": "intravascular ultrasound", "MG": "mammography", "MR": "magnetic resonance", "NM": "nuclear medicine",
    "OCT": "optical coherence tomography", "OP": "ophthalmic photography", "OPT": "ophthalmic tomography",
    "OT": "other", "PA": "photoacoustic imaging", "PT": "positron emission tomography",
    "PX": "panoramic X-ray", "RF": "radio fluoroscopy", "RG": "radiographic imaging", "RTIMAGE": "radiotherapy image",
    "SC": "secondary capture", "SM": "slide microscopy", "US": "ultrasound", "VL": "visible light",
    "XA": "X-ray angiography", "XC": "external-camera photography",
}

# SOP classes (pydicom keywords, resolved on first use) whose objects are of one non-photographic modality.
_IMPLIED_BY_KEYWORD = {
    "CR": ("ComputedRadiographyImageStorage",),
    "DX": ("DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
           "XRay3DCraniofacialImageStorage"),
    "MG": ("DigitalMammographyXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForProcessing",
           "BreastTomosynthesisImageStorage", "BreastProjectionXRayImageStorageForPresentation",
           "BreastProjectionXRayImageStorageForProcessing"),
    "IO": ("DigitalIntraOralXRayImageStorageForPresentation", "DigitalIntraOralXRayImageStorageForProcessing"),
    "CT": ("CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage"),
    "MR": ("MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
           "LegacyConvertedEnhancedMRImageStorage"),
    "US": ("UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage"),
    "NM": ("NuclearMedicineImageStorage",),
    "PT": ("PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage", "LegacyConvertedEnhancedPETImageStorage"),
    "XA": ("XRayAngiographicImageStorage", "EnhancedXAImageStorage", "XRay3DAngiographicImageStorage"),
    "RF": ("XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage"),
    "RTIMAGE": ("RTImageStorage", "EnhancedRTImageStorage", "EnhancedContinuousRTImageStorage"),
    "IVOCT": ("IntravascularOpticalCoherenceTomographyImageStorageForPresentation",
              "IntravascularOpticalCoherenceTomographyImageStorageForProcessing"),
    "OP": ("OphthalmicPhotography8BitImageStorage", "OphthalmicPhotography16BitImageStorage",
           "WideFieldOphthalmicPhotographyStereographicProjectionImageStorage",
           "WideFieldOphthalmicPhotography3DCoordinatesImageStorage"),
    "OPT": ("OphthalmicTomographyImageStorage", "OphthalmicOpticalCoherenceTomographyEnFaceImageStorage"),
    "ES": ("VLEndoscopicImageStorage", "VideoEndoscopicImageStorage"),
    "GM": ("VLMicroscopicImageStorage", "VideoMicroscopicImageStorage"),
    "SM": ("VLSlideCoordinatesMicroscopicImageStorage", "VLWholeSlideMicroscopyImageStorage"),
    "PA": ("PhotoacousticImageStorage",),
}
# Retired classes pydicom names but gives no keyword.
_IMPLIED_RETIRED = {
    "1.2.840.10008.5.1.4.1.1.3": "US",  # Ultrasound Multi-frame Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.6": "US",  # Ultrasound Image Storage (retired)
    "1.2.840.10008.5.1.4.1.1.5": "NM",  # Nuclear Medicine Image Storage (retired)
}
_CODE = re.compile(r"^[A-Z0-9_]{1,16}$")  # a DICOM code string (CS) as Modality holds it
_implied: dict[str, str] = {}


def implied_modality(sop_class: str) -> str:
    """The modality a SOP class stands for, or "" for photographic, secondary capture and unknown classes."""
    if not _implied:
        import pydicom.uid  # pydicom only for runs that meet DICOM

        _implied.update(_IMPLIED_RETIRED)
        for code, keywords in _IMPLIED_BY_KEYWORD.items():
            _implied.update({str(getattr(pydicom.uid, keyword)): code for keyword in keywords})
    return _implied.get(sop_class, "")


def describe(code: str) -> str:
    name = MODALITY_NAMES.get(code)
    return f"{code} ({name})" if name else code


def parse_modalities(values: Iterable[str]) -> tuple[str, ...]:
    """``--modality`` values (repeated, or comma-separated) as upper-case codes, checked and de-duplicated."""
    codes: list[str] = []
    for value in values:
        for part in str(value).split(","):
            code = part.strip().upper()
            if not code:
                continue
            if not _CODE.match(code):
                raise UsageError(
                    f"--modality {part.strip()!r} is not a DICOM Modality code; give codes such as XC, DMS, OT or CT "
                    "(repeat the option or separate them with commas)."
                )
            if code not in codes:
                codes.append(code)
    if not codes:
        raise UsageError("--modality needs at least one Modality code, e.g. --modality XC,DMS,OT.")
    return tuple(codes)


@dataclass(frozen=True)
class ModalityGate:
    """The allow-list of one run: ``refuse`` says which modality keeps an object out, and why."""

    allowed: tuple[str, ...] = DEFAULT_ALLOWED

    def refuse(self, sop_class: str, modality: str) -> tuple[str, str] | None:
        """(modality code, reason) when the object must not be scored; None when it passes."""
        for code, told_by in ((modality, "Modality"), (implied_modality(sop_class), "its SOP class implies")):
            if code and code not in self.allowed:
                hint = ",".join((*self.allowed, code))
                return code, (f"{told_by} {describe(code)}: not a skin photograph, so not scored; to score it "
                              f"anyway, run with --modality {hint}")
        return None
