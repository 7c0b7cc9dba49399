"""`dermscore run` end to end through the real CLI, on real HAM10000 images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import make_bundle
from dermscore.bundle import CLASS_CODES
from dermscore.cli import app

runner = CliRunner()


def run_cli(*args: str) -> "object":
    return runner.invoke(app, ["run", *args])


def test_scores_every_sample_image_with_probabilities_summing_to_one(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path
) -> None:
    result = run_cli(str(sample_images[0].parent), "--model", str(small_bundle), "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "r" / "images.csv")
    assert sorted(table["source"]) == sorted(str(p) for p in sample_images)
    first = list(table.columns).index(CLASS_CODES[0])  # class columns in bundle order (README, 'Reports')
    assert list(table.columns[first:first + len(CLASS_CODES)]) == list(CLASS_CODES)
    assert (table[list(CLASS_CODES)].sum(axis=1) - 1).abs().max() < 1e-6
    assert (table["predicted_class"] == table[list(CLASS_CODES)].idxmax(axis=1)).all()
    assert (table["malignant_probability"] - table[["akiec", "bcc", "mel"]].sum(axis=1)).abs().max() < 1e-9
    assert set(table["bundle_name"]) == {"test-bundle"}
    assert "not a diagnosis" in result.output


def test_walks_recursively_with_any_case_extension_and_reports_bad_files(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path
) -> None:
    from PIL import Image

    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(sample_images[0], root / "a" / "ONE.JPG")
    Image.open(sample_images[1]).save(root / "a" / "b" / "two.Png")
    Image.open(sample_images[2]).save(root / "three.tiff")
    Image.open(sample_images[3]).save(root / "four.BMP")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(sample_images[4].read_bytes()[:2000])
    result = run_cli(str(root), "--model", str(small_bundle), "--out", str(tmp_path / "r"))
    assert result.exit_code == 3, result.output
    images = pd.read_csv(tmp_path / "r" / "images.csv")
    assert sorted(Path(s).name for s in images["source"]) == ["ONE.JPG", "four.BMP", "three.tiff", "two.Png"]
    errors = pd.read_csv(tmp_path / "r" / "errors.csv")
    assert list(errors["source"]) == [str(root / "broken.jpg")]
    assert "truncated" in errors["reason"][0]


def test_without_an_installed_bundle_run_says_how_to_get_one(
    sample_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DERMSCORE_MODELS", str(tmp_path / "empty"))
    result = run_cli(str(sample_images[0]), "--out", str(tmp_path / "r"))
    assert result.exit_code == 4
    assert "No default model bundle" in result.output and "--model" in result.output


def test_tampered_bundle_is_refused_by_run(small_bundle: Path, sample_images: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(small_bundle, copy)
    with open(copy / "a.keras", "ab") as handle:
        handle.write(b"\0")
    result = run_cli(str(sample_images[0]), "--model", str(copy), "--out", str(tmp_path / "r"))
    assert result.exit_code == 4
    assert "a.keras" in result.output and "does not match" in result.output


def test_models_command_lists_and_verifies(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMSCORE_MODELS", str(small_bundle.parent))
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0 and "test-bundle" in listed.output
    shown = runner.invoke(app, ["models", "small"])
    assert shown.exit_code == 0 and "verified" in shown.output and "inceptionv3" in shown.output


def test_every_command_help_has_an_example() -> None:
    import typer.main

    click_group = typer.main.get_command(app)
    for name, command in click_group.commands.items():
        assert "Example: dermscore" in (command.help or ""), name


def test_real_architectures_at_full_input_size(sample_images: list[Path], tmp_path: Path) -> None:
    """InceptionV3 at 299x299 and DenseNet201 at 224x224 (weights=None) through `dermscore run`."""
    import keras

    keras.utils.set_random_seed(0)
    files = {}
    for name, builder in (("inceptionv3", keras.applications.InceptionV3), ("densenet201", keras.applications.DenseNet201)):
        files[name] = tmp_path / f"{name}.keras"
        builder(weights=None, classes=7, classifier_activation="softmax").save(files[name])
    bundle = make_bundle(
        tmp_path / "real",
        [
            {"name": "inceptionv3", "architecture": "InceptionV3", "file": "inceptionv3.keras",
             "model_file": files["inceptionv3"], "input_size": [299, 299], "preprocessing": "inception",
             "resize": "bilinear", "weight": 0.5},
            {"name": "densenet201", "architecture": "DenseNet201", "file": "densenet201.keras",
             "model_file": files["densenet201"], "input_size": [224, 224], "preprocessing": "densenet",
             "resize": "bilinear", "weight": 0.5},
        ],
        name="real-architectures",
    )
    folder = tmp_path / "in"
    folder.mkdir()
    for image in sample_images[:3]:
        shutil.copy(image, folder)
    result = run_cli(str(folder), "--model", str(bundle), "--out", str(tmp_path / "r"), "--batch-size", "2")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "r" / "images.csv")
    assert len(table) == 3
    assert (table[list(CLASS_CODES)].sum(axis=1) - 1).abs().max() < 1e-5
