"""report.xlsx end to end: `dermscore run` on real HAM10000 images with lesion ids from the metadata
file and hostile file names, read back with openpyxl and pandas (and rendered by LibreOffice if present)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from typer.testing import CliRunner

from conftest import SMALL_200
from dermscore.aggregate import image_columns, lesion_columns
from dermscore.bundle import CLASS_CODES, read_bundle
from dermscore.cli import app
from dermscore.records import VERDICT_COLUMNS
from dermscore.report.excel import PERCENT
from dermscore.report.run_info import DISCLAIMER

METADATA = SMALL_200 / "HAM10000_metadata.csv"
HOSTILE_NAMES = ['=HYPERLINK("x").jpg', "+cmd.jpg", "@SUM(1).jpg", "-2+3.jpg"]
SHEETS = ["Summary", "Lesions", "Images", "Errors", "Skipped", "Run"]
runner = CliRunner()


def pick_lesions() -> dict[str, list[str]]:
    """Three lesions with several images and two with one, first in file order (deterministic)."""
    by_lesion: dict[str, list[str]] = defaultdict(list)
    with open(METADATA, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_lesion[row["lesion_id"]].append(row["image_id"])
    multi = [lesion for lesion, images in by_lesion.items() if len(images) >= 2][:3]
    single = [lesion for lesion, images in by_lesion.items() if len(images) == 1][:2]
    return {lesion: by_lesion[lesion] for lesion in multi + single}


@pytest.fixture(scope="module")
def report(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run: HAM images in a folder, hostile-named copies and a broken file given by relative name."""
    work = tmp_path_factory.mktemp("excel")
    folder = work / "ham"
    folder.mkdir()
    lesions = pick_lesions()
    for images in lesions.values():
        for image in images:
            shutil.copy(SMALL_200 / "images" / f"{image}.jpg", folder / f"{image}.jpg")
    first = next(iter(lesions.values()))[0]
    for name in HOSTILE_NAMES:
        shutil.copy(SMALL_200 / "images" / f"{first}.jpg", work / name)
    (work / "=broken.jpg").write_bytes(b"not a jpeg")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # relative inputs, so the hostile names start the 'source' cells
        result = runner.invoke(app, ["run", "--model", str(small_bundle), "--out", "out", "--metadata", str(METADATA),
                                     "--thumbnails", "--malignant-threshold", "0.4",
                                     "--", "ham", *HOSTILE_NAMES, "=broken.jpg"])  # '--': '-2+3.jpg' is a file
    assert result.exit_code == 3, result.output  # the broken file failed, the rest scored
    return {"out": work / "out", "lesions": lesions, "bundle": read_bundle(small_bundle), "work": work}


