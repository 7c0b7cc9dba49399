"""``dermscore review import``: reviewer verdicts from a report's Lesions sheet into the run ledger.

A reviewer writes ``reviewer_class`` (a drop-down: the bundle's classes, ``not-a-lesion``, ``unsure``),
``reviewer`` and ``reviewer_note`` in report.xlsx, in Excel or LibreOffice Calc. Importing reads those
columns back by header name and stores them under the lesion id and the bundle identity that scored it
(the Run sheet says which), in the ledger the report came from.

* All or nothing: every cell is checked first; one unknown value refuses the whole file, naming each bad
  cell (``Lesions!K7: 'melanoma?' is not one of akiec, ...``), and nothing is stored.
* History: a verdict is stored only when it differs from the lesion's latest, with the time of import;
  re-importing a file changes nothing. A row left blank is no verdict (it never erases one: an old report
  without the latest verdicts must not wipe them); to withdraw a verdict, choose ``unsure``.
* Pseudonymised reports are refused: their lesion ids are keyed hashes, not the lesion ids verdicts are kept
  under, and reviewer notes may identify the patient, so they must not travel with a pseudonymised report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl.cell.cell import ERROR_CODES
from openpyxl.utils import get_column_letter

from dermscore.errors import UsageError
from dermscore.ledger import open_ledger
from dermscore.records import VERDICT_COLUMNS, Verdict, verdict_choices
from dermscore.report.safety import restore
from dermscore.review.workbook import LESIONS_SHEET, ReportBook, read_report

LESION_COLUMN = "lesion_id"
MAX_LISTED = 20  # bad cells named in one message; the count says how many more


@dataclass(frozen=True)
class ImportSummary:
    report: Path
    ledger: Path
    bundle_identity: str
    new: int  # lesions that had no verdict before
    changed: int  # lesions whose verdict changed (the old one stays in the history)
    unchanged: int  # verdicts equal to the lesion's latest: nothing stored


def import_verdicts(report: Path, ledger: Path | None = None, wait: float = 0.0) -> ImportSummary:
    """Store the verdicts of ``report`` (a report.xlsx as dermscore, Excel or LibreOffice saved it) in its ledger.

    ``ledger``: the ledger to use instead of the one the report names (``ReportBook.find_ledger``);
    ``wait``: seconds to wait for a run holding the ledger.
    """
    book = read_report(report)
    if book.pseudonymized:
        raise UsageError(
            f"{book.path} is pseudonymised (Run sheet): its lesion ids are keyed hashes, not the lesion ids "
            "verdicts are kept under, and reviewer notes must not travel with pseudonymised reports. Review the "
            "report a run over the same ledger writes without --pseudonymize, and import that one."
        )
    verdicts = read_verdicts(book)
    ledger_path = book.find_ledger(ledger)
    with open_ledger(ledger_path, wait) as opened:
        if not opened.has_bundle(book.identity):
            raise UsageError(f"the ledger {ledger_path} holds no run of the bundle that scored {book.path} "
                             f"({book.identity}); pass the ledger that report came from with --ledger PATH.")
        new, changed, unchanged = opened.record_verdicts(book.identity, verdicts, str(book.path.resolve()))
    return ImportSummary(book.path, ledger_path, book.identity, new, changed, unchanged)


def read_verdicts(book: ReportBook) -> list[Verdict]:
    """Every verdict in the Lesions sheet; UsageError naming every bad cell (sheet, cell, value) otherwise."""
    missing = [name for name in (LESION_COLUMN, *VERDICT_COLUMNS) if name not in book.header]
    if missing:
        raise UsageError(f"{book.path}: the {LESIONS_SHEET} sheet has no {', '.join(missing)} column; it was written "
                         "by an older dermscore. Regenerate the report with `dermscore run` and review the new one.")
    choices = verdict_choices(book.classes)
    canonical = {choice.casefold(): choice for choice in choices}
    problems: list[str] = []
    verdicts: dict[str, tuple[int, Verdict]] = {}

    def cell(name: str, row: int) -> str:
        return f"{LESIONS_SHEET}!{get_column_letter(book.header[name] + 1)}{row}"

    for row, values in book.rows:
        given = {name: _text(values, book.header[name]) for name in VERDICT_COLUMNS}
        if not any(given.values()):
            continue
        found = [f"{cell(name, row)}: {text!r} is a formula's error, not a verdict; type the text again (in a note, "
                 "start it with ' to keep it from being read as a formula)"
                 for name, text in given.items() if text in ERROR_CODES]
        lesion = _text(values, book.header[LESION_COLUMN])
        if lesion is None:
            found.append(f"{cell(LESION_COLUMN, row)}: empty, but the row has a verdict; put it back or clear the row")
        chosen = given["reviewer_class"]
        if chosen is not None and chosen.casefold() not in canonical and chosen not in ERROR_CODES:
            found.append(f"{cell('reviewer_class', row)}: {chosen!r} is not one of {', '.join(choices)}")
        problems += found
        if found or lesion is None:
            continue
        verdict = Verdict(lesion, canonical[chosen.casefold()] if chosen else None, given["reviewer"],
                          given["reviewer_note"])
        first = verdicts.setdefault(lesion, (row, verdict))
        if first[1] != verdict:
            problems.append(f"{cell(LESION_COLUMN, row)}: lesion {lesion!r} is also on row {first[0]} with another "
                            "verdict; keep one")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UsageError(f"{book.path}: {len(problems)} bad cell(s), so nothing was imported:\n  "
                         f"{listed}{more}\nCorrect them (the reviewer_class drop-down lists the allowed values) and "
                         "import the file again.")
    return [verdict for _, verdict in verdicts.values()]


def _text(values: tuple[Any, ...], position: int) -> str | None:
    """A cell as the text it shows, stripped, without the quote reports put before formula-like text; None if empty."""
    value = values[position] if position < len(values) else None
    if value is None:
        return None
    text = restore(str(value).strip())
    return text or None
