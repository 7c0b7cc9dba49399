"""Command line (Typer only): options, exit codes, messages. All work happens in library modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from dermscore import __version__
from dermscore.errors import DermscoreError, UsageError

EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 6  # SIGINT/SIGTERM: stopped after a committed batch; rerun to resume
T = TypeVar("T")

app = typer.Typer(
    help="Batch scoring of dermatoscopic images with an InceptionV3 + DenseNet201 ensemble.\n\n"
    "Results are decision support for research, not a diagnosis.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(exc: DermscoreError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command()
def run(
    ctx: typer.Context,
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Folders and image files to score (or `inputs` in --config).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Bundle folder or name in models/.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports.")] = Path("dermscore-results"),
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass (default: 8 on CPU, 64 on GPU).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or gpu; gpu fails clearly when none is found.")] = "auto",
    precision: Annotated[str, typer.Option(help="float32, or mixed float16/bfloat16 (GPU; see README).")] = "float32",
    xla: Annotated[bool, typer.Option("--xla/--no-xla", help="Compile the members with XLA.")] = False,
    backend: Annotated[str, typer.Option(help="auto, keras or onnx: onnx runs the members in ONNX Runtime on CPU (bundles without ONNX members need dermscore[onnx] to export them); auto picks it on CPU where it can.")] = "auto",
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")] = None,
    lesion_map: Annotated[Optional[Path], typer.Option(help="CSV with columns image,lesion_id: images of one lesion.")] = None,
    metadata: Annotated[Optional[Path], typer.Option(help="HAM10000-style CSV with image_id (file stem) and lesion_id.")] = None,
    malignant_threshold: Annotated[Optional[float], typer.Option(help="Flag 'malignant' at this malignant probability (default: the bundle's operating point, else 0.30).")] = None,
    review_threshold: Annotated[Optional[float], typer.Option(help="Flag 'review' when the top probability is below this (default: the bundle's operating point, else 0.50).")] = None,
    disagreement_threshold: Annotated[Optional[float], typer.Option(help="Flag 'review' when members/images diverge this much, Jensen-Shannon in bits (default: the bundle's, else 0.20).")] = None,
    ood_threshold: Annotated[Optional[float], typer.Option(help="Flag 'out-of-distribution' above this ood_score (default: the bundle's; needs a bundle with an OOD detector).")] = None,
    thumbnails: Annotated[bool, typer.Option(help="Embed a small picture of each lesion in report.xlsx.")] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps/--no-heatmaps", help="Class-activation heatmaps for every image of a lesion flagged malignant or review, in heatmaps/ beside the reports and beside each lesion in report.xlsx (loads the Keras members; docs/heatmaps.md).")] = False,
    pseudonymize: Annotated[bool, typer.Option(help="Replace patient identifiers with a keyed hash (needs a key).")] = False,
    pseudonym_key_file: Annotated[Optional[Path], typer.Option(help="File with the secret key for --pseudonymize (else $DERMSCORE_PSEUDONYM_KEY).")] = None,
    dicom_sr: Annotated[bool, typer.Option("--dicom-sr", help="Also write one DICOM Structured Report per study scored from DICOM inputs, in OUT/dicom-sr/ (needs dermscore[dicom-sr]).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace reports already in --out (default: write a timestamped subfolder).")] = False,
    lesion_attribute: Annotated[str, typer.Option(help="DICOM keyword whose value names the lesion (default: one lesion per series).")] = "SeriesInstanceUID",
    modality: Annotated[Optional[list[str]], typer.Option(metavar="CODES", help="DICOM modalities to score, replacing the default XC,DMS,OT,SC,VL; repeat or separate with commas, e.g. --modality XC,DMS,CT.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML job file setting any of these options (README, 'Scheduled jobs'); options given here win.")] = None,
    ledger: Annotated[Optional[Path], typer.Option(help="Run ledger, SQLite (default: OUT/ledger.sqlite).")] = None,
    report: Annotated[str, typer.Option(help="Reports cover 'all' images the bundle scored so far, or only 'new' ones no finished run reported.")] = "all",
    rescore: Annotated[bool, typer.Option("--rescore", help="Score every input again, even unchanged ones the ledger holds.")] = False,
    skip_failed: Annotated[bool, typer.Option("--skip-failed", help="Do not retry inputs that failed before (unless their content changed).")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Only retry inputs that failed before; score nothing new.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for another run holding the ledger before giving up (exit 5).")] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no summary; only failures go to stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show TensorFlow's, absl's and CUDA's start-up and log lines (hidden by default).")] = False,
    log_json: Annotated[Optional[Path], typer.Option(help="Append JSON-lines events (run start/end, batch commits, failures) here.")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray cluster; needs dermscore[ray], see README).")] = "local",
    feed: Annotated[str, typer.Option(help="Local engine's decoding: thread, process (worker processes writing batches into shared memory; for GPU hosts) or auto (process on a GPU, thread on a CPU).")] = "auto",
    decode_workers: Annotated[Optional[int], typer.Option(help="Decoding threads or processes (default: per device and feed; see docs/feeding.md).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="With --engine ray: cluster to join, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else Ray on this machine).")] = None,
    replicas: Annotated[int, typer.Option(help="With --engine ray: model actors, each holding the whole ensemble.")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="With --engine ray: GPUs per model actor (a fraction shares a card).")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option(help="With --engine ray: CPUs per model actor.")] = 1.0,
) -> None:
    """Score every image under INPUTS and write images.csv, lesions.csv, errors.csv and report.xlsx.

    Example: dermscore run examples/ --out results --metadata HAM10000_metadata.csv --thumbnails
    """
    from dataclasses import replace

    from dermscore import native_logs
    from dermscore.aggregate import Thresholds
    from dermscore.config import load_job
    from dermscore.engines import RayOptions
    from dermscore.report.write import SKIPPED_CSV
    from dermscore.run import RunOptions
    from dermscore.run import run as run_job

    threshold_options = {"malignant": "malignant_threshold", "review": "review_threshold",
                         "disagreement": "disagreement_threshold", "ood": "ood_threshold"}
    ray_options = {"address": "ray_address", "replicas": "replicas", "gpus_per_replica": "gpus_per_replica",
                   "cpus_per_replica": "cpus_per_replica"}
    native_logs.apply(verbose)
    try:
        job = load_job(config, RunOptions) if config else {}
        options = RunOptions(
            inputs=inputs or [], out=out, model=model, batch_size=batch_size, progress=progress,
            device=device, precision=precision, xla=xla, backend=backend,
            thresholds=_table(ctx, job.pop("thresholds", Thresholds()), threshold_options),
            lesion_map=lesion_map, metadata=metadata, thumbnails=thumbnails, heatmaps=heatmaps, pseudonymize=pseudonymize,
            pseudonym_key_file=pseudonym_key_file, dicom_sr=dicom_sr, overwrite=overwrite, lesion_attribute=lesion_attribute,
            modality=modality or None,
            engine=engine, ray=_table(ctx, job.pop("ray", RayOptions()), ray_options), feed=feed,
            decode_workers=decode_workers,
            ledger=ledger, report=report, rescore=rescore, skip_failed=skip_failed, retry_failed=retry_failed,
            wait=wait, quiet=quiet, log_json=log_json,
        )
        # the job file fills in what the command line left at its default
        options = replace(options, **{k: v for k, v in job.items() if not _on_command_line(ctx, k)})
        summary = run_job(options)
    except DermscoreError as exc:
        _fail(exc)
    if summary.interrupted:
        typer.echo(
            f"interrupted: the {summary.scored} image(s) this run scored are saved in the ledger {summary.ledger}. "
            "Run the same command again to resume; reports are written when a run completes.",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if options.quiet:
        if summary.failures:
            typer.echo(f"{len(summary.failures)} input(s) failed; see {summary.out / 'errors.csv'}", err=True)
            raise typer.Exit(EXIT_SOME_FAILED)
        return
    if summary.out != out:
        typer.echo(f"{out} already holds reports; wrote this run's reports to {summary.out} (--overwrite replaces them)")
    typer.echo(
        f"scored {summary.scored} image(s) with {summary.bundle.name} {summary.bundle.version}; "
        f"{len(summary.failures)} input(s) failed; {summary.skipped} unchanged input(s) already in the ledger "
        f"skipped; reports in {summary.out}"
    )
    if summary.heatmaps and summary.heatmaps.images:
        typer.echo(f"heatmaps for {summary.heatmaps.images} image(s) of flagged lesions in {summary.out / 'heatmaps'}")
    if summary.set_aside:
        typer.echo(f"skipped {len(summary.set_aside)} DICOM object(s) that are not skin photographs "
                   f"({summary.set_aside_counts()}); see {summary.out / SKIPPED_CSV}")
    typer.echo("Results are decision support for research, not a diagnosis.")
    if summary.failures:
        typer.echo(f"see {summary.out / 'errors.csv'} for the inputs that could not be scored", err=True)
        raise typer.Exit(EXIT_SOME_FAILED)


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    """Given by the user rather than left at its default (by name: Typer may bundle its own Click)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _table(ctx: typer.Context, base: T, fields: dict[str, str]) -> T:
    """A job file's table (or the default) with each field given on the command line (field -> option) replaced."""
    from dataclasses import replace

    return replace(base, **{field: ctx.params[name] for field, name in fields.items() if _on_command_line(ctx, name)})


