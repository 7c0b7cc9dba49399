"""Command line (Typer, like ``dermscore``): one command per step and ``all`` to run them in order.

    python -m training index      # metadata + images -> index.csv (+ index_problems.csv)
    python -m training split      # lesion-level train/val/test -> split.csv
    python -m training eda        # class / age / sex / body-site distributions (CSV + PNG)
    python -m training train --member inceptionv3   # resumes automatically from its last checkpoint
    python -m training ensemble   # member weights fitted on validation
    python -m training evaluate   # test metrics, confusion matrices, per source and device-shifted
    python -m training export     # bundle folder for dermscore (then calibrate on it)
    python -m training calibrate --bundle models/ham10000-ensemble   # calibration, OOD detector, operating
                                  # points fitted from a bundle's own split; rewrites it as --version
    python -m training onnx --bundle models/ham10000-ensemble   # ships each member's ONNX graph in the
                                  # bundle (after calibrate), so the first run never exports
    python -m training all        # everything above, both members

Every command takes every option (as the steps share one set of settings, a command line written for one
step works for the next), so the option spellings are the same everywhere and match ``dermscore``'s.
Everything intermediate goes to ``--work`` (default ``training-work/``); only ``export`` and
``calibrate`` write a bundle. Keras is imported after ``--threads`` is applied, because thread pools are
sized when the backend starts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dermscore.runtime import BACKENDS

PROG = "python -m training"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000-200x150"
MEMBERS = ("inceptionv3", "densenet201")
PRESETS = ("cpu", "scratch-gpu", "shift-cpu", "shift-gpu", "gpu")
PIPELINE = ("index", "split", "eda", "train", "ensemble", "evaluate", "export")
# Each command's help: what it does, then an example (dermscore's rule: every command's help has one).
STEPS = {
    "index": "Read the metadata and find every image: index.csv (+ index_problems.csv).\n\n"
             "Example: python -m training index --data ../shared/data/ham10000-200x150",
    "split": "Lesion-level train/validation/test split, stratified by diagnosis: split.csv.\n\n"
             "Example: python -m training split --seed 42 --val-fraction 0.15 --test-fraction 0.15",
    "eda": "Class, age, sex and body-site distributions as CSV and PNG in WORK/eda.\n\n"
           "Example: python -m training eda --work training-work",
    "train": "Train members; rerun the same command after an interruption and it resumes from its checkpoint.\n\n"
             "Example: python -m training train --member densenet201 --preset shift-cpu --threads 2",
    "ensemble": "Fit the member weights and the prior correction on validation: ensemble.json.\n\n"
                "Example: python -m training ensemble --tta",
    "evaluate": "Test-split figures of the work folder's members (or of --bundle), per source and on a "
                "device-shifted copy.\n\n"
                "Example: python -m training evaluate --bundle models/ham10000-ensemble",
    "export": "Write the bundle (members, manifest, model card, figures), then calibrate it.\n\n"
              "Example: python -m training export --out models/ham10000-ensemble --version 2026.11.27",
    "calibrate": "Fit calibration, the OOD detector and the operating points from a bundle's own split.\n\n"
                 "Example: python -m training calibrate --bundle models/ham10000-ensemble --version 2026.11.27",
    "onnx": "Write each member's ONNX graph into the bundle (run after calibrate), checked against Keras within "
            "1e-4, so dermscore's first run exports nothing.\n\n"
            "Example: python -m training onnx --bundle models/ham10000-ensemble",
    "all": "Every step from index to export, both members (or --member).\n\n"
           "Example: python -m training all --preset scratch-gpu --time-budget 7",
}


def _size(text: str | None) -> tuple[int, int] | None:
    """'75x100' -> (75, 100): height x width."""
    if text is None:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH in pixels, e.g. 150x200, got {text!r}",
                                 param_hint="--input-size") from None
    return height, width


def _options(
    data: Annotated[Path, typer.Option(help="Folder with HAM10000_metadata.csv and the images.")] = DEFAULT_DATA,
    metadata: Annotated[Optional[Path], typer.Option(help="Metadata CSV (default: DATA/HAM10000_metadata.csv).")] = None,
    work: Annotated[Path, typer.Option(help="Working folder (index, split, checkpoints, logs, caches).")] = REPO / "training-work",
    out: Annotated[Optional[Path], typer.Option(help="Bundle folder for export (default: models/ham10000-ensemble).")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="calibrate and onnx: the bundle to fit or complete (default: --out, else the default bundle); evaluate: score this bundle on its own split.csv test images through dermscore (plain and device-shifted) instead of the work folder's members.")] = None,
    train_limit: Annotated[int, typer.Option(help="calibrate: training images scored for the OOD statistics (a seeded random subset; 0 = all).")] = 2000,
    ood_crops: Annotated[int, typer.Option(help="calibrate: random crops per non-dermoscopic image.")] = 12,
    backend: Annotated[str, typer.Option(help="calibrate and evaluate --bundle: dermscore's backend for scoring the split images, as `dermscore run --backend`: auto (ONNX Runtime on a CPU, each member exported to ONNX first unless the bundle ships it), keras (no export: the backend a GPU run uses) or onnx. The outputs are cached per bundle weights, whichever backend wrote them.")] = "auto",
    member: Annotated[Optional[list[str]], typer.Option(help="Member: inceptionv3 or densenet201 (repeat for both; default both).")] = None,
    preset: Annotated[str, typer.Option(help="cpu: from scratch, low resolution (the shipped DenseNet201); scratch-gpu: from scratch at 150x200 (the shipped InceptionV3); shift-gpu / shift-cpu: the device-robust recipe (colour constancy, 8 rotations/flips, crops, white balance / gamma / blur, EMA) at 150x200 / the CPU sizes with DenseNet201 at 96x128; gpu: ImageNet initialisation at 299/224.")] = "cpu",
    input_size: Annotated[Optional[str], typer.Option(metavar="HxW", help="Input HEIGHTxWIDTH, e.g. 75x100.")] = None,
    init: Annotated[Optional[str], typer.Option(help="imagenet, none, or a local backbone weights file.")] = None,
    warm_start: Annotated[Optional[Path], typer.Option(help="Trained classifier .keras to continue from (new schedule).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (the cap when --time-budget fits them).")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help="Steps per epoch (default: one pass over the training split).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    sampling_power: Annotated[Optional[float], typer.Option(help="Class sampling: frequency ** power (1 natural, 0 balanced).")] = None,
    class_weight_power: Annotated[Optional[float], typer.Option(help="Extra loss weights (1 / sampled frequency) ** power.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs.")] = None,
    head_epochs: Annotated[Optional[int], typer.Option(help="Epochs with the backbone frozen (pretrained weights only).")] = None,
    colour_constancy: Annotated[Optional[float], typer.Option(metavar="P", help="Recipe: Shades of Gray Minkowski p (6; 0 switches it off).")] = None,
    dihedral: Annotated[Optional[bool], typer.Option("--dihedral/--no-dihedral", help="Recipe: all 8 rotations/flips.")] = None,
    crop_scale: Annotated[Optional[float], typer.Option(help="Recipe: random resized crops down to this area fraction.")] = None,
    white_balance: Annotated[Optional[float], typer.Option(help="Recipe: per-channel gain range +-.")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Recipe: gamma in [1/(1+G), 1+G].")] = None,
    blur: Annotated[Optional[float], typer.Option(help="Recipe: strongest Gaussian blur sigma in pixels.")] = None,
    rotation: Annotated[Optional[float], typer.Option(help="Recipe: random rotation range in turns (0.5: +-180 degrees).")] = None,
    zoom: Annotated[Optional[float], typer.Option(help="Recipe: random zoom range +-.")] = None,
    ema_momentum: Annotated[Optional[float], typer.Option(help="Recipe: average the weights (EMA) with this momentum.")] = None,
    exclude_source: Annotated[Optional[str], typer.Option(help="Leave this HAM10000 source (e.g. rosendahl) out of training and validation; the member trains in members/<member>-without-<source> and evaluate reports it on every image of that source.")] = None,
    sources: Annotated[Optional[Path], typer.Option(help="Per-image source CSV (default: DATA/HAM10000_sources.csv; absent: no per-source figures).")] = None,
    eager: Annotated[bool, typer.Option("--eager", help="No graph compilation (smoke tests of a few steps).")] = False,
    mixed_precision: Annotated[Optional[bool], typer.Option("--mixed-precision/--no-mixed-precision", help="Train in mixed precision (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Split and training seed.")] = 42,
    val_fraction: Annotated[float, typer.Option(help="Share of lesions for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of lesions for test.")] = 0.15,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Fit and evaluate with flip test-time augmentation; export then ships members that average their four flipped views inside the model, so dermscore scores with it.")] = False,
    float16: Annotated[bool, typer.Option("--float16/--no-float16", help="Store exported weights as float16 (loaded back as float32).")] = True,
    version: Annotated[str, typer.Option(help="Bundle version (default: today, YYYY.MM.DD).")] = time.strftime("%Y.%m.%d"),
    stop_at: Annotated[Optional[str], typer.Option(help="HH:MM or HH:MM:SS UTC: end training after the last epoch that finishes before it.")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="Minutes per member: once a quarter of it has passed (and three epochs), the number of epochs (at most --epochs) is fitted to it.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for the backend (default: all).")] = None,
) -> dict[str, Any]:
    """Every option of every command, in one signature (Typer reads it for each command)."""
    return dict(locals())


def _namespace(step: str, params: dict[str, Any], command: str) -> argparse.Namespace:
    """The settings as the steps read them (``args.data``, ``args.members``, ...)."""
    args = argparse.Namespace(step=step, command=command, **params)
    for option, values, allowed in (("--member", args.member or (), MEMBERS), ("--preset", (args.preset,), PRESETS),
                                    ("--backend", (args.backend,), BACKENDS)):
        for value in values:
            if value not in allowed:
                raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}.", param_hint=option)
    args.input_size = _size(args.input_size)
    args.member = list(args.member) if args.member else None
    args.metadata = args.metadata or args.data / "HAM10000_metadata.csv"
    args.members = tuple(args.member or MEMBERS)
    return args


def _app(action: Callable[[argparse.Namespace], Any], command_line: str) -> typer.Typer:
    """The command line, with each command handing its parsed settings to ``action``."""
    app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False)
    signature = inspect.signature(_options, eval_str=True)
    for step, help_text in STEPS.items():

        def command_for(step: str = step) -> Callable[..., Any]:
            def command(**params: Any) -> Any:
                return action(_namespace(step, params, command_line))

            command.__signature__ = signature  # type: ignore[attr-defined]
            command.__name__ = step
            return command

        app.command(step, help=help_text)(command_for())
    return app


def _apply_threads(threads: int | None) -> None:
    """Size the backend's thread pools (TensorFlow and OpenMP read these when they start)."""
    if threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _run_steps(args: argparse.Namespace) -> int:
    _apply_threads(args.threads)
    from training import onnx_members, steps  # noqa: PLC0415 (after the thread settings)

    started = time.time()
    for step in PIPELINE if args.step == "all" else (args.step,):
        t0 = time.time()
        result = getattr(onnx_members if step == "onnx" else steps, f"run_{step}")(args)
        print(json.dumps({"step": step, "seconds": round(time.time() - t0, 1), **(result or {})}, default=str), flush=True)
    if args.step == "all":
        print(f"all steps done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


def _command(action: Callable[[argparse.Namespace], Any], argv: list[str]) -> Any:
    """The click command behind the Typer app, recording the command line each training run keeps."""
    return typer.main.get_command(_app(action, "python -m training " + " ".join(argv)))


def parse(argv: list[str]) -> argparse.Namespace:
    """The settings ``python -m training STEP ...`` would run with, without running it (scripts, tests)."""
    argv = list(argv)
    return _command(lambda args: args, argv).main(argv, prog_name=PROG, standalone_mode=False)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code as dermscore's: 0 done, 2 a bad option or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _command(_run_steps, argv).main(argv, prog_name=PROG)
    except SystemExit as exc:  # Typer's standalone mode ends with the exit code (usage errors: 2)
        return exc.code if isinstance(exc.code, int) else 0
    return 0
