"""The pipeline steps behind ``python -m training <step>``; each reads and writes files in ``--work``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dermscore.runtime import cpu_model
from training import data, ensemble, metrics, report, shift, split
from training.models import ARCHITECTURES
from training.train import (
    CPU_PRESETS,
    GPU_PRESETS,
    HISTORY_FIELDS,
    SCRATCH_GPU_PRESETS,
    SHIFT_CPU_PRESETS,
    SHIFT_GPU_PRESETS,
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


PRESETS = {
    "cpu": CPU_PRESETS,
    "scratch-gpu": SCRATCH_GPU_PRESETS,
    "shift-cpu": SHIFT_CPU_PRESETS,
    "shift-gpu": SHIFT_GPU_PRESETS,
    "gpu": GPU_PRESETS,
}


def member_config(args: argparse.Namespace, member: str) -> TrainConfig:
    preset = PRESETS[args.preset][member]
    config = with_overrides(
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
        colour_constancy_p=args.colour_constancy,
        dihedral=args.dihedral,
        rotation=args.rotation,
        zoom=args.zoom,
        crop_scale=args.crop_scale,
        white_balance=args.white_balance,
        gamma=args.gamma,
        blur=args.blur,
        ema_momentum=args.ema_momentum,
        exclude_source=args.exclude_source,
    )
    # 0 on the command line switches these optional components off.
    return replace(config, colour_constancy_p=config.colour_constancy_p or None, ema_momentum=config.ema_momentum or None)


def member_folder(args: argparse.Namespace, member: str) -> Path:
    """``members/<member>``, or ``members/<member>-without-<source>`` for a run that leaves a source out."""
    suffix = f"-without-{args.exclude_source}" if getattr(args, "exclude_source", None) else ""
    return args.work / "members" / f"{member}{suffix}"


def _sources(args: argparse.Namespace, image_ids: list[str]) -> np.ndarray:
    """Each image's HAM10000 source (``unknown`` for all when the data has no sources file)."""
    path = args.sources or args.data / shift.SOURCES_FILE
    return shift.sources_of(image_ids, shift.read_sources(path) if path.is_file() else {})


def member_run(args: argparse.Namespace, member: str) -> MemberRun:
    """The member's folder with the config it was started with (a resumed run never changes settings)."""
    records = _records(args)
    sides = _split(args, records)
    folder = member_folder(args, member)
    config = resume_config(folder, member_config(args, member))
    images = data.load_image_cache(records, config.input_size, RESIZE, args.work / "cache")
    train, val = sides["train"], sides["val"]
    if config.exclude_source:
        sources = _sources(args, [r.image_id for r in records])
        if not (sources == config.exclude_source).any():
            raise ValueError(f"--exclude-source {config.exclude_source}: no image of that source in {args.data}")
        train, val = train[sources[train] != config.exclude_source], val[sources[val] != config.exclude_source]
    return MemberRun(folder, config, images, data.labels_of(records), train, val)


def _deadline(stop_at: str | None) -> float | None:
    """'HH:MM' or 'HH:MM:SS' (UTC, today or, if already past, tomorrow) -> Unix time."""
    if not stop_at:
        return None
    hours, minutes, seconds = ([int(v) for v in stop_at.split(":")] + [0])[:3]
    now = time.time()
    midnight = now - now % 86400
    deadline = midnight + hours * 3600 + minutes * 60 + seconds
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


WARM_START = "warm_start.json"


