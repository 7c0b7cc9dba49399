"""``python -m training onnx --bundle DIR``: ship each member's ONNX graph inside the bundle.

Why: without it the first run on a user's machine exports every member with tf2onnx (about a minute,
several GB, TensorFlow imported; issue #17). The files written here come from the very export the
scoring backend would run (``dermscore.onnx_backend.export_and_check``, with the outputs it would ask
for), are checked against Keras within ``PROBE_TOLERANCE`` on the probe batch and on real images, and are
hashed in the manifest like the weights. Run it after ``calibrate``: the OOD detector decides whether
the graphs also return the features.

Storage: the .keras files hold float16 weights (loaded as float32), so most of the exported initializers
are float16 values in float32 clothing. Each initializer that float16 holds exactly is stored as float16
with a Cast to float32 after it (ONNX Runtime folds the Cast when the session is created): the graph
computes bit for bit what the float32 export computes, in about half the bytes. Initializers that
tf2onnx derived (folded batch normalisation, reshaped constants) and float16 cannot hold stay float32.
"""

from __future__ import annotations

import json
import tempfile
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
    export_and_check,
    outputs_of,
    physical_cores,
    probe_images,
)
from dermscore.preprocess import prepare
from dermscore.runtime import Runtime

REAL_IMAGES = 8  # real dermatoscopic images checked besides the probe batch
STORAGE = "float16 where exact, cast to float32 at load"


def float16_storage(path: Path) -> dict[str, int]:
    """Rewrite the ONNX file at ``path`` with every float32 initializer that float16 holds exactly stored
    as float16 plus a Cast node; the graph's results are unchanged. Returns the initializer bytes before/after."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, before, after = [], [], 0, 0
    for init in graph.initializer:
        weights = numpy_helper.to_array(init)
        before += weights.nbytes
        half = weights.astype(np.float16) if init.data_type == TensorProto.FLOAT else None
        if half is None or not np.array_equal(half.astype(np.float32), weights):
            kept.append(init)
            after += weights.nbytes
            continue
        kept.append(numpy_helper.from_array(half, f"{init.name}__float16"))
        casts.append(helper.make_node("Cast", [f"{init.name}__float16"], [init.name], to=TensorProto.FLOAT))
        after += half.nbytes
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"initializer_bytes_float32": before, "initializer_bytes_stored": after}


def real_images(data: Path) -> list[np.ndarray]:
    """The first ``REAL_IMAGES`` JPEGs of the training data: real lesions, not only the random probe batch."""
    from PIL import Image

    paths = sorted((data / "images").glob("*.jpg"))[:REAL_IMAGES]
    if not paths:
        raise BundleError(f"{data / 'images'}: no JPEG images to check the ONNX members on; pass --data.")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The backend's measure: features are held to the tolerance relative to their size."""
    return max(float(np.abs(g - e).max() / max(1.0, np.abs(e).max())) for g, e in zip(got, expected, strict=True))


def write_member(bundle: Bundle, member: Member, views: str | None, images: list[np.ndarray]) -> dict[str, Any]:
    """Export ``member`` as the backend would, store it compactly, check it against Keras; the manifest entry."""
    model = load_member(bundle.member_path(member), Runtime(backend="keras"))
    if views is not None:
        model = feature_member(model, member, views)
    file = f"{member.name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / file
        note = export_and_check(model, bundle, member, exported)
        sizes = float16_storage(exported)
        batch = np.stack([prepare(image, (member,))[member.name] for image in [*probe_images(), *images]])
        diff = difference(output_list(OnnxModel(exported, physical_cores()).predict_on_batch(batch)),
                          output_list(model.predict_on_batch(batch)))
        if not diff <= PROBE_TOLERANCE:
            raise BundleError(f"{bundle.member_path(member)}: the stored ONNX graph differs from Keras by "
                              f"{diff:.2e} (more than {PROBE_TOLERANCE:g}); not written.")
        exported.replace(bundle.path / file)
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
