"""LiME reader, streaming checker and header writer, on hand-packed files and hostile bytes."""

from __future__ import annotations

import io
import itertools
import struct
import subprocess
import time

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import ImageError
from collector.image.lime import LimeImage, LimeRange, iter_lime_ranges, write_lime_header
from collector.memory import Fate, PageFate, PageNotCaptured, PhysicalMemory


def header(start: int, end: int, magic: int = 0x4C694D45, version: int = 1) -> bytes:
    """A LiME header packed by hand from the LiME spec, independent of the module."""
    return struct.pack("<IIQQ", magic, version, start, end) + b"\0" * 8


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


A = pattern(0x2000, 1)  # 0x1000-0x2fff
B = pattern(0x1000, 2)  # 0x3000-0x3fff, adjacent to A
C = pattern(0x1800, 3)  # 0x10000-0x117ff, after a gap
GOOD = header(0x1000, 0x2FFF) + A + header(0x3000, 0x3FFF) + B + header(0x10000, 0x117FF) + C


def test_write_lime_header_matches_spec():
    assert write_lime_header(0x1000, 0x2FFF) == (
        b"EMiL"
        + b"\x01\0\0\0"
        + bytes.fromhex("0010000000000000")
        + bytes.fromhex("ff2f000000000000")
        + bytes(8)
    )
    assert write_lime_header(5, 5) == header(5, 5)
    with pytest.raises(ValueError):
        write_lime_header(0x2000, 0x1FFF)
    with pytest.raises(ValueError):
        write_lime_header(0, 1 << 64)


def test_reads_ranges_and_bytes(tmp_path):
    path = tmp_path / "m.lime"
    path.write_bytes(GOOD)
    with LimeImage(path) as img:
        assert isinstance(img, PhysicalMemory)
        assert img.metadata == {"format": "lime"}
        assert img.problems == []
        assert img.ranges() == [(0x1000, 0x3000), (0x3000, 0x4000), (0x10000, 0x11800)]
        assert img.missing_ranges() == []
        assert img.lime_ranges[2] == LimeRange(0x10000, 0x117FF, 32 * 3 + 0x3000, 0x1800)
        assert img.read(0x1000, 16) == A[:16]
        assert img.read(0x2FF0, 0x20) == A[-16:] + B[:16]  # across two adjacent ranges
        assert img.read(0x117F0, 16) == C[-16:]
        assert img.read(0x5000, 0) == b""
        assert img.fate(0x3FFF) == PageFate(Fate.READ)
        assert img.fate(0x4000) == PageFate(Fate.OUTSIDE)
        assert img.fate(0xFFF) == PageFate(Fate.OUTSIDE)
        assert img.blob("vmcoreinfo") is None
        with pytest.raises(PageNotCaptured) as e:
            img.read(0x3FF0, 0x20)  # runs into the gap after B
        assert (e.value.paddr, e.value.fate) == (0x4000, Fate.OUTSIDE)
        with pytest.raises(PageNotCaptured) as e:
            img.read(0x11800, 1)
        assert e.value.fate == Fate.OUTSIDE


def test_file_object_is_accepted_and_left_open():
    f = io.BytesIO(GOOD)
    img = LimeImage(f)
    assert img.read(0x10000, 4) == C[:4]
    img.close()
    assert not f.closed


def test_truncated_file_reports_exactly_the_missing_range(tmp_path):
    cut = len(GOOD) - 0x1000  # 0x800 of C's 0x1800 bytes remain
    path = tmp_path / "cut.lime"
    path.write_bytes(GOOD[:cut])
    img = LimeImage(path)
    assert img.ranges() == [(0x1000, 0x3000), (0x3000, 0x4000), (0x10000, 0x11800)]
    assert img.missing_ranges() == [(0x10800, 0x11800)]
    assert img.problems == [
        "range 0x10000-0x117ff is cut short: 2048 of 6144 bytes present; 0x10800-0x11800 missing"
    ]
    assert img.read(0x10000, 0x800) == C[:0x800]
    assert img.fate(0x107FF) == PageFate(Fate.READ)
    assert img.fate(0x10800) == PageFate(Fate.MISSING)
    assert img.fate(0x117FF) == PageFate(Fate.MISSING)
    with pytest.raises(PageNotCaptured) as e:
        img.read(0x107F0, 0x20)
    assert (e.value.paddr, e.value.fate) == (0x10800, Fate.MISSING)


