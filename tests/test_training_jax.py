"""The trainer compiles on JAX, the backend of GPU machines without TensorFlow.

Regression test: Keras flags RandomRotation and RandomZoom as not jit-compatible, which on JAX
switched compilation off for the whole trainer (every op eager: 6-12 s per InceptionV3 step on an
H200). Runs in a subprocess because a process's Keras backend is fixed at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
import keras
import numpy as np
from training.augment import build_augmenter, compile_on_jax

assert keras.backend.backend() == "jax"
inputs = keras.Input((32, 32, 3))
head = keras.Sequential(
    [keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(7, activation="softmax")]
)
trainer = keras.Model(inputs, head(build_augmenter(seed=1)(inputs)))
compile_on_jax(trainer)
trainer.compile(optimizer="adam", loss="categorical_crossentropy")
print("fresh", trainer.jit_compile)
x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
y = np.eye(7, dtype="float32")[np.arange(8) % 7]
losses = [float(trainer.train_on_batch(x, y)) for _ in range(3)]
assert all(np.isfinite(losses)), losses
trainer.save(sys.argv[1])
loaded = keras.models.load_model(sys.argv[1])
print("loaded", loaded.jit_compile)
compile_on_jax(loaded)
print("resumed", loaded.jit_compile)
print("loss", float(loaded.train_on_batch(x, y)))
"""


def test_trainer_with_augmentation_compiles_on_jax_fresh_and_after_loading(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "trainer.keras")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["fresh"] == "True"  # without compile_on_jax Keras silently picks False
    assert lines["loaded"] == "False"  # the flag is not saved ...
    assert lines["resumed"] == "True"  # ... so a resumed run sets it again
    assert float(lines["loss"]) > 0
