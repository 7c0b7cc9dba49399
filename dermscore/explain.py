"""Explain: class-activation heatmaps for the images of flagged lesions (``--heatmaps``).

Method: Grad-CAM (Selvaraju et al. 2017) at a block output inside each member's backbone, chosen by a
rule that works for any member (``choose_layer``): the deepest layer that merges branches and that all
later layers depend on, whose grid has at least ``MIN_CELLS`` cells on its shorter side (InceptionV3 at
150 x 200: ``mixed7``, 7 x 10; DenseNet201 at 48 x 64: ``conv3_block12_concat``, 6 x 8). The members'
last convolutional maps (3 x 4 and 1 x 2 cells) are too coarse to show where a lesion is; the benchmark
in ``docs/heatmaps.md`` measures both. The member is split into ``image -> activations A`` and
``A -> class scores``; the gradient of the explained class's score with respect to ``A`` comes from the
Keras backend's automatic differentiation, compiled once per member (TensorFlow: ``tf.function`` over
``GradientTape``; JAX: ``jax.jit(jax.grad(...))``; any other backend is refused with a ``UsageError``).
The channel weights are the gradient's spatial means, the map the ReLU of the weighted sum of the
channels. The score is the class logit (the pre-softmax score Grad-CAM uses: the class's own evidence,
not coupled to the other classes and not flattened where the softmax saturates) when the member ends in a
Dense softmax layer, else the log of its output probability. Calibration (per-class temperatures on the
ensemble's probabilities) acts after the members, so it changes no member logit and no map. Several
images are explained per call (``EXPLAIN_BATCH``).

A flip-averaged member (``training.export.flip_averaged``: the mean of its classifier's softmax over the
four flips of its input) gets the mean of its four views' maps (each view's logit explained), each
flipped back to the image's orientation. ONNX members are explained by their Keras originals, loaded only
when a flagged image has no heatmap yet.

Geometry: ``dermscore.preprocess.resize`` stretches the whole image to the member's input size (no crop,
no padding), so a member's grid of cells covers the whole image evenly; the grid is stretched back to the
image's own size by bilinear interpolation with the same pixel-centre convention (PIL).

Ensemble map, for the ensemble's predicted class: each member's map for that class (at the image's
size) normalised to sum 1, then mixed with the bundle's normalised ensemble weights, so each member
contributes its weight's share of the heatmap's mass, and a member whose evidence is spread evenly adds
an even background rather than structure of its own.

Files (``heatmaps/`` beside the reports): ``<content>_<bundle>_<member|ensemble>-<class>.png`` is the
overlay (colours ``stretched`` from the map's minimum to its maximum, Grad-CAM's usual display), and
``..._raw.png`` the map as 8-bit grey at the image's size in proportion, its maximum 255 (``proportional``),
so shares of its mass can be measured from the file. Names
hold a hash of the image's content and of the bundle's identity, never a path or a patient's name, so
pseudonymised reports can carry them, and a report regenerated later (``--report all``) links the files
an earlier report folder of the same ``--out`` already holds instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dermscore.bundle import Bundle, Member
from dermscore.errors import BundleError, InputError, UsageError
from dermscore.preprocess import prepare
from dermscore.records import Frame, Scored, Source
from dermscore.report.thumbnail import make_thumbnail
from dermscore.runtime import Runtime

METHOD = "gradcam-block-6-1"  # part of every file name: a changed method never reuses old files
HEATMAP_FOLDER = "heatmaps"
HEATMAP_COLUMN = "heatmaps"  # images.csv / Images sheet: the image's overlay files, " | "-separated
ENSEMBLE = "ensemble"
RAW_SUFFIX = "_raw"
LIST_SEPARATOR = " | "
OVERLAY_ALPHA = 0.45  # opacity of the map's colour over the image (the usual Grad-CAM picture)
PROBE_TOLERANCE = 1e-4  # the split member's probabilities against the member's own
MIN_CELLS = 6  # choose_layer: the explained layer's grid has at least this many cells on its shorter side
EXPLAIN_BATCH = 8  # flagged images per gradient call
LOGIT = "logit"  # the score explained: the class logit (members ending in a Dense softmax layer)
LOG_PROBABILITY = "log-probability"  # otherwise


# ---------------------------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class Layer:
    """The layer a member's Grad-CAM is computed at (``choose_layer``'s rule) and its output grid."""

    name: str
    grid: tuple[int, int]  # (cells down, cells across)


def _inbound(layer: Any) -> list[Any]:
    """The layers whose outputs ``layer`` reads (Keras 3's graph nodes)."""
    return [t._keras_history[0] for node in layer._inbound_nodes for t in node.input_tensors]


def choose_layer(body: Any, min_cells: int = MIN_CELLS) -> Any:
    """The layer of ``body`` (a functional Keras model: a member's backbone, or the member itself) whose
    output Grad-CAM explains: the deepest block output whose grid has at least ``min_cells`` cells on its
    shorter side (fine enough to show where in the image a lesion lies, and as deep as that allows, so its
    features are as class-specific as possible; ``docs/heatmaps.md`` measures the choice of ``min_cells``).

    A *block output* is a layer every later layer depends on through it alone (a cut of the graph, so
    the member's output is a function of that layer's output only) that merges branches (Concatenate or
    Add: InceptionV3's ``mixed*``, DenseNet's ``conv*_block*_concat``, ResNet's ``*_add``); in a backbone
    without merges, any such cut with a 2-D grid. If no grid is that fine, the finest one.
    """
    import keras

    layers = [layer for layer in body.layers if not isinstance(layer, keras.layers.InputLayer)]
    index = {id(layer): i for i, layer in enumerate(layers)}
    # Layer i is a cut when no later layer reads a layer before i.
    earliest_read = [min((index.get(id(src), -1) for src in _inbound(layer)), default=-1) for layer in layers]
    later_min = np.minimum.accumulate(np.array([*earliest_read[1:], len(layers)])[::-1])[::-1]
    cuts = [layer for i, layer in enumerate(layers) if later_min[i] >= i and len(layer.output.shape) == 4]
    merges = [layer for layer in cuts if isinstance(layer, (keras.layers.Concatenate, keras.layers.Add))]
    candidates = merges or cuts
    if not candidates:
        raise BundleError(f"model '{body.name}' has no convolutional feature map to explain; heatmaps cannot be "
                          "computed for it. Run without --heatmaps.")
    fine = [layer for layer in candidates if min(layer.output.shape[1:3]) >= min_cells]
    return fine[-1] if fine else max(candidates, key=lambda layer: min(layer.output.shape[1:3]))


class MemberMaps:
    """Grad-CAM for one Keras member at ``choose_layer``'s layer (see the module docstring).

    The member is split into ``image -> activations`` (a sub-model) and ``activations -> class scores`` (the
    rest of the network); the gradient of the explained class's score with respect to the activations is
    taken by the Keras backend's own automatic differentiation, compiled once per member (TensorFlow:
    ``tf.function`` over ``GradientTape``; JAX: ``jax.jit`` of ``jax.grad``). Refuses a member it cannot
    split faithfully (``BundleError``): the split's probabilities are checked against the member's own on a
    probe batch.
    """

    def __init__(self, model: Any, member: Member, min_cells: int = MIN_CELLS) -> None:
        import keras

        self.flips = not isinstance(model.layers[-1], keras.layers.Dense)
        classifier = _classifier(model, member) if self.flips else model
        self.layer, self.extractor, score, self.score = _split(classifier, member, min_cells)
        self.classes = int(classifier.layers[-1].units)
        self._forward, self._gradient = _compiled(self.extractor, score, member)
        from dermscore.features import probe_difference

        difference = probe_difference(model, member, lambda x: self.forward(x)[0])
        if not difference <= PROBE_TOLERANCE:
            raise BundleError(
                f"member '{member.name}': its probabilities recomputed for heatmaps differ from the member's own by "
                f"{difference:.2e} on a probe batch (over {PROBE_TOLERANCE:g}); heatmaps support members whose "
                "network after the explained layer is one chain ending in a Dense layer, optionally averaged over "
                "flips. Run without --heatmaps."
            )

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` (n, h, w, 3) prepared inputs -> (probabilities (n, classes), activations (views * n, gh, gw, k),
        stacked view by view)."""
        views = _flips(x) if self.flips else [x]
        activations, scores = (np.asarray(t) for t in self._forward(np.concatenate(views).astype(np.float32)))
        scores = scores.astype(np.float64)
        if self.score == LOGIT:
            exp = np.exp(scores - scores.max(axis=1, keepdims=True))
            probabilities = exp / exp.sum(axis=1, keepdims=True)
        else:
            probabilities = np.exp(scores)
        return probabilities.reshape(len(views), len(x), -1).mean(axis=0), activations

    def cams(self, activations: np.ndarray, images: Sequence[int], classes: Sequence[int]) -> np.ndarray:
        """Grad-CAM maps (signed, before the ReLU; (len(images), gh, gw), in the input's orientation) of the
        images ``images`` (indices into ``forward``'s batch) for the classes ``classes``, in one gradient call.

        Each view's map is Selvaraju et al.'s: channel weights are the spatial mean of the gradient of that
        view's class score, the map the weighted sum of the channels; the views' maps are flipped back and
        averaged, as the member averages their probabilities.
        """
        views = 4 if self.flips else 1
        n = len(activations) // views
        rows = np.array([view * n + i for view in range(views) for i in images])
        chosen = activations[rows]
        weights = np.zeros((len(rows), self.classes), dtype=np.float32)
        weights[np.arange(len(rows)), np.tile(np.asarray(classes, dtype=int), views)] = 1.0
        gradient = np.asarray(self._gradient(chosen, weights), dtype=np.float64)
        channel_weights = gradient.mean(axis=(1, 2))  # (rows, k)
        maps = np.einsum("mhwk,mk->mhw", chosen.astype(np.float64), channel_weights)
        per_view = maps.reshape(views, len(images), *maps.shape[1:])
        return np.mean([_unflip(per_view[view], view) for view in range(views)], axis=0)


def _classifier(model: Any, member: Member) -> Any:
    """The classifier a flip-averaging wrapper calls (``dermscore.features.classifier_of``)."""
    from dermscore.features import classifier_of

    try:
        return classifier_of(model, "flips")
    except BundleError as exc:
        raise BundleError(f"member '{member.name}' neither ends in a Dense layer nor wraps one classifier; "
                          "heatmaps cannot be computed for it. Run without --heatmaps.") from exc


def _split(classifier: Any, member: Member, min_cells: int) -> tuple[Layer, Any, Any, str]:
    """(the layer, model image -> its activations, function activations -> class scores, which score).

    The score is the class logit when the member ends in a Dense softmax layer (Grad-CAM's choice: the
    pre-softmax score of the class alone, not coupled to the other classes' scores and not flattened where
    the softmax saturates), else the log of the member's output probability (``LOG_PROBABILITY``), the
    logit up to a term shared by all classes.
    """
    import keras

    last = classifier.layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise BundleError(f"member '{member.name}' does not end in a Dense layer; heatmaps cannot be computed for "
                          "it. Run without --heatmaps.")
    layers = [layer for layer in classifier.layers if not isinstance(layer, keras.layers.InputLayer)]
    nested = [i for i, layer in enumerate(layers) if isinstance(layer, keras.Model)]
    if nested and nested[0] == 0:  # a backbone (e.g. built with pooling="avg") that takes the input as it is
        body, after = layers[0], layers[1:-1]
        chosen = choose_layer(body, min_cells)
        tail = keras.Model(chosen.output, body.output)
    else:
        body, after = classifier, []
        chosen = choose_layer(body, min_cells)
        tail = keras.Model(chosen.output, last.input)
    extractor = keras.Model(body.inputs, chosen.output)
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    kind = LOGIT if activation == "softmax" else LOG_PROBABILITY

    def score(a: Any) -> Any:
        from keras import ops

        x = tail(a, training=False)
        for layer in after:
            x = layer(x, training=False)
        if kind == LOGIT:
            return ops.matmul(x, last.kernel) + last.bias
        return ops.log(ops.maximum(last(x), 1e-30))

    return Layer(chosen.name, tuple(chosen.output.shape[1:3])), extractor, score, kind


def _compiled(extractor: Any, score: Any, member: Member) -> tuple[Any, Any]:
    """For the Keras backend in use, compiled once (any batch size): ``forward(x) -> (activations, scores)``
    and ``gradient(a, weights)``, the gradient of ``sum(score(a) * weights)`` with respect to ``a``. Each
    row of ``weights`` picks one class of its row of ``a``, and the rows are independent at inference, so
    one call gives every row its own class's gradient."""
    import keras

    backend = keras.backend.backend()

    def forward(x: Any) -> tuple[Any, Any]:
        activations = extractor(x, training=False)
        return activations, score(activations)

    if backend == "tensorflow":
        import tensorflow as tf

        image = tf.TensorSpec((None, *extractor.inputs[0].shape[1:]), tf.float32)
        cells = tf.TensorSpec((None, *extractor.outputs[0].shape[1:]), tf.float32)

        # autograph=False: the functions have no data-dependent Python control flow to convert.
        @tf.function(input_signature=[cells, tf.TensorSpec((None, None), tf.float32)], autograph=False)
        def gradient(a: Any, weights: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(a)
                total = tf.reduce_sum(score(a) * weights)
            return tape.gradient(total, a)

        return tf.function(forward, input_signature=[image], autograph=False), gradient
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        return jax.jit(forward), jax.jit(jax.grad(lambda a, weights: jnp.sum(score(a) * weights)))
    raise UsageError(f"heatmaps need gradients, which dermscore computes on the TensorFlow or JAX Keras backend; "
                     f"KERAS_BACKEND is '{backend}' (member '{member.name}'). Set KERAS_BACKEND=tensorflow or jax, "
                     "or run without --heatmaps.")


def _flips(x: np.ndarray) -> list[np.ndarray]:
    """The four views of ``dermscore.features.flip_views``, in its order, in numpy."""
    return [x, np.flip(x, axis=2), np.flip(x, axis=1), np.flip(x, axis=(1, 2))]


def _unflip(maps: np.ndarray, view: int) -> np.ndarray:
    """Undo view ``view``'s flip on (n, gh, gw, ...) maps (each flip is its own inverse)."""
    axes = ((), (2,), (1,), (1, 2))[view]
    return np.flip(maps, axis=axes) if axes else maps


def to_image(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A member's (gh, gw) cell map stretched to an image of ``size`` = (height, width), float32.

    Inverse of the member's preprocessing geometry (a stretch of the whole image); bilinear with the
    pixel-centre convention, so each cell's value sits at the centre of the image region it covers.
    """
    height, width = size
    image = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def mass(heatmap: np.ndarray) -> np.ndarray:
    """A non-negative map scaled to sum 1 (all zeros stay zeros): where its share of evidence lies."""
    total = float(heatmap.sum())
    return heatmap / total if total > 0 else heatmap


@dataclass(frozen=True)
class ImageMaps:
    """One image's heatmaps at its own size (non-negative float32), by member name and ``ENSEMBLE``, and the
    class each one explains."""

    maps: dict[str, np.ndarray]
    classes: dict[str, str]


class Explainer:
    """The bundle's members as ``MemberMaps``, loaded on first use (so a run with nothing to explain
    loads no Keras model). Always Keras, whatever backend scored: ONNX graphs end at the probabilities."""

    def __init__(self, bundle: Bundle, runtime: Runtime | None = None, min_cells: int = MIN_CELLS) -> None:
        self.bundle = bundle
        self.runtime = Runtime(device=runtime.device if runtime else "auto", backend="keras")
        self.min_cells = min_cells  # choose_layer's rule (the benchmark compares values)
        self._members: dict[str, MemberMaps] | None = None

    @property
    def loaded(self) -> bool:
        return self._members is not None

    def members(self) -> dict[str, MemberMaps]:
        if self._members is None:
            from dermscore.infer import load_member
            from dermscore.storage import member_reads

            with member_reads(self.bundle):
                self._members = {m.name: MemberMaps(load_member(self.bundle.member_path(m), self.runtime), m,
                                                  self.min_cells)
                                 for m in self.bundle.members}
        return self._members

    def explain(
        self, rgb: np.ndarray, member_classes: Mapping[str, str] | None = None, ensemble_class: str | None = None
    ) -> ImageMaps:
        """Heatmaps of one decoded image (``explain_many`` of one)."""
        return self.explain_many([rgb], None if member_classes is None else [member_classes],
                                 None if ensemble_class is None else [ensemble_class])[0]

    def explain_many(
        self, rgbs: Sequence[np.ndarray], member_classes: Sequence[Mapping[str, str]] | None = None,
        ensemble_classes: Sequence[str] | None = None,
    ) -> list[ImageMaps]:
        """Heatmaps of decoded images, one forward and one gradient call per member for all of them: each
        member's for ``member_classes[i][member]`` and the ensemble's for ``ensemble_classes[i]`` (see the
        module docstring for the rule). The run passes the classes its report rows show; left out, they are
        the members' top classes and the ensemble's predicted class (``dermscore.aggregate``'s rule: the top
        class of the weighted mean) from this forward pass."""
        from dermscore.aggregate import ensemble as weighted_mean

        bundle = self.bundle
        inputs = [prepare(rgb, bundle.members, bundle.colour_constancy) for rgb in rgbs]
        forward = {m.name: self.members()[m.name].forward(np.stack([x[m.name] for x in inputs]))
                   for m in bundle.members}
        if member_classes is None:
            member_classes = [{name: bundle.classes[int(np.argmax(p[i]))] for name, (p, _) in forward.items()}
                              for i in range(len(rgbs))]
        if ensemble_classes is None:
            ensemble_classes = [
                bundle.classes[int(np.argmax(weighted_mean({name: p[i] for name, (p, _) in forward.items()}, bundle)))]
                for i in range(len(rgbs))]
        grids: dict[tuple[str, int, str], np.ndarray] = {}  # (member, image, class) -> Grad-CAM grid after ReLU
        for member in bundle.members:
            wanted = sorted({(i, cls) for i in range(len(rgbs))
                             for cls in (member_classes[i][member.name], ensemble_classes[i])})
            cams = self.members()[member.name].cams(forward[member.name][1], [i for i, _ in wanted],
                                                    [bundle.classes.index(cls) for _, cls in wanted])
            for (i, cls), cam in zip(wanted, cams):
                grids[member.name, i, cls] = np.maximum(cam, 0.0)  # Grad-CAM's ReLU
        weights = np.array([m.weight for m in bundle.members], dtype=np.float64)
        weights /= weights.sum()
        results = []
        for i, rgb in enumerate(rgbs):
            size = rgb.shape[:2]
            maps: dict[str, np.ndarray] = {}
            mixture = np.zeros(size, dtype=np.float64)
            for member, weight in zip(bundle.members, weights):
                maps[member.name] = to_image(grids[member.name, i, member_classes[i][member.name]], size)
                mixture += weight * mass(to_image(grids[member.name, i, ensemble_classes[i]], size).astype(np.float64))
            maps[ENSEMBLE] = mixture.astype(np.float32)
            classes = {**{m.name: member_classes[i][m.name] for m in bundle.members}, ENSEMBLE: ensemble_classes[i]}
            results.append(ImageMaps(maps, classes))
        return results


# ------------------------------------------------------------------------------------------ pictures


def _colour(heatmap: np.ndarray) -> np.ndarray:
    """A [0, 1] map as RGB float in [0, 1]: dark blue (low) through cyan, yellow to red (high), a jet-like
    scale that stays readable when overlaid on skin tones."""
    stops = np.array([[0.0, 0.0, 0.5], [0.0, 0.4, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.4, 0.0],
                      [0.6, 0.0, 0.0]])
    position = np.clip(heatmap, 0.0, 1.0) * (len(stops) - 1)
    low = np.minimum(position.astype(int), len(stops) - 2)
    t = (position - low)[..., None]
    return stops[low] * (1 - t) + stops[low + 1] * t


def proportional(heatmap: np.ndarray) -> np.ndarray:
    """A non-negative map divided by its maximum (zeros stay zeros): ratios between places are kept."""
    peak = float(heatmap.max()) if heatmap.size else 0.0
    return heatmap / peak if peak > 0 else np.zeros_like(heatmap)


def stretched(heatmap: np.ndarray) -> np.ndarray:
    """The map from its minimum (0) to its maximum (1), Grad-CAM's usual display; a flat map is all 0.

    For the overlays only: the members' cell contributions share a large common part (for the shipped
    InceptionV3 the least cell often holds two thirds of the greatest), which drawn in proportion would
    paint the whole image one colour; a reviewer needs to see where the evidence is above the image's least.
    """
    low, high = (float(heatmap.min()), float(heatmap.max())) if heatmap.size else (0.0, 0.0)
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def overlay(rgb: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The image blended with the map's colours (``stretched``: blue least, red most), uint8 RGB."""
    colour = 255.0 * _colour(stretched(heatmap).astype(np.float32))
    blended = rgb.astype(np.float32) * (1 - OVERLAY_ALPHA) + colour * OVERLAY_ALPHA
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def raw_grey(heatmap: np.ndarray) -> np.ndarray:
    """The map as 8-bit grey in proportion, its maximum 255 (``proportional``): the file to measure it with."""
    return np.rint(255.0 * proportional(heatmap)).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------- the stage


@dataclass
class HeatmapStats:
    """What the explain stage did in one report: for the run summary, the event log and the tests."""

    images: int = 0  # flagged images with heatmaps in this report
    computed: int = 0  # of which computed now
    reused: int = 0  # of which found in this report folder or linked from an earlier one
    failed: list[str] = field(default_factory=list)  # images whose source could not be read back as scored
    members_loaded: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Flagged:
    """An image of a flagged lesion: its ledger record and its report row (predicted classes, lesion id)."""

    scored: Scored
    row: Mapping[str, Any]


def bundle_key(bundle: Bundle) -> str:
    """A short hash of the bundle's identity and the method: the same for every report of that bundle."""
    return hashlib.sha256(f"{bundle.identity}|{METHOD}".encode()).hexdigest()[:10]


def heatmap_files(item: Flagged, bundle: Bundle) -> dict[str, str]:
    """``who -> overlay file name`` (member names and ``ENSEMBLE``); the raw map adds ``RAW_SUFFIX``."""
    ref = item.scored.ref
    content = ref.sha256[:16] + ("" if ref.frame in (None, "") else f"-f{ref.frame}")
    from dermscore.aggregate import member_column

    classes = {m.name: str(item.row[member_column(m.name)]) for m in bundle.members}
    classes[ENSEMBLE] = str(item.row["predicted_class"])
    return {who: f"{content}_{bundle_key(bundle)}_{who}-{cls}.png" for who, cls in classes.items()}


def raw_name(overlay_name: str) -> str:
    return overlay_name[: -len(".png")] + RAW_SUFFIX + ".png"


def source_at(location: str) -> Source:
    """The Source a ledger location names again: a file, or ``archive.zip!member`` read in place."""
    from dermscore.discover import file_source

    path = Path(location)
    if path.is_file() or "!" not in location:
        return file_source(path)
    from dermscore.decode.archives import ZipArchive

    archive_path, name = ZipArchive.split_location(location)
    return ZipArchive(archive_path).member_source(name)


def _frames(location: str) -> list[Frame]:
    from dermscore.decode import decode_source

    return decode_source(source_at(location))


def _earlier(out: Path, folder: Path, names: Sequence[str]) -> dict[str, Path] | None:
    """Each of ``names`` in another report folder of ``out`` (its root or a timestamped subfolder), or None
    as soon as one is in none (so an image never explained before costs one look)."""
    found = {}
    for name in names:
        found[name] = next((candidate for candidate in (out / HEATMAP_FOLDER / name,
                                                        *out.glob(f"*/{HEATMAP_FOLDER}/{name}"))
                            if candidate.parent != folder / HEATMAP_FOLDER and candidate.is_file()), None)
        if found[name] is None:
            return None
    return found


def _place(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no extra space), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write(target: Path, data: bytes) -> None:
    from dermscore.report.files import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_heatmaps(
    folder: Path, out: Path, bundle: Bundle, flagged: Sequence[Flagged], explainer: Explainer
) -> tuple[dict[tuple[str, Any], list[str]], HeatmapStats]:
    """Heatmap files in ``folder/heatmaps`` for every flagged image; returns ``(location, frame) -> overlay
    paths relative to ``folder`` (ensemble first)`` and what was done.

    Files already in ``folder`` are kept, files of an earlier report folder of ``out`` are linked, the rest
    is computed from the image read again from its source. An image whose source is gone or changed since
    it was scored gets no heatmap (listed in ``HeatmapStats.failed`` with a warning), not a wrong one.
    """
    started = time.perf_counter()
    stats = HeatmapStats()
    target = folder / HEATMAP_FOLDER
    listed: dict[tuple[str, Any], list[str]] = {}
    to_compute: dict[str, list[tuple[Flagged, dict[str, str]]]] = {}  # by location: decode each source once
    for item in flagged:
        files = heatmap_files(item, bundle)
        names = [n for name in files.values() for n in (name, raw_name(name))]
        key = (item.scored.ref.location, item.scored.ref.frame)
        ordered = [files[ENSEMBLE], *(files[m.name] for m in bundle.members)]
        if all((target / n).is_file() for n in names):
            stats.reused += 1
        elif earlier := _earlier(out, folder, names):
            target.mkdir(parents=True, exist_ok=True)
            for n, path in earlier.items():
                if not (target / n).is_file():
                    _place(path, target / n)
            stats.reused += 1
        else:
            to_compute.setdefault(item.scored.ref.location, []).append((item, files))
            continue
        listed[key] = [f"{HEATMAP_FOLDER}/{n}" for n in ordered]
    pending: list[tuple[Flagged, dict[str, str], Frame]] = []
    for number, (location, items) in enumerate(to_compute.items(), start=1):
        pending.extend(_decoded(location, items, stats))
        while len(pending) >= EXPLAIN_BATCH or (pending and number == len(to_compute)):
            batch, pending = pending[:EXPLAIN_BATCH], pending[EXPLAIN_BATCH:]
            listed.update(_compute(batch, target, bundle, explainer, stats))
    stats.images = len(listed)
    stats.members_loaded = explainer.loaded
    stats.seconds = time.perf_counter() - started
    return listed, stats


def _decoded(
    location: str, items: list[tuple[Flagged, dict[str, str]]], stats: HeatmapStats
) -> Iterator[tuple[Flagged, dict[str, str], Frame]]:
    """Decode one source again: its flagged images (frames) as scored; the others are warned about."""
    try:
        frames = {frame.ref.frame: frame for frame in _frames(location)}
    except (InputError, OSError) as exc:
        frames, problem = {}, f"cannot be read again ({exc})"
    else:
        problem = "has changed since it was scored"
    for item, files in items:
        ref = item.scored.ref
        frame = frames.get(ref.frame)
        if frame is None or frame.ref.sha256 != ref.sha256:
            stats.failed.append(location)
            warnings.warn(f"{location}: no heatmap, the image {problem}; score it again to get one.",
                          RuntimeWarning, stacklevel=4)
            continue
        yield item, files, frame


def _compute(
    batch: list[tuple[Flagged, dict[str, str], Frame]], target: Path, bundle: Bundle, explainer: Explainer,
    stats: HeatmapStats,
) -> Iterator[tuple[tuple[str, Any], list[str]]]:
    """Write the heatmaps of decoded flagged images, explained together; yields their listed overlays."""
    from dermscore.aggregate import member_column

    results = explainer.explain_many(
        [frame.rgb for _, _, frame in batch],
        [{m.name: str(item.row[member_column(m.name)]) for m in bundle.members} for item, _, _ in batch],
        [str(item.row["predicted_class"]) for item, _, _ in batch])
    target.mkdir(parents=True, exist_ok=True)
    for (item, files, frame), result in zip(batch, results):
        for who, name in files.items():
            _write(target / name, _png(overlay(frame.rgb, result.maps[who])))
            _write(target / raw_name(name), _png(raw_grey(result.maps[who])))
        stats.computed += 1
        ref = item.scored.ref
        yield (ref.location, ref.frame), [f"{HEATMAP_FOLDER}/{files[ENSEMBLE]}",
                                          *(f"{HEATMAP_FOLDER}/{files[m.name]}" for m in bundle.members)]


def lesion_heatmap_thumbnails(
    folder: Path, rows: Sequence[Mapping[str, Any]], listed: Mapping[tuple[str, Any], list[str]]
) -> dict[str, bytes]:
    """For the Lesions sheet: lesion id -> a thumbnail of the ensemble overlay of its first image that has
    one (the image the lesion's picture shows when its first image has a heatmap)."""
    thumbnails: dict[str, bytes] = {}
    for row in rows:
        lesion = str(row["lesion_id"])
        files = listed.get((row["source"], row["frame"]))
        if files and lesion not in thumbnails:
            with Image.open(folder / files[0]) as picture:
                thumbnails[lesion] = make_thumbnail(np.asarray(picture.convert("RGB")))
    return thumbnails


def flagged_images(
    results: Sequence[Scored], rows: Sequence[Mapping[str, Any]], bundle: Bundle, thresholds: Any
) -> list[Flagged]:
    """The images of every lesion flagged ``malignant`` or ``review`` by this report's lesion rows."""
    from dermscore.aggregate import FLAG_MALIGNANT, FLAG_REVIEW, SEPARATOR, lesion_rows

    flagged = {lesion["lesion_id"] for lesion in lesion_rows(rows, bundle, thresholds)
               if {FLAG_MALIGNANT, FLAG_REVIEW} & set(str(lesion["flags"]).split(SEPARATOR))}
    return [Flagged(result, row) for result, row in zip(results, rows) if str(row["lesion_id"]) in flagged]


def explain_report(
    folder: Path, out: Path, bundle: Bundle, results: Sequence[Scored], rows: Sequence[dict[str, Any]],
    thresholds: Any, runtime: Runtime | None = None,
) -> tuple[dict[str, bytes], HeatmapStats]:
    """The explain stage of one report: heatmaps for the flagged images of ``rows`` (one per ``results``),
    each row's ``heatmaps`` column filled in, and the Lesions sheet's heatmap thumbnails returned."""
    listed, stats = write_heatmaps(folder, out, bundle, flagged_images(results, rows, bundle, thresholds),
                                   Explainer(bundle, runtime))
    for row in rows:
        row[HEATMAP_COLUMN] = LIST_SEPARATOR.join(listed.get((row["source"], row["frame"]), []))
    return lesion_heatmap_thumbnails(folder, rows, listed), stats
