"""``--dicom-sr``: one DICOM Structured Report per study scored from DICOM inputs, for the clinic's archive.

Template TID 1500 (Measurement Report) in a Comprehensive SR, built with highdicom: one TID 1501
measurement group per lesion with an image in the study, holding the lesion row's class probabilities
and malignant probability as numeric measurements, its predicted class, flags and review reasons as
qualitative evaluations, the not-a-diagnosis statement, the bundle (name, version, member weight hashes)
as algorithm identification, and the source images (SOP class, instance, frames) it was computed from.
Why this template and how the files were validated: docs/dicom_sr.md.

Every value comes from the report rows (lesions.csv for results, images.csv for references and
identity); nothing is re-scored or re-read from the sources. Raster inputs have no DICOM identity and get
no SR. With ``--pseudonymize`` the rows arrive pseudonymised and the SR carries the same pseudonyms.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
from highdicom.sr import (AlgorithmIdentification, CodedConcept, ComprehensiveSR, DeviceObserverIdentifyingAttributes,
                          Measurement, MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
                          ObserverContext, QualitativeEvaluation, SourceImageForMeasurementGroup, TrackingIdentifier)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dermscore import __version__
from dermscore.aggregate import SEPARATOR, SOURCE_HEADER
from dermscore.bundle import Bundle
from dermscore.report.excel import CLASS_NAMES
from dermscore.report.files import atomic_path
from dermscore.report.pseudonymize import pseudonym_uid
from dermscore.report.run_info import DISCLAIMER, RunInfo

MANUFACTURER = "dermscore"
SCHEME = "99DERMSCORE"  # private coding scheme: no standard codes exist for the model's classes and flags
SCHEME_NAME = "dermscore result codes"
UNITLESS = CodedConcept("1", "UCUM", "no units")  # probabilities are written as fractions 0..1, as in the CSV
PREDICTED_CLASS = CodedConcept("class", SCHEME, "Predicted class")
MALIGNANT_PROBABILITY = CodedConcept("P-malignant", SCHEME, "Malignant probability")
FLAG = CodedConcept("flag", SCHEME, "Flag")
REVIEW_REASON = CodedConcept("review-reason", SCHEME, "Review reason")
RESULT_STATUS = CodedConcept("status", SCHEME, "Result status")
NOT_A_DIAGNOSIS = CodedConcept("not-a-diagnosis", SCHEME, DISCLAIMER)
SERIES_DESCRIPTION = "dermscore results: not a diagnosis"
SR_SERIES_NUMBER = 9901  # a high number keeps the SR series after the image series in archive listings
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1
MAX_UID_LENGTH = 64


def probability_code(code: str) -> CodedConcept:
    return CodedConcept(f"P-{code}", SCHEME, f"Probability of {code}")


def class_code(code: str) -> CodedConcept:
    return CodedConcept(code, SCHEME, CLASS_NAMES.get(code, code))


def result_code(value: str) -> CodedConcept:
    """A flag or review reason as a code (values over 16 characters go to LongCodeValue)."""
    return CodedConcept(value, SCHEME, value)


def lesion_uid(lesion_id: str) -> str:
    """The lesion's Tracking UID, derived from its id, so the same lesion keeps one UID across runs."""
    return str(generate_uid(prefix=None, entropy_srcs=["dermscore lesion", lesion_id]))


def _uid(row: Mapping[str, Any], column: str) -> str:
    return pseudonym_uid(str(row[column]))


def _is_dicom(row: Mapping[str, Any]) -> bool:
    return bool(row.get("sop_instance_uid") and row.get("study_instance_uid"))


def _evidence(row: Mapping[str, Any]) -> Dataset:
    """The header of one source instance, from its image row: what highdicom copies into the SR."""
    header = row.get(SOURCE_HEADER) or {}
    ds = Dataset()
    ds.SOPClassUID = header["sop_class_uid"]
    ds.SOPInstanceUID = _uid(row, "sop_instance_uid")
    ds.StudyInstanceUID = _uid(row, "study_instance_uid")
    ds.SeriesInstanceUID = _uid(row, "series_instance_uid")
    ds.PatientID = row.get("patient_id") or ""
    ds.PatientName = header.get("patient_name") or ""
    ds.PatientBirthDate = header.get("patient_birth_date") or ""
    ds.PatientSex = header.get("patient_sex") or ""
    ds.StudyDate = row.get("study_date") or ""
    ds.StudyTime = header.get("study_time") or ""
    ds.StudyID = header.get("study_id") or ""
    ds.AccessionNumber = header.get("accession_number") or ""
    ds.ReferringPhysicianName = header.get("referring_physician_name") or ""
    return ds


