"""Calibration, OOD score and operating points: fitted by training/ on a small real bundle, applied by dermscore.

The bundle's members are tiny random-weight CNNs, flip-averaged like the shipped ones; its split is real
HAM10000 images; ``python -m training calibrate`` fits it exactly as it fits the shipped bundle (fewer
non-dermoscopic crops). The figures are meaningless; what is tested is that every fitted field reaches the
scores, that old bundles are untouched, and that the detector's file is guarded like the weights.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, SMALL_200
from dermscore.aggregate import FLAG_OOD, SOURCE_HEADER, Thresholds, image_row
from dermscore.bundle import Calibration, OperatingPoints, load_bundle, read_bundle
from dermscore.cli import app
from dermscore.discover import file_source
from dermscore.errors import BundleError
from dermscore.infer import Predictor, score
from dermscore.ledger import decode_scored, encode_scored
from dermscore.records import ImageRef, Scored
from dermscore.runtime import Runtime


def _scored(bundle_path: Path, paths: list[Path], backend: str = "auto") -> list[Scored]:
    predictor = Predictor(load_bundle(bundle_path), batch_size=4, runtime=Runtime(backend=backend))
    return list(score([file_source(p) for p in paths], predictor))


def _test_images(n: int = 4) -> list[Path]:
    with open(SMALL_200 / "HAM10000_metadata.csv", newline="", encoding="utf-8") as handle:
        ids = [r["image_id"] for r in csv.DictReader(handle)][-n:]  # the split takes its images from the top
    return [SMALL_200 / "images" / f"{i}.jpg" for i in ids]


def test_the_fitted_bundle_carries_every_field_and_the_same_weights(fitted_bundle: dict[str, Path]) -> None:
    plain, bundle = load_bundle(fitted_bundle["plain"]), load_bundle(fitted_bundle["bundle"])
    assert bundle.version == "0.0.2-test"
    assert bundle.weight_hashes == plain.weight_hashes
    assert bundle.calibration is not None and bundle.calibration.method in ("temperature", "class-temperature")
    assert bundle.ood is not None and bundle.ood.views == "flips" and bundle.ood.threshold > 0
    points = bundle.operating_points
    assert 0 <= points.malignant <= 1 and 0 <= points.review <= 1 and 0 <= points.disagreement <= 1
    assert {"sensitivity", "specificity", "share_flagged", "errors_caught"} <= set(points.test_figures)
    assert bundle.identity != plain.identity
    for figure in ("reliability.png", "ood_scores.png", "test_predictions.csv"):
        assert (bundle.path / "figures" / figure).is_file()
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "## Calibration" in card and "## Operating points" in card and "## Out-of-distribution" in card


def test_calibration_changes_probabilities_but_not_the_predicted_class(fitted_bundle: dict[str, Path]) -> None:
    bundle = load_bundle(fitted_bundle["bundle"])
    uncalibrated = replace(bundle, calibration=None)
    scored = _scored(fitted_bundle["bundle"], _test_images())
    sharp = replace(bundle, calibration=Calibration("temperature", (0.5,)))
    for result in scored:
        rows = [image_row(result, b) for b in (bundle, uncalibrated, sharp)]
        assert len({r["predicted_class"] for r in rows}) == 1
        probabilities = [np.array([r[c] for c in bundle.classes]) for r in rows]
        assert not np.allclose(probabilities[0], probabilities[1]) or bundle.calibration.temperatures == (1.0,)
        assert not np.allclose(probabilities[2], probabilities[1])
        assert rows[2]["confidence"] > rows[1]["confidence"]  # T < 1 sharpens
        assert all(abs(p.sum() - 1) < 1e-6 for p in probabilities)


def test_per_class_calibration_keeps_the_balanced_decision_rule(small_bundle: Path) -> None:
    bundle = read_bundle(small_bundle)
    probabilities = np.array([0.30, 0.05, 0.05, 0.05, 0.05, 0.45, 0.05])  # balanced rule: nv
    result = Scored(ImageRef("x.jpg", "0" * 64), {m.name: probabilities for m in bundle.members})
    # Temperatures that make akiec the calibrated top class (log p / T: a large T pulls towards 0).
    tilted = replace(bundle, calibration=Calibration("class-temperature", (5.0, 1, 1, 1, 1, 0.2, 1)))
    row = image_row(result, tilted)
    assert row["akiec"] > row["nv"]
    assert row["predicted_class"] == "nv" and row["confidence"] == pytest.approx(row["nv"])


def test_a_bundle_without_the_new_fields_gives_todays_rows(small_bundle: Path) -> None:
    bundle = read_bundle(small_bundle)
    assert bundle.calibration is None and bundle.ood is None and bundle.operating_points == OperatingPoints()
    members = {"inceptionv3": np.array([0.05, 0.05, 0.05, 0.05, 0.34, 0.41, 0.05]),
               "densenet201": np.array([0.10, 0.10, 0.10, 0.10, 0.10, 0.40, 0.10])}
    row = image_row(Scored(ImageRef("x.jpg", "0" * 64), members), bundle)
    # The columns and values as before this change (0.30 / 0.50 / 0.20 defaults, plain weighted mean); the
    # image-quality column and the SR's header key are the gate's and the SR writer's, not calibration's.
    assert list(row)[list(row).index("top_class_densenet201") + 1:] == [
        "member_divergence", "quality", "flags", "review_reasons", "bundle_name", "bundle_version", SOURCE_HEADER]
    mean = (members["inceptionv3"] + members["densenet201"]) / 2
    assert [row[c] for c in bundle.classes] == pytest.approx(mean.tolist(), abs=0)
    assert row["confidence"] == mean.max() and row["malignant_probability"] == pytest.approx(mean[[0, 1, 4]].sum())
    assert row["flags"] == "malignant;review" and row["review_reasons"] == "low-confidence"
    assert Thresholds().for_bundle(bundle) == Thresholds(0.30, 0.50, 0.20, None, top_class=True)


def test_a_tampered_ood_file_is_refused(fitted_bundle: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(fitted_bundle["bundle"], tmp_path / "tampered")
    ood = copy / "ood.npz"
    data = bytearray(ood.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ood.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="OOD statistics file"):
        load_bundle(copy)
    ood.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)


def test_onnx_and_keras_give_the_same_ood_score(fitted_bundle: dict[str, Path]) -> None:
    images = _test_images(3)
    onnx = [r.ood_score for r in _scored(fitted_bundle["bundle"], images, "onnx")]
    keras = [r.ood_score for r in _scored(fitted_bundle["bundle"], images, "keras")]
    assert all(s is not None and s > 0 for s in onnx)
    assert onnx == pytest.approx(keras, rel=1e-4)


def test_ood_scores_reach_the_reports_and_flag_above_the_threshold(fitted_bundle: dict[str, Path], tmp_path: Path) -> None:
    import skimage.data

    folder = tmp_path / "mixed"
    folder.mkdir()
    for image in _test_images(3):
        shutil.copy(image, folder / image.name)
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    Image.fromarray(skimage.data.page()).convert("RGB").save(folder / "page.png")
    result = CliRunner().invoke(app, ["run", str(folder), "--model", str(fitted_bundle["bundle"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "r" / "images.csv", keep_default_na=False)
    columns = list(table.columns)
    assert columns[columns.index("member_divergence") + 1:columns.index("member_divergence") + 3] == ["quality", "ood_score"]
    threshold = load_bundle(fitted_bundle["bundle"]).ood.threshold
    assert len(table) == 5 and (table["ood_score"].astype(float) > 0).all()
    for _, row in table.iterrows():
        above = float(row["ood_score"]) > threshold
        assert (FLAG_OOD in row["flags"].split(";")) == above == (FLAG_OOD in row["review_reasons"].split(";"))
    lowered = CliRunner().invoke(app, ["run", str(folder), "--model", str(fitted_bundle["bundle"]), "--out",
                                       str(tmp_path / "all"), "--ood-threshold", "0"])
    assert lowered.exit_code == 0, lowered.output
    flags = pd.read_csv(tmp_path / "all" / "images.csv")["flags"]
    assert all(FLAG_OOD in f.split(";") and "review" in f.split(";") for f in flags)


def test_bundle_thresholds_apply_and_the_command_line_overrides_them(fitted_bundle: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_bundle(fitted_bundle["bundle"])
    images = [str(p) for p in _test_images(2)]
    runs = {"bundle": [], "override": ["--malignant-threshold", "0.99", "--ood-threshold", "1000"]}
    for name, extra in runs.items():
        result = CliRunner().invoke(app, ["run", *images, "--model", str(bundle.path), "--out", str(tmp_path / name),
                                          *extra])
        assert result.exit_code == 0, result.output
    def run_sheet(name: str) -> dict:
        sheet = load_workbook(tmp_path / name / "report.xlsx", read_only=True)["Run"]
        return {row[0]: row[1] for row in sheet.iter_rows(min_row=2, values_only=True)}

    fitted_sheet, override = run_sheet("bundle"), run_sheet("override")
    assert fitted_sheet["Malignant threshold (malignant flag)"] == pytest.approx(bundle.operating_points.malignant)
    assert fitted_sheet["Malignant threshold from"] == "the bundle's operating point"
    assert fitted_sheet["Out-of-distribution threshold (ood_score above)"] == pytest.approx(bundle.ood.threshold)
    assert fitted_sheet["Bundle test: share of wrong predictions flagged for review"] == pytest.approx(
        bundle.operating_points.test_figures["errors_caught"])
    assert override["Malignant threshold (malignant flag)"] == 0.99
    assert override["Malignant threshold from"] == "set for this run"
    assert override["Review threshold (top probability below)"] == pytest.approx(bundle.operating_points.review)
    assert not any(FLAG_OOD in str(f) for f in pd.read_csv(tmp_path / "override" / "images.csv")["flags"])


def test_ood_scores_round_trip_through_the_ledger_and_old_rows_read_none() -> None:
    result = Scored(ImageRef("a.jpg", "f" * 64), {"a": np.full(7, 1 / 7)}, ood_score=1.234567890123)
    assert decode_scored("a.jpg", -1, "f" * 64, encode_scored(result)).ood_score == result.ood_score
    old = json.dumps({"members": {"a": [1 / 7] * 7}, "lesion_id": None, "attributes": {}})
    assert decode_scored("a.jpg", -1, "f" * 64, old).ood_score is None


def test_a_mixed_folder_scores_dermoscopy_flags_photographs_and_skips_radiology(tmp_path: Path) -> None:
    """Issue #16's end-to-end case with the shipped bundle: HAM10000 test images are scored unflagged,
    photographs are flagged out-of-distribution, CT and MR DICOM are listed in skipped.csv, exit code 0
    (the default backend: on a CPU, the bundle's shipped ONNX members, with nothing exported)."""
    import pydicom.data
    import skimage.data

    shipped = REPO / "models" / "ham10000-ensemble"
    folder = tmp_path / "mixed"
    folder.mkdir()
    with open(shipped / "split.csv", newline="", encoding="utf-8") as handle:
        test_ids = [r["image_id"] for r in csv.DictReader(handle) if r["split"] == "test"][:3]
    for image_id in test_ids:
        shutil.copy(SMALL_200 / "images" / f"{image_id}.jpg", folder)
    photos = {"coffee.png": skimage.data.coffee(), "astronaut.png": skimage.data.astronaut()}
    for name, rgb in photos.items():
        Image.fromarray(rgb).save(folder / name)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), folder / name)

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(folder), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(shipped)
    rows = pd.read_csv(out / "images.csv")
    flagged = {Path(s).name: FLAG_OOD in str(f).split(";") for s, f in zip(rows["source"], rows["flags"])}
    assert flagged == {**{f"{i}.jpg": False for i in test_ids}, **{n: True for n in photos}}
    assert (rows.loc[rows["source"].str.endswith(".png"), "ood_score"] > bundle.ood.threshold).all()
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(Path(s).name for s in skipped["source"]) == ["CT_small.dcm", "MR_small.dcm"]
    assert set(skipped["category"]) == {"modality CT", "modality MR"}


