"""``report.xlsx`` for review in Excel or LibreOffice: Summary, Lesions, Images, Errors, Skipped and Run sheets.

Written in openpyxl's streaming (write-only) mode so a large run does not hold a cell object per value.
Every text cell is formula-neutralised and stored as a string cell (see ``safety``); probabilities are
numbers shown as percentages, so sorting and filtering work on the values.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.drawing.image import Image as XLImage
from openpyxl.formatting.rule import FormulaRule
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.datavalidation import DataValidation
from openpyxl.worksheet._write_only import WriteOnlyWorksheet

from dermscore.aggregate import FLAG_MALIGNANT, FLAG_REVIEW, POOR_QUALITY, SEPARATOR, Thresholds
from dermscore.bundle import Bundle
from dermscore.report.files import atomic_path
from dermscore.report.run_info import DISCLAIMER, RunInfo
from dermscore.report.safety import neutralise
from dermscore.report.thumbnail import THUMBNAIL_PIXELS

PERCENT = "0.0%"
DIVERGENCE = "0.000"
DURATION = "[h]:mm:ss"
MAX_WIDTH = 50
MIN_WIDTH = 6  # characters; narrower columns hide the filter button's label
HASH_WIDTH = 18  # a hash prefix is enough to tell files apart on screen; the cell holds all of it
LINE_HEIGHT = 15  # points per line of wrapped text
RUN_VALUE_WIDTH = 90
WIDTH_SAMPLE = 2000  # rows looked at to size columns; enough to be representative, cheap on big runs
THUMBNAIL_COLUMN = "thumbnail"
HEATMAP_THUMBNAIL_COLUMN = "heatmap"
THUMBNAIL_ROW_HEIGHT = THUMBNAIL_PIXELS * 0.75 + 4  # points; 1 px = 0.75 pt at 96 dpi
HEADER_FONT = Font(bold=True)
HEADER_FILL = PatternFill("solid", start_color="DDE3EA", end_color="DDE3EA")
MALIGNANT_FILL = PatternFill("solid", start_color="F4B6B6", end_color="F4B6B6")
REVIEW_FILL = PatternFill("solid", start_color="FFE699", end_color="FFE699")
TITLE_FONT = Font(bold=True, size=14)
WRAP = Alignment(wrap_text=True, vertical="top")
CLASS_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


@dataclass(frozen=True)
class Table:
    """One data sheet: columns in report order and how to show them."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Mapping[str, Any]]
    percent: frozenset[str] = frozenset()
    decimals: frozenset[str] = frozenset()
    # column -> the values a drop-down offers (Excel and LibreOffice refuse others when typed in the cell)
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)


def _text(value: str) -> str:
    """Formula-neutralised text without the control characters XML 1.0 cannot hold (openpyxl refuses them)."""
    return ILLEGAL_CHARACTERS_RE.sub("\ufffd", neutralise(value))


def _sheet(wb: Workbook, title: str) -> WriteOnlyWorksheet:
    """A new sheet that prints landscape, one page wide, so a PDF or paper copy stays readable."""
    ws = wb.create_sheet(title)
    ws.page_setup.orientation = "landscape"
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    return ws


def _cell(ws: WriteOnlyWorksheet, value: Any, number_format: str | None = None) -> WriteOnlyCell | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        cell = WriteOnlyCell(ws, _text(value))
        cell.data_type = "s"  # a string cell is never evaluated, whatever it starts with
        return cell
    cell = WriteOnlyCell(ws, value)
    if number_format and isinstance(value, int | float):
        cell.number_format = number_format
    return cell


def _header(ws: WriteOnlyWorksheet, labels: Sequence[str]) -> list[WriteOnlyCell]:
    cells = []
    for label in labels:
        cell = WriteOnlyCell(ws, label)
        cell.font = HEADER_FONT
        cell.fill = HEADER_FILL
        cells.append(cell)
    return cells


def _width(column: str, table: Table) -> float:
    if column in table.percent or column in table.decimals:
        return max(len(column) + 2, 9)
    if column == "sha256":
        return HASH_WIDTH
    longest = max((len(str(r.get(column) or "")) for r in table.rows[:WIDTH_SAMPLE]), default=0)
    return min(max(len(column), longest, MIN_WIDTH) + 2, MAX_WIDTH)


