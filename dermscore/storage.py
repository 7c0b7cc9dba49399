"""Storage failures as one line each: a full disk, a read-only or vanished folder, an unreadable model.

What dermscore writes (the ledger, the reports, the event log) goes through ``file_writes`` or
``ledger_writes``, which turn the operating system's or SQLite's error into an ``OutputError`` (exit 7)
naming the path, the cause and what to do; ``member_reads`` does the same for model files (a
``BundleError``, exit 4). Nothing is lost: results live in the ledger, committed batch by batch, and a
batch whose commit fails is rolled back whole, so the rerun scores exactly what is missing.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dermscore.bundle import Bundle
from dermscore.errors import BundleError, DermscoreError, OutputError

RERUN = "then run the same command again: what the ledger holds is kept and not scored twice"
# SQLite primary result codes that mean the file system, not the database, is the problem.
SQLITE_STORAGE = {3: errno.EACCES, 8: errno.EROFS, 10: errno.EIO, 13: errno.ENOSPC, 14: errno.ENOENT}
CAUSES = {
    errno.ENOSPC: ("the disk is full", "free space there or choose a folder on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space there or choose a folder on another disk"),
    errno.EROFS: ("the file system is read-only", "remount it read-write or choose a writable folder"),
    errno.EACCES: ("permission denied", "make the folder writable for this user or choose another one"),
    errno.EPERM: ("permission denied", "make the folder writable for this user or choose another one"),
    errno.ENOENT: ("the folder is gone (deleted or unmounted)", "restore or mount it, or choose another one"),
    errno.ENOTDIR: ("the folder is gone (deleted or unmounted)", "restore or mount it, or choose another one"),
    errno.ESTALE: ("the network share went away", "mount it again or choose another folder"),
}


def cause(code: int | None, strerror: str | None) -> tuple[str, str]:
    """(what went wrong, what to do) for an errno, in words a user acts on."""
    return CAUSES.get(code or 0, (strerror or "input/output error", "check the disk and its mount"))


def storage_errno(exc: sqlite3.Error) -> int | None:
    """The errno a SQLite error stands for when the file system is the problem, else None."""
    return SQLITE_STORAGE.get(getattr(exc, "sqlite_errorcode", 0) & 0xFF)


def output_error(target: str, code: int | None, strerror: str | None, alternative: str = "") -> OutputError:
    """One line: what could not be written, why, what to do, and that a rerun loses and doubles nothing."""
    problem, remedy = cause(code, strerror)
    return OutputError(f"cannot write {target}: {problem}. {remedy.capitalize()}{alternative}, {RERUN}.")


@contextmanager
def file_writes(target: str) -> Iterator[None]:
    """Writing ``target`` (e.g. "the reports in OUT"): an OSError becomes an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        raise output_error(target, exc.errno, exc.strerror) from exc


@contextmanager
def ledger_writes(path: Path) -> Iterator[None]:
    """Using the ledger at ``path``: SQLite's storage errors and OSErrors (its lock file) become an
    OutputError naming it; SQLite rolls the failed transaction back, so the ledger stays consistent."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = storage_errno(exc)
        if code is None:
            raise
        raise output_error(f"the ledger {path}", code, str(exc), " (or pass --ledger)") from exc
    except OSError as exc:
        raise output_error(f"the ledger {path}", exc.errno, exc.strerror, " (or pass --ledger)") from exc


def same_file(path: Path, identity: tuple[int, int]) -> bool:
    """Whether ``path`` is still the file (device, inode) ``identity`` names: an open SQLite file that was
    deleted or whose folder was unmounted goes on accepting writes that no later run will see."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == identity


@contextmanager
def member_reads(bundle: Bundle) -> Iterator[None]:
    """Loading the members after ``verify_bundle`` passed: a member file that cannot be read now (a
    vanished mount, a deleted file) becomes a BundleError naming it, whatever the loader raised."""
    try:
        yield
    except DermscoreError:
        raise
    except Exception:
        for member in bundle.members:
            file = bundle.member_path(member)
            try:
                with open(file, "rb") as handle:
                    handle.read(1)
            except OSError as exc:
                problem, remedy = cause(exc.errno, exc.strerror)
                raise BundleError(
                    f"cannot read the model file {file} of bundle {bundle.name} during the run: {problem}. "
                    f"{remedy.capitalize()} (`dermscore models {bundle.name}` checks it), {RERUN}."
                ) from exc
        raise
