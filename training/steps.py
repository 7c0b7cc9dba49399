"""The pipeline steps behind ``python -m training <step>``; each reads and writes files in ``--work``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dermscore.runtime import cpu_model
from training import data, ensemble, metrics, report, split
from training.models import ARCHITECTURES
from training.train import (
    CPU_PRESETS,
    GPU_PRESETS,
    HISTORY_FIELDS,
    SCRATCH_GPU_PRESETS,
    MemberRun,
    TrainConfig,
    epoch_steps,
    resume_config,
    training_prior,
    with_overrides,
)

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
    preset = {"cpu": CPU_PRESETS, "scratch-gpu": SCRATCH_GPU_PRESETS, "gpu": GPU_PRESETS}[args.preset][member]
    return with_overrides(
        preset,
        input_size=args.input_size,
        init=args.init,
        warm_start=str(args.warm_start) if args.warm_start else None,
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
        run_eagerly=args.eager or None,
        time_budget=args.time_budget * 60 if args.time_budget else None,
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


def _deadline(stop_at: str | None) -> float | None:
    """'HH:MM' (UTC, today or, if already past, tomorrow) -> Unix time."""
    if not stop_at:
        return None
    hours, minutes = (int(v) for v in stop_at.split(":"))
    now = time.time()
    midnight = now - now % 86400
    deadline = midnight + hours * 3600 + minutes * 60
    return deadline if deadline > now else deadline + 86400


def machine_description() -> str:
    """The accelerator (or CPU) and software a run used, so each member's figures name where they came from.

    Asked of nvidia-smi and /proc/cpuinfo rather than the backend, whose device names ("gpu:0") say
    nothing about the hardware.
    """
    import subprocess  # noqa: PLC0415

    import keras  # noqa: PLC0415

    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpus = ""
    backend = keras.config.backend()
    backend_version = __import__(backend).__version__ if backend in ("jax", "tensorflow", "torch") else ""
    hardware = f"{'; '.join(gpus.splitlines())} with " if gpus else ""
    return f"{hardware}{os.cpu_count()} CPU cores ({cpu_model()}); Keras {keras.__version__}, {backend} {backend_version}".strip()


def record_machine(path: Path) -> None:
    """Append this session to the run's machine log: a resumed run may continue on another machine."""
    sessions = json.loads(path.read_text()) if path.is_file() else []
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_description()})
    path.write_text(json.dumps(sessions, indent=1))


def run_train(args: argparse.Namespace) -> dict:
    results = {}
    for member in args.members:
        run = member_run(args, member)
        command = run.folder / "command.txt"
        if not command.is_file():  # the command that started the run; a resume does not overwrite it
            run.folder.mkdir(parents=True, exist_ok=True)
            command.write_text(args.command + "\n")
        record_machine(run.folder / "machine.json")
        state = run.fit(_deadline(args.stop_at))
        results[member] = {
            "best_val_balanced_accuracy": state["best"],
            "best_epoch": state["best_epoch"],
            "epochs": state["epoch"],
        }
    return results


def run_eda(args: argparse.Namespace) -> dict:
    records = _records(args)
    tables = report.distributions(records, args.work / "eda")
    return {"eda": args.work / "eda", "classes": tables["class"]}


def _predictions(args: argparse.Namespace) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Each member's val/test probabilities and training prior, the split indices and all labels."""
    records = _records(args)
    sides = _split(args, records)
    labels = data.labels_of(records)
    predictions, priors = {}, {}
    for member in args.members:
        run = member_run(args, member)
        predictions[member] = ensemble.member_predictions(run, sides, run.folder / "predictions.npz")
        priors[member] = training_prior(run.config, labels[sides["train"]])
    return predictions, priors, sides, labels


def run_ensemble(args: argparse.Namespace) -> dict:
    predictions, priors, sides, labels = _predictions(args)
    result = ensemble.fit_ensemble(predictions, priors, labels[sides["val"]], args.tta)
    ensemble.save(result, args.work / "ensemble.json")
    return {k: v for k, v in result.items() if k != "grid"}