def _highlight(ws: WriteOnlyWorksheet, columns: Sequence[str], n_rows: int, thresholds: Thresholds) -> None:
    """Whole rows: red over the malignant threshold, amber for low confidence or a review flag."""
    if n_rows == 0:
        return
    letter = {c: get_column_letter(i + 1) for i, c in enumerate(columns)}
    area = f"A2:{get_column_letter(len(columns))}{n_rows + 1}"
    malignant, confidence, flags = letter["malignant_probability"], letter["confidence"], letter["flags"]
    ws.conditional_formatting.add(area, FormulaRule(formula=[f"${malignant}2>={thresholds.malignant!r}"],
                                                    fill=MALIGNANT_FILL))
    review = f'OR(${confidence}2<{thresholds.review!r},ISNUMBER(SEARCH("{FLAG_REVIEW}",${flags}2)))'
    ws.conditional_formatting.add(area, FormulaRule(formula=[review], fill=REVIEW_FILL))


def _drop_downs(ws: WriteOnlyWorksheet, columns: Sequence[str], table: Table) -> None:
    """A list validation over each data cell of the columns in ``table.choices``.

    The list is written inline (``"a,b,c"``), which Excel limits to 255 characters: ample for class codes.
    """
    for column, values in table.choices.items():
        if column not in columns or not table.rows:
            continue
        letter = get_column_letter(columns.index(column) + 1)
        validation = DataValidation(type="list", formula1='"' + ",".join(values) + '"', allow_blank=True,
                                    showErrorMessage=True, errorTitle=column,
                                    error=f"Choose one of: {', '.join(values)}")
        validation.add(f"{letter}2:{letter}{len(table.rows) + 1}")
        ws.data_validations.append(validation)


def _table_sheet(
    wb: Workbook, table: Table, thresholds: Thresholds | None = None,
    pictures: Mapping[str, Sequence[bytes | None]] | None = None,
) -> WriteOnlyWorksheet:
    """A sheet with a frozen, filterable header; ``pictures`` (column name -> one PNG or None per row) adds
    picture columns first, in its order."""
    ws = _sheet(wb, table.title)
    pictures = {name: column for name, column in (pictures or {}).items() if column}
    columns = list(pictures) + list(table.columns)
    for i, column in enumerate(columns, start=1):
        width = THUMBNAIL_PIXELS / 7 + 2 if column in pictures else _width(column, table)
        ws.column_dimensions[get_column_letter(i)].width = width
    ws.freeze_panes = "A2"
    ws.auto_filter.ref = f"A1:{get_column_letter(len(columns))}{len(table.rows) + 1}"
    if thresholds is not None:
        _highlight(ws, columns, len(table.rows), thresholds)
    _drop_downs(ws, columns, table)
    ws.append(_header(ws, columns))
    for index, row in enumerate(table.rows):
        cells: list[WriteOnlyCell | None] = [None] * len(pictures)
        for column in table.columns:
            fmt = PERCENT if column in table.percent else DIVERGENCE if column in table.decimals else None
            cells.append(_cell(ws, row.get(column), fmt))
        for position, column in enumerate(pictures.values(), start=1):
            if column[index]:
                ws.row_dimensions[index + 2].height = THUMBNAIL_ROW_HEIGHT  # before append: rows stream out
                picture = XLImage(io.BytesIO(column[index]))
                picture.anchor = f"{get_column_letter(position)}{index + 2}"
                ws.add_image(picture)
        ws.append(cells)
    return ws


def _count(rows: Sequence[Mapping[str, Any]], key: str, value: str) -> int:
    return sum(1 for r in rows if r.get(key) == value)


def _flagged(rows: Sequence[Mapping[str, Any]], flag: str) -> int:
    return sum(1 for r in rows if flag in str(r.get("flags") or "").split(SEPARATOR))


def _with_reason(rows: Sequence[Mapping[str, Any]], reason: str) -> int:
    return sum(1 for r in rows if reason in str(r.get("review_reasons") or "").split(SEPARATOR))


