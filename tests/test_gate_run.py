"""`dermscore run` over a mixed folder: real HAM10000 images (one blurred), a dermoscopic DICOM, pydicom's
real CT and MR objects, an ultrasound object and a structured report; skipped.csv, the Skipped sheet,
the quality column and the ledger across runs with and without --modality."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image, ImageFilter
from typer.testing import CliRunner

import dicom_fixtures as fx
from dermscore.aggregate import image_columns
from dermscore.bundle import read_bundle
from dermscore.cli import app
from dermscore.config import load_job
from dermscore.ledger import SCHEMA_VERSION, Recorder, open_ledger
from dermscore.records import ImageRef, Scored
from dermscore.run import RunOptions

runner = CliRunner()


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    jpegs = fx.real_jpegs(4)
    for jpeg in jpegs[:3]:
        shutil.copy(jpeg, folder / jpeg.name)
    Image.open(jpegs[3]).filter(ImageFilter.GaussianBlur(3)).save(folder / "blurred.png")
    rgb = fx.load_rgb(jpegs[0])
    fx.native(rgb, folder / "dicom" / "DERM1")
    shutil.copy(fx.pydicom_test_file("CT_small.dcm"), folder / "dicom" / "CT1")
    shutil.copy(fx.pydicom_test_file("MR_small.dcm"), folder / "dicom" / "MR1")
    fx.greyscale_object(rgb, folder / "dicom" / "US1", fx.ULTRASOUND, "US")
    fx.non_image(folder / "dicom" / "SR1")
    return folder


def run(folder: Path, out: Path, bundle: Path, *extra: str) -> "object":
    return runner.invoke(app, ["run", str(folder), "--model", str(bundle), "--out", str(out), "--overwrite",
                               "--no-progress", *extra])


def names(series: pd.Series) -> list[str]:
    return sorted(Path(s).name for s in series)


def test_mixed_folder_scores_photographs_and_lists_the_rest_in_skipped(
    mixed: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run(mixed, out, small_bundle)
    assert result.exit_code == 0, result.output  # set aside is not failed: exit as if they were absent
    assert ("skipped 4 DICOM object(s) that are not skin photographs (1 modality CT, 1 modality MR, "
            "1 not an image, 1 modality US)") in result.output

    images = pd.read_csv(out / "images.csv", dtype={"frame": "Int64"})
    assert names(images["source"]) == sorted(["DERM1", "blurred.png", *(p.name for p in fx.real_jpegs(3))])
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["source", "category", "reason"]
    by_name = {Path(s).name: (c, r) for s, c, r in skipped.itertuples(index=False)}
    assert {name: c for name, (c, _) in by_name.items()} == {
        "CT1": "modality CT", "MR1": "modality MR", "US1": "modality US", "SR1": "not an image"}
    assert by_name["CT1"][1].startswith("Modality CT (computed tomography): not a skin photograph")
    assert "--modality XC,DMS,OT,SC,VL,CT" in by_name["CT1"][1]
    assert pd.read_csv(out / "errors.csv").empty

    sheet = pd.read_excel(out / "report.xlsx", sheet_name="Skipped")
    assert sheet.fillna("").values.tolist() == skipped.fillna("").values.tolist()


def test_quality_column_and_poor_quality_reason_reach_csv_and_workbook(
    mixed: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run(mixed, out, small_bundle).exit_code == 0
    images = pd.read_csv(out / "images.csv").set_index(pd.read_csv(out / "images.csv")["source"].map(
        lambda s: Path(s).name))
    columns = image_columns(read_bundle(small_bundle))
    assert columns[columns.index("member_divergence") + 1] == "quality"
    assert list(pd.read_csv(out / "images.csv").columns) == columns
    assert images.loc["blurred.png", "quality"] == "blurred"
    assert "poor-quality" in images.loc["blurred.png", "review_reasons"].split(";")
    for jpeg in fx.real_jpegs(3):
        assert images.loc[jpeg.name, "quality"] == "ok"
        assert "poor-quality" not in str(images.loc[jpeg.name, "review_reasons"])
    lesions = pd.read_csv(out / "lesions.csv")
    blurred_lesion = lesions[lesions["images"].str.endswith("blurred.png")]
    assert "poor-quality" in blurred_lesion["review_reasons"].iloc[0].split(";")  # inherited from its image

    sheet = load_workbook(out / "report.xlsx")["Images"]
    header = [c.value for c in sheet[1]]
    assert header == columns
    cells = {Path(row[0]).name: row[header.index("quality")] for row in sheet.iter_rows(min_row=2, values_only=True)}
    assert cells["blurred.png"] == "blurred" and cells[fx.real_jpegs(1)[0].name] == "ok"


def test_modality_option_scores_the_ct_and_the_ledger_follows_the_latest_rule(
    mixed: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run(mixed, out, small_bundle).exit_code == 0
    with_ct = run(mixed, out, small_bundle, "--modality", "CT")  # replaces the allow-list: XC is now kept out
    assert with_ct.exit_code == 0, with_ct.output
    images = pd.read_csv(out / "images.csv", dtype={"frame": "Int64"})
    ct = images[images["source"].str.endswith("CT1")]
    assert len(ct) == 1 and ct["modality"].iloc[0] == "CT" and ct["frame"].iloc[0] == 1
    assert "DERM1" not in names(images["source"])
    skipped = pd.read_csv(out / "skipped.csv")
    assert dict(zip(skipped["source"].map(lambda s: Path(s).name), skipped["category"])) == {
        "DERM1": "modality XC", "MR1": "modality MR", "US1": "modality US", "SR1": "not an image"}

    again = run(mixed, out, small_bundle)  # the default list again: the CT is set aside, its scores dropped
    assert again.exit_code == 0, again.output
    images = pd.read_csv(out / "images.csv")
    assert "CT1" not in names(images["source"]) and "DERM1" in names(images["source"])
    assert "CT1" in names(pd.read_csv(out / "skipped.csv")["source"])


def test_job_file_sets_the_allow_list(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('modality = ["XC", "CT"]\n', encoding="utf-8")
    assert load_job(job, RunOptions) == {"modality": ["XC", "CT"]}


def test_a_schema_1_ledger_row_without_quality_reports_an_empty_quality(small_bundle: Path, tmp_path: Path) -> None:
    """A ledger written before this change: schema 1, no skipped_objects table, results without quality."""
    image = fx.real_jpegs(1)[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image, folder / image.name)
    source = folder / image.name
    bundle = read_bundle(small_bundle)
    ledger_path = tmp_path / "out" / "ledger.sqlite"
    with open_ledger(ledger_path) as ledger:
        run_id = ledger.begin_run(bundle.identity, "dermscore run (old version)")
        recorder = Recorder(ledger, run_id, bundle.identity)
        probabilities = {m.name: np.full(7, 1 / 7) for m in bundle.members}
        ref = ImageRef(str(source), hashlib.sha256(source.read_bytes()).hexdigest())
        ledger.hashes[str(source)] = ref.sha256
        recorder.add(Scored(ref, probabilities))
        recorder.commit(final=True)
        ledger.end_run(run_id, "done")
    db = sqlite3.connect(ledger_path)
    result = json.loads(db.execute("SELECT result FROM images").fetchone()[0])
    del result["quality"]
    db.execute("UPDATE images SET result = ?", (json.dumps(result),))
    db.execute("DROP TABLE skipped_objects")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    report = run(folder, tmp_path / "out", small_bundle)
    assert report.exit_code == 0, report.output
    assert "scored 0 image(s)" in report.output  # unchanged: reported from the ledger, not rescored
    images = pd.read_csv(tmp_path / "out" / "images.csv")
    assert images["quality"].isna().all()  # unknown, not "ok" and not a failure
    assert "poor-quality" not in str(images["review_reasons"].iloc[0])
    assert pd.read_csv(tmp_path / "out" / "errors.csv").empty
    db = sqlite3.connect(ledger_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # migrated to the current schema
    assert db.execute("SELECT count(*) FROM skipped_objects").fetchone()[0] == 0
    db.close()