def test_a_lesion_of_one_image_repeats_its_calibrated_image_row(small_bundle: Path) -> None:
    from dermscore.aggregate import lesion_rows
    from dermscore.calibration import calibrate, uncalibrate

    bundle = replace(read_bundle(small_bundle), calibration=Calibration("class-temperature", (5.0, 1, 1, 1, 1, 0.2, 1)))
    rng = np.random.default_rng(3)
    balanced = rng.dirichlet(np.ones(7) * 0.7, size=20)
    assert np.allclose(uncalibrate(calibrate(balanced, bundle.calibration), bundle.calibration), balanced, atol=1e-9)
    rows = [image_row(Scored(ImageRef(f"{i}.jpg", "0" * 64), {m.name: p for m in bundle.members}), bundle)
            for i, p in enumerate(balanced)]
    for image, lesion in zip(rows, lesion_rows(rows, bundle)):
        assert lesion["predicted_class"] == image["predicted_class"]
        for key in (*bundle.classes, "confidence", "malignant_probability"):
            assert lesion[key] == pytest.approx(image[key], abs=1e-9)


def test_identity_and_onnx_cache_key_change_only_with_the_new_fields(fitted_bundle: dict[str, Path]) -> None:
    import hashlib

    from dermscore.bundle import OodSpec
    from dermscore.onnx_backend import cache_key

    plain, fitted = load_bundle(fitted_bundle["plain"]), load_bundle(fitted_bundle["bundle"])
    digest = hashlib.sha256()  # the identity as computed before these fields existed
    for m in plain.members:
        digest.update(f"{m.name}:{m.sha256}:{m.weight}:{m.input_size}".encode())
    assert plain.identity == f"{plain.name}@{plain.version}#{digest.hexdigest()[:16]}"
    same_version = replace(fitted, version=plain.version)
    changed = [replace(same_version, calibration=Calibration("temperature", (0.9,))),
               replace(same_version, ood=replace(fitted.ood, sha256="0" * 64)),
               replace(same_version, ood=replace(fitted.ood, threshold=fitted.ood.threshold + 0.1)),
               replace(same_version, operating_points=replace(fitted.operating_points, malignant=0.5))]
    identities = {b.identity for b in (plain, same_version, *changed)}
    assert len(identities) == 2 + len(changed)
    member = plain.members[0]
    assert cache_key(member) == cache_key(member, "probabilities")
    assert cache_key(member, "probabilities+features:flips") != cache_key(member)
    assert isinstance(fitted.ood, OodSpec)
