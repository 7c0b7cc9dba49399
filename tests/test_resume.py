"""Crash safety of real `dermscore run` processes: kill -9 at known points, rerun, compare.

A run is paused at a named point with the documented test hook ``DERMSCORE_TEST_PAUSE_AT`` (see
``dermscore.ledger.pause_point``) and then killed or signalled; the rerun must end with the same
results as an uninterrupted run, each input exactly once.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_200
from dermscore.bundle import CLASS_CODES
from processes import finish, start_cli, wait_until_paused

N_IMAGES = 20
BATCH = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "incoming"
    folder.mkdir()
    for path in sorted((SMALL_200 / "images").glob("*.jpg"))[:N_IMAGES]:
        shutil.copy(path, folder / path.name)
    return folder


def start(out: Path, inputs: Path, bundle: Path, *extra: str, pause: str | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    args = ["run", str(inputs), "--model", str(bundle), "--out", str(out), "--batch-size", str(BATCH), "--overwrite",
            "--log-json", str(out / "log.jsonl"), *extra]
    return start_cli(args, out / "stderr.txt", pause, TF_CPP_MIN_LOG_LEVEL="3")


def events(out: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == name]


def ledger_count(out: Path, sql: str) -> int:
    db = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def results(out: Path) -> pd.DataFrame:
    table = pd.read_csv(out / "images.csv")
    assert not table["source"].duplicated().any(), "an input was counted twice"
    return table.set_index("source").sort_index()


@pytest.fixture(scope="module")
def baseline(inputs: Path, small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("baseline")
    code, stdout = finish(start(out, inputs, small_bundle))
    assert code == 0, (out / "stderr.txt").read_text()
    table = results(out)
    assert len(table) == N_IMAGES
    return table


def assert_same_results(out: Path, baseline: pd.DataFrame) -> None:
    table = results(out)
    assert list(table.index) == list(baseline.index)
    np.testing.assert_allclose(table[list(CLASS_CODES)], baseline[list(CLASS_CODES)], atol=1e-6)
    assert list(table["sha256"]) == list(baseline["sha256"])
    assert pd.read_csv(out / "errors.csv").empty


@pytest.mark.parametrize(
    ("point", "committed"),
    [
        ("discovery:3", 0),  # while planning what to score: nothing written yet
        ("result:6", BATCH),  # mid-batch: the first batch committed, the second in flight
        ("commit:2", BATCH),  # inside the second batch's transaction, before COMMIT: rolled back
        ("reports", N_IMAGES),  # everything scored, reports not yet written
    ],
)
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_result(
    point: str, committed: int, inputs: Path, small_bundle: Path, baseline: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start(out, inputs, small_bundle, pause=point)
    wait_until_paused(proc, out / "stderr.txt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ledger_count(out, "SELECT count(*) FROM images") == committed
    assert not (out / "images.csv").exists()

    code, stdout = finish(start(out, inputs, small_bundle))
    assert code == 0, (out / "stderr.txt").read_text()
    assert events(out, "run_start")[-1]["pending"] == N_IMAGES - committed  # nothing scored twice
    assert_same_results(out, baseline)
    assert ledger_count(out, "SELECT count(*) FROM runs WHERE status = 'killed'") == 1
    assert ledger_count(out, "SELECT count(*) FROM inputs WHERE outcome = 'scored'") == N_IMAGES


def test_sigterm_stops_after_the_current_batch_and_says_how_to_resume(
    inputs: Path, small_bundle: Path, baseline: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start(out, inputs, small_bundle, pause="result:6")
    wait_until_paused(proc, out / "stderr.txt")
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc)
    assert code == 6
    assert "Run the same command again to resume" in (out / "stderr.txt").read_text()
    assert ledger_count(out, "SELECT count(*) FROM images") == 2 * BATCH  # the batch in flight was finished
    assert ledger_count(out, "SELECT count(*) FROM runs WHERE status = 'interrupted'") == 1
    assert events(out, "run_end")[-1]["status"] == "interrupted"
    assert not (out / "images.csv").exists()

    code, _ = finish(start(out, inputs, small_bundle))
    assert code == 0
    assert events(out, "run_start")[-1]["pending"] == N_IMAGES - 2 * BATCH
    assert_same_results(out, baseline)


def test_a_second_run_on_a_busy_ledger_exits_5_or_waits_its_turn(
    inputs: Path, small_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    holder = start(out, inputs, small_bundle, pause="discovery:1")
    wait_until_paused(holder, out / "stderr.txt")
    began = time.monotonic()
    code, _ = finish(start(out, inputs, small_bundle, "--wait", "1"))
    assert code == 5
    assert time.monotonic() - began >= 1
    message = (out / "stderr.txt").read_text()
    assert f"the ledger {out / 'ledger.sqlite'} is in use by another dermscore run (pid {holder.pid}" in message
    holder.kill()
    holder.wait()

    first = start(out, inputs, small_bundle)  # a normal run, and a second one that waits for it
    deadline = time.monotonic() + 60
    while f"pid {first.pid}," not in (out / "ledger.sqlite.lock").read_text():
        assert time.monotonic() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    second = start(out, inputs, small_bundle, "--wait", "300")
    assert finish(first)[0] == 0 and finish(second)[0] == 0
    first_start, second_start = events(out, "run_start")[-2:]
    assert first_start["pending"] == N_IMAGES and second_start["pending"] == 0
    assert second_start["skipped"] == N_IMAGES
    assert len(results(out)) == N_IMAGES
