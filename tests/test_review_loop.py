"""The review loop on real images: score HAM10000 test-split images with the shipped bundle (ONNX Runtime),
fill verdicts in report.xlsx with openpyxl and through LibreOffice Calc, import them into the ledger,
regenerate the reports with the verdicts in place, and check `dermscore evaluate` against scikit-learn.

Every test works on its own copy of one scored run (report files and ledger), passing --ledger for it.
"""

from __future__ import annotations

import csv
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, recall_score
from typer.testing import CliRunner

from conftest import REPO, SMALL_200
from dermscore.cli import app
from dermscore.evaluate import balanced_accuracy, brier_score, calibration_error, per_class_recall, summarise
from dermscore.ledger import SCHEMA_VERSION, open_ledger
from dermscore.records import NOT_A_LESION, UNSURE, VERDICT_COLUMNS
from dermscore.report.pseudonymize import KEY_ENV

METADATA = SMALL_200 / "HAM10000_metadata.csv"
SHIPPED = REPO / "models" / "ham10000-ensemble"
PER_CLASS = 2  # test-split images per class: 14 images, every class present
runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None) -> object:
    return runner.invoke(app, [str(a) for a in args], env=env)


def dx_of() -> dict[str, str]:
    with open(METADATA, newline="", encoding="utf-8") as handle:
        return {row["image_id"]: row["dx"] for row in csv.DictReader(handle)}


