"""Command line: one command per step and ``all`` to run them in order.

    python -m training index      # metadata + images -> index.csv (+ index_problems.csv)
    python -m training split      # lesion-level train/val/test -> split.csv
    python -m training eda        # class / age / sex / body-site distributions (CSV + PNG)
    python -m training train --member inceptionv3   # resumes automatically from its last checkpoint
    python -m training ensemble   # member weights fitted on validation
    python -m training evaluate   # test metrics, confusion matrices
    python -m training export     # bundle folder for dermscore (then calibrate on it)
    python -m training calibrate --bundle models/ham10000-ensemble   # calibration, OOD detector, operating
                                  # points fitted from a bundle's own split; rewrites it as --version
    python -m training onnx --bundle models/ham10000-ensemble   # ships each member's ONNX graph in the
                                  # bundle (after calibrate), so the first run never exports
    python -m training all        # everything above, both members

Everything intermediate goes to ``--work`` (default ``training-work/``); only ``export`` writes the
bundle. Keras is imported after ``--threads`` is applied, because thread pools are sized when the
backend starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000-200x150"
MEMBERS = ("inceptionv3", "densenet201")


def _size(text: str) -> tuple[int, int]:
    """'75x100' -> (75, 100): height x width."""
    height, width = text.lower().split("x")
    return int(height), int(width)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("index", "split", "eda", "train", "ensemble", "evaluate", "export", "calibrate", "onnx", "all"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with HAM10000_metadata.csv and images")
    parser.add_argument("--metadata", type=Path, help="metadata CSV (default: DATA/HAM10000_metadata.csv)")
    parser.add_argument("--work", type=Path, default=REPO / "training-work", help="working folder (checkpoints, logs)")
    parser.add_argument("--out", type=Path, help="bundle folder for export (default: models/ham10000-ensemble)")
    parser.add_argument("--bundle", type=Path, help="bundle folder for calibrate and onnx (default: --out, else the default bundle)")
    parser.add_argument(
        "--train-limit",
        type=int,
        default=2000,
        help="calibrate: training images scored for the OOD statistics (a seeded random subset; 0 = all)",
    )
    parser.add_argument("--ood-crops", type=int, default=12, help="calibrate: random crops per non-dermoscopic image")
    parser.add_argument("--member", choices=MEMBERS, action="append", help="member(s) to train; default both")
    parser.add_argument(
        "--preset",
        choices=("cpu", "scratch-gpu", "gpu"),
        default="cpu",
        help="cpu: from scratch, low resolution (the shipped DenseNet201); scratch-gpu: from scratch at 150x200 "
        "(the shipped InceptionV3); gpu: ImageNet initialisation at 299/224",
    )
    parser.add_argument("--input-size", type=_size, help="HEIGHTxWIDTH, e.g. 75x100")
    parser.add_argument("--init", help="imagenet, none, or a local backbone weights file")
    parser.add_argument("--warm-start", type=Path, help="trained classifier .keras to continue from (new schedule)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--sampling-power", type=float)
    parser.add_argument("--class-weight-power", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--head-epochs", type=int)
    parser.add_argument("--eager", action="store_true", help="no graph compilation (smoke tests of a few steps)")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--seed", type=int, default=42, help="split and training seed")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="fit and evaluate with flip test-time augmentation; export then ships members that average "
        "their four flipped views inside the model, so dermscore scores with it",
    )
    parser.add_argument(
        "--float16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store exported weights as float16 (loaded back as float32)",
    )
    parser.add_argument("--version", default=time.strftime("%Y.%m.%d"), help="bundle version")
    parser.add_argument("--stop-at", help="HH:MM UTC: end training after the last epoch that finishes before it")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="minutes per member: once a quarter of it has passed (and three epochs), the number of epochs "
        "(at most --epochs) is fitted to it",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for the backend (default: all)")
    return parser


def _apply_threads(threads: int | None) -> None:
    """Size the backend's thread pools (TensorFlow and OpenMP read these when they start)."""
    if threads:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.command = "python -m training " + " ".join(argv)  # recorded with each training run
    _apply_threads(args.threads)
    from training import onnx_members, steps  # noqa: PLC0415 (after the thread settings)

    args.metadata = args.metadata or args.data / "HAM10000_metadata.csv"
    args.members = tuple(args.member or MEMBERS)
    started = time.time()
    order = ("index", "split", "eda", "train", "ensemble", "evaluate", "export") if args.step == "all" else (args.step,)
    for step in order:
        t0 = time.time()
        result = getattr(onnx_members if step == "onnx" else steps, f"run_{step}")(args)
        print(
            json.dumps({"step": step, "seconds": round(time.time() - t0, 1), **(result or {})}, default=str), flush=True
        )
    if args.step == "all":
        print(f"all steps done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0
