"""Write a dermscore bundle: member .keras files (optionally float16-stored), manifest, model card, figures.

Members are rebuilt as plain float32 classifiers before saving, so a bundle never carries training-only
pieces (augmentation layers, optimizer state, a mixed-precision policy). float16 storage halves the
files: the float arrays inside the ``.keras`` archive's ``model.weights.h5`` are rewritten as float16,
and Keras casts them back into the float32 variables on load, so scoring code does not change.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import ops

from dermscore.features import flip_views, mean_over_views
from training.models import build_classifier
from training.train import TrainConfig

WEIGHTS_ENTRY = "model.weights.h5"


def clean_member(best: Path, config: TrainConfig) -> keras.Model:
    """The best checkpoint's weights in a freshly built float32 classifier of the same shape.

    Refuses to return a model whose outputs differ from the checkpoint's (e.g. weights in another order);
    a checkpoint trained in mixed precision computes in float16, so it is held to a looser bound.
    """
    keras.mixed_precision.set_global_policy("float32")
    trained = keras.models.load_model(best, compile=False)
    model = build_classifier(config.member, config.input_size, "none", config.head, config.seed)
    model.set_weights(trained.get_weights())
    probe = np.random.default_rng(0).normal(size=(4, *config.input_size, 3)).astype("float32")
    difference = float(np.abs(np.asarray(model(probe)) - np.asarray(trained(probe), dtype="float32")).max())
    if difference > (2e-2 if config.mixed_precision else 1e-4):
        raise RuntimeError(f"{best}: rebuilt {config.member} differs from the checkpoint (max {difference:.2e})")
    return model


def shift_output_bias(model: keras.Model, shift: np.ndarray) -> None:
    """Add ``shift`` to the softmax layer's bias: the prior correction fitted on validation, made permanent."""
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, (bias + shift).astype(bias.dtype)])


def flip_averaged(model: keras.Model) -> keras.Model:
    """The member averaged over the four flips of its input (test-time augmentation), as one model.

    Dermatoscopic images have no canonical orientation, so the flipped views are equally valid; done
    inside the model, dermscore (and an ONNX export of the member) scores with it unchanged, at four
    times the compute. Uses only built-in Keras ops, so the saved file loads without custom objects.
    """
    inputs = keras.Input(model.input_shape[1:], name="image")
    views = flip_views(inputs)  # the views dermscore.features averages the member's features over, too
    # One call on the four views stacked along the batch: one copy of the network in the graph, so an
    # ONNX export takes as long as the plain member's (four copies took tf2onnx 2.5x-6x longer).
    probabilities = model(ops.concatenate(views, axis=0))
    return keras.Model(inputs, mean_over_views(probabilities, len(views)), name=model.name)


def _halve_h5(raw: bytes) -> bytes:
    """Copy an HDF5 weights file with every float32/float64 dataset stored as float16."""
    source = h5py.File(io.BytesIO(raw), "r")
    buffer = io.BytesIO()
    with source, h5py.File(buffer, "w") as target:

        def copy(name, item):
            if isinstance(item, h5py.Group):
                group = target.require_group(name)
                group.attrs.update(item.attrs)
            else:
                value = item[()]
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    value = value.astype(np.float16)
                target.create_dataset(name, data=value)
                target[name].attrs.update(item.attrs)

        target.attrs.update(source.attrs)
        source.visititems(copy)
    return buffer.getvalue()


def store_float16(path: Path) -> None:
    """Rewrite a saved ``.keras`` archive in place with float16 weights."""
    tmp = path.with_suffix(".f16.tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info.filename, _halve_h5(data) if info.filename == WEIGHTS_ENTRY else data)
    tmp.replace(path)


def save_member(model: keras.Model, path: Path, float16: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    if float16:
        store_float16(path)
    return path


def copy_files(files: list[Path], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy2(file, folder / file.name)
    return [f.name for f in files]


PREVIOUS_FIGURES = ("accuracy", "balanced_accuracy", "macro_f1", "melanoma_sensitivity_at_90_specificity",
                    "expected_calibration_error")


def previous_bundle(out: Path, work: Path) -> dict | None:
    """The figures of the bundle an export is about to replace in ``out``, for the card's old-and-new table.

    Its recorded test figures come from its manifest; its per-source and device-shift figures from
    ``evaluate --bundle`` run on it in this work folder (absent: not compared). None when ``out`` holds no
    bundle with recorded test figures (a first export, or a hand-made bundle).
    """
    from dermscore.bundle import MANIFEST, read_bundle  # noqa: PLC0415

    if not (out / MANIFEST).is_file():
        return None
    bundle = read_bundle(out)
    provenance = bundle.provenance
    if "metrics" not in provenance:
        return None
    previous = {
        "name": bundle.name,
        "version": bundle.version,
        "identity": bundle.identity,
        "split_sha256": provenance.get("split", {}).get("sha256"),
        "metrics": {name: {k: result[k] for k in PREVIOUS_FIGURES} for name, result in provenance["metrics"].items()},
    }
    evaluated = work / "evaluation" / f"bundle_{bundle.name}_{bundle.version}" / "metrics.json"
    if evaluated.is_file():
        previous["shift"] = {
            name: {
                "shifted_balanced_accuracy": model["device_shift"]["balanced_accuracy"]["shifted"],
                "drop": model["device_shift"]["balanced_accuracy"]["drop"],
                "mel_vs_nv_auc": {source: figures["mel_vs_nv_auc"] for source, figures in model["per_source"].items()},
            }
            for name, model in json.loads(evaluated.read_text(encoding="utf-8"))["shift"]["models"].items()
        }
    return previous
