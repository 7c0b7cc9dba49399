"""Discovery: turn the user's inputs into a stream of Sources, cheaply and in a stable order.

Nothing here decodes pixels. A file's kind comes from its first 132 bytes (``decode.sniff``), so
DICOM is found whatever its name; DICOM files also have their first 16 KiB read (the file meta group
and the dataset up to Modality) to set aside as Skipped non-image objects (structured reports,
presentation states) and objects the modality gate keeps out (CT, MR, ...; ``dermscore.gate.modality``),
and to open DICOMDIRs as file-sets. Zip archives are listed in place, never extracted.

Folders are walked recursively in sorted order (two runs list inputs identically), a folder's DICOMDIR
first so the images it references are claimed before the walk meets them; every file is yielded at
most once, however many inputs, links or DICOMDIRs lead to it. Anything that cannot be listed or
read (permissions, broken links, loops, a reference escaping its file-set) becomes a Failure;
hidden files and plainly-not-image files are passed over without noise.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from dermscore.decode import HEAD_BYTES, sniff
from dermscore.errors import InputError
from dermscore.gate.modality import ModalityGate
from dermscore.records import DEFAULT_LESION_ATTRIBUTE, Failure, Skipped, Source

if TYPE_CHECKING:
    from dermscore.decode.archives import ZipArchive
    from dermscore.decode.dicom import Header

RASTER_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp"})
# Names that promise an image: when their content is not one, decode says why in errors.csv.
IMAGE_LIKE_EXTENSIONS = RASTER_EXTENSIONS | {".dcm", ".dicom", ".dic", ".zip"}
META_BYTES = 16 * 1024  # a DICOM file meta group is a few hundred bytes; Modality follows within 1 KiB or so
DICOMDIR_CATEGORY = "DICOMDIR"

Item = Source | Failure | Skipped
Located = tuple[Source, Callable[[], bytes]]  # a DICOMDIR reference, and how to read its first META_BYTES


def read_file(path: Path) -> bytes:
    return path.read_bytes()


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def file_source(path: Path, kind: str = "file", lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE) -> Source:
    return Source(location=str(path), read=partial(read_file, path), kind=kind, lesion_attribute=lesion_attribute)


def is_candidate(path: Path) -> bool:
    """Whether the name promises an image (raster, DICOM or zip), whatever its content."""
    return path.suffix.lower() in IMAGE_LIKE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Dotfiles and macOS resource forks (``._x.jpg``, ``__MACOSX/``): copies' debris, never images."""
    return any((part.startswith(".") and part not in (".", "..")) or part == "__MACOSX"
               for part in PurePosixPath(name).parts)


def format_of(name: str, head: bytes) -> str | None:
    """``dicom``/``zip``/``raster`` by content; an image-like name or an empty extensionless file is
    taken as ``raster`` so decode reports why it is unreadable; None: not for us, say nothing."""
    found = sniff(head)
    if found:
        return found
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in IMAGE_LIKE_EXTENSIONS or (suffix == "" and not head):
        return "raster"
    return None


def link_problem(path: Path) -> str:
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: the link resolves back to itself"
        return "broken symbolic link: its target does not exist"
    return "cannot inspect this entry"


def escapes(relative: str) -> bool:
    return relative == ".." or relative.startswith(("../", "/"))