def test_workbook_has_the_sheets_headers_frozen_panes_and_filters(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    assert wb.sheetnames == SHEETS
    bundle = report["bundle"]
    expected = {"Lesions": ["thumbnail", *lesion_columns(bundle), *VERDICT_COLUMNS], "Images": image_columns(bundle),
                "Errors": ["source", "stage", "reason"], "Skipped": ["source", "category", "reason"]}
    for name, header in expected.items():
        ws = wb[name]
        assert [c.value for c in ws[1]] == header
        assert ws.freeze_panes == "A2"
        assert ws.auto_filter.ref == f"A1:{ws.cell(1, len(header)).column_letter}{ws.max_row}"
        assert all(ws.column_dimensions[c.column_letter].width >= 8 for c in ws[1])
    assert wb["Summary"]["A2"].value == DISCLAIMER


def test_probabilities_are_numbers_shown_as_percentages(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    for name in ("Lesions", "Images"):
        ws = wb[name]
        header = [c.value for c in ws[1]]
        for column in (*CLASS_CODES, "confidence", "malignant_probability"):
            cells = [row[header.index(column)] for row in ws.iter_rows(min_row=2)]
            assert cells and all(isinstance(c.value, float) and c.number_format == PERCENT for c in cells)


def test_conditional_formatting_highlights_malignant_and_review_rows(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    for name in ("Lesions", "Images"):
        ws = wb[name]
        header = [c.value for c in ws[1]]
        letter = {h: ws.cell(1, i + 1).column_letter for i, h in enumerate(header)}
        rules = [(str(cf.sqref), rule) for cf in ws.conditional_formatting for rule in cf.rules]
        area = f"A2:{ws.cell(1, len(header)).column_letter}{ws.max_row}"
        assert [sqref for sqref, _ in rules] == [area, area]
        malignant, review = (rule for _, rule in rules)
        assert malignant.formula == [f"${letter['malignant_probability']}2>=0.4"]
        assert f"${letter['confidence']}2<0.5" in review.formula[0]
        assert f'SEARCH("review",${letter["flags"]}2)' in review.formula[0]
        assert malignant.dxf.fill.fgColor.rgb != review.dxf.fill.fgColor.rgb
        assert malignant.priority < review.priority


def test_hostile_file_names_arrive_as_text(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    sources = {c.value: c for c in wb["Images"]["A"][1:]}
    for name in HOSTILE_NAMES:
        cell = sources["'" + name]
        assert cell.data_type == "s"
    errors = pd.read_excel(report["out"] / "report.xlsx", sheet_name="Errors")
    assert list(errors["source"]) == ["'=broken.jpg"]
    images = pd.read_csv(report["out"] / "images.csv")
    assert {"'" + name for name in HOSTILE_NAMES} <= set(images["source"])


def test_lesion_rows_aggregate_the_images_of_each_ham10000_lesion(report: dict) -> None:
    images = pd.read_excel(report["out"] / "report.xlsx", sheet_name="Images")
    lesions = pd.read_excel(report["out"] / "report.xlsx", sheet_name="Lesions").set_index("lesion_id")
    for lesion_id, image_ids in report["lesions"].items():
        row = lesions.loc[lesion_id]
        members = images[images["lesion_id"] == lesion_id]
        assert sorted(Path(s).stem for s in members["source"]) == sorted(image_ids)
        assert row["n_images"] == len(image_ids) and row["lesion_source"] == "metadata"
        assert np.allclose(row[list(CLASS_CODES)].astype(float), members[list(CLASS_CODES)].mean(axis=0))
        assert row["predicted_class"] == members[list(CLASS_CODES)].mean(axis=0).idxmax()
    own = lesions[lesions["lesion_source"] == "image"]
    assert sorted(own.index) == sorted("'" + name for name in HOSTILE_NAMES)  # no map entry: own lesion
    assert (own["n_images"] == 1).all()
    csv_lesions = pd.read_csv(report["out"] / "lesions.csv").set_index("lesion_id")
    assert list(csv_lesions.columns) == [*lesion_columns(report["bundle"]), *VERDICT_COLUMNS][1:]
    assert np.allclose(csv_lesions.loc[lesions.index, "confidence"], lesions["confidence"])


def test_summary_counts_agree_with_the_data_sheets(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    facts = {row[0].value: row[1].value for row in wb["Summary"].iter_rows(min_row=4, max_row=17)}
    images = pd.read_excel(report["out"] / "report.xlsx", sheet_name="Images")
    lesions = pd.read_excel(report["out"] / "report.xlsx", sheet_name="Lesions")
    assert facts["Images scored"] == len(images) and facts["Lesions"] == len(lesions)
    assert facts["Inputs that failed (see Errors)"] == 1
    assert facts["DICOM objects not scored (see Skipped)"] == 0
    poor = images["review_reasons"].fillna("").str.split(";").map(lambda reasons: "poor-quality" in reasons)
    assert facts["Images of poor quality (review reason poor-quality)"] == int(poor.sum())
    assert facts["Lesions flagged (malignant or review)"] == int(lesions["flags"].notna().sum())
    assert facts["Lesions flagged malignant"] == int((lesions["malignant_probability"] >= 0.4).sum())
    assert facts["Run time"] > timedelta(0)  # a duration cell, read back as a timedelta
    table = {row[0].value: (row[1].value, row[2].value) for row in wb["Summary"].iter_rows(min_row=20)}
    for code in CLASS_CODES:
        assert table[code] == (int((lesions["predicted_class"] == code).sum()),
                               int((images["predicted_class"] == code).sum()))


def test_run_sheet_records_provenance_thresholds_and_the_disclaimer(report: dict) -> None:
    wb = load_workbook(report["out"] / "report.xlsx")
    items = {row[0].value: row[1].value for row in wb["Run"].iter_rows(min_row=2)}
    bundle = report["bundle"]
    assert items["Statement"] == DISCLAIMER
    assert items["Bundle name"] == bundle.name and items["Bundle version"] == bundle.version
    for member in bundle.members:
        assert items[f"Weights sha256 ({member.name}, {member.architecture})"] == member.sha256
    import keras
    import tensorflow as tf

    assert items["TensorFlow version"] == tf.__version__ and items["Keras version"] == keras.__version__
    assert items["Device"].startswith(("CPU", "GPU"))
    assert items["Malignant threshold (malignant flag)"] == 0.4
    assert items["Input root 1"] == str(report["work"] / "ham")
    assert items["Started (UTC)"] <= items["Finished (UTC)"]
    assert str(METADATA) in items["Lesion identity from"]


def test_thumbnails_are_embedded_one_per_lesion(report: dict) -> None:
    ws = load_workbook(report["out"] / "report.xlsx")["Lesions"]
    anchors = sorted(image.anchor._from.row for image in ws._images)
    assert anchors == list(range(1, ws.max_row))  # zero-based rows 1.. = sheet rows 2..
    assert all(max(image.width, image.height) <= 64 for image in ws._images)


def test_existing_reports_go_to_a_timestamped_folder_unless_overwrite(report: dict, small_bundle: Path) -> None:
    out = report["work"] / "again"
    args = ["run", str(report["work"] / "ham"), "--model", str(small_bundle), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "already holds reports" in second.output
    subfolders = [p for p in out.iterdir() if p.is_dir()]
    assert len(subfolders) == 1 and (subfolders[0] / "report.xlsx").is_file()
    before = (out / "report.xlsx").stat().st_mtime_ns
    third = runner.invoke(app, [*args, "--overwrite"])
    assert third.exit_code == 0 and "already holds" not in third.output
    assert (out / "report.xlsx").stat().st_mtime_ns > before
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1


def test_pseudonymize_without_a_key_is_refused_before_scoring(
    report: dict, small_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DERMSCORE_PSEUDONYM_KEY", raising=False)
    out = report["work"] / "refused"
    result = runner.invoke(app, ["run", str(report["work"] / "ham"), "--model", str(small_bundle),
                                 "--out", str(out), "--pseudonymize"])
    assert result.exit_code == 2 and "needs a secret key" in result.output
    assert not out.exists()


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (soffice) is not installed")
def test_libreoffice_renders_the_workbook(report: dict, tmp_path: Path) -> None:
    subprocess.run(["soffice", "--headless", f"-env:UserInstallation=file://{tmp_path}/profile",
                    "--convert-to", "pdf", "--outdir", str(tmp_path), str(report["out"] / "report.xlsx")],
                   check=True, capture_output=True, timeout=180)
    pdf = tmp_path / "report.pdf"
    assert pdf.is_file() and pdf.read_bytes().startswith(b"%PDF")


def test_pseudonymize_with_a_key_file_hashes_lesion_ids_and_says_so(
    report: dict, small_bundle: Path, tmp_path: Path
) -> None:
    from dermscore.report.pseudonymize import pseudonym

    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n", encoding="utf-8")
    result = runner.invoke(app, ["run", str(report["work"] / "ham"), "--model", str(small_bundle), "--out",
                                 str(tmp_path / "out"), "--metadata", str(METADATA), "--pseudonymize",
                                 "--pseudonym-key-file", str(key_file)])
    assert result.exit_code == 0, result.output
    lesions = pd.read_csv(tmp_path / "out" / "lesions.csv")
    key = b"0123456789abcdef0123456789abcdef"
    assert sorted(lesions["lesion_id"]) == sorted(pseudonym(lesion, key) for lesion in report["lesions"])
    items = {r[0].value: r[1].value for r in load_workbook(tmp_path / "out" / "report.xlsx")["Run"].iter_rows()}
    assert items["Patient identifiers pseudonymised"].startswith("yes")


def test_dicom_series_are_lesions_and_hostile_dicom_attributes_arrive_as_text(
    small_bundle: Path, tmp_path: Path
) -> None:
    from dicom_fixtures import load_rgb, native

    rgb = load_rgb(SMALL_200 / "images" / f"{next(iter(pick_lesions().values()))[0]}.jpg")
    hostile = {"patient": '=HYPERLINK("http://x")', "series": "1.2.3.4.5", "date": "20240131"}
    native(rgb, tmp_path / "in" / "a.dcm", **hostile)
    native(rgb, tmp_path / "in" / "b.dcm", **hostile)
    native(rgb, tmp_path / "in" / "frames.dcm", frames=2, patient="+PAT", series="1.2.3.9")
    result = runner.invoke(app, ["run", str(tmp_path / "in"), "--model", str(small_bundle),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    wb = load_workbook(tmp_path / "out" / "report.xlsx")
    lesions = pd.read_excel(tmp_path / "out" / "report.xlsx", sheet_name="Lesions").set_index("lesion_id")
    assert dict(lesions["n_images"]) == {"1.2.3.4.5": 2, "1.2.3.9": 2}  # two files; two frames
    assert set(lesions["lesion_source"]) == {"dicom"}
    assert lesions.loc["1.2.3.4.5", "patient_id"] == "'" + hostile["patient"]
    ws = wb["Images"]
    header = [c.value for c in ws[1]]
    patients = [row[header.index("patient_id")] for row in ws.iter_rows(min_row=2)]
    assert sorted(c.value for c in patients) == sorted(["'+PAT"] * 2 + ["'" + hostile["patient"]] * 2)
    assert all(c.data_type == "s" for c in patients)
    images = pd.read_csv(tmp_path / "out" / "images.csv", dtype=str)
    assert set(images["series_instance_uid"]) == {"1.2.3.4.5", "1.2.3.9"}
    assert set(images["modality"]) == {"XC"} and set(images["study_date"]) == {"20240131"}
