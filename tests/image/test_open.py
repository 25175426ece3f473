"""Opening images by their first bytes."""

from __future__ import annotations

import errno
import os
import struct
import sys
import types

import pytest

from collector.errors import ImageError, UsageError
from collector.image.elfcore import ElfCore
from collector.image.info import image_info
from collector.image.lime import LimeImage
from collector.image.open import open_image, sniff
from collector.image.raw import RawImage
from collector.image.reader import NativeImage
from collector.memory import Fate, PageFate

LIME = struct.pack("<IIQQ", 0x4C694D45, 1, 0x1000, 0x1FFF) + bytes(8) + b"\x5a" * 0x1000
ELF = (
    b"\x7fELF\x02\x01\x01\x00" + bytes(8)
    + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    + struct.pack("<IIQQQQQQ", 1, 7, 120, 0, 0x2000, 0x10, 0x10, 0)
    + b"\xa5" * 0x10
)  # fmt: skip


@pytest.fixture
def fake_native(monkeypatch):
    """Stand in for the native reader, to check that the opener hands it the path."""
    opened = []

    class NativeImage:
        def __init__(self, path):
            opened.append(path)

    module = types.ModuleType("collector.image.reader")
    module.NativeImage = NativeImage
    monkeypatch.setitem(sys.modules, "collector.image.reader", module)
    return opened


def test_lime_and_elf_are_sniffed(tmp_path):
    (tmp_path / "a").write_bytes(LIME)
    (tmp_path / "b").write_bytes(ELF)
    lime = open_image(tmp_path / "a")
    assert isinstance(lime, LimeImage)
    assert lime.read(0x1000, 2) == b"\x5a\x5a"
    elf = open_image(tmp_path / "b")
    assert isinstance(elf, ElfCore)
    assert elf.read(0x2000, 2) == b"\xa5\xa5"


@pytest.mark.parametrize(
    "head",
    [
        bytes.fromhex("28b52ffd"),  # zstd frame
        bytes.fromhex("502a4d18"),  # skippable frame 0x184D2A50 (the native HEADER)
        bytes.fromhex("5f2a4d18"),  # skippable frame 0x184D2A5F
    ],
)
def test_zstd_files_go_to_the_native_reader(tmp_path, fake_native, head):
    path = tmp_path / "x.lime.zst"
    path.write_bytes(head + bytes(60))
    img = open_image(path)
    assert type(img).__name__ == "NativeImage"
    assert fake_native == [path]


def test_sniff():
    assert sniff(b"EMiL\x01\0\0\0") == "lime"
    assert sniff(b"\x7fELF") == "elf"
    assert sniff(bytes.fromhex("602a4d18")) is None  # 0x184D2A60: past the skippable range
    assert sniff(bytes.fromhex("4f2a4d18")) is None  # 0x184D2A4F: before it
    assert sniff(b"EMi") is None


def test_unknown_format_message(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"MZ\x90\x00rest")
    with pytest.raises(ImageError) as e:
        open_image(path)
    assert str(e.value) == (
        f"{path}: not a memory image: it starts with 4d 5a 90 00 72 65 73 74, the magic of no "
        "format read here (collector image, LiME, AVML, ELF core, kdump-compressed); a raw memory "
        "file needs --image-format raw"
    )
    assert e.value.exit_code == 6


def test_empty_and_short_files(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"\x7fE")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'}: not a memory image: the file is empty"
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "short")
    assert "not a memory image: it starts with 7f 45, the magic of no format" in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "none")
    assert str(e.value) == f"{tmp_path / 'none'}: cannot open: No such file or directory"
    with pytest.raises(ImageError) as e:
        open_image(tmp_path)
    assert str(e.value) == f"{tmp_path}: cannot open: it is a directory, not an image file"
    assert e.value.exit_code == 5


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_bytes(LIME)

    real_open = os.open

    def refuse(name, *args, **kwargs):
        if os.fspath(name) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(name, *args, **kwargs)

    # Root reads files whatever their mode, so the refusal is simulated.
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError) as e:
        open_image(path)
    assert str(e.value) == f"{path}: cannot open: Permission denied"


def test_forced_formats(tmp_path):
    path = tmp_path / "pad.raw"
    path.write_bytes(b"\0" * 0x1000 + b"\x42" * 0x800)
    raw = open_image(path, fmt="raw")
    assert isinstance(raw, RawImage)
    assert raw.ranges() == [(0, 0x1800)]
    assert raw.read(0xFFE, 4) == b"\0\0\x42\x42"
    with pytest.raises(ImageError, match="not a memory image: not a LiME file: bad LiME magic"):
        open_image(path, fmt="lime")
    with pytest.raises(UsageError, match="unknown image format 'vmdk'"):
        open_image(path, fmt="vmdk")


def test_raw_image_with_ranges(tmp_path):
    path = tmp_path / "pad.raw"
    path.write_bytes(bytes(0x1000) + b"\x42" * 0x1000)
    img = RawImage(path, ranges=[(0x1000, 0x2000), (0x3000, 0x4000)])
    assert img.read(0x1000, 0x1000) == b"\x42" * 0x1000
    assert img.fate(0x0) == PageFate(Fate.OUTSIDE)
    assert img.fate(0x3000) == PageFate(Fate.MISSING)
    assert img.missing_ranges() == [(0x3000, 0x4000)]
    assert img.problems == ["range 0x3000-0x4000 lies beyond the end of the file (0x2000)"]


def test_fifos_and_devices_are_refused_at_once(tmp_path):
    """Opening a FIFO with no writer would block forever; /dev/zero has no end."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for opener in (open_image, lambda p: open_image(p, fmt="raw"), NativeImage, image_info):
        with pytest.raises(ImageError) as e:
            opener(fifo)
        assert str(e.value) == f"{fifo}: cannot open: it is a FIFO, not an image file"
    with pytest.raises(ImageError) as e:
        open_image("/dev/zero")
    assert str(e.value) == "/dev/zero: cannot open: it is a character device, not an image file"
