"""A member as a two-output model: its probabilities and the penultimate-layer features the OOD detector reads.

Why derive it here instead of storing a second model: the shipped weight files stay the ones the manifest
hashes, and the features come from the very forward pass that gives the probabilities (no extra cost
beyond a copy). The features are the input of the classifier's last layer (the softmax Dense). A member
that averages its flipped views inside the model (``views = "flips"``, see ``training/export.py``
``flip_averaged``) has its classifier nested in a wrapper; its features are averaged over the same
four views, exactly as its probabilities are. The bundle's ``ood`` field declares which (``views``);
the derived model's probabilities are checked against the member's own on a probe batch, so a wrapper
of another shape is refused instead of giving features that do not belong to its scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dermscore.bundle import Member
from dermscore.errors import BundleError
from dermscore.preprocess import prepare

VIEWS = ("none", "flips")
FEATURE_TOLERANCE = 1e-4  # probabilities of the derived model against the member's own


def output_list(outputs: Any) -> list[np.ndarray]:
    """A model's output(s) as a list of float64 arrays: [probabilities] or [probabilities, features]."""
    return [np.asarray(o, dtype=np.float64) for o in (outputs if isinstance(outputs, list | tuple) else [outputs])]


def flip_views(image: Any) -> list[Any]:
    """The four flips of an (n, h, w, 3) tensor: the views a flip-averaged member averages over."""
    from keras import ops

    return [image, ops.flip(image, axis=2), ops.flip(image, axis=1), ops.flip(image, axis=(1, 2))]


def mean_over_views(stacked: Any, views: int) -> Any:
    """(views * n, k) stacked view by view -> (n, k) mean over the views."""
    from keras import ops

    return ops.mean(ops.reshape(stacked, (views, -1, stacked.shape[-1])), axis=0)


def classifier_of(model: Any, views: str) -> Any:
    """The plain classifier inside ``model``: the model itself, or the one model a flip wrapper calls."""
    import keras

    if views == "none":
        return model
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise BundleError(
            f"member '{model.name}' is declared flip-averaged but wraps {len(nested)} models instead of one; "
            "the bundle's ood.views does not describe this member. Refit the OOD detector with training/."
        )
    return nested[0]


def with_features(model: Any, views: str) -> Any:
    """A Keras model mapping the member's input to ``[probabilities, features]``."""
    import keras

    if views not in VIEWS:
        raise BundleError(f"ood.views {views!r} is unknown; expected one of {VIEWS}.")
    classifier = classifier_of(model, views)
    two = keras.Model(classifier.inputs, [classifier.output, classifier.layers[-1].input], name=f"{model.name}_features")
    if views == "none":
        return two
    image = keras.Input(model.input_shape[1:], name="image")
    views_list = flip_views(image)
    probabilities, features = two(keras.ops.concatenate(views_list, axis=0))
    n = len(views_list)
    return keras.Model(image, [mean_over_views(probabilities, n), mean_over_views(features, n)], name=model.name)


def probe_difference(model: Any, member: Member, derived: Callable[[np.ndarray], np.ndarray]) -> float:
    """Largest difference between the member's probabilities and ``derived``'s (prepared inputs ->
    probabilities) on a probe batch: how a model derived from a member proves it still is the member."""
    from dermscore.onnx_backend import probe_images

    probe = np.stack([prepare(image, (member,))[member.name] for image in probe_images()])
    return float(np.abs(output_list(model.predict_on_batch(probe))[0] - np.asarray(derived(probe))).max())


def feature_member(model: Any, member: Member, views: str) -> Any:
    """``with_features(model, views)``, refused unless its probabilities are the member's own on a probe batch."""
    derived = with_features(model, views)
    difference = probe_difference(model, member, lambda x: output_list(derived.predict_on_batch(x))[0])
    if not difference <= FEATURE_TOLERANCE:
        raise BundleError(
            f"member '{member.name}': the model derived for OOD features differs from the member by "
            f"{difference:.2e} on a probe batch (more than {FEATURE_TOLERANCE:g}); the bundle's ood field does "
            "not describe this member. Refit the OOD detector with `python -m training calibrate`."
        )
    return derived
