"""Write a bundle with the real architectures at full input size and RANDOM weights, for benchmarks only.

Throughput does not depend on the weights, and the shipped bundle's members run at their training
size; this one measures the issue's reference workload (InceptionV3 299x299 + DenseNet201 224x224).
Never use it to score images: its name says what it is.

    python benchmarks/random_weights_bundle.py /tmp/bench-bundle
    python benchmarks/random_weights_bundle.py /tmp/tiny-bundle 75 32   # tiny input sizes, for smoke tests
"""

from __future__ import annotations

import sys
from pathlib import Path

from dermscore.bundle import write_manifest


def main(folder: Path, sizes: tuple[int, int] = (299, 224)) -> None:
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    members = []
    for name, builder, size, mode in (
        ("inceptionv3", keras.applications.InceptionV3, sizes[0], "inception"),
        ("densenet201", keras.applications.DenseNet201, sizes[1], "densenet"),
    ):
        builder(weights=None, input_shape=(size, size, 3), classes=7,
                classifier_activation="softmax").save(folder / f"{name}.keras")
        members.append({"name": name, "architecture": builder.__name__, "file": f"{name}.keras",
                        "input_size": [size, size], "preprocessing": mode, "resize": "bilinear", "weight": 0.5})
    write_manifest(folder, {
        "name": "benchmark-random-weights", "version": "0",
        "members": members,
        "provenance": {"training_data": "none: random weights, for throughput benchmarks only"},
        "intended_use": "throughput benchmarks only; its outputs mean nothing",
    })
    print(folder)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-bundle"),
         (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (299, 224))
