"""Discovery: turn the user's inputs into a stream of Sources, cheaply and in a stable order.

Nothing here decodes pixels. Folders are walked recursively in sorted order (so two runs list inputs
identically); anything that cannot even be listed (permissions, broken links, loops) becomes a
Failure rather than being skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

from dermscore.records import Failure, Source

RASTER_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp"})


def read_file(path: Path) -> bytes:
    return path.read_bytes()


def file_source(path: Path) -> Source:
    return Source(location=str(path), read=partial(read_file, path))


def is_candidate(path: Path) -> bool:
    """Raster images by extension, any case."""
    return path.suffix.lower() in RASTER_EXTENSIONS


def _walk(root: Path) -> Iterator[Source | Failure]:
    """Depth-first sorted walk that reports unreadable folders and broken or looping links."""
    seen_dirs: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Source | Failure]:
        try:
            stat = folder.stat()
        except OSError as exc:
            yield Failure(str(folder), "discover", f"cannot open folder: {exc.strerror or exc}")
            return
        key = (stat.st_dev, stat.st_ino)
        if key in seen_dirs:
            yield Failure(str(folder), "discover", "symbolic link loop: this folder was already visited")
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield Failure(str(folder), "discover", f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as exc:
                yield Failure(str(path), "discover", f"cannot inspect: {exc.strerror or exc}")
                continue
            if is_dir:
                yield from visit(path)
            elif is_file:
                if is_candidate(path):
                    yield file_source(path)
            elif entry.is_symlink() and is_candidate(path):
                yield Failure(str(path), "discover", "broken symbolic link: its target does not exist")

    yield from visit(root)


def discover(inputs: Iterable[Path]) -> Iterator[Source | Failure]:
    """Yield a Source per image file under each input (files are taken as given, whatever their name)."""
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield file_source(path)
        elif path.is_symlink():
            yield Failure(str(path), "discover", "broken symbolic link: its target does not exist")
        else:
            yield Failure(str(path), "discover", "no such file or folder")
