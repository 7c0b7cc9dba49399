"""One scoring run: wire discover -> decode -> preprocess -> infer -> aggregate -> report.

A library function (no CLI framework here) so scheduled jobs, tests and other engines call the same code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dermscore.aggregate import image_row
from dermscore.bundle import Bundle, load_bundle
from dermscore.discover import discover
from dermscore.errors import UsageError
from dermscore.infer import DEFAULT_BATCH_SIZE, Predictor, score
from dermscore.records import Failure
from dermscore.report.csv import write_csv

ERROR_COLUMNS = ("source", "stage", "reason")


def image_columns(bundle: Bundle) -> list[str]:
    return ["source", "frame", "sha256", *bundle.classes, "predicted_class", "confidence",
            "malignant_probability", "bundle_name", "bundle_version"]


def error_row(failure: Failure) -> dict[str, str]:
    return {"source": failure.location, "stage": failure.stage, "reason": failure.reason}


@dataclass
class RunOptions:
    inputs: list[Path]
    out: Path
    model: str | Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool | None = None  # None: only when stderr is a terminal


@dataclass
class RunSummary:
    bundle: Bundle
    out: Path
    scored: int = 0
    failures: list[Failure] = field(default_factory=list)


def run(options: RunOptions) -> RunSummary:
    if not options.inputs:
        raise UsageError("Give at least one input folder or file, e.g. `dermscore run examples/`.")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}.")
    bundle = load_bundle(options.model)
    options.out.mkdir(parents=True, exist_ok=True)
    sources = list(discover(options.inputs))
    predictor = Predictor(bundle, options.batch_size)
    summary = RunSummary(bundle=bundle, out=options.out)
    rows = []
    show = sys.stderr.isatty() if options.progress is None else options.progress
    with tqdm(total=len(sources), unit="image", disable=not show, desc="scoring") as bar:
        for result in score(sources, predictor):
            if isinstance(result, Failure):
                summary.failures.append(result)
            else:
                rows.append(image_row(result, bundle))
            bar.update(1)
    summary.scored = len(rows)
    write_csv(options.out / "images.csv", image_columns(bundle), rows)
    write_csv(options.out / "errors.csv", ERROR_COLUMNS, (error_row(f) for f in summary.failures))
    return summary
