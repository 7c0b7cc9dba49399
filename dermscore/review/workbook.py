"""A report workbook read back: its Run sheet's items and its Lesions sheet, columns found by header name.

By header, never by position: a reviewer may move, hide or add columns, and another writer (LibreOffice
Calc, Excel) re-saves the file its own way. Both ``dermscore review import`` and ``dermscore evaluate``
start here, so they read the same things the same way.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import load_workbook
from openpyxl.utils.exceptions import InvalidFileException

from dermscore.errors import UsageError
from dermscore.ledger import default_ledger_path
from dermscore.report.excel import (PSEUDONYMIZED_YES, RUN_CLASSES, RUN_IDENTITY, RUN_LEDGER, RUN_MALIGNANT_CLASSES,
                                    RUN_PSEUDONYMIZED, THRESHOLD_LABELS)
from dermscore.report.write import WORKBOOK

LESIONS_SHEET = "Lesions"
RUN_SHEET = "Run"


@dataclass(frozen=True)
class ReportBook:
    """What a report workbook says about itself (Run sheet) and its Lesions sheet's cells."""

    path: Path
    run: dict[str, Any]  # Run sheet item -> value
    header: dict[str, int]  # Lesions column name -> 0-based position
    rows: list[tuple[int, tuple[Any, ...]]]  # (sheet row number, cell values) of each Lesions data row

    def item(self, label: str) -> Any:
        """A Run sheet item that must be there (reports older than the review loop lack some)."""
        value = self.run.get(label)
        if value in (None, ""):
            raise UsageError(f"{self.path}: the Run sheet has no {label!r}; it was written by an older dermscore. "
                             "Regenerate the report with `dermscore run` (same inputs and --out) and use the new one.")
        return value

    @property
    def identity(self) -> str:
        return str(self.item(RUN_IDENTITY))

    @property
    def classes(self) -> tuple[str, ...]:
        return _codes(self.item(RUN_CLASSES))

    @property
    def malignant_classes(self) -> tuple[str, ...]:
        return _codes(self.item(RUN_MALIGNANT_CLASSES))

    @property
    def malignant_threshold(self) -> float:
        return float(self.item(THRESHOLD_LABELS["malignant"][0]))

    @property
    def pseudonymized(self) -> bool:
        return self.run.get(RUN_PSEUDONYMIZED) == PSEUDONYMIZED_YES

    def find_ledger(self, explicit: Path | None = None) -> Path:
        """The ledger this report came from: ``explicit``, else the Run sheet's, else ``ledger.sqlite`` in the
        report's folder or the one above it (a run writes into ``OUT/<time>/`` when OUT held reports)."""
        if explicit is not None:
            if not Path(explicit).is_file():
                raise UsageError(f"--ledger {explicit}: no such file.")
            return Path(explicit)
        recorded = self.run.get(RUN_LEDGER)
        candidates = ([Path(recorded)] if recorded else []) + [
            default_ledger_path(self.path.parent), default_ledger_path(self.path.parent.parent)]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise UsageError(f"cannot find the ledger {self.path} came from (looked for "
                         f"{', '.join(map(str, candidates))}); pass --ledger PATH.")


def _codes(text: Any) -> tuple[str, ...]:
    return tuple(code.strip() for code in str(text).split(",") if code.strip())


def read_report(path: Path) -> ReportBook:
    """Read ``path`` (a report.xlsx, or the folder holding one); UsageError if it is not a dermscore report."""
    path = Path(path)
    if path.is_dir():
        path = path / WORKBOOK
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file.") from None
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise UsageError(f"{path} cannot be read as an .xlsx workbook ({exc}); save it as .xlsx and try again.") from exc
    try:
        missing = [name for name in (LESIONS_SHEET, RUN_SHEET) if name not in book.sheetnames]
        if missing:
            raise UsageError(f"{path} is not a dermscore report: it has no {' or '.join(missing)} sheet.")
        run = {row[0]: row[1] for row in _rows(book[RUN_SHEET]) if len(row) > 1 and row[0] is not None}
        lesions = _rows(book[LESIONS_SHEET])
    finally:
        book.close()
    header = {str(name).strip(): i for i, name in enumerate(lesions[0] if lesions else ()) if name is not None}
    rows = [(number, values) for number, values in enumerate(lesions[1:], start=2) if any(v not in (None, "") for v in values)]
    return ReportBook(path, run, header, rows)


def _rows(sheet: Any) -> list[tuple[Any, ...]]:
    """Every row's values; the recorded dimensions are ignored, since some writers get them wrong."""
    sheet.reset_dimensions()
    return [tuple(row) for row in sheet.iter_rows(values_only=True)]