def _summary_sheet(
    wb: Workbook, bundle: Bundle, images: Table, lesions: Table, errors: Table, skipped: Table, info: RunInfo
) -> None:
    ws = _sheet(wb, "Summary")
    for letter, width in zip("ABCD", (34, 14, 14, 48)):
        ws.column_dimensions[letter].width = width
    title = WriteOnlyCell(ws, "dermscore report")
    title.font = TITLE_FONT
    ws.append([title])
    ws.append([_cell(ws, DISCLAIMER)])
    ws.append([])
    facts: list[tuple[str, Any, str | None]] = [
        ("Images scored", len(images.rows), None),
        ("Lesions", len(lesions.rows), None),
        ("Lesions flagged (malignant or review)", sum(1 for r in lesions.rows if r.get("flags")), None),
        ("Lesions flagged malignant", _flagged(lesions.rows, FLAG_MALIGNANT), None),
        ("Lesions flagged for review", _flagged(lesions.rows, FLAG_REVIEW), None),
        ("Images flagged (malignant or review)", sum(1 for r in images.rows if r.get("flags")), None),
        ("Images of poor quality (review reason poor-quality)", _with_reason(images.rows, POOR_QUALITY), None),
        ("Inputs that failed (see Errors)", len(errors.rows), None),
        ("DICOM objects not scored (see Skipped)", len(skipped.rows), None),
        ("Run time", info.seconds / 86400.0, DURATION),
        ("Started (UTC)", _iso(info.started), None),
        ("Bundle", f"{bundle.name} {bundle.version}", None),
        ("Malignant threshold", info.thresholds.for_bundle(bundle).malignant, PERCENT),
        ("Review below confidence", info.thresholds.for_bundle(bundle).review, PERCENT),
    ]
    for label, value, fmt in facts:
        ws.append([_cell(ws, label), _cell(ws, value, fmt)])
    ws.append([])
    ws.append(_header(ws, ["Predicted class", "Lesions", "Images", "Class"]))
    for code in bundle.classes:
        ws.append([_cell(ws, code), _count(lesions.rows, "predicted_class", code),
                   _count(images.rows, "predicted_class", code), _cell(ws, CLASS_NAMES.get(code, ""))])


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Run sheet items that `dermscore review import` and `dermscore evaluate` read back (dermscore.review).
RUN_IDENTITY = "Bundle identity"
RUN_CLASSES = "Classes"
RUN_MALIGNANT_CLASSES = "Malignant classes"
RUN_LEDGER = "Ledger"
RUN_PSEUDONYMIZED = "Patient identifiers pseudonymised"
PSEUDONYMIZED_YES = "yes (HMAC-SHA256)"

THRESHOLD_LABELS = {
    "malignant": ("Malignant threshold (malignant flag)", PERCENT),
    "review": ("Review threshold (top probability below)", PERCENT),
    "disagreement": ("Disagreement threshold (Jensen-Shannon, bits)", DIVERGENCE),
    "ood": ("Out-of-distribution threshold (ood_score above)", DIVERGENCE),
}
SOURCE_WORDS = {"run": "set for this run", "bundle": "the bundle's operating point", "default": "default"}
OPERATING_FIGURES = {  # the bundle's test figures for its operating points (training/operating_points.py)
    "sensitivity": "Bundle test: malignant sensitivity at its threshold",
    "specificity": "Bundle test: malignant specificity at its threshold",
    "share_flagged": "Bundle test: share of images flagged for review",
    "errors_caught": "Bundle test: share of wrong predictions flagged for review",
    "ood_share_flagged": "Bundle test: share of dermoscopic images flagged out-of-distribution",
}


def _threshold_items(bundle: Bundle, info: RunInfo) -> list[tuple[str, Any, str | None]]:
    """Each threshold as applied, where it came from, calibration, and the bundle's test figures."""
    applied = info.thresholds.for_bundle(bundle)
    items: list[tuple[str, Any, str | None]] = []
    for name, (label, fmt) in THRESHOLD_LABELS.items():
        value = getattr(applied, name)
        if value is not None:
            source = SOURCE_WORDS.get(info.threshold_sources.get(name, ""), "not recorded")
            items += [(label, value, fmt), (f"{label.split(' (')[0]} from", source, None)]
    calibration = bundle.calibration
    items.append(("Calibration", "none (uncalibrated ensemble probabilities)" if calibration is None else
                  f"{calibration.method}, T = {', '.join(f'{t:.3f}' for t in calibration.temperatures)}", None))
    figures = bundle.operating_points.test_figures
    items += [(label, figures[key], PERCENT) for key, label in OPERATING_FIGURES.items() if key in figures]
    return items


