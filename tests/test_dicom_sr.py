"""`dermscore run --dicom-sr`: DICOM studies written from real HAM10000 images go in, one SR per study
comes out; dcmtk's dsrdump reads it, David Clunie's dciodvfy finds no error in it, and pydicom reads back
every value, each traced to the images.csv / lesions.csv row (or the source file) it came from."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

import dicom_fixtures as fx
from dermscore.bundle import read_bundle
from dermscore.cli import app
from dermscore.report.pseudonymize import KEY_ENV, pseudonym_uid
from dermscore.report.run_info import DISCLAIMER

pytest.importorskip("highdicom", reason="--dicom-sr needs dermscore[dicom-sr] (highdicom)")
runner = CliRunner()
KEY = "k" * 32
# Header values the reports do not show as columns but the SR must carry (set on the sources here).
PATIENTS = {
    "PAT-SR1": {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "PatientSex": "F",
                "StudyTime": "101500", "StudyID": "S1", "AccessionNumber": "ACC-1",
                "ReferringPhysicianName": "Who^Doctor"},
    "PAT-SR2": {"PatientName": "Müller^Jörg", "PatientBirthDate": "19600229", "PatientSex": "M",
                "StudyTime": "091000", "StudyID": "S2", "AccessionNumber": "ACC-2",
                "ReferringPhysicianName": ""},
}


def with_header(path: Path, patient: str) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in PATIENTS[patient].items():
        setattr(ds, keyword, value)
    if not str(ds.PatientName).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture()
def studies(tmp_path: Path) -> Path:
    """Study 1 (PAT-SR1): a series of two single-frame objects and a series of one two-frame object.
    Study 2 (PAT-SR2, non-ASCII name): one object. Plus a raster JPEG, which gets no SR."""
    folder = tmp_path / "in"
    jpegs = fx.real_jpegs(5)
    rgb = [fx.load_rgb(p) for p in jpegs]
    study1, series_a, series_b, study2 = (str(generate_uid()) for _ in range(4))
    one = {"patient": "PAT-SR1", "study": study1, "date": "20260301"}
    fx.native(rgb[0], folder / "s1" / "A1", series=series_a, **one)
    fx.native(rgb[1], folder / "s1" / "A2", series=series_a, **one)
    fx.native(rgb[2], folder / "s1" / "B1", frames=2, sop_class=fx.MULTIFRAME_TRUE_COLOR_SC, series=series_b, **one)
    fx.native(rgb[3], folder / "s2" / "C1", patient="PAT-SR2", study=study2, date="20260302")
    for path in (folder / "s1").iterdir():
        with_header(path, "PAT-SR1")
    with_header(folder / "s2" / "C1", "PAT-SR2")
    shutil.copy(jpegs[4], folder / jpegs[4].name)
    return folder


def run(folder: Path, out: Path, bundle: Path, *extra: str) -> "object":
    result = runner.invoke(app, ["run", str(folder), "--model", str(bundle), "--out", str(out), "--overwrite",
                                 "--no-progress", "--dicom-sr", *extra], env={KEY_ENV: KEY})
    assert result.exit_code == 0, result.output
    return result


def content(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(item.get("ContentSequence", []))


def named(items: list[pydicom.Dataset], value: str) -> list[pydicom.Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == value]


def code_of(item: pydicom.Dataset) -> str:
    code = item.ConceptCodeSequence[0]
    return str(code.get("CodeValue") or code.get("LongCodeValue"))


def sources(folder: Path) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in folder.rglob("*") if p.is_file()
                                             and p.suffix != ".jpg")}


def validate(path: Path) -> None:
    """Both independent tools accept the file: dsrdump reads the document tree, dciodvfy reports no error."""
    dsrdump = shutil.which("dsrdump")
    dciodvfy = shutil.which("dciodvfy")
    if dsrdump is None or dciodvfy is None:
        pytest.skip("dcmtk (dsrdump) and dicom3tools (dciodvfy) are needed: apt-get install dcmtk dicom3tools")
    dump = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)  # strict: the default
    assert dump.returncode == 0, dump.stderr
    assert not [line for line in dump.stderr.splitlines() if line.startswith(("E:", "F:"))], dump.stderr
    assert "Imaging Measurement Report" in dump.stdout and "UNVERIFIED" in dump.stdout
    assert "Probability of mel" in dump.stdout
    check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


def image_items(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every IMAGE content item under ``item``, at any depth."""
    found = [i for i in content(item) if i.ValueType == "IMAGE"]
    return found + [deeper for i in content(item) if i.ValueType == "CONTAINER" for deeper in image_items(i)]


