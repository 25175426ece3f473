"""The AVML reader on files written from the format's description, and on hostile ones."""

from __future__ import annotations

import random
import struct
import sys
import time
from pathlib import Path

import pytest

from collector.errors import ImageError, ImageTruncated, NotAnImage
from collector.image.avml import CACHE_CHUNKS, MAX_OTHER_CHUNKS, AvmlImage, AvmlRange
from collector.image.open import open_image, sniff_file
from collector.memory import Fate, PageFate, PageNotCaptured, PhysicalMemory
from tests.image.avml_writer import (
    STREAM_ID,
    avml_file,
    avml_range,
    chunk,
    compressed_chunk,
    framed,
    header,
    literal_block,
    masked_crc,
    uncompressed_chunk,
    varint,
)

pytest.importorskip("cramjam", reason="the avml extra (cramjam) is not installed")

PAGE = 4096


def ram() -> dict[int, bytes]:
    """Three ranges: random bytes around a stretch of zeros, a partial last chunk, a small one."""
    rng = random.Random(11)
    big = bytearray(rng.randbytes(5 * 65536 + 3 * PAGE))
    big[65536 + 100 : 3 * 65536] = bytes(3 * 65536 - 65536 - 100)
    return {
        0x1000: rng.randbytes(0x9F000 - 0x1000),
        0x100000: bytes(big),
        0x40000000: rng.randbytes(PAGE),
    }


