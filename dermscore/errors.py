"""One small exception hierarchy, so the CLI can map every failure to a message and an exit code.

The library raises these; only ``cli.py`` turns them into exit codes (sqlite-utils style).
"""

from __future__ import annotations


class DermscoreError(Exception):
    """Base class: a problem the user can act on; the message says what and what to do."""

    exit_code = 1


class UsageError(DermscoreError):
    """Bad options or inputs given on the command line or in a job file."""

    exit_code = 2


class BundleError(DermscoreError):
    """A model bundle is missing, malformed, or its weights do not match their recorded hash."""

    exit_code = 4


class LedgerBusyError(DermscoreError):
    """Another run holds the ledger; two runs on one ledger would double-count results."""

    exit_code = 5


class OutputError(DermscoreError):
    """The reports, the ledger or the event log cannot be written: a full disk, a read-only or vanished
    folder. Nothing committed is lost; the message names the path and what to do (dermscore.storage)."""

    exit_code = 7


class InputError(DermscoreError):
    """One input cannot be scored; the run records it in errors.csv and goes on.

    ``stage`` names the pipeline stage that failed (read, decode, ...) so a reviewer knows where to look.
    """

    def __init__(self, message: str, stage: str = "decode") -> None:
        super().__init__(message)
        self.stage = stage
