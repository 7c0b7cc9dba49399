"""The pipeline steps behind ``python -m training <step>``; each reads and writes files in ``--work``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training import data, split
from training.models import ARCHITECTURES
from training.train import CPU_PRESETS, GPU_PRESETS, MemberRun, TrainConfig, resume_config, with_overrides

RESIZE = "bilinear"


def _records(args: argparse.Namespace) -> list[data.Record]:
    path = args.work / "index.csv"
    if not path.is_file():
        run_index(args)
    return data.read_index(path)


def _split(args: argparse.Namespace, records: list[data.Record]) -> dict[str, np.ndarray]:
    path = args.work / "split.csv"
    if not path.is_file():
        run_split(args)
    return split.split_indices(records, split.read_split(path))


def run_index(args: argparse.Namespace) -> dict:
    records, problems = data.build_index(args.metadata, data.image_folders(args.data))
    index_path, problems_path = data.write_index(records, problems, args.work)
    kinds: dict[str, int] = {}
    for problem in problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
    for problem in problems[:20]:
        print(f"  {problem.kind}: {problem.image_id}: {problem.detail}")
    if problems:
        print(f"{len(problems)} problems, all listed in {problems_path}")
    return {"images": len(records), "problems": kinds, "index": index_path}


def run_split(args: argparse.Namespace) -> dict:
    records = _records(args)
    side_of = split.lesion_split(records, args.val_fraction, args.test_fraction, args.seed)
    path = split.write_split(records, side_of, args.work / "split.csv")
    summary = split.split_summary(records, side_of, path)
    return {"images": summary["images"], "lesions": summary["lesions"], "split": path}


def member_config(args: argparse.Namespace, member: str) -> TrainConfig:
    preset = (CPU_PRESETS if args.preset == "cpu" else GPU_PRESETS)[member]
    return with_overrides(
        preset,
        input_size=args.input_size,
        init=args.init,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sampling_power=args.sampling_power,
        class_weight_power=args.class_weight_power,
        label_smoothing=args.label_smoothing,
        patience=args.patience,
        head_epochs=args.head_epochs,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
    )


def member_run(args: argparse.Namespace, member: str) -> MemberRun:
    """The member's folder with the config it was started with (a resumed run never changes settings)."""
    records = _records(args)
    sides = _split(args, records)
    folder = args.work / "members" / member
    config = resume_config(folder, member_config(args, member))
    images = data.load_image_cache(records, config.input_size, RESIZE, args.work / "cache")
    return MemberRun(folder, config, images, data.labels_of(records), sides["train"], sides["val"])


def run_train(args: argparse.Namespace) -> dict:
    results = {}
    for member in args.members:
        run = member_run(args, member)
        state = run.fit()
        results[member] = {"best_val_balanced_accuracy": state["best"], "best_epoch": state["best_epoch"],
                           "epochs": state["epoch"]}
    return results
