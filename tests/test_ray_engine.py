"""The Ray engine against a real local Ray instance: same records as the local engine, and exactly once
when a model actor dies mid-run.

One Ray instance (2 CPUs) serves the whole module; starting it costs ~15 s on the 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from typer.testing import CliRunner

from conftest import SMALL_200
from dermscore.bundle import Bundle, load_bundle
from dermscore.cli import app
from dermscore.discover import discover, file_source
from dermscore.engines import RayOptions
from dermscore.engines.ray import CRASH_MARKER_ENV, score_on_ray
from dermscore.errors import BundleError, UsageError
from dermscore.infer import Predictor, score
from dermscore.records import Failure, Scored

BATCH = 4


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-hook") / "crash-once"


@pytest.fixture(scope="module", autouse=True)
def ray_instance(crash_marker: Path):
    # Workers inherit the environment Ray was started with, so the test hook is armed here; it only
    # fires while the marker file exists.
    os.environ[CRASH_MARKER_ENV] = str(crash_marker)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    del os.environ[CRASH_MARKER_ENV]


@pytest.fixture(scope="module")
def bundle(small_bundle: Path) -> Bundle:
    return load_bundle(small_bundle)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real HAM10000 images, some in a zip (whose sources cannot be pickled), and four bad inputs."""
    images = sorted((SMALL_200 / "images").glob("*.jpg"))[:12]
    assert len(images) == 12, f"real data missing under {SMALL_200 / 'images'}"
    folder = tmp_path_factory.mktemp("mixed")
    for image in images[:9]:
        shutil.copy(image, folder / image.name)
    with zipfile.ZipFile(folder / "export.zip", "w") as archive:
        for image in images[9:]:
            archive.write(image, f"lesions/{image.name}")
    with zipfile.ZipFile(folder / "damaged.zip", "w") as archive:  # stored, so one flipped byte fails the CRC
        archive.write(images[0], "damaged.jpg")
    damaged = bytearray((folder / "damaged.zip").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (folder / "damaged.zip").write_bytes(bytes(damaged))
    data = images[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "not-an-image.jpg").write_bytes(b"patient notes, not pixels\n" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def local_results(bundle: Bundle, mixed_folder: Path) -> list[Scored | Failure]:
    return list(score(discover([mixed_folder]), Predictor(bundle, BATCH)))


def split(results: list[Scored | Failure]) -> tuple[list[Scored], list[Failure]]:
    return [r for r in results if isinstance(r, Scored)], [r for r in results if isinstance(r, Failure)]


def assert_same_records(ray_results: list[Scored | Failure], local_results: list[Scored | Failure]) -> None:
    ray_scored, ray_failed = split(ray_results)
    local_scored, local_failed = split(local_results)
    assert [s.ref for s in ray_scored] == [s.ref for s in local_scored]  # location, sha256, frame
    # quality is measured in the decode step both engines share (compare=False keeps it out of ref equality)
    assert [s.ref.quality for s in ray_scored] == [s.ref.quality for s in local_scored]
    assert all(s.ref.quality for s in ray_scored)
    for ours, theirs in zip(ray_scored, local_scored):
        assert ours.member_probabilities.keys() == theirs.member_probabilities.keys()
        for member, probabilities in theirs.member_probabilities.items():
            np.testing.assert_allclose(ours.member_probabilities[member], probabilities, atol=1e-5, rtol=0)
    assert ray_failed == local_failed  # same inputs, same stage, same words


def test_same_records_as_the_local_engine(bundle: Bundle, mixed_folder: Path, local_results) -> None:
    results = list(score_on_ray(discover([mixed_folder]), bundle, BATCH, options=RayOptions(replicas=1)))

    scored, failed = split(results)
    assert len(scored) == 12 and len(failed) == 4
    assert any("!lesions/" in s.ref.location for s in scored)  # zip members travelled as bytes
    assert any("damaged.zip!" in f.location and f.stage == "read" for f in failed)  # ... or as their read error
    assert {f.stage for f in failed} == {"read", "decode"}
    assert_same_records(results, local_results)


def test_a_model_actor_killed_mid_run_costs_no_image_and_repeats_none(
    bundle: Bundle, mixed_folder: Path, local_results, crash_marker: Path
) -> None:
    crash_marker.touch()

    results = list(score_on_ray(discover([mixed_folder]), bundle, BATCH))

    assert not crash_marker.exists(), "the test hook did not fire: no actor reached its second batch"
    counts = Counter(r.ref.location if isinstance(r, Scored) else r.location for r in results)
    assert counts and set(counts.values()) == {1}
    assert_same_records(results, local_results)


def test_a_node_whose_bundle_copy_differs_stops_the_run_with_the_bundle_error(
    small_bundle: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(small_bundle, tmp_path / "bundle")
    bundle = load_bundle(copy)  # verified here, on the driver ...
    weights = copy / bundle.members[0].file
    weights.write_bytes(weights.read_bytes() + b"changed on the node")  # ... then changed under the workers

    with pytest.raises(BundleError, match="does not match"):
        list(score_on_ray(discover([mixed_folder]), bundle, BATCH))


def test_ood_scores_match_the_local_engine(fitted_bundle: dict[str, Path]) -> None:
    """A bundle with an OOD detector: the actors return the same ood_score as the local engine."""
    fitted = load_bundle(fitted_bundle["bundle"])
    sources = [file_source(p) for p in sorted((SMALL_200 / "images").glob("*.jpg"))[:6]]
    local = list(score(sources, Predictor(fitted, BATCH)))
    on_ray = list(score_on_ray(sources, fitted, BATCH))
    assert [r.ref.location for r in on_ray] == [r.ref.location for r in local]
    assert all(r.ood_score is not None for r in on_ray)
    assert [r.ood_score for r in on_ray] == pytest.approx([r.ood_score for r in local], rel=1e-6)


def test_bad_resources_are_usage_errors_before_any_work() -> None:
    with pytest.raises(UsageError, match="--replicas"):
        RayOptions(replicas=0)
    with pytest.raises(UsageError, match="--gpus-per-replica"):
        RayOptions(gpus_per_replica=-1)


def test_cli_engine_ray_writes_the_same_reports_as_the_local_engine(
    small_bundle: Path, mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative input from another directory than the one Ray's workers started in: files travel as
    # absolute paths while reports keep the path as given.
    monkeypatch.chdir(mixed_folder.parent)
    tables = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        result = CliRunner().invoke(app, ["run", mixed_folder.name, "--model", str(small_bundle), "--out", str(out),
                                          "--batch-size", str(BATCH), "--engine", engine, "--replicas", "1"])
        assert result.exit_code == 3, result.output  # some inputs failed, as they should
        tables[engine] = {name: pd.read_csv(out / name) for name in ("images.csv", "errors.csv")}
    assert len(tables["ray"]["images.csv"]) == 12
    assert tables["ray"]["images.csv"]["source"].str.startswith(mixed_folder.name).all()
    for name in ("images.csv", "errors.csv"):
        pd.testing.assert_frame_equal(tables["ray"][name], tables["local"][name], atol=1e-5)


def test_the_local_engine_never_imports_ray() -> None:
    code = "import sys, dermscore.cli, dermscore.run, dermscore.engines; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
