"""Explain: class-activation heatmaps for the images of flagged lesions (``--heatmaps``).

Method: Grad-CAM (Selvaraju et al. 2017) at each member's last convolutional feature map, computed in
closed form from one forward pass, with no automatic differentiation. Why that is exact here: every
supported member is ``backbone -> global average pooling -> Dense layers (ReLU or linear) -> Dense
softmax`` (the shipped members have one hidden Dense(512, ReLU) between the pooling and the softmax, so
plain CAM (Zhou et al. 2016), which needs pooling followed directly by the softmax layer, does not apply
as such). Such a head is piecewise linear in the pooled features ``f``: with the ReLU pattern the image
produces held fixed, the class logit is ``g_c . f + const``, and the gradient ``g_c`` is the product of
the Dense kernels with the active units masked. Since ``f`` is the mean of the feature map ``A`` over
its cells, ``sum_ij g_c . A_ij / cells = g_c . f``: the map ``g_c . A_ij`` splits the logit exactly over
the cells, and it *is* Grad-CAM's map (Grad-CAM's channel weights are the cell-averaged gradients, here
``g_c / cells`` everywhere). With no hidden layer it reduces to CAM. Negative evidence is cut at zero as
Grad-CAM does. Calibration (per-class temperatures on the ensemble's probabilities) acts after the
members, on the ensemble output, so it changes no member logit and no map.

A flip-averaged member (``training.export.flip_averaged``: the mean of its classifier's softmax over the
four flips of its input) gets the mean of its four views' maps, each flipped back to the image's
orientation. The maps run on Keras 3 (the feature map comes from a sub-model of the member; the head is
numpy), so they work whichever backend scores: ONNX members are explained by their Keras originals,
loaded only when a flagged image has no heatmap yet, and the maps run on TensorFlow, JAX or a GPU alike.

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
from dermscore.errors import BundleError, InputError
from dermscore.preprocess import prepare
from dermscore.records import Frame, Scored, Source
from dermscore.report.thumbnail import make_thumbnail
from dermscore.runtime import Runtime

METHOD = "gradcam-last-conv-1"  # part of every file name: a changed method never reuses old files
HEATMAP_FOLDER = "heatmaps"
HEATMAP_COLUMN = "heatmaps"  # images.csv / Images sheet: the image's overlay files, " | "-separated
ENSEMBLE = "ensemble"
RAW_SUFFIX = "_raw"
LIST_SEPARATOR = " | "
OVERLAY_ALPHA = 0.45  # opacity of the map's colour over the image (the usual Grad-CAM picture)
PROBE_TOLERANCE = 1e-4  # the head recomputed in numpy against the member's own probabilities
HEAD_ACTIVATIONS = ("relu", "linear")


# ---------------------------------------------------------------------------------------------- maps


@dataclass(frozen=True)
class DenseStep:
    """One Dense layer of a member's head, as float64 arrays (Dropout is the identity at inference)."""

    kernel: np.ndarray  # (inputs, units)
    bias: np.ndarray  # (units,)
    activation: str  # relu | linear | softmax (last only)


