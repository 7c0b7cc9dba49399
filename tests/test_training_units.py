"""Fast checks of training's building blocks on real HAM10000 metadata (no network, no mocks)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dermscore.bundle import CLASS_CODES
from training import metrics
from training.data import Record
from training.split import lesion_split, split_summary

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200x150"


def _metadata_records() -> list[Record]:
    with open(DATA / "HAM10000_metadata.csv", newline="", encoding="utf-8") as handle:
        return [
            Record(r["image_id"], r["lesion_id"], r["dx"], r["age"], r["sex"], r["localization"], "")
            for r in csv.DictReader(handle)
        ]


def test_split_keeps_every_lesion_on_one_side_and_is_stratified():
    records = _metadata_records()
    side_of = lesion_split(records, val=0.15, test=0.15, seed=42)
    sides_per_lesion: dict[str, set[str]] = {}
    for record in records:
        sides_per_lesion.setdefault(record.lesion_id, set()).add(side_of[record.image_id])
    assert len(side_of) == len(records)
    assert all(len(sides) == 1 for sides in sides_per_lesion.values())
    # Lesions with several images exist, so the grouping is really exercised.
    assert sum(1 for r in records if r.lesion_id == records[0].lesion_id) > 1
    summary = split_summary(records, side_of)
    for code in CLASS_CODES:
        total = sum(summary["per_class"][s][code] for s in ("train", "val", "test"))
        assert summary["per_class"]["test"][code] == pytest.approx(0.15 * total, rel=0.25, abs=3)
        assert summary["per_class"]["val"][code] == pytest.approx(0.15 * total, rel=0.25, abs=3)
    assert lesion_split(records, seed=42) == side_of  # fixed seed, same split
    assert lesion_split(records, seed=7) != side_of


def test_balanced_accuracy_and_confusion_matrix():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 0])
    matrix = metrics.confusion_matrix(y_true, y_pred)
    assert matrix[0, 0] == 3 and matrix[0, 1] == 1 and matrix[2, 0] == 1
    assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    positive = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + positive * 0.3, 1)  # rounding creates ties
    pos, neg = scores[positive], scores[~positive]
    pairwise = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert metrics.roc_auc(positive, scores) == pytest.approx(pairwise)


def test_sensitivity_at_specificity():
    negatives = np.arange(10) / 10  # 0.0 .. 0.9
    positives = np.array([0.05, 0.75, 0.85, 0.95])
    positive = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    scores = np.r_[negatives, positives]
    # 80% specificity: threshold 0.7 (8 of 10 negatives <= it) -> positives above: 0.75, 0.85, 0.95
    assert metrics.sensitivity_at_specificity(positive, scores, 0.8) == pytest.approx(0.75)
    assert metrics.sensitivity_at_specificity(positive, scores, 0.9) == pytest.approx(0.5)


def test_expected_calibration_error():
    probs = np.array([[0.9, 0.1]] * 10)
    assert metrics.expected_calibration_error(np.zeros(10, int), probs) == pytest.approx(0.1)
    assert metrics.expected_calibration_error(np.array([0] * 9 + [1]), probs) == pytest.approx(0.0)


def test_ensemble_weight_grid_prefers_better_member_and_equal_on_ties():
    from training.ensemble import fit_weights, weight_grid

    assert len(weight_grid(2)) == 21 and (0.5, 0.5) in weight_grid(2)
    y = np.array([0, 1, 2, 0, 1, 2])
    good = np.eye(7)[y] * 0.9 + 0.01
    bad = np.eye(7)[(y + 1) % 3] * 0.9 + 0.01
    assert fit_weights([good, bad], y)["weights"][0] > 0.5
    assert fit_weights([good, good], y)["weights"] == [0.5, 0.5]


def test_frozen_batchnorm_keeps_and_uses_its_moving_statistics():
    """Keras 3: a BN layer with trainable=False runs in inference mode even inside fit()."""
    import keras

    from training.models import build_classifier, set_backbone_trainable

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    bn = keras.layers.BatchNormalization(name="bn")
    x = keras.layers.Conv2D(2, 1, name="conv")(bn(inputs))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(x)))
    bn.moving_mean.assign(np.full(3, 0.5, "float32"))
    bn.moving_variance.assign(np.full(3, 2.0, "float32"))
    bn.trainable = False
    before = [np.array(w) for w in bn.weights]
    x_train = np.random.default_rng(0).normal(5.0, 3.0, (32, 4, 4, 3)).astype("float32")  # far from moving stats
    y_train = np.eye(7, dtype="float32")[np.arange(32) % 7]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=8, epochs=2, verbose=0)
    for old, new in zip(before, bn.weights):
        np.testing.assert_array_equal(old, np.array(new))  # neither statistics nor gamma/beta moved
    # In training mode it still normalises with the moving statistics, not the batch's.
    expected = (x_train - 0.5) / np.sqrt(2.0 + bn.epsilon)
    np.testing.assert_allclose(np.array(bn(x_train, training=True)), expected, rtol=1e-4, atol=1e-4)

    # Our fine-tuning helper leaves every BN layer of a backbone frozen, whatever else it unfreezes.
    classifier = build_classifier("densenet201", (32, 32), init="none")
    set_backbone_trainable(classifier, True)
    layers = classifier.get_layer("backbone").layers
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    assert any(layer.trainable for layer in layers if layer.weights and layer not in bns)
    set_backbone_trainable(classifier, False)
    assert not any(layer.trainable_weights for layer in layers)
    assert classifier.get_layer("head_dense").trainable


def test_prior_correction_baked_into_the_output_bias_matches_the_fitted_adjustment():
    """What the ensemble step fits on validation (adjust) is exactly what export writes into the model."""
    import keras

    from training.ensemble import adjust
    from training.export import shift_output_bias
    from training.train import sampling_prior

    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax", name="probabilities")(inputs))
    x = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")
    before = np.asarray(model(x), dtype=np.float64)
    prior = sampling_prior(np.array([0] * 40 + [1] * 10 + [2, 3, 4, 5, 6] * 4), 0.5)
    assert prior[0] > prior[1] > prior[2] and prior.sum() == pytest.approx(1.0)
    shift_output_bias(model, -0.75 * np.log(prior))
    np.testing.assert_allclose(np.asarray(model(x)), adjust(before, prior, 0.75), atol=1e-5)
    np.testing.assert_allclose(adjust(before, prior, 0.0), before, atol=1e-12)


def test_epoch_learning_rate_warms_up_then_decays_to_its_floor():
    from training.train import epoch_learning_rate

    peak, floor = 1e-3, 0.01
    rates = [epoch_learning_rate(peak, e, 20, 2.0, floor) for e in range(20)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(peak)
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(peak * floor)
    # The epochs before a time budget fixes the total do not depend on it.
    for epoch in range(3):
        assert epoch_learning_rate(peak, epoch, 20, 2.0, floor) == epoch_learning_rate(peak, epoch, 200, 2.0, floor)
    assert epoch_learning_rate(peak, 0, 1, 1.0, floor) == pytest.approx(peak)  # a one-epoch run trains at peak


def test_flip_averaged_member_saves_loads_and_averages_the_four_flips(tmp_path):
    import keras

    from training.export import flip_averaged, save_member

    keras.utils.set_random_seed(0)
    member = keras.Sequential(
        [keras.Input((12, 16, 3)), keras.layers.Conv2D(3, 3), keras.layers.Flatten(), keras.layers.Dense(7, activation="softmax")]
    )
    path = save_member(flip_averaged(member), tmp_path / "member.keras", float16=False)
    loaded = keras.models.load_model(path, compile=False)  # no custom objects needed
    x = np.random.default_rng(0).normal(size=(3, 12, 16, 3)).astype("float32")
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    expected = np.mean([np.asarray(member(v)) for v in views], axis=0)
    assert np.abs(np.asarray(loaded(x)) - expected).max() < 1e-6
    assert np.abs(np.asarray(loaded(x)) - np.asarray(member(x))).max() > 1e-4  # the flips really change the input


def test_time_budget_fixes_the_epoch_count_from_the_pace_after_the_first_epoch():
    from training.train import fitted_epochs

    # Too early: fewer than three epochs, or less than a quarter of the budget gone.
    assert fitted_epochs([50.0, 60.0], 0.0, 100.0, 60.0, 2, 200) is None
    assert fitted_epochs([5.0, 7.0, 9.0], 0.0, 100.0, 9.0, 3, 200) is None
    # First epoch (compilation) took 40 s, then 10 s each: pace 10.5 s, 50 s left -> 4 more epochs.
    assert fitted_epochs([40.0, 50.0, 60.0], 0.0, 110.0, 60.0, 3, 200) == 7
    assert fitted_epochs([40.0, 50.0, 60.0], 0.0, 110.0, 60.0, 3, 5) == 5  # never past --epochs
    assert fitted_epochs([40.0, 50.0, 60.0], 0.0, 50.0, 60.0, 3, 200) == 3  # over budget: stop now
