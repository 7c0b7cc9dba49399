"""``dermscore export BUNDLE --format litert OUT``: the ensemble as LiteRT (TensorFlow Lite) files for apps.

Each member becomes ``<member>.tflite`` (float32), converted from its ``.keras`` file by Keras'
``model.export(format="litert")`` (TensorFlow's converter) with built-in operators only, so an app needs
the plain LiteRT runtime and no TensorFlow ("Flex") delegate. With ``float16`` each member is also
written as ``<member>.float16.tflite`` (weights stored in float16: half the size; the gap to Keras is
measured and recorded, not bounded). ``litert.json`` beside them holds what an app needs to reproduce a
score: classes, malignant classes, each member's input size, resize and normalisation, the ensemble
weights and rule, the colour constancy, the default thresholds and the not-a-diagnosis statement
(docs/litert.md).

Every float32 file is run with the LiteRT interpreter (``ai-edge-litert``) on a probe batch before it is
kept, and refused when it differs from Keras by more than ``PROBE_TOLERANCE`` (1e-4), the same bar as the
ONNX backend; the measured differences go into ``litert.json``.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermscore import __version__
from dermscore.aggregate import Thresholds
from dermscore.bundle import MANIFEST, Bundle, Member, sha256_file
from dermscore.errors import BundleError, UsageError
from dermscore.onnx_backend import PROBE_TOLERANCE, probe_images
from dermscore.preprocess import prepare
from dermscore.report.files import atomic_path
from dermscore.report.run_info import DISCLAIMER
from dermscore.runtime import Runtime

FORMATS = ("litert",)
# The manifest fields litert.json carries (or that do not change a score; ``ood`` is named under
# ``not_carried``, see not_carried). A bundle with any other field (a new preprocessing step, ...) is
# refused: an app given only these files would score it differently from dermscore, and nobody would notice.
KNOWN_FIELDS = {"format_version", "name", "version", "classes", "malignant_classes", "members", "intended_use",
                "provenance", "calibration", "operating_points", "ood", "colour_constancy"}
KNOWN_MEMBER_FIELDS = {"name", "architecture", "file", "input_size", "preprocessing", "resize", "weight", "sha256"}
LITERT_JSON = "litert.json"
JSON_FORMAT = "dermscore-litert/1"
# What each preprocessing mode does to RGB uint8 pixels x (dermscore.preprocess.normalize), for apps.
NORMALISATION = {
    "inception": {"formula": "x / 127.5 - 1", "scale": [1 / 127.5] * 3, "offset": [-1.0] * 3},
    "densenet": {"formula": "(x / 255 - mean) / std, mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]",
                 "scale": [1 / (255 * s) for s in (0.229, 0.224, 0.225)],
                 "offset": [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]},
}


def check_litert() -> None:
    """Refuse the export up front when the interpreter that checks each file is not installed."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise UsageError("the LiteRT export checks every file with ai-edge-litert: "
                         "install it with `pip install 'dermscore[litert]'`.")


def check_exportable(bundle: Bundle) -> None:
    """Refuse a bundle whose manifest has fields this export does not carry into litert.json."""
    manifest = json.loads((bundle.path / MANIFEST).read_text(encoding="utf-8"))
    unknown = set(manifest) - KNOWN_FIELDS
    unknown |= {f"members[{m.get('name')}].{k}" for m in manifest["members"] for k in set(m) - KNOWN_MEMBER_FIELDS}
    if unknown:
        raise BundleError(
            f"{bundle.path / MANIFEST}: the LiteRT export does not carry {', '.join(sorted(unknown))} into "
            "litert.json, so an app would score differently from dermscore; not exported (extend "
            "dermscore.export.litert first).")


