"""Packaging: what the wheel installs, and where installed bundles are found (package, entry points,
DERMSCORE_MODELS). The wheel itself is built and run from a fresh virtual environment by .ci/run."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from dermscore.bundle import (DEFAULT_BUNDLE, ENTRY_POINT_GROUP, installed_bundles, packaged_models_dir,
                              resolve_bundle)
from dermscore.cli import app
from dermscore.errors import BundleError

runner = CliRunner()


def test_wheel_installs_every_dermscore_package_and_nothing_else() -> None:
    """The package list is explicit (models/ is mapped into dermscore/models), so a new subpackage must
    be added to it; training/ stays out of site-packages."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dermscore").rglob("__init__.py")}
    assert set(config["packages"]) == on_disk | {"dermscore.models"}
    assert config["package-dir"] == {"dermscore.models": "models"}
    assert (REPO / "training" / "__init__.py").is_file()


def test_checkout_finds_the_default_bundle_in_the_top_level_models_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DERMSCORE_MODELS", raising=False)
    assert packaged_models_dir() == REPO / "models"
    assert resolve_bundle(None) == REPO / "models" / DEFAULT_BUNDLE


def install_bundle_distribution(site: Path, bundle: Path, module: str = "clinic_bundles") -> Path:
    """A distribution as pip leaves it in site-packages: a package holding a bundle folder, and a
    dist-info whose entry_points.txt registers that package in the dermscore.bundles group."""
    package = site / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Extra dermscore bundles."""\n')
    shutil.copytree(bundle, package / "clinic-bundle")
    info = site / "clinic_bundles-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clinic-bundles\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nclinic = {module}\n")
    return package / "clinic-bundle"


def test_entry_point_bundles_are_listed_and_resolved_by_name(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DERMSCORE_MODELS", raising=False)
    folder = install_bundle_distribution(tmp_path / "site", small_bundle)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = {(b.name, s.origin) for b, s in installed_bundles()}
    assert ("test-bundle", "entry point clinic (clinic-bundles)") in found
    assert ("ham10000-ensemble", "package") in found
    assert resolve_bundle("clinic-bundle") == folder
    assert resolve_bundle(None) == REPO / "models" / DEFAULT_BUNDLE  # the package's own comes first
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0, listed.output
    assert f"test-bundle\t0.0.1-test\t{folder}\tentry point clinic (clinic-bundles)" in listed.output
    assert f"{REPO / 'models' / DEFAULT_BUNDLE}\tpackage" in listed.output


def test_dermscore_models_env_is_the_only_place_when_set(
    small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_bundle_distribution(tmp_path / "site", small_bundle)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DERMSCORE_MODELS", str(small_bundle.parent))
    assert [(b.name, s.origin) for b, s in installed_bundles()] == [("test-bundle", "DERMSCORE_MODELS")]
    with pytest.raises(BundleError, match="clinic-bundle.*DERMSCORE_MODELS"):
        resolve_bundle("clinic-bundle")


def test_broken_entry_point_names_its_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DERMSCORE_MODELS", raising=False)
    info = tmp_path / "site" / "broken_bundles-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-bundles\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_bundle(None) == REPO / "models" / DEFAULT_BUNDLE  # found before the broken one is imported
    with pytest.raises(BundleError, match="broken-bundles.*cannot be imported"):
        resolve_bundle("anything-else")
