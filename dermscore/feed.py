"""The feed: decoded, preprocessed images handed to the members in fixed-shape batches.

The stage between decode/preprocess and infer (discover -> decode -> preprocess -> **feed** -> infer). Two
feeds, one interface (``batches(items) -> Iterator[FeedBatch]``), the same ``decode_and_prepare`` for every
input, so they give identical member inputs:

* ``ThreadFeed``: today's path. Python threads decode and preprocess (``bounded_map``); the batch is stacked
  in this process. Pillow and numpy release the GIL for part of the work only, so on a GPU host the threads
  cannot keep up with the members (431 of 1,152 images/s on an H200, docs/throughput.md).
* ``ProcessFeed``: a pool of worker processes, each with its own interpreter, writes the member-ready
  arrays straight into a ring of shared-memory batch buffers (one block per slot holding each member's
  (batch, h, w, 3) float32), and the members read the slot in place: no pickling of pixels, no copy in
  this process. Only the small ImageRef (quality, thumbnail) comes back through a pipe.

Order: each batch yields the failures found in it first, then its scored frames in input order; a
multi-frame input's frames stay together (the ledger's Recorder needs that). With the thread feed a failure
comes out as soon as it is found, ahead of the batch being filled, as the local engine always did.

Memory is flat in the number of inputs: at most ``slots`` batches (process) or a window of inputs (threads)
are in flight. A worker process that dies (SIGKILL, the OOM killer, a decoder crash) is replaced and its
unfinished inputs are decoded again; an input whose decoding kills a worker twice becomes a Failure, and if
workers keep dying the run stops with an EngineError, so a rerun resumes from the ledger.

Workers are started with ``spawn``: a forked copy of a process that has TensorFlow or JAX loaded can
deadlock, and a fresh interpreter imports only numpy, Pillow and dermscore's decoders. As with any
``multiprocessing`` code, a script that scores with the process feed must guard its top level with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, Protocol
from uuid import uuid4

import numpy as np

from dermscore.bundle import Bundle
from dermscore.discover import read_file
from dermscore.engines import EngineError
from dermscore.errors import UsageError
from dermscore.infer import Prepared, bounded_map, decode_and_prepare
from dermscore.preprocess import stack_inputs
from dermscore.records import Failure, ImageRef, Source
from dermscore.runtime import decode_workers

FEEDS = ("auto", "thread", "process")
SHM_PREFIX = "dermscore-feed-"  # /dev/shm names, so a leak is recognisable (tests look for it)
SHM_FOLDER = Path("/dev/shm")
MAX_ATTEMPTS = 2  # an input whose decoding killed its worker this often is recorded as failed
Entry = Failure | tuple[ImageRef, int]  # a failed input, or an image and its row in the batch


@dataclass
class FeedBatch:
    """One forward pass: ``inputs[member]`` is (rows, h, w, 3) float32 with rows <= the batch size (rows
    may be 0: failures only), and ``entries`` says, in output order, what each result is. With the process
    feed the arrays are views of shared memory, valid until the next batch is asked for."""

    inputs: dict[str, np.ndarray]
    entries: list[Entry]
    rows: int


class Feed(Protocol):
    kind: str  # thread | process
    workers: int

    def batches(self, items: Iterable[Source | Failure]) -> Iterator[FeedBatch]: ...

    def close(self) -> None: ...


def default_feed(device: str) -> str:
    """``auto``: processes on a GPU host, where decoding is the limit, threads on a CPU.

    On a CPU the members need every core and decoding is about 7% of the work (docs/throughput.md), so
    worker processes only add start-up and memory: on our 2-core EPYC end-to-end was the same within the
    noise with either feed (docs/feeding.md). On a GPU host the cores are idle and the GIL is the limit.
    """
    return "thread" if device == "cpu" else "process"


def default_workers(device: str, kind: str) -> int:
    """Decoders: ``decode_workers`` threads, or for processes every core but one for this process and
    one for the members' host work (a GPU host's cores are otherwise idle; on a CPU two, as threads)."""
    if kind == "thread" or device == "cpu":
        return decode_workers(device)
    return max(2, (os.cpu_count() or 2) - 2)


def check_feed(kind: str, workers: int | None) -> None:
    """``--feed`` and ``--decode-workers`` as given, checked before anything loads."""
    if kind not in FEEDS:
        raise UsageError(f"--feed must be one of {', '.join(FEEDS)}, got {kind!r}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--decode-workers must be at least 1, got {workers}.")


def open_feed(
    bundle: Bundle, batch_size: int, device: str, kind: str = "auto", workers: int | None = None,
    thumbnails: bool = False,
) -> ThreadFeed | ProcessFeed:
    """The feed a run asked for (``--feed``, ``--decode-workers``); ``auto`` falls back to threads with a
    warning where /dev/shm cannot hold the ring (a container's default 64 MB, say)."""
    check_feed(kind, workers)
    chosen = default_feed(device) if kind == "auto" else kind
    count = workers or default_workers(device, chosen)
    if chosen == "thread":
        return ThreadFeed(bundle, batch_size, count, thumbnails)
    feed = ProcessFeed(bundle, batch_size, count, thumbnails)
    shortfall = feed.shm_shortfall()
    if shortfall and kind == "auto":
        warnings.warn(f"{shortfall} Decoding in threads instead.", RuntimeWarning, stacklevel=2)
        return ThreadFeed(bundle, batch_size, workers or default_workers(device, "thread"), thumbnails)
    if shortfall:
        raise UsageError(f"{shortfall} Or use --feed thread.")
    return feed


def stacked(prepared: list[Prepared], bundle: Bundle) -> FeedBatch:
    """A batch stacked in this process from decoded inputs, one row each in order (the thread feed's batches,
    and the process feed's for the further frames of multi-frame inputs)."""
    return FeedBatch(stack_inputs([inputs for _, inputs in prepared], bundle.members),
                     [(ref, row) for row, (ref, _) in enumerate(prepared)], len(prepared))


class ThreadFeed:
    """Decoding in threads of this process, batches stacked here: the local engine as it always was."""

    kind = "thread"

    def __init__(self, bundle: Bundle, batch_size: int, workers: int, thumbnails: bool = False) -> None:
        self.bundle, self.batch_size, self.workers, self.thumbnails = bundle, batch_size, workers, thumbnails

    def batches(self, items: Iterable[Source | Failure]) -> Iterator[FeedBatch]:
        window = max(2 * self.batch_size, 4 * self.workers)
        pending: list[Prepared] = []

        def full() -> FeedBatch:
            batch = stacked(pending, self.bundle)
            pending.clear()
            return batch

        prepare = partial(decode_and_prepare, bundle=self.bundle, thumbnails=self.thumbnails)
        for result in bounded_map(prepare, items, self.workers, window):
            if isinstance(result, Failure):
                yield FeedBatch({}, [result], 0)
                continue
            for prepared in result:
                pending.append(prepared)
                if len(pending) == self.batch_size:
                    yield full()
        if pending:
            yield full()

    def close(self) -> None:
        """Nothing to release: the threads end with each ``batches`` call."""

    def __enter__(self) -> ThreadFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Task:
    id: int
    blob: bytes  # the Source, pickled by ``portable``
    location: str
    slot: int
    row: int
    attempts: int = 0


@dataclass
class _Slot:
    index: int
    rows: int = 0
    entries: list[Failure | int] = field(default_factory=list)  # discovery failures, task ids


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any  # multiprocessing.context.SpawnProcess
    tasks: Any  # its own queue: a worker killed while reading cannot block the others' reads
    replies: Connection  # its own pipe back, likewise for writes
    pending: dict[int, _Task] = field(default_factory=dict)


class ProcessFeed:
    """Worker processes decode into a shared-memory ring of fixed-shape batch buffers.

    Reusable: workers start at the first ``batches`` call and serve later calls (the bench times rounds
    without start-up); ``close`` (or the end of a ``with`` block, or garbage collection) stops them and
    unlinks the shared memory. A ``batches`` generator abandoned or failed half-way closes the feed, since
    its inputs in flight would otherwise write into slots a later call hands out.
    """

    kind = "process"

    def __init__(self, bundle: Bundle, batch_size: int, workers: int, thumbnails: bool = False,
                 slots: int | None = None) -> None:
        self.bundle, self.batch_size, self.workers, self.thumbnails = bundle, batch_size, workers, thumbnails
        # Enough slots that workers keep going while the members run on one: two batches, and at least
        # about four inputs per worker.
        self.slots = slots or max(3, -(-4 * workers // batch_size) + 1)
        self.layout = [(m.name, (batch_size, *m.input_size, 3)) for m in bundle.members]
        self.slot_bytes = sum(4 * int(np.prod(shape)) for _, shape in self.layout)
        self.respawns = 0
        self._context = multiprocessing.get_context("spawn")
        self._blocks: list[SharedMemory] = []
        self._views: list[dict[str, np.ndarray]] = []
        self._pool: list[_Worker] = []
        self._current: Any = None  # per worker: the task id it is decoding, -1 when idle
        self._replies: dict[int, Any] = {}
        self._next_id = 0
        self._finalizer: weakref.finalize | None = None

    def shm_shortfall(self) -> str | None:
        """Why /dev/shm cannot hold the ring, or None. Writing past a full tmpfs kills a worker with SIGBUS,
        so this is checked before anything starts."""
        if not SHM_FOLDER.is_dir():
            return None
        stat = os.statvfs(SHM_FOLDER)
        free, needed = stat.f_bavail * stat.f_frsize, self.slots * self.slot_bytes
        if free >= needed:
            return None
        return (f"the process feed needs {needed / 2**20:.0f} MiB of shared memory ({self.slots} batches of "
                f"{self.batch_size}) but {SHM_FOLDER} has {free / 2**20:.0f} MiB free: give the container more "
                "(docker run --shm-size), or lower --batch-size.")

    def batches(self, items: Iterable[Source | Failure]) -> Iterator[FeedBatch]:
        if not self._pool:
            self._start()
        finished = False
        try:
            yield from self._batches(iter(items))
            finished = True
        finally:
            if not finished:
                self.close()

    def in_progress(self) -> dict[int, str | None]:
        """Each worker's pid -> the input it is decoding now (None: idle), for tests and for diagnosing a
        stuck input."""
        running: dict[int, str | None] = {}
        for worker in list(self._pool):
            task = worker.pending.get(int(self._current[worker.index]))
            running[worker.process.pid] = task.location if task else None
        return running

    def close(self) -> None:
        """Stop the workers and unlink the shared memory; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool, self._blocks, self._views, self._replies = [], [], [], {}

    def __enter__(self) -> ProcessFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        shortfall = self.shm_shortfall()
        if shortfall:
            raise UsageError(shortfall)
        token = f"{SHM_PREFIX}{os.getpid()}-{uuid4().hex[:8]}"
        self._finalizer = weakref.finalize(self, _release, self._blocks, self._pool)
        for i in range(self.slots):
            block = SharedMemory(name=f"{token}-{i}", create=True, size=self.slot_bytes)
            self._blocks.append(block)
            self._views.append(_views(block, self.layout))
        self._current = self._context.RawArray("q", [-1] * self.workers)
        self._pool.extend(self._spawn(i) for i in range(self.workers))

    def _spawn(self, index: int) -> _Worker:
        tasks = self._context.Queue()
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_work, name=f"dermscore-decode-{index}", daemon=True,
            args=(index, tasks, send, self._current, [b.name for b in self._blocks], self.layout, self.bundle,
                  self.thumbnails, os.getpid()))
        process.start()
        send.close()  # the worker holds the only writing end, so its death reads as EOF here
        return _Worker(index, process, tasks, receive)

    def _batches(self, items: Iterator[Source | Failure]) -> Iterator[FeedBatch]:
        free = deque(range(self.slots))
        filled: deque[_Slot] = deque()
        filling: _Slot | None = None
        exhausted = False
        while True:
            while not exhausted and (filling or free):
                filling = filling or _Slot(free.popleft())
                item = next(items, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, Failure):
                    filling.entries.append(item)
                else:
                    filling.entries.append(self._submit(item, filling))
                # A slot closes when full, or when discovery failures pile up in it (flat memory).
                if exhausted or filling.rows == self.batch_size or len(filling.entries) >= 2 * self.batch_size:
                    if filling.entries:
                        filled.append(filling)
                    else:
                        free.append(filling.index)
                    filling = None
            if not filled:
                return
            slot = filled.popleft()
            while any(isinstance(e, int) and e not in self._replies for e in slot.entries):
                self._receive()
            yield from self._slot_batches(slot)
            free.append(slot.index)

    def _submit(self, source: Source, slot: _Slot) -> int:
        task = _Task(self._next_id, portable(source), source.location, slot.index, slot.rows)
        self._next_id += 1
        slot.rows += 1
        self._assign(task)
        return task.id

    def _assign(self, task: _Task) -> None:
        worker = min(self._pool, key=lambda w: len(w.pending))
        worker.pending[task.id] = task
        worker.tasks.put((task.id, task.blob, task.slot, task.row))

    def _slot_batches(self, slot: _Slot) -> Iterator[FeedBatch]:
        """The slot's failures, then its rows in order; a multi-frame input's further frames (sent back
        through the pipe) are scored right after its first, so the slot is split around them."""
        view = self._views[slot.index]
        failures: list[Entry] = []
        entries: list[Entry] = []
        start = 0

        def rows_until(end: int) -> FeedBatch:
            batch = FeedBatch({name: x[start:end] for name, x in view.items()},
                              [(ref, row - start) for ref, row in entries], end - start)
            entries.clear()
            return batch

        plan: list[FeedBatch | list[Prepared]] = []
        row = 0
        for entry in slot.entries:
            reply = entry if isinstance(entry, Failure) else self._replies.pop(entry)
            if isinstance(entry, int):
                row += 1  # every task holds one row, used or not
            if isinstance(reply, Failure):
                failures.append(reply)
                continue
            ref, extras = reply
            entries.append((ref, row - 1))
            if extras:
                plan.append(rows_until(row))
                start = row
                plan.extend(extras[i:i + self.batch_size] for i in range(0, len(extras), self.batch_size))
        if failures:
            yield FeedBatch({}, failures, 0)
        plan.append(rows_until(slot.rows))
        for part in plan:
            if isinstance(part, FeedBatch):
                if part.entries:
                    yield part
            else:
                yield stacked(part, self.bundle)

    def _receive(self) -> None:
        """Wait for replies; a worker that died is replaced and its unfinished inputs given out again."""
        by_handle: dict[Any, _Worker] = {}
        for worker in self._pool:
            by_handle[worker.replies] = by_handle[worker.process.sentinel] = worker
        for handle in wait(list(by_handle)):
            worker = by_handle[handle]
            if worker not in self._pool:
                continue  # replaced a moment ago through its other handle
            if handle is worker.replies:
                try:
                    self._store(worker, worker.replies.recv())
                    continue
                except EOFError:
                    pass
            self._replace(worker)

    def _store(self, worker: _Worker, reply: tuple[int, Any]) -> None:
        task_id, result = reply
        worker.pending.pop(task_id, None)
        self._replies[task_id] = result

    def _replace(self, worker: _Worker) -> None:
        try:
            while worker.replies.poll():
                self._store(worker, worker.replies.recv())
        except (EOFError, OSError):
            pass
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        busy = int(self._current[worker.index])
        self._current[worker.index] = -1
        _stop([worker])
        self.respawns += 1
        if self.respawns > 2 + 2 * self.workers:
            raise EngineError(
                f"decode worker processes keep dying (the last with {how}; {self.respawns} so far): check memory "
                "(dmesg shows the OOM killer) and /dev/shm. Inputs already scored are in the ledger, so a rerun "
                "skips them; --feed thread decodes without worker processes.")
        replacement = self._spawn(worker.index)
        self._pool[self._pool.index(worker)] = replacement
        for task in worker.pending.values():
            task.attempts += task.id == busy
            if task.attempts >= MAX_ATTEMPTS:
                self._replies[task.id] = Failure(
                    task.location, "decode",
                    f"the decode worker process died ({how}) each of the {task.attempts} times this input was "
                    "being decoded; it was not scored. Check the file; --retry-failed tries it again.")
            else:
                self._assign(task)


def _views(block: SharedMemory, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Each member's (batch, h, w, 3) float32 array, one after the other in the slot's block."""
    views, offset = {}, 0
    for name, shape in layout:
        views[name] = np.ndarray(shape, np.float32, buffer=block.buf, offset=offset)
        offset += 4 * int(np.prod(shape))
    return views


def _stop(workers: list[_Worker]) -> None:
    """End workers and release their queues and pipes: an idle one is asked to stop, one with inputs still
    queued is killed (its work is being thrown away, and it would finish the queue first)."""
    for worker in workers:
        if worker.pending or not worker.process.is_alive():
            worker.process.kill()
        else:
            try:
                worker.tasks.put(None)
            except (OSError, ValueError):
                worker.process.kill()
    deadline = time.monotonic() + 2
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.tasks.cancel_join_thread()  # never wait on a dead reader
        worker.tasks.close()
        worker.replies.close()


def _release(blocks: list[SharedMemory], pool: list[_Worker]) -> None:
    """Workers first (they hold the blocks open), then the blocks; run by ``close`` or at collection."""
    _stop(pool)
    pool.clear()
    for block in blocks:
        block.close()
        try:
            block.unlink()
        except FileNotFoundError:
            pass
    blocks.clear()


def _work(index: int, tasks: Any, replies: Connection, current: Any, names: list[str],
          layout: list[tuple[str, tuple[int, ...]]], bundle: Bundle, thumbnails: bool, parent: int) -> None:
    """A worker: decode each input it is given, its first frame into its row of the slot, the rest by pipe."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the run decides when to stop, and
    # stops its workers itself.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    blocks = [SharedMemory(name=name) for name in names]
    views = [_views(block, layout) for block in blocks]
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return  # the run was killed: nothing left to decode for
            continue
        if task is None:
            return
        task_id, blob, slot, row = task
        current[index] = task_id
        result = decode_and_prepare(pickle.loads(blob), bundle, thumbnails)
        if not isinstance(result, Failure):
            (ref, inputs), *extras = result
            for name, x in inputs.items():
                views[slot][name][row] = x
            result = (ref, extras)
        current[index] = -1
        replies.send((task_id, result))


def portable(source: Source) -> bytes:
    """The Source pickled for another process: a file travels as its path, anything else as its bytes.

    Shared by the process feed and the Ray engine. Workers read files themselves (so the input folders
    must be visible to them at the same paths); the path is made absolute because a worker's working
    directory may differ, while the location, and so the reports, keep the path as given. Other readers
    (zip members) hold an open archive and its whole member list, far too much to ship per input, so this
    process reads them and ships the bytes, or the error reading them raised, so that the worker's decode
    reports exactly what the local engine would.
    """
    read = source.read
    if isinstance(read, partial) and read.func is read_file:
        return pickle.dumps(replace(source, read=partial(read_file, Path(read.args[0]).absolute())))
    try:
        data = read()
    except Exception as exc:  # replayed on the worker, where decode turns it into the usual Failure
        return pickle.dumps(replace(source, read=partial(_raise, exc)))
    return pickle.dumps(replace(source, read=partial(_given, data)))


def _given(data: bytes) -> bytes:
    return data


def _raise(exc: Exception) -> bytes:
    raise exc
