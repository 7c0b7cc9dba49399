"""ONNX Runtime backend: equal to Keras through `dermscore run`, cached exports reused, damage rebuilt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
from typer.testing import CliRunner

import dermscore.onnx_backend as onnx_backend
from dermscore.bundle import CLASS_CODES, load_bundle
from dermscore.cli import app
from dermscore.errors import BundleError, UsageError
from dermscore.bench import ensemble_flops
from dermscore.infer import Predictor, load_member
from dermscore.onnx_backend import OnnxModel, cache_key
from dermscore.preprocess import prepare, stack_inputs
from dermscore.runtime import Runtime, resolve_backend

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'dermscore[onnx]') is not installed")
pytest.importorskip("tf2onnx", reason="the onnx extra (pip install 'dermscore[onnx]') is not installed")

from processes import backend_in_a_fresh_process  # noqa: E402

TOLERANCE = 1e-4


def exports(cache: Path) -> dict[str, tuple[int, int]]:
    """Each cached ONNX file with its (inode, mtime_ns): a rewrite changes at least one of them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(cache.glob("*.onnx"))}


def scores(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "images.csv").set_index("source").sort_index()


def test_onnx_run_equals_keras_and_a_second_run_reuses_the_export(
    small_bundle: Path, sample_images: list[Path], fresh_onnx_cache: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    images = [str(p) for p in sample_images[:5]]
    job = tmp_path / "job.toml"
    job.write_text('backend = "keras"\n', encoding="utf-8")  # the job-file key, like every run option
    keras_run = runner.invoke(app, ["run", *images, "--model", str(small_bundle), "--out", str(tmp_path / "k"),
                                    "--config", str(job), "--batch-size", "4"])
    assert keras_run.exit_code == 0, keras_run.output
    assert not fresh_onnx_cache.exists()  # the Keras backend never exports

    onnx_run = runner.invoke(app, ["run", *images, "--model", str(small_bundle), "--out", str(tmp_path / "o"),
                                   "--backend", "onnx", "--batch-size", "4"])
    assert onnx_run.exit_code == 0, onnx_run.output
    first = exports(fresh_onnx_cache)
    assert len(first) == 2  # one export per member
    notes = [json.loads(p.read_text()) for p in fresh_onnx_cache.glob("*.json")]
    assert sorted(n["member"] for n in notes) == ["densenet201", "inceptionv3"]
    assert all(n["max_abs_diff_vs_keras"] <= TOLERANCE for n in notes)

    again = runner.invoke(app, ["run", *images, "--model", str(small_bundle), "--out", str(tmp_path / "a"),
                                "--batch-size", "4"])  # auto: ONNX on this CPU-only machine
    assert again.exit_code == 0, again.output
    assert exports(fresh_onnx_cache) == first  # same files, untouched: no second export

    keras, onnx, auto = scores(tmp_path / "k"), scores(tmp_path / "o"), scores(tmp_path / "a")
    assert list(onnx.index) == list(keras.index) == images
    columns = [*CLASS_CODES, "malignant_probability", "confidence"]
    assert np.abs(onnx[columns].to_numpy() - keras[columns].to_numpy()).max() <= TOLERANCE
    assert (onnx["predicted_class"] == keras["predicted_class"]).all()
    np.testing.assert_array_equal(auto[columns].to_numpy(), onnx[columns].to_numpy())
    for folder, expected in (("k", "Keras "), ("o", "ONNX Runtime "), ("a", "ONNX Runtime ")):
        sheet = openpyxl.load_workbook(tmp_path / folder / "report.xlsx")["Run"]
        run_sheet = {row[0]: row[1] for row in sheet.iter_rows(values_only=True)}
        assert run_sheet["Inference"].startswith(expected), run_sheet["Inference"]


def test_a_damaged_cached_export_is_rebuilt(small_bundle: Path, fresh_onnx_cache: Path) -> None:
    bundle = load_bundle(small_bundle)
    onnx = Runtime(backend="onnx")
    Predictor(bundle, 2, onnx)
    member = bundle.members[0]
    path = fresh_onnx_cache / f"{cache_key(member)}.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: still loads, silently wrong
    path.write_bytes(bytes(data))
    damaged = path.stat().st_mtime_ns

    predictor = Predictor(bundle, 2, onnx)
    assert path.stat().st_mtime_ns != damaged
    assert isinstance(predictor.models[member.name], OnnxModel)
    note = json.loads(path.with_suffix(".json").read_text())
    assert note["onnx_sha256"] != "" and note["max_abs_diff_vs_keras"] <= TOLERANCE

    batch = stack_inputs([prepare(rgb, bundle.members) for rgb in onnx_backend.probe_images()[:2]], bundle.members)
    expected = Predictor(bundle, 2, Runtime(backend="keras"))(batch)
    got = predictor(batch)
    for name in expected:
        assert np.abs(got[name] - expected[name]).max() <= TOLERANCE


def test_an_export_that_differs_from_keras_is_refused_or_replaced_by_keras(
    small_bundle: Path, fresh_onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(small_bundle)
    monkeypatch.setattr(onnx_backend, "PROBE_TOLERANCE", -1.0)  # no export can pass this check
    with pytest.raises(BundleError, match="differs from Keras.*--backend keras"):
        Predictor(bundle, 2, Runtime(backend="onnx"))
    assert not list(fresh_onnx_cache.glob("*.onnx"))  # nothing unchecked is left for the next run
    with pytest.warns(RuntimeWarning, match="Scoring with Keras instead"):
        predictor = Predictor(bundle, 2, Runtime(backend="auto"))
    assert predictor.backend == "keras"


def test_members_with_their_features_export_and_match_keras(small_bundle: Path, fresh_onnx_cache: Path) -> None:
    """The two-output graph of members without flip TTA (``ood.views`` "none", what ``python -m training export``
    writes by default and fits its OOD detector from): probabilities and penultimate features through tf2onnx,
    cached under their own key, equal to Keras. (tests/test_training_pipeline.py scores with Keras: this is the
    ONNX side of its bundles.)"""
    from dermscore.infer import features_key
    from dermscore.onnx_backend import outputs_of

    bundle = load_bundle(small_bundle)
    onnx = Predictor(bundle, 3, Runtime(backend="onnx"), feature_views="none")
    assert onnx.backend == "onnx"
    assert {m.path.name for m in onnx.models.values()} == {
        f"{cache_key(m, outputs_of('none'))}.onnx" for m in bundle.members}
    assert all(m.path.parent == fresh_onnx_cache for m in onnx.models.values())
    keras = Predictor(bundle, 3, Runtime(backend="keras"), feature_views="none")
    batch = stack_inputs([prepare(rgb, bundle.members) for rgb in onnx_backend.probe_images()[:3]], bundle.members)
    got, expected = onnx(batch), keras(batch)
    assert set(got) == set(expected) == {key for m in bundle.members for key in (m.name, features_key(m.name))}
    for name in expected:
        assert got[name].shape == expected[name].shape
        assert np.abs(got[name] - expected[name]).max() <= TOLERANCE * max(1.0, np.abs(expected[name]).max())


def test_onnx_is_chosen_only_where_it_was_measured_and_refused_clearly_elsewhere() -> None:
    assert resolve_backend(Runtime(), "cpu") == "onnx"
    assert resolve_backend(Runtime(), "gpu") == "keras"
    assert resolve_backend(Runtime(precision="float16"), "cpu") == "keras"
    assert resolve_backend(Runtime(backend="keras"), "cpu") == "keras"
    with pytest.raises(UsageError, match="--backend onnx: .*--precision bfloat16.*--xla"):
        resolve_backend(Runtime(backend="onnx", precision="bfloat16", xla=True), "cpu")
    with pytest.raises(UsageError, match="--backend must be one of auto, keras, onnx"):
        Runtime(backend="tflite")


def test_backend_onnx_without_onnxruntime_is_a_usage_error(
    small_bundle: Path, sample_images: list[Path], tmp_path: Path
) -> None:
    # sys.modules[name] = None is Python's own way to make a package unimportable in one process.
    code = ("import sys; sys.modules['onnxruntime'] = None; from dermscore.cli import main; "
            "sys.argv[0] = 'dermscore'; main()")
    done = subprocess.run(
        [sys.executable, "-c", code, "run", str(sample_images[0]), "--model", str(small_bundle),
         "--out", str(tmp_path / "r"), "--backend", "onnx"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "--backend onnx" in done.stderr and "onnxruntime" in done.stderr and "dermscore[onnx]" in done.stderr
    assert not (tmp_path / "r" / "images.csv").exists()


def test_a_cpu_run_with_a_cached_export_never_loads_tensorflow(small_bundle: Path, fresh_onnx_cache: Path) -> None:
    Predictor(load_bundle(small_bundle), 2, Runtime(backend="onnx"))  # warms the cache
    assert backend_in_a_fresh_process(small_bundle) == ["onnx", "False", "False"]


def test_flip_averaged_members_export_and_match_keras(tmp_path: Path, fresh_onnx_cache: Path) -> None:
    """The shipped bundle's members average four flipped views inside the model (training.export): the
    ONNX export must carry that graph and agree with Keras, and the benchmark must count all four."""
    import keras

    from conftest import SMALL_MEMBERS, build_small_member, make_bundle
    from training.export import flip_averaged

    members = []
    for i, spec in enumerate(SMALL_MEMBERS):
        plain = build_small_member(tmp_path / f"plain{i}.keras", tuple(spec["input_size"]), seed=i)
        wrapped = tmp_path / f"tta{i}.keras"
        flip_averaged(keras.models.load_model(plain, compile=False)).save(wrapped)
        members.append({**spec, "model_file": wrapped})
    bundle = load_bundle(make_bundle(tmp_path / "tta-bundle", members, provenance={"ensemble": {"tta": True}}))
    batch = stack_inputs([prepare(np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8),
                                  bundle.members) for i in range(3)], bundle.members)
    keras_predictor = Predictor(bundle, 3, Runtime(backend="keras"))
    keras_out = keras_predictor(batch)
    onnx_predictor = Predictor(bundle, 3, Runtime(backend="onnx"))
    assert onnx_predictor.backend == "onnx"
    onnx_out = onnx_predictor(batch)
    for name in keras_out:
        assert np.abs(onnx_out[name] - keras_out[name]).max() <= TOLERANCE
    assert len(list(fresh_onnx_cache.glob("*.onnx"))) == len(bundle.members)
    # The benchmark's FLOP count sees the four views that the per-layer count alone would miss.
    plain = load_bundle(make_bundle(tmp_path / "plain-bundle", [{**s, "model_file": tmp_path / f"plain{i}.keras"}
                                                              for i, s in enumerate(SMALL_MEMBERS)]))
    plain_flops, plain_views = ensemble_flops(plain, {m.name: load_member(plain.member_path(m), Runtime())
                                                      for m in plain.members})
    tta_flops, tta_views = ensemble_flops(bundle, keras_predictor.models)
    assert (plain_views, tta_views) == (1, 4) and plain_flops > 0
    assert tta_flops == pytest.approx(4 * plain_flops)

