"""Colour constancy as a manifest field: Shades of Gray in dermscore's preparation, old bundles unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL_200, SMALL_MEMBERS, make_bundle
from dermscore.bundle import ColourConstancy, load_bundle, read_bundle
from dermscore.decode import decode_source
from dermscore.discover import file_source
from dermscore.errors import BundleError
from dermscore.infer import decode_and_prepare
from dermscore.preprocess import normalize, prepare, resize, shades_of_gray

SOG = {"method": "shades_of_gray", "p": 6}


def real_image(name: str = "ISIC_0027419") -> np.ndarray:
    with Image.open(SMALL_200 / "images" / f"{name}.jpg") as image:
        return np.asarray(image.convert("RGB"))


def test_shades_of_gray_removes_an_illuminant_cast_and_leaves_its_input() -> None:
    rgb = real_image().astype(np.float32)
    before = rgb.copy()
    plain = shades_of_gray(rgb, 6)
    tinted = rgb * np.array([0.75, 0.9, 1.0], dtype=np.float32)  # a bluer, dimmer light (no channel clips)
    np.testing.assert_array_equal(rgb, before)
    # The same lesion under another light comes out the same up to overall brightness: the cast is divided out.
    corrected = shades_of_gray(tinted, 6)
    assert plain.max() < 255 and corrected.max() < 255
    np.testing.assert_allclose(corrected / corrected.mean(), plain / plain.mean(), atol=1e-5)
    assert np.abs(tinted / tinted.mean() - rgb / rgb.mean()).mean() > 0.05  # ... while the cast itself was large
    # An image lit by a grey light keeps its colours: the channel means after correction are equal-norm.
    illuminant = np.mean((plain / 255.0) ** 6, axis=(0, 1)) ** (1 / 6)
    assert np.ptp(illuminant) < 0.02 * illuminant.mean()


def test_black_image_stays_black_and_finite() -> None:
    out = shades_of_gray(np.zeros((8, 8, 3), np.float32), 6)
    assert np.isfinite(out).all() and not out.any()


def test_prepare_applies_constancy_after_resizing_before_normalising() -> None:
    rgb = real_image()
    members = read_bundle_members()
    constancy = ColourConstancy("shades_of_gray", 6.0)
    inputs = prepare(rgb, members, constancy)
    for member in members:
        expected = normalize(shades_of_gray(resize(rgb, member.input_size).astype(np.float32), 6.0), member.preprocessing)
        np.testing.assert_allclose(inputs[member.name], expected, atol=1e-6)
    plain = prepare(rgb, members)
    assert all(np.abs(inputs[m.name] - plain[m.name]).max() > 0.01 for m in members)


def read_bundle_members():
    from dermscore.bundle import _parse_member

    return [_parse_member({**m, "sha256": "0"}, Path("test")) for m in SMALL_MEMBERS]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("constancy")
    plain = make_bundle(root / "plain", SMALL_MEMBERS)
    corrected = make_bundle(root / "corrected", SMALL_MEMBERS, colour_constancy=SOG)
    return plain, corrected


def test_manifest_field_is_parsed_and_scoring_uses_it(bundles: tuple[Path, Path]) -> None:
    plain, corrected = bundles
    assert load_bundle(plain).colour_constancy is None
    bundle = load_bundle(corrected)
    assert bundle.colour_constancy == ColourConstancy("shades_of_gray", 6.0)
    source = file_source(SMALL_200 / "images" / "ISIC_0025030.jpg")
    rgb = decode_source(source)[0].rgb
    (_, inputs), = decode_and_prepare(source, bundle)
    expected = prepare(rgb, bundle.members, bundle.colour_constancy)
    for member in bundle.members:
        np.testing.assert_array_equal(inputs[member.name], expected[member.name])


def test_bundle_without_the_field_behaves_as_before(bundles: tuple[Path, Path]) -> None:
    plain, corrected = bundles
    bundle = load_bundle(plain)
    source = file_source(SMALL_200 / "images" / "ISIC_0025030.jpg")
    rgb = decode_source(source)[0].rgb
    (_, inputs), = decode_and_prepare(source, bundle)
    for member in bundle.members:  # exactly resize + normalise, as before the field existed
        np.testing.assert_array_equal(inputs[member.name], normalize(resize(rgb, member.input_size), member.preprocessing))
    # The identity the ledger keys results by is the one computed before the field existed ...
    digest = hashlib.sha256()
    for m in bundle.members:
        digest.update(f"{m.name}:{m.sha256}:{m.weight}:{m.input_size}".encode())
    assert bundle.identity == f"{bundle.name}@{bundle.version}#{digest.hexdigest()[:16]}"
    # ... and a bundle that adds colour constancy to the same weights is another identity (other scores).
    assert load_bundle(corrected).identity.split("#")[1] != bundle.identity.split("#")[1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "grey_edge", "p": 6}, "method one of"),
        ("shades_of_gray", "must be an object"),
        ({"method": "shades_of_gray"}, "p \\(the Minkowski norm\\)"),
        ({"method": "shades_of_gray", "p": 0}, "from 1 to 64"),
    ],
)
def test_invalid_field_is_refused_naming_it(bundles: tuple[Path, Path], tmp_path: Path, value, message: str) -> None:
    manifest = json.loads((bundles[0] / "bundle.json").read_text())
    manifest["colour_constancy"] = value
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        read_bundle(tmp_path)
