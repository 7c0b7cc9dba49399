"""ONNX members shipped in a bundle (``python -m training onnx``): used as they are, verified, never re-exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermscore.bundle import MANIFEST, load_bundle, sha256_file
from dermscore.errors import BundleError
from dermscore.infer import Predictor, ood_scores
from dermscore.onnx_backend import OnnxModel, probe_images
from dermscore.preprocess import prepare, stack_inputs
from dermscore.runtime import Runtime

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'dermscore[onnx]') is not installed")
pytest.importorskip("tf2onnx", reason="the onnx extra (pip install 'dermscore[onnx]') is not installed")

from conftest import SMALL_200  # noqa: E402
from processes import backend_in_a_fresh_process  # noqa: E402
from training.cli import main  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def shipped(fitted_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fitted bundle (calibration + OOD detector) with its ONNX members written by the step."""
    bundle = tmp_path_factory.mktemp("shipped") / "bundle"
    shutil.copytree(fitted_bundle["bundle"], bundle)
    weights = {p.name: sha256_file(p) for p in [*bundle.glob("*.keras"), *bundle.glob("*.npz")]}
    assert main(["onnx", "--bundle", str(bundle), "--data", str(SMALL_200)]) == 0
    assert {p.name: sha256_file(p) for p in [*bundle.glob("*.keras"), *bundle.glob("*.npz")]} == weights
    return bundle


def batch_of(bundle: Path, n: int = 3) -> dict[str, np.ndarray]:
    members = load_bundle(bundle).members
    return stack_inputs([prepare(image, members) for image in probe_images()[:n]], members)


def test_the_step_records_each_member_and_scoring_uses_it_without_export(
    shipped: Path, fitted_bundle: dict[str, Path], fresh_onnx_cache: Path
) -> None:
    bundle = load_bundle(shipped)
    assert bundle.identity == load_bundle(fitted_bundle["bundle"]).identity  # same scores, same ledger identity
    manifest = json.loads((shipped / MANIFEST).read_text())
    for raw, member in zip(manifest["members"], bundle.members, strict=True):
        assert member.onnx is not None and member.onnx.outputs == "probabilities+features:flips"
        assert raw["onnx"]["max_abs_difference"] <= TOLERANCE
        assert raw["onnx"]["checked_on"]["real_images"] > 0
        assert raw["onnx"]["initializer_bytes_stored"] <= raw["onnx"]["initializer_bytes_float32"]

    onnx = Predictor(bundle, 3, Runtime(backend="onnx"))
    assert all(isinstance(m, OnnxModel) and m.path.parent == shipped for m in onnx.models.values())
    assert not fresh_onnx_cache.exists()  # no export, nothing written to the cache

    keras = Predictor(bundle, 3, Runtime(backend="keras"))
    batch = batch_of(shipped)
    got, expected = onnx(batch), keras(batch)
    for name in expected:
        assert np.abs(got[name] - expected[name]).max() <= TOLERANCE * max(1.0, np.abs(expected[name]).max())
    ood_got, ood_expected = ood_scores(got, onnx), ood_scores(expected, keras)
    assert ood_got is not None and ood_expected is not None
    assert np.abs(ood_got - ood_expected).max() <= TOLERANCE * max(1.0, np.abs(ood_expected).max())


def test_a_cpu_run_with_shipped_onnx_members_never_loads_tensorflow(shipped: Path, fresh_onnx_cache: Path) -> None:
    """Nor needs the exporters: with tf2onnx and onnx unimportable, ``auto`` still picks ONNX Runtime."""
    blocked = "sys.modules['tf2onnx'] = None; sys.modules['onnx'] = None; "
    assert backend_in_a_fresh_process(shipped, blocked) == ["onnx", "False", "False"]
    assert not fresh_onnx_cache.exists()