def _run_sheet(wb: Workbook, bundle: Bundle, info: RunInfo) -> None:
    items: list[tuple[str, Any, str | None]] = [
        ("Statement", DISCLAIMER, None),
        ("dermscore version", info.tool_version, None),
        ("Bundle name", bundle.name, None),
        ("Bundle version", bundle.version, None),
        (RUN_IDENTITY, bundle.identity, None),
        ("Bundle path", str(Path(bundle.path).resolve()), None),
        *((f"Weights sha256 ({m.name}, {m.architecture})", m.sha256, None) for m in bundle.members),
        (RUN_CLASSES, ", ".join(bundle.classes), None),
        (RUN_MALIGNANT_CLASSES, ", ".join(bundle.malignant_classes), None),
        ("Intended use", bundle.intended_use, None),
        ("TensorFlow version", info.tensorflow_version, None),
        ("Keras version", info.keras_version, None),
        ("Device", info.device, None),
        ("Inference", info.inference, None),
        ("Command line", info.command_line, None),
        *((f"Input root {i}", root, None) for i, root in enumerate(info.inputs, start=1)),
        *(("Lesion identity from", source, None) for source in info.lesion_maps),
        ("Started (UTC)", _iso(info.started), None),
        ("Finished (UTC)", _iso(info.finished), None),
        ("Run time (seconds)", round(info.seconds, 3), None),
        *_threshold_items(bundle, info),
        (RUN_PSEUDONYMIZED, PSEUDONYMIZED_YES if info.pseudonymized else "no", None),
        (RUN_LEDGER, info.ledger, None),
    ]
    _items_sheet(wb, "Run", items)


def _items_sheet(wb: Workbook, title: str, items: Sequence[tuple[str, Any, str | None]]) -> None:
    """A two-column sheet of (item, value), long values wrapped."""
    ws = _sheet(wb, title)
    ws.column_dimensions["A"].width = 36
    ws.column_dimensions["B"].width = RUN_VALUE_WIDTH
    ws.freeze_panes = "A2"
    ws.append(_header(ws, ["Item", "Value"]))
    for row, (label, value, fmt) in enumerate(items, start=2):
        cell = _cell(ws, value, fmt)
        if isinstance(value, str) and len(value) > RUN_VALUE_WIDTH:
            cell.alignment = WRAP
            ws.row_dimensions[row].height = LINE_HEIGHT * -(-len(value) // RUN_VALUE_WIDTH)
        ws.append([_cell(ws, label), cell])


def write_workbook(
    path: Path,
    bundle: Bundle,
    tables: tuple[Table, Table, Table, Table],
    info: RunInfo,
    thumbnails: Mapping[str, bytes] | None = None,
    heatmaps: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``tables`` = (lesions, images, errors, skipped) and the Summary and Run sheets, atomically.

    ``thumbnails`` and ``heatmaps`` map lesion id -> PNG bytes; given, the Lesions sheet gets a picture
    column for each, the heatmap beside the lesion's picture.
    """
    lesions, images, errors, skipped = tables
    wb = Workbook(write_only=True)
    _summary_sheet(wb, bundle, images, lesions, errors, skipped, info)
    pictures = {column: [given.get(str(r["lesion_id"])) for r in lesions.rows]
                for column, given in ((THUMBNAIL_COLUMN, thumbnails), (HEATMAP_THUMBNAIL_COLUMN, heatmaps)) if given}
    applied = info.thresholds.for_bundle(bundle)
    _table_sheet(wb, lesions, applied, pictures)
    _table_sheet(wb, images, applied)
    _table_sheet(wb, errors)
    _table_sheet(wb, skipped)
    _run_sheet(wb, bundle, info)
    with atomic_path(Path(path)) as tmp:
        wb.save(tmp)
    return Path(path)


def write_evaluation_workbook(path: Path, table: Table, about: Sequence[tuple[str, Any]], chart: bytes) -> Path:
    """``dermscore evaluate``'s workbook: the figures (``table``) with the chart below them, and an About
    sheet saying what was compared and which model scored it (``about``), atomically."""
    wb = Workbook(write_only=True)
    ws = _table_sheet(wb, table)
    picture = XLImage(io.BytesIO(chart))
    picture.anchor = f"A{len(table.rows) + 3}"
    ws.add_image(picture)
    _items_sheet(wb, "About", [(label, value, None) for label, value in about])
    with atomic_path(Path(path)) as tmp:
        wb.save(tmp)
    return Path(path)
