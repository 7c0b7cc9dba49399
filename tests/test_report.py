"""Report writers: formula-safe CSV and XLSX, atomic writes, report folders, pseudonymisation."""

from __future__ import annotations

import csv
import hashlib
import hmac
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from openpyxl import load_workbook

from dermscore.aggregate import SOURCE_HEADER, image_row
from dermscore.errors import UsageError
from dermscore.records import Failure, Skipped
from dermscore.report.csv import write_csv
from dermscore.report.pseudonymize import KEY_ENV, load_key, pseudonym, pseudonym_uid, pseudonymize_row
from dermscore.report.run_info import RunInfo
from dermscore.report.safety import FORMULA_PREFIXES, neutralise
from dermscore.report.write import REPORT_FILES, report_folder, write_reports
from test_aggregate import BUNDLE, dist, scored

HOSTILE = ['=HYPERLINK("http://x","y")', "+cmd", "-2+3", "@SUM(1)", "\tTAB", "\rCR", "=cmd|' /C calc'!A0"]
KEY = b"k" * 32


def run_info() -> RunInfo:
    moment = datetime(2026, 11, 25, 21, 0, 0, tzinfo=timezone.utc)
    return RunInfo(started=moment, finished=moment, command_line="dermscore run x", inputs=["/data/x"])


def test_neutralise_prefixes_every_formula_start_and_leaves_other_values() -> None:
    assert all(neutralise(prefix + "1").startswith("'") for prefix in FORMULA_PREFIXES)
    assert neutralise("ISIC_1.jpg") == "ISIC_1.jpg"
    assert neutralise(-0.5) == -0.5 and neutralise(None) is None


def test_csv_cells_from_input_data_cannot_become_formulas(tmp_path: Path) -> None:
    rows = [{"text": value, "number": -1.5} for value in HOSTILE]
    write_csv(tmp_path / "t.csv", ["text", "number"], rows)
    with open(tmp_path / "t.csv", encoding="utf-8", newline="") as handle:
        back = list(csv.DictReader(handle))
    assert [r["text"] for r in back] == ["'" + value for value in HOSTILE]
    assert {r["number"] for r in back} == {"-1.5"}


def test_csv_write_is_atomic_a_failed_write_keeps_the_old_report(tmp_path: Path) -> None:
    target = tmp_path / "images.csv"
    write_csv(target, ["a"], [{"a": 1}])

    def rows_then_crash():
        yield {"a": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_csv(target, ["a"], rows_then_crash())
    assert target.read_text(encoding="utf-8") == "a\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["images.csv"]


def test_a_folder_with_reports_is_never_overwritten_silently(tmp_path: Path) -> None:
    info = run_info()
    assert report_folder(tmp_path, info) == tmp_path
    (tmp_path / REPORT_FILES[0]).write_text("old", encoding="utf-8")
    assert report_folder(tmp_path, info) == tmp_path / "20261125-210000"
    (tmp_path / "20261125-210000").mkdir()
    assert report_folder(tmp_path, info) == tmp_path / "20261125-210000-2"
    assert report_folder(tmp_path, info, overwrite=True) == tmp_path


def test_pseudonym_key_is_required_and_read_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UsageError, match="needs a secret key"):
        load_key()
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(KEY + b"\n")
    assert load_key(key_file) == KEY
    key_file.write_bytes(b"short\n")
    with pytest.raises(UsageError, match="at least 16"):
        load_key(key_file)
    with pytest.raises(UsageError, match="cannot read"):
        load_key(tmp_path / "absent.key")
    monkeypatch.setenv(KEY_ENV, "e" * 20)
    assert load_key() == b"e" * 20


def test_pseudonyms_are_keyed_hmac_and_stable() -> None:
    expected = "psn-" + hmac.new(KEY, b"PAT-1", hashlib.sha256).hexdigest()[:20]
    assert pseudonym("PAT-1", KEY) == expected == pseudonym("PAT-1", KEY)
    assert pseudonym("PAT-1", b"x" * 32) != expected