def test_a_tampered_onnx_member_is_refused(shipped: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(shipped, copy)
    target = copy / load_bundle(copy).members[0].onnx.file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{target.name}: sha256 .* ONNX file of member"):
        load_bundle(copy)
    target.unlink()
    with pytest.raises(BundleError, match=rf"{target.name}: ONNX file of member .* is missing"):
        load_bundle(copy)


def test_a_bundle_without_onnx_members_still_exports_to_the_cache(
    fitted_bundle: dict[str, Path], fresh_onnx_cache: Path
) -> None:
    bundle = load_bundle(fitted_bundle["bundle"])
    assert all(m.onnx is None for m in bundle.members)
    predictor = Predictor(bundle, 3, Runtime(backend="onnx"))
    assert len(list(fresh_onnx_cache.glob("*.onnx"))) == len(bundle.members)
    assert all(m.path.parent == fresh_onnx_cache for m in predictor.models.values())


def test_shipped_members_without_the_features_the_bundle_needs_fall_back_to_the_cache(
    shipped: Path, tmp_path: Path, fresh_onnx_cache: Path
) -> None:
    """A bundle refitted after the step (calibrate adding an OOD detector) must not score with stale graphs."""
    copy = tmp_path / "bundle"
    shutil.copytree(shipped, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for raw in manifest["members"]:
        raw["onnx"]["outputs"] = "probabilities"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    predictor = Predictor(load_bundle(copy), 3, Runtime(backend="onnx"))
    assert all(m.path.parent == fresh_onnx_cache for m in predictor.models.values())


def test_folded_batch_norm_kernels_are_stored_as_float16_and_score_as_the_float32_export(
    tmp_path: Path, fresh_onnx_cache: Path
) -> None:
    """Like the shipped members: float16-valued weights with batch normalisation, which tf2onnx folds into
    the convolution kernels; they are stored as float16 kernel times float32 scale, not left float32."""
    import keras
    import onnx

    from conftest import SMALL_MEMBERS, make_bundle

    members = []
    for i, spec in enumerate(SMALL_MEMBERS):
        keras.utils.set_random_seed(i)
        inputs = keras.Input((*spec["input_size"], 3))
        x = keras.layers.Conv2D(16, 3, use_bias=False)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Conv2D(32, 3, use_bias=False)(keras.layers.ReLU()(x))
        x = keras.layers.BatchNormalization()(x)
        outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
        model = keras.Model(inputs, outputs)
        rng = np.random.default_rng(i)  # trained-looking statistics, stored as float16 like training's export
        model.set_weights([(w + rng.uniform(0.1, 0.5, w.shape) if w.ndim == 1 else w).astype(np.float16).astype(np.float32)
                           for w in model.get_weights()])
        model.save(tmp_path / f"bn{i}.keras")
        members.append({**spec, "model_file": tmp_path / f"bn{i}.keras"})
    folder = make_bundle(tmp_path / "bundle", members)
    assert main(["onnx", "--bundle", str(folder), "--data", str(SMALL_200)]) == 0

    manifest = json.loads((folder / MANIFEST).read_text())
    for raw in manifest["members"]:
        stored, full = raw["onnx"]["initializer_bytes_stored"], raw["onnx"]["initializer_bytes_float32"]
        assert stored < 0.6 * full, (stored, full)
        graph = onnx.load(str(folder / raw["onnx"]["file"])).graph
        assert sum(i.name.endswith("__scale") for i in graph.initializer) == 2  # both folded kernels
        assert raw["onnx"]["max_abs_difference"] <= TOLERANCE
    bundle = load_bundle(folder)
    batch = batch_of(folder)
    shipped_out = Predictor(bundle, 3, Runtime(backend="onnx"))(batch)
    assert not fresh_onnx_cache.exists()
    keras_out = Predictor(bundle, 3, Runtime(backend="keras"))(batch)
    for name in keras_out:
        assert np.abs(shipped_out[name] - keras_out[name]).max() <= TOLERANCE
