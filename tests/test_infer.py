"""Batched ensemble inference: fixed-shape batches, same results whatever the batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import image_array
from dermscore.aggregate import ensemble
from dermscore.bundle import load_bundle
from dermscore.discover import file_source
from dermscore.infer import Predictor, bounded_map, score
from dermscore.preprocess import prepare
from dermscore.records import Failure, Scored
from dermscore.runtime import Runtime


def test_predictor_matches_direct_model_calls_and_pads_partial_batches(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    predictor = Predictor(bundle, batch_size=4, runtime=Runtime(backend="keras"))  # called directly below
    images = [image_array(i) for i in range(3)]
    inputs = [prepare(rgb, bundle.members) for rgb in images]
    batch = {m.name: np.stack([x[m.name] for x in inputs]) for m in bundle.members}
    out = predictor(batch)
    for member in bundle.members:
        assert out[member.name].shape == (3, 7)
        direct = np.asarray(predictor.models[member.name](batch[member.name], training=False))
        np.testing.assert_allclose(out[member.name], direct, atol=1e-6)


def test_scores_do_not_depend_on_batch_size(small_bundle: Path, sample_images: list[Path]) -> None:
    bundle = load_bundle(small_bundle)
    sources = [file_source(p) for p in sample_images[:5]]
    results = {}
    for batch_size in (1, 3, 4):  # 3: a batch whose halves differ in size
        scored = list(score(sources, Predictor(bundle, batch_size)))
        assert all(isinstance(s, Scored) for s in scored)
        results[batch_size] = np.stack([ensemble(s.member_probabilities, bundle) for s in scored])
    np.testing.assert_allclose(results[1], results[4], atol=1e-6)
    np.testing.assert_allclose(results[3], results[4], atol=1e-6)
    np.testing.assert_allclose(results[4].sum(axis=1), 1.0, atol=1e-6)


def test_ensemble_is_the_weighted_mean_of_members(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    a = np.array([1.0, 0, 0, 0, 0, 0, 0])
    b = np.array([0, 1.0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(ensemble({"inceptionv3": a, "densenet201": b}, bundle)[:2], [0.5, 0.5])


def test_failures_are_reported_beside_scores(small_bundle: Path, sample_images: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    items = [file_source(sample_images[0]), file_source(bad), file_source(sample_images[1])]
    out = list(score(items, Predictor(load_bundle(small_bundle), 2)))
    assert [type(o).__name__ for o in out] == ["Failure", "Scored", "Scored"]
    assert isinstance(out[0], Failure) and out[0].location == str(bad)


def test_bounded_map_keeps_order() -> None:
    assert list(bounded_map(lambda x: x * x, range(50), workers=3, window=4)) == [x * x for x in range(50)]