@app.command()
def models(
    name: Annotated[Optional[str], typer.Argument(help="Bundle folder or name to show and verify.")] = None,
) -> None:
    """List installed bundles and where each comes from, or show one and verify its weight hashes.

    Example: dermscore models ham10000-ensemble
    """
    from dermscore.bundle import bundle_sources, installed_bundles, load_bundle

    try:
        if name is None:
            bundles = installed_bundles()
            if not bundles:
                typer.echo("no bundles in " + ", ".join(f"{s.folder} ({s.origin})" for s in bundle_sources()))
            seen: set[str] = set()
            for bundle, source in bundles:
                shadowed = " (shadowed by the one above of the same name)" if bundle.name in seen else ""
                seen.add(bundle.name)
                typer.echo(f"{bundle.name}\t{bundle.version}\t{bundle.path}\t{source.origin}{shadowed}")
            return
        bundle = load_bundle(name)
    except DermscoreError as exc:
        _fail(exc)
    typer.echo(f"{bundle.name} {bundle.version} ({bundle.path}) — all weight hashes verified")
    typer.echo(f"classes: {', '.join(bundle.classes)}; malignant: {', '.join(bundle.malignant_classes)}")
    for m in bundle.members:
        typer.echo(
            f"  {m.name}: {m.architecture} {m.input_size[0]}x{m.input_size[1]} {m.preprocessing} "
            f"weight={m.weight} sha256={m.sha256}"
        )
    if bundle.intended_use:
        typer.echo(f"intended use: {bundle.intended_use}")
    from dermscore.aggregate import Thresholds

    applied = Thresholds().sources(bundle)
    typer.echo("thresholds: " + ", ".join(f"{k} {v:g} ({src})" for k, (v, src) in applied.items()
                                          if isinstance(v, float)))
    if bundle.calibration:
        typer.echo(f"calibration: {bundle.calibration.method}, T = "
                   + ", ".join(f"{t:.3f}" for t in bundle.calibration.temperatures))
    metrics = bundle.provenance.get("metrics")
    if metrics:
        typer.echo("metrics: " + json.dumps(metrics)[:2000])


