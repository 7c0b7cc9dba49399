"""Training-time augmentation, built from Keras 3 layers and ``keras.ops`` so it runs on any backend.

Dermatoscopic images have no canonical orientation, so flips and full rotations are label-preserving;
zoom and colour jitter imitate different dermatoscopes, magnifications and lighting. The augmenter is
wrapped around the classifier only while training; exported members never contain it.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="training")
class ColourJitter(keras.layers.Layer):
    """Random per-image brightness, contrast and saturation on normalised images (identity at inference).

    Works in the normalised space the model sees (any affine normalisation), so it does not need to
    know the member's preprocessing.
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.2, saturation: float = 0.2, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.contrast, self.saturation, self.seed = brightness, contrast, saturation, seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        shape = (ops.shape(images)[0], 1, 1, 1)

        def factor(amount):
            return keras.random.uniform(shape, 1.0 - amount, 1.0 + amount, seed=self.generator, dtype=images.dtype)

        grey = ops.mean(images, axis=-1, keepdims=True)
        images = grey + (images - grey) * factor(self.saturation)
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        images = mean + (images - mean) * factor(self.contrast)
        shift = keras.random.uniform(shape, -self.brightness, self.brightness, seed=self.generator, dtype=images.dtype)
        return images + shift * 2.0  # normalised ranges span ~4 units, so 0.1 ~ 5% of the range

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, seed=self.seed)
        return config


def build_augmenter(rotation: float = 0.5, zoom: float = 0.1, colour: float = 0.2, seed: int = 0) -> keras.Sequential:
    """Flips, rotation (``rotation`` in turns: 0.5 = up to +-180 degrees), zoom and colour jitter."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect", seed=seed + 2),
            ColourJitter(brightness=colour / 2, contrast=colour, saturation=colour, seed=seed + 3),
        ],
        name="augment",
    )


def compile_on_jax(trainer: keras.Model) -> None:
    """Let a JAX trainer (a model with an ``augment`` layer from ``build_augmenter``) be compiled.

    Keras flags RandomRotation and RandomZoom as not jit-compatible (true of their TensorFlow kernels),
    and one such layer switches compilation off for the whole model; on JAX every op then runs
    eagerly: 6-12 s per InceptionV3 step on an H200 with the GPU about 1% busy (measured here). Their
    JAX implementations compile. The flag is not saved, so a trainer loaded from a checkpoint (already
    compiled from its saved settings) is switched to compiled here as well.
    """
    if keras.backend.backend() != "jax":
        return
    for layer in trainer.get_layer("augment").layers:
        layer.supports_jit = True
    if trainer.compiled and not trainer.run_eagerly:
        trainer.jit_compile = True
