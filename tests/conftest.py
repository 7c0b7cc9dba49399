"""Shared fixtures: real HAM10000 files from ../shared/data and small real Keras bundles on disk."""

from __future__ import annotations

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
