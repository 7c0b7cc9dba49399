"""The run ledger alone: real SQLite files, real file locks, real image files; no model needed."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_200
from dermscore.discover import discover, file_source
from dermscore.errors import LedgerBusyError, UsageError
from dermscore.ledger import EventLog, Ledger, decode_scored, encode_scored, lock_path, open_ledger
from dermscore.records import Failure, ImageRef, Scored

BUNDLE = "test-bundle@1#abc"


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((SMALL_200 / "images").glob("*.jpg"))[:6]:
        shutil.copy(path, folder / path.name)
    return folder


def scored(location: str, sha: str, frame: int | None = None, value: float = 0.5, **ref: object) -> Scored:
    probabilities = np.full(7, (1 - value) / 6)
    probabilities[0] = value
    return Scored(ImageRef(location, sha, frame, **ref), {"a": probabilities, "b": probabilities[::-1].copy()})


def record(ledger: Ledger, run_id: str, results: list[Scored | Failure], batch: int) -> None:
    recorder = ledger.recorder(run_id, BUNDLE)
    for i, result in enumerate(results, 1):
        recorder.add(result)
        if recorder.pending == batch and i < len(results):
            recorder.commit()
    recorder.commit(final=True)


def sha_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scored_records_round_trip_exactly_through_json() -> None:
    original = scored("a.dcm", "f" * 64, frame=3, value=0.1 + 1e-12, lesion_id="1.2.3",
                      attributes={"patient_id": "P1", "body_site": "back"}, thumbnail=b"\x89PNG")
    back = decode_scored("a.dcm", 3, "f" * 64, encode_scored(original), original.ref.thumbnail)
    assert back.ref == original.ref
    assert back.ref.attributes == original.ref.attributes and back.ref.thumbnail == b"\x89PNG"
    for name in ("a", "b"):
        assert np.array_equal(back.member_probabilities[name], original.member_probabilities[name])


def test_plan_skips_scored_unchanged_inputs_and_takes_new_and_changed_ones(images: Path, tmp_path: Path) -> None:
    files = sorted(images.iterdir())
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        run = ledger.begin_run(BUNDLE, "test")
        assert [s.location for s in ledger.plan(discover([images]), BUNDLE)] == [str(p) for p in files]
        record(ledger, run, [scored(str(p), sha_of(p)) for p in files[:4]], batch=3)
        ledger.end_run(run, "done")
    shutil.copy(files[5], files[1])  # content changed, same name
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        planned = [s.location for s in ledger.plan(discover([images]), BUNDLE)]
        assert planned == [str(files[1]), str(files[4]), str(files[5])]
        assert ledger.skipped == 3
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        assert len(list(ledger.plan(discover([images]), "other-bundle@2#def"))) == 6  # per bundle identity
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        assert len(list(ledger.plan(discover([images]), BUNDLE, "rescore"))) == 6


def test_failed_inputs_are_retried_by_default_skipped_or_retried_alone_on_request(images: Path, tmp_path: Path) -> None:
    files = sorted(images.iterdir())
    bad = images / "bad.jpg"
    bad.write_bytes(files[0].read_bytes()[:500])
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        run = ledger.begin_run(BUNDLE, "test")
        list(ledger.plan(discover([images]), BUNDLE))  # records the hashes the failure is stored with
        record(ledger, run, [Failure(str(bad), "decode", "truncated"), scored(str(files[0]), sha_of(files[0]))], 4)
        ledger.end_run(run, "done")
        assert ledger.failures(BUNDLE) == [Failure(str(bad), "decode", "truncated")]

    def plan(selection: str) -> list[str]:
        with open_ledger(tmp_path / "l.sqlite") as ledger:
            return [s.location for s in ledger.plan(discover([images]), BUNDLE, selection)]

    everything_but_scored = [str(p) for p in sorted(images.iterdir()) if p != files[0]]
    assert plan("default") == everything_but_scored
    assert plan("retry-failed") == [str(bad)]
    assert plan("skip-failed") == [p for p in everything_but_scored if p != str(bad)]
    bad.write_bytes(files[0].read_bytes())  # fixed: its content changed, so even skip-failed takes it
    assert str(bad) in plan("skip-failed")


def test_a_source_split_across_batches_counts_only_once_complete(tmp_path: Path) -> None:
    """Frames 0-2 of a DICOM committed, then the run dies: the source must be scored again, not kept half."""
    frames = [scored("multi.dcm", "1" * 64, frame=i) for i in range(5)]
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        run = ledger.begin_run(BUNDLE, "test")
        recorder = ledger.recorder(run, BUNDLE)
        for frame in frames[:3]:
            recorder.add(frame)
        recorder.commit()  # then SIGKILL: no further commit
        assert ledger.db.execute("SELECT count(*) FROM images").fetchone()[0] == 3
        assert list(ledger.scored(BUNDLE)) == []  # an incomplete source is never reported
        assert ledger._wanted(BUNDLE, "multi.dcm", "1" * 64, "default")
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        run = ledger.begin_run(BUNDLE, "test")
        record(ledger, run, [*frames, scored("single.jpg", "2" * 64)], batch=2)
        got = [(s.ref.location, s.ref.frame) for s in ledger.scored(BUNDLE)]
        assert got == [("multi.dcm", i) for i in range(5)] + [("single.jpg", None)]
        assert ledger.db.execute("SELECT frames FROM inputs WHERE location = 'multi.dcm'").fetchone() == (5,)
        assert not ledger._wanted(BUNDLE, "multi.dcm", "1" * 64, "default")


def test_rescoring_changed_content_leaves_no_stale_frames_or_failures(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        first = ledger.begin_run(BUNDLE, "test")
        record(ledger, first, [scored("x.dcm", "1" * 64, frame=i) for i in range(4)]
               + [Failure("y.jpg", "decode", "corrupt")], batch=3)
        ledger.end_run(first, "done")
        second = ledger.begin_run(BUNDLE, "test")
        record(ledger, second, [scored("x.dcm", "2" * 64, frame=i, value=0.9) for i in range(2)]
               + [scored("y.jpg", "3" * 64)], batch=3)
        images = list(ledger.scored(BUNDLE))
        assert [(s.ref.location, s.ref.frame, s.ref.sha256) for s in images] == [
            ("x.dcm", 0, "2" * 64), ("x.dcm", 1, "2" * 64), ("y.jpg", None, "3" * 64)]
        assert ledger.failures(BUNDLE) == []
        assert images[0].member_probabilities["a"][0] == pytest.approx(0.9)


def test_report_new_holds_only_what_no_finished_run_reported(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        done = ledger.begin_run(BUNDLE, "test")
        record(ledger, done, [scored("a.jpg", "1" * 64), Failure("f.jpg", "read", "gone")], batch=4)
        ledger.end_run(done, "done")
        killed = ledger.begin_run(BUNDLE, "test")
        record(ledger, killed, [scored("b.jpg", "2" * 64)], batch=4)  # then died: status stays running
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        now = ledger.begin_run(BUNDLE, "test")
        assert ledger.db.execute("SELECT status FROM runs WHERE run_id = ?", (killed,)).fetchone() == ("killed",)
        record(ledger, now, [scored("c.jpg", "3" * 64)], batch=4)
        assert [s.ref.location for s in ledger.scored(BUNDLE, new_only=True)] == ["b.jpg", "c.jpg"]
        assert [s.ref.location for s in ledger.scored(BUNDLE)] == ["a.jpg", "b.jpg", "c.jpg"]
        assert ledger.failures(BUNDLE, new_only=True) == []
        assert [f.location for f in ledger.failures(BUNDLE)] == ["f.jpg"]


def test_the_same_file_given_twice_is_planned_once(images: Path, tmp_path: Path) -> None:
    one = sorted(images.iterdir())[0]
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        planned = list(ledger.plan([file_source(one), *discover([images])], BUNDLE))
    assert len(planned) == 6 and planned[0].location == str(one)


def test_a_second_process_on_the_same_ledger_gets_ledger_busy_after_waiting(tmp_path: Path) -> None:
    ledger_file = tmp_path / "l.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from dermscore.ledger import open_ledger\n"
         f"with open_ledger({str(ledger_file)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(LedgerBusyError) as caught:
            with open_ledger(ledger_file, wait=0.5):
                pass
        assert time.monotonic() - started >= 0.5
        message = str(caught.value)
        assert str(ledger_file) in message and f"pid {holder.pid}" in message and "--wait" in message
        assert caught.value.exit_code == 5
    finally:
        holder.kill()
        holder.wait()
    with open_ledger(ledger_file, wait=5):  # the kernel dropped the dead holder's lock
        assert "pid" in lock_path(ledger_file).read_text()


def test_a_file_that_is_not_a_ledger_is_refused_with_advice(tmp_path: Path) -> None:
    bogus = tmp_path / "l.sqlite"
    bogus.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(UsageError, match="move it away"):
        with open_ledger(bogus):
            pass


def test_a_ledger_from_a_newer_dermscore_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(UsageError, match="newer dermscore"):
        with open_ledger(path):
            pass


def test_the_ledger_uses_write_ahead_logging(tmp_path: Path) -> None:
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        assert ledger.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_event_log_appends_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    for n in range(2):
        with EventLog(path) as log:
            log.event("batch_commit", batch=n, location=Path("x"))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e["batch"], e["location"]) for e in events] == [("batch_commit", 0, "x"), ("batch_commit", 1, "x")]
    assert all(e["time"].endswith("+00:00") for e in events)


def test_frames_of_one_source_arriving_apart_are_all_kept(tmp_path: Path) -> None:
    """Engines yield a source's frames together; if one ever did not, no frame may be dropped."""
    stream = [scored("x.dcm", "1" * 64, 0), scored("x.dcm", "1" * 64, 1), scored("y.jpg", "2" * 64),
              scored("x.dcm", "1" * 64, 2)]
    with open_ledger(tmp_path / "l.sqlite") as ledger:
        record(ledger, ledger.begin_run(BUNDLE, "test"), stream, batch=2)
        assert [(s.ref.location, s.ref.frame) for s in ledger.scored(BUNDLE)] == [
            ("x.dcm", 0), ("x.dcm", 1), ("x.dcm", 2), ("y.jpg", None)]
        assert ledger.db.execute("SELECT frames FROM inputs WHERE location = 'x.dcm'").fetchone() == (3,)
