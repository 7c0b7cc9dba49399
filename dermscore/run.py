"""One scoring run: wire discover -> decode -> preprocess -> infer -> aggregate -> report.

A library function (no CLI framework here) so scheduled jobs, tests and other engines call the same code.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from dermscore.aggregate import Thresholds, image_row
from dermscore.bundle import Bundle, load_bundle
from dermscore.discover import discover
from dermscore.errors import UsageError
from dermscore.infer import Predictor, score
from dermscore.lesion_map import read_lesion_maps
from dermscore.records import Failure
from dermscore.runtime import Runtime, configure, default_batch_size
from dermscore.report.pseudonymize import load_key, pseudonymize_row
from dermscore.report.run_info import RunInfo, environment
from dermscore.report.write import write_reports


@dataclass
class RunOptions:
    inputs: list[Path]
    out: Path
    model: str | Path | None = None
    batch_size: int | None = None  # None: the default for the device (dermscore.runtime)
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "float32"  # float32 | float16 | bfloat16 (mixed precision, for GPUs)
    xla: bool = False
    progress: bool | None = None  # None: only when stderr is a terminal
    thresholds: Thresholds = field(default_factory=Thresholds)
    lesion_map: Path | None = None  # CSV image,lesion_id
    metadata: Path | None = None  # HAM10000-style CSV image_id,lesion_id
    thumbnails: bool = False
    pseudonymize: bool = False
    pseudonym_key_file: Path | None = None  # else $DERMSCORE_PSEUDONYM_KEY
    overwrite: bool = False  # replace reports already in `out` instead of writing a timestamped subfolder


@dataclass
class RunSummary:
    bundle: Bundle
    out: Path
    scored: int = 0
    failures: list[Failure] = field(default_factory=list)


def run(options: RunOptions) -> RunSummary:
    started = datetime.now(timezone.utc)
    if not options.inputs:
        raise UsageError("Give at least one input folder or file, e.g. `dermscore run examples/`.")
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}.")
    key = load_key(options.pseudonym_key_file) if options.pseudonymize else None
    lesion_maps = read_lesion_maps(options.lesion_map, options.metadata)
    bundle = load_bundle(options.model)
    options.out.mkdir(parents=True, exist_ok=True)
    sources = list(discover(options.inputs))
    runtime = Runtime(options.device, options.precision, options.xla)
    device = configure(runtime)
    predictor = Predictor(bundle, options.batch_size or default_batch_size(device), runtime)
    summary = RunSummary(bundle=bundle, out=options.out)
    rows = []
    thumbnails: dict[str, bytes] = {}  # first image of each lesion
    show = sys.stderr.isatty() if options.progress is None else options.progress
    with tqdm(total=len(sources), unit="image", disable=not show, desc="scoring") as bar:
        for result in score(sources, predictor, thumbnails=options.thumbnails):
            if isinstance(result, Failure):
                summary.failures.append(result)
            else:
                row = image_row(result, bundle, options.thresholds, lesion_maps)
                rows.append(pseudonymize_row(row, key) if key else row)
                if result.ref.thumbnail:
                    thumbnails.setdefault(rows[-1]["lesion_id"], result.ref.thumbnail)
            bar.update(1)
    summary.scored = len(rows)
    info = RunInfo(started=started, finished=datetime.now(timezone.utc), command_line=shlex.join(sys.argv),
                   inputs=[str(Path(p).resolve()) for p in options.inputs], thresholds=options.thresholds,
                   lesion_maps=[f"{m.kind}: {m.path}" for m in lesion_maps], pseudonymized=key is not None,
                   **environment())
    summary.out = write_reports(options.out, bundle, rows, summary.failures, info, options.overwrite, thumbnails)
    return summary