def _ensemble_choice(args: argparse.Namespace) -> dict:
    path = args.work / "ensemble.json"
    if not path.is_file():
        run_ensemble(args)
    return json.loads(path.read_text())


def evaluate_all(test_probs: dict[str, np.ndarray], weights: dict[str, float], y_test: np.ndarray) -> dict:
    """Test metrics of every member and of the weighted ensemble."""
    results = {member: metrics.evaluate(y_test, probs) for member, probs in test_probs.items()}
    combined = ensemble.combine([test_probs[m] for m in weights], tuple(weights.values()))
    results["ensemble"] = metrics.evaluate(y_test, combined)
    return results


def run_evaluate(args: argparse.Namespace) -> dict:
    predictions, priors, sides, labels = _predictions(args)
    choice = _ensemble_choice(args)
    key = "test_tta" if choice["tta"] else "test"
    test = {m: ensemble.adjust(p[key], priors[m], choice["prior_correction"]) for m, p in predictions.items()}
    results = evaluate_all(test, choice["weights"], labels[sides["test"]])
    folder = args.work / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        report.confusion_figure(np.array(result["confusion_matrix"]), f"{name}: test", folder / f"confusion_{name}")
    (folder / "metrics.json").write_text(json.dumps(results, indent=1))
    return {
        name: {"balanced_accuracy": r["balanced_accuracy"], "accuracy": r["accuracy"]} for name, r in results.items()
    }


ATTRIBUTION = (
    'HAM10000: Tschandl P., Rosendahl C., Kittler H. "The HAM10000 dataset, a large collection of multi-source '
    'dermatoscopic images of common pigmented skin lesions." Scientific Data 5, 180161 (2018). '
    "doi:10.1038/sdata.2018.161. Licence: CC BY-NC 4.0 (attribution, non-commercial); the weights derived from it "
    "are shared under the same terms."
)
INTENDED_USE = (
    "Research decision support for dermatoscopic images of pigmented skin lesions: ranking and triage studies, "
    "method development. Not a diagnosis and not a medical device; a clinician decides."
)
UNCALIBRATED = (  # replaced by training.fit_bundle once calibration and operating points are fitted
    "Probabilities are not calibrated for clinical thresholds (see ECE); "
    "sensitivity/specificity trade-offs must be validated locally."
)
STRONGER_BUNDLE = (
    "On a machine with a GPU and internet: `python -m training all --preset gpu` trains both members from "
    "ImageNet weights at 299x299 (InceptionV3) and 224x224 (DenseNet201), a 3-epoch head phase then full "
    "fine-tuning with frozen BatchNorm, mixed precision, on the full-resolution HAM10000 download "
    "(`--data` pointing at the folder with HAM10000_metadata.csv and HAM10000_images_part_1/_part_2). Its time "
    "per epoch and its accuracy have not been measured: the machines that trained this bundle could not download "
    "ImageNet weights. The per-epoch log (`history.csv`) of such a run records both. Offline, `--init PATH` "
    "takes locally stored ImageNet backbone weights. Without ImageNet weights, `--preset scratch-gpu` with "
    "`--time-budget MINUTES` trains from scratch at 150x200 under any Keras backend (see Training for what one "
    "such run gave)."
)


def _stage(folder: Path, train_images: int) -> tuple[dict, list[dict]]:
    """One training run's summary and history rows, from the files it left in its folder."""
    with open(folder / "history.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    state = json.loads((folder / "state.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    command_file = folder / "command.txt"
    machine_file = folder / "machine.json"
    seconds = sum(float(r["seconds"]) for r in rows)
    summary = {
        "command": command_file.read_text().strip() if command_file.is_file() else "unknown",
        "machines": sorted({s["machine"] for s in json.loads(machine_file.read_text())}) if machine_file.is_file() else [],
        "epochs_run": len(rows),
        "steps_per_epoch": epoch_steps(config["steps_per_epoch"], config["batch_size"], train_images),
        "batch_size": config["batch_size"],
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / max(len(rows), 1), 1),
        "epochs_fitted_to_time_budget": state.get("fitted_end"),
        "best_epoch": state["best_epoch"],
        "best_val_balanced_accuracy": round(state["best"], 4),
        "early_stopped": bool(state.get("stopped")),
        "hyperparameters": config,
    }
    return summary, rows


