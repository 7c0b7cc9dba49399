"""Write every report of a run in one call: images.csv, lesions.csv, errors.csv, skipped.csv, isic.csv,
report.xlsx and, when asked, DICOM Structured Reports (dicom-sr/).

Lesion rows are derived here from the image rows, so whoever holds stored image rows and failures (the
run, or the ledger regenerating an old run) gets identical reports from this one function. An output
folder that already holds reports is never overwritten silently: without ``overwrite`` the reports go to
a new ``<out>/<YYYYmmdd-HHMMSS>/`` subfolder named after the run's start time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dermscore.aggregate import image_columns, lesion_columns, lesion_rows
from dermscore.bundle import Bundle
from dermscore.errors import UsageError
from dermscore.explain import HEATMAP_COLUMN
from dermscore.records import VERDICT_COLUMNS, Failure, Skipped, Verdict, verdict_choices
from dermscore.report.csv import write_csv
from dermscore.report.excel import Table, write_workbook
from dermscore.report.isic import ISIC_CSV, write_isic_csv
from dermscore.report.run_info import RunInfo

IMAGES_CSV = "images.csv"
LESIONS_CSV = "lesions.csv"
ERRORS_CSV = "errors.csv"
SKIPPED_CSV = "skipped.csv"
WORKBOOK = "report.xlsx"
DICOM_SR_FOLDER = "dicom-sr"
REPORT_FILES = (IMAGES_CSV, LESIONS_CSV, ERRORS_CSV, SKIPPED_CSV, ISIC_CSV, WORKBOOK, DICOM_SR_FOLDER)
ERROR_COLUMNS = ("source", "stage", "reason")
SKIPPED_COLUMNS = ("source", "category", "reason")


def check_dicom_sr() -> None:
    """Refuse ``--dicom-sr`` before any scoring when its extra is not installed, not after the run."""
    if importlib.util.find_spec("highdicom") is None:
        raise UsageError("--dicom-sr needs highdicom: install it with `pip install 'dermscore[dicom-sr]'`.")


def error_row(failure: Failure) -> dict[str, str]:
    return {"source": failure.location, "stage": failure.stage, "reason": failure.reason}


def skipped_row(skipped: Skipped) -> dict[str, str]:
    return {"source": skipped.location, "category": skipped.category, "reason": skipped.reason}


def report_folder(out: Path, run_info: RunInfo, overwrite: bool = False) -> Path:
    """``out`` itself, unless it already holds reports and ``overwrite`` is off: then a new timestamped subfolder."""
    out = Path(out)
    if overwrite or not any((out / name).exists() for name in REPORT_FILES):
        return out
    stamp = run_info.started.strftime("%Y%m%d-%H%M%S")
    folder, n = out / stamp, 1
    while folder.exists():
        n += 1
        folder = out / f"{stamp}-{n}"
    return folder


def write_reports(
    out: Path,
    bundle: Bundle,
    image_rows: Sequence[Mapping[str, Any]],
    failures: Sequence[Failure],
    run_info: RunInfo,
    overwrite: bool = False,
    thumbnails: Mapping[str, bytes] | None = None,
    skipped: Sequence[Skipped] = (),
    dicom_sr: bool = False,
    verdicts: Mapping[str, Verdict] | None = None,
    heatmaps: Mapping[str, bytes] | None = None,
) -> Path:
    """Write all reports (see ``report_folder`` for where) and return the folder they are in.

    ``thumbnails`` maps lesion id -> PNG bytes for the workbook's Lesions sheet; ``skipped`` lists the
    objects discovery set aside (skipped.csv and the Skipped sheet); ``dicom_sr`` adds one DICOM SR per
    study scored from DICOM inputs (dermscore.report.dicom_sr); ``verdicts`` (lesion id -> the latest
    reviewer verdict) pre-fills the reviewer columns, so a regenerated report keeps the reviewer's work;
    ``heatmaps`` maps lesion id -> PNG bytes of a heatmap thumbnail, shown beside the lesion's picture
    (rows then carry a ``heatmaps`` column, see dermscore.explain).
    """
    folder = report_folder(out, run_info, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    lesions = lesion_rows(image_rows, bundle, run_info.thresholds)
    for lesion in lesions:
        if verdicts and lesion["lesion_id"] in verdicts:
            lesion.update(verdicts[lesion["lesion_id"]].columns())
    errors = [error_row(f) for f in failures]
    set_aside = [skipped_row(s) for s in skipped]
    image_cols, lesion_cols = image_columns(bundle), [*lesion_columns(bundle), *VERDICT_COLUMNS]
    if any(HEATMAP_COLUMN in row for row in image_rows):  # a run with --heatmaps: name each image's files
        image_cols.append(HEATMAP_COLUMN)
    write_csv(folder / IMAGES_CSV, image_cols, image_rows)
    write_csv(folder / LESIONS_CSV, lesion_cols, lesions)
    write_csv(folder / ERRORS_CSV, ERROR_COLUMNS, errors)
    write_csv(folder / SKIPPED_CSV, SKIPPED_COLUMNS, set_aside)
    write_isic_csv(folder, bundle, image_rows)
    percent = frozenset({*bundle.classes, "confidence", "malignant_probability"})
    tables = (
        Table("Lesions", lesion_cols, lesions, percent, frozenset({"image_divergence"}),
              {VERDICT_COLUMNS[0]: verdict_choices(bundle.classes)}),
        Table("Images", image_cols, image_rows, percent, frozenset({"member_divergence"})),
        Table("Errors", ERROR_COLUMNS, errors),
        Table("Skipped", SKIPPED_COLUMNS, set_aside),
    )
    write_workbook(folder / WORKBOOK, bundle, tables, run_info, thumbnails, heatmaps)
    if dicom_sr:
        from dermscore.report.dicom_sr import write_dicom_srs  # highdicom only for runs that ask for SRs

        write_dicom_srs(folder / DICOM_SR_FOLDER, bundle, image_rows, lesions, run_info)
    return folder
