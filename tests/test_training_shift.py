"""The generalising recipe and the device-shift checks: training prepares images exactly as dermscore does
(colour constancy included), the augmenters do what they claim, EMA weights are the ones validated, and the
per-source / shifted-copy figures are computed from real files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_200, SMALL_MEMBERS, make_bundle
from dermscore.bundle import CLASS_CODES, ColourConstancy, Member
from dermscore.preprocess import prepare
from training import shift
from training.augment import DeviceJitter, Prepare, TransposeCrop, build_augmenter
from training.data import Record, load_image_cache
from training.metrics import roc_auc
from training.train import Batches, MemberRun, TrainConfig, averaged_weights

IMAGES = ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769", "ISIC_0025661"]
SOG = ColourConstancy("shades_of_gray", 6.0)


def _records(ids: list[str]) -> list[Record]:
    return [Record(i, f"HAM_{i}", "nv", "", "", "", str(SMALL_200 / "images" / f"{i}.jpg")) for i in ids]


def _rgb(image_id: str) -> np.ndarray:
    with Image.open(SMALL_200 / "images" / f"{image_id}.jpg") as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("preprocessing", ["inception", "densenet"])
def test_training_prepares_real_images_exactly_as_dermscore(tmp_path: Path, preprocessing: str) -> None:
    """Both of training's paths against dermscore.preprocess.prepare: the numpy one (validation, ensemble,
    export) is identical; the trainer's graph (keras.ops, after augmentation) agrees within 1e-4."""
    size = (96, 128)
    cache = load_image_cache(_records(IMAGES), size, "bilinear", tmp_path)
    member = Member("m", "x", "m.keras", "0", size, preprocessing, "bilinear", 1.0)
    expected = np.stack([prepare(_rgb(i), [member], SOG)["m"] for i in IMAGES])
    labels = np.zeros(len(IMAGES), dtype=np.int64)
    numpy_path = Batches(cache, labels, np.arange(len(IMAGES)), 8, preprocessing, constancy=SOG)[0][0]
    np.testing.assert_array_equal(numpy_path, expected)
    pixels = Batches(cache, labels, np.arange(len(IMAGES)), 8, None)[0][0]  # what the trainer is fed
    graph_path = keras.ops.convert_to_numpy(Prepare(preprocessing, 6.0)(pixels))
    assert np.abs(graph_path - expected).max() < 1e-4
    # Without constancy the graph is the member's plain normalisation, as before the recipe existed.
    plain = np.stack([prepare(_rgb(i), [member])["m"] for i in IMAGES])
    assert np.abs(keras.ops.convert_to_numpy(Prepare(preprocessing)(pixels)) - plain).max() < 1e-4


