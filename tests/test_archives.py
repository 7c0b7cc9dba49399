"""Zip archives read in place, zip bombs and bad inputs; and a whole `dermscore run` over all of them."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import UID
from typer.testing import CliRunner

import dicom_fixtures as fx
from dermscore.cli import app
from dermscore.decode import decode_source
from dermscore.decode.archives import ZipArchive
from dermscore.discover import discover
from dermscore.errors import InputError
from dermscore.records import Failure, Skipped, Source

BOMB_BYTES = 24 * 2**20  # zeros: deflate shrinks them about 1000:1


@pytest.fixture(scope="module")
def jpegs() -> list[Path]:
    return fx.real_jpegs(6)


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def clinic_export(jpeg: Path, tmp: Path) -> dict[str, bytes]:
    """A DICOMDIR media export: two images in one series, one structured report, nested folders."""
    rgb = fx.load_rgb(jpeg)
    series = "1.2.826.0.1.3680043.8.498.77"
    fx.native(rgb, tmp / "IM1", series=series, patient="PAT-9")
    fx.native(np.flipud(rgb).copy(), tmp / "IM2", series=series, patient="PAT-9")
    fx.non_image(tmp / "SR1")
    fx.dicomdir(tmp / "DICOMDIR", [fx.FileSetEntry(("IMAGES", "IM1"), "IMAGE", fx.DERMOSCOPIC),
                                   fx.FileSetEntry(("IMAGES", "IM2"), "IMAGE", fx.DERMOSCOPIC),
                                   fx.FileSetEntry(("SR", "SR1"), "SR DOCUMENT", fx.BASIC_TEXT_SR)])
    where = {"IM1": "IMAGES/IM1", "IM2": "IMAGES/IM2", "SR1": "SR/SR1", "DICOMDIR": "DICOMDIR"}
    return {f"export/{member}": (tmp / name).read_bytes() for name, member in where.items()}


def set_encrypted_flag(path: Path) -> None:
    """Mark every member as encrypted (zipfile cannot write encrypted members; this is what it reads)."""
    data = bytearray(path.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + flag_offset] |= 0x1
            start += 4
    path.write_bytes(bytes(data))


def test_zip_with_nested_folders_and_a_dicomdir_is_read_in_place(jpegs: list[Path], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    members = clinic_export(jpegs[0], scratch)
    members["photos/2024/lesion.jpg"] = jpegs[1].read_bytes()
    members["photos/notes.txt"] = b"not an image"
    members["__MACOSX/photos/._lesion.jpg"] = b"\x00\x05\x16\x07"
    archive = make_zip(tmp_path / "clinic.zip", members)
    items = list(discover([archive]))
    sources = [i for i in items if isinstance(i, Source)]
    assert [(s.location, s.kind) for s in sources] == [
        (f"{archive}!export/IMAGES/IM1", "zip-member"), (f"{archive}!export/IMAGES/IM2", "zip-member"),
        (f"{archive}!photos/2024/lesion.jpg", "zip-member")]
    assert [i.location for i in items if isinstance(i, Skipped)] == [
        f"{archive}!export/DICOMDIR", f"{archive}!export/SR/SR1"]
    assert not [i for i in items if isinstance(i, Failure)]
    frames = [decode_source(s)[0] for s in sources]
    np.testing.assert_array_equal(frames[0].rgb, fx.load_rgb(jpegs[0]))
    np.testing.assert_array_equal(frames[2].rgb, fx.load_rgb(jpegs[1]))
    assert frames[0].ref.lesion_id == frames[1].ref.lesion_id == "1.2.826.0.1.3680043.8.498.77"
    assert frames[0].ref.attributes["patient_id"] == "PAT-9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clinic.zip", "scratch"]  # nothing extracted
    # member Sources travel to other processes (the Ray engine pickles them) and still read there
    copy = pickle.loads(pickle.dumps(sources[2]))
    assert copy.location == sources[2].location and copy.read() == jpegs[1].read_bytes()


def test_traversal_names_are_only_names(jpegs: list[Path], tmp_path: Path) -> None:
    names = ["../../escape.jpg", "/etc/absolute.jpg", "a/../../up.jpg", "C:\\windows\\drive.jpg"]
    archive = make_zip(tmp_path / "in" / "evil.zip", {n: jpegs[0].read_bytes() for n in names})
    sources = [i for i in discover([archive]) if isinstance(i, Source)]
    assert sorted(s.location.split("!", 1)[1] for s in sources) == sorted(names)
    for source in sources:
        np.testing.assert_array_equal(decode_source(source)[0].rgb, fx.load_rgb(jpegs[0]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.zip", "in"]


def test_zip_bombs_encrypted_nested_and_corrupt_members_are_refused(jpegs: list[Path], tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.png": bytes(BOMB_BYTES), "ok.jpg": jpegs[0].read_bytes()})
    items = list(discover([bomb]))
    assert [i.location for i in items if isinstance(i, Source)] == [f"{bomb}!ok.jpg"]
    (refused,) = [i for i in items if isinstance(i, Failure)]
    assert refused.location == f"{bomb}!zeros.png" and "over the 100:1 cap (possible zip bomb)" in refused.reason

    total = BOMB_BYTES + jpegs[0].stat().st_size
    with pytest.raises(InputError, match=f"would expand to {total:,} bytes, over the 1,000,000 byte cap"):
        ZipArchive(bomb, max_total=1_000_000)

    locked = make_zip(tmp_path / "locked.zip", {"secret.jpg": jpegs[0].read_bytes()})
    set_encrypted_flag(locked)
    (failure,) = discover([locked])
    assert failure.location == f"{locked}!secret.jpg" and failure.reason.startswith("encrypted zip member")

    outer = make_zip(tmp_path / "outer.zip", {"inner.zip": bomb.read_bytes()})
    (nested,) = discover([outer])
    assert "zip inside a zip" in nested.reason

    corrupt = make_zip(tmp_path / "corrupt.zip", {"bad.jpg": jpegs[0].read_bytes()}, zipfile.ZIP_STORED)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored JPEG: the CRC no longer matches
    corrupt.write_bytes(bytes(data))
    (member,) = discover([corrupt])  # small members are read whole at once: the CRC fails in discovery
    assert isinstance(member, Failure) and member.reason == "corrupt zip member: Bad CRC-32 for file 'bad.jpg'"

    cut = tmp_path / "cut.zip"
    cut.write_bytes(bomb.read_bytes()[:100])
    (unreadable,) = discover([cut])
    assert unreadable.reason.startswith("not a readable zip archive")


def test_run_over_archives_dicom_and_broken_files_scores_each_good_image_once(
    small_bundle: Path, jpegs: list[Path], tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rgb = fx.load_rgb(jpegs[0])
    inbox.mkdir()
    shutil.copy(jpegs[0], inbox / "good.jpg")
    fx.native(rgb, inbox / "dicom" / "IM0001", frames=2)
    fx.non_image(inbox / "dicom" / "SR0001")
    (inbox / "notes.txt").write_text("clinic notes")
    make_zip(inbox / "clinic.zip", clinic_export(jpegs[1], scratch))
    make_zip(inbox / "evil.zip", {"../../escape.jpg": jpegs[2].read_bytes(), "/abs.jpg": jpegs[3].read_bytes()})
    make_zip(inbox / "bomb.zip", {"zeros.png": bytes(BOMB_BYTES), "fine.jpg": jpegs[4].read_bytes()})
    set_encrypted_flag(make_zip(inbox / "locked.zip", {"secret.jpg": jpegs[5].read_bytes()}))

    broken = inbox / "broken"
    broken.mkdir()
    jpeg_bytes, png = jpegs[1].read_bytes(), io.BytesIO()
    Image.open(jpegs[1]).save(png, "PNG")
    (broken / "truncated.jpg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 3])
    (broken / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    dicom = (inbox / "dicom" / "IM0001").read_bytes()
    (broken / "TRUNCDCM").write_bytes(dicom[: len(dicom) // 2])
    no_pixels = dcmread(inbox / "dicom" / "IM0001")
    del no_pixels.PixelData
    no_pixels.save_as(broken / "NOPIXELS")
    fx.encapsulated([b"\x00\x00\x01\xb3" + bytes(60)], dcmread(inbox / "dicom" / "IM0001"), broken / "MPEG",
                    UID("1.2.840.10008.1.2.4.100"))
    Image.new("1", (12_000, 10_000)).save(broken / "huge.png")  # 120 megapixels in a few kB
    (broken / "dangling.jpg").symlink_to(broken / "gone.jpg")
    (broken / "loop").symlink_to(broken / "loop")

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(inbox), "--model", str(small_bundle), "--out", str(out),
                                      "--no-progress", "--lesion-attribute", "PatientID"])
    assert result.exit_code == 3, result.output
    assert "skipped 3 DICOM object(s) that are not skin photographs" in result.output  # loose SR, DICOMDIR, SR in the zip

    images = pd.read_csv(out / "images.csv", dtype={"frame": "Int64"})
    scored = sorted(zip(images["source"], images["frame"].fillna(0)))
    assert scored == sorted([
        (f"{inbox}/bomb.zip!fine.jpg", 0),
        (f"{inbox}/clinic.zip!export/IMAGES/IM1", 1),
        (f"{inbox}/clinic.zip!export/IMAGES/IM2", 1),
        (f"{inbox}/dicom/IM0001", 1),
        (f"{inbox}/dicom/IM0001", 2),
        (f"{inbox}/evil.zip!../../escape.jpg", 0),
        (f"{inbox}/evil.zip!/abs.jpg", 0),
        (f"{inbox}/good.jpg", 0),
    ])
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs.jpg").exists()
    clinic = images[images["source"].str.startswith(f"{inbox}/clinic.zip!")]
    assert list(clinic["patient_id"]) == list(clinic["lesion_id"]) == ["PAT-9", "PAT-9"]  # --lesion-attribute

    errors = pd.read_csv(out / "errors.csv")
    reasons = dict(zip(errors["source"], errors["reason"]))
    expected = {
        f"{inbox}/bomb.zip!zeros.png": "possible zip bomb",
        f"{inbox}/locked.zip!secret.jpg": "encrypted zip member",
        f"{broken}/truncated.jpg": "truncated",
        f"{broken}/truncated.png": "truncated",
        f"{broken}/zero.jpg": "empty (0 bytes)",
        f"{broken}/garbage.png": "not a recognised image",
        f"{broken}/TRUNCDCM": "truncated",
        f"{broken}/NOPIXELS": "no pixel data",
        f"{broken}/MPEG": "unsupported transfer syntax",
        f"{broken}/huge.png": "decompression bomb",
        f"{broken}/dangling.jpg": "broken symbolic link",
        f"{broken}/loop": "symbolic link loop",
    }
    assert sorted(reasons) == sorted(expected)
    for source, phrase in expected.items():
        assert phrase in reasons[source], (source, reasons[source])