class Discovery:
    """One run's discovery: remembers what was yielded so each file is scored once."""

    def __init__(self, lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE, gate: ModalityGate | None = None) -> None:
        self.lesion_attribute = lesion_attribute
        self.gate = gate or ModalityGate()
        self.seen: set[tuple[int, int]] = set()
        self.seen_dirs: set[tuple[int, int]] = set()

    def claim(self, path: Path) -> bool:
        """True the first time a file (by device and inode, so links count as the same file) is met."""
        stat = path.stat()
        key = (stat.st_dev, stat.st_ino)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def inputs(self, inputs: Iterable[Path]) -> Iterator[Item]:
        for raw in inputs:
            path = Path(raw)
            if path.is_dir():
                yield from self.folder(path)
            elif path.is_file():
                yield from self.file(path, explicit=True)
            elif path.is_symlink():
                yield Failure(str(path), "discover", link_problem(path))
            elif path.exists():
                yield Failure(str(path), "discover", "not a regular file or folder")
            else:
                yield Failure(str(path), "discover", "no such file or folder")

    def folder(self, folder: Path) -> Iterator[Item]:
        """Depth-first sorted walk that reports unreadable folders and broken or looping links."""
        try:
            stat = folder.stat()
        except OSError as exc:
            yield Failure(str(folder), "discover", f"cannot open folder: {exc.strerror or exc}")
            return
        key = (stat.st_dev, stat.st_ino)
        if key in self.seen_dirs:
            yield Failure(str(folder), "discover", "symbolic link loop: this folder was already visited")
            return
        self.seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: (e.name != "DICOMDIR", e.name))
        except OSError as exc:
            yield Failure(str(folder), "discover", f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as exc:
                reason = link_problem(path) if entry.is_symlink() else f"cannot inspect: {exc.strerror or exc}"
                yield Failure(str(path), "discover", reason)
                continue
            if is_dir:
                yield from self.folder(path)
            elif is_file:
                yield from self.file(path, explicit=False)
            elif entry.is_symlink() and (is_candidate(path) or path.suffix == ""):
                yield Failure(str(path), "discover", link_problem(path))

    def file(self, path: Path, explicit: bool) -> Iterator[Item]:
        try:
            if not self.claim(path):
                return
            head = read_head(path)
        except OSError as exc:
            if explicit or is_candidate(path) or path.suffix == "":
                yield Failure(str(path), "read", f"cannot read file: {exc.strerror or exc}")
            return
        found = format_of(path.name, head) or ("raster" if explicit else None)
        if found == "zip":
            yield from self.archive(path)
        elif found == "dicom":
            yield from self.dicom(str(path), lambda: read_head(path, META_BYTES), partial(read_file, path),
                                  "file", partial(self.locate_file, path.parent))
        elif found == "raster":
            yield file_source(path, lesion_attribute=self.lesion_attribute)

    def dicom(
        self,
        location: str,
        meta_head: Callable[[], bytes],
        read: Callable[[], bytes],
        kind: str,
        locate: Callable[[str], Located | None],
    ) -> Iterator[Item]:
        """A DICOM object: an image Source, a Skipped object, or (a DICOMDIR) its file-set."""
        from dermscore.decode.dicom import MEDIA_STORAGE_DIRECTORY

        header = dicom_header(meta_head)
        if header.sop_class == MEDIA_STORAGE_DIRECTORY:
            yield from self.fileset(location, read, locate)
            return
        yield self.classify(Source(location, read, kind, self.lesion_attribute), header)

    def classify(self, source: Source, header: Header) -> Source | Skipped:
        """The source itself, or a Skipped when it is no image or the modality gate keeps it out."""
        from dermscore.decode.dicom import sop_class_skip_reason

        reason = sop_class_skip_reason(header.sop_class) if header.sop_class else None
        if reason:
            return Skipped(source.location, reason)
        refused = self.gate.refuse(header.sop_class, header.modality)
        if refused:
            code, reason = refused
            return Skipped(source.location, reason, f"modality {code}")
        return source

    def fileset(self, location: str, read: Callable[[], bytes], locate: Callable[[str], Located | None]) -> Iterator[Item]:
        """A DICOMDIR's referenced files, each claimed so the walk does not score it again."""
        from dermscore.decode.dicom import MEDIA_STORAGE_DIRECTORY, fileset_references, sop_class_skip_reason

        try:
            references = fileset_references(read())
        except (InputError, OSError) as exc:
            yield Failure(location, "discover", str(exc))
            return
        yield Skipped(location, sop_class_skip_reason(MEDIA_STORAGE_DIRECTORY) or "", DICOMDIR_CATEGORY)
        for reference in references:
            where = f"{location} -> {reference.path}"
            if escapes(reference.path):
                yield Failure(where, "discover", "refused: the DICOMDIR references a file outside its own folder")
                continue
            try:
                located = locate(reference.path)
            except InputError as exc:
                yield Failure(where, exc.stage, str(exc))
                continue
            if located is None:
                continue  # listed twice, or already met through another input
            source, head = located
            if reference.skip_reason:
                yield Skipped(source.location, reference.skip_reason)
            else:
                yield self.classify(source, dicom_header(head))

    def locate_file(self, root: Path, relative: str) -> Located | None:
        """A DICOMDIR reference on disk; refused when a link takes it outside the file-set's folder."""
        path = root / relative
        if not path.is_file():
            raise InputError("referenced by the DICOMDIR but missing", stage="discover")
        first_time = self.claim(path)  # refused or not, the walk must not take it up again
        if not path.resolve().is_relative_to(root.resolve()):
            raise InputError("refused: the referenced file links outside the DICOMDIR's folder", stage="discover")
        if not first_time:
            return None
        return file_source(path, "dicomdir-ref", self.lesion_attribute), partial(read_head, path, META_BYTES)

    def archive(self, path: Path) -> Iterator[Item]:
        """A zip's members, read in place; a DICOMDIR inside claims its members like on disk."""
        from dermscore.decode.archives import ZipArchive

        try:
            archive = ZipArchive(path)
        except InputError as exc:
            yield Failure(str(path), exc.stage, str(exc))
            return
        claimed: set[str] = set()
        members = [i for i in archive.members if not is_hidden(i.filename)]
        members.sort(key=lambda i: (PurePosixPath(i.filename).name != "DICOMDIR", i.filename))
        for info in members:
            name = info.filename
            if name in claimed:
                continue
            claimed.add(name)
            location = archive.location(name)
            problem = archive.problem(info)
            if problem:
                yield Failure(location, "read", problem)
                continue
            try:
                head = archive.read(name, HEAD_BYTES)
            except OSError as exc:
                yield Failure(location, "read", str(exc))
                continue
            found = format_of(name, head)
            read = partial(archive.read, name)
            if found == "zip":
                yield Failure(location, "discover", "a zip inside a zip is not opened; unzip the outer archive first")
            elif found == "dicom":
                locate = partial(self.locate_member, archive, posixpath.dirname(name), claimed)
                yield from self.dicom(location, partial(archive.read, name, META_BYTES), read, "zip-member", locate)
            elif found == "raster":
                yield archive.member_source(name, self.lesion_attribute)

    def locate_member(self, archive: ZipArchive, folder: str, claimed: set[str], relative: str) -> Located | None:
        """A DICOMDIR reference inside a zip: the member at that path under the DICOMDIR's folder."""
        name = posixpath.normpath(posixpath.join(folder, relative)) if folder else relative
        if name not in archive.names:
            raise InputError("referenced by the DICOMDIR but missing from the archive", stage="discover")
        if name in claimed:
            return None
        claimed.add(name)
        problem = archive.problem(archive.names[name])
        if problem:
            raise InputError(problem, stage="read")
        return archive.member_source(name, self.lesion_attribute), partial(archive.read, name, META_BYTES)


def dicom_header(head: Callable[[], bytes]) -> Header:
    """SOP class and Modality from a DICOM file's first bytes; empty when they cannot be read (decode
    then says what is wrong with the file)."""
    from dermscore.decode.dicom import Header, read_header

    try:
        return read_header(head())
    except OSError:
        return Header("", "")


def discover(
    inputs: Iterable[Path], lesion_attribute: str = DEFAULT_LESION_ATTRIBUTE, gate: ModalityGate | None = None
) -> Iterator[Item]:
    """Yield a Source per image under each input, a Skipped per DICOM object that is not scored (no
    image, or a modality ``gate`` keeps out), and a Failure per input that cannot be listed or read
    (files given directly are taken whatever their name)."""
    yield from Discovery(lesion_attribute, gate).inputs(inputs)