def lesion_dx() -> dict[str, str]:
    with open(METADATA, newline="", encoding="utf-8") as handle:
        return {row["lesion_id"]: row["dx"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """14 test-split images (2 per class, per the bundle's split.csv) scored once by the shipped bundle."""
    root = tmp_path_factory.mktemp("review")
    images = root / "images"
    images.mkdir()
    taken: dict[str, int] = {}
    with open(SHIPPED / "split.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "test" and taken.get(row["dx"], 0) < PER_CLASS:
                taken[row["dx"]] = taken.get(row["dx"], 0) + 1
                shutil.copy(SMALL_200 / "images" / f"{row['image_id']}.jpg", images)
    result = cli("run", images, "--out", root / "out", "--backend", "onnx", "--metadata", METADATA, "--quiet")
    assert result.exit_code == 0, result.output
    return {"images": images, "out": root / "out"}


@pytest.fixture
def run_copy(scored: dict[str, Path], tmp_path: Path) -> Path:
    """This test's own copy of the scored run's reports and ledger."""
    return Path(shutil.copytree(scored["out"], tmp_path / "out"))


def header(ws: object) -> dict[str, int]:
    return {cell.value: cell.column for cell in ws[1]}


def fill(report: Path, target: Path, verdicts: dict[str, tuple[str | None, str | None, str | None]]) -> Path:
    """Save a copy of ``report`` with verdict cells filled by lesion id, found by header name (as a reviewer would)."""
    wb = load_workbook(report)
    ws = wb["Lesions"]
    columns = header(ws)
    for row in range(2, ws.max_row + 1):
        lesion = ws.cell(row, columns["lesion_id"]).value
        if lesion in verdicts:
            for name, value in zip(VERDICT_COLUMNS, verdicts[lesion]):
                cell = ws.cell(row, columns[name], value)
                if isinstance(value, str) and value.startswith("="):
                    cell.data_type = "s"  # text, as typed after a quote; openpyxl would make it a formula
    wb.save(target)
    return target


def import_(report: Path, ledger: Path) -> object:
    return cli("review", "import", report, "--ledger", ledger)


def stored(ledger: Path) -> list[tuple]:
    db = sqlite3.connect(ledger)
    try:
        return db.execute("SELECT lesion_id, reviewer_class, reviewer, reviewer_note, recorded_at FROM verdicts "
                          "ORDER BY id").fetchall()
    finally:
        db.close()


def lesion_ids(out: Path) -> list[str]:
    return list(pd.read_csv(out / "lesions.csv", dtype=str)["lesion_id"])


def libreoffice_round_trip(source: Path, work: Path) -> Path:
    """xlsx -> ods -> xlsx through LibreOffice Calc (headless, its own profile), as a reviewer saving in Calc."""
    soffice = shutil.which("soffice")
    if soffice is None:
        pytest.skip("LibreOffice (soffice) is not installed: apt-get install libreoffice-calc-nogui")
    profile = f"-env:UserInstallation=file://{work / 'lo-profile'}"
    for fmt, src, dest in (("ods", source, work / "ods"), ("xlsx", work / "ods" / f"{source.stem}.ods", work / "calc")):
        done = subprocess.run([soffice, profile, "--headless", "--convert-to", fmt, "--outdir", str(dest), str(src)],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
    written = work / "calc" / f"{source.stem}.xlsx"
    with zipfile.ZipFile(written) as archive:
        assert "LibreOffice" in archive.read("docProps/app.xml").decode()  # really Calc's file, not ours
    return written


def drop_down(ws: object) -> object:
    column = ws.cell(1, header(ws)["reviewer_class"]).column_letter
    found = [dv for dv in ws.data_validations.dataValidation if str(dv.sqref).startswith(f"{column}2:")]
    assert len(found) == 1
    return found[0]


def test_the_review_loop_from_scoring_to_evaluation(scored: dict[str, Path], run_copy: Path, tmp_path: Path) -> None:
    out, ledger = run_copy, run_copy / "ledger.sqlite"
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    validation = drop_down(load_workbook(out / "report.xlsx")["Lesions"])
    assert validation.type == "list" and validation.formula1 == '"' + ",".join([*classes, NOT_A_LESION, UNSURE]) + '"'

    # The truth of each lesion from the metadata; two lesions get the non-answers instead.
    truth = lesion_dx()
    lesions = lesion_ids(out)
    first, second = lesions[: len(lesions) // 2], lesions[len(lesions) // 2:]
    by_openpyxl = {lesion: (truth[lesion], "dr-a", "dermoscopy reviewed") for lesion in first}
    by_openpyxl[first[0]] = (NOT_A_LESION, "dr-a", "ruler only")
    by_calc = {lesion: (truth[lesion], "dr-b", None) for lesion in second}
    by_calc[second[0]] = (UNSURE, "dr-b", "=looks odd")  # formula-like text stays text

    result = import_(fill(out / "report.xlsx", tmp_path / "reviewed.xlsx", by_openpyxl), ledger)
    assert result.exit_code == 0, result.output
    assert f"{len(first)} new and 0 changed" in result.output
    calc_file = libreoffice_round_trip(fill(out / "report.xlsx", tmp_path / "calc-input.xlsx", by_calc), tmp_path)
    drop_down(load_workbook(calc_file)["Lesions"])  # the drop-down survives LibreOffice
    result = import_(calc_file, ledger)
    assert result.exit_code == 0, result.output
    assert f"{len(second)} new and 0 changed" in result.output

    # Regenerate the reports from the ledger: nothing is rescored and every verdict is in place.
    result = cli("run", scored["images"], "--out", out, "--ledger", ledger, "--overwrite", "--backend", "onnx",
                 "--metadata", METADATA)
    assert result.exit_code == 0 and "scored 0 image(s)" in result.output, result.output
    expected = {**by_openpyxl, **by_calc}
    lesions_csv = pd.read_csv(out / "lesions.csv", dtype=str, keep_default_na=False).set_index("lesion_id")
    ws = load_workbook(out / "report.xlsx")["Lesions"]
    columns = header(ws)
    sheet = {ws.cell(r, columns["lesion_id"]).value: tuple(ws.cell(r, columns[c]).value for c in VERDICT_COLUMNS)
             for r in range(2, ws.max_row + 1)}
    for lesion, (klass, reviewer, note) in expected.items():
        assert tuple(lesions_csv.loc[lesion, list(VERDICT_COLUMNS)]) == (klass, reviewer, "'" + note if note and
                                                                          note.startswith("=") else note or "")
        assert sheet[lesion][:2] == (klass, reviewer)
    drop_down(ws)
    again = import_(out / "report.xlsx", ledger)  # the regenerated, pre-filled report changes nothing
    assert again.exit_code == 0 and f"0 new and 0 changed verdict(s) stored in {ledger}; {len(lesions)} unchanged" \
        in again.output.replace("\n", ""), again.output

    # evaluate against an independent computation on the same rows.
    result = cli("evaluate", out, "--labels", METADATA, "--ledger", ledger)
    assert result.exit_code == 0, result.output
    evaluation = pd.read_csv(out / "evaluation.csv").set_index(["truth", "period"])
    images = pd.read_csv(out / "images.csv")
    labels = dx_of()
    y_true = [labels[Path(s).stem] for s in images["source"]]
    assert evaluation.loc[("labels", "all"), "n"] == len(images)
    assert evaluation.loc[("labels", "all"), "balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y_true, images["predicted_class"]), abs=1e-12)
    malignant = np.isin(y_true, ["akiec", "bcc", "mel"])
    flagged = images["flags"].fillna("").str.split(";").map(lambda f: "malignant" in f).to_numpy()
    assert evaluation.loc[("labels", "all"), "malignant_sensitivity"] == pytest.approx(flagged[malignant].mean())
    assert evaluation.loc[("labels", "all"), "malignant_specificity"] == pytest.approx((~flagged[~malignant]).mean())
    reviewed = lesions_csv[~lesions_csv["reviewer_class"].isin(["", NOT_A_LESION, UNSURE])]
    row = evaluation.loc[("verdicts", "all")]
    assert (row["n"], row["not_a_lesion"], row["unsure"]) == (len(reviewed), 1, 1)
    assert row["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(reviewed["reviewer_class"], reviewed["predicted_class"]), abs=1e-12)
    sheet = load_workbook(out / "evaluation.xlsx")
    assert sheet.sheetnames == ["Evaluation", "About"]
    values = list(sheet["Evaluation"].values)
    assert values[0][:3] == ("truth", "level", "period") and values[1][:3] == ("labels", "image", "all")
    about = {r[0]: r[1] for r in sheet["About"].values}
    assert about["Statement"].endswith("not a diagnosis.") and about["Bundle version"] == "2026.11.27"
    assert any(str(k).startswith("Weights sha256") for k in about)
    with Image.open(out / "evaluation.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800


def test_a_bad_value_names_sheet_cell_and_value_and_nothing_is_stored(run_copy: Path, tmp_path: Path) -> None:
    ledger = run_copy / "ledger.sqlite"
    first, second, *_ = lesion_ids(run_copy)
    filled = fill(run_copy / "report.xlsx", tmp_path / "bad.xlsx",
                  {first: ("mel", "dr-a", None), second: ("melanoma?", "dr-a", "#NAME?")})
    ws = load_workbook(filled)["Lesions"]
    column = ws.cell(1, header(ws)["reviewer_class"]).column_letter
    row = next(r for r in range(2, ws.max_row + 1) if ws.cell(r, header(ws)["lesion_id"]).value == second)
    result = import_(filled, ledger)
    assert result.exit_code == 2
    assert (f"Lesions!{column}{row}: 'melanoma?' is not one of akiec, bcc, bkl, df, mel, nv, vasc, not-a-lesion, "
            "unsure") in result.output
    note = ws.cell(1, header(ws)["reviewer_note"]).column_letter
    assert f"Lesions!{note}{row}: '#NAME?' is a formula's error" in result.output  # e.g. '=looks odd' typed in Calc
    assert "2 bad cell(s), so nothing was imported" in result.output
    assert stored(ledger) == []  # the good verdict on the other row was not stored either


def test_reimport_changes_nothing_and_a_changed_verdict_keeps_its_history(run_copy: Path, tmp_path: Path) -> None:
    ledger = run_copy / "ledger.sqlite"
    first, second, *_ = lesion_ids(run_copy)
    reviewed = fill(run_copy / "report.xlsx", tmp_path / "a.xlsx", {first: ("MEL", "dr-a", "irregular network"),
                                                                    second: ("nv", "dr-a", None)})
    assert "2 new and 0 changed" in import_(reviewed, ledger).output
    before = stored(ledger)
    assert [v[1] for v in before] == ["mel", "nv"]  # the drop-down's spelling is stored
    again = import_(reviewed, ledger)
    assert again.exit_code == 0 and "0 new and 0 changed" in again.output and "2 unchanged" in again.output
    assert stored(ledger) == before
    changed = fill(reviewed, tmp_path / "b.xlsx", {first: ("bkl", "dr-b", "seen again: seborrhoeic keratosis")})
    assert "0 new and 1 changed" in import_(changed, ledger).output
    with open_ledger(ledger) as opened:
        identity = opened.db.execute("SELECT bundle FROM runs").fetchone()[0]
        history = opened.verdict_history(identity, first)
        latest = opened.latest_verdicts(identity)
    assert [(v.reviewer_class, v.reviewer) for v in history] == [("mel", "dr-a"), ("bkl", "dr-b")]
    assert history[0].recorded_at < history[1].recorded_at  # each change with its own time
    assert latest[first].reviewer_class == "bkl" and latest[second].reviewer_class == "nv"
    blank = fill(changed, tmp_path / "c.xlsx", {first: (None, None, None)})
    assert "0 new and 0 changed" in import_(blank, ledger).output  # a blank row never erases a verdict


@pytest.mark.parametrize("old_version", [1, 2])
def test_an_older_ledger_is_migrated_keeping_its_results(run_copy: Path, tmp_path: Path, old_version: int) -> None:
    ledger = run_copy / "ledger.sqlite"
    db = sqlite3.connect(ledger)
    db.execute("DROP TABLE verdicts")
    if old_version == 1:
        db.execute("DROP TABLE skipped_objects")
    db.execute(f"PRAGMA user_version = {old_version}")
    db.commit()
    images = db.execute("SELECT count(*) FROM images").fetchone()[0]
    db.close()
    first = lesion_ids(run_copy)[0]
    result = import_(fill(run_copy / "report.xlsx", tmp_path / "r.xlsx", {first: ("df", "dr-a", None)}), ledger)
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(ledger)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert db.execute("SELECT count(*) FROM images").fetchone()[0] == images
    assert db.execute("SELECT lesion_id, reviewer_class FROM verdicts").fetchall() == [(first, "df")]
    db.close()


def test_a_pseudonymised_report_is_refused_and_carries_no_verdicts(scored: dict[str, Path], run_copy: Path,
                                                                  tmp_path: Path) -> None:
    ledger = run_copy / "ledger.sqlite"
    first = lesion_ids(run_copy)[0]
    assert import_(fill(run_copy / "report.xlsx", tmp_path / "r.xlsx", {first: ("nv", "dr-a", "Mrs X's mole")}),
                   ledger).exit_code == 0
    shared = tmp_path / "shared"
    result = cli("run", scored["images"], "--out", shared, "--ledger", ledger, "--backend", "onnx", "--metadata",
                 METADATA, "--pseudonymize", env={KEY_ENV: "k" * 32})
    assert result.exit_code == 0, result.output
    lesions = pd.read_csv(shared / "lesions.csv", dtype=str, keep_default_na=False)
    assert lesions["lesion_id"].str.startswith("psn-").all()
    assert (lesions[list(VERDICT_COLUMNS)] == "").all().all()  # notes may name the patient
    refused = import_(fill(shared / "report.xlsx", tmp_path / "p.xlsx", {lesions["lesion_id"][0]: ("mel", "x", None)}),
                      ledger)
    assert refused.exit_code == 2 and "pseudonymised" in refused.output
    assert len(stored(ledger)) == 1


def test_evaluate_splits_by_month_of_scoring(run_copy: Path) -> None:
    ledger = run_copy / "ledger.sqlite"
    db = sqlite3.connect(ledger)
    locations = [row[0] for row in db.execute("SELECT location FROM images ORDER BY location")]
    earlier = locations[: len(locations) // 2]
    scored_month = db.execute("SELECT DISTINCT substr(scored_at, 1, 7) FROM images").fetchall()
    assert len(scored_month) == 1  # one run scored them all
    db.executemany("UPDATE images SET scored_at = '2026-10-15T03:00:00.000+00:00' WHERE location = ?",
                   [(loc,) for loc in earlier])
    db.commit()
    db.close()
    result = cli("evaluate", run_copy, "--labels", METADATA, "--ledger", ledger, "--no-verdicts", "--out",
                 run_copy / "eval")
    assert result.exit_code == 0, result.output
    evaluation = pd.read_csv(run_copy / "eval" / "evaluation.csv")
    months = evaluation.set_index("period")["n"]
    assert list(evaluation["period"]) == ["all", *sorted(["2026-10", scored_month[0][0]])]
    assert set(evaluation["truth"]) == {"labels"}  # --no-verdicts
    assert months["2026-10"] == len(earlier) and months.drop("all").sum() == months["all"] == len(locations)


def test_evaluate_refuses_labels_outside_the_bundle_classes(run_copy: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,dx\nISIC_0000001,melanoma\n", encoding="utf-8")
    result = cli("evaluate", run_copy, "--labels", labels, "--ledger", run_copy / "ledger.sqlite")
    assert result.exit_code == 2 and "line 2" in result.output and "'melanoma'" in result.output


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_agree_with_scikit_learn_and_training() -> None:
    from training.metrics import reliability  # scikit-learn's calibration_curve, an independent ECE

    rng = np.random.default_rng(7)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    truth = rng.choice(classes[:5], 300)  # two classes never true: recall NaN, left out of the mean
    predicted = np.where(rng.random(300) < 0.6, truth, rng.choice(classes, 300))
    probabilities = rng.dirichlet(np.ones(7), 300)
    confidence = rng.random(300)
    assert balanced_accuracy(truth, predicted) == pytest.approx(balanced_accuracy_score(truth, predicted))
    recall = per_class_recall(truth, predicted, classes)
    assert [recall[c][0] for c in classes[:5]] == pytest.approx(
        recall_score(truth, predicted, labels=classes[:5], average=None))
    assert np.isnan(recall["vasc"][0]) and recall["vasc"][1] == 0
    accuracy, mean_confidence, counts = reliability(truth == predicted, confidence)
    assert calibration_error(truth == predicted, confidence) == pytest.approx(
        float(np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence))))
    onehot = (truth[:, None] == np.array(classes)[None, :]).astype(float)
    assert brier_score(truth, probabilities, classes) == pytest.approx(((probabilities - onehot) ** 2).sum(1).mean())
    verdicts = truth.astype(object)
    verdicts[:10] = NOT_A_LESION
    verdicts[10:15] = UNSURE
    figures = summarise(verdicts, predicted, probabilities, confidence, probabilities[:, [0, 1, 4]].sum(1), classes,
                        ["akiec", "bcc", "mel"], 0.3)
    assert (figures["n"], figures["not_a_lesion"], figures["unsure"]) == (285, 10, 5)
    assert figures["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth[15:], predicted[15:]))