def write(tmp_path: Path, data: bytes, name: str = "m.avml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("style", ["literal", "plain", "mixed", "cramjam"])
def test_reads_give_the_source_bytes(tmp_path: Path, style: str) -> None:
    memory = ram()
    path = write(tmp_path, avml_file(memory, style))
    assert sniff_file(path) == "avml"
    with open_image(path) as img:
        assert isinstance(img, AvmlImage) and isinstance(img, PhysicalMemory)
        assert img.metadata == {"format": "avml"}
        assert img.problems == []
        assert img.ranges() == [(s, s + len(d)) for s, d in sorted(memory.items())]
        assert img.missing_ranges() == []
        for start, data in memory.items():
            assert img.read(start, len(data)) == data
        # Reads across chunk boundaries, within one chunk, and of single bytes.
        base, data = 0x100000, memory[0x100000]
        rng = random.Random(5)
        for _ in range(200):
            at = rng.randrange(len(data))
            n = rng.randrange(1, min(3 * 65536, len(data) - at) + 1)
            assert img.read(base + at, n) == data[at : at + n]
        assert img.read(base + 65535, 2) == data[65535:65537]
        assert img.fate(0x1000) == PageFate(Fate.READ)
        assert img.fate(0x9F000) == PageFate(Fate.OUTSIDE)
        with pytest.raises(PageNotCaptured) as e:
            img.read(0x9F000 - 1, 2)
        assert (e.value.paddr, e.value.fate) == (0x9F000, Fate.OUTSIDE)


def test_a_file_may_mix_lime_and_avml_ranges(tmp_path: Path) -> None:
    # AVML's own reader takes version 1 (LiME) and version 2 headers alike.
    a, b = random.Random(1).randbytes(3 * PAGE), random.Random(2).randbytes(70000)
    data = header(0x1000, 0x1000 + len(a) - 1, version=1) + a + avml_range(0x10000, b)
    with AvmlImage(write(tmp_path, data)) as img:
        assert img.avml_ranges == [
            AvmlRange(0x1000, 0x1000 + len(a) - 1, len(a), 1),
            AvmlRange(0x10000, 0x10000 + len(b) - 1, len(b), 2),
        ]
        assert img.read(0x1000, len(a)) == a
        assert img.read(0x10000, len(b)) == b


def test_the_cache_keeps_a_bounded_number_of_chunks(tmp_path: Path) -> None:
    data = random.Random(3).randbytes((CACHE_CHUNKS + 8) * 65536)
    with AvmlImage(write(tmp_path, avml_file({0: data}))) as img:
        for at in range(0, len(data), 65536):
            assert img.read(at, 16) == data[at : at + 16]
        assert len(img._cache) == CACHE_CHUNKS


def test_literal_blocks_of_every_tag_length_decode() -> None:
    # The writer's own blocks, checked against cramjam's raw decoder: the test's
    # encoding is right before the reader is judged by it.
    import cramjam

    for n in (1, 60, 61, 256, 257, 65536):
        data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        assert bytes(cramjam.snappy.decompress_raw(literal_block(data))) == data


# -- damage and hostile input ------------------------------------------------------------------


def stream(*chunks: bytes) -> bytes:
    return STREAM_ID + b"".join(chunks)


def single(start: int, size: int, body: bytes, trailer: int | None = None) -> bytes:
    """One AVML header for ``size`` bytes at ``start``, then ``body`` and its length."""
    tail = struct.pack("<Q", len(body) if trailer is None else trailer)
    return header(start, start + size - 1) + body + tail


def opened(tmp_path: Path, data: bytes) -> AvmlImage:
    t = time.perf_counter()
    img = AvmlImage(write(tmp_path, data))
    elapsed = time.perf_counter() - t
    print(f"opened {len(data)} bytes in {elapsed * 1000:.1f} ms")
    return img


def test_a_huge_range_cut_short_keeps_what_is_there(tmp_path: Path) -> None:
    data = bytes(range(256)) * 256
    # A header claiming all of the 64-bit address space, then one chunk and the end.
    img = opened(tmp_path, header(0, (1 << 64) - 1) + stream(compressed_chunk(data)))
    with img:
        assert img.problems == [
            "range 0x0-0xffffffffffffffff at offset 0x20: the snappy stream is cut short in a"
            " chunk header; 0x10000-0x10000000000000000 missing"
        ]
        assert img.ranges() == [(0, 1 << 64)]
        assert img.missing_ranges() == [(0x10000, 1 << 64)]
        assert img.read(0, len(data)) == data
        assert img.fate(0x10000) == PageFate(Fate.MISSING)
        with pytest.raises(PageNotCaptured) as e:
            img.read(0xFFFF, 2)
        assert (e.value.paddr, e.value.fate) == (0x10000, Fate.MISSING)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        # A compressed chunk declaring 4 GiB: refused from its preamble, nothing allocated.
        (
            stream(chunk(0x00, bytes(4) + varint(0xFFFFFFFF) + b"\0")),
            "compressed chunk at 0x2a declares 4294967295 bytes (at most 65536)",
        ),
        (
            stream(chunk(0x00, bytes(4) + b"\xff\xff\xff\xff\xff\xff")),
            "compressed chunk at 0x2a declares None bytes (at most 65536)",
        ),
        (stream(chunk(0x00, bytes(4))), "compressed chunk at 0x2a is 4 bytes long"),
        (stream(chunk(0x01, bytes(4))), "uncompressed chunk at 0x2a holds 0 bytes"),
        (
            stream(chunk(0x01, bytes(4 + 65537))),
            "uncompressed chunk at 0x2a holds 65537 bytes",
        ),
        (stream(chunk(0x05, b"x")), "reserved unskippable snappy chunk type 0x5 at 0x2a"),
        (chunk(0xFF, b"sNaPpZ"), "bad snappy stream identifier at 0x20"),
        (
            stream(chunk(0x00, bytes(100))[:40]),
            "the snappy chunk at 0x2a (100 bytes) is cut short",
        ),
        (
            stream(*[chunk(0xFE, b"")] * (MAX_OTHER_CHUNKS + 1)),
            f"more than {MAX_OTHER_CHUNKS} snappy chunks without data",
        ),
        (
            stream(uncompressed_chunk(bytes(2 * 65536 - 5)[:65536]), compressed_chunk(bytes(2))),
            "the snappy stream holds more than the range's 65537 bytes",
        ),
    ],
)
def test_a_broken_stream_is_one_problem_and_a_missing_range(
    tmp_path: Path, body: bytes, why: str
) -> None:
    size = 65537
    with opened(tmp_path, single(0x1000, size, body)) as img:
        [problem] = img.problems
        assert problem.startswith(f"range 0x1000-{0x1000 + size - 1:#x} at offset 0x20: {why};")
        assert img.ranges() == [(0x1000, 0x1000 + size)]
        assert img.missing_ranges()[0][1] == 0x1000 + size


