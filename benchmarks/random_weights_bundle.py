"""Write a bundle with the real architectures at full input size and RANDOM weights, for benchmarks only.

Throughput does not depend on the weights, and the shipped bundle's members run at their training
size; this one measures the issue's reference workload (InceptionV3 299x299 + DenseNet201 224x224).
Never use it to score images: its name says what it is.

    python benchmarks/random_weights_bundle.py /tmp/bench-bundle
"""

from __future__ import annotations

import sys
from pathlib import Path

from dermscore.bundle import write_manifest


def main(folder: Path) -> None:
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    members = []
    for name, builder, size, mode in (
        ("inceptionv3", keras.applications.InceptionV3, 299, "inception"),
        ("densenet201", keras.applications.DenseNet201, 224, "densenet"),
    ):
        builder(weights=None, classes=7, classifier_activation="softmax").save(folder / f"{name}.keras")
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
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-bundle"))
