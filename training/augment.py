"""Training-time augmentation and preparation, built from Keras 3 layers and ``keras.ops`` so it runs on any backend.

The trainer sees pixels in [0, 255] and runs, in its graph: geometric augmentation (flips, optionally
the transpose that completes all 8 rotations/flips, random resized crops, rotation, zoom), photometric
augmentation of what another dermoscope changes (white balance, tone curve, blur), then the bundle's
colour constancy and the member's normalisation (``Prepare``: dermscore's own functions on
``keras.ops``), then the older brightness/contrast/saturation jitter on the normalised image. So the
network learns on colour-normalised images of colour-shifted inputs, which is what makes the
constancy buy robustness. Dermatoscopic images have no canonical orientation, so all of these are
label-preserving. Only ``Prepare`` is active at inference; exported members contain none of it
(dermscore prepares images itself, from the manifest).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from dermscore.preprocess import normalize, shades_of_gray


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


@keras.saving.register_keras_serializable(package="training")
class TransposeCrop(keras.layers.Layer):
    """Random transpose (with the flips: all 8 rotations/flips) and random resized crop, as one affine warp.

    A 90-degree rotation of a non-square image (150x200) does not fit its frame. The transposed image is
    cropped to the frame's aspect ratio around its centre and scaled back to the frame (for 150x200: the
    middle 112 of 200 rows, a 4/3 zoom; lesions are centred in dermoscopy), so no pixel is invented and
    nothing is stretched; square inputs get an exact transpose. The random resized crop then takes an
    area fraction in [crop_scale, 1] with aspect ratio in [3/4, 4/3] at a random position and scales it
    to the frame. Both are one ``affine_transform`` per batch (bilinear, reflect at the borders), which
    compiles on every backend. Identity at inference.
    """

    def __init__(self, transpose: bool = True, crop_scale: float = 0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.transpose, self.crop_scale, self.seed = transpose, crop_scale, seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or (not self.transpose and not self.crop_scale):
            return images
        n = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]

        def uniform(low, high):
            return keras.random.uniform((n,), low, high, seed=self.generator, dtype="float32")

        if self.crop_scale:
            area = uniform(self.crop_scale, 1.0)
            ratio = ops.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_w = ops.minimum(width * ops.sqrt(area * ratio), float(width))
            crop_h = ops.minimum(height * ops.sqrt(area / ratio), float(height))
            off_x, off_y = uniform(0.0, 1.0) * (width - crop_w), uniform(0.0, 1.0) * (height - crop_h)
        else:
            crop_w, crop_h = ops.full((n,), float(width)), ops.full((n,), float(height))
            off_x, off_y = ops.zeros((n,)), ops.zeros((n,))
        sx, sy, zero = crop_w / width, crop_h / height, ops.zeros((n,))
        # Output (x, y) -> input (a0 x + a1 y + a2, b0 x + b1 y + b2). Plain crop: x_in = ox + sx x, y_in = oy + sy y.
        plain = ops.stack([sx, zero, off_x, zero, sy, off_y, zero, zero], axis=1)
        if not self.transpose:
            transform = plain
        else:
            # Transposed frame: x_in = y' / k + c0, y_in = x' / k with (x', y') the cropped point, k = W / H.
            k = width / height
            c0 = (width - height * height / width) / 2.0
            transposed = ops.stack([zero, sy / k, off_y / k + c0, sx / k, zero, off_x / k, zero, zero], axis=1)
            flip = keras.random.uniform((n, 1), 0.0, 1.0, seed=self.generator) < 0.5
            transform = ops.where(flip, transposed, plain)
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(transpose=self.transpose, crop_scale=self.crop_scale, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="training")
class DeviceJitter(keras.layers.Layer):
    """Per-image white balance, tone curve and blur on pixels in [0, 255] (identity at inference).

    What differs between dermoscopes before any colour correction: channel gains in [1 - white_balance,
    1 + white_balance], a gamma log-uniform in [1 / (1 + gamma), 1 + gamma], and a blend between the
    image and a Gaussian blur of sigma ``blur`` pixels by a uniform weight (a per-image blur strength
    with one fixed kernel). Runs in float32 under mixed precision (powers of small numbers).
    """

    def __init__(self, white_balance: float = 0.0, gamma: float = 0.0, blur: float = 0.0, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.white_balance, self.gamma, self.blur, self.seed = white_balance, gamma, blur, seed
        self.generator = keras.random.SeedGenerator(seed)

    def _kernel(self) -> np.ndarray:
        radius = max(int(math.ceil(2.5 * self.blur)), 1)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / self.blur) ** 2)
        return (taps / taps.sum()).astype("float32")

    def call(self, images, training=None):
        if not training:
            return images
        n = ops.shape(images)[0]
        x = ops.cast(images, "float32")
        if self.blur:
            taps = self._kernel()
            r = len(taps) // 2
            padded = ops.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
            rows = ops.depthwise_conv(padded, ops.convert_to_tensor(np.tile(taps[:, None, None, None], (1, 1, 3, 1))))
            blurred = ops.depthwise_conv(rows, ops.convert_to_tensor(np.tile(taps[None, :, None, None], (1, 1, 3, 1))))
            x = x + keras.random.uniform((n, 1, 1, 1), 0.0, 1.0, seed=self.generator) * (blurred - x)
        if self.white_balance:
            wb = self.white_balance
            x = x * keras.random.uniform((n, 1, 1, 3), 1 - wb, 1 + wb, seed=self.generator)
        if self.gamma:
            log_range = math.log1p(self.gamma)
            g = ops.exp(keras.random.uniform((n, 1, 1, 1), -log_range, log_range, seed=self.generator))
            x = 255.0 * ops.power(ops.clip(x, 0.0, 255.0) / 255.0, g)
        return ops.clip(x, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(white_balance=self.white_balance, gamma=self.gamma, blur=self.blur, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="training")
class Prepare(keras.layers.Layer):
    """dermscore's preparation after resizing, in the graph: colour constancy (optional), then normalisation.

    Both come from ``dermscore.preprocess``: Shades of Gray runs the same function on ``keras.ops``, and
    the member normalisation (per-channel affine) is read off ``normalize`` itself, so the trainer cannot
    drift from what scoring does. Float32 under mixed precision. Active at inference too (it is not an
    augmentation), but validation and export use the numpy path on the classifier alone.
    """

    def __init__(self, preprocessing: str, constancy_p: float | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.preprocessing, self.constancy_p = preprocessing, constancy_p
        offset = normalize(np.zeros((1, 1, 3), np.float32), preprocessing)
        self.scale = (normalize(np.ones((1, 1, 3), np.float32), preprocessing) - offset).reshape(3)
        self.offset = offset.reshape(3)

    def call(self, images):
        x = ops.cast(images, "float32")
        if self.constancy_p:
            x = shades_of_gray(x, self.constancy_p, xp=ops)
        return x * self.scale + self.offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(preprocessing=self.preprocessing, constancy_p=self.constancy_p)
        return config


def build_augmenter(
    rotation: float = 0.5,
    zoom: float = 0.1,
    seed: int = 0,
    dihedral: bool = False,
    crop_scale: float = 0.0,
    white_balance: float = 0.0,
    gamma: float = 0.0,
    blur: float = 0.0,
) -> keras.Sequential:
    """Pixel-space augmentation: flips (+ transpose with ``dihedral``), resized crops, rotation (in turns:
    0.5 = up to +-180 degrees), zoom, then white balance / gamma / blur. Components at 0 are left out."""
    layers = [keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)]
    if dihedral or crop_scale:
        layers.append(TransposeCrop(dihedral, crop_scale, seed=seed + 4))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1))
    if zoom:
        layers.append(keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect", seed=seed + 2))
    if white_balance or gamma or blur:
        layers.append(DeviceJitter(white_balance, gamma, blur, seed=seed + 5))
    return keras.Sequential(layers, name="augment")


CUSTOM_OBJECTS = {
    "ColourJitter": ColourJitter, "TransposeCrop": TransposeCrop, "DeviceJitter": DeviceJitter, "Prepare": Prepare
}


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
