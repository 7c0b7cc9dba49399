"""Bundle manifests: parsing, hash verification, resolution of --model and of the default bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SMALL_MEMBERS, make_bundle
from dermscore.bundle import CLASS_CODES, load_bundle, read_bundle, resolve_bundle, sha256_file
from dermscore.errors import BundleError


def test_written_manifest_records_members_classes_and_hashes(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    assert bundle.classes == CLASS_CODES
    assert set(bundle.malignant_classes) == {"mel", "bcc", "akiec"}
    for member in bundle.members:
        assert member.sha256 == sha256_file(small_bundle / member.file)
    assert [m.input_size for m in bundle.members] == [(40, 48), (32, 32)]
    raw = json.loads((small_bundle / "bundle.json").read_text())
    assert raw["provenance"] and raw["intended_use"]


def test_tampered_weight_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b", SMALL_MEMBERS)
    weights = folder / "b.keras"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"b\.keras.*does not match"):
        load_bundle(folder)


def test_missing_weight_file_is_refused(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b", SMALL_MEMBERS)
    (folder / "a.keras").unlink()
    with pytest.raises(BundleError, match=r"a\.keras.*missing"):
        load_bundle(folder)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("preprocessing", "caffe", "preprocessing 'caffe' is unknown"),
        ("input_size", [299], "input_size must be"),
        ("resize", "magic", "resize 'magic' is unknown"),
    ],
)
def test_invalid_member_fields_are_named(small_bundle: Path, tmp_path: Path, field: str, value, message: str) -> None:
    manifest = json.loads((small_bundle / "bundle.json").read_text())
    manifest["members"][0][field] = value
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        read_bundle(tmp_path)


def test_missing_default_bundle_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMSCORE_MODELS", str(tmp_path))
    with pytest.raises(BundleError, match="--model") as info:
        resolve_bundle(None)
    assert "python -m training" in str(info.value)


def test_bundle_name_resolves_under_models_dir(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMSCORE_MODELS", str(small_bundle.parent))
    assert resolve_bundle("small") == small_bundle
    with pytest.raises(BundleError, match="not found"):
        resolve_bundle("no-such-bundle")


def test_identity_changes_with_weights(small_bundle: Path, tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "other", [dict(SMALL_MEMBERS[0], weight=0.7), SMALL_MEMBERS[1]])
    assert read_bundle(small_bundle).identity != read_bundle(other).identity
