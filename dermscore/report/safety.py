"""Spreadsheet safety: text from input data must never be read as a formula when a report is opened.

File names, DICOM attributes and lesion ids come from outside. A cell that starts with ``=``, ``+``,
``-``, ``@``, tab or carriage return (or their full-width forms, which some Excel locales also accept) is
prefixed with a single quote (the OWASP "CSV injection" advice), in CSV and XLSX alike; the XLSX writer
also stores every text cell as a string cell, never a formula.
"""

from __future__ import annotations

from typing import Any

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def neutralise(value: Any) -> Any:
    """Quote-prefix a string a spreadsheet would evaluate; any other value is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def restore(value: Any) -> Any:
    """Undo ``neutralise``: a value read back from a report, as it was before the quote was added."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith(FORMULA_PREFIXES):
        return value[1:]
    return value
