"""Zip archives read in place: members are decompressed into memory one at a time, never extracted.

Because nothing is written to disk, a member named ``../../etc/passwd`` or ``/abs/path`` is only a
name in the report (``archive.zip!../../etc/passwd``), never a place. The guards are about memory:
the archive's declared uncompressed total is capped, so is each member's size and, for members big
enough to matter, its compression ratio (zip bombs). ``zipfile`` stops at each member's declared
size and checks its CRC, so an archive that lies about its sizes fails on read instead of flooding.
"""

from __future__ import annotations

import zipfile
import zlib
from functools import partial
from pathlib import Path

from dermscore.errors import InputError
from dermscore.records import DEFAULT_LESION_ATTRIBUTE, Source

MAX_ARCHIVE_BYTES = 16 * 2**30  # a clinic export of a few thousand DICOM images fits well inside
MAX_MEMBER_BYTES = 2**30  # one member is held in memory while it is decoded
MAX_RATIO = 100  # JPEG/PNG/compressed DICOM barely shrink; raw DICOM shrinks a few times, not 100x
RATIO_FLOOR = 2**20  # members under this cannot exhaust memory, whatever their ratio
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError)


class ZipArchive:
    """One open zip: its member list, the guards, and thread-safe member reads for Sources.

    ``zipfile`` serialises access to the underlying file, so decode threads can read members of one
    archive concurrently through a single open handle. Pickling drops the handle and the copy reopens
    the archive, so zip-member Sources can travel to other processes (the Ray engine).
    """

    def __init__(
        self,
        path: Path,
        max_total: int = MAX_ARCHIVE_BYTES,
        max_member: int = MAX_MEMBER_BYTES,
        max_ratio: float = MAX_RATIO,
    ) -> None:
        self.path = path
        self.max_member = max_member
        self.max_ratio = max_ratio
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"not a readable zip archive: {exc}", stage="discover") from exc
        self.members = sorted((i for i in self._zip.infolist() if not i.is_dir()), key=lambda i: i.filename)
        total = sum(i.file_size for i in self.members)
        if total > max_total:
            self._zip.close()
            raise InputError(
                f"refused: the archive would expand to {total:,} bytes, over the {max_total:,} byte cap "
                "(possible zip bomb); if it is genuine, unzip it and score the folder",
                stage="discover",
            )
        self.names = {i.filename: i for i in self.members}

    def __getstate__(self) -> dict[str, object]:
        return {key: value for key, value in self.__dict__.items() if key != "_zip"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._zip = zipfile.ZipFile(self.path)

    def location(self, name: str) -> str:
        return f"{self.path}!{name}"

    @staticmethod
    def split_location(location: str) -> tuple[Path, str]:
        """``location``'s inverse: (the archive's path, the member's name)."""
        path, name = location.split("!", 1)
        return Path(path), name

    def member_source(self, name: str, lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE) -> Source:
        """The Source of a member, read in place when scored (discovery, and the explain stage reading it again)."""
        return Source(self.location(name), partial(self.read, name), "zip-member", lesion_attribute)

    def problem(self, info: zipfile.ZipInfo) -> str | None:
        """Why a member is refused before any byte of it is decompressed, or None."""
        if info.flag_bits & 0x1:
            return "encrypted zip member: password-protected archives are not supported; unzip it with its password first"
        if info.file_size > self.max_member:
            return f"refused: member expands to {info.file_size:,} bytes, over the {self.max_member:,} byte cap"
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > self.max_ratio:
            return (
                f"refused: member compresses {ratio:,.0f}:1, over the {self.max_ratio:,.0f}:1 cap "
                "(possible zip bomb)"
            )
        return None

    def read(self, name: str, limit: int | None = None) -> bytes:
        """A member's bytes (at most ``limit``).

        Raises OSError like reading a file does (Source.read's contract), so every reader of Sources
        (decode, the ledger's hashing) handles a corrupt member as it handles an unreadable file.
        """
        try:
            with self._zip.open(name) as member:
                return member.read(-1 if limit is None else limit)
        except READ_ERRORS as exc:
            raise OSError(f"corrupt zip member: {exc}") from exc
