"""``python -m training onnx --bundle DIR``: ship each member's ONNX graph inside the bundle.

Why: without it the first run on a user's machine exports every member with tf2onnx (about a minute,
several GB, TensorFlow imported; issue #17). The files written here come from the very export the
scoring backend would run (``dermscore.onnx_backend.export_and_check``, with the outputs it would ask
for), are checked against Keras within ``PROBE_TOLERANCE`` on the probe batch and on real images, and are
hashed in the manifest like the weights. Run it after ``calibrate``: the OOD detector decides whether
the graphs also return the features.

Storage: the .keras files hold float16 weights (loaded as float32), but tf2onnx folds each batch
normalisation into the convolution before it, so most exported kernels are no longer float16 values.
``float16_storage`` undoes that for storage only: the member's float16 kernel plus a float32 scale per
channel, multiplied back when ONNX Runtime creates the session (it folds constant nodes), bit for bit
what tf2onnx wrote. Rounding the folded kernels to float16 instead differed from the float32 export by up to 5e-4 on
the probabilities and 2.4e-3 on the features of the shipped members (2-core Xeon, 2026-11-27): refused.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dermscore.bundle import MANIFEST, Bundle, Member, load_bundle, write_manifest
from dermscore.errors import BundleError
from dermscore.features import feature_member, output_list
from dermscore.infer import load_member
from dermscore.onnx_backend import (
    OPSET,
    PROBE_TOLERANCE,
    OnnxModel,
    difference,
    export_and_check,
    outputs_of,
    physical_cores,
    probe_images,
)
from dermscore.preprocess import prepare
from dermscore.runtime import Runtime

REAL_IMAGES = 8  # real dermatoscopic images checked besides the probe batch
STORAGE = "float16 where exact (kernels times float32 batch-norm scales), cast to float32 at load"


def float16_storage(path: Path, kernels: list[np.ndarray]) -> dict[str, int]:
    """Rewrite the ONNX file at ``path`` with its float32 initializers stored as float16 wherever that is
    exact, so the graph's results are bit for bit unchanged. Returns the initializer bytes before/after.

    An initializer float16 holds exactly is stored as float16 plus a Cast. A convolution kernel tf2onnx
    multiplied by the following batch normalisation's per-channel scale is stored as the member's own
    float16 kernel (one of ``kernels``, Keras' HWIO layout) times that scale in float32: Cast then Mul,
    which ONNX Runtime computes exactly as tf2onnx did (one float32 rounding). Anything else stays float32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for kernel in kernels:
        oihw = np.asarray(kernel, np.float32).transpose(3, 2, 0, 1)
        if np.array_equal(oihw.astype(np.float16).astype(np.float32), oihw):
            by_shape.setdefault(oihw.shape, []).append(oihw)
    model = onnx.load(str(path))
    graph = model.graph
    kept, nodes, before, after = [], [], 0, 0
    for init in graph.initializer:
        weights = numpy_helper.to_array(init)
        before += weights.nbytes
        stored = _as_float16(weights, by_shape) if init.data_type == TensorProto.FLOAT else None
        if stored is None:
            kept.append(init)
            after += weights.nbytes
            continue
        half, scale = stored
        kept.append(numpy_helper.from_array(half, f"{init.name}__float16"))
        cast = init.name if scale is None else f"{init.name}__float32"
        nodes.append(helper.make_node("Cast", [f"{init.name}__float16"], [cast], to=TensorProto.FLOAT))
        after += half.nbytes
        if scale is not None:
            kept.append(numpy_helper.from_array(scale, f"{init.name}__scale"))
            nodes.append(helper.make_node("Mul", [cast, f"{init.name}__scale"], [init.name]))
            after += scale.nbytes
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes += graph.node
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"initializer_bytes_float32": before, "initializer_bytes_stored": after}


def _as_float16(
    weights: np.ndarray, kernels: dict[tuple[int, ...], list[np.ndarray]]
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(float16 values, per-output-channel float32 scale or None) that give ``weights`` exactly, else None."""
    half = weights.astype(np.float16)
    if np.array_equal(half.astype(np.float32), weights):
        return half, None
    for kernel in kernels.get(weights.shape, []):
        nonzero = kernel != 0
        ratio = np.where(nonzero, weights / np.where(nonzero, kernel, 1), np.nan).reshape(len(kernel), -1)
        with warnings.catch_warnings():  # an all-zero channel has no ratio; it then fails the exact check
            warnings.simplefilter("ignore", RuntimeWarning)
            scale = np.nanmedian(ratio, axis=1).astype(np.float32).reshape(-1, *[1] * (kernel.ndim - 1))
        if np.array_equal(kernel * scale, weights):
            return kernel.astype(np.float16), scale
    return None


def real_images(data: Path) -> list[np.ndarray]:
    """The first ``REAL_IMAGES`` JPEGs of the training data: real lesions, not only the random probe batch."""
    from PIL import Image

    paths = sorted((data / "images").glob("*.jpg"))[:REAL_IMAGES]
    if not paths:
        raise BundleError(f"{data / 'images'}: no JPEG images to check the ONNX members on; pass --data.")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def write_member(bundle: Bundle, member: Member, views: str | None, images: list[np.ndarray]) -> dict[str, Any]:
    """Export ``member`` as the backend would, store it compactly, check it against Keras; the manifest entry."""
    model = load_member(bundle.member_path(member), Runtime(backend="keras"))
    if views is not None:
        model = feature_member(model, member, views)
    file = f"{member.name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / file
        note = export_and_check(model, bundle, member, exported)
        sizes = float16_storage(exported, [w.numpy() for w in model.weights if len(w.shape) == 4])
        batch = np.stack([prepare(image, (member,))[member.name] for image in [*probe_images(), *images]])
        diff = difference(output_list(OnnxModel(exported, physical_cores()).predict_on_batch(batch)),
                          output_list(model.predict_on_batch(batch)))
        if not diff <= PROBE_TOLERANCE:
            raise BundleError(f"{bundle.member_path(member)}: the stored ONNX graph differs from Keras by "
                              f"{diff:.2e} (more than {PROBE_TOLERANCE:g}); not written.")
        exported.replace(bundle.path / file)
    (bundle.path / file).chmod(0o644)  # a bundle file like the weights, not a private temporary
    return {"file": file, "outputs": outputs_of(views), "opset": OPSET, "storage": STORAGE, **sizes,
            "max_abs_difference": diff, "checked_on": {"probe_images": len(probe_images()), "real_images": len(images)},
            "exported_with": note["versions"]}


def write_onnx_members(folder: Path, data: Path) -> dict[str, Any]:
    """Write every member's ONNX file into the bundle at ``folder`` and record it in the manifest
    (the weights, OOD statistics and version are left as they are: the scores do not change)."""
    bundle = load_bundle(folder)
    views = bundle.ood.views if bundle.ood else None
    images = real_images(data)
    manifest = json.loads((bundle.path / MANIFEST).read_text(encoding="utf-8"))
    entries = {m.name: write_member(bundle, m, views, images) for m in bundle.members}
    for raw in manifest["members"]:
        raw["onnx"] = entries[raw["name"]]
    write_manifest(bundle.path, manifest)
    return {"bundle": str(bundle.path), **{name: e["max_abs_difference"] for name, e in entries.items()}}


def run_onnx(args: Any) -> dict[str, Any]:
    """The ``onnx`` step: ``--bundle`` (else ``--out``, else the default bundle), real images from ``--data``."""
    from dermscore.bundle import DEFAULT_BUNDLE, models_dir

    return write_onnx_members(Path(args.bundle or args.out or models_dir() / DEFAULT_BUNDLE), args.data)
