"""Clean failures with nothing lost, on real file system conditions: a full tmpfs, a read-only bind
mount, an output folder or model folder whose file system goes away mid-run.

Each failing run must end with one `error:` line naming the path and what to do and its own exit code
(7 for output, 4 for the model); the rerun, once the condition is gone, must end with every input in
the reports and in the ledger exactly once, and must not score again what the ledger already held.
Mounting needs root (CI runs as root); elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import SMALL_200
from dermscore.cli import app
from processes import finish, start_cli, wait_until_paused

N_IMAGES = 6
BATCH = "2"


def _can_mount() -> str:
    """Why real mounts cannot be made here ('' when they can)."""
    with tempfile.TemporaryDirectory() as folder:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot mount a tmpfs here ({made.stderr.strip()}); these tests need root (CI runs as root)"
        subprocess.run(["umount", folder], check=True)
    return ""


pytestmark = pytest.mark.skipif(bool(shutil.which("mount") is None or _can_mount()),
                                reason=shutil.which("mount") and _can_mount() or "no mount command")


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points made by a test, unmounted afterwards (lazily, as some are gone already)."""
    made: list[Path] = []
    yield made
    for folder in reversed(made):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def tmpfs(mounts: list[Path], tmp_path: Path) -> Callable[[str, str], Path]:
    def make(name: str, size: str = "1m") -> Path:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        return folder

    return make


def read_only(folder: Path, mounts: list[Path]) -> None:
    """A read-only bind mount of ``folder`` onto itself (chmod does not stop root)."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    mounts.append(folder)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write zeros until the file system says it is full; returns the filler to delete later."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sorted((SMALL_200 / "images").glob("*.jpg"))[:N_IMAGES]:
        shutil.copy(path, folder / path.name)
    return folder


def run_args(inputs: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    """Runs on ONNX Runtime once the session's cache holds the export: no TensorFlow start-up per process."""
    return ["run", str(inputs), "--model", str(bundle), "--out", str(out), "--batch-size", BATCH, "--overwrite",
            *extra]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_complete(out: Path, ledger: Path, inputs: Path) -> None:
    """Every input once in images.csv and in the ledger."""
    table = pd.read_csv(out / "images.csv")
    assert sorted(map(str, table["source"])) == sorted(str(p) for p in inputs.iterdir())
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*), count(DISTINCT location) FROM images").fetchone() == (N_IMAGES, N_IMAGES)
        assert db.execute("SELECT count(*) FROM inputs WHERE outcome = 'scored'").fetchone()[0] == N_IMAGES
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def rows_of_first_run(ledger: Path) -> int:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        first = db.execute("SELECT run_id FROM runs ORDER BY started_at LIMIT 1").fetchone()[0]
        return db.execute("SELECT count(*) FROM images WHERE run_id = ?", (first,)).fetchone()[0]
    finally:
        db.close()


