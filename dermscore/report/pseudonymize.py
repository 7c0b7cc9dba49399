"""``--pseudonymize``: replace patient identifiers in report rows with a keyed hash.

HMAC-SHA256 with a secret key, not a plain hash: DICOM identifiers are short and structured, so an
unkeyed hash could be reversed by hashing every plausible value. The same key maps the same identifier
to the same pseudonym, so reports of different runs can still be joined by whoever holds the key; a
different key gives unlinkable pseudonyms. The key comes from a file (``--pseudonym-key-file``) or the
``DERMSCORE_PSEUDONYM_KEY`` environment variable, never from the command line, because the command line
is recorded in the workbook's Run sheet and visible to other users of the machine. Without a key the run
is refused rather than writing identifiers in clear.

Replaced: patient_id, study/series/SOP instance UIDs, and lesion ids that come from DICOM series or a
lesion map. Kept: file paths (``source``), study date, modality and body site; keep identifying
information out of file names and folders when reports leave the clinic.

The rest of the DICOM header that rows carry for the SR (``SOURCE_HEADER``) follows the same rule: the
patient's name becomes the patient pseudonym, birth date, sex, study time, study ID, accession number and
referring physician are emptied, the SOP class is kept. In the SR a pseudonym UID is written as
``pseudonym_uid`` turns it into a valid UID (``2.25.`` and the pseudonym's 80 bits as a decimal), so the
SR and the CSV stay joinable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermscore.aggregate import LESION_FROM_IMAGE, SOURCE_HEADER
from dermscore.errors import UsageError

KEY_ENV = "DERMSCORE_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
PSEUDONYM_PREFIX = "psn-"
PSEUDONYMIZED = ("patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid")
HEADER_CLEARED = ("patient_birth_date", "patient_sex", "study_time", "study_id", "accession_number",
                  "referring_physician_name")
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): a number under this root needs no registered prefix


def load_key(key_file: Path | None = None) -> bytes:
    """The key from ``key_file`` (trailing newline ignored), else from the environment; refuses none or short."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"--pseudonym-key-file {key_file}: cannot read the key ({exc.strerror or exc}).") from exc
        where = f"--pseudonym-key-file {key_file}"
    else:
        key = os.environ.get(KEY_ENV, "").encode("utf-8")
        where = f"${KEY_ENV}"
        if not key:
            raise UsageError(
                f"--pseudonymize needs a secret key: pass --pseudonym-key-file PATH or set {KEY_ENV}. "
                "Create one with e.g. `openssl rand -hex 32 > pseudonym.key` and keep it private."
            )
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"{where}: the pseudonym key has {len(key)} bytes; use at least {MIN_KEY_BYTES}.")
    return key


def pseudonym(value: str, key: bytes) -> str:
    """A stable, keyed stand-in for ``value``: 'psn-' and 20 hex digits (80 bits) of HMAC-SHA256."""
    return PSEUDONYM_PREFIX + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def pseudonymize_row(row: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """A copy of an image row with identifiers replaced; lesion ids named after an image stay (they are paths)."""
    out = dict(row)
    for column in PSEUDONYMIZED:
        if out.get(column) not in (None, ""):
            out[column] = pseudonym(str(out[column]), key)
    if out.get("lesion_source") != LESION_FROM_IMAGE and out.get("lesion_id") not in (None, ""):
        out["lesion_id"] = pseudonym(str(out["lesion_id"]), key)
    if out.get(SOURCE_HEADER):
        header = {name: ("" if name in HEADER_CLEARED else value) for name, value in out[SOURCE_HEADER].items()}
        if header.get("patient_name"):
            header["patient_name"] = f"{out['patient_id']}^" if out.get("patient_id") else ""  # family name only
        out[SOURCE_HEADER] = header
    return out


def pseudonym_uid(value: str) -> str:
    """A UID for a report value: a pseudonym as ``2.25.<its 80 bits in decimal>``, any other value unchanged.

    Reversible into the CSV's pseudonym (``psn-`` + the same bits in hex), so every UID in a pseudonymised
    SR can be traced to its report row, and deterministic, so the same key gives the same UIDs every run.
    """
    if value.startswith(PSEUDONYM_PREFIX):
        return UID_ROOT + str(int(value[len(PSEUDONYM_PREFIX):], 16))
    return value