class MemberMaps:
    """One Keras member split into a feature-map extractor and a numpy head (see the module docstring).

    Refuses a member of another shape (``BundleError``) rather than drawing maps that do not belong to its
    scores: the head is checked against the member's own probabilities on a probe batch.
    """

    def __init__(self, model: Any, member: Member) -> None:
        import keras

        self.flips = not isinstance(model.layers[-1], keras.layers.Dense)
        classifier = _classifier(model, member) if self.flips else model
        self.extractor, self.head = _split(classifier, member)
        from dermscore.features import probe_difference

        difference = probe_difference(model, member, lambda x: self.maps(x)[0])
        if not difference <= PROBE_TOLERANCE:
            raise BundleError(
                f"member '{member.name}': its probabilities recomputed for heatmaps differ from the member's own by "
                f"{difference:.2e} on a probe batch (over {PROBE_TOLERANCE:g}); heatmaps support members ending in "
                "global average pooling and Dense layers, optionally averaged over flips. Run without --heatmaps."
            )

    def maps(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` (n, h, w, 3) prepared inputs -> (probabilities (n, classes), maps (n, classes, gh, gw)).

        Maps are signed (before Grad-CAM's ReLU) and in the input's orientation.
        """
        views = _flips(x) if self.flips else [x]
        features = np.asarray(self.extractor.predict_on_batch(np.concatenate(views)), dtype=np.float64)
        probabilities, cell_maps = self._head(features)  # (v*n, classes), (v*n, gh, gw, classes)
        n = len(x)
        cell_maps = [_unflip(cell_maps[i * n:(i + 1) * n], i) for i in range(len(views))]
        mean_probabilities = probabilities.reshape(len(views), n, -1).mean(axis=0)
        return mean_probabilities, np.moveaxis(np.mean(cell_maps, axis=0), -1, 1)

    def _head(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Softmax outputs and the per-cell logit contributions ``A_ij . g_c`` for every class."""
        pooled = features.mean(axis=(1, 2))  # (m, k): what global average pooling gives the head
        masks = []
        z = pooled
        for step in self.head:
            z = z @ step.kernel + step.bias
            if step.activation == "relu":
                masks.append(z > 0)
                z = np.maximum(z, 0.0)
            else:
                masks.append(None)
        logits = z
        # Gradients of every logit with respect to the pooled features, back through the masked kernels.
        gradient = np.broadcast_to(np.eye(logits.shape[1]), (len(pooled), *np.eye(logits.shape[1]).shape))
        for step, mask in zip(reversed(self.head), reversed(masks)):
            if mask is not None:
                gradient = gradient * mask[:, :, None]
            gradient = np.einsum("iu,muc->mic", step.kernel, gradient)  # (m, inputs, classes)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True), np.einsum("mhwk,mkc->mhwc", features, gradient)


def _classifier(model: Any, member: Member) -> Any:
    """The classifier a flip-averaging wrapper calls (``dermscore.features.classifier_of``)."""
    from dermscore.features import classifier_of

    try:
        return classifier_of(model, "flips")
    except BundleError as exc:
        raise BundleError(f"member '{member.name}' neither ends in a Dense softmax layer nor wraps one classifier; "
                          "heatmaps cannot be computed for it. Run without --heatmaps.") from exc


def _split(classifier: Any, member: Member) -> tuple[Any, list[DenseStep]]:
    """(model from the input to the last feature map, the Dense head after global average pooling)."""
    import keras

    layers = [layer for layer in classifier.layers if not isinstance(layer, keras.layers.InputLayer)]
    pooling = keras.layers.GlobalAveragePooling2D
    for index, layer in enumerate(layers):
        if isinstance(layer, pooling):
            extractor = keras.Model(classifier.inputs, layer.input)
            break
        if isinstance(layer, keras.Model) and layer.layers and isinstance(layer.layers[-1], pooling) and index == 0:
            # A backbone built with pooling="avg" that takes the classifier's input as it is.
            extractor = keras.Model(layer.inputs, layer.layers[-1].input)
            break
    else:
        raise BundleError(f"member '{member.name}' has no global average pooling layer; heatmaps cannot be computed "
                          "for it. Run without --heatmaps.")
    head = []
    for layer in layers[index + 1:]:
        if isinstance(layer, keras.layers.Dropout):
            continue
        activation = getattr(getattr(layer, "activation", None), "__name__", "")
        if not isinstance(layer, keras.layers.Dense) or activation not in (*HEAD_ACTIVATIONS, "softmax"):
            raise BundleError(f"member '{member.name}': layer '{layer.name}' after the pooling is not a Dense layer "
                              "with a ReLU, linear or softmax activation; heatmaps cannot be computed for it.")
        kernel, bias = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
        head.append(DenseStep(kernel, bias, activation))
    if not head or head[-1].activation != "softmax" or any(s.activation == "softmax" for s in head[:-1]):
        raise BundleError(f"member '{member.name}' does not end in one Dense softmax layer after its pooling; "
                          "heatmaps cannot be computed for it. Run without --heatmaps.")
    return extractor, head


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

    def __init__(self, bundle: Bundle, runtime: Runtime | None = None) -> None:
        self.bundle = bundle
        self.runtime = Runtime(device=runtime.device if runtime else "auto", backend="keras")
        self._members: dict[str, MemberMaps] | None = None

    @property
    def loaded(self) -> bool:
        return self._members is not None

    def members(self) -> dict[str, MemberMaps]:
        if self._members is None:
            from dermscore.infer import load_member
            from dermscore.storage import member_reads

            with member_reads(self.bundle):
                self._members = {m.name: MemberMaps(load_member(self.bundle.member_path(m), self.runtime), m)
                                 for m in self.bundle.members}
        return self._members

    def explain(
        self, rgb: np.ndarray, member_classes: Mapping[str, str] | None = None, ensemble_class: str | None = None
    ) -> ImageMaps:
        """Heatmaps of one decoded image: each member's for ``member_classes[member]`` and the ensemble's
        for ``ensemble_class`` (see the module docstring for the rule). The run passes the classes its
        report rows show; left out, they are the members' top classes and the ensemble's predicted class
        (``dermscore.aggregate``'s rule: the top class of the weighted mean) from this forward pass."""
        from dermscore.aggregate import ensemble as weighted_mean

        bundle = self.bundle
        inputs = prepare(rgb, bundle.members, bundle.colour_constancy)
        outputs = {m.name: self.members()[m.name].maps(inputs[m.name][None]) for m in bundle.members}
        if member_classes is None:
            member_classes = {name: bundle.classes[int(np.argmax(p[0]))] for name, (p, _) in outputs.items()}
        if ensemble_class is None:
            balanced = weighted_mean({name: p[0] for name, (p, _) in outputs.items()}, bundle)
            ensemble_class = bundle.classes[int(np.argmax(balanced))]
        size = rgb.shape[:2]
        maps: dict[str, np.ndarray] = {}
        mixture = np.zeros(size, dtype=np.float64)
        weights = np.array([m.weight for m in bundle.members], dtype=np.float64)
        for member, weight in zip(bundle.members, weights / weights.sum()):
            grids = np.maximum(outputs[member.name][1][0], 0.0)  # (classes, gh, gw), Grad-CAM's ReLU
            maps[member.name] = to_image(grids[bundle.classes.index(member_classes[member.name])], size)
            for_ensemble = to_image(grids[bundle.classes.index(ensemble_class)], size)
            mixture += weight * mass(for_ensemble.astype(np.float64))
        maps[ENSEMBLE] = mixture.astype(np.float32)
        classes = {**{m.name: member_classes[m.name] for m in bundle.members}, ENSEMBLE: ensemble_class}
        return ImageMaps(maps, classes)


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

    archive_path, name = location.split("!", 1)
    archive = ZipArchive(Path(archive_path))
    return Source(location, lambda: archive.read(name), "zip-member")


def _frames(location: str) -> list[Frame]:
    from dermscore.decode import decode_source

    return decode_source(source_at(location))


def _earlier(out: Path, folder: Path, name: str) -> Path | None:
    """The same file in another report folder of ``out`` (its root or a timestamped subfolder), if any."""
    for candidate in (out / HEATMAP_FOLDER / name, *out.glob(f"*/{HEATMAP_FOLDER}/{name}")):
        if candidate.parent != folder / HEATMAP_FOLDER and candidate.is_file():
            return candidate
    return None


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
        elif all(_earlier(out, folder, n) for n in names):
            target.mkdir(parents=True, exist_ok=True)
            for n in names:
                if not (target / n).is_file():
                    _place(_earlier(out, folder, n), target / n)
            stats.reused += 1
        else:
            to_compute.setdefault(item.scored.ref.location, []).append((item, files))
            continue
        listed[key] = [f"{HEATMAP_FOLDER}/{n}" for n in ordered]
    for location, items in to_compute.items():
        for key, files in _compute(location, items, target, bundle, explainer, stats):
            listed[key] = [f"{HEATMAP_FOLDER}/{files[ENSEMBLE]}", *(f"{HEATMAP_FOLDER}/{files[m.name]}"
                                                                     for m in bundle.members)]
    stats.images = len(listed)
    stats.members_loaded = explainer.loaded
    stats.seconds = time.perf_counter() - started
    return listed, stats


def _compute(
    location: str, items: list[tuple[Flagged, dict[str, str]]], target: Path, bundle: Bundle, explainer: Explainer,
    stats: HeatmapStats,
) -> Iterator[tuple[tuple[str, Any], dict[str, str]]]:
    """Decode one source again and write the heatmaps of its flagged images (frames)."""
    try:
        frames = {frame.ref.frame: frame for frame in _frames(location)}
    except (InputError, OSError) as exc:
        frames, problem = {}, f"cannot be read again ({exc})"
    else:
        problem = "has changed since it was scored"
    from dermscore.aggregate import member_column

    for item, files in items:
        ref = item.scored.ref
        frame = frames.get(ref.frame)
        if frame is None or frame.ref.sha256 != ref.sha256:
            stats.failed.append(location)
            warnings.warn(f"{location}: no heatmap, the image {problem}; score it again to get one.",
                          RuntimeWarning, stacklevel=3)
            continue
        result = explainer.explain(frame.rgb, {m.name: str(item.row[member_column(m.name)]) for m in bundle.members},
                                   str(item.row["predicted_class"]))
        target.mkdir(parents=True, exist_ok=True)
        for who, name in files.items():
            _write(target / name, _png(overlay(frame.rgb, result.maps[who])))
            _write(target / raw_name(name), _png(raw_grey(result.maps[who])))
        stats.computed += 1
        yield (ref.location, ref.frame), files


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
