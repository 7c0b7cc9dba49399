"""The run ledger: what was scored by which bundle, what failed, so nightly runs are incremental.

One SQLite file (WAL mode) beside the reports. Results are committed batch by batch, one transaction
each, so a run killed at any moment (SIGKILL, power loss) loses at most the batch in flight and a
rerun picks up from there; unique keys and upserts mean nothing is ever counted twice.

Tables:
- ``runs``: one row per run (status running | done | interrupted | killed | error).
- ``inputs``: one row per (bundle identity, location): content hash, outcome (scored | failed), failure
  stage and reason. A ``scored`` row exists only once *every* frame of that input is in ``images``,
  which is what makes a source split across two batches safe to resume.
- ``images``: one row per (bundle identity, location, frame): the per-member probabilities and the
  image's identity as JSON (plus the ``--thumbnails`` PNG), so reports, with whatever thresholds and
  lesion maps a later run uses, can be regenerated from the ledger alone (``frame`` is -1
  for single-image files, because SQLite treats NULLs as distinct in unique keys).
- ``skipped_objects`` (schema 2): one row per (bundle identity, location) that discovery set aside
  (non-image DICOM objects, modalities the gate keeps out), with its category and reason, so
  skipped.csv covers earlier runs like the other reports. A location is in at most one of
  ``inputs`` and ``skipped_objects``: the latest run's decision wins (``--modality CT`` scores a CT
  that an earlier run set aside, and the next run without it sets it aside again).
- ``verdicts`` (schema 3): reviewer verdicts read back from the Lesions sheet (``dermscore review
  import``), one row per (bundle identity, lesion id) and change: a verdict that differs from the
  lesion's latest is appended with its time, so the history is kept and re-importing a file adds nothing.
  The latest row per lesion is the verdict later reports show.

Schema versions (``PRAGMA user_version``): 1 the first; 2 adds ``skipped_objects``; 3 adds ``verdicts``.
Opening an older ledger creates the missing tables (nothing else changes), so existing ledgers keep
their results.

Only one run may hold a ledger: an exclusive ``fcntl.flock`` on ``<ledger>.lock``, which the kernel
releases when the process dies, however it dies. POSIX only (cron and systemd hosts).

The end of this module holds the small companions of unattended runs: the JSON-lines event log,
SIGINT/SIGTERM handling, and the ``DERMSCORE_TEST_PAUSE_AT`` hook that crash tests use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from dermscore.errors import LedgerBusyError, OutputError, UsageError
from dermscore.infer import bounded_map
from dermscore.records import Failure, ImageRef, Scored, Skipped, Source, Verdict
from dermscore.storage import file_writes, ledger_writes, same_file, storage_errno

LEDGER_NAME = "ledger.sqlite"
SCHEMA_VERSION = 3
NO_FRAME = -1
# Which inputs a run takes on (see README, "Scheduled jobs"): the default retries failures.
SELECTIONS = ("default", "rescore", "skip-failed", "retry-failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    bundle TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    command TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inputs (
    bundle TEXT NOT NULL,
    location TEXT NOT NULL,
    sha256 TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('scored', 'failed')),
    stage TEXT,
    reason TEXT,
    frames INTEGER NOT NULL DEFAULT 0,
    run_id TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (bundle, location)
);
CREATE TABLE IF NOT EXISTS images (
    bundle TEXT NOT NULL,
    location TEXT NOT NULL,
    frame INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    result TEXT NOT NULL,
    thumbnail BLOB,
    run_id TEXT NOT NULL,
    scored_at TEXT NOT NULL,
    PRIMARY KEY (bundle, location, frame)
);
CREATE TABLE IF NOT EXISTS skipped_objects (
    bundle TEXT NOT NULL,
    location TEXT NOT NULL,
    category TEXT NOT NULL,
    reason TEXT NOT NULL,
    run_id TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (bundle, location)
);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bundle TEXT NOT NULL,
    lesion_id TEXT NOT NULL,
    reviewer_class TEXT,
    reviewer TEXT,
    reviewer_note TEXT,
    report TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_lesion ON verdicts (bundle, lesion_id, id);
CREATE INDEX IF NOT EXISTS images_run ON images (run_id);
CREATE INDEX IF NOT EXISTS inputs_run ON inputs (run_id);
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_ledger_path(out: Path) -> Path:
    return Path(out) / LEDGER_NAME


def lock_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".lock")


@contextmanager
def ledger_lock(ledger: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the ledger's exclusive lock; waits up to ``wait`` seconds, then raises LedgerBusyError."""
    path = lock_path(ledger)
    handle = open(path, "a+", encoding="utf-8")  # "a+" so a waiting run never erases the holder's note
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text(encoding="utf-8").strip() or "another process"
                    raise LedgerBusyError(
                        f"the ledger {ledger} is in use by another dermscore run ({holder}); two runs on one "
                        f"ledger could count results twice. Waited {wait:g}s. Let that run finish, or pass "
                        "--wait SECONDS to wait for it."
                    ) from None
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {utc_now()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock


@dataclass(frozen=True)
class BatchStats:
    batch: int
    images: int
    failed: int


class Ledger:
    """An open, locked ledger; create with ``open_ledger``."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self.db = connection
        stat = os.stat(path)
        self.identity = (stat.st_dev, stat.st_ino)  # to notice the file being deleted or unmounted
        self.hashes: dict[str, str | None] = {}  # location -> sha256 seen by this run's plan
        self.skipped = 0

    # --- runs -----------------------------------------------------------------------------------
    def begin_run(self, bundle_identity: str, command: str) -> str:
        """Record a new run; runs still marked running died without a word (we hold the lock)."""
        run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        with self.db:
            self.db.execute("UPDATE runs SET status = 'killed' WHERE status = 'running'")
            self.db.execute(
                "INSERT INTO runs (run_id, bundle, status, started_at, command, pid) VALUES (?, ?, 'running', ?, ?, ?)",
                (run_id, bundle_identity, utc_now(), command, os.getpid()),
            )
        return run_id

    def end_run(self, run_id: str, status: str) -> None:
        self.ensure_present()
        with self.db:
            self.db.execute("UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?", (status, utc_now(), run_id))

    def ensure_present(self) -> None:
        """Refuse to write on when the ledger file was deleted or its folder unmounted: SQLite would go
        on writing to a file no later run sees, and the next run would start from nothing unawares."""
        if not same_file(self.path, self.identity):
            raise OutputError(
                f"the ledger {self.path} was deleted or its folder unmounted during the run, so what this run "
                "committed went with it. Restore or mount the folder (or choose another --out or --ledger), "
                "then run the same command again: inputs not in the ledger are scored again, none twice."
            )

    # --- what to score --------------------------------------------------------------------------
    def plan(
        self,
        items: Iterable[Source | Failure],
        bundle_identity: str,
        selection: str = "default",
        stop: threading.Event | None = None,
        workers: int = 2,
    ) -> Iterator[Source | Failure]:
        """Yield the inputs this run must score; hashes each source's bytes to spot changed content.

        Hashing reads every input once more than scoring alone would: measured under 0.1% of scoring
        time for JPEGs (docs/jobs.md), memory stays flat, and the run knows up front how
        much is left. Each location is taken at most once per run, even if two inputs overlap.
        """
        if selection not in SELECTIONS:
            raise UsageError(f"unknown input selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
        for item, sha in bounded_map(content_hash, items, workers, window=8 * workers):
            if stop is not None and stop.is_set():
                return
            pause_point("discovery")
            if item.location in self.hashes:
                continue
            self.hashes[item.location] = sha
            if self._wanted(bundle_identity, item.location, sha, selection):
                yield item
            else:
                self.skipped += 1

    def _wanted(self, bundle_identity: str, location: str, sha: str | None, selection: str) -> bool:
        row = self.db.execute(
            "SELECT outcome, sha256 FROM inputs WHERE bundle = ? AND location = ?", (bundle_identity, location)
        ).fetchone()
        if selection == "rescore":
            return True
        if selection == "retry-failed":
            return row is not None and row[0] == "failed"
        if row is None:
            return True
        outcome, recorded = row
        if outcome == "scored":
            return sha is None or sha != recorded  # unreadable now: let decode record why
        return selection != "skip-failed" or sha != recorded

    def recorder(self, run_id: str, bundle_identity: str) -> Recorder:
        return Recorder(self, run_id, bundle_identity)

    def record_skipped(self, run_id: str, bundle_identity: str, skipped: Iterable[Skipped]) -> None:
        """Store this run's set-aside objects in one transaction, replacing what the ledger held for them
        (a result scored by an earlier run under another allow-list is dropped, as the new rule says)."""
        self.ensure_present()
        now = utc_now()
        with self.db:
            for item in skipped:
                forget(self.db, bundle_identity, item.location)
                self.db.execute(
                    "INSERT INTO skipped_objects (bundle, location, category, reason, run_id, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (bundle_identity, item.location, item.category, item.reason, run_id, now),
                )

    # --- what was scored --------------------------------------------------------------------------
    def _scope(self, new_only: bool, alias: str) -> str:
        """SQL condition: rows from runs whose reports were never delivered (this one included)."""
        if not new_only:
            return ""
        return f" AND {alias}.run_id IN (SELECT run_id FROM runs WHERE status != 'done')"

    def scored(self, bundle_identity: str, new_only: bool = False) -> Iterator[Scored]:
        """Every image of every completely scored input, in a stable order, as scoring produced it."""
        query = (
            "SELECT i.location, i.frame, i.sha256, i.result, i.thumbnail FROM images i JOIN inputs s "
            "ON s.bundle = i.bundle AND s.location = i.location AND s.outcome = 'scored' "
            "WHERE i.bundle = ?" + self._scope(new_only, "i") + " ORDER BY i.location, i.frame"
        )
        for row in self.db.execute(query, (bundle_identity,)):
            yield decode_scored(*row)

    def failures(self, bundle_identity: str, new_only: bool = False) -> list[Failure]:
        rows = self._listed("s.location, s.stage, s.reason", "inputs s", "s.outcome = 'failed'", bundle_identity, new_only)
        return [Failure(*row) for row in rows]

    def skipped_objects(self, bundle_identity: str, new_only: bool = False) -> list[Skipped]:
        """What runs of this bundle set aside (skipped.csv), in location order."""
        rows = self._listed("s.location, s.reason, s.category", "skipped_objects s", "1", bundle_identity, new_only)
        return [Skipped(*row) for row in rows]

    def _listed(self, columns: str, table: str, condition: str, bundle_identity: str, new_only: bool) -> list[tuple]:
        """Rows of one bundle (those of undelivered runs only, with ``new_only``) in location order."""
        query = (f"SELECT {columns} FROM {table} WHERE s.bundle = ? AND {condition}" + self._scope(new_only, "s")
                 + " ORDER BY s.location")
        return self.db.execute(query, (bundle_identity,)).fetchall()


    # --- reviewer verdicts ------------------------------------------------------------------------
    def has_bundle(self, bundle_identity: str) -> bool:
        """Whether any run of this bundle identity used this ledger (a report's verdicts belong here)."""
        return self.db.execute("SELECT 1 FROM runs WHERE bundle = ? LIMIT 1", (bundle_identity,)).fetchone() is not None

    def latest_verdicts(self, bundle_identity: str) -> dict[str, Verdict]:
        """lesion id -> the lesion's latest verdict under this bundle identity."""
        rows = self.db.execute(
            "SELECT lesion_id, reviewer_class, reviewer, reviewer_note, recorded_at FROM verdicts v WHERE bundle = ? "
            "AND id = (SELECT max(id) FROM verdicts WHERE bundle = v.bundle AND lesion_id = v.lesion_id)",
            (bundle_identity,),
        )
        return {row[0]: Verdict(*row) for row in rows}

    def verdict_history(self, bundle_identity: str, lesion_id: str) -> list[Verdict]:
        """Every verdict recorded for one lesion, oldest first."""
        rows = self.db.execute(
            "SELECT lesion_id, reviewer_class, reviewer, reviewer_note, recorded_at FROM verdicts "
            "WHERE bundle = ? AND lesion_id = ? ORDER BY id", (bundle_identity, lesion_id))
        return [Verdict(*row) for row in rows]

    def record_verdicts(self, bundle_identity: str, verdicts: Iterable[Verdict], report: str) -> tuple[int, int, int]:
        """Append each verdict that differs from its lesion's latest, in one transaction (all or nothing).

        Returns (new, changed, unchanged): lesions without a verdict before, lesions whose verdict
        changed, and verdicts equal to the latest, which are not stored again.
        """
        self.ensure_present()
        latest = self.latest_verdicts(bundle_identity)
        counts: Counter[str] = Counter()
        now = utc_now()
        with self.db:
            for verdict in verdicts:
                before = latest.get(verdict.lesion_id)
                if before == verdict:
                    counts["unchanged"] += 1
                    continue
                counts["new" if before is None else "changed"] += 1
                self.db.execute(
                    "INSERT INTO verdicts (bundle, lesion_id, reviewer_class, reviewer, reviewer_note, report, "
                    "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (bundle_identity, verdict.lesion_id, verdict.reviewer_class, verdict.reviewer,
                     verdict.reviewer_note, report, now),
                )
        return counts["new"], counts["changed"], counts["unchanged"]

    def scoring_times(self, bundle_identity: str) -> dict[tuple[str, int | None], str]:
        """(location, frame) -> when the image was scored (UTC ISO 8601), for evaluation by month."""
        rows = self.db.execute("SELECT location, frame, scored_at FROM images WHERE bundle = ?", (bundle_identity,))
        return {(location, None if frame == NO_FRAME else frame): at for location, frame, at in rows}


class Recorder:
    """Collects results and writes them to the ledger one transaction per batch.

    Frames of one source arrive contiguously but may straddle two batches, so a multi-frame source is
    "open" until a result for another source (or the end of the stream, ``commit(final=True)``) shows it
    is complete; only then is its ``scored`` row written (a single-image file, frame None, at once). Opening a source first deletes its old rows, so changed
    content never leaves stale frames behind.
    """

    def __init__(self, ledger: Ledger, run_id: str, bundle_identity: str) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.bundle = bundle_identity
        self.results: list[Scored | Failure] = []
        self.batches = 0
        self.open: tuple[str, str] | None = None  # (location, sha256) of the source being filled
        self.opened: set[str] = set()  # sources whose old rows this run has already cleared

    @property
    def pending(self) -> int:
        return len(self.results)

    def add(self, result: Scored | Failure) -> None:
        self.results.append(result)

    def commit(self, final: bool = False) -> BatchStats:
        """Write the pending results in one transaction (the unit a SIGKILL can lose).

        ``final``: the stream has ended, so the open source is complete and is marked scored too.
        """
        db = self.ledger.db
        now = utc_now()
        images = failed = 0
        self.ledger.ensure_present()
        with db:
            for result in self.results:
                if isinstance(result, Failure):
                    self._forget(result.location)
                    db.execute(
                        "INSERT INTO inputs (bundle, location, sha256, outcome, stage, reason, frames, run_id, "
                        "updated_at) VALUES (?, ?, ?, 'failed', ?, ?, 0, ?, ?) ON CONFLICT (bundle, location) "
                        "DO UPDATE SET sha256 = excluded.sha256, outcome = 'failed', stage = excluded.stage, "
                        "reason = excluded.reason, frames = 0, run_id = excluded.run_id, "
                        "updated_at = excluded.updated_at",
                        (self.bundle, result.location, self.ledger.hashes.get(result.location), result.stage,
                         result.reason, self.run_id, now),
                    )
                    failed += 1
                    continue
                ref = result.ref
                if self.open is None or self.open[0] != ref.location:
                    self._close(now)
                    if ref.location not in self.opened:  # engines yield a source's frames together,
                        self._forget(ref.location)      # but never drop frames of this run if one did not
                        self.opened.add(ref.location)
                    self.open = (ref.location, ref.sha256)
                db.execute(
                    "INSERT INTO images (bundle, location, frame, sha256, result, thumbnail, run_id, scored_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle, location, frame) DO UPDATE SET "
                    "sha256 = excluded.sha256, result = excluded.result, thumbnail = excluded.thumbnail, "
                    "run_id = excluded.run_id, scored_at = excluded.scored_at",
                    (self.bundle, ref.location, NO_FRAME if ref.frame is None else ref.frame, ref.sha256,
                     encode_scored(result), ref.thumbnail, self.run_id, now),
                )
                images += 1
                if ref.frame is None:  # a single-image file is complete at once
                    self._close(now)
            if final:
                self._close(now)
            pause_point("commit")
        self.results.clear()
        self.batches += 1
        return BatchStats(self.batches, images, failed)

    def _forget(self, location: str) -> None:
        forget(self.ledger.db, self.bundle, location)

    def _close(self, now: str) -> None:
        if self.open is None:
            return
        location, sha = self.open
        self.ledger.db.execute(
            "INSERT INTO inputs (bundle, location, sha256, outcome, frames, run_id, updated_at) "
            "SELECT ?, ?, ?, 'scored', count(*), ?, ? FROM images WHERE bundle = ? AND location = ? "
            "ON CONFLICT (bundle, location) DO UPDATE SET sha256 = excluded.sha256, outcome = 'scored', "
            "stage = NULL, reason = NULL, frames = excluded.frames, run_id = excluded.run_id, "
            "updated_at = excluded.updated_at",
            (self.bundle, location, sha, self.run_id, now, self.bundle, location),
        )
        self.open = None


def forget(db: sqlite3.Connection, bundle_identity: str, location: str) -> None:
    """Drop everything the ledger holds about one location, before recording its new outcome."""
    for table in ("images", "inputs", "skipped_objects"):
        db.execute(f"DELETE FROM {table} WHERE bundle = ? AND location = ?", (bundle_identity, location))


def content_hash(item: Source | Failure) -> tuple[Source | Failure, str | None]:
    """sha256 of a source's bytes (None for discovery failures and unreadable sources)."""
    if isinstance(item, Failure):
        return item, None
    try:
        return item, hashlib.sha256(item.read()).hexdigest()
    except OSError:
        return item, None


def encode_scored(scored: Scored) -> str:
    return json.dumps(
        {
            "members": {name: np.asarray(p, dtype=np.float64).tolist() for name, p in scored.member_probabilities.items()},
            "lesion_id": scored.ref.lesion_id,
            "attributes": scored.ref.attributes,
            "quality": scored.ref.quality,
            **({"ood_score": scored.ood_score} if scored.ood_score is not None else {}),
        },
        default=str,  # DICOM values (PersonName, MultiValue) are kept as the text a report shows
    )


def decode_scored(location: str, frame: int, sha: str, result: str, thumbnail: bytes | None = None) -> Scored:
    data = json.loads(result)
    ref = ImageRef(
        location=location,
        sha256=sha,
        frame=None if frame == NO_FRAME else frame,
        attributes=data.get("attributes") or {},
        lesion_id=data.get("lesion_id"),
        thumbnail=thumbnail,
        quality=data.get("quality"),  # absent in rows written before quality was measured
    )
    members = {name: np.asarray(p, dtype=np.float64) for name, p in data["members"].items()}
    return Scored(ref, members, data.get("ood_score"))  # rows written before OOD scores read back as None


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the ledger database; synchronous=FULL so a committed batch survives power loss."""
    try:
        db = sqlite3.connect(path, timeout=30)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UsageError(
                f"the ledger {path} was written by a newer dermscore (schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade dermscore or use another --ledger."
            )
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as exc:
        if storage_errno(exc) is not None:
            raise  # the disk, not the database: open_ledger names it as an output problem
        raise UsageError(
            f"the ledger {path} cannot be used as a SQLite database ({exc}); move it away to start a new "
            "ledger, or pass --ledger PATH."
        ) from exc
    return db


@contextmanager
def open_ledger(path: Path, wait: float = 0.0) -> Iterator[Ledger]:
    """Lock, open and yield the ledger at ``path`` (its folder is created if missing)."""
    path = Path(path)
    with ledger_writes(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with ledger_lock(path, wait):
            db = connect(path)
            try:
                yield Ledger(path, db)
            finally:
                db.close()


# --- unattended runs ------------------------------------------------------------------------------


class EventLog:
    """JSON-lines log for schedulers and log shippers: one object per line, flushed at once."""

    def __init__(self, path: Path | None) -> None:
        self.handle: IO[str] | None = None
        self.path = path
        if path is not None:
            with file_writes(f"the event log {path}"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.handle = open(path, "a", encoding="utf-8")

    def event(self, name: str, **fields: Any) -> None:
        if self.handle is None:
            return
        with file_writes(f"the event log {self.path}"):
            self.handle.write(json.dumps({"time": utc_now(), "event": name, **fields}, default=str) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            with suppress(OSError):  # every event was flushed; only one whose write already failed is left
                self.handle.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def stop_requested() -> Iterator[threading.Event]:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current batch.

    A second signal raises KeyboardInterrupt at once; the ledger stays consistent either way because
    every batch is its own transaction. Outside the main thread signals cannot be caught, so the
    event is simply never set.
    """
    global _stop
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stop = stop
    try:
        yield stop
    finally:
        _stop = threading.Event()
        for sig, old in previous.items():
            signal.signal(sig, old)


PAUSE_ENV = "DERMSCORE_TEST_PAUSE_AT"
_pause_counts: Counter[str] = Counter()
_stop = threading.Event()  # the running job's stop request, so a paused run still honours SIGTERM


def pause_point(name: str) -> None:
    """Test hook for crash tests: ``DERMSCORE_TEST_PAUSE_AT=name[:n]`` makes the n-th arrival here sleep.

    Points: ``discovery`` (each input planned), ``models`` (before the members load; after SIGTERM the
    run goes on to load them), ``result`` (each result received, before its batch
    is committed), ``commit`` (inside a batch's transaction, before COMMIT), ``reports`` (scoring
    committed, reports not yet written). The process prints ``dermscore: paused at NAME`` to stderr
    and sleeps until killed (a test SIGKILLs a real run at a known point) or until SIGINT/SIGTERM asks
    it to stop (it then goes on and stops at the next batch boundary). Unset, it costs one lookup.
    """
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _pause_counts[name] += 1
    if _pause_counts[name] == int(nth or 1):
        print(f"dermscore: paused at {wanted} (pid {os.getpid()})", file=sys.stderr, flush=True)
        while not _stop.wait(60):
            pass