def _member_training(run: MemberRun, history_path: Path) -> dict:
    """How a member was trained: its run plus, for a warm start, the runs it continued (earliest first).

    Writes the combined per-epoch history (epochs numbered across stages, ``phase`` naming the stage).
    """
    stages, histories, folder = [], [], run.folder
    while folder is not None:
        summary, rows = _stage(folder, len(run.train_indices))
        stages.insert(0, summary)
        histories.insert(0, rows)
        warm = summary["hyperparameters"].get("warm_start")
        folder = Path(warm).parent if warm and (Path(warm).parent / "history.csv").is_file() else None
    with open(history_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        epoch = 0
        for number, rows in enumerate(histories, start=1):
            for row in rows:
                epoch += 1
                writer.writerow({**row, "epoch": epoch, "phase": f"stage{number}:{row['phase']}"})
    seconds = sum(s["seconds"] for s in stages)
    epochs = sum(s["epochs_run"] for s in stages)
    return {
        "stages": stages,
        "epochs_run": epochs,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / max(epochs, 1), 1),
        "best_val_balanced_accuracy": stages[-1]["best_val_balanced_accuracy"],
    }


def run_export(args: argparse.Namespace) -> dict:
    """Clean float32 members -> (float16) .keras files, re-evaluated from the written files, + manifest and card."""
    import keras  # noqa: PLC0415

    from dermscore.bundle import CLASS_CODES, DEFAULT_BUNDLE, DEFAULT_MALIGNANT, models_dir, write_manifest  # noqa: PLC0415
    from training import export, modelcard  # noqa: PLC0415
    from training.train import predict  # noqa: PLC0415

    records = _records(args)
    sides = _split(args, records)
    y_test = data.labels_of(records)[sides["test"]]
    choice = _ensemble_choice(args)
    out = Path(args.out or models_dir() / DEFAULT_BUNDLE)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "figures").mkdir(parents=True)

    members, shipped, float32, storage, training = [], {}, {}, {}, {}
    for member in choice["members"]:
        run = member_run(args, member)
        model = export.clean_member(run.folder / "best.keras", run.config)
        prior = np.maximum(np.asarray(choice["priors"][member]), 1e-12)
        export.shift_output_bias(model, -choice["prior_correction"] * np.log(prior))
        if choice["tta"]:
            model = export.flip_averaged(model)
        float32[member] = predict(model, run.images, sides["test"], run.config.preprocessing)
        file = export.save_member(model, staging / f"{member}.keras", args.float16)
        reloaded = keras.models.load_model(file, compile=False)
        shipped[member] = predict(reloaded, run.images, sides["test"], run.config.preprocessing)
        storage[member] = {
            "bytes": file.stat().st_size,
            "max_abs_probability_difference": float(np.abs(shipped[member] - float32[member]).max()),
            "test_predictions_changed": int((shipped[member].argmax(1) != float32[member].argmax(1)).sum()),
        }
        training[member] = _member_training(run, staging / "figures" / f"history_{member}.csv")
        arch = ARCHITECTURES[member]
        members.append(
            {
                "name": member,
                "architecture": arch.name,
                "file": file.name,
                "input_size": list(run.config.input_size),
                "preprocessing": arch.preprocessing,
                "resize": RESIZE,
                "weight": choice["weights"][member],
            }
        )

    results = evaluate_all(shipped, choice["weights"], y_test)
    results_float32 = evaluate_all(float32, choice["weights"], y_test)
    for name, result in results.items():
        report.confusion_figure(
            np.array(result["confusion_matrix"]),
            f"{name}: test ({len(y_test)} images)",
            staging / "figures" / f"confusion_{name}",
        )
    report.learning_curves(
        {m: staging / "figures" / f"history_{m}.csv" for m in choice["members"]},
        staging / "figures" / "learning_curves.png",
    )
    shutil.copy2(args.work / "split.csv", staging / "split.csv")
    split_info = split.split_summary(records, split.read_split(args.work / "split.csv"), staging / "split.csv")
    split_info["seed"] = args.seed
    dtype = "float16" if args.float16 else "float32"
    ens_f32, ens_shipped = results_float32["ensemble"], results["ensemble"]
    manifest = {
        "name": out.name if args.out else DEFAULT_BUNDLE,
        "version": args.version,
        "classes": list(CLASS_CODES),
        "malignant_classes": list(DEFAULT_MALIGNANT),
        "members": members,
        "intended_use": INTENDED_USE,
        "provenance": {
            "training_data": {"attribution": ATTRIBUTION, "source": str(args.data.name), "images": len(records)},
            "split": split_info,
            "metrics": results,
            "ensemble": {k: v for k, v in choice.items() if k != "grid"},
            "weights_storage": {
                "dtype": dtype,
                "members": storage,
                "float32_test_metrics": {
                    n: {"accuracy": r["accuracy"], "balanced_accuracy": r["balanced_accuracy"]}
                    for n, r in results_float32.items()
                },
                "summary": (
                    f"{dtype} arrays in each .keras file (loaded into float32 variables). Ensemble test balanced "
                    f"accuracy {ens_shipped['balanced_accuracy']:.4f} as shipped vs {ens_f32['balanced_accuracy']:.4f} "
                    f"in float32; accuracy {ens_shipped['accuracy']:.4f} vs {ens_f32['accuracy']:.4f}; largest "
                    f"probability change {max(s['max_abs_probability_difference'] for s in storage.values()):.2e}."
                ),
            },
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training": {
                "summary": (
                    f"Both members were trained from scratch (no ImageNet weights) on the {args.data.name} copy of "
                    "HAM10000; see Training for each member's machine and time."
                    if all(t["stages"][0]["hyperparameters"]["init"] == "none" for t in training.values())
                    else "Members were fine-tuned from pretrained backbone weights; see Training."
                ),
                "exported_on": machine_description(),
                "members": training,
            },
            "limitations": [
                "Trained and tested on HAM10000 only (mostly fair-skinned European/Australian patients, "
                "dermatoscopic images); performance on other populations, devices or clinical photos is unknown.",
                "Classes outside the seven HAM10000 diagnoses (e.g. squamous cell carcinoma other than in situ, "
                "non-pigmented lesions) are forced into one of the seven.",
                "Rare classes (df, vasc, akiec) have few test images, so their recall figures are uncertain by "
                "+-10 points or more.",
                UNCALIBRATED,
            ],
            "stronger_bundle": STRONGER_BUNDLE,
        },
    }
    write_manifest(staging, manifest)
    (staging / "MODEL_CARD.md").write_text(modelcard.render(manifest), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    args.bundle = out
    return {
        "bundle": out,
        **{n: {"balanced_accuracy": r["balanced_accuracy"], "accuracy": r["accuracy"]} for n, r in results.items()},
        "calibrate": run_calibrate(args),  # a new bundle gets calibration, OOD detector and operating points too
    }


def run_calibrate(args: argparse.Namespace) -> dict:
    """Calibration, OOD detector and operating points fitted from a bundle's own split (``training.fit_bundle``)."""
    from dermscore.bundle import DEFAULT_BUNDLE, models_dir  # noqa: PLC0415
    from training.fit_bundle import fit_bundle  # noqa: PLC0415

    bundle = Path(args.bundle or args.out or models_dir() / DEFAULT_BUNDLE)
    return fit_bundle(bundle, args.data, args.work, args.version, args.train_limit or None, args.ood_crops)