@app.command()
def bench(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders to benchmark on.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Bundle folder or name in models/.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per forward pass (default: per device).")] = None,
    n_images: Annotated[int, typer.Option("--images", help="Images to score per measurement (inputs are cycled).")] = 64,
    naive_images: Annotated[int, typer.Option(help="Images for the naive one-at-a-time predict loop.")] = 8,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of ceiling, model-only and end-to-end per backend; medians are shown.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    precision: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    xla: Annotated[bool, typer.Option("--xla/--no-xla", help="Compile the members with XLA.")] = False,
    backend: Annotated[Optional[list[str]], typer.Option(help="auto, keras or onnx; repeat to compare backends in one run (default: auto).")] = None,
    feed: Annotated[str, typer.Option(help="Decoding for end-to-end: auto, thread or process (as on `run`).")] = "auto",
    decode_workers: Annotated[Optional[int], typer.Option(help="Decoding threads or processes (default: per device and feed).")] = None,
    decode_scaling: Annotated[bool, typer.Option("--decode-scaling/--no-decode-scaling", help="Also time decoding alone with 1, 2, 4, 8... workers and all cores, in processes and in threads.")] = True,
) -> None:
    """Measure decode-only, model-only and end-to-end throughput against this machine's matmul ceiling.

    Example: dermscore bench ../shared/data/ham10000-600x450-sample/images --images 128 --backend keras --backend onnx
    """
    from dermscore.bench import run_bench
    from dermscore.discover import discover
    from dermscore.records import Source
    from dermscore.runtime import Runtime

    try:
        paths = [Path(s.location) for s in discover(images) if isinstance(s, Source)]
        if not paths:
            raise UsageError(f"no images found under {', '.join(map(str, images))}")
        runtimes = [Runtime(device, precision, xla, name) for name in backend or ["auto"]]
        report = run_bench(paths, model, batch_size, n_images, naive_images, runtimes, rounds, feed, decode_workers,
                           decode_scaling)
    except DermscoreError as exc:
        _fail(exc)
    typer.echo(report.table())


