"""Batched inference: the Predictor (members loaded once, fixed-shape batches) and the local engine.

The Predictor follows the Ray Data batch-inference shape — load in ``__init__``, then
``__call__(batch: dict[str, ndarray]) -> dict[str, ndarray]`` — so the local engine and a Ray actor
pool use it unchanged. Batches are padded to one fixed size, so the last partial batch reuses the
compiled function instead of retracing. Members run in Keras or, on CPU, in ONNX Runtime
(``dermscore.onnx_backend``; ``Runtime.backend`` chooses).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from dermscore.bundle import Bundle, Member
from dermscore.decode import decode_source
from dermscore.errors import BundleError, InputError
from dermscore.features import output_list
from dermscore.gate.quality import measure
from dermscore.ood import OodDetector
from dermscore.preprocess import prepare
from dermscore.records import Failure, Frame, ImageRef, Scored, Source
from dermscore.runtime import DEFAULT_BATCH, Runtime, configure, resolve_backend, with_precision
from dermscore.report.thumbnail import make_thumbnail

if TYPE_CHECKING:
    from dermscore.feed import Feed

T = TypeVar("T")
R = TypeVar("R")


def load_keras(runtime: Runtime | None = None) -> Any:
    """Apply the compute settings, then import Keras; deferred so `dermscore --help` stays instant."""
    configure(runtime or Runtime())
    import keras

    return keras


def load_member(path: Path, runtime: Runtime) -> Any:
    """Load one member for inference, converted to the requested precision and optionally XLA-compiled."""
    keras = load_keras(runtime)
    model = keras.models.load_model(path, compile=False)
    if runtime.precision != "float32":
        converted = keras.Model.from_config(with_precision(model.get_config(), runtime.precision))
        converted.set_weights(model.get_weights())
        model = converted
    if runtime.xla:
        model.compile(jit_compile=True)
    return model


class Predictor:
    """Every member of a bundle, loaded once; maps member inputs to member probabilities."""

    def __init__(
        self,
        bundle: Bundle,
        batch_size: int = DEFAULT_BATCH["cpu"],
        runtime: Runtime | None = None,
        feature_views: str | None = None,
    ) -> None:
        """``feature_views`` makes the members return their features too (``dermscore.features``); it
        defaults to the bundle's ``ood.views``, and training passes it to fit a detector for a bundle
        that has none yet. Without either, the members and their ONNX cache are exactly as before."""
        self.runtime = runtime or Runtime()
        self.feature_views = feature_views or (bundle.ood.views if bundle.ood else None)
        self.device = configure(self.runtime)
        from dermscore.onnx_backend import needs_export

        self.backend = resolve_backend(self.runtime, self.device, needs_export(bundle, self.feature_views))
        self.bundle = bundle
        self.batch_size = batch_size
        self.models = self._load_models()
        self.detector = OodDetector.load(bundle)
        # ONNX Runtime sessions are sized to a share of the cores each (load_onnx_members) and run on
        # these threads at the same time; Keras members run one after the other on TensorFlow's pools.
        members = len(bundle.members)
        self._side_by_side = (
            ThreadPoolExecutor(members, thread_name_prefix="member") if self.backend == "onnx" and members > 1 else None
        )
        for member in bundle.members:
            model = self.models[member.name]
            expected = (None, *member.input_size, 3)
            if tuple(model.input_shape) != expected and tuple(model.input_shape[1:3]) != (None, None):
                raise BundleError(
                    f"{bundle.member_path(member)}: model input is {model.input_shape} but {bundle.name}'s "
                    f"manifest declares {expected}; the manifest and weights do not belong together."
                )

    def _load_models(self) -> dict[str, Any]:
        """Each member as an object with ``predict_on_batch``: a Keras model or an ONNX Runtime session.

        With ``--backend auto`` a member that cannot be exported faithfully costs a warning and the
        Keras path, not the run; ``--backend onnx`` makes it an error.
        """

        def keras_member(member: Member) -> Any:
            model = load_member(self.bundle.member_path(member), self.runtime)
            if self.feature_views is None:
                return model
            from dermscore.features import feature_member

            return feature_member(model, member, self.feature_views)

        if self.backend == "onnx":
            from dermscore.onnx_backend import load_onnx_members

            try:
                return load_onnx_members(self.bundle, keras_member, self.feature_views)
            except BundleError as exc:
                if self.runtime.backend == "onnx":
                    raise
                warnings.warn(f"{exc} Scoring with Keras instead.", RuntimeWarning, stacklevel=3)
                self.backend = "keras"
        return {m.name: keras_member(m) for m in self.bundle.members}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch[member]`` is (n, h, w, 3) float32 with n <= batch_size; returns ``member -> (n, classes)``.

        A bundle with an OOD detector also gets ``features_key(member) -> (n, features)``: the member's
        penultimate-layer features from the same forward pass (``dermscore.features``).
        """
        padded = {}
        for member in self.bundle.members:
            x = batch[member.name]
            if len(x) < self.batch_size:
                x = np.concatenate([x, np.zeros((self.batch_size - len(x), *x.shape[1:]), dtype=x.dtype)])
            padded[member.name] = x

        def outputs(name: str, x: np.ndarray) -> list[np.ndarray]:
            return output_list(self.models[name].predict_on_batch(x))

        n = len(next(iter(batch.values())))
        if not self._side_by_side:
            return self._named({name: outputs(name, x) for name, x in padded.items()}, n)
        # Each member's batch in halves on the shared threads: a thread that finishes the cheaper member
        # takes a half of the costlier one instead of waiting for it. One thread per member with its
        # whole batch left a core idle while the slower member finished; on our 2-core Xeon halves were
        # faster in each of 3 alternating rounds of benchmarks/onnx_session_options.py (14.7-14.8
        # ensemble images/s against 13.9-14.5), and in 8 rounds in-process (median 16.7 against 16.1).
        half = -(-self.batch_size // 2)
        starts = range(0, self.batch_size, half)
        chunks = [(name, x[i:i + half]) for name, x in padded.items() for i in starts]
        results = self._side_by_side.map(lambda chunk: outputs(*chunk), chunks)
        halves = {name: [next(results) for _ in starts] for name in padded}
        return self._named({name: [np.concatenate(parts) for parts in zip(*h)] for name, h in halves.items()}, n)

    @staticmethod
    def _named(outputs: dict[str, list[np.ndarray]], n: int) -> dict[str, np.ndarray]:
        """Each member's outputs (probabilities, then features if any) under their keys, padding cut off."""
        named = {}
        for name, (probabilities, *features) in outputs.items():
            named[name] = probabilities[:n]
            if features:
                named[features_key(name)] = features[0][:n]
        return named


def ood_scores(outputs: dict[str, np.ndarray], predictor: Predictor) -> np.ndarray | None:
    """The batch's ood_score from the Predictor's outputs; None for a bundle without a detector."""
    if predictor.detector is None:
        return None
    return predictor.detector.score({m: outputs[features_key(m)] for m in predictor.detector.members})


def features_key(member_name: str) -> str:
    """The Predictor's output key for a member's features (member names never contain '/')."""
    return f"{member_name}/features"


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """Ordered map over a thread pool with at most ``window`` items in flight (memory stays flat)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


Prepared = tuple[ImageRef, dict[str, np.ndarray]]


def decode_and_prepare(item: Source | Failure, bundle: Bundle, thumbnails: bool = False) -> list[Prepared] | Failure:
    """One input to member-ready arrays, or the Failure that says why not; shared by every engine."""
    if isinstance(item, Failure):
        return item
    try:
        frames: list[Frame] = decode_source(item)
        # Quality is measured here, in the decode threads of every engine, while the full pixels are at hand.
        refs = [replace(f.ref, quality=measure(f.rgb), thumbnail=make_thumbnail(f.rgb) if thumbnails else None)
                for f in frames]
        return [(ref, prepare(frame.rgb, bundle.members, bundle.colour_constancy)) for ref, frame in zip(refs, frames)]
    except InputError as exc:
        return Failure(item.location, exc.stage, str(exc))
    except Exception as exc:  # a decoder bug must cost one input, not the night's run
        return Failure(item.location, "decode", f"unexpected {type(exc).__name__}: {exc}")


def score(
    items: Iterable[Source | Failure],
    predictor: Predictor,
    workers: int | None = None,
    thumbnails: bool = False,
    feed: str | Feed = "auto",
) -> Iterator[Scored | Failure]:
    """The local engine: a feed decodes and preprocesses while the predictor runs full batches.

    ``feed`` is ``auto``, ``thread`` or ``process`` (``dermscore.feed``; ``workers`` decoders, by default
    as many as suit the predictor's device), or a feed already started, which the caller closes (the bench
    reuses one across rounds). ``thumbnails`` keeps a small PNG on each ImageRef (for the workbook)
    instead of the full pixels.
    """
    from dermscore.feed import open_feed  # dermscore.feed builds on this module's decode_and_prepare

    bundle = predictor.bundle
    owned = open_feed(bundle, predictor.batch_size, predictor.device, feed, workers, thumbnails) \
        if isinstance(feed, str) else None
    try:
        for batch in (owned or feed).batches(items):
            outputs = predictor(batch.inputs) if batch.rows else {}
            ood = ood_scores(outputs, predictor) if batch.rows else None
            for entry in batch.entries:
                if isinstance(entry, Failure):
                    yield entry
                    continue
                ref, row = entry
                probabilities = {m.name: outputs[m.name][row] for m in bundle.members}
                yield Scored(ref, probabilities, None if ood is None else float(ood[row]))
    finally:
        if owned is not None:
            owned.close()