def _coordinates(height: int, width: int, n: int = 16) -> np.ndarray:
    """Images whose pixels hold their own (row, column): bilinear warps of them are exact, so the map is readable."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.repeat(np.stack([rows, cols, np.zeros_like(rows)], -1)[None], n, axis=0)


def test_transpose_completes_the_eight_rotations_and_keeps_a_non_square_frame() -> None:
    height, width = 30, 40
    out = keras.ops.convert_to_numpy(TransposeCrop(True, 0.0, seed=3)(_coordinates(height, width), training=True))
    k, c0 = width / height, (width - height * height / width) / 2
    y, x = np.mgrid[5:height - 5, 5:width - 5]  # inside the frame, away from reflected borders
    transposed = [np.allclose(o[5:-5, 5:-5, 0], x / k, atol=1e-3) and np.allclose(o[5:-5, 5:-5, 1], y / k + c0, atol=1e-3)
                  for o in out]
    identity = [np.allclose(o, _coordinates(height, width, 1)[0], atol=1e-3) for o in out]
    assert all(t != i for t, i in zip(transposed, identity))  # each image: exactly one of the two
    assert 0 < sum(transposed) < len(out)
    square = _coordinates(24, 24, 8)
    out = keras.ops.convert_to_numpy(TransposeCrop(True, 0.0, seed=1)(square, training=True))
    assert all(np.allclose(o, s) or np.allclose(o, s.transpose(1, 0, 2)) for o, s in zip(out, square))


def test_random_resized_crop_zooms_into_an_axis_aligned_window_and_is_off_at_inference() -> None:
    images = _coordinates(30, 40)
    layer = TransposeCrop(False, 0.5, seed=2)
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    assert np.ptp(out[:, :, :, 0], axis=2).max() < 1e-3 and np.ptp(out[:, :, :, 1], axis=1).max() < 1e-3
    spans = np.ptp(out[:, :, :, 0], axis=1)[:, 0] / 29 * np.ptp(out[:, :, :, 1], axis=2)[:, 0] / 39  # area fraction
    assert spans.min() > 0.5 * 0.98 and spans.max() <= 1.0 + 1e-6 and spans.std() > 0.01
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


def test_device_jitter_changes_colour_tone_and_sharpness_within_range() -> None:
    pixels = np.stack([_rgb(i) for i in IMAGES]).astype(np.float32)
    layer = DeviceJitter(white_balance=0.2, gamma=0.3, blur=1.0, seed=4)
    out = keras.ops.convert_to_numpy(layer(pixels, training=True))
    assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 255
    ratios = out.mean(axis=(1, 2)) / pixels.mean(axis=(1, 2))
    assert np.ptp(ratios, axis=1).min() > 0.01  # channels scaled differently: a white-balance change
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(pixels, training=False)), pixels)


def test_defaults_are_the_shipped_recipe_and_old_configs_load() -> None:
    old = TrainConfig(member="densenet201", input_size=(48, 64)).to_json()
    for key in ("colour_constancy_p", "dihedral", "crop_scale", "white_balance", "gamma", "blur", "ema_momentum",
                "exclude_source"):
        old.pop(key)
    config = TrainConfig.from_json(old)
    assert config.constancy is None and config.ema_momentum is None
    names = [type(layer).__name__ for layer in build_augmenter(config.rotation, config.zoom, config.seed).layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom"]


def test_ema_weights_are_validated_and_the_training_weights_come_back() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.AdamW(0.05, use_ema=True, ema_momentum=0.9), loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(32) % 3]
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    model.optimizer.use_ema = True  # fit's end swapped the averages in; train on to get them apart again
    for _ in range(5):
        model.train_on_batch(x, y)
    own = [w.copy() for w in model.get_weights()]
    averages = [keras.ops.convert_to_numpy(v) for v in model.optimizer._model_variables_moving_average]
    with averaged_weights(model):
        inside = model.get_weights()
    assert all(np.allclose(a, b) for a, b in zip(inside, averages))
    assert not all(np.allclose(a, b) for a, b in zip(inside, own))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), own))


def test_device_shift_is_seeded_per_image_and_within_its_ranges(tmp_path: Path) -> None:
    device = shift.DeviceShift()
    assert device.draw("ISIC_0027419") == device.draw("ISIC_0027419") != device.draw("ISIC_0025030")
    settings = device.draw("ISIC_0027419")
    assert device.gamma[0] <= settings["gamma"] <= device.gamma[1]
    assert device.jpeg_quality[0] <= settings["jpeg_quality"] <= device.jpeg_quality[1]
    files = {i: SMALL_200 / "images" / f"{i}.jpg" for i in IMAGES}
    out = shift.write_shifted_copy(files, tmp_path / "a", device)
    again = shift.write_shifted_copy(files, tmp_path / "b", device)
    for image_id, path in out.items():
        assert path.read_bytes() == again[image_id].read_bytes()  # deterministic files
        with Image.open(path) as image:
            scale = device.draw(image_id)["resolution"]
            assert image.format == "JPEG" and image.size == (round(200 * scale), round(150 * scale))
    recorded = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert recorded["images"]["ISIC_0025030"] == device.draw("ISIC_0025030")


def test_per_source_figures_say_na_with_counts_when_a_source_is_too_small() -> None:
    rng = np.random.default_rng(0)
    mel, nv = CLASS_CODES.index("mel"), CLASS_CODES.index("nv")
    y = np.array([mel] * 20 + [nv] * 30 + [mel] * 2 + [nv] * 40)
    sources = np.array(["a"] * 50 + ["b"] * 42, dtype=object)
    probs = rng.dirichlet(np.ones(7), size=len(y))
    probs[y == mel, mel] += 0.3
    result = shift.per_source(y, probs, sources)
    keep = (y[:50] == mel) | (y[:50] == nv)
    assert result["a"]["mel_vs_nv_auc"] == pytest.approx(roc_auc(y[:50][keep] == mel, probs[:50][keep, mel]), abs=1e-4)
    assert result["b"] == {**result["b"], "mel_vs_nv_auc": None, "mel": 2, "nv": 40, "n": 42}
    report = shift.shift_report({"m": probs}, {"m": probs[::-1]}, y, sources, shift.DeviceShift())
    figure = report["models"]["m"]["device_shift"]["balanced_accuracy"]
    assert figure["drop"] == pytest.approx(figure["plain"] - figure["shifted"], abs=1e-4)


def _data_subset(folder: Path, per_class: int = 6) -> Path:
    """A real HAM10000 subset in the official layout, with its sources file."""
    with open(SMALL_200 / "HAM10000_metadata.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    sources = shift.read_sources(SMALL_200 / shift.SOURCES_FILE)
    chosen, taken = [], {}
    for row in rows:
        key = (row["dx"], sources[row["image_id"]])
        if taken.get(key, 0) < per_class:
            chosen.append(row)
            taken[key] = taken.get(key, 0) + 1
    (folder / "images").mkdir(parents=True)
    for row in chosen:
        shutil.copy2(SMALL_200 / "images" / f"{row['image_id']}.jpg", folder / "images")
    with open(folder / "HAM10000_metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(chosen)
    with open(folder / shift.SOURCES_FILE, "w", newline="", encoding="utf-8") as handle:
        handle.write("image_id,dataset\n" + "".join(f"{r['image_id']},{sources[r['image_id']]}\n" for r in chosen))
    return folder


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from training.cli import main

    root = tmp_path_factory.mktemp("shift")
    data, work = _data_subset(root / "data"), root / "work"
    assert main(["split", "--data", str(data), "--work", str(work)]) == 0
    return data, work


def test_excluded_source_is_in_neither_training_nor_validation(subset: tuple[Path, Path]) -> None:
    from training import cli, steps

    data, work = subset
    args = cli.parse(["train", "--data", str(data), "--work", str(work), "--exclude-source", "rosendahl",
                                     "--input-size", "32x32"])
    args.metadata, args.members = data / "HAM10000_metadata.csv", ("densenet201",)
    run: MemberRun = steps.member_run(args, "densenet201")
    records = steps._records(args)
    sources = shift.sources_of([r.image_id for r in records], shift.read_sources(data / shift.SOURCES_FILE))
    assert run.folder.name == "densenet201-without-rosendahl" and run.config.exclude_source == "rosendahl"
    assert "rosendahl" not in set(sources[run.train_indices]) | set(sources[run.val_indices])
    assert len(run.train_indices) and len(run.val_indices)


def test_evaluate_bundle_scores_its_split_through_dermscore_per_source_and_shifted(subset, tmp_path: Path) -> None:
    from training.cli import main

    data, work = subset
    bundle = make_bundle(tmp_path / "bundle", SMALL_MEMBERS, colour_constancy={"method": "shades_of_gray", "p": 6})
    shutil.copy2(work / "split.csv", bundle / "split.csv")
    assert main(["evaluate", "--bundle", str(bundle), "--data", str(data), "--work", str(work)]) == 0
    result = json.loads((work / "evaluation" / "bundle_test-bundle_0.0.1-test" / "metrics.json").read_text())
    with open(bundle / "split.csv", newline="", encoding="utf-8") as handle:
        tests = [r for r in csv.DictReader(handle) if r["split"] == "test"]
    assert result["ensemble"]["n"] == len(tests) == result["shift"]["n"]
    assert set(result["shift"]["models"]) == {"inceptionv3", "densenet201", "ensemble"}
    ensemble = result["shift"]["models"]["ensemble"]
    assert set(ensemble["per_source"]) <= {"vidir_molemax", "vidir_modern", "rosendahl", "vienna_dias"}
    assert sum(s["n"] for s in ensemble["per_source"].values()) == len(tests)
    figure = ensemble["device_shift"]["balanced_accuracy"]
    assert figure["plain"] == result["ensemble"]["balanced_accuracy"]
    assert "2-core" in result["scored_on"]["machine"] or "CPU" in result["scored_on"]["machine"]