def check_sr(sr: pydicom.Dataset, images: pd.DataFrame, lesions: pd.DataFrame, bundle_path: Path,
             uid: Callable[[str], str], sources_by_uid: dict[str, pydicom.Dataset]) -> None:
    """Every value of one SR against the report rows it came from (``uid`` maps a CSV value to the SR's;
    ``sources_by_uid`` maps a CSV SOP instance UID to its source file's dataset)."""
    bundle = read_bundle(bundle_path)
    study_rows = images[images["study_instance_uid"].map(uid) == sr.StudyInstanceUID]
    assert not study_rows.empty
    first = study_rows.iloc[0]
    assert (sr.Modality, sr.VerificationFlag, sr.CompletionFlag) == ("SR", "UNVERIFIED", "COMPLETE")
    assert sr.PatientID == first["patient_id"] and sr.StudyDate == str(first["study_date"])
    assert sr.SeriesInstanceUID not in set(images["series_instance_uid"].map(uid))  # a new series of its own
    equipment = sr.ContributingEquipmentSequence[0]
    assert equipment.ContributionDescription == DISCLAIMER
    assert equipment.ManufacturerModelName == f"{bundle.name} {bundle.version}"
    referenced = {(s.ReferencedSOPClassUID, s.ReferencedSOPInstanceUID)
                  for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for s in series.ReferencedSOPSequence}
    expected = {(sources_by_uid[r.sop_instance_uid].SOPClassUID, uid(r.sop_instance_uid))
                for r in study_rows.itertuples()}
    assert referenced == expected

    root = content(sr)
    groups = content(named(root, "126010")[0])  # Imaging Measurements
    assert len(groups) == study_rows["lesion_id"].nunique()
    for group in groups:
        items = content(group)
        lesion_id = named(items, "112039")[0].TextValue  # Tracking Identifier
        lesion = lesions.set_index("lesion_id").loc[lesion_id]
        for code in bundle.classes:
            value = float(named(items, f"P-{code}")[0].MeasuredValueSequence[0].NumericValue)
            assert value == pytest.approx(lesion[code], abs=1e-12)
        malignant = named(items, "P-malignant")[0].MeasuredValueSequence[0].NumericValue
        assert float(malignant) == pytest.approx(lesion["malignant_probability"], abs=1e-12)
        assert code_of(named(items, "class")[0]) == lesion["predicted_class"]
        flags = {code_of(i) for i in named(items, "flag")}
        assert flags == set(filter(None, str(lesion["flags"] or "").split(";")))
        reasons = {code_of(i) for i in named(items, "review-reason")}
        assert reasons == set(filter(None, str(lesion["review_reasons"] or "").split(";")))
        assert named(items, "status")[0].ConceptCodeSequence[0].CodeMeaning == DISCLAIMER
        algorithm = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in items if i.ValueType == "TEXT"}
        assert algorithm["Algorithm Name"] == bundle.name and algorithm["Algorithm Version"] == bundle.version
        parameters = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert parameters == [f"{m.name} sha256 {m.sha256} weight {m.weight:g}" for m in bundle.members]
        lesion_rows = images[images["lesion_id"] == lesion_id]
        pointed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"}
        assert pointed == set(lesion_rows["sop_instance_uid"].map(uid))


