"""Shared fixtures: real HAM10000 files from ../shared/data and small real Keras bundles on disk."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_600 = SHARED_DATA / "ham10000-600x450-sample" / "images"
SMALL_200 = SHARED_DATA / "ham10000-200x150"


def build_small_member(path: Path, input_size: tuple[int, int], seed: int) -> Path:
    """A tiny but real Keras CNN saved as .keras: the logic under test does not need a big network."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*input_size, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def make_bundle(
    folder: Path, members: list[dict], name: str = "test-bundle", provenance: dict | None = None, **fields
) -> Path:
    """Write a bundle folder whose members are small Keras models (or given .keras files); ``fields`` are
    further top-level manifest fields (e.g. ``colour_constancy``)."""
    from dermscore.bundle import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, spec in enumerate(members):
        spec = dict(spec)
        model_file = spec.pop("model_file", None)
        target = folder / spec["file"]
        if model_file:
            shutil.copy(model_file, target)
        else:
            build_small_member(target, tuple(spec["input_size"]), seed=i)
        entries.append(spec)
    write_manifest(
        folder,
        {
            "name": name,
            "version": "0.0.1-test",
            "members": entries,
            "provenance": {"training_data": "none: random weights for tests", **(provenance or {})},
            "intended_use": "tests only",
            **fields,
        },
    )
    return folder


SMALL_MEMBERS = [
    {"name": "inceptionv3", "architecture": "small-cnn", "file": "a.keras", "input_size": [40, 48],
     "preprocessing": "inception", "resize": "bilinear", "weight": 0.5},
    {"name": "densenet201", "architecture": "small-cnn", "file": "b.keras", "input_size": [32, 32],
     "preprocessing": "densenet", "resize": "bilinear", "weight": 0.5},
]


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """ONNX exports of test bundles (new weights every session) go to a temporary cache, not ~/.cache."""
    folder = tmp_path_factory.mktemp("dermscore-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMSCORE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "small", SMALL_MEMBERS)


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    images = sorted(SAMPLE_600.glob("*.jpg"))
    if not images:
        pytest.fail(f"real data missing: expected JPEGs in {SAMPLE_600} (see README, 'Tests')")
    return images


def image_array(seed: int = 0, size: tuple[int, int] = (60, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


PER_SIDE = {"train": 8, "val": 4, "test": 3}  # images per class and side


def write_split(folder: Path) -> None:
    """A real lesion-disjoint split.csv over HAM10000 images: a few images of each class on each side."""
    with open(SMALL_200 / "HAM10000_metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    taken: dict[tuple[str, str], int] = {}
    side_of_lesion: dict[str, str] = {}
    chosen = []
    for row in rows:
        side = side_of_lesion.get(row["lesion_id"]) or next(
            (s for s, n in PER_SIDE.items() if taken.get((row["dx"], s), 0) < n), None)
        if side is None:
            continue
        side_of_lesion[row["lesion_id"]] = side
        taken[(row["dx"], side)] = taken.get((row["dx"], side), 0) + 1
        chosen.append({"image_id": row["image_id"], "lesion_id": row["lesion_id"], "dx": row["dx"], "split": side})
    with open(folder / "split.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("image_id", "lesion_id", "dx", "split"))
        writer.writeheader()
        writer.writerows(chosen)


@pytest.fixture(scope="session")
def fitted_bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A flip-averaged tiny random-weights bundle with a real HAM10000 split ("plain") and its copy fitted by
    ``python -m training calibrate`` ("bundle": calibration, OOD detector, operating points)."""
    import keras

    from training.cli import main
    from training.export import flip_averaged

    root = tmp_path_factory.mktemp("fitted")
    members = []
    for i, spec in enumerate(SMALL_MEMBERS):
        raw = build_small_member(root / f"raw{i}.keras", tuple(spec["input_size"]), seed=i)
        flip_averaged(keras.models.load_model(raw, compile=False)).save(root / f"tta{i}.keras")
        members.append(dict(spec, model_file=str(root / f"tta{i}.keras")))
    # The shipped bundle's provenance (metrics, training, ensemble with tta), so the model card renders in full.
    shipped = json.loads((REPO / "models" / "ham10000-ensemble" / "bundle.json").read_text())["provenance"]
    plain = make_bundle(root / "plain", members, provenance=shipped)
    write_split(plain)
    bundle = root / "bundle"
    shutil.copytree(plain, bundle)
    assert main(["calibrate", "--bundle", str(bundle), "--data", str(SMALL_200), "--work", str(root / "work"),
                 "--version", "0.0.2-test", "--train-limit", "0", "--ood-crops", "1"]) == 0
    return {"plain": plain, "bundle": bundle, "work": root / "work"}


@pytest.fixture
def fresh_onnx_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ONNX export cache for one test (``$DERMSCORE_CACHE/onnx``), so it can see what a run writes."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DERMSCORE_CACHE", str(folder))
    return folder / "onnx"
