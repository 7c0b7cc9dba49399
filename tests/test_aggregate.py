"""Aggregation: flags, divergence, lesion identity and the per-lesion roll-up, with plain records."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_200
from dermscore.aggregate import (
    IDENTITY_COLUMNS,
    SOURCE_HEADER,
    Thresholds,
    disagree,
    ensemble,
    image_columns,
    image_row,
    lesion_columns,
    lesion_identity,
    lesion_rows,
    max_divergence,
)
from dermscore.bundle import CLASS_CODES, DEFAULT_MALIGNANT, Bundle, Member
from dermscore.errors import UsageError
from dermscore.lesion_map import LESION_MAP, METADATA, read_lesion_map, read_lesion_maps
from dermscore.records import ImageRef, Scored

MEL, NV, BKL = CLASS_CODES.index("mel"), CLASS_CODES.index("nv"), CLASS_CODES.index("bkl")


def member(name: str, weight: float) -> Member:
    return Member(name=name, architecture="small-cnn", file=f"{name}.keras", sha256="0" * 64,
                  input_size=(32, 32), preprocessing="densenet", resize="bilinear", weight=weight)


BUNDLE = Bundle(path=Path("."), name="pure", version="1", classes=CLASS_CODES,
                malignant_classes=DEFAULT_MALIGNANT, members=(member("a", 0.25), member("b", 0.75)),
                intended_use="tests")


def dist(**mass: float) -> np.ndarray:
    """A probability vector over CLASS_CODES; the rest of the mass spread evenly over the other classes."""
    p = np.zeros(len(CLASS_CODES))
    for code, value in mass.items():
        p[CLASS_CODES.index(code)] = value
    rest = [i for i, c in enumerate(CLASS_CODES) if c not in mass]
    p[rest] = (1.0 - p.sum()) / len(rest)
    return p


def scored(location: str, a: np.ndarray, b: np.ndarray | None = None, **ref: object) -> Scored:
    return Scored(ImageRef(location=location, sha256="f" * 64, **ref), {"a": a, "b": a if b is None else b})


def test_ensemble_is_the_manifest_weighted_mean() -> None:
    a, b = dist(mel=0.9), dist(nv=0.9)
    assert np.allclose(ensemble({"a": a, "b": b}, BUNDLE), 0.25 * a + 0.75 * b)


def test_divergence_is_zero_for_identical_one_for_disjoint_and_symmetric() -> None:
    p, q = dist(mel=0.7, nv=0.3), dist(mel=0.2, nv=0.8)
    assert max_divergence(np.stack([p, p, p])) == pytest.approx(0.0, abs=1e-12)
    assert max_divergence(np.eye(7)[[MEL, NV]]) == pytest.approx(1.0)
    assert max_divergence(np.stack([p, q])) == pytest.approx(max_divergence(np.stack([q, p])))
    assert max_divergence(p[None]) == 0.0
    # the largest pair wins: adding a far-away row raises it
    assert max_divergence(np.stack([p, q, np.eye(7)[BKL]])) > max_divergence(np.stack([p, q]))


def test_disagreement_when_top_classes_differ_or_divergence_reaches_threshold() -> None:
    near_tie = np.stack([dist(mel=0.41, nv=0.40), dist(mel=0.40, nv=0.41)])
    same_top = np.stack([dist(mel=0.95), dist(mel=0.35, nv=0.30)])
    assert disagree(near_tie, Thresholds().for_bundle(None).disagreement)[0]  # different top class, tiny divergence
    flagged, divergence = disagree(same_top, 0.1)
    assert flagged and divergence >= 0.1
    assert not disagree(same_top, divergence + 0.01)[0]


def test_image_row_columns_flags_and_member_top_classes() -> None:
    row = image_row(scored("x/a.jpg", dist(mel=0.6, nv=0.3), dist(nv=0.6, mel=0.3)), BUNDLE)
    assert list(row) == [*image_columns(BUNDLE), SOURCE_HEADER]  # the columns, then the SR's header attributes
    assert row["top_class_a"] == "mel" and row["top_class_b"] == "nv"
    assert row["predicted_class"] == "nv"  # member b weighs 0.75
    assert row["flags"] == "malignant;review"
    assert row["review_reasons"] == "members-disagree"
    calm = image_row(scored("x/b.jpg", dist(nv=0.9)), BUNDLE)
    assert calm["flags"] == "" and calm["review_reasons"] == "" and calm["member_divergence"] == 0.0
    unsure = image_row(scored("x/c.jpg", dist(nv=0.4, bkl=0.35)), BUNDLE, Thresholds(review=0.5))
    assert unsure["flags"] == "review" and unsure["review_reasons"] == "low-confidence"


def test_malignant_flag_is_inclusive_at_the_threshold() -> None:
    probabilities = dist(mel=0.2, bcc=0.1, nv=0.65)
    value = image_row(scored("x.jpg", probabilities), BUNDLE)["malignant_probability"]
    assert "malignant" in image_row(scored("x.jpg", probabilities), BUNDLE, Thresholds(malignant=value))["flags"]
    below = Thresholds(malignant=float(np.nextafter(value, 1.0)))
    assert "malignant" not in image_row(scored("x.jpg", probabilities), BUNDLE, below)["flags"]


def test_identity_columns_come_from_dicom_attributes_and_are_empty_for_plain_images() -> None:
    attributes = {"patient_id": "P1", "study_instance_uid": "1.2", "series_instance_uid": "1.2.3",
                  "sop_instance_uid": "1.2.3.4", "study_date": "20260101", "modality": "XC", "body_site": "back"}
    row = image_row(scored("s.dcm", dist(nv=0.9), frame=2, attributes=attributes, lesion_id="1.2.3"), BUNDLE)
    assert {k: row[k] for k in IDENTITY_COLUMNS} == attributes
    assert (row["lesion_id"], row["lesion_source"], row["frame"]) == ("1.2.3", "dicom", 2)
    plain = image_row(scored("p.jpg", dist(nv=0.9)), BUNDLE)
    assert all(plain[k] is None for k in IDENTITY_COLUMNS)
    assert (plain["lesion_id"], plain["lesion_source"]) == ("p.jpg", "image")


def test_lesion_identity_prefers_a_map_then_the_dicom_series_then_the_image(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("image,lesion_id\nISIC_1.jpg,L1\nsub/ISIC_2.jpg,L2\nISIC_3,L3\n", encoding="utf-8")
    lesion_map = read_lesion_map(path, LESION_MAP)
    assert lesion_identity(ImageRef("d/ISIC_1.jpg", "0"), [lesion_map]) == ("L1", LESION_MAP)
    assert lesion_identity(ImageRef("sub/ISIC_2.jpg", "0"), [lesion_map]) == ("L2", LESION_MAP)
    assert lesion_identity(ImageRef("a.zip!x/ISIC_3.png", "0"), [lesion_map]) == ("L3", LESION_MAP)
    assert lesion_identity(ImageRef("ISIC_1.dcm", "0", lesion_id="S"), []) == ("S", "dicom")
    assert lesion_identity(ImageRef("f.dcm", "0", frame=3, lesion_id=None), [lesion_map]) == ("f.dcm#3", "image")


def test_ham10000_metadata_maps_file_stems_to_lesions() -> None:
    lesion_map, = read_lesion_maps(metadata=SMALL_200 / "HAM10000_metadata.csv")
    with open(SMALL_200 / "HAM10000_metadata.csv", encoding="utf-8") as handle:
        first = next(csv.DictReader(handle))
    assert lesion_map.kind == METADATA
    assert lesion_map.lookup(f"/any/where/{first['image_id']}.jpg") == first["lesion_id"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("picture,lesion_id\na,b\n", "missing ['image']"),
     ("image,lesion_id\na.jpg,L1\na.jpg,L2\n", "line 3"),
     ("image,lesion_id\n\xff\n", "UTF-8")],
)
def test_bad_lesion_maps_are_refused_with_the_file_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "map.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UsageError, match="--lesion-map") as caught:
        read_lesion_map(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_missing_lesion_map_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot open"):
        read_lesion_map(tmp_path / "absent.csv", METADATA)


def test_lesion_rows_average_their_images_and_carry_flags() -> None:
    rows = [
        image_row(scored("a1.jpg", dist(nv=0.9), lesion_id="A"), BUNDLE),
        image_row(scored("b1.jpg", dist(mel=0.8), lesion_id="B"), BUNDLE),
        image_row(scored("a2.jpg", dist(nv=0.7, mel=0.2), lesion_id="A"), BUNDLE),
        image_row(scored("c.jpg", dist(nv=0.6, mel=0.35)), BUNDLE),
    ]
    lesions = lesion_rows(rows, BUNDLE, Thresholds(malignant=0.3))
    assert [lesion["lesion_id"] for lesion in lesions] == ["A", "B", "c.jpg"]  # first appearance
    a = lesions[0]
    assert list(a) == lesion_columns(BUNDLE)
    assert a["n_images"] == 2 and a["images"] == "a1.jpg | a2.jpg"
    expected = np.mean([[r[c] for c in CLASS_CODES] for r in (rows[0], rows[2])], axis=0)
    assert np.allclose([a[c] for c in CLASS_CODES], expected)
    assert a["predicted_class"] == "nv"
    assert a["malignant_probability"] == pytest.approx(expected[[CLASS_CODES.index(c) for c in DEFAULT_MALIGNANT]].sum())
    assert a["flags"] == ""
    assert lesions[1]["flags"] == "malignant" and lesions[1]["n_images"] == 1
    assert lesions[2]["flags"] == "malignant" and lesions[2]["lesion_source"] == "image"


def test_a_lesion_is_reviewed_when_its_images_disagree_or_one_image_is_over_threshold() -> None:
    rows = [
        image_row(scored("1.jpg", dist(nv=0.95, mel=0.01), lesion_id="L", attributes={"patient_id": "P1"}), BUNDLE),
        image_row(scored("2.jpg", dist(nv=0.45, mel=0.4), lesion_id="L", attributes={"patient_id": "P2"}), BUNDLE),
    ]
    lesion, = lesion_rows(rows, BUNDLE, Thresholds(malignant=0.35, disagreement=0.05, review=0.5))
    assert lesion["malignant_probability"] < 0.35 <= rows[1]["malignant_probability"]
    assert lesion["flags"] == "review"
    assert lesion["review_reasons"].split(";") == ["images-disagree", "image-over-threshold"]
    assert lesion["image_divergence"] >= 0.05
    assert lesion["patient_id"] == "(mixed)"


def test_thresholds_must_be_probabilities() -> None:
    with pytest.raises(UsageError, match="--malignant-threshold"):
        Thresholds(malignant=1.5)
    with pytest.raises(UsageError, match="--disagreement-threshold"):
        Thresholds(disagreement=-0.1)
