"""Heatmaps for flagged lesions (dermscore.explain, ``--heatmaps``): real HAM10000 images, the shipped
bundle scored by ONNX Runtime and explained by its Keras members, files and workbooks read back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from openpyxl import load_workbook
from PIL import Image

from dermscore.aggregate import Thresholds
from dermscore.bundle import load_bundle
from dermscore.explain import HEATMAP_COLUMN, HEATMAP_FOLDER, LIST_SEPARATOR, RAW_SUFFIX, Explainer, MemberMaps
from dermscore.features import classifier_of
from dermscore.preprocess import prepare
from dermscore.run import RunOptions, run

NAME = "Doe_Jane"  # in folder and file names: must not reach the heatmap files of a pseudonymised report
KEY = "0123456789abcdef0123456789abcdef"
FLAG_EVERYTHING = Thresholds(malignant=0.0)  # every malignant probability is >= 0: every lesion is flagged


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def heatmap_files(folder: Path, row: dict[str, str]) -> list[Path]:
    return [folder / name for name in row[HEATMAP_COLUMN].split(LIST_SEPARATOR) if name]


def raw_of(overlay: Path) -> Path:
    return overlay.with_name(overlay.stem + RAW_SUFFIX + ".png")


@pytest.fixture(scope="module")
def flagged_run(sample_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real image as a PNG, the same image mirrored left-right, and a JPEG as it comes, under a
    patient's name; scored with ONNX Runtime, everything flagged, pseudonymised, thumbnails on."""
    work = tmp_path_factory.mktemp("explain")
    images = work / NAME
    images.mkdir()
    rgb = np.asarray(Image.open(sample_images[0]).convert("RGB"))
    Image.fromarray(rgb).save(images / f"{NAME}_a.png")
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(images / f"{NAME}_a_mirrored.png")
    (images / f"{NAME}_b.jpg").write_bytes(sample_images[1].read_bytes())
    key = work / "pseudonym.key"
    key.write_text(KEY)
    out = work / "out"
    options = RunOptions(inputs=[images], out=out, device="cpu", backend="onnx", heatmaps=True, thumbnails=True,
                         thresholds=FLAG_EVERYTHING, pseudonymize=True, pseudonym_key_file=key)
    summary = run(options)
    return {"work": work, "images": images, "out": out, "options": options, "summary": summary,
            "rows": {Path(r["source"]).name: r for r in read_csv(summary.out / "images.csv")}}


def test_flagged_images_get_overlays_and_raw_maps_at_their_size_on_the_onnx_path(flagged_run: dict) -> None:
    summary, rows = flagged_run["summary"], flagged_run["rows"]
    assert summary.backend == "onnx"  # scored by ONNX Runtime, explained by the Keras members
    assert summary.heatmaps.images == summary.heatmaps.computed == 3 and summary.heatmaps.members_loaded
    bundle = load_bundle(None)
    for name, row in rows.items():
        assert "malignant" in row["flags"].split(";")
        files = heatmap_files(summary.out, row)
        assert len(files) == len(bundle.members) + 1  # ensemble first, then each member
        assert files[0].name.endswith(f"_ensemble-{row['predicted_class']}.png")
        for member, file in zip(bundle.members, files[1:]):
            assert file.name.endswith(f"_{member.name}-{row[f'top_class_{member.name}']}.png")
        with Image.open(flagged_run["images"] / name) as original:
            size = original.size
        for file in files:
            with Image.open(file) as overlay, Image.open(raw_of(file)) as raw:
                assert overlay.size == raw.size == size
                assert overlay.mode == "RGB" and raw.mode == "L"
                assert np.asarray(raw).max() == 255  # in proportion, its maximum at 255


def test_a_mirrored_image_gets_the_mirrored_heatmap(flagged_run: dict) -> None:
    """The maps go back through the members' flips and resize to the image: mirroring the image mirrors
    every map, while the maps themselves are far from mirror-symmetric (so a map that lost its geometry
    would fail)."""
    out, rows = flagged_run["summary"].out, flagged_run["rows"]
    plain = heatmap_files(out, rows[f"{NAME}_a.png"])
    mirrored = heatmap_files(out, rows[f"{NAME}_a_mirrored.png"])
    for a, b in zip(plain, mirrored, strict=True):
        assert a.name.split("_", 2)[2] == b.name.split("_", 2)[2]  # same member and class
        with Image.open(raw_of(a)) as ra, Image.open(raw_of(b)) as rb:
            map_a, map_b = (np.asarray(r, dtype=np.float64) for r in (ra, rb))
        asymmetry = np.abs(map_a - map_a[:, ::-1]).mean()
        assert asymmetry > 3.0, f"{a.name}: the map is nearly symmetric, the test would prove nothing"
        assert np.abs(map_b - map_a[:, ::-1]).mean() < 0.1 * asymmetry