@app.command()
def export(
    bundle: Annotated[str, typer.Argument(help="Bundle folder or name in models/.")],
    out: Annotated[Path, typer.Argument(help="Folder for the exported files (created).")],
    export_format: Annotated[str, typer.Option("--format", help="litert: one .tflite file per member plus litert.json (classes, input sizes, preprocessing, ensemble weights).")] = "litert",
    float16: Annotated[bool, typer.Option("--float16", help="Also write each member with float16 weights (half the size; its gap to Keras is measured and recorded).")] = False,
) -> None:
    """Export a bundle for other runtimes: LiteRT (.tflite) members for phone apps, each checked against Keras.

    Example: dermscore export ham10000-ensemble --format litert app-model/ --float16
    """
    from dermscore import native_logs
    from dermscore.bundle import load_bundle
    from dermscore.export.litert import FORMATS, export_litert

    native_logs.apply(verbose=False)  # the converter's TensorFlow start-up lines, as in `run`
    try:
        if export_format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}.")
        manifest = export_litert(load_bundle(bundle), out, float16=float16)
    except DermscoreError as exc:
        _fail(exc)
    typer.echo(f"wrote {', '.join(sorted(p.name for p in out.glob('*.tflite')))} and {manifest.name} to {out}")


review_app = typer.Typer(
    help="Reviewer verdicts: read the reviewer_class, reviewer and reviewer_note columns of a report back into "
    "the run ledger.\n\nExample: dermscore review import results/report.xlsx",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")


@review_app.command("import")
def review_import(
    report: Annotated[Path, typer.Argument(help="report.xlsx with verdicts, as dermscore, Excel or LibreOffice Calc saved it.")],
    ledger: Annotated[Optional[Path], typer.Option(help="Run ledger (default: the one the report's Run sheet names, else ledger.sqlite beside the report or one folder up).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for a run holding the ledger (exit 5 after).")] = 0.0,
) -> None:
    """Store the verdicts of a report's Lesions sheet in its ledger; all or nothing, unchanged verdicts are not stored again.

    Example: dermscore review import results/report.xlsx
    """
    from dermscore.review.verdicts import import_verdicts

    try:
        summary = import_verdicts(report, ledger, wait)
    except DermscoreError as exc:
        _fail(exc)
    typer.echo(f"{summary.new} new and {summary.changed} changed verdict(s) stored in {summary.ledger}; "
               f"{summary.unchanged} unchanged. Later reports of this bundle show them.")


@app.command()
def evaluate(
    report: Annotated[Path, typer.Argument(help="report.xlsx, or the folder holding it with its CSV files.")],
    labels: Annotated[Optional[Path], typer.Option(help="HAM10000-style CSV with image_id and dx columns (image_id = file stem).")] = None,
    verdicts: Annotated[bool, typer.Option("--verdicts/--no-verdicts", help="Also compare with the reviewer verdicts in the ledger.")] = True,
    ledger: Annotated[Optional[Path], typer.Option(help="Run ledger (default: the one the report names).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for evaluation.csv, .xlsx and .png (default: the report's folder).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for a run holding the ledger (exit 5 after).")] = 0.0,
) -> None:
    """Compare the ensemble with reviewer verdicts and/or labels: balanced accuracy, per-class recall, malignant
    sensitivity and specificity, calibration, overall and by month of scoring.

    Example: dermscore evaluate results/report.xlsx --labels HAM10000_metadata.csv
    """
    from dermscore.review.performance import evaluate_report

    try:
        result = evaluate_report(report, labels, verdicts, ledger, out, wait)
    except DermscoreError as exc:
        _fail(exc)
    for row in result.rows:
        if row["period"] == "all":
            figures = ", ".join(f"{name.replace('_', ' ')} {row[name]:.3f}" for name in
                                ("balanced_accuracy", "malignant_sensitivity", "malignant_specificity", "ece")
                                if row[name] is not None)
            typer.echo(f"{row['truth']}: {row['n']} {row['level']}(s); {figures}")
    typer.echo(f"{result.unlabelled} image(s) without a label, {result.unreviewed} lesion(s) without a verdict class; "
               f"wrote {', '.join(str(p) for p in result.files)}")
    typer.echo("Results are decision support for research, not a diagnosis.")


@app.command()
def version() -> None:
    """Print the dermscore version.

    Example: dermscore version
    """
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
