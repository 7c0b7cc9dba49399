"""``dermscore evaluate``: the ensemble's local performance against reviewer verdicts and/or a labels CSV.

Reads what the reviewer saw (the report's images.csv and lesions.csv, never recomputing a score) and what
the ledger knows (when each image was scored, the latest verdicts), then computes ``dermscore.evaluate``'s
figures overall and per calendar month of scoring (UTC), so a clinic sees drift:

* labels (HAM10000-style CSV, ``image_id,dx``): per image, matched by the file stem of ``source`` (as
  ``isic.csv`` names images); images without a label are left out and counted;
* verdicts: per lesion, the latest ``reviewer_class`` of each lesion of the report's bundle; a lesion's
  month is the latest month one of its images was scored in.

The malignant threshold is the one the report applied (its Run sheet), so sensitivity and specificity are
those of the ``malignant`` flag the reviewer saw.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dermscore.errors import UsageError
from dermscore.evaluate import summarise
from dermscore.ledger import open_ledger
from dermscore.report.evaluation import write_evaluation
from dermscore.report.excel import RUN_IDENTITY
from dermscore.report.isic import stem
from dermscore.report.run_info import DISCLAIMER
from dermscore.report.safety import restore
from dermscore.report.write import IMAGES_CSV, LESIONS_CSV
from dermscore.review.workbook import ReportBook, read_report

LABELS = "labels"
VERDICTS = "verdicts"
ALL = "all"
UNKNOWN_MONTH = "unknown"  # an image the ledger no longer holds (rescored since the report was written)


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]  # one per (truth, period): evaluation.csv
    files: list[Path] = field(default_factory=list)
    unlabelled: int = 0  # image rows without a label (with a labels CSV)
    unreviewed: int = 0  # lesion rows without a reviewer_class (with verdicts)


def evaluate_report(
    report: Path,
    labels: Path | None = None,
    verdicts: bool = True,
    ledger: Path | None = None,
    out: Path | None = None,
    wait: float = 0.0,
) -> Evaluation:
    """Compare ``report`` (report.xlsx or its folder) with ``labels`` and/or the ledger's verdicts; write
    evaluation.csv, evaluation.xlsx and evaluation.png into ``out`` (default: the report's folder)."""
    if labels is None and not verdicts:
        raise UsageError("nothing to compare with: give --labels CSV, or leave --verdicts on.")
    book = read_report(report)
    folder = book.path.parent
    images, lesions = _read_rows(folder / IMAGES_CSV), _read_rows(folder / LESIONS_CSV)
    ledger_path = book.find_ledger(ledger)
    with open_ledger(ledger_path, wait) as opened:
        times = opened.scoring_times(book.identity)
        latest = opened.latest_verdicts(book.identity) if verdicts else {}
    months = [_month(times.get((row["source"], int(row["frame"]) if row["frame"] else None))) for row in images]
    result = Evaluation(rows=[])
    if labels is not None:
        truth_of = read_labels(labels, book.classes)
        truth = [truth_of.get(stem(row["source"])) for row in images]
        result.unlabelled = truth.count(None)
        result.rows += _figures(LABELS, "image", images, truth, months, book)
    if verdicts:
        lesion_months: dict[str, str] = {}
        for row, month in zip(images, months):
            if month != UNKNOWN_MONTH:
                lesion_months[row["lesion_id"]] = max(lesion_months.get(row["lesion_id"], month), month)
        truth = [latest[row["lesion_id"]].reviewer_class if row["lesion_id"] in latest else None for row in lesions]
        result.unreviewed = truth.count(None)
        result.rows += _figures(VERDICTS, "lesion", lesions, truth,
                                [lesion_months.get(row["lesion_id"], UNKNOWN_MONTH) for row in lesions], book)
    if not result.rows:
        raise UsageError(f"nothing to evaluate in {book.path}: no image has a label"
                         + (" and no lesion has a reviewer verdict" if verdicts else "")
                         + " (import verdicts with `dermscore review import`, or check the labels' image_id).")
    about = _about(book, ledger_path, labels, verdicts)
    result.files = write_evaluation(Path(out) if out else folder, result.rows, book.classes, about)
    return result


def _figures(kind: str, level: str, rows: list[dict[str, str]], truth: list[str | None], months: list[str],
             book: ReportBook) -> list[dict[str, Any]]:
    """One row of figures over every case with a truth, then one per month."""
    cases = [i for i, t in enumerate(truth) if t is not None]
    if not cases:
        return []
    periods = {ALL: cases}
    for i in cases:
        periods.setdefault(months[i], []).append(i)
    out = []
    for period in [ALL, *sorted(p for p in periods if p != ALL)]:
        chosen = [rows[i] for i in periods[period]]
        figures = summarise(
            np.array([truth[i] for i in periods[period]], dtype=object),
            np.array([r["predicted_class"] for r in chosen], dtype=object),
            np.array([[float(r[c]) for c in book.classes] for r in chosen]).reshape(len(chosen), len(book.classes)),
            np.array([float(r["confidence"]) for r in chosen]),
            np.array([float(r["malignant_probability"]) for r in chosen]),
            book.classes, book.malignant_classes, book.malignant_threshold)
        out.append({"truth": kind, "level": level, "period": period,
                    **{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}})
    return out


def read_labels(path: Path, classes: tuple[str, ...]) -> dict[str, str]:
    """image_id -> dx from a HAM10000-style CSV; UsageError naming the line of a class the bundle lacks."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not {"image_id", "dx"} <= set(reader.fieldnames or ()):
                raise UsageError(f"--labels {path}: needs the columns image_id and dx (HAM10000 metadata style), "
                                 f"found {', '.join(reader.fieldnames or ()) or 'none'}.")
            labels = {}
            for line, row in enumerate(reader, start=2):
                dx = (row["dx"] or "").strip()
                if dx not in classes:
                    raise UsageError(f"--labels {path}, line {line}: dx {dx!r} is not one of the bundle's classes "
                                     f"({', '.join(classes)}).")
                labels[(row["image_id"] or "").strip()] = dx
    except OSError as exc:
        raise UsageError(f"--labels {path}: cannot read it ({exc.strerror or exc}).") from exc
    return labels


def _read_rows(path: Path) -> list[dict[str, str]]:
    """A report CSV's rows as text, with the quote before formula-like text removed (as the ledger holds it)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [{k: restore(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the report's CSV ({exc.strerror or exc}); evaluate reads the "
                         "CSV files beside report.xlsx, so keep them together.") from exc


def _month(scored_at: str | None) -> str:
    return scored_at[:7] if scored_at else UNKNOWN_MONTH


def _about(book: ReportBook, ledger: Path, labels: Path | None, verdicts: bool) -> list[tuple[str, Any]]:
    """What the evaluation compared, with the model that scored it, for the workbook's About sheet."""
    model = [(label, value) for label, value in book.run.items()
             if label in ("Bundle name", "Bundle version", RUN_IDENTITY) or str(label).startswith("Weights sha256")]
    return [("Statement", DISCLAIMER), *model,
            ("Report", str(book.path.resolve())), ("Ledger", str(Path(ledger).resolve())),
            ("Labels", str(Path(labels).resolve()) if labels else "none"),
            ("Reviewer verdicts", "latest per lesion, from the ledger" if verdicts else "not used"),
            ("Malignant threshold (the report's)", book.malignant_threshold),
            ("Evaluated (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
            ("Excluded", "truths not-a-lesion and unsure are counted in their columns and left out of every figure"),
            ("Figures", "balanced accuracy = mean recall over the classes present; ECE over 15 equal-width bins of "
                        "confidence; Brier = mean squared distance of the class probabilities to the one-hot truth")]
