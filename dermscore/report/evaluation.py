"""Writers for ``dermscore evaluate``: evaluation.csv, evaluation.xlsx (Evaluation and About sheets) and
evaluation.png, a bar chart of balanced accuracy and malignant sensitivity and specificity per month.

A workbook of its own rather than a sheet in report.xlsx: report.xlsx is the reviewer's working copy (it
may be open, or hold verdicts not yet imported), and every run rewrites it; the evaluation is derived and
can be rewritten at any time. The chart is drawn with Pillow (already a dependency) so evaluation needs no
plotting library.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dermscore.report.csv import write_csv
from dermscore.report.excel import Table, write_evaluation_workbook
from dermscore.report.files import atomic_path
from dermscore.report.run_info import DISCLAIMER

EVALUATION_CSV = "evaluation.csv"
EVALUATION_XLSX = "evaluation.xlsx"
EVALUATION_PNG = "evaluation.png"
KEYS = ("truth", "level", "period")
CHARTED = {"balanced_accuracy": ("balanced accuracy", (31, 119, 180)),
           "malignant_sensitivity": ("malignant sensitivity", (214, 39, 40)),
           "malignant_specificity": ("malignant specificity", (44, 160, 44))}
PANEL_HEIGHT, WIDTH, MARGIN, BAR = 300, 1000, 70, 24


def write_evaluation(folder: Path, rows: Sequence[Mapping[str, Any]], classes: Sequence[str],
                     about: Sequence[tuple[str, Any]]) -> list[Path]:
    """Write the three files into ``folder`` (created), each atomically; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys())
    png = chart(rows, str(dict(about).get("Bundle name", "")) + " " + str(dict(about).get("Bundle version", "")))
    with atomic_path(folder / EVALUATION_PNG) as tmp:
        tmp.write_bytes(png)
    percent = frozenset({"balanced_accuracy", "accuracy", "malignant_threshold", "malignant_sensitivity",
                         "malignant_specificity", *(f"recall_{c}" for c in classes)})
    table = Table("Evaluation", columns, rows, percent, frozenset({"ece", "brier"}))
    return [write_csv(folder / EVALUATION_CSV, columns, rows),
            write_evaluation_workbook(folder / EVALUATION_XLSX, table, about, png), folder / EVALUATION_PNG]


def chart(rows: Sequence[Mapping[str, Any]], model: str) -> bytes:
    """One panel per truth (labels, verdicts): grouped bars per period (all, then each month), as PNG bytes."""
    kinds = list(dict.fromkeys(str(r["truth"]) for r in rows))
    image = Image.new("RGB", (WIDTH, 60 + PANEL_HEIGHT * len(kinds)), "white")
    draw = ImageDraw.Draw(image)
    font, small, tiny = (ImageFont.load_default(size=n) for n in (15, 12, 9))
    draw.text((MARGIN, 10), f"dermscore evaluation: {model}", fill="black", font=font)
    draw.text((MARGIN, 30), DISCLAIMER, fill=(90, 90, 90), font=small)
    x = WIDTH - MARGIN - 3 * 170
    for label, colour in CHARTED.values():
        draw.rectangle((x, 32, x + 12, 44), fill=colour)
        draw.text((x + 16, 30), label, fill="black", font=small)
        x += 170
    for panel, kind in enumerate(kinds):
        _panel(draw, [r for r in rows if r["truth"] == kind], 60 + panel * PANEL_HEIGHT, (font, small, tiny))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(draw: ImageDraw.ImageDraw, rows: Sequence[Mapping[str, Any]], top: int, fonts: tuple[Any, ...]) -> None:
    """One truth's bars; each bar is labelled with its value, so a 0 is told apart from a missing figure."""
    font, small, tiny = fonts
    left, right, y0, y1 = MARGIN, WIDTH - MARGIN, top + 40, top + PANEL_HEIGHT - 50  # y0: value 1, y1: value 0
    draw.text((left, top + 10), f"{rows[0]['truth']} ({rows[0]['level']}s)", fill="black", font=font)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - tick * (y1 - y0)
        draw.line((left, y, right, y), fill=(220, 220, 220))
        draw.text((left - 40, y - 7), f"{tick:.2f}", fill="black", font=small)
    step = (right - left) / len(rows)
    for i, row in enumerate(rows):
        centre = left + step * (i + 0.5)
        for j, key in enumerate(CHARTED):
            value = row.get(key)
            if value is None:
                continue
            x = centre + (j - 1.5) * BAR
            top_y = y1 - value * (y1 - y0)
            draw.rectangle((x, top_y, x + BAR - 2, y1), fill=CHARTED[key][1])
            draw.text((x + (BAR - 2) / 2, top_y - 2), f"{value:.2f}", fill="black", font=tiny, anchor="md")
        for k, text in enumerate((str(row["period"]), f"n={row['n']}")):
            width = draw.textlength(text, font=small)
            draw.text((centre - width / 2, y1 + 6 + 15 * k), text, fill="black", font=small)
