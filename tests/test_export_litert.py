"""`dermscore export BUNDLE --format litert OUT`: each member as .tflite plus litert.json; the files run in
ai-edge-litert's interpreter on real HAM10000 images, prepared the way litert.json tells an app to, and
match Keras within 1e-4 (float32); the float16 variant's size and gap are reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dicom_fixtures as fx
from dermscore.aggregate import ensemble
from dermscore.bundle import read_bundle
from dermscore.cli import app
from dermscore.preprocess import prepare

pytest.importorskip("ai_edge_litert", reason="the LiteRT export needs dermscore[litert] (ai-edge-litert)")
TOLERANCE = 1e-4
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@pytest.fixture(scope="module")
def constancy_bundle(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small bundle with Shades of Gray colour constancy in its manifest."""
    bundle = tmp_path_factory.mktemp("constancy") / "bundle"
    shutil.copytree(small_bundle, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["colour_constancy"] = {"method": "shades_of_gray", "p": 6}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle


@pytest.fixture(scope="module")
def exported(constancy_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("litert")
    result = CliRunner().invoke(app, ["export", str(constancy_bundle), "--format", "litert", str(out), "--float16"])
    assert result.exit_code == 0, result.output
    return out


def app_input(rgb: np.ndarray, member: dict, constancy: dict | None) -> np.ndarray:
    """What an app does with litert.json alone: stretch to the input size, normalise the illuminant as the
    JSON states it (written here from that statement, not with dermscore's function), then scale and offset."""
    size = (member["input"]["width"], member["input"]["height"])
    resized = np.asarray(Image.fromarray(rgb).resize(size, RESAMPLING[member["resize"]["method"]]), dtype=np.float32)
    if constancy is not None:
        assert constancy["method"] == "shades_of_gray"
        p = constancy["p"]
        e = np.mean((resized / 255.0) ** p, axis=(0, 1)) ** (1.0 / p)
        resized = np.clip(resized * (np.linalg.norm(e) / (np.sqrt(3.0) * np.maximum(e, 1e-6))), 0.0, 255.0)
    pre = member["preprocessing"]
    return resized * np.float32(pre["scale"]) + np.float32(pre["offset"])


def interpret(path: Path, batch: np.ndarray) -> np.ndarray:
    """The LiteRT interpreter as an app would call it, one image at a time (batch 1)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in batch:
        interpreter.set_tensor(source["index"], image[None].astype(np.float32))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"])[0])
    return np.asarray(outputs, dtype=np.float64)


def test_litert_members_match_keras_on_real_images_and_the_json_rule_gives_the_ensemble(
    exported: Path, constancy_bundle: Path
) -> None:
    import keras

    bundle = read_bundle(constancy_bundle)
    manifest = json.loads((exported / "litert.json").read_text())
    assert manifest["colour_constancy"]["p"] == 6 and bundle.colour_constancy is not None
    assert manifest["classes"] == list(bundle.classes)
    assert manifest["malignant_classes"] == list(bundle.malignant_classes)
    assert sorted(p.name for p in exported.glob("*.tflite")) == sorted(
        [f"{m.name}.tflite" for m in bundle.members] + [f"{m.name}.float16.tflite" for m in bundle.members])
    rgb = [fx.load_rgb(p) for p in fx.real_jpegs(6)]
    ours = [prepare(image, bundle.members, bundle.colour_constancy) for image in rgb]  # dermscore's own
    keras_out, litert_out, half_out = {}, {}, {}
    for member, entry in zip(bundle.members, manifest["members"]):
        assert (entry["name"], entry["keras_sha256"]) == (member.name, member.sha256)
        assert (entry["input"]["height"], entry["input"]["width"]) == member.input_size
        app_batch = np.stack([app_input(image, entry, manifest["colour_constancy"]) for image in rgb])
        np.testing.assert_allclose(app_batch, np.stack([o[member.name] for o in ours]), atol=1e-5)
        model = keras.models.load_model(bundle.member_path(member), compile=False)
        keras_out[member.name] = np.asarray(model.predict_on_batch(app_batch), dtype=np.float64)
        litert_out[member.name] = interpret(exported / entry["file"], app_batch)
        half_out[member.name] = interpret(exported / entry["float16"]["file"], app_batch)
        assert np.abs(litert_out[member.name] - keras_out[member.name]).max() <= TOLERANCE
        assert entry["max_abs_diff_vs_keras"] <= TOLERANCE
        gap = float(np.abs(half_out[member.name] - keras_out[member.name]).max())
        size, half = (exported / entry["file"]).stat().st_size, (exported / entry["float16"]["file"]).stat().st_size
        print(f"{member.name}: float32 {size} B, float16 {half} B, float16 gap on real images {gap:.2e}")
        assert entry["float16"]["bytes"] == half and np.isfinite(gap)
    weights = manifest["ensemble"]["weights"]
    assert manifest["ensemble"]["rule"] == "weighted_mean" and sum(weights.values()) == pytest.approx(1.0)
    for i in range(len(rgb)):  # the app's rule on LiteRT outputs gives dermscore's ensemble of Keras outputs
        app_probabilities = sum(weights[name] * litert_out[name][i] for name in weights)
        reference = ensemble({name: keras_out[name][i] for name in keras_out}, bundle)
        np.testing.assert_allclose(app_probabilities, reference, atol=TOLERANCE)


def test_export_refuses_an_unknown_format(small_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(small_bundle), "--format", "coreml", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--format must be one of litert" in result.output
    assert not (tmp_path / "x").exists()


def test_a_bundle_with_a_field_the_export_does_not_carry_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["members"][0]["colour_constancy"] = "shades-of-grey"  # a preprocessing step litert.json lacks
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["export", str(bundle), "--format", "litert", str(tmp_path / "out")])
    assert result.exit_code == 4, result.output
    assert "members[inceptionv3].colour_constancy" in result.output and "not exported" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_fitted_bundle_exports_its_calibration_and_thresholds_and_says_the_ood_check_is_not_carried(
    fitted_bundle: dict[str, Path], tmp_path: Path
) -> None:
    from dermscore.aggregate import Thresholds
    from dermscore.bundle import load_bundle
    from dermscore.calibration import calibrate

    bundle = load_bundle(fitted_bundle["bundle"])
    result = CliRunner().invoke(app, ["export", str(bundle.path), "--format", "litert", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    described = json.loads((tmp_path / "out" / "litert.json").read_text())
    assert described["calibration"]["temperatures"] == list(bundle.calibration.temperatures)
    fitted = Thresholds().for_bundle(bundle)
    assert described["thresholds"]["malignant"] == fitted.malignant == bundle.operating_points.malignant
    assert described["thresholds"]["review"] == bundle.operating_points.review
    assert "ood" in described["not_carried"]
    assert described["colour_constancy"] is None  # a bundle without the field: images go in as resized
    # The rule as litert.json states it gives dermscore's calibrated probabilities.
    p = np.array([[0.05, 0.1, 0.2, 0.05, 0.3, 0.25, 0.05]])
    t = np.array(described["calibration"]["temperatures"])
    q = np.exp(np.log(p) / t)
    np.testing.assert_allclose(q / q.sum(), calibrate(p, bundle.calibration), atol=1e-12)
