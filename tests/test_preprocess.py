"""Per-member preprocessing must equal keras.applications' preprocess_input and never mutate input."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import image_array
from dermscore.bundle import Member
from dermscore.preprocess import normalize, prepare, resize


@pytest.mark.parametrize(
    ("mode", "module"),
    [("inception", "inception_v3"), ("densenet", "densenet")],
)
def test_normalize_matches_keras_preprocess_input(mode: str, module: str) -> None:
    import importlib

    keras_module = importlib.import_module(f"keras.applications.{module}")
    pixels = image_array(1)
    expected = keras_module.preprocess_input(pixels.astype(np.float32).copy())
    np.testing.assert_allclose(normalize(pixels, mode), expected, rtol=1e-6, atol=1e-6)


def test_normalize_leaves_callers_array_untouched() -> None:
    pixels = image_array(2).astype(np.float32)
    before = pixels.copy()
    normalize(pixels, "densenet")
    np.testing.assert_array_equal(pixels, before)


def test_resize_is_height_width_and_keeps_uint8() -> None:
    out = resize(image_array(3, (150, 200)), (75, 100))
    assert out.shape == (75, 100, 3) and out.dtype == np.uint8


def test_prepare_gives_each_member_its_own_size_and_scale() -> None:
    members = [
        Member("a", "x", "a.keras", "0", (30, 40), "inception", "bilinear", 1.0),
        Member("b", "x", "b.keras", "0", (20, 20), "densenet", "bicubic", 1.0),
    ]
    inputs = prepare(image_array(4), members)
    assert inputs["a"].shape == (30, 40, 3) and inputs["b"].shape == (20, 20, 3)
    assert inputs["a"].min() >= -1.0 and inputs["a"].max() <= 1.0
    assert inputs["b"].min() < -1.0 or inputs["b"].max() > 1.0  # ImageNet-standardised, not [-1, 1]


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        normalize(image_array(), "caffe")