def test_one_sr_per_study_that_both_validators_accept_with_every_value_from_the_reports(
    studies: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(studies, out, small_bundle)
    images = pd.read_csv(out / "images.csv", dtype=str, keep_default_na=False)
    lesions = pd.read_csv(out / "lesions.csv", keep_default_na=False, dtype={"lesion_id": str})
    sources_by_uid = sources(studies)
    dicom_rows = images[images["sop_instance_uid"] != ""]
    assert len(dicom_rows) == 5 and len(images) == 6  # 3 single-frame objects, 2 frames, 1 JPEG
    written = sorted((out / "dicom-sr").iterdir())
    assert [p.name for p in written] == sorted(f"{s}.dcm" for s in set(dicom_rows["study_instance_uid"]))
    for path in written:
        validate(path)
        sr = pydicom.dcmread(path)
        check_sr(sr, dicom_rows, lesions, small_bundle, str, sources_by_uid)
        source = sources_by_uid[dicom_rows[dicom_rows["study_instance_uid"] == sr.StudyInstanceUID].iloc[0][
            "sop_instance_uid"]]
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyTime", "StudyID", "AccessionNumber",
                        "ReferringPhysicianName"):
            assert str(sr.get(keyword)) == str(source.get(keyword)), keyword
    frames = [[int(f) for f in i.ReferencedSOPSequence[0].ReferencedFrameNumber]
              for path in written for i in image_items(pydicom.dcmread(path))
              if "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]]
    assert frames == [[1, 2]]  # only the two-frame object names its frames

    run(studies, out, small_bundle, "--report", "new")  # nothing new: no SR, and none left from the last run
    assert pd.read_csv(out / "images.csv").empty and not list((out / "dicom-sr").glob("*.dcm"))


def test_pseudonymized_sr_carries_the_csv_pseudonyms_and_no_identifier_in_clear(
    studies: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(studies, out, small_bundle, "--pseudonymize")
    images = pd.read_csv(out / "images.csv", dtype=str, keep_default_na=False)
    lesions = pd.read_csv(out / "lesions.csv", keep_default_na=False, dtype={"lesion_id": str})
    originals = sources(studies)
    dicom_rows = images[images["sop_instance_uid"] != ""]
    assert dicom_rows["patient_id"].str.startswith("psn-").all()
    sources_by_uid = {}
    for ds in originals.values():  # the pseudonymised row of each source, matched by its file
        row = dicom_rows[dicom_rows["source"].map(lambda s: Path(s).name) == Path(ds.filename).name].iloc[0]
        sources_by_uid[row["sop_instance_uid"]] = ds
    written = sorted((out / "dicom-sr").iterdir())
    assert len(written) == 2
    for path in written:
        validate(path)
        sr = pydicom.dcmread(path)
        check_sr(sr, dicom_rows, lesions, small_bundle, pseudonym_uid, sources_by_uid)
        assert sr.StudyInstanceUID.startswith("2.25.") and sr.PatientName.family_name == sr.PatientID
        assert all(sr.get(k) in ("", None) for k in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"))
        raw = path.read_bytes()
        for ds in originals.values():
            for value in (ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.AccessionNumber,
                          str(ds.PatientName).split("^")[0]):
                assert value.encode("utf-8") not in raw, value


def test_raster_inputs_get_no_sr(small_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for jpeg in fx.real_jpegs(2):
        shutil.copy(jpeg, folder / jpeg.name)
    out = tmp_path / "out"
    run(folder, out, small_bundle)
    assert (out / "images.csv").exists() and not (out / "dicom-sr").exists()


def test_job_file_asks_for_srs(tmp_path: Path) -> None:
    from dermscore.config import load_job
    from dermscore.run import RunOptions

    job = tmp_path / "job.toml"
    job.write_text("dicom-sr = true\n", encoding="utf-8")
    assert load_job(job, RunOptions) == {"dicom_sr": True}


def test_rows_an_sr_cannot_reference_are_left_out_with_a_warning_naming_them(tmp_path: Path) -> None:
    from dermscore.aggregate import SOURCE_HEADER, image_row, lesion_rows
    from dermscore.report.dicom_sr import write_dicom_srs
    from test_aggregate import BUNDLE, dist, scored
    from test_report import run_info

    def dicom(location: str, **attributes: str) -> dict:
        identity = {"patient_id": "P1", "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
                    "sop_instance_uid": f"1.2.3.4.{len(location)}", "study_date": "20260101",
                    "sop_class_uid": str(fx.DERMOSCOPIC), **attributes}
        return image_row(scored(location, dist(nv=0.9), attributes=identity, lesion_id="1.2.3.4"), BUNDLE)

    rows = [dicom("/in/good"), dicom("/in/old", sop_class_uid=""), dicom("/in/hostile", series_instance_uid="=1.2")]
    rows.append(image_row(scored("/in/photo.jpg", dist(nv=0.9)), BUNDLE))  # raster: no SR, no warning
    with pytest.warns(UserWarning) as caught:
        written = write_dicom_srs(tmp_path, BUNDLE, rows, lesion_rows(rows, BUNDLE), run_info())
    messages = [str(w.message) for w in caught]
    assert any("/in/old" in m and "--rescore" in m for m in messages)
    assert any("/in/hostile" in m and "not a valid DICOM UID" in m for m in messages)
    assert not any("photo.jpg" in m for m in messages)
    assert [p.name for p in written] == ["1.2.3.dcm"]
    sr = pydicom.dcmread(written[0])
    referenced = [s.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for s in series.ReferencedSOPSequence]
    assert referenced == [rows[0]["sop_instance_uid"]] and rows[0][SOURCE_HEADER]["sop_class_uid"]
