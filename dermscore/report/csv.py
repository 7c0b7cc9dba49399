"""CSV reports: UTF-8 with a header, stable column order, formula-safe text, written atomically."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dermscore.report.files import atomic_path
from dermscore.report.safety import neutralise


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (extra keys ignored, None as empty) so a reader never sees half a report."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else neutralise(row.get(k))) for k in columns})
    return path