def test_pseudonymize_row_replaces_identifiers_and_keeps_paths() -> None:
    attributes = {"patient_id": "PAT-1", "study_instance_uid": "1.2", "series_instance_uid": "1.2.3",
                  "sop_instance_uid": "1.2.3.4", "study_date": "20260101", "body_site": "back"}
    dicom = image_row(scored("/d/a.dcm", dist(nv=0.9), attributes=attributes, lesion_id="1.2.3"), BUNDLE)
    out = pseudonymize_row(dicom, KEY)
    for column in ("patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        assert out[column] == pseudonym(attributes[column], KEY)
    assert out["lesion_id"] == out["series_instance_uid"]  # same series, same pseudonym: lesions still group
    assert (out["source"], out["study_date"], out["body_site"]) == ("/d/a.dcm", "20260101", "back")
    plain = image_row(scored("/d/b.jpg", dist(nv=0.9)), BUNDLE)
    assert pseudonymize_row(plain, KEY)["lesion_id"] == "/d/b.jpg"
    assert dicom["patient_id"] == "PAT-1"  # the input row is not changed


def test_hostile_dicom_attributes_and_names_arrive_as_text_in_csv_and_xlsx(tmp_path: Path) -> None:
    attributes = {"patient_id": HOSTILE[0], "body_site": HOSTILE[3], "modality": HOSTILE[1],
                  "study_date": HOSTILE[2], "series_instance_uid": HOSTILE[6]}
    rows = [
        image_row(scored(HOSTILE[4], dist(nv=0.9), attributes=attributes, lesion_id=HOSTILE[6]), BUNDLE),
        image_row(scored("ctrl\x01name.jpg", dist(mel=0.9)), BUNDLE),
    ]
    set_aside = [Skipped(HOSTILE[2], "Modality CT (computed tomography): not a skin photograph", "modality CT")]
    folder = write_reports(tmp_path, BUNDLE, rows, [Failure(HOSTILE[5], "decode", "bad")], run_info(),
                           skipped=set_aside)
    assert pd.read_csv(folder / "skipped.csv", dtype=str).loc[0, "source"] == "'" + HOSTILE[2]
    images = pd.read_csv(folder / "images.csv", dtype=str, keep_default_na=False)
    assert images.loc[0, "patient_id"] == "'" + HOSTILE[0]
    assert images.loc[0, "source"] == "'" + HOSTILE[4]
    assert pd.read_csv(folder / "lesions.csv", dtype=str)["lesion_id"][0] == "'" + HOSTILE[6]
    wb = load_workbook(folder / "report.xlsx")
    texts = [cell for sheet in ("Lesions", "Images", "Errors", "Skipped") for row in wb[sheet].iter_rows(min_row=2)
             for cell in row if isinstance(cell.value, str)]
    assert texts and all(cell.data_type == "s" for cell in texts)  # never "f" (formula)
    assert not [c.value for c in texts if c.value.startswith(FORMULA_PREFIXES)]
    hostile_cells = {c.value for c in texts if c.value.startswith("'")}
    # XML parsers read a stored carriage return back as a line feed; the quote prefix is what matters
    assert {("'" + value).replace("\r", "\n") for value in HOSTILE} <= hostile_cells
    assert "ctrl\ufffdname.jpg" in {c.value for c in texts}  # XML cannot hold \x01; it is replaced, not lost
    sheet = pd.read_excel(folder / "report.xlsx", sheet_name="Images", dtype=str)
    assert sheet.loc[0, "body_site"] == "'" + HOSTILE[3]


def test_a_run_where_everything_failed_still_gets_a_complete_workbook(tmp_path: Path) -> None:
    folder = write_reports(tmp_path, BUNDLE, [], [Failure("/d/x.jpg", "decode", "corrupt")], run_info())
    wb = load_workbook(folder / "report.xlsx")
    assert wb.sheetnames == ["Summary", "Lesions", "Images", "Errors", "Skipped", "Run"]
    assert wb["Skipped"].max_row == 1 and pd.read_csv(folder / "skipped.csv").empty
    assert wb["Images"].max_row == 1 and not list(wb["Images"].conditional_formatting)
    assert [c.value for c in wb["Errors"][2]] == ["/d/x.jpg", "decode", "corrupt"]
    assert pd.read_csv(folder / "lesions.csv").empty


def test_pseudonymize_row_treats_the_sr_header_like_the_csv_and_its_uids_stay_traceable() -> None:
    header = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.77.1.4", "patient_name": "Doe^Jane",
              "patient_birth_date": "19700101", "patient_sex": "F", "study_time": "101500", "study_id": "S1",
              "accession_number": "ACC-1", "referring_physician_name": "Who^Doctor"}
    attributes = {"patient_id": "PAT-1", "study_instance_uid": "1.2", "sop_instance_uid": "1.2.3.4", **header}
    row = image_row(scored("/d/a.dcm", dist(nv=0.9), attributes=attributes), BUNDLE)
    out = pseudonymize_row(row, KEY)
    assert out[SOURCE_HEADER] == {**{k: "" for k in header}, "sop_class_uid": header["sop_class_uid"],
                                  "patient_name": out["patient_id"] + "^"}
    assert row[SOURCE_HEADER] == header  # the input row is not changed
    uid = pseudonym_uid(out["study_instance_uid"])  # the SR's form of the CSV pseudonym, and back
    assert uid.startswith("2.25.") and len(uid) <= 64 and f"psn-{int(uid[5:]):020x}" == out["study_instance_uid"]
    assert pseudonym_uid("1.2.3") == "1.2.3"  # a UID in clear (no --pseudonymize) is written as it is
