"""One scoring run: wire discover -> decode -> preprocess -> infer -> aggregate -> report.

A library function (no CLI framework here) so scheduled jobs, tests and other engines call the same code.
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from dermscore.aggregate import Thresholds, image_row
from dermscore.bundle import Bundle, load_bundle
from dermscore.discover import discover
from dermscore.engines import ENGINES, RayOptions
from dermscore.errors import OutputError, UsageError
from dermscore.feed import check_feed
from dermscore.explain import HeatmapStats
from dermscore.gate.modality import ModalityGate, parse_modalities
from dermscore.infer import Predictor, score
from dermscore.ledger import (SELECTIONS, EventLog, Ledger, default_ledger_path, open_ledger, pause_point,
                              stop_requested)
from dermscore.lesion_map import LesionMap, read_lesion_maps
from dermscore.records import DEFAULT_LESION_ATTRIBUTE, Failure, Scored, Skipped, Source
from dermscore.runtime import Runtime, configure, default_batch_size
from dermscore.report.pseudonymize import load_key, pseudonymize_row
from dermscore.report.run_info import RunInfo, environment
from dermscore.report.write import check_dicom_sr, report_folder, write_reports
from dermscore.storage import file_writes, member_reads

REPORT_SCOPES = ("all", "new")


@dataclass
class RunOptions:
    inputs: list[Path]
    out: Path
    model: str | Path | None = None
    batch_size: int | None = None  # None: the default for the device (dermscore.runtime)
    device: str = "auto"  # auto | cpu | gpu
    precision: str = "float32"  # float32 | float16 | bfloat16 (mixed precision, for GPUs)
    xla: bool = False
    backend: str = "auto"  # auto | keras | onnx (ONNX Runtime on CPU; dermscore.runtime.resolve_backend)
    progress: bool | None = None  # None: only when stderr is a terminal
    thresholds: Thresholds = field(default_factory=Thresholds)
    lesion_map: Path | None = None  # CSV image,lesion_id
    metadata: Path | None = None  # HAM10000-style CSV image_id,lesion_id
    thumbnails: bool = False
    pseudonymize: bool = False
    pseudonym_key_file: Path | None = None  # else $DERMSCORE_PSEUDONYM_KEY
    dicom_sr: bool = False  # also write one DICOM SR per study scored from DICOM inputs (needs dermscore[dicom-sr])
    overwrite: bool = False  # replace reports already in `out` instead of writing a timestamped subfolder
    ledger: Path | None = None  # None: DIR/ledger.sqlite
    report: str = "all"  # all: everything this bundle scored so far; new: what no finished run reported
    rescore: bool = False
    skip_failed: bool = False
    retry_failed: bool = False
    wait: float = 0.0  # seconds to wait for another run holding the ledger
    quiet: bool = False
    log_json: Path | None = None  # JSON-lines event log, appended
    lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE  # DICOM keyword whose value names the lesion
    # --modality: the DICOM modalities scored (replaces dermscore.gate.modality.DEFAULT_ALLOWED); None: default
    modality: list[str] | None = None
    engine: str = "local"  # local | ray (dermscore.engines)
    ray: RayOptions = field(default_factory=RayOptions)  # where and how wide, with engine="ray"
    feed: str = "auto"  # auto | thread | process: the local engine's decoding (dermscore.feed)
    decode_workers: int | None = None  # None: per device and feed (dermscore.feed.default_workers)
    # Heatmaps for the images of flagged lesions (dermscore.explain). Off by default: the first one of a run
    # loads TensorFlow and the Keras members, which an ONNX run never does otherwise (docs/heatmaps.md).
    heatmaps: bool = False

    def selection(self) -> str:
        """Which inputs to take on (dermscore.ledger.SELECTIONS): at most one of the three switches."""
        chosen = [name for name in SELECTIONS[1:] if getattr(self, name.replace("-", "_"))]
        if len(chosen) > 1:
            raise UsageError("choose at most one of " + ", ".join(f"--{name}" for name in chosen) + ".")
        return chosen[0] if chosen else SELECTIONS[0]


@dataclass
class RunSummary:
    bundle: Bundle
    out: Path
    scored: int = 0  # images scored by this run
    device: str = ""  # cpu | gpu where this run scored; "" when it scored nothing new
    backend: str = ""  # onnx | keras as the local engine used it; "" for none or Ray
    failures: list[Failure] = field(default_factory=list)  # inputs that failed in this run
    skipped: int = 0  # inputs the ledger already holds with unchanged content
    set_aside: list[Skipped] = field(default_factory=list)  # DICOM objects not scored: non-images, gated modalities
    reported: int = 0  # image rows in the reports (all so far, or only the new ones)
    interrupted: bool = False  # SIGINT/SIGTERM: stopped after a batch, no reports written
    ledger: Path | None = None
    run_id: str = ""
    heatmaps: HeatmapStats | None = None  # what the explain stage did; None with heatmaps off

    def set_aside_counts(self) -> str:
        """What was set aside, by category, most frequent first: ``2 modality CT, 1 not an image``."""
        counts = Counter(item.category for item in self.set_aside)
        return ", ".join(f"{n} {category}" for category, n in counts.most_common())


def run(options: RunOptions) -> RunSummary:
    """Score what the ledger does not hold yet, committing batch by batch, then report from the ledger.

    Safe to kill at any moment: a rerun resumes after the last committed batch (see dermscore.ledger).
    """
    started = datetime.now(timezone.utc)
    if not options.inputs:
        raise UsageError("Give at least one input folder or file, e.g. `dermscore run examples/`.")
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}.")
    if options.report not in REPORT_SCOPES:
        raise UsageError(f"--report must be one of {', '.join(REPORT_SCOPES)}, got {options.report!r}.")
    if options.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {options.engine!r}.")
    check_feed(options.feed, options.decode_workers)  # before the model loads
    selection = options.selection()
    if options.lesion_attribute != DEFAULT_LESION_ATTRIBUTE:
        from dermscore.decode.dicom import check_lesion_attribute

        check_lesion_attribute(options.lesion_attribute)
    gate = ModalityGate(parse_modalities(options.modality)) if options.modality else ModalityGate()
    key = load_key(options.pseudonym_key_file) if options.pseudonymize else None
    if options.dicom_sr:
        check_dicom_sr()
    lesion_maps = read_lesion_maps(options.lesion_map, options.metadata)
    with file_writes(f"the output folder {options.out}"):
        options.out.mkdir(parents=True, exist_ok=True)
    ledger_path = options.ledger or default_ledger_path(options.out)
    with EventLog(options.log_json) as log:
        try:
            with open_ledger(ledger_path, options.wait) as ledger, stop_requested() as stop:
                bundle = load_bundle(options.model)
                summary = RunSummary(bundle=bundle, out=options.out, ledger=ledger_path)
                summary.run_id = ledger.begin_run(bundle.identity, shlex.join(sys.argv))
                found = _set_aside(discover(options.inputs, options.lesion_attribute, gate), summary)
                sources = list(ledger.plan(found, bundle.identity, selection, stop))
                ledger.record_skipped(summary.run_id, bundle.identity, summary.set_aside)
                summary.skipped = ledger.skipped
                log.event("run_start", run_id=summary.run_id, bundle=bundle.identity, ledger=ledger_path,
                          inputs=options.inputs, pending=len(sources), skipped=ledger.skipped)
                _score_into_ledger(sources, bundle, ledger, options, summary, stop, log)
                if summary.interrupted:
                    ledger.end_run(summary.run_id, "interrupted")
                else:
                    pause_point("reports")
                    _report(ledger, bundle, options, summary, started, lesion_maps, key)
                    ledger.end_run(summary.run_id, "done")
        except Exception as exc:
            with suppress(OutputError):  # the log may sit on the same full disk; the first error is the news
                log.event("run_end", status="error", error=f"{type(exc).__name__}: {exc}")
            raise
        log.event("run_end", run_id=summary.run_id, status="interrupted" if summary.interrupted else "done",
                  scored=summary.scored, failed=len(summary.failures), skipped=summary.skipped,
                  set_aside=len(summary.set_aside),
                  reported=summary.reported, reports=summary.out)
    return summary


def _set_aside(items: Iterable[Source | Failure | Skipped], summary: RunSummary) -> Iterator[Source | Failure]:
    """Keep what discovery set aside (for the ledger and skipped.csv; not failures) and pass the rest on."""
    for item in items:
        if isinstance(item, Skipped):
            summary.set_aside.append(item)
        else:
            yield item


def _score_into_ledger(
    sources: list[Source | Failure],
    bundle: Bundle,
    ledger: Ledger,
    options: RunOptions,
    summary: RunSummary,
    stop: threading.Event,
    log: EventLog,
) -> None:
    """Score ``sources``, committing every batch; on a stop request, stop at the next batch boundary."""
    if stop.is_set():
        summary.interrupted = True
    if summary.interrupted or not sources:
        return  # nothing to score: no model load, so a night with no new images costs seconds
    runtime = Runtime(options.device, options.precision, options.xla, options.backend)
    if options.engine == "ray":
        from dermscore.engines.ray import score_on_ray  # Ray is imported only by runs that ask for it

        summary.device = options.ray.device
        batch_size = options.batch_size or default_batch_size(summary.device)
        results = score_on_ray(sources, bundle, batch_size, runtime, options.ray, options.thumbnails)
    else:
        summary.device = configure(runtime)
        pause_point("models")
        with member_reads(bundle):
            predictor = Predictor(bundle, options.batch_size or default_batch_size(summary.device), runtime)
        batch_size = predictor.batch_size
        results = score(sources, predictor, options.decode_workers, options.thumbnails, options.feed)
        summary.backend = predictor.backend
    recorder = ledger.recorder(summary.run_id, bundle.identity)
    show = not options.quiet and (sys.stderr.isatty() if options.progress is None else options.progress)

    def commit(final: bool = False) -> None:
        stats = recorder.commit(final)
        log.event("batch_commit", run_id=summary.run_id, batch=stats.batch, images=stats.images,
                  failed=stats.failed, scored_so_far=summary.scored)

    with tqdm(total=len(sources), unit="input", disable=not show, desc="scoring") as bar:
        for result in results:
            if isinstance(result, Failure):
                summary.failures.append(result)
                log.event("input_failed", source=result.location, stage=result.stage, reason=result.reason)
            elif isinstance(result, Scored):
                summary.scored += 1
            else:
                continue
            recorder.add(result)
            bar.update(0 if isinstance(result, Scored) and result.ref.frame not in (None, 0) else 1)
            pause_point("result")
            if recorder.pending >= batch_size:
                commit()
                if stop.is_set():
                    summary.interrupted = True
                    break
        else:
            commit(final=True)
    results.close()


def _report(
    ledger: Ledger,
    bundle: Bundle,
    options: RunOptions,
    summary: RunSummary,
    started: datetime,
    lesion_maps: list[LesionMap],
    key: bytes | None,
) -> None:
    """Reports come from the ledger, not from memory, so they can cover earlier runs (``--report all``)
    and always use this run's thresholds and lesion maps."""
    new_only = options.report == "new"
    rows, results = [], []  # results (the ledger's records) only for the explain stage, one per row
    thumbnails: dict[str, bytes] = {}  # first image of each lesion
    for result in ledger.scored(bundle.identity, new_only):
        row = image_row(result, bundle, options.thresholds, lesion_maps)
        rows.append(pseudonymize_row(row, key) if key else row)
        if options.heatmaps:
            results.append(result)
        if result.ref.thumbnail:
            thumbnails.setdefault(rows[-1]["lesion_id"], result.ref.thumbnail)
    summary.reported = len(rows)
    info = RunInfo(started=started, finished=datetime.now(timezone.utc), command_line=shlex.join(sys.argv),
                   inputs=[str(Path(p).resolve()) for p in options.inputs],
                   thresholds=options.thresholds.for_bundle(bundle),
                   threshold_sources={k: v for k, (_, v) in options.thresholds.sources(bundle).items()},
                   lesion_maps=[f"{m.kind}: {m.path}" for m in lesion_maps], pseudonymized=key is not None,
                   ledger=str(Path(ledger.path).resolve()),
                   **environment(summary.device, options.engine, summary.backend))
    failures = ledger.failures(bundle.identity, new_only)
    skipped = ledger.skipped_objects(bundle.identity, new_only)
    # Reviewer notes may name the patient, so reports that leave the clinic pseudonymised carry no verdicts.
    verdicts = None if key else ledger.latest_verdicts(bundle.identity)
    with file_writes(f"the reports in {options.out}"):
        folder, heatmaps = options.out, None
        if options.heatmaps:  # explain: heatmaps beside the reports, so the folder is chosen first
            from dermscore.explain import explain_report

            folder = report_folder(options.out, info, options.overwrite)
            heatmaps, summary.heatmaps = explain_report(folder, options.out, bundle, results, rows, options.thresholds,
                                                        Runtime(options.device))
            info.finished = datetime.now(timezone.utc)
        summary.out = write_reports(folder, bundle, rows, failures, info, options.overwrite or options.heatmaps,
                                    thumbnails, skipped, options.dicom_sr, heatmaps=heatmaps, verdicts=verdicts)