def record_warm_start(folder: Path, warm_start: Path) -> None:
    """What a run continues from, as it was when the run started: the file's hash and, when it is a member of a
    shipped bundle, that bundle's identity and the member's recorded training and per-epoch history.

    The record is what lets the new bundle's card list every stage a member went through, even after the bundle it
    started from has been replaced in place (``export`` into the same folder).
    """
    from dermscore.bundle import MANIFEST, read_bundle, sha256_file  # noqa: PLC0415

    record: dict = {"file": str(warm_start), "sha256": sha256_file(warm_start)}
    if (warm_start.parent / MANIFEST).is_file():
        bundle = read_bundle(warm_start.parent)
        member = next((m for m in bundle.members if m.file == warm_start.name), None)
        training = bundle.provenance.get("training", {}).get("members", {})
        if member is not None and member.sha256 == record["sha256"] and member.name in training:
            history = warm_start.parent / "figures" / f"history_{member.name}.csv"
            with open(history, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            record["bundle"] = {"name": bundle.name, "version": bundle.version, "identity": bundle.identity,
                                "member": member.name, "training": training[member.name], "history": rows}
    (folder / WARM_START).write_text(json.dumps(record, indent=1), encoding="utf-8")


def run_train(args: argparse.Namespace) -> dict:
    results = {}
    for member in args.members:
        run = member_run(args, member)
        command = run.folder / "command.txt"
        if not command.is_file():  # the command that started the run; a resume does not overwrite it
            run.folder.mkdir(parents=True, exist_ok=True)
            command.write_text(args.command + "\n")
            if run.config.warm_start:
                record_warm_start(run.folder, Path(run.config.warm_start))
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
    """Test figures of the members and the ensemble, per source and on the device-shifted copy.

    With ``--bundle``: the same for a shipped bundle, scored through dermscore. With ``--exclude-source``:
    the members trained without that source, on every image of it.
    """
    if args.bundle:
        return evaluate_bundle(args)
    if args.exclude_source:
        return evaluate_held_out(args)
    predictions, priors, sides, labels = _predictions(args)
    choice = _ensemble_choice(args)
    test = _adjusted_test(predictions, priors, choice)
    results = evaluate_all(test, choice["weights"], labels[sides["test"]])
    folder = args.work / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        report.confusion_figure(np.array(result["confusion_matrix"]), f"{name}: test", folder / f"confusion_{name}")
    checks = shift_checks(args, choice, priors, test)
    (folder / "metrics.json").write_text(json.dumps({**results, "shift": checks}, indent=1))
    return {
        **{name: {"balanced_accuracy": r["balanced_accuracy"], "accuracy": r["accuracy"]} for name, r in results.items()},
        "device_shift_drop": {n: m["device_shift"]["balanced_accuracy"]["drop"] for n, m in checks["models"].items()},
    }


def _adjusted_test(predictions: dict, priors: dict, choice: dict) -> dict[str, np.ndarray]:
    """Each ensemble member's test probabilities as the ensemble uses them (its TTA choice, prior correction)."""
    key = "test_tta" if choice["tta"] else "test"
    return {m: ensemble.adjust(predictions[m][key], priors[m], choice["prior_correction"]) for m in choice["members"]}


def _shifted_test_copy(args: argparse.Namespace, files: dict[str, Path]) -> tuple[dict[str, Path], shift.DeviceShift]:
    device = shift.DeviceShift()
    return shift.write_shifted_copy(files, shift.shifted_folder(args.work, device), device), device


def shift_checks(args: argparse.Namespace, choice: dict, priors: dict, test: dict[str, np.ndarray]) -> dict:
    """Per-source and device-shift figures of the work folder's members (``test``: adjusted test probabilities).

    The shifted copy is a folder of real JPEGs; each member reads it through the same cache, colour
    constancy and normalisation as the plain test images, with the ensemble's TTA and prior correction.
    """
    records = _records(args)
    sides = _split(args, records)
    tests = [records[i] for i in sides["test"]]
    files, device = _shifted_test_copy(args, {r.image_id: Path(r.path) for r in tests})
    shifted_records = [replace(r, path=str(files[r.image_id])) for r in tests]
    key = "test_tta" if choice["tta"] else "test"
    shifted = {}
    for member in choice["members"]:
        run = member_run(args, member)
        cache = args.work / "cache" / "device_shift"
        images = data.load_image_cache(shifted_records, run.config.input_size, RESIZE, cache)
        path = run.folder / f"predictions_{shift.shifted_folder(args.work, device).name}.npz"
        raw = ensemble.member_predictions(replace(run, images=images), {"test": np.arange(len(tests))}, path, ("test",))
        shifted[member] = ensemble.adjust(raw[key], priors[member], choice["prior_correction"])
    weights = tuple(choice["weights"].values())
    plain = {**test, "ensemble": ensemble.combine([test[m] for m in choice["weights"]], weights)}
    shifted["ensemble"] = ensemble.combine([shifted[m] for m in choice["weights"]], weights)
    y = data.labels_of(tests)
    return shift.shift_report(plain, shifted, y, _sources(args, [r.image_id for r in tests]), device)


def evaluate_held_out(args: argparse.Namespace) -> dict:
    """Members trained without ``--exclude-source``: on every image of that source, and per source on test.

    Raw member outputs (no ensemble, no prior correction: nothing was fitted for these runs).
    """
    records = _records(args)
    sides = _split(args, records)
    labels = data.labels_of(records)
    sources = _sources(args, [r.image_id for r in records])
    source = args.exclude_source
    held_out = np.flatnonzero(sources == source)
    results = {}
    for member in args.members:
        run = member_run(args, member)
        p = ensemble.member_predictions(
            run, {"held_out": held_out, "test": sides["test"]}, run.folder / "predictions_held_out.npz", ("held_out", "test")
        )
        results[member] = {
            "held_out": shift.held_out_report(labels[held_out], p["held_out"], source),
            "held_out_tta": shift.held_out_report(labels[held_out], p["held_out_tta"], source),
            "per_source_test": shift.per_source(labels[sides["test"]], p["test"], sources[sides["test"]]),
            "machines": json.loads((run.folder / "machine.json").read_text()) if (run.folder / "machine.json").is_file() else [],
        }
    folder = args.work / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"held_out_{source}.json").write_text(json.dumps(results, indent=1))
    return {m: r["held_out"] for m, r in results.items()}


