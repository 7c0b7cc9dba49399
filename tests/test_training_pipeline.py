"""End to end on a small real subset of HAM10000: index -> split -> train both members -> ensemble ->
evaluate -> export -> load the bundle with dermscore; and resume after a run is killed with SIGKILL.

Small inputs (InceptionV3 at its 75x75 minimum, DenseNet201 at 32x32) and a few steps keep this to
minutes on CPU; the figures are meaningless, the plumbing is what is tested.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dermscore.bundle import CLASS_CODES, load_bundle

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ham10000-200x150"
PER_CLASS = 12


def _subset(folder: Path) -> Path:
    """Official download layout with ~PER_CLASS images per class, plus one of each kind of problem."""
    with open(DATA / "HAM10000_metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    chosen, taken = [], {code: 0 for code in CLASS_CODES}
    for row in rows:  # whole lesions, so the split has real multi-image lesions to keep together
        if taken[row["dx"]] < PER_CLASS or any(c["lesion_id"] == row["lesion_id"] for c in chosen[-3:]):
            chosen.append(row)
            taken[row["dx"]] += 1
    parts = [folder / "HAM10000_images_part_1", folder / "HAM10000_images_part_2"]
    for part in parts:
        part.mkdir(parents=True)
    for i, row in enumerate(chosen):
        shutil.copy2(DATA / "images" / f"{row['image_id']}.jpg", parts[i % 2])
    broken = dict(chosen[0], image_id="ISIC_broken", lesion_id="HAM_broken")
    (parts[0] / "ISIC_broken.jpg").write_bytes((DATA / "images" / f"{chosen[0]['image_id']}.jpg").read_bytes()[:300])
    missing = dict(chosen[1], image_id="ISIC_missing", lesion_id="HAM_missing")
    unknown = dict(chosen[2], image_id="ISIC_unknown", lesion_id="HAM_unknown", dx="scc")
    shutil.copy2(DATA / "images" / f"{chosen[2]['image_id']}.jpg", parts[1] / "ISIC_unknown.jpg")
    shutil.copy2(DATA / "images" / f"{chosen[3]['image_id']}.jpg", parts[1] / "ISIC_unlisted.jpg")
    with open(folder / "HAM10000_metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows([*chosen, broken, missing, unknown])
    return folder


def _common(data: Path, work: Path) -> list[str]:
    return [
        *("--data", str(data), "--work", str(work), "--batch-size", "8", "--patience", "5"),
        # One step an epoch: an eager step of these members takes 5-10 s on 2 cores, and nothing checked here depends
        # on the count (epochs of several steps run in test_gpu_run.py's dry run of the same `train`).
        *("--steps-per-epoch", "1"),
        "--eager",  # a few steps: compiling the training graphs would take longer than running them
        *("--ood-crops", "1"),  # export's calibrate: the non-dermoscopic set without crops is enough here
        # export's calibrate and evaluate --bundle score through dermscore's Keras backend: "auto" would export both
        # members to ONNX first (80 s of the export step on the 2-core EPYC, 2026-11-27). That export and its check
        # against Keras are tested in test_onnx_backend.py (these bundles' two-output graphs, on small members) and
        # test_cli_run.py (the real architectures at full size); the scores agree within 1e-4 either way.
        *("--backend", "keras"),
    ]


def _sizes(member: str) -> list[str]:
    return ["--member", member, "--input-size", "75x75" if member == "inceptionv3" else "32x32"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from training.cli import main

    root = tmp_path_factory.mktemp("pipeline")
    data, work, out = _subset(root / "data"), root / "work", root / "models" / "tiny-ensemble"
    common = _common(data, work)
    assert main(["index", *common]) == 0
    assert main(["split", *common]) == 0
    assert main(["eda", *common]) == 0
    for member in ("inceptionv3", "densenet201"):
        # Colour constancy on: export must write it into the manifest (bundles without it: test_colour_constancy.py).
        assert main(["train", *common, *_sizes(member), "--epochs", "1", "--colour-constancy", "6"]) == 0
    for step in ("ensemble", "evaluate", "export"):
        assert main([step, *common, "--out", str(out), "--version", "test"]) == 0
    return {"data": data, "work": work, "out": out}


def test_index_reports_problems_instead_of_dropping_silently(pipeline):
    with open(pipeline["work"] / "index_problems.csv", newline="", encoding="utf-8") as handle:
        problems = {row["image_id"]: row["kind"] for row in csv.DictReader(handle)}
    assert problems == {
        "ISIC_broken": "unreadable_image",
        "ISIC_missing": "missing_image",
        "ISIC_unknown": "unknown_label",
        "ISIC_unlisted": "unlisted_image",
    }
    with open(pipeline["work"] / "index.csv", newline="", encoding="utf-8") as handle:
        index = list(csv.DictReader(handle))
    assert len(index) >= PER_CLASS * len(CLASS_CODES)
    assert {Path(r["path"]).parent.name for r in index} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}


def test_split_file_and_eda(pipeline):
    with open(pipeline["work"] / "split.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row["lesion_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for table in ("class", "age", "sex", "localization"):
        assert (pipeline["work"] / "eda" / f"{table}.csv").is_file()
        assert (pipeline["work"] / "eda" / f"{table}.png").stat().st_size > 1000


def test_training_logs_curves_and_checkpoints(pipeline):
    for member in ("inceptionv3", "densenet201"):
        folder = pipeline["work"] / "members" / member
        with open(folder / "history.csv", newline="", encoding="utf-8") as handle:
            history = list(csv.DictReader(handle))
        assert [int(r["epoch"]) for r in history] == [1]
        assert 0.0 <= float(history[0]["val_balanced_accuracy"]) <= 1.0
        assert float(history[0]["learning_rate"]) > 0 and float(history[0]["seconds"]) > 0
        state = json.loads((folder / "state.json").read_text())
        assert state["epoch"] == 1 and (folder / state["checkpoint"]).is_file()
        assert (folder / "best.keras").is_file()


def test_exported_bundle_loads_and_scores_like_training(pipeline):
    import keras

    from dermscore.preprocess import prepare
    from PIL import Image

    bundle = load_bundle(pipeline["out"])  # verifies every member's sha256
    assert bundle.classes == CLASS_CODES
    assert [m.name for m in bundle.members] == ["inceptionv3", "densenet201"]
    assert [m.input_size for m in bundle.members] == [(75, 75), (32, 32)]
    assert sum(m.weight for m in bundle.members) == pytest.approx(1.0)
    metrics = bundle.provenance["metrics"]
    assert set(metrics) == {"inceptionv3", "densenet201", "ensemble"}
    for result in metrics.values():
        assert {
            "accuracy",
            "balanced_accuracy",
            "per_class",
            "confusion_matrix",
            "expected_calibration_error",
            "melanoma_sensitivity_at_80_specificity",
            "melanoma_sensitivity_at_90_specificity",
        } <= set(result)
        assert set(result["per_class"]) == set(CLASS_CODES)
    assert "doi:10.1038/sdata.2018.161" in bundle.provenance["training_data"]["attribution"]
    assert bundle.colour_constancy is not None and bundle.colour_constancy.p == 6.0
    shift = bundle.provenance["shift"]
    assert set(shift["models"]) == {"inceptionv3", "densenet201", "ensemble"}
    evaluated = json.loads((pipeline["work"] / "evaluation" / "metrics.json").read_text())
    assert evaluated["shift"] == shift  # evaluate's figures (float32 members) are the ones the card quotes
    ensemble = shift["models"]["ensemble"]["device_shift"]["balanced_accuracy"]
    assert ensemble["plain"] == evaluated["ensemble"]["balanced_accuracy"]
    assert bundle.provenance["split"]["file"] == "split.csv" and (bundle.path / "split.csv").is_file()
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "not a diagnosis" in card.lower() and "balanced accuracy" in card
    assert "another dermoscope" in card and "Shades of Gray" in card
    for name in ("confusion_ensemble.png", "confusion_ensemble.csv", "learning_curves.png", "reliability.png",
                 "ood_scores.png"):
        assert (bundle.path / "figures" / name).is_file()
    # export ends with calibrate: a new bundle gets calibration, OOD detector and operating points too
    assert bundle.calibration is not None and bundle.ood is not None and bundle.ood.views == "none"
    assert bundle.provenance["fitted_from_bundle"]["scored_with"].endswith(", keras backend")  # --backend reached it
    assert bundle.operating_points.malignant is not None and "## Out-of-distribution" in card

    # Scoring's way: load without compiling, prepare with dermscore.preprocess, get probabilities.
    image = next((pipeline["data"] / "HAM10000_images_part_1").glob("ISIC_00*.jpg"))
    rgb = np.asarray(Image.open(image).convert("RGB"))
    for member in bundle.members:
        model = keras.models.load_model(bundle.member_path(member), compile=False)
        assert all(w.dtype == "float32" for w in model.weights)  # float16 storage, float32 inference
        x = prepare(rgb, [member], bundle.colour_constancy)[member.name][None]
        probs = np.asarray(model(x))
        assert probs.shape == (1, len(CLASS_CODES)) and probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_killed_run_resumes_from_its_last_checkpoint(pipeline, tmp_path):
    """SIGKILL the training process after its first checkpoint; running the command again continues.

    The run continues a shipped bundle's member (as the CPU fine-tune of 2026-11-27 did): it records that bundle's
    identity and the member's stages when it starts, and the resume keeps that record, so the new card lists
    every stage even after the old bundle has been replaced in place."""
    from training.cli import parse
    from training.steps import WARM_START, _member_training, member_run

    work = tmp_path / "work"
    work.mkdir()
    for name in ("index.csv", "split.csv"):
        shutil.copy2(pipeline["work"] / name, work / name)
    shipped = load_bundle(pipeline["out"])
    member = next(m for m in shipped.members if m.name == "inceptionv3")
    arguments = [
        "train",
        *_common(pipeline["data"], work),
        *_sizes("inceptionv3"),
        "--epochs",
        "3",
        *("--colour-constancy", "6", "--warm-start", str(shipped.member_path(member))),
    ]
    command = [sys.executable, "-m", "training", *arguments]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    state_path = work / "members" / "inceptionv3" / "state.json"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if state_path.is_file() and json.loads(state_path.read_text())["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed: " + process.stdout.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = json.loads(state_path.read_text())
    assert 1 <= first["epoch"] < 3

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming after epoch {first['epoch']}" in done.stdout
    state = json.loads(state_path.read_text())
    assert state["epoch"] == 3
    with open(state_path.parent / "history.csv", newline="", encoding="utf-8") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3]

    record = json.loads((state_path.parent / WARM_START).read_text())
    assert record["sha256"] == member.sha256 and record["bundle"]["identity"] == shipped.identity
    training = _member_training(member_run(parse(arguments), "inceptionv3"), tmp_path / "history.csv")
    earlier = shipped.provenance["training"]["members"]["inceptionv3"]["stages"]
    assert training["stages"][:-1] == earlier and len(training["stages"]) == len(earlier) + 1
    assert training["stages"][-1]["warm_start_from"].startswith(shipped.identity)
    with open(tmp_path / "history.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == list(range(1, training["epochs_run"] + 1))
    assert rows[-1]["phase"].startswith(f"stage{len(earlier) + 1}:")


def test_a_replacing_export_puts_the_previous_versions_figures_beside_its_own(pipeline):
    """What export records of the bundle it replaces in place, and the card's old-and-new table."""
    from training.cli import main
    from training.export import previous_bundle
    from training.modelcard import render

    out, work = pipeline["out"], pipeline["work"]
    assert main(["evaluate", *_common(pipeline["data"], work), "--bundle", str(out)]) == 0
    bundle = load_bundle(out)
    previous = previous_bundle(out, work)
    assert previous["identity"] == bundle.identity
    ensemble = bundle.provenance["metrics"]["ensemble"]
    assert previous["metrics"]["ensemble"]["balanced_accuracy"] == ensemble["balanced_accuracy"]
    evaluated = json.loads((work / "evaluation" / f"bundle_{bundle.name}_{bundle.version}" / "metrics.json").read_text())
    drop = evaluated["shift"]["models"]["ensemble"]["device_shift"]["balanced_accuracy"]["drop"]
    assert previous["shift"]["ensemble"]["drop"] == drop
    assert previous_bundle(work, work) is None  # no bundle there: a first export compares with nothing

    manifest = json.loads((out / "bundle.json").read_text())
    manifest["version"] = "next"
    manifest["provenance"]["previous"] = previous
    card = render(manifest)
    assert f"This version replaced {bundle.identity}" in card and "same `split.csv`" in card
    assert f"| ensemble | balanced accuracy | {ensemble['balanced_accuracy']:.3f} |" in card
    assert f"| ensemble | drop on the device-shifted copy | {drop:.3f} |" in card