def character_set(texts: Iterable[Any]) -> str | None:
    """UTF-8 (ISO_IR 192) when any text the SR carries is not ASCII, else the default repertoire (None).

    Values were decoded from their sources' own character sets when read, so UTF-8 holds them all.
    """
    return None if all(str(t).isascii() for t in texts) else "ISO_IR 192"


def _source_images(rows: Sequence[Mapping[str, Any]]) -> list[SourceImageForMeasurementGroup]:
    """One reference per source instance; frame numbers only for objects scored frame by frame."""
    frames: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        frames.setdefault(str(row["sop_instance_uid"]), []).append(row)
    references = []
    for instance_rows in frames.values():
        first = instance_rows[0]
        numbers = [int(r["frame"]) for r in instance_rows] if len(instance_rows) > 1 else None
        references.append(SourceImageForMeasurementGroup(
            first[SOURCE_HEADER]["sop_class_uid"], _uid(first, "sop_instance_uid"), referenced_frame_numbers=numbers))
    return references


def algorithm(bundle: Bundle) -> AlgorithmIdentification:
    """The bundle as TID 4019: name, version and, as parameters, each member's weight hash and weight."""
    return AlgorithmIdentification(
        name=bundle.name, version=bundle.version,
        parameters=[f"{m.name} sha256 {m.sha256} weight {m.weight:g}" for m in bundle.members])


def lesion_group(lesion: Mapping[str, Any], images: Sequence[Mapping[str, Any]],
                 bundle: Bundle) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one lesion row; ``images`` are its DICOM image rows (the sources to reference)."""
    measurements = [Measurement(probability_code(code), float(lesion[code]), UNITLESS) for code in bundle.classes]
    measurements.append(Measurement(MALIGNANT_PROBABILITY, float(lesion["malignant_probability"]), UNITLESS))
    evaluations = [QualitativeEvaluation(PREDICTED_CLASS, class_code(str(lesion["predicted_class"])))]
    evaluations += [QualitativeEvaluation(FLAG, result_code(f)) for f in _split(lesion.get("flags"))]
    evaluations += [QualitativeEvaluation(REVIEW_REASON, result_code(r)) for r in _split(lesion.get("review_reasons"))]
    evaluations.append(QualitativeEvaluation(RESULT_STATUS, NOT_A_DIAGNOSIS))
    lesion_id = str(lesion["lesion_id"])
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=lesion_uid(lesion_id), identifier=lesion_id),
        finding_type=codes.SCT.SkinLesion,
        algorithm_id=algorithm(bundle),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=_source_images(images),
    )


def _split(value: Any) -> list[str]:
    return [part for part in str(value or "").split(SEPARATOR) if part]


def build_sr(bundle: Bundle, study_rows: Sequence[Mapping[str, Any]], lesions: Sequence[Mapping[str, Any]],
             lesion_images: Mapping[str, Sequence[Mapping[str, Any]]], run_info: RunInfo) -> ComprehensiveSR:
    """The SR of one study: its patient and study identity from its first image row, one group per lesion."""
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=str(generate_uid(prefix=None, entropy_srcs=["dermscore bundle", bundle.identity])),
            name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=bundle.name))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.DermoscopicPhotography,
        imaging_measurements=[lesion_group(lesion, lesion_images[str(lesion["lesion_id"])], bundle)
                              for lesion in lesions],
    )
    referenced = {str(study_rows[0]["sop_instance_uid"]): study_rows[0]}  # first: highdicom copies its identity
    for lesion in lesions:
        for row in lesion_images[str(lesion["lesion_id"])]:
            referenced.setdefault(str(row["sop_instance_uid"]), row)
    evidence = [_evidence(row) for row in referenced.values()]
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{bundle.name} {bundle.version}"[:64], software_versions=[__version__],
        contribution_datetime=run_info.finished, contribution_description=DISCLAIMER)
    first = evidence[0]
    texts = [first.PatientID, first.PatientName, first.StudyID, first.AccessionNumber, first.ReferringPhysicianName,
             bundle.name, bundle.version, *(lesion["lesion_id"] for lesion in lesions)]
    sr = ComprehensiveSR(
        evidence=evidence, content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, contributing_equipment=[equipment],
        series_description=SERIES_DESCRIPTION, content_date=run_info.finished.date(),
        content_time=run_info.finished.time(), specific_character_set=character_set(texts),
    )
    _identify_scheme(sr)
    return sr


def _identify_scheme(sr: Dataset) -> None:
    """Declare the private coding scheme, as PS3.3 C.12.1.1.5 asks of schemes that are not in PS3.16."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [item]


