"""Member architectures: a ``keras.applications`` backbone plus a configurable classification head.

The softmax output order is ``dermscore.bundle.CLASS_CODES``, which is what scoring assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras

from dermscore.bundle import CLASS_CODES


@dataclass(frozen=True)
class Architecture:
    """What scoring needs to know about a backbone, and the smallest input it accepts."""

    name: str  # keras.applications class name, recorded as the member's ``architecture``
    preprocessing: str  # dermscore.preprocess.normalize mode
    min_size: int


ARCHITECTURES = {
    "inceptionv3": Architecture("InceptionV3", "inception", 75),
    "densenet201": Architecture("DenseNet201", "densenet", 32),
}


@dataclass(frozen=True)
class Head:
    """The study's head by default: global average pooling -> Dense 512 ReLU -> Dropout 0.5 -> softmax."""

    pooling: str = "avg"
    units: int = 512
    dropout: float = 0.5


def build_classifier(
    member: str, input_size: tuple[int, int], init: str = "imagenet", head: Head = Head(), seed: int = 0
) -> keras.Model:
    """Backbone + head for ``member`` at ``input_size`` (height, width).

    ``init`` is "imagenet" (downloads Keras' weights), "none" (from scratch) or the path of a local
    backbone weights file (``include_top=False``), for machines without internet.
    """
    arch = ARCHITECTURES[member]
    height, width = input_size
    if min(height, width) < arch.min_size:
        raise ValueError(f"{arch.name} needs inputs of at least {arch.min_size}x{arch.min_size}, got {height}x{width}")
    if init not in ("imagenet", "none") and not Path(init).is_file():
        raise ValueError(f"init must be 'imagenet', 'none' or an existing weights file, got {init!r}")
    backbone = getattr(keras.applications, arch.name)(
        include_top=False,
        weights=None if init == "none" else init,
        input_shape=(height, width, 3),
        pooling=head.pooling,
    )
    backbone.name = "backbone"
    inputs = keras.Input((height, width, 3), name="image")
    x = backbone(inputs)  # nested, so fine-tuning can address the backbone as one layer
    if head.units:
        x = keras.layers.Dense(
            head.units, activation="relu", name="head_dense", kernel_initializer=keras.initializers.HeNormal(seed)
        )(x)
    if head.dropout:
        x = keras.layers.Dropout(head.dropout, seed=seed, name="head_dropout")(x)
    # float32 output keeps the softmax stable under a mixed_float16 policy.
    outputs = keras.layers.Dense(len(CLASS_CODES), activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=member)


def set_backbone_trainable(model: keras.Model, trainable: bool | int) -> None:
    """Freeze or unfreeze the backbone for two-phase fine-tuning.

    ``trainable`` is False (head only), True (everything) or N (only the last N backbone layers).
    BatchNormalization layers of a pretrained backbone stay frozen in every phase: in Keras 3 a
    layer with ``trainable=False`` runs in inference mode, so it keeps normalising with its ImageNet
    moving statistics instead of the small, skewed batch statistics (the Keras 2 pitfall).
    """
    backbone = model.get_layer("backbone")
    layers = backbone.layers
    first = 0 if trainable is True else len(layers) if trainable is False else max(len(layers) - int(trainable), 0)
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)
