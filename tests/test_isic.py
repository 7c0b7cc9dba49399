"""isic.csv: the ISIC 2018 Task 3 layout, names for zip members, DICOM frames and clashing stems, and a run
on real HAM10000 images scored by the challenge's own scoring tool (isic-challenge-scoring)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from dermscore.aggregate import image_row
from dermscore.cli import app
from dermscore.report.isic import ISIC_CLASSES, ISIC_COLUMNS, stem
from dermscore.report.write import write_reports
from test_aggregate import BUNDLE, dist, scored
from test_report import run_info


def test_stem_of_files_zip_members_and_extensionless_dicom() -> None:
    assert stem("/data/in/ISIC_0024306.jpg") == "ISIC_0024306"
    assert stem("/data/batch.zip!day1/ISIC_1.png") == "ISIC_1"
    assert stem("C:\\scans\\IM0001") == "IM0001"
    assert stem("/data/study/DERM1") == "DERM1"


def test_isic_csv_copies_the_image_rows_and_names_every_row_uniquely(tmp_path: Path) -> None:
    rows = [
        image_row(scored("/in/a/ISIC_1.jpg", dist(mel=0.7, nv=0.2)), BUNDLE),
        image_row(scored("/in/b/ISIC_1.png", dist(nv=0.9)), BUNDLE),  # same stem, another file
        image_row(scored("/in/batch.zip!x/ISIC_2.jpg", dist(bcc=0.5, bkl=0.3)), BUNDLE),
        image_row(scored("/in/dicom/ONE", dist(df=0.8), frame=1), BUNDLE),  # single-frame DICOM
        image_row(scored("/in/dicom/MULTI", dist(vasc=0.6), frame=1), BUNDLE),
        image_row(scored("/in/dicom/MULTI", dist(akiec=0.6), frame=2), BUNDLE),
    ]
    with pytest.warns(UserWarning, match=r"/in/b/ISIC_1\.png and /in/a/ISIC_1\.jpg both .* 'ISIC_1__2'"):
        folder = write_reports(tmp_path, BUNDLE, rows, [], run_info())
    isic = pd.read_csv(folder / "isic.csv")
    images = pd.read_csv(folder / "images.csv")
    assert list(isic.columns) == list(ISIC_COLUMNS)
    assert isic["image"].tolist() == ["ISIC_1", "ISIC_1__2", "ISIC_2", "ONE", "MULTI_frame1", "MULTI_frame2"]
    for isic_code in ISIC_CLASSES:  # each value is the images.csv value of the same row, not recomputed
        np.testing.assert_array_equal(isic[isic_code].to_numpy(), images[isic_code.lower()].to_numpy())
    np.testing.assert_allclose(isic[list(ISIC_CLASSES)].sum(axis=1), 1.0, atol=1e-9)


def test_a_bundle_with_other_classes_gets_no_isic_csv_and_a_warning(tmp_path: Path) -> None:
    other = replace(BUNDLE, classes=("benign", "malignant"), malignant_classes=("malignant",))
    rows = [{"source": "/in/a.jpg", "frame": None, "benign": 0.9, "malignant": 0.1}]
    from dermscore.report.isic import write_isic_csv

    with pytest.warns(UserWarning, match="not the seven ISIC 2018 Task 3 classes"):
        assert write_isic_csv(tmp_path, other, rows) is None
    assert not (tmp_path / "isic.csv").exists()


def test_the_challenge_scoring_tool_reads_isic_csv_of_a_real_run(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scoring = pytest.importorskip("isic_challenge_scoring", reason="isic-challenge-scoring is a dev dependency")
    # Its last release for Python 3.11 (5.6) still calls DataFrame.applymap, which pandas 3 renamed to map.
    monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    from conftest import SMALL_200

    metadata = pd.read_csv(SMALL_200 / "HAM10000_metadata.csv")
    metadata = metadata[metadata["image_id"].map(lambda i: (SMALL_200 / "images" / f"{i}.jpg").exists())]
    chosen = metadata.groupby("dx").head(2).sort_values("image_id")  # two real images of each of the 7 classes
    assert chosen["dx"].nunique() == 7
    folder = tmp_path / "in"
    folder.mkdir()
    for image_id in chosen["image_id"]:
        shutil.copy(SMALL_200 / "images" / f"{image_id}.jpg", folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(folder), "--model", str(small_bundle), "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output

    truth = pd.DataFrame({"image": chosen["image_id"]})
    for isic_code in ISIC_CLASSES:
        truth[isic_code] = (chosen["dx"].str.upper() == isic_code).astype(float).to_numpy()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    score = scoring.ClassificationScore.from_file(tmp_path / "truth.csv", out / "isic.csv",
                                                  scoring.ClassificationMetric.BALANCED_ACCURACY)
    images = pd.read_csv(out / "images.csv")
    by_image = dict(zip(images["source"].map(stem), images["predicted_class"]))
    ours = balanced_accuracy_score(chosen["dx"], chosen["image_id"].map(by_image))
    assert score.overall == pytest.approx(ours)  # the challenge's figure is the one our own rows give