def test_the_workbook_shows_each_flagged_lesion_heatmap_beside_its_picture(flagged_run: dict) -> None:
    out = flagged_run["summary"].out
    workbook = load_workbook(out / "report.xlsx")
    lesions, images = workbook["Lesions"], workbook["Images"]
    assert [lesions.cell(1, c).value for c in (1, 2)] == ["thumbnail", "heatmap"]
    anchors = sorted((picture.anchor._from.col, picture.anchor._from.row) for picture in lesions._images)
    assert anchors == sorted((col, row) for col in (0, 1) for row in range(1, lesions.max_row))
    header = [cell.value for cell in images[1]]
    listed = [row[header.index(HEATMAP_COLUMN)] for row in images.iter_rows(min_row=2, values_only=True)]
    assert sorted(listed) == sorted(r[HEATMAP_COLUMN] for r in flagged_run["rows"].values())


def test_pseudonymised_heatmap_files_carry_no_names(flagged_run: dict) -> None:
    names = [p.name for p in (flagged_run["summary"].out / HEATMAP_FOLDER).iterdir()]
    assert len(names) == 3 * 2 * 3  # images x (overlay, raw) x (2 members + ensemble)
    assert not [n for n in names if "Doe" in n or "Jane" in n]


def test_a_later_report_reuses_the_heatmaps_without_loading_a_model(flagged_run: dict) -> None:
    """``--report all`` into a new timestamped folder: the files are linked from the first folder."""
    summary = run(flagged_run["options"])
    assert summary.out != flagged_run["summary"].out and summary.scored == 0
    assert summary.heatmaps.reused == 3 and summary.heatmaps.computed == 0 and not summary.heatmaps.members_loaded
    first = sorted(p.name for p in (flagged_run["summary"].out / HEATMAP_FOLDER).iterdir())
    assert sorted(p.name for p in (summary.out / HEATMAP_FOLDER).iterdir()) == first


def test_a_run_with_nothing_flagged_writes_no_heatmaps_and_loads_no_keras(
    sample_images: list[Path], tmp_path: Path
) -> None:
    """In a fresh process, which has not imported Keras for other tests."""
    out = tmp_path / "out"
    code = ("import sys; from pathlib import Path; from dermscore.aggregate import Thresholds; "
            "from dermscore.run import RunOptions, run; "
            "s = run(RunOptions(inputs=[Path(p) for p in sys.argv[2:]], out=Path(sys.argv[1]), device='cpu', "
            "backend='onnx', heatmaps=True, "
            "thresholds=Thresholds(malignant=1.0, review=0.0, disagreement=1.0, ood=1e9))); "
            "print(s.backend, s.heatmaps.images, s.heatmaps.members_loaded, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(out), *map(str, sample_images[:2])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["onnx", "0", "False", "False"]
    rows = read_csv(out / "images.csv")
    assert len(rows) == 2 and not [r for r in rows if r["flags"] or r[HEATMAP_COLUMN]]
    assert not (out / HEATMAP_FOLDER).exists()


def residual_member(input_size: tuple[int, int]):  # -> (keras.Model, name of the layer the rule must pick)
    """A small member shaped like the shipped ones: a backbone of blocks ending in merges (Add), a hidden
    Dense(ReLU) and Dropout before the softmax, averaged over flips (``training.export.flip_averaged``)."""
    import keras

    from training.export import flip_averaged

    keras.utils.set_random_seed(7)
    inputs = keras.Input((*input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)  # 19 x 23
    x = keras.layers.Add()([x, keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)])
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)  # 9 x 11
    block = keras.layers.Add(name="block2_out")
    x = block([x, keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)])
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)  # 4 x 5: finer than MIN_CELLS = 6 no more
    x = keras.layers.Add()([x, keras.layers.Conv2D(16, 3, padding="same")(x)])
    hidden = keras.layers.Dense(12, activation="relu")(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.Dropout(0.5)(hidden))
    return flip_averaged(keras.Model(inputs, outputs)), block.name