def evaluate_bundle(args: argparse.Namespace) -> dict:
    """A shipped bundle on its own test images through dermscore: figures, per source, device shift.

    Scored by ``training.bundle_scores`` (dermscore's decoding, preprocessing and Predictor), cached under
    ``--work/bundle-scores/`` in chunks and shared with ``calibrate``, so an interrupted run continues and a
    bundle calibrated in this work folder is not scored twice.
    """
    from dermscore.aggregate import ensemble  # noqa: PLC0415
    from dermscore.bundle import load_bundle  # noqa: PLC0415
    from training import bundle_scores  # noqa: PLC0415
    from training.fit_bundle import feature_views  # noqa: PLC0415

    bundle = load_bundle(args.bundle)
    rows = [r for r in bundle_scores.split_rows(bundle) if r["split"] == "test"]
    ids = [r["image_id"] for r in rows]
    y = np.array([bundle.classes.index(r["dx"]) for r in rows], dtype=np.int64)
    files = dict(zip(ids, bundle_scores.image_paths(args.data, ids)))
    scorer = bundle_scores.Scorer(bundle, feature_views(bundle), args.work, backend=args.backend)

    def probabilities(name: str, paths: list[Path]) -> dict[str, np.ndarray]:
        scores = scorer(name, paths)
        members = {m.name: scores[m.name] for m in bundle.members}
        return {**members, "ensemble": ensemble(members, bundle)}

    folder = args.work / "evaluation" / f"bundle_{bundle.name}_{bundle.version}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    plain = probabilities("test", [files[i] for i in ids])
    shifted_files, device = _shifted_test_copy(args, files)
    shifted = probabilities("test-device-shifted", [shifted_files[i] for i in ids])
    results = {name: metrics.evaluate(y, p) for name, p in plain.items()}
    results["shift"] = shift.shift_report(plain, shifted, y, _sources(args, ids), device)
    results["bundle"] = {"name": bundle.name, "version": bundle.version, "identity": bundle.identity}
    results["scored_on"] = {
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_this_run": round(time.time() - started, 1),
    }
    (folder / "metrics.json").write_text(json.dumps(results, indent=1))
    return {
        "metrics": folder / "metrics.json",
        **{n: m["device_shift"]["balanced_accuracy"] for n, m in results["shift"]["models"].items()},
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
    """How a member was trained: its run plus, for a warm start, the runs it continued (earliest first): work
    folders followed through their ``best.keras``, a shipped bundle's member through the run's ``warm_start.json``.

    Writes the combined per-epoch history (epochs numbered across stages, ``phase`` naming the stage).
    """
    stages, histories, folder = [], [], run.folder
    while folder is not None:
        summary, rows = _stage(folder, len(run.train_indices))
        stages.insert(0, summary)
        histories.insert(0, rows)
        warm = summary["hyperparameters"].get("warm_start")
        record = json.loads((folder / WARM_START).read_text()) if (folder / WARM_START).is_file() else {}
        if "bundle" in record:  # continued a shipped member: its recorded stages, one history per stage
            shipped = record["bundle"]
            summary["warm_start_from"] = f"{shipped['identity']} member {shipped['member']} (sha256 {record['sha256']})"
            earlier = shipped["training"]["stages"]
            stages[:0] = earlier
            histories[:0] = [[{**r, "phase": r["phase"].split(":", 1)[1]} for r in shipped["history"]
                              if r["phase"].startswith(f"stage{n}:")] for n in range(1, len(earlier) + 1)]
            break
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


def _shift_provenance(args: argparse.Namespace, choice: dict) -> dict:
    """Per-source and device-shift figures for the card (float32 members, as ``evaluate`` computed them), and
    held-out-source runs where ``evaluate --exclude-source`` left their results in the work folder."""
    predictions, priors, _, _ = _predictions(args)
    held_out = {p.stem.removeprefix("held_out_"): json.loads(p.read_text())
                for p in sorted((args.work / "evaluation").glob("held_out_*.json"))}
    checks = shift_checks(args, choice, priors, _adjusted_test(predictions, priors, choice))
    return {"shift": checks, **({"held_out_sources": held_out} if held_out else {})}


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
    previous = export.previous_bundle(out, args.work)  # read before the new bundle replaces it
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "figures").mkdir(parents=True)

    runs = {member: member_run(args, member) for member in choice["members"]}
    constancy = {run.config.constancy for run in runs.values()}
    if len(constancy) > 1:  # dermscore prepares each image once per input size, with the bundle's one setting
        raise ValueError(f"members trained with different colour constancy ({constancy}) cannot share a bundle")
    constancy = constancy.pop()
    members, shipped, float32, storage, training = [], {}, {}, {}, {}
    for member, run in runs.items():
        model = export.clean_member(run.folder / "best.keras", run.config)
        prior = np.maximum(np.asarray(choice["priors"][member]), 1e-12)
        export.shift_output_bias(model, -choice["prior_correction"] * np.log(prior))
        if choice["tta"]:
            model = export.flip_averaged(model)
        float32[member] = predict(model, run.images, sides["test"], run.config.preprocessing, constancy)
        file = export.save_member(model, staging / f"{member}.keras", args.float16)
        reloaded = keras.models.load_model(file, compile=False)
        shipped[member] = predict(reloaded, run.images, sides["test"], run.config.preprocessing, constancy)
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
        **({"colour_constancy": constancy.to_json()} if constancy else {}),
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
            **_shift_provenance(args, choice),
            **({"previous": previous} if previous else {}),
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
    return fit_bundle(bundle, args.data, args.work, args.version, args.train_limit or None, args.ood_crops,
                      backend=args.backend)
