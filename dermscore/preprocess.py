"""Per-member preprocessing: resize an RGB uint8 image and normalise it as the member was trained.

Pure functions on arrays (no I/O), shared by scoring and by ``training/`` so that an image is prepared
identically in both. The normalisations reproduce ``keras.applications`` ``preprocess_input`` for
InceptionV3 ("tf" mode) and DenseNet ("torch" mode) without importing Keras, and never modify the
caller's array (keras' version mutates float input in place).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from dermscore.bundle import Member

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
    """Map uint8 RGB (any leading shape) to the float32 range the member expects; returns a new array."""
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


def prepare(rgb: np.ndarray, members: Sequence[Member]) -> dict[str, np.ndarray]:
    """Inputs for every member from one decoded image; each distinct (size, method) is resized once."""
    resized: dict[tuple[tuple[int, int], str], np.ndarray] = {}
    inputs = {}
    image = Image.fromarray(rgb)  # once, not once per input size
    for member in members:
        key = (member.input_size, member.resize)
        if key not in resized:
            resized[key] = resize(rgb, member.input_size, member.resize, image)
        inputs[member.name] = normalize(resized[key], member.preprocessing)
    return inputs


def stack_inputs(prepared: Sequence[Mapping[str, np.ndarray]], members: Sequence[Member]) -> dict[str, np.ndarray]:
    """One batch per member from per-image inputs (``prepare`` outputs), in the Predictor's shape."""
    return {m.name: np.stack([inputs[m.name] for inputs in prepared]) for m in members}