def test_grad_cam_matches_eager_gradient_tape_at_the_chosen_layer(small_bundle: Path, sample_images: list[Path]) -> None:
    """MemberMaps (compiled gradient, batched, flips) against Grad-CAM written out plainly with an eager
    ``tf.GradientTape`` from the image through the whole classifier, at the layer the rule picks: the
    deepest merge whose grid has at least MIN_CELLS cells on its shorter side."""
    import keras
    import tensorflow as tf

    member = load_bundle(small_bundle).members[0]
    model, expected_layer = residual_member(member.input_size)
    maps = MemberMaps(model, member)
    assert maps.layer.name == expected_layer and maps.layer.grid == (9, 11) and maps.score == "logit"
    rgbs = [np.asarray(Image.open(path).convert("RGB")) for path in sample_images[2:4]]
    x = np.stack([prepare(rgb, (member,))[member.name] for rgb in rgbs])
    probabilities, activations = maps.forward(x)
    assert np.allclose(probabilities, model.predict_on_batch(x), atol=1e-5)
    images, classes = [0, 1, 1], [3, 3, 5]  # image 1 for two classes in the same call
    got = maps.cams(activations, images, classes)
    classifier = classifier_of(model, "flips")
    both = keras.Model(classifier.inputs, [classifier.get_layer(expected_layer).output,
                                           classifier.layers[-1].input])
    last = classifier.layers[-1]
    for row, (i, c) in enumerate(zip(images, classes)):
        views = [x[i], x[i][:, ::-1], x[i][::-1], x[i][::-1, ::-1]]
        expected = []
        for view, image in enumerate(views):
            with tf.GradientTape() as tape:
                a, features = both(tf.constant(image[None]), training=False)
                logit = (tf.matmul(features, last.kernel) + last.bias)[0, c]
            weights = tf.reduce_mean(tape.gradient(logit, a), axis=(1, 2))  # Grad-CAM's channel weights
            cam = tf.reduce_sum(a * weights[:, None, None, :], axis=-1)[0].numpy()
            expected.append(cam[:, ::-1] if view == 1 else cam[::-1] if view == 2 else cam[::-1, ::-1] if view == 3
                            else cam)
        expected = np.mean(expected, axis=0)
        assert np.abs(expected).max() > 0 and np.abs(expected - expected[:, ::-1]).max() > 0.01 * np.abs(expected).max()
        assert np.allclose(got[row], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_the_rule_picks_a_block_output_of_6_x_6_cells_or_more_in_the_shipped_architectures() -> None:
    """choose_layer on the shipped members' backbones at their input sizes (untrained weights: the rule
    reads only the graph): the deepest merge all later layers depend on with at least 6 cells a side."""
    import keras

    from dermscore.explain import choose_layer

    inception = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg", input_shape=(150, 200, 3))
    densenet = keras.applications.DenseNet201(weights=None, include_top=False, pooling="avg", input_shape=(48, 64, 3))
    assert [(layer.name, tuple(layer.output.shape[1:3])) for layer in map(choose_layer, (inception, densenet))] == [
        ("mixed7", (7, 10)), ("conv3_block12_concat", (6, 8))]
    # Coarser K: InceptionV3's next block output is its last map; DenseNet201's is the end of dense block 4.
    assert [choose_layer(model, 3).name for model in (inception, densenet)] == ["mixed10", "conv4_block48_concat"]


def test_another_keras_backend_is_refused_by_name(small_bundle: Path, sample_images: list[Path]) -> None:
    """Gradients are taken with TensorFlow or JAX; Keras' numpy backend (no gradients) gets a UsageError."""
    code = ("import sys, numpy as np; from PIL import Image; from dermscore.bundle import load_bundle; "
            "from dermscore.errors import UsageError; from dermscore.explain import Explainer\n"
            "try:\n Explainer(load_bundle(sys.argv[1])).explain(np.asarray(Image.open(sys.argv[2]).convert('RGB')))\n"
            "except UsageError as exc:\n print(exc)")
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    done = subprocess.run([sys.executable, "-c", code, str(small_bundle), str(sample_images[0])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "KERAS_BACKEND is 'numpy'" in done.stdout and "TensorFlow or JAX" in done.stdout


def test_maps_agree_on_the_jax_backend(small_bundle: Path, sample_images: list[Path], tmp_path: Path) -> None:
    """The gradients taken by jax.grad (KERAS_BACKEND=jax, what a GPU run without TensorFlow uses) give the
    same maps as TensorFlow's GradientTape here, within 1e-4 relative (measured: 7e-7 of the maximum)."""
    pytest.importorskip("jax", reason="the jax extra (pip install 'dermscore[jax]') is not installed")
    image = str(sample_images[3])
    code = ("import sys, numpy as np; from PIL import Image; from dermscore.bundle import load_bundle; "
            "from dermscore.explain import Explainer; "
            "r = Explainer(load_bundle(sys.argv[1])).explain(np.asarray(Image.open(sys.argv[2]).convert('RGB'))); "
            "np.savez(sys.argv[3], **r.maps)")
    saved = tmp_path / "jax-maps.npz"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code, str(small_bundle), image, str(saved)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    here = Explainer(load_bundle(small_bundle)).explain(np.asarray(Image.open(image).convert("RGB")))
    with np.load(saved) as jax_maps:
        assert set(jax_maps.files) == set(here.maps)
        for name, expected in here.maps.items():
            assert np.allclose(jax_maps[name], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
