"""The process feed (dermscore.feed): worker processes decode into a shared-memory ring; what comes out must be
exactly what the thread feed and decode_and_prepare give, in order, with flat memory, no shared memory left
behind, and nothing lost when a worker is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import pytest

from dermscore.bench import scaling_counts
from dermscore.bundle import Bundle, load_bundle
from dermscore.discover import file_source
from dermscore.feed import SHM_PREFIX, FeedBatch, ProcessFeed, ThreadFeed, open_feed
from dermscore.infer import Predictor, decode_and_prepare, score
from dermscore.records import Failure, ImageRef, Scored, Source
from dicom_fixtures import load_rgb, native, real_jpegs

REPO = Path(__file__).resolve().parents[1]
BATCH = 4


@pytest.fixture(scope="module")
def bundle(small_bundle: Path) -> Bundle:
    return load_bundle(small_bundle)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> list[Source | Failure]:
    """Real 600x450 JPEGs with a broken file, a discovery failure and a 3-frame DICOM among them."""
    folder = tmp_path_factory.mktemp("mixed")
    bad = folder / "broken.jpg"
    bad.write_bytes(sample_images[0].read_bytes()[:300])
    dicom = folder / "three-frames.dcm"
    native(load_rgb(real_jpegs(1)[0]), dicom, frames=3)
    sources: list[Source | Failure] = [file_source(p) for p in sample_images[:9]]
    sources[2:2] = [file_source(bad)]
    sources[5:5] = [Failure(str(folder / "gone.jpg"), "read", "vanished before decoding")]
    sources[7:7] = [file_source(dicom)]
    return sources


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}{os.getpid()}-*")}


def flatten(batches: Iterator[FeedBatch]) -> list[tuple[Failure | ImageRef, dict[str, np.ndarray] | None]]:
    """Every entry with a copy of its member inputs (the process feed's arrays live only until the next batch)."""
    out = []
    for batch in batches:
        for entry in batch.entries:
            if isinstance(entry, Failure):
                out.append((entry, None))
            else:
                ref, row = entry
                out.append((ref, {name: x[row].copy() for name, x in batch.inputs.items()}))
    return out


def expected_entries(items: list[Source | Failure], bundle: Bundle, thumbnails: bool) -> list:
    out = []
    for item in items:
        result = decode_and_prepare(item, bundle, thumbnails)
        out.extend([(result, None)] if isinstance(result, Failure) else result)
    return out


def test_process_feed_gives_decode_and_prepare_exactly(bundle: Bundle, mixed: list[Source | Failure]) -> None:
    expected = expected_entries(mixed, bundle, thumbnails=True)
    with ProcessFeed(bundle, BATCH, workers=2, thumbnails=True) as feed:
        got = flatten(feed.batches(mixed))
        assert len(shm_segments()) == feed.slots
    assert len(got) == len(expected) == 14  # 9 JPEGs, 3 frames, the broken file and the discovery failure
    # Order: per batch its failures first, then its frames in input order; the DICOM's frames together.
    images = [ref for ref, _ in got if isinstance(ref, ImageRef)]
    assert [(r.location, r.frame) for r in images] == [(r.location, r.frame) for r, _ in expected
                                                       if isinstance(r, ImageRef)]
    frames = [i for i, r in enumerate(images) if r.location.endswith(".dcm")]
    assert frames == list(range(frames[0], frames[0] + 3))  # the DICOM's three frames together
    assert {f.location for f, _ in got if isinstance(f, Failure)} == {f.location for f, _ in expected
                                                                       if isinstance(f, Failure)}
    by_frame = {(r.location, r.frame): (r, x) for r, x in expected if isinstance(r, ImageRef)}
    for ref, inputs in got:
        if isinstance(ref, Failure):
            continue
        want_ref, want = by_frame[(ref.location, ref.frame)]
        assert ref.quality == want_ref.quality and ref.thumbnail == want_ref.thumbnail and ref.thumbnail
        assert max(float(np.abs(inputs[m] - want[m]).max()) for m in want) <= 1e-4
    assert not shm_segments()


def test_scores_are_the_same_with_either_feed(bundle: Bundle, mixed: list[Source | Failure]) -> None:
    """Scored frames come in input order with both feeds; failures are placed per batch (module docstring)."""
    predictor = Predictor(bundle, BATCH)
    by_thread = list(score(mixed, predictor, feed="thread"))
    by_process = list(score(mixed, predictor, feed="process"))
    assert {r.location for r in by_process if isinstance(r, Failure)} == \
        {r.location for r in by_thread if isinstance(r, Failure)} != set()
    scored = [[r for r in results if isinstance(r, Scored)] for results in (by_process, by_thread)]
    assert [(r.ref.location, r.ref.frame) for r in scored[0]] == [(r.ref.location, r.ref.frame) for r in scored[1]]
    assert len(scored[0]) == 12
    for a, b in zip(*scored):
        assert all(np.abs(a.member_probabilities[m] - b.member_probabilities[m]).max() <= 1e-6
                   for m in a.member_probabilities)


def test_inputs_in_flight_stay_within_the_ring(bundle: Bundle, sample_images: list[Path]) -> None:
    pulled = 0
    most = 0

    def inputs() -> Iterator[Source]:
        nonlocal pulled
        for path in islice(cycle(sample_images[:6]), 60):
            pulled += 1
            yield file_source(path)

    done = 0
    with ProcessFeed(bundle, BATCH, workers=2) as feed:
        for batch in feed.batches(inputs()):
            most = max(most, pulled - done)
            done += batch.rows
    assert done == 60
    assert 2 * BATCH <= most <= feed.slots * BATCH


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_an_exception_mid_run_stops_the_workers_and_frees_shared_memory(
    bundle: Bundle, sample_images: list[Path], stop: type[BaseException]
) -> None:
    feed = ProcessFeed(bundle, BATCH, workers=2)
    with pytest.raises(stop):
        for _ in feed.batches(file_source(p) for p in sample_images[:20]):
            pids = list(feed.in_progress())
            assert len(shm_segments()) == feed.slots
            raise stop("the consumer failed")
    assert not shm_segments()
    for pid in pids:
        assert _gone(pid)
    # The feed starts afresh on the next call.
    assert sum(b.rows for b in feed.batches(file_source(p) for p in sample_images[:5])) == 5
    feed.close()
    assert not shm_segments()


def test_workers_never_load_tensorflow(bundle: Bundle, sample_images: list[Path]) -> None:
    import keras  # noqa: F401  (loaded in this process: the workers must not inherit it)

    assert "tensorflow" in Path("/proc/self/maps").read_text()
    with ProcessFeed(bundle, BATCH, workers=2) as feed:
        for _ in feed.batches(file_source(p) for p in sample_images[:4]):
            maps = [Path(f"/proc/{pid}/maps").read_text() for pid in feed.in_progress()]
    assert len(maps) == 2 and all("tensorflow" not in m and "jax" not in m for m in maps)


@pytest.mark.parametrize("kills", [1, 2])
def test_a_worker_killed_mid_run_loses_nothing(bundle: Bundle, sample_images: list[Path], tmp_path: Path,
                                               kills: int) -> None:
    """A FIFO holds its worker until written to: SIGKILL it there. After one kill the replacement decodes the
    input (written to the FIFO then); after two, the input is recorded as failed and the run goes on."""
    fifo = tmp_path / "held.jpg"
    os.mkfifo(fifo)
    items = [file_source(p) for p in sample_images[:10]]
    items.insert(3, file_source(fifo))
    feed = ProcessFeed(bundle, BATCH, workers=2)
    got: list = []
    consumer = threading.Thread(target=lambda: got.extend(flatten(feed.batches(items))), daemon=True)
    consumer.start()
    killed: set[int] = set()
    for _ in range(kills):
        pid = _wait_for(lambda: next((p for p, loc in feed.in_progress().items()
                                      if loc == str(fifo) and p not in killed), None))
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    if kills == 1:
        _wait_for(lambda: next((p for p, loc in feed.in_progress().items() if loc == str(fifo) and p not in killed),
                               None))
        with fifo.open("wb") as writer:
            writer.write(sample_images[3].read_bytes())
    consumer.join(timeout=120)
    assert not consumer.is_alive(), "the feed hung after a worker was killed"
    assert feed.respawns == kills
    feed.close()
    assert not shm_segments()
    locations = [r.location for r, _ in got]
    assert sorted(locations) == sorted(s.location for s in items)  # every input exactly once
    held = next((r, x) for r, x in got if r.location == str(fifo))
    if kills == 1:
        (_, want), = decode_and_prepare(file_source(sample_images[3]), bundle)
        assert isinstance(held[0], ImageRef)
        assert max(float(np.abs(held[1][m] - want[m]).max()) for m in want) <= 1e-4
    else:
        assert isinstance(held[0], Failure) and "died (signal SIGKILL)" in held[0].reason
    assert all(isinstance(r, ImageRef) for r, _ in got if r.location != str(fifo))


def test_workers_that_keep_dying_stop_the_run_cleanly(bundle: Bundle, sample_images: list[Path], tmp_path: Path) -> None:
    """One worker, so at most 2 + 2 x 1 replacements: the fifth death ends the run with an EngineError that says
    a rerun resumes from the ledger, and the ring is unlinked."""
    from dermscore.engines import EngineError

    fifos = [tmp_path / f"held-{i}.jpg" for i in range(3)]
    for fifo in fifos:
        os.mkfifo(fifo)
    feed = ProcessFeed(bundle, BATCH, workers=1)
    raised: list[BaseException] = []

    def consume() -> None:
        try:
            flatten(feed.batches([file_source(sample_images[0]), *map(file_source, fifos)]))
        except BaseException as exc:  # noqa: BLE001  (handed to the test thread)
            raised.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    killed: set[int] = set()
    for _ in range(5):
        pid = _wait_for(lambda: next((p for p, loc in feed.in_progress().items()
                                      if loc in {str(f) for f in fifos} and p not in killed), None))
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    consumer.join(timeout=60)
    assert not consumer.is_alive()
    assert isinstance(raised[0], EngineError) and "a rerun" in str(raised[0])
    assert not shm_segments()


def test_a_killed_run_leaves_no_workers_and_no_shared_memory(small_bundle: Path, sample_images: list[Path]) -> None:
    """SIGKILL of the scoring process itself: its workers notice and exit, and multiprocessing's resource
    tracker unlinks the ring."""
    script = f"""
import sys, time
from pathlib import Path
from dermscore.bundle import load_bundle
from dermscore.discover import file_source
from dermscore.feed import ProcessFeed
if __name__ == "__main__":
    feed = ProcessFeed(load_bundle({str(small_bundle)!r}), {BATCH}, workers=2)
    batches = feed.batches(file_source(Path(p)) for p in {[str(p) for p in sample_images[:12]]!r})
    next(batches)
    print(" ".join(map(str, feed.in_progress())), flush=True)
    time.sleep(600)
"""
    run = subprocess.Popen(["python3", "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                           stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in run.stdout.readline().split()]
    segments = {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}{run.pid}-*")}
    assert len(pids) == 2 and segments
    run.kill()
    run.wait()
    _wait_for(lambda: all(_gone(pid) for pid in pids), timeout=20)
    _wait_for(lambda: not any((Path("/dev/shm") / name).exists() for name in segments), timeout=20)


def test_auto_feed_is_threads_on_a_cpu_and_checks_its_options(bundle: Bundle) -> None:
    from dermscore.errors import UsageError

    assert isinstance(open_feed(bundle, BATCH, "cpu"), ThreadFeed)
    feed = open_feed(bundle, BATCH, "gpu", workers=3)
    assert isinstance(feed, ProcessFeed) and feed.workers == 3
    with pytest.raises(UsageError, match="--feed"):
        open_feed(bundle, BATCH, "cpu", "fork")
    with pytest.raises(UsageError, match="--decode-workers"):
        open_feed(bundle, BATCH, "cpu", "process", 0)


def test_a_ring_too_big_for_dev_shm_is_refused_before_anything_starts(bundle: Bundle) -> None:
    from dermscore.errors import UsageError

    huge = 10**6  # images per batch: three slots of them cannot fit this machine's /dev/shm
    with pytest.warns(RuntimeWarning, match="shared memory"):
        assert isinstance(open_feed(bundle, huge, "gpu"), ThreadFeed)
    with pytest.raises(UsageError, match="--shm-size"):
        open_feed(bundle, huge, "gpu", "process")
    assert not shm_segments()


def test_decode_scaling_counts_double_up_to_all_cores() -> None:
    assert scaling_counts(2) == [1, 2]
    assert scaling_counts(16) == [1, 2, 4, 8, 16]
    assert scaling_counts(12) == [1, 2, 4, 8, 12]


def test_run_scores_through_the_process_feed(small_bundle: Path, mixed: list[Source | Failure], tmp_path: Path) -> None:
    import csv

    from dermscore.run import RunOptions, run

    folder = tmp_path / "in"
    folder.mkdir()
    for item in mixed:
        if isinstance(item, Source):
            (folder / Path(item.location).name).write_bytes(item.read())
    summary = run(RunOptions(inputs=[folder], out=tmp_path / "out", model=str(small_bundle), feed="process",
                             decode_workers=2, batch_size=BATCH, quiet=True))
    assert (summary.scored, len(summary.failures)) == (12, 1)
    with (tmp_path / "out" / "images.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 12


def test_gpu_feed_script_runs_on_the_cpu_in_smoke_mode(tmp_path: Path) -> None:
    # LIMIT=1: the thread-feed bench after the first is skipped, as it would be on a GPU short of time.
    env = dict(os.environ, SMOKE="1", KERAS_BACKEND="tensorflow", OUT=str(tmp_path), W=str(tmp_path / "w"), LIMIT="1",
               PYTHONPATH=str(REPO))
    done = subprocess.run(["bash", "benchmarks/gpu_feed.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "bench.txt").read_text()
    for row in ("decode + preprocess only", "model-only", "end-to-end", "decode scaling, 1 worker",
                "decode scaling, 2 workers"):
        assert row in report
    assert "2 decoding processes" in report
    assert "skipped thread-4" in report


def _wait_for(probe, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is dead too