def test_ledger_on_a_disk_that_fills_mid_run_loses_no_committed_batch(
    small_bundle: Path, inputs: Path, tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmpfs("out", "1m")
    stderr = tmp_path / "stderr.txt"
    proc = start_cli(run_args(inputs, small_bundle, out), stderr, pause="commit:2")
    wait_until_paused(proc, stderr)  # inside the second batch's transaction, the first one committed
    filler = fill(out)
    proc.send_signal(signal.SIGTERM)  # go on: the commit meets the full disk
    code, _ = finish(proc)
    (line,) = error_lines(stderr.read_text())
    assert code == 7, stderr.read_text()
    assert f"cannot write the ledger {out / 'ledger.sqlite'}: the disk is full" in line and "free space" in line.lower()
    filler.unlink()
    rerun = CliRunner().invoke(app, run_args(inputs, small_bundle, out))
    assert rerun.exit_code == 0, rerun.output
    assert_complete(out, out / "ledger.sqlite", inputs)
    assert rows_of_first_run(out / "ledger.sqlite") == int(BATCH)  # the committed batch was kept, not rescored


def test_reports_on_a_full_disk_fail_cleanly_and_the_rerun_only_writes_them(
    small_bundle: Path, inputs: Path, tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmpfs("out", "1m")
    ledger = tmp_path / "ledger.sqlite"
    filler = fill(out)
    failed = CliRunner().invoke(app, run_args(inputs, small_bundle, out, "--ledger", str(ledger)))
    assert failed.exit_code == 7, failed.output
    (line,) = error_lines(failed.output)
    assert f"cannot write the reports in {out}: the disk is full" in line
    filler.unlink()
    rerun = CliRunner().invoke(app, run_args(inputs, small_bundle, out, "--ledger", str(ledger)))
    assert rerun.exit_code == 0, rerun.output
    assert "scored 0 image(s)" in rerun.output and f"{N_IMAGES} unchanged input(s)" in rerun.output
    assert_complete(out, ledger, inputs)


def test_event_log_on_a_full_disk_is_named(small_bundle: Path, inputs: Path, tmpfs: Callable[..., Path],
                                           tmp_path: Path) -> None:
    logs = tmpfs("logs", "64k")
    fill(logs)
    failed = CliRunner().invoke(app, run_args(inputs, small_bundle, tmp_path / "out", "--log-json", str(logs / "x.jsonl")))
    assert failed.exit_code == 7, failed.output
    (line,) = error_lines(failed.output)
    assert f"cannot write the event log {logs / 'x.jsonl'}: the disk is full" in line


@pytest.mark.parametrize("ledger_inside", [True, False], ids=["ledger-in-out", "ledger-elsewhere"])
def test_read_only_output_folder(
    ledger_inside: bool, small_bundle: Path, inputs: Path, mounts: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ledger = out / "ledger.sqlite" if ledger_inside else tmp_path / "ledger.sqlite"
    read_only(out, mounts)
    args = run_args(inputs, small_bundle, out, "--ledger", str(ledger))
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 7, failed.output
    (line,) = error_lines(failed.output)
    what = f"the ledger {ledger}" if ledger_inside else f"the reports in {out}"
    assert f"cannot write {what}: the file system is read-only" in line and "writable" in line
    subprocess.run(["mount", "-o", "remount,rw,bind", str(out)], check=True)
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert f"scored {N_IMAGES if ledger_inside else 0} image(s)" in rerun.output
    assert_complete(out, ledger, inputs)


def test_output_folder_unmounted_mid_run_is_noticed_before_results_vanish(
    small_bundle: Path, inputs: Path, tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmpfs("out", "4m")
    stderr = tmp_path / "stderr.txt"
    proc = start_cli(run_args(inputs, small_bundle, out), stderr, pause="result:3")
    wait_until_paused(proc, stderr)  # one batch committed to the ledger in `out`
    subprocess.run(["umount", "-l", str(out)], check=True)  # like a share going away: open files live on
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc)
    (line,) = error_lines(stderr.read_text())
    assert code == 7, stderr.read_text()
    assert f"the ledger {out / 'ledger.sqlite'} was deleted or its folder unmounted" in line
    rerun = CliRunner().invoke(app, run_args(inputs, small_bundle, out))  # now on the folder underneath
    assert rerun.exit_code == 0, rerun.output
    assert_complete(out, out / "ledger.sqlite", inputs)


def test_model_file_unreadable_mid_run(
    small_bundle: Path, inputs: Path, tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    models = tmpfs("models", "4m")
    bundle = models / "bundle"
    shutil.copytree(small_bundle, bundle)
    out = tmp_path / "out"
    out.mkdir()
    stderr = tmp_path / "stderr.txt"
    proc = start_cli(run_args(inputs, bundle, out, "--backend", "keras"), stderr, pause="models")
    wait_until_paused(proc, stderr)  # the bundle was verified; its members are not loaded yet
    subprocess.run(["umount", "-l", str(models)], check=True)
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc)
    (line,) = error_lines(stderr.read_text())
    assert code == 4, stderr.read_text()
    assert f"cannot read the model file {bundle / 'a.keras'}" in line and "deleted or unmounted" in line
    tmpfs("models", "4m")
    shutil.copytree(small_bundle, bundle)
    rerun = CliRunner().invoke(app, run_args(inputs, bundle, out))
    assert rerun.exit_code == 0, rerun.output
    assert_complete(out, out / "ledger.sqlite", inputs)
