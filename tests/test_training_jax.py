"""The trainer compiles on JAX, the backend of GPU machines without TensorFlow, with every augmentation and
the in-graph colour constancy of the generalising recipe; the constancy agrees with dermscore's numpy path.

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
IMAGES = sorted((REPO.parent / "shared" / "data" / "ham10000-200x150" / "images").glob("ISIC_00243*.jpg"))[:8]
SCRIPT = """
import sys
import keras
import numpy as np
from PIL import Image
from dermscore.preprocess import shades_of_gray
from training.augment import ColourJitter, Prepare, build_augmenter, compile_on_jax

assert keras.backend.backend() == "jax"
real = np.stack([np.asarray(Image.open(p).convert("RGB").resize((40, 30)), dtype=np.float32) for p in sys.argv[2:]])
print("constancy_difference", float(np.abs(np.asarray(shades_of_gray(real, 6.0, xp=keras.ops)) - shades_of_gray(real, 6.0)).max()))
inputs = keras.Input((30, 40, 3))
head = keras.Sequential(
    [keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(7, activation="softmax")]
)
augment = build_augmenter(0.125, 0.1, 1, dihedral=True, crop_scale=0.5, white_balance=0.2, gamma=0.3, blur=1.0)
trainer = keras.Model(inputs, head(ColourJitter(seed=2)(Prepare("densenet", 6.0, name="prepare")(augment(inputs)))))
compile_on_jax(trainer)
trainer.compile(optimizer=keras.optimizers.AdamW(use_ema=True), loss="categorical_crossentropy")
print("fresh", trainer.jit_compile)
x = real
y = np.eye(7, dtype="float32")[np.arange(len(x)) % 7]
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
        [sys.executable, "-c", SCRIPT, str(tmp_path / "trainer.keras"), *map(str, IMAGES)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["fresh"] == "True"  # without compile_on_jax Keras silently picks False
    assert lines["loaded"] == "False"  # the flag is not saved ...
    assert lines["resumed"] == "True"  # ... so a resumed run sets it again
    assert float(lines["loss"]) > 0
    assert float(lines["constancy_difference"]) < 1e-4  # keras.ops on JAX vs numpy, real images, 0-255 scale