def run_litert(path: Path, batch: np.ndarray) -> np.ndarray:
    """Probabilities of a ``.tflite`` member for a float32 (N, H, W, 3) batch, as an app's interpreter gives."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], list(batch.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.ascontiguousarray(batch, dtype=np.float32))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), dtype=np.float64)


def convert(model: Any, member: Member, path: Path, float16: bool = False) -> None:
    """Write ``model`` as a LiteRT file (built-in operators only; float16 weights when asked), atomically."""
    import tensorflow as tf

    options: dict[str, Any] = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if float16:
        options = {"optimizations": [tf.lite.Optimize.DEFAULT],
                   "target_spec": {**options["target_spec"], "supported_types": [tf.float16]}}
    signature = [tf.TensorSpec((None, *member.input_size, 3), tf.float32, name="image")]
    with atomic_path(path) as tmp:
        target = tmp.with_suffix(".tflite")  # Keras insists on the extension
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                model.export(str(target), format="litert", verbose=False, input_signature=signature, **options)
        except Exception as exc:  # the converter raises whatever its passes raise; name it
            target.unlink(missing_ok=True)
            raise BundleError(f"member '{member.name}': the LiteRT conversion failed "
                              f"({type(exc).__name__}: {exc}).") from exc
        target.replace(tmp)


def _file_entry(path: Path, got: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "max_abs_diff_vs_keras": float(np.abs(got - expected).max())}


def export_member(bundle: Bundle, member: Member, out: Path, images: Sequence[np.ndarray],
                  float16: bool) -> dict[str, Any]:
    """Convert, check and describe one member (its ``litert.json`` entry)."""
    from dermscore.infer import load_member

    model = load_member(bundle.member_path(member), Runtime(device="cpu"))
    probe = np.stack([prepare(image, (member,))[member.name] for image in images])
    expected = np.asarray(model.predict_on_batch(probe), dtype=np.float64)
    path = out / f"{member.name}.tflite"
    convert(model, member, path)
    entry = _file_entry(path, run_litert(path, probe), expected)
    if not entry["max_abs_diff_vs_keras"] <= PROBE_TOLERANCE:
        path.unlink()
        raise BundleError(f"member '{member.name}': the LiteRT file differs from Keras by "
                          f"{entry['max_abs_diff_vs_keras']:.2e} on the probe batch (more than {PROBE_TOLERANCE:g}); "
                          "not exported.")
    normalisation = NORMALISATION[member.preprocessing]
    entry.update({
        "name": member.name, "architecture": member.architecture, "keras_sha256": member.sha256,
        "weight": member.weight,
        "input": {"shape": [None, *member.input_size, 3], "layout": "NHWC", "dtype": "float32",
                  "channels": "RGB", "height": member.input_size[0], "width": member.input_size[1]},
        "resize": {"method": member.resize, "antialias": True,
                   "note": "stretch the whole image to height x width (no crop, no padding), as Pillow's resize"},
        "preprocessing": {"mode": member.preprocessing, **normalisation,
                          "note": "pixel = value * scale[c] + offset[c] per RGB channel c, after resizing and "
                                  "the colour constancy (when litert.json has one)"},
        "output": {"shape": [None, len(bundle.classes)], "meaning": "softmax probabilities in 'classes' order"},
    })
    if float16:
        half = out / f"{member.name}.float16.tflite"
        convert(model, member, half, float16=True)
        entry["float16"] = _file_entry(half, run_litert(half, probe), expected)
    return entry


def describe(bundle: Bundle, members: list[dict[str, Any]], probes: int) -> dict[str, Any]:
    """The ``litert.json`` document: everything an app needs besides the model files."""
    total = sum(m.weight for m in bundle.members)
    return {
        "format": JSON_FORMAT,
        "bundle": {"name": bundle.name, "version": bundle.version, "identity": bundle.identity},
        "exported_by": f"dermscore {__version__}",
        "classes": list(bundle.classes),
        "malignant_classes": list(bundle.malignant_classes),
        "members": members,
        "ensemble": {
            "rule": "weighted_mean",
            "weights": {m.name: m.weight / total for m in bundle.members},
            "how": "p = sum over members of weight * member softmax output (weights sum to 1); predicted class = "
                   "argmax p; malignant_probability = sum of p over malignant_classes",
        },
        "colour_constancy": colour_constancy_rule(bundle),
        "calibration": calibration_rule(bundle),
        # The bundle's fitted operating points where it has them, else dermscore's defaults: what `run` uses.
        "thresholds": {name: value for name, (value, _) in Thresholds().sources(bundle).items()},
        "not_carried": not_carried(bundle),
        "check": {"tolerance": PROBE_TOLERANCE, "probe_images": probes,
                  "what": "each float32 file against its Keras member on the same preprocessed probe batch"},
        "intended_use": bundle.intended_use,
        "statement": DISCLAIMER,
    }


def colour_constancy_rule(bundle: Bundle) -> dict[str, Any] | None:
    """How an app normalises the illuminant of each resized image before the member normalisation (None: not at
    all), stated so that it can be reimplemented from litert.json alone (``dermscore.preprocess.shades_of_gray``)."""
    if bundle.colour_constancy is None:
        return None
    return {**bundle.colour_constancy.to_json(),
            "how": "after resizing to each member's input, in float32 without rounding: x = value / 255 per RGB "
                   "channel c, e_c = (mean over all pixels of x_c ** p) ** (1 / p), g_c = sqrt(e_r^2 + e_g^2 + "
                   "e_b^2) / (sqrt(3) * max(e_c, 1e-6)), value_c = clip(value_c * g_c, 0, 255); then "
                   "preprocessing.scale / offset"}


def calibration_rule(bundle: Bundle) -> dict[str, Any] | None:
    """How an app turns the ensemble mean into the calibrated probabilities dermscore reports (None: none)."""
    if bundle.calibration is None:
        return None
    return {"method": bundle.calibration.method, "temperatures": list(bundle.calibration.temperatures),
            "how": "q = softmax(log(p) / T) with T per class (one value: the same T for every class), p the "
                   "ensemble mean; the class columns, confidence and malignant_probability are taken from q, "
                   "predicted class stays argmax p"}


def not_carried(bundle: Bundle) -> dict[str, str]:
    """What dermscore computes for this bundle that the LiteRT files cannot, said in litert.json.

    The OOD detector needs each member's penultimate features and the bundle's statistics file, which the
    exported classifiers do not output: an app gets the same probabilities and flags except
    ``out-of-distribution``, and must say so to its users rather than imply the check was made.
    """
    if bundle.ood is None:
        return {}
    return {"ood": "the out-of-distribution check (ood_score, flag out-of-distribution) is not in these files; "
                   "an app scoring with them does not detect images unlike the training data"}


def export_litert(bundle: Bundle, out: Path, float16: bool = False,
                  images: Sequence[np.ndarray] | None = None) -> Path:
    """Write every member of ``bundle`` (verified, as ``load_bundle`` gives it) and ``litert.json`` into
    ``out``; returns the JSON's path.

    ``images`` (RGB uint8) make the probe batch; by default the ONNX backend's fixed random probe images.
    """
    check_litert()
    check_exportable(bundle)
    images = list(images) if images is not None else probe_images()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    members = [export_member(bundle, member, out, images, float16) for member in bundle.members]
    for name, what in not_carried(bundle).items():
        warnings.warn(f"{bundle.name} {bundle.version}: {what} (recorded under not_carried in {LITERT_JSON}).",
                      RuntimeWarning, stacklevel=2)
    path = out / LITERT_JSON
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(describe(bundle, members, len(images)), indent=2) + "\n", encoding="utf-8")
    return path
