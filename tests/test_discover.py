"""Discovery on real folders: DICOM by content, DICOMDIR file-sets, links, unreadable and odd files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

import dicom_fixtures as fx
from dermscore.decode import decode_source
from dermscore.discover import discover
from dermscore.errors import InputError
from dermscore.records import Failure, Skipped, Source


@pytest.fixture(scope="module")
def jpegs() -> list[Path]:
    return fx.real_jpegs(4)


def split(items: list) -> tuple[list[Source], list[Skipped], list[Failure]]:
    return ([i for i in items if isinstance(i, Source)], [i for i in items if isinstance(i, Skipped)],
            [i for i in items if isinstance(i, Failure)])


def test_dicom_is_found_by_content_whatever_its_name_and_non_images_are_counted(
    jpegs: list[Path], tmp_path: Path
) -> None:
    rgb = fx.load_rgb(jpegs[0])
    for name in ("IM000001", "photo.dcm", "PHOTO2.DCM", "misnamed.txt.bak"):
        fx.native(rgb, tmp_path / "study" / name)
    fx.non_image(tmp_path / "study" / "SR000001")
    fx.non_image(tmp_path / "study" / "PR000001", fx.GRAYSCALE_PR)
    shutil.copy(jpegs[1], tmp_path / "lesion.JPG")
    (tmp_path / "notes.txt").write_text("clinic notes")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "README").write_text("export from clinic X")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._lesion.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")

    sources, skipped, failures = split(list(discover([tmp_path])))
    assert sorted(Path(s.location).name for s in sources) == [
        "IM000001", "PHOTO2.DCM", "lesion.JPG", "misnamed.txt.bak", "photo.dcm"]
    assert sorted((Path(s.location).name, s.reason) for s in skipped) == [
        ("PR000001", "not an image: Grayscale Softcopy Presentation State Storage"),
        ("SR000001", "not an image: Basic Text SR Storage"),
    ]
    assert failures == []
    for source in sources:
        assert len(decode_source(source)) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the '..' file ID component, on purpose
def test_dicomdir_references_are_scored_once_and_escapes_are_refused(jpegs: list[Path], tmp_path: Path) -> None:
    media = tmp_path / "media"
    rgb = fx.load_rgb(jpegs[0])
    fx.native(rgb, media / "IMAGES" / "IM1")
    fx.native(rgb, media / "IMAGES" / "IM2")
    fx.non_image(media / "SR" / "SR1")
    fx.native(rgb, tmp_path / "OUTSIDE")
    (media / "IMAGES" / "LINKOUT").symlink_to(tmp_path / "OUTSIDE")
    entries = [
        fx.FileSetEntry(("IMAGES", "IM1"), "IMAGE", fx.DERMOSCOPIC),
        fx.FileSetEntry(("IMAGES", "IM2"), "IMAGE", fx.DERMOSCOPIC),
        fx.FileSetEntry(("IMAGES", "IM1"), "IMAGE", fx.DERMOSCOPIC),  # listed twice: still once
        fx.FileSetEntry(("SR", "SR1"), "SR DOCUMENT", fx.BASIC_TEXT_SR),
        fx.FileSetEntry(("..", "OUTSIDE"), "IMAGE", fx.DERMOSCOPIC),
        fx.FileSetEntry(("IMAGES", "LINKOUT"), "IMAGE", fx.DERMOSCOPIC),
        fx.FileSetEntry(("IMAGES", "GONE"), "IMAGE", fx.DERMOSCOPIC),
    ]
    fx.dicomdir(media / "DICOMDIR", entries)

    sources, skipped, failures = split(list(discover([media])))  # the folder walk meets IM1/IM2 again
    assert [(Path(s.location).relative_to(media).as_posix(), s.kind) for s in sources] == [
        ("IMAGES/IM1", "dicomdir-ref"), ("IMAGES/IM2", "dicomdir-ref")]
    assert [Path(s.location).name for s in skipped] == ["DICOMDIR", "SR1"]
    reasons = {f.location.split(" -> ")[1]: f.reason for f in failures}
    assert reasons == {
        "../OUTSIDE": "refused: the DICOMDIR references a file outside its own folder",
        "IMAGES/LINKOUT": "refused: the referenced file links outside the DICOMDIR's folder",
        "IMAGES/GONE": "referenced by the DICOMDIR but missing",
    }
    # given the DICOMDIR file itself, the same file-set
    again, _, _ = split(list(discover([media / "DICOMDIR"])))
    assert [s.location for s in again] == [s.location for s in sources]


def test_a_dicomdir_written_by_dcmtk_is_read_as_a_file_set(jpegs: list[Path], tmp_path: Path) -> None:
    """Another tool's file-set (dcmtk's img2dcm, dcmodify and dcmmkdir; Debian package ``dcmtk``)."""
    if shutil.which("dcmmkdir") is None:
        pytest.skip("dcmtk is not installed (apt-get install dcmtk): no third-party DICOMDIR writer")
    (tmp_path / "IMAGES").mkdir()
    for i, jpeg in enumerate(jpegs[:2], start=1):
        subprocess.run(["img2dcm", str(jpeg), f"IMAGES/IM{i}"], cwd=tmp_path, check=True, capture_output=True)
    identity = ["-i", "(0008,0060)=XC", "-i", "(0010,0020)=P1", "-i", "(0020,0010)=1", "-i", "(0020,0011)=1",
                "-i", "(0020,0013)=1"]  # what the General Purpose USB profile requires and img2dcm leaves out
    subprocess.run(["dcmodify", "-nb", *identity, "IMAGES/IM1", "IMAGES/IM2"], cwd=tmp_path, check=True,
                   capture_output=True)
    subprocess.run(["dcmmkdir", "+r", "-Pfl", "+I", "IMAGES/"], cwd=tmp_path, check=True, capture_output=True)
    sources, skipped, failures = split(list(discover([tmp_path])))
    assert sorted((Path(s.location).name, s.kind) for s in sources) == [("IM1", "dicomdir-ref"), ("IM2", "dicomdir-ref")]
    assert [Path(s.location).name for s in skipped] == ["DICOMDIR"] and failures == []
    for source in sources:
        number = int(Path(source.location).name[-1])
        np.testing.assert_array_equal(decode_source(source)[0].rgb, fx.load_rgb(jpegs[number - 1]))


def test_each_file_is_listed_once_across_overlapping_inputs_and_links(jpegs: list[Path], tmp_path: Path) -> None:
    shutil.copy(jpegs[0], tmp_path / "a.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "same.jpg").symlink_to(tmp_path / "a.jpg")
    items = list(discover([tmp_path, tmp_path / "a.jpg", tmp_path / "sub" / "same.jpg"]))
    assert [i.location for i in items] == [str(tmp_path / "a.jpg")]


def test_broken_links_loops_empty_and_unreadable_files_become_failures(jpegs: list[Path], tmp_path: Path) -> None:
    shutil.copy(jpegs[0], tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "EMPTY").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")  # plainly not an image: no noise
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "IM_SOCKET"))  # a file nobody, not even root, can open for reading
    try:
        sources, skipped, failures = split(list(discover([tmp_path, tmp_path / "missing"])))
    finally:
        sock.close()
    by_name = {Path(f.location).name: f for f in failures}
    assert by_name["broken.jpg"].reason == "broken symbolic link: its target does not exist"
    assert by_name["loop1"].reason == by_name["loop2"].reason == "symbolic link loop: the link resolves back to itself"
    assert by_name["up"].reason == "symbolic link loop: this folder was already visited"
    assert by_name["missing"].reason == "no such file or folder"
    assert set(by_name) == {"broken.jpg", "loop1", "loop2", "up", "missing"}  # a socket in a folder: passed over
    assert sorted(Path(s.location).name for s in sources) == ["EMPTY", "empty.jpg", "good.jpg"]
    assert skipped == []
    for source in sources:
        if Path(source.location).name.lower().startswith("empty"):
            with pytest.raises(InputError, match="empty"):
                decode_source(source)


def test_a_file_that_cannot_be_read_or_is_not_a_file_is_reported(tmp_path: Path) -> None:
    """/proc/self/mem is a regular file that fails to read at offset 0 (EIO), even for root."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        failures = list(discover([Path("/proc/self/mem"), tmp_path / "sock"]))
    finally:
        sock.close()
    assert [(f.stage, f.reason) for f in failures] == [
        ("read", "cannot read file: Input/output error"),
        ("discover", "not a regular file or folder"),
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode (CI runs as root)")
def test_permission_denied_is_reported(jpegs: list[Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked.jpg"
    shutil.copy(jpegs[0], locked)
    locked.chmod(0)
    try:
        failures = [i for i in discover([tmp_path]) if isinstance(i, Failure)]
    finally:
        locked.chmod(0o644)
    assert [(f.location, f.stage) for f in failures] == [(str(locked), "read")]
    assert "Permission denied" in failures[0].reason


def test_sniffing_prefers_content_over_the_name(jpegs: list[Path], tmp_path: Path) -> None:
    """A PNG named .jpg and a JPEG with no extension are both images; the decode matches the content."""
    from PIL import Image

    Image.open(jpegs[0]).save(tmp_path / "really_png.jpg", "PNG")
    shutil.copy(jpegs[1], tmp_path / "NOEXT")
    sources = [i for i in discover([tmp_path]) if isinstance(i, Source)]
    assert sorted(Path(s.location).name for s in sources) == ["NOEXT", "really_png.jpg"]
    decoded = {Path(s.location).name: decode_source(s)[0].rgb for s in sources}
    np.testing.assert_array_equal(decoded["really_png.jpg"], fx.load_rgb(jpegs[0]))
    np.testing.assert_array_equal(decoded["NOEXT"], fx.load_rgb(jpegs[1]))
