"""The Ray engine: the local engine's stages, spread over a Ray cluster with Ray Data.

Decoding and preprocessing run as Ray tasks (``flat_map`` over ``dermscore.infer.decode_and_prepare``);
the ensemble runs in an actor pool (``map_batches`` with a callable class wrapping
``dermscore.infer.Predictor`` unchanged, so each actor loads the bundle once). Results come back to
the driver as the same ``Scored | Failure`` records, in input order, so reports and the ledger cannot
tell which engine ran.

Exactly once: Ray Data restarts a dead actor and retries the batch it held, and retries a decode task
whose worker died (each at most ``MAX_RETRIES`` times). The driver still checks the stream: a repeated
(input, frame) is dropped and an input with no result becomes a Failure, so a cluster fault can never
silently lose or double-count an image.

Ray is imported inside ``score_on_ray`` only, so a missing extra is a usage error, not an import crash.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from dermscore.bundle import Bundle, verify_bundle
from dermscore.engines import EngineError, RayOptions
from dermscore.errors import DermscoreError, UsageError
from dermscore.feed import portable
from dermscore.infer import Predictor, decode_and_prepare, ood_scores
from dermscore.records import Failure, ImageRef, Scored, Source
from dermscore.runtime import Runtime

# Test hook (documented in docs/ray.md): when this names a file that exists, the model actor that reaches
# its second batch deletes the file and kills its own process, so tests can watch a retry mid-run.
CRASH_MARKER_ENV = "DERMSCORE_RAY_CRASH_MARKER"
MAX_RETRIES = 3  # bounded, so a worker that dies on every attempt fails the run instead of looping
BLOCK_BYTES = 64 * 2**20  # inputs read on the driver are shipped in blocks of about this size
INPUT = "x/"  # column prefixes: member inputs and member probabilities, keyed by member name
PROBABILITIES = "p/"
OOD_SCORE = "ood_score"  # NaN where the bundle has no detector (or the row failed)


def score_on_ray(
    items: Iterable[Source | Failure],
    bundle: Bundle,
    batch_size: int,
    runtime: Runtime | None = None,
    options: RayOptions | None = None,
    thumbnails: bool = False,
) -> Iterator[Scored | Failure]:
    """``dermscore.infer.score`` on Ray: same inputs, same records, yielded in input order.

    Connects to ``options.address`` (or ``$RAY_ADDRESS``, or starts a local instance) unless Ray is
    already initialised in this process; an instance started here is shut down at the end.
    """
    options = options or RayOptions()
    runtime = runtime or Runtime()
    items = list(items)
    if not any(isinstance(item, Source) for item in items):
        yield from items  # nothing to score: no reason to reach a cluster
        return
    ray = _import_ray()
    started = _connect(ray, options.address)
    try:
        rows = _pipeline(ray, items, bundle, batch_size, runtime, options, thumbnails)
        yield from _gather(rows, items, bundle)
    except DermscoreError:
        raise
    except Exception as exc:  # Ray's own failures (cluster lost, retries spent), put in the user's terms
        raise EngineError(
            f"the Ray run failed: {type(exc).__name__}: {exc}. Check `ray status` and the worker logs; "
            "inputs already scored are in the ledger, so a rerun skips them."
        ) from exc
    finally:
        if started:
            ray.shutdown()


class EnsembleActor:
    """Ray Data's callable class: one ``Predictor`` per actor, failure rows passed through unscored."""

    def __init__(self, bundle: Bundle, batch_size: int, runtime: Runtime) -> None:
        self.members = bundle.members
        self.classes = len(bundle.classes)
        self.crash_marker = os.environ.get(CRASH_MARKER_ENV)
        self.calls = 0
        self.unusable: DermscoreError | None = None
        try:
            # Workers read the bundle at the driver's path; a stale or different copy on a node is refused.
            verify_bundle(bundle)
            self.predictor = Predictor(bundle, batch_size, runtime)
        except DermscoreError as exc:
            # Ray hands a worker's exception to the driver as text only; sent back as each row's record
            # it arrives intact, and the driver raises it (so `dermscore` exits with its code).
            self.unusable = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._crash_if_asked()
        out = {key: batch[key] for key in ("index", "frame", "ok", "record")}
        if self.unusable is not None:
            out["ok"] = np.zeros(len(batch["ok"]), dtype=bool)
            out["record"] = np.array([pickle.dumps(self.unusable)] * len(batch["ok"]), dtype=object)
        ok = out["ok"].astype(bool)
        predicted = self.predictor({m.name: batch[INPUT + m.name][ok] for m in self.members}) if ok.any() else {}
        for member in self.members:
            probabilities = np.zeros((len(ok), self.classes), dtype=np.float64)
            if predicted:
                probabilities[ok] = predicted[member.name]
            out[PROBABILITIES + member.name] = probabilities
        out[OOD_SCORE] = np.full(len(ok), np.nan)
        ood = ood_scores(predicted, self.predictor) if predicted else None
        if ood is not None:
            out[OOD_SCORE][ok] = ood
        return out

    def _crash_if_asked(self) -> None:
        self.calls += 1
        if self.crash_marker and self.calls >= 2:
            try:
                os.remove(self.crash_marker)  # only the actor that removes it dies: exactly one crash
            except FileNotFoundError:
                return
            os._exit(1)