def _unusable(row: Mapping[str, Any]) -> str | None:
    """Why a DICOM image row cannot be referenced from an SR, or None when it can."""
    if not (row.get(SOURCE_HEADER) or {}).get("sop_class_uid"):
        return ("it was scored by an older dermscore that did not keep its SOP Class UID; run again with "
                "--rescore to include it")
    for column in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        uid = pseudonym_uid(str(row.get(column) or ""))
        if not (len(uid) <= MAX_UID_LENGTH and UID_PATTERN.fullmatch(uid)):
            return f"its {column} {row.get(column)!r} is not a valid DICOM UID; ask the sender for a conformant export"
    return None


def study_groups(image_rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """DICOM image rows by study, in report order; a row that cannot be referenced (see ``_unusable``) is
    left out with a warning that names the file and what to do."""
    studies: dict[str, list[Mapping[str, Any]]] = {}
    for row in image_rows:
        if not _is_dicom(row):
            continue
        reason = _unusable(row)
        if reason:
            warnings.warn(f"no DICOM SR reference for {row['source']}: {reason}.", UserWarning, stacklevel=2)
            continue
        studies.setdefault(str(row["study_instance_uid"]), []).append(row)
    return studies


def write_dicom_srs(folder: Path, bundle: Bundle, image_rows: Sequence[Mapping[str, Any]],
                    lesion_rows: Sequence[Mapping[str, Any]], run_info: RunInfo) -> list[Path]:
    """Write ``folder/<StudyInstanceUID>.dcm`` for every study; returns the files (none: no DICOM inputs).

    The folder then holds exactly this run's SRs: an SR left by an earlier run into the same folder
    (``--overwrite``) is removed, as the CSVs beside it are replaced.

    A lesion is reported in each study that holds one of its images, with all of its DICOM images
    referenced (a lesion map may join images of several studies; the lesion row averages them all).
    """
    studies = study_groups(image_rows)
    lesion_images: dict[str, list[Mapping[str, Any]]] = {}
    for rows in studies.values():
        for row in rows:
            lesion_images.setdefault(str(row["lesion_id"]), []).append(row)
    folder = Path(folder)
    if studies:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for study, rows in studies.items():
        in_study = {str(r["lesion_id"]) for r in rows}
        lesions = [lesion for lesion in lesion_rows if str(lesion["lesion_id"]) in in_study]
        sr = build_sr(bundle, rows, lesions, lesion_images, run_info)
        path = folder / f"{pseudonym_uid(study)}.dcm"
        with atomic_path(path) as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        written.append(path)
    for stale in set(folder.glob("*.dcm")) - set(written):  # an earlier run's, under --overwrite
        stale.unlink()
    return written
    Path(folder).mkdir(parents=True, exist_ok=True)
    for study, rows in studies.items():
        in_study = {str(r["lesion_id"]) for r in rows}
        lesions = [lesion for lesion in lesion_rows if str(lesion["lesion_id"]) in in_study]
        sr = build_sr(bundle, rows, lesions, lesion_images, run_info)
        path = Path(folder) / f"{pseudonym_uid(study)}.dcm"
        with atomic_path(path) as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        written.append(path)
    for stale in set(Path(folder).glob("*.dcm")) - set(written):  # an earlier run's, under --overwrite
        stale.unlink()
    return written