def test_cut_inside_a_header_keeps_earlier_ranges(tmp_path):
    path = tmp_path / "cut.lime"
    path.write_bytes(GOOD[: 32 + len(A) + 10])
    img = LimeImage(path)
    assert img.ranges() == [(0x1000, 0x3000)]
    assert img.problems == [
        f"offset {32 + len(A):#x}: 10 trailing bytes, too short for a LiME range header; ignored"
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a memory image: the file is empty"),
        (b"EMiL\x01\0\0\0", "truncated: the file ends at byte 8, inside the first LiME"),
        (header(0, 0xFFF, magic=0x12345678) + bytes(0x1000), "bad LiME magic 78 56 34 12"),
        (header(0, 0xFFF, version=2) + bytes(0x1000), "unsupported LiME header version 2"),
        (header(0x2000, 0x1000) + bytes(0x1000), "ends (0x1000) before it starts (0x2000)"),
    ],
)
def test_unusable_first_header_is_an_image_error(tmp_path, data, message):
    path = tmp_path / "bad.lime"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r".*") as e:
        LimeImage(path)
    assert message in str(e.value)
    assert str(e.value).startswith(str(path))
    assert "\n" not in str(e.value)


def test_damaged_later_header_stops_with_a_problem(tmp_path):
    data = (
        header(0x1000, 0x1FFF) + bytes(0x1000) + header(0x3000, 0x3FFF, version=9) + bytes(0x1000)
    )
    path = tmp_path / "bad.lime"
    path.write_bytes(data)
    img = LimeImage(path)
    assert img.ranges() == [(0x1000, 0x2000)]
    assert img.problems == [
        "offset 0x1020: unsupported LiME header version 9; the remaining 4128 bytes are ignored"
    ]


def test_overlapping_and_descending_ranges_are_skipped(tmp_path):
    data = (
        header(0x1000, 0x1FFF) + pattern(0x1000, 1)
        + header(0x1800, 0x27FF) + pattern(0x1000, 2)  # overlaps the first
        + header(0x0, 0xFFF) + pattern(0x1000, 3)  # descends
        + header(0x4000, 0x4FFF) + pattern(0x1000, 4)
    )  # fmt: skip
    path = tmp_path / "overlap.lime"
    path.write_bytes(data)
    img = LimeImage(path)
    assert img.ranges() == [(0x1000, 0x2000), (0x4000, 0x5000)]
    assert img.read(0x4000, 0x1000) == pattern(0x1000, 4)
    assert len(img.problems) == 2
    assert img.problems[0].startswith("offset 0x1020: range 0x1800-0x27ff overlaps or precedes")
    assert img.problems[1].startswith("offset 0x2040: range 0x0-0xfff overlaps or precedes")


def test_absurd_size_is_a_truncated_range_not_an_allocation(tmp_path):
    data = header(0x1000, 0x1FFF) + bytes(0x1000) + header(0x100000, (1 << 64) - 1) + b"xy"
    path = tmp_path / "huge.lime"
    path.write_bytes(data)
    img = LimeImage(path)
    assert img.missing_ranges() == [(0x100002, 1 << 64)]
    assert img.read(0x100000, 2) == b"xy"
    assert img.fate(1 << 62) == PageFate(Fate.MISSING)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ImageError) as e:
        LimeImage(tmp_path / "nope.lime")
    assert str(e.value) == f"{tmp_path / 'nope.lime'}: cannot open: No such file or directory"


# -- streaming ---------------------------------------------------------------------------------