def test_a_stream_of_tiny_chunks_is_refused(tmp_path: Path) -> None:
    # A 1 MiB range needs 16 chunks of 64 KiB; one byte a chunk would make the index a
    # million entries long for a file of a few megabytes.
    body = stream(*[compressed_chunk(b"x")] * 100)
    with opened(tmp_path, single(0, 1 << 20, body)) as img:
        assert img.problems == [
            "range 0x0-0xfffff at offset 0x20: more than 48 snappy chunks for 1048576 bytes;"
            " 0x30-0x100000 missing"
        ]
        assert img.read(0, 48) == b"x" * 48
        assert len(img._piece_start) == 48


def test_a_wrong_trailing_length_is_a_problem_but_the_data_reads(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(PAGE)
    body = framed(data)
    second = avml_range(0x10000, data)
    with opened(tmp_path, single(0x1000, PAGE, body, trailer=12345) + second) as img:
        assert img.problems == [
            f"range 0x1000-0x1fff: the stream is {len(body)} bytes, but the length after it"
            " says 12345"
        ]
        assert img.read(0x1000, PAGE) == data and img.read(0x10000, PAGE) == data


def test_a_bad_checksum_fails_the_read_that_needs_the_chunk(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(2 * 65536)
    good, bad = data[:65536], data[65536:]
    broken = chunk(0x00, struct.pack("<I", masked_crc(bad) ^ 1) + literal_block(bad))
    with opened(tmp_path, single(0, len(data), stream(compressed_chunk(good), broken))) as img:
        assert img.problems == []
        assert img.read(0, 65536) == good
        with pytest.raises(ImageError) as e:
            img.read(65536, 1)
    # The second chunk follows the header (32), the stream identifier (10) and the first
    # chunk: 4 + CRC 4 + a literal block of 3 preamble, 3 tag and 65536 data bytes.
    assert "snappy chunk at offset 0x10038 does not decompress:" in str(e.value)
    assert "checksum" in str(e.value)


def test_what_is_not_avml_is_refused(tmp_path: Path) -> None:
    # The same kinds of failure, messages and exit statuses as every other format's
    # (docs/image-format.md): not an image 6, truncated 3.
    with pytest.raises(NotAnImage) as e:
        AvmlImage(write(tmp_path, b"AVML\x03\0\0\0" + bytes(24)))
    assert str(e.value) == (
        f"{tmp_path / 'm.avml'}: not a memory image: not an AVML image: not an AVML (or LiME)"
        " range header: 41 56 4d 4c 03 00 00 00"
    )
    assert e.value.exit_code == 6
    with pytest.raises(ImageTruncated) as e:
        AvmlImage(write(tmp_path, b"AVML\x02\0\0\0"))
    assert str(e.value) == (
        f"{tmp_path / 'm.avml'}: truncated: the file ends at byte 8, inside the first AVML"
        " range header"
    )
    assert e.value.exit_code == 3
    with pytest.raises(NotAnImage) as e:
        AvmlImage(write(tmp_path, b""))
    assert str(e.value) == f"{tmp_path / 'm.avml'}: not a memory image: the file is empty"
    with pytest.raises(NotAnImage) as e:
        AvmlImage(write(tmp_path, header(0x2000, 0x1000)))
    assert "range ends (0x1000) before it starts (0x2000)" in str(e.value)


def test_a_damaged_second_header_keeps_the_first_range(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(PAGE)
    with opened(tmp_path, avml_range(0x1000, data) + b"junk" * 8 + bytes(100)) as img:
        assert img.problems == [
            f"offset {len(avml_range(0x1000, data)):#x}: not an AVML (or LiME) range header:"
            " 6a 75 6e 6b 6a 75 6e 6b; the remaining 132 bytes are ignored"
        ]
        assert img.read(0x1000, PAGE) == data


def test_without_cramjam_the_error_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, avml_file({0: bytes(PAGE)}))
    monkeypatch.setitem(sys.modules, "cramjam", None)
    with pytest.raises(ImageError) as e:
        open_image(path)
    assert str(e.value) == (
        "reading AVML's compressed ranges needs the cramjam package: pip install 'collector[avml]'"
    )
