"""Per-member preprocessing: resize an RGB uint8 image, optionally normalise its colour, and normalise
it as the member was trained.

Pure functions on arrays (no I/O), shared by scoring and by ``training/`` so that an image is prepared
identically in both. The normalisations reproduce ``keras.applications`` ``preprocess_input`` for
InceptionV3 ("tf" mode) and DenseNet ("torch" mode) without importing Keras, and never modify the
caller's array (keras' version mutates float input in place).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from dermscore.bundle import ColourConstancy, Member

_PIL_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize(
    rgb: np.ndarray, size: tuple[int, int], method: str = "bilinear", image: Image.Image | None = None
) -> np.ndarray:
    """Stretch an (H, W, 3) uint8 image to ``size`` = (height, width), antialiased when shrinking.

    ``image`` is ``rgb`` already converted to PIL, so a frame resized for several members is converted once.
    """
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    image = Image.fromarray(rgb) if image is None else image
    return np.asarray(image.resize((width, height), _PIL_RESAMPLING[method]))


def normalize(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Map RGB in [0, 255] (uint8, or float after colour constancy; any leading shape) to the float32 range the
    member expects; returns a new array."""
    # In place on the one float copy: the same arithmetic as ``x / 127.5 - 1`` with no temporaries, which
    # in the decoding threads cost time and memory traffic the members need.
    x = pixels.astype(np.float32)
    if mode == "inception":
        x /= 127.5
        x -= 1.0
        return x
    if mode == "densenet":
        x /= 255.0
        x -= _IMAGENET_MEAN
        x /= _IMAGENET_STD
        return x
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'inception' or 'densenet'")


def shades_of_gray(pixels: Any, p: float, xp: ModuleType | Any = np) -> Any:
    """Shades of Gray colour constancy on float RGB in [0, 255] with any leading shape (..., H, W, 3).

    The illuminant of each image is the Minkowski p-norm mean of each channel, e_c = mean(x_c ** p) ** (1/p)
    (p = 1 is grey world, p = infinity max-RGB); each channel is multiplied by |e| / (sqrt(3) e_c), so a
    grey illuminant leaves the image unchanged, and the result is clipped to [0, 255] as a camera would
    saturate. ``xp`` is the array module: numpy here, ``keras.ops`` in training's graph, so the two paths
    run this one function (they agree to float32 rounding, tested). Powers are taken of x / 255 so x ** 6
    stays small in float32. Never modifies its input.
    """
    illuminant = xp.power(xp.mean(xp.power(pixels / 255.0, p), axis=(-3, -2), keepdims=True), 1.0 / p)
    norm = xp.sqrt(xp.sum(illuminant * illuminant, axis=-1, keepdims=True))
    # A black image (or channel) has a zero illuminant: its gain multiplies zeros, so any finite value will do.
    gains = norm / (np.sqrt(3.0) * xp.maximum(illuminant, 1e-6))
    return xp.clip(pixels * gains, 0.0, 255.0)


def correct_colour(rgb: np.ndarray, constancy: ColourConstancy | None) -> np.ndarray:
    """The bundle's colour constancy applied to resized uint8 images (float32 out); unchanged without one."""
    if constancy is None:
        return rgb
    if constancy.method != "shades_of_gray":  # read_bundle admits no other; a guard for hand-made objects
        raise ValueError(f"unknown colour constancy method {constancy.method!r}")
    return shades_of_gray(rgb.astype(np.float32), constancy.p)


def prepare(
    rgb: np.ndarray, members: Sequence[Member], constancy: ColourConstancy | None = None
) -> dict[str, np.ndarray]:
    """Inputs for every member from one decoded image; each distinct (size, method) is resized once.

    Colour constancy (the bundle's ``colour_constancy``) comes after resizing, on the image the member
    sees (training caches resized images and applies it there too; the illuminant estimate of a mean
    hardly depends on the resolution), and before the member's normalisation.
    """
    resized: dict[tuple[tuple[int, int], str], np.ndarray] = {}
    inputs = {}
    image = Image.fromarray(rgb)  # once, not once per input size
    for member in members:
        key = (member.input_size, member.resize)
        if key not in resized:
            resized[key] = correct_colour(resize(rgb, member.input_size, member.resize, image), constancy)
        inputs[member.name] = normalize(resized[key], member.preprocessing)
    return inputs


def stack_inputs(prepared: Sequence[Mapping[str, np.ndarray]], members: Sequence[Member]) -> dict[str, np.ndarray]:
    """One batch per member from per-image inputs (``prepare`` outputs), in the Predictor's shape."""
    return {m.name: np.stack([inputs[m.name] for inputs in prepared]) for m in members}