def decode_row(row: dict[str, Any], bundle: Bundle, thumbnails: bool) -> list[dict[str, Any]]:
    """One input -> one row per frame (member inputs plus its ImageRef), or one row with its Failure."""
    source: Source = pickle.loads(row["source"])
    result = decode_and_prepare(source, bundle, thumbnails)
    if isinstance(result, Failure):
        # Zeros keep every row's columns the same shape; the actor never feeds them to a model.
        blank = {m.name: np.zeros((*m.input_size, 3), dtype=np.float32) for m in bundle.members}
        return [_row(row["index"], 0, result, blank)]
    return [_row(row["index"], frame, ref, inputs) for frame, (ref, inputs) in enumerate(result)]


def _row(index: int, frame: int, record: ImageRef | Failure, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "index": index,
        "frame": frame,
        "ok": isinstance(record, ImageRef),
        "record": pickle.dumps(record),
        **{INPUT + name: x for name, x in inputs.items()},
    }


def _pipeline(
    ray: Any,
    items: list[Source | Failure],
    bundle: Bundle,
    batch_size: int,
    runtime: Runtime,
    options: RayOptions,
    thumbnails: bool,
) -> Iterator[dict[str, Any]]:
    blocks = [ray.put(block) for block in _input_blocks(items, rows_per_block=batch_size)]
    ds = ray.data.from_arrow_refs(blocks)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates retry limits given as remote args and offers no other way to bound them;
        # bounded retries matter more than the warning (pyproject keeps Ray below their removal).
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.flat_map(decode_row, fn_kwargs={"bundle": bundle, "thumbnails": thumbnails}, max_retries=MAX_RETRIES)
        ds = ds.map_batches(
            EnsembleActor,
            fn_constructor_kwargs={"bundle": bundle, "batch_size": batch_size, "runtime": runtime},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.replicas),
            num_cpus=options.cpus_per_replica,
            num_gpus=options.gpus_per_replica,
            max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES,
        )
    ds.context.execution_options.preserve_order = True  # reports list images in discovery order
    ds.context.enable_progress_bars = False  # the CLI draws its own
    return ds.iter_rows()


def _input_blocks(items: list[Source | Failure], rows_per_block: int) -> Iterator[Any]:
    """Arrow tables of (input index, pickled Source), small enough that decode tasks spread out.

    Blocks are built and handed to the object store one at a time (it spills to disk when full), so
    inputs read on the driver (see ``dermscore.feed.portable``) never sit in the driver's memory all at once.
    """
    import pyarrow as pa

    def table(indexes: list[int], blobs: list[bytes]) -> Any:
        return pa.table({"index": pa.array(indexes, pa.int64()), "source": pa.array(blobs, pa.large_binary())})

    indexes: list[int] = []
    blobs: list[bytes] = []
    size = 0
    for index, item in enumerate(items):
        if isinstance(item, Failure):
            continue
        blobs.append(portable(item))
        indexes.append(index)
        size += len(blobs[-1])
        if len(blobs) >= rows_per_block or size >= BLOCK_BYTES:
            yield table(indexes, blobs)
            indexes, blobs, size = [], [], 0
    if blobs:
        yield table(indexes, blobs)


def _gather(
    rows: Iterable[dict[str, Any]], items: list[Source | Failure], bundle: Bundle
) -> Iterator[Scored | Failure]:
    """Rows (in input order) back to records, with discovery failures put back in their places."""
    waiting = deque(enumerate(items))
    arrived: set[int] = set()
    seen: set[tuple[int, int]] = set()

    def until(index: float) -> Iterator[Failure]:
        while waiting and waiting[0][0] < index:
            position, item = waiting.popleft()
            if isinstance(item, Failure):
                yield item
            elif position not in arrived:
                yield Failure(item.location, "engine", "the Ray cluster returned no result for this input; run it again")

    for row in rows:
        index, frame = int(row["index"]), int(row["frame"])
        yield from until(index)
        if (index, frame) in seen:
            continue  # a retried task delivered this frame twice; the results are identical
        seen.add((index, frame))
        arrived.add(index)
        record = pickle.loads(row["record"])
        if isinstance(record, DermscoreError):
            raise record  # the model actor could not load the bundle
        if isinstance(record, Failure):
            yield record
        else:
            ood = float(row[OOD_SCORE])
            probabilities = {m.name: np.array(row[PROBABILITIES + m.name]) for m in bundle.members}
            yield Scored(record, probabilities, None if np.isnan(ood) else ood)
    yield from until(float("inf"))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise UsageError(
            f"--engine ray needs Ray, which is not installed here ({exc}). "
            "Install the extra: pip install 'dermscore[ray]'."
        ) from exc
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster (or start a local instance); True when this call started Ray and must stop it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        raise EngineError(
            f"cannot start or reach Ray at {where}: {exc}. Check the address (`ray status` on the head "
            "node prints it) or leave --ray-address out to run on this machine."
        ) from exc
    return True