def test_iter_lime_ranges_through_zstd_pipe():
    """The way an image is checked with public tools: ``zstd -dc`` piped into the checker."""
    compressed = zstandard.ZstdCompressor().compress(GOOD)
    proc = subprocess.Popen(
        ["zstd", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(compressed)
    proc.stdin.close()
    chunks: list[tuple[int, bytes]] = []

    def on_data(paddr: int, data: bytes) -> None:
        chunks.append((paddr, data))

    got = list(iter_lime_ranges(proc.stdout, on_data, chunk_size=0x700))
    assert proc.wait() == 0
    assert got == [
        LimeRange(0x1000, 0x2FFF, 32, 0x2000),
        LimeRange(0x3000, 0x3FFF, 64 + 0x2000, 0x1000),
        LimeRange(0x10000, 0x117FF, 96 + 0x3000, 0x1800),
    ]
    assert b"".join(d for _, d in chunks) == A + B + C
    assert max(len(d) for _, d in chunks) <= 0x700
    # Every chunk starts where the one before ended, except where a range starts.
    ends = {0x1000, 0x3000, 0x10000}
    for (p0, d0), (p1, _) in itertools.pairwise(chunks):
        assert p1 == p0 + len(d0) or p1 in ends


def test_iter_lime_ranges_is_strict():
    cut = GOOD[:-1]
    with pytest.raises(ImageError, match=r"LiME range 0x10000-0x117ff is cut short: 6143 of 6144"):
        list(iter_lime_ranges(io.BytesIO(cut)))
    with pytest.raises(ImageError, match=r"ends inside a range header at offset 0x2020 \(5 of 32"):
        list(iter_lime_ranges(io.BytesIO(GOOD[: 32 + 0x2000 + 5])))
    backwards = header(0x3000, 0x3FFF) + B + header(0x1000, 0x1FFF) + A[:0x1000]
    with pytest.raises(
        ImageError, match=r"offset 0x1020: LiME range 0x1000-0x1fff does not follow"
    ):
        list(iter_lime_ranges(io.BytesIO(backwards)))
    with pytest.raises(ImageError, match=r"offset 0x0: bad LiME magic"):
        list(iter_lime_ranges(io.BytesIO(b"\0" * 40)))
    assert list(iter_lime_ranges(io.BytesIO(b""))) == []


# -- hostile input -----------------------------------------------------------------------------

SMALL = header(0x1000, 0x10FF) + pattern(0x100, 5) + header(0x2000, 0x207F) + pattern(0x80, 6)


def exercise(data: bytes) -> None:
    """Open ``data`` as LiME; it must give a working reader or one ImageError, quickly."""
    t0 = time.monotonic()
    try:
        img = LimeImage(io.BytesIO(data))
    except ImageError as e:
        assert "\n" not in str(e)
        return
    total = 0
    for (start, end), r in zip(img.ranges(), img.lime_ranges, strict=True):
        assert start <= end - 1
        assert img.fate(start).fate in (Fate.READ, Fate.MISSING)
        if r.present:
            total += len(img.read(start, r.present))
        if not r.complete:
            with pytest.raises(PageNotCaptured):
                img.read(start + r.present, 1)
    assert total <= len(data)
    list(iter_lime_ranges_or_error(data))
    assert time.monotonic() - t0 < 2


def iter_lime_ranges_or_error(data: bytes):
    try:
        yield from iter_lime_ranges(io.BytesIO(data))
    except ImageError:
        return


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data):
    exercise(data)


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_after_magic(data):
    exercise(b"EMiL\x01\0\0\0" + data)


@FUZZ
@given(st.lists(st.integers(0, len(SMALL) * 8 - 1), min_size=1, max_size=8))
def test_bit_flips(bits):
    data = bytearray(SMALL)
    for b in bits:
        data[b // 8] ^= 1 << (b % 8)
    exercise(bytes(data))


@FUZZ
@given(st.integers(0, len(SMALL)))
def test_truncations(n):
    exercise(SMALL[:n])


def test_problems_are_capped():
    data = header(0x100000, 0x100000) + b"x" + (header(0x0, 0x0) + b"y") * 150
    img = LimeImage(io.BytesIO(data))
    assert img.ranges() == [(0x100000, 0x100001)]
    assert len(img.problems) == 101
    assert img.problems[-1] == "... and 50 more problems"
