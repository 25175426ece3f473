"""Exports to LiME, padded raw and ELF core, checked byte by byte and read back."""

from __future__ import annotations

import errno
import io
import os
import struct

import pytest

from collector.errors import CollectorError
from collector.image.elfcore import ElfCore
from collector.image.export import ExportSummary, export_elf, export_lime, export_raw
from collector.image.lime import LimeImage
from collector.image.sparse import SparseMemory
from collector.memory import Fate, PageFate, PageNotCaptured


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 29 + seed) % 253 + 1 for i in range(n))  # never zero


P1 = pattern(0x3000, 1)  # 0x1000-0x3fff; page 0x2000 unreadable
P2 = pattern(0x1800, 2)  # 0x10000-0x117ff, not a page multiple
P3 = pattern(0x2000, 3)  # 0x100000-0x101fff; page 0x101000 excluded
FATES = {0x2000: PageFate(Fate.UNREADABLE, errno.EIO), 0x101000: PageFate(Fate.EXCLUDED)}
VMCOREINFO = b"OSRELEASE=6.1.0-56-amd64\nPAGESIZE=4096\n"
BASE = 0xFFFF888000000000


def memory() -> SparseMemory:
    return SparseMemory({0x1000: P1, 0x10000: P2, 0x100000: P3}, fates=FATES)


def zeroed(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + bytes(end - start) + data[end:]


# What each range must hold once exported: the pages the memory lacks become zeros.
E1 = zeroed(P1, 0x1000, 0x2000)
E3 = zeroed(P3, 0x1000, 0x2000)
EXPECTED = {0x1000: E1, 0x10000: P2, 0x100000: E3}


def lime_header(start: int, end: int) -> bytes:
    return struct.pack("<IIQQ", 0x4C694D45, 1, start, end) + bytes(8)


def check_summary(summary: ExportSummary) -> None:
    assert summary.ranges == 3
    assert summary.bytes == 0x3000 + 0x1800 + 0x2000
    assert summary.zero_filled == {Fate.UNREADABLE: 1, Fate.EXCLUDED: 1}
    assert summary.zero_bytes == 0x2000
    assert summary.pages_not_captured == 2
    assert summary.warning() == (
        "2 pages were not captured and written as zeros (1 unreadable, 1 excluded)"
    )


class CountingMemory(SparseMemory):
    """Records the largest read, to show that exports stream in bounded chunks."""

    largest = 0

    def read(self, paddr: int, size: int) -> bytes:
        self.largest = max(self.largest, size)
        return super().read(paddr, size)


@pytest.mark.parametrize("chunk", [0x1000, 0x1800, 0x3000, 1 << 20])
def test_export_lime_bytes(chunk):
    mem = CountingMemory({0x1000: P1, 0x10000: P2, 0x100000: P3}, fates=FATES)
    out = io.BytesIO()
    summary = export_lime(mem, out, chunk_size=chunk)
    assert out.getvalue() == (
        lime_header(0x1000, 0x3FFF) + E1 + lime_header(0x10000, 0x117FF) + P2
        + lime_header(0x100000, 0x101FFF) + E3
    )  # fmt: skip
    check_summary(summary)
    assert mem.largest <= max(chunk - chunk % 0x1000, 0x1000)


def test_lime_round_trip():
    out = io.BytesIO()
    export_lime(memory(), out)
    img = LimeImage(io.BytesIO(out.getvalue()))
    assert img.ranges() == memory().ranges()
    assert img.problems == []
    for start, data in EXPECTED.items():
        assert img.read(start, len(data)) == data


def parse_elf(data: bytes) -> tuple[int, list[tuple]]:
    """e_phnum and the program headers, read with struct from the ELF64 layout."""
    assert data[:6] == b"\x7fELF\x02\x01"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (4, 62)
    (e_phoff,) = struct.unpack_from("<Q", data, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    assert e_phentsize == 56
    return e_phnum, [
        struct.unpack_from("<IIQQQQQQ", data, e_phoff + 56 * i) for i in range(e_phnum)
    ]


def parse_notes(data: bytes, off: int, size: int) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a PT_NOTE segment, 4-byte aligned."""
    notes = []
    end = off + size
    while off < end:
        namesz, descsz, type_ = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off : off + namesz].rstrip(b"\0")
        off += (namesz + 3) // 4 * 4
        notes.append((name, type_, data[off : off + descsz]))
        off += (descsz + 3) // 4 * 4
    return notes


# The page-fates note of memory(): version 1, page size 4096, then (paddr, pages, fate,
# errno) for page 0x2000 (unreadable, EIO) and page 0x101000 (excluded).
FATES_NOTE = struct.pack("<II", 1, 4096) + struct.pack("<QQIi", 0x2000, 1, 1, errno.EIO)
FATES_NOTE += struct.pack("<QQIi", 0x101000, 1, 4, 0)


def test_export_elf_layout_and_round_trip():
    out = io.BytesIO()
    summary = export_elf(memory(), out, vmcoreinfo=VMCOREINFO, page_offset_base=BASE)
    check_summary(summary)
    data = out.getvalue()
    phnum, phdrs = parse_elf(data)
    assert phnum == 4
    p_type, _, off, vaddr, paddr, filesz, memsz, _ = phdrs[0]
    note_size = (12 + 12 + (len(VMCOREINFO) + 3) // 4 * 4) + (12 + 12 + len(FATES_NOTE))
    assert (p_type, vaddr, paddr, filesz, memsz) == (4, 0, 0, note_size, note_size)
    # The VMCOREINFO note: namesz 11, descsz, type 0, "VMCOREINFO\0" padded to 12, the text.
    assert data[off : off + 24] == struct.pack("<III", 11, len(VMCOREINFO), 0) + b"VMCOREINFO\0\0"
    assert data[off + 24 : off + 24 + len(VMCOREINFO)] == VMCOREINFO
    assert parse_notes(data, off, filesz) == [
        (b"VMCOREINFO", 0, VMCOREINFO),
        (b"COLLECTOR", 0x434F4C03, FATES_NOTE),
    ]
    for (p_type, _, off, vaddr, paddr, filesz, memsz, _), start in zip(
        phdrs[1:], EXPECTED, strict=True
    ):
        assert (p_type, paddr, vaddr, filesz, memsz) == (
            1,
            start,
            BASE + start,
            len(EXPECTED[start]),
            len(EXPECTED[start]),
        )
        assert off % 4096 == start % 4096
        assert data[off : off + filesz] == EXPECTED[start]

    core = ElfCore(io.BytesIO(data))
    assert core.problems == []
    assert core.ranges() == memory().ranges()
    assert core.read_virtual(BASE + 0x1000, 16) == P1[:16]
    # The pages not read come back with their fate, the others with their bytes.
    for start, data_ in {0x1000: P1, 0x10000: P2, 0x100000: P3}.items():
        for page in range(start, start + len(data_), 0x1000):
            want = FATES.get(page)
            if want is None:
                n = min(0x1000, start + len(data_) - page)
                assert core.read(page, n) == data_[page - start : page - start + n]
                assert core.fate(page) == PageFate(Fate.READ)
            else:
                assert core.fate(page) == want
                with pytest.raises(PageNotCaptured) as e:
                    core.read(page - 8, 16)
                assert (e.value.paddr, e.value.fate) == (page, want.fate)
    assert core.readable_ranges() == [
        (0x1000, 0x2000), (0x3000, 0x4000), (0x10000, 0x11800), (0x100000, 0x101000)
    ]  # fmt: skip
    assert core.blob("vmcoreinfo") == VMCOREINFO
    assert core.metadata["direct_map_base"] == BASE
    # Exported again, the core gives the same file: the fates survive the round trip.
    again = io.BytesIO()
    check_summary(export_elf(core, again, vmcoreinfo=VMCOREINFO, page_offset_base=BASE))
    assert again.getvalue() == data


def test_export_elf_without_vmcoreinfo_or_base():
    out = io.BytesIO()
    export_elf(SparseMemory({0x1000: P1, 0x10000: P2, 0x100000: P3}), out)
    phnum, phdrs = parse_elf(out.getvalue())
    assert phnum == 3
    assert [(p[0], p[3], p[4]) for p in phdrs] == [
        (1, 0, 0x1000),
        (1, 0, 0x10000),
        (1, 0, 0x100000),
    ]
    core = ElfCore(io.BytesIO(out.getvalue()))
    assert core.notes == [] and core.blob("vmcoreinfo") is None
    assert core.read(0x10000, len(P2)) == P2


def test_export_elf_with_more_than_pn_xnum_segments():
    n = 0xFFFF  # one more than fits in e_phnum
    mem = SparseMemory({i * 0x1000: bytes([i % 255 + 1]) for i in range(n)})
    out = io.BytesIO()
    export_elf(mem, out)
    data = out.getvalue()
    (e_shoff,) = struct.unpack_from("<Q", data, 40)
    (e_phnum,) = struct.unpack_from("<H", data, 56)
    assert e_phnum == 0xFFFF
    assert struct.unpack_from("<I", data, e_shoff + 44) == (n,)  # sh_info of section 0
    core = ElfCore(io.BytesIO(data))
    assert len(core.ranges()) == n
    assert core.read(0x1000 * 300, 1) == bytes([300 % 255 + 1])


def test_export_raw(tmp_path):
    path = tmp_path / "m.raw"
    check_summary(export_raw(memory(), path, chunk_size=0x1000))
    data = path.read_bytes()
    expected = bytearray(0x102000)
    for start, chunk in EXPECTED.items():
        expected[start : start + len(chunk)] = chunk
    assert data == bytes(expected)
    # Holes are left unwritten: where the file system reports holes, the gap starts as one.
    fd = os.open(path, os.O_RDONLY)
    try:
        first_data = os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)
    assert first_data in (0, 0x1000)


def test_truncated_lime_to_elf_leaves_the_missing_tail_out():
    out = io.BytesIO()
    export_lime(SparseMemory({0x10000: P2}), out)
    img = LimeImage(io.BytesIO(out.getvalue()[:-0x1000]))
    assert img.missing_ranges() == [(0x10800, 0x11800)]
    elf = io.BytesIO()
    summary = export_elf(img, elf, chunk_size=0x1000)
    # The file holds 0x10000-0x107ff; the 0x1000 bytes after it are not written as zeros.
    assert (summary.zero_filled, summary.zero_bytes, summary.left_out) == ({}, 0, 0x1000)
    assert summary.bytes == 0x800
    assert summary.warning() == "4096 bytes of announced RAM the image does not hold were left out"
    data = elf.getvalue()
    phdr = struct.unpack_from("<IIQQQQQQ", data, 64)
    assert phdr[0] == 1 and phdr[4:7] == (0x10000, 0x800, 0x800)  # PT_LOAD, paddr, sizes
    core = ElfCore(io.BytesIO(data))
    assert core.ranges() == [(0x10000, 0x10800)]
    assert core.read(0x10000, 0x800) == P2[:0x800]


def test_absent_ranges_cost_nothing_however_large_they_claim_to_be():
    # A LiME header claiming 2^63 bytes, of which the file holds one: the export writes that
    # one byte, at once, instead of zero-filling until the disk is full.
    data = lime_header(0x0, (1 << 63) - 1) + b"\x07"
    img = LimeImage(io.BytesIO(data))
    sink = io.BytesIO()
    summary = export_lime(img, sink)
    assert sink.getvalue() == lime_header(0, 0) + b"\x07"
    assert (summary.bytes, summary.left_out, summary.zero_filled) == (1, (1 << 63) - 1, {})


class FullDisk(io.RawIOBase):
    name = "out.lime"

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_write_failure_is_one_line():
    with pytest.raises(CollectorError) as e:
        export_lime(memory(), FullDisk())
    assert str(e.value) == "out.lime: write failed at byte 0: No space left on device"


def test_raw_export_refuses_addresses_beyond_any_file_offset(tmp_path):
    # An ELF segment whose p_paddr is 2^63: a raw file cannot put a byte there.
    mem = SparseMemory({1 << 63: b"\x01" * 16})
    with pytest.raises(CollectorError) as e:
        export_raw(mem, tmp_path / "out.raw")
    assert str(e.value) == (
        "memory at 0x8000000000000000-0x800000000000000f lies beyond the largest offset a raw "
        "file can have (2^63 - 1); export it as LiME or ELF instead"
    )


class LimitedFile(io.RawIOBase):
    """A seekable raw file that holds at most ``limit`` bytes, as a file under ``ulimit -f``
    or on a disk filling up: the write crossing the limit stores what fits and returns that
    count (short, no error), the next one fails with ``errno_``."""

    def __init__(self, limit: int, errno_: int, name: str = "out.img") -> None:
        self.limit = limit
        self.errno_ = errno_
        self.name = name
        self.data = bytearray()
        self.pos = 0
        self.calls: list[tuple[int, int]] = []  # (asked, written)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        assert whence == 0
        self.pos = offset
        return offset

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if size > self.limit and self.errno_ == errno.EFBIG:  # ftruncate(2) past RLIMIT_FSIZE
            raise OSError(self.errno_, os.strerror(self.errno_))
        self.data[size:] = b""
        self.data.extend(bytes(size - len(self.data)))
        return size

    def write(self, b) -> int:
        n = min(len(b), self.limit - self.pos)
        if n <= 0:
            self.calls.append((len(b), -1))
            raise OSError(self.errno_, os.strerror(self.errno_))
        end = self.pos + n
        self.data.extend(bytes(max(0, end - len(self.data))))
        self.data[self.pos : end] = bytes(b)[:n]
        self.pos = end
        self.calls.append((len(b), n))
        return n


def _export(fmt: str, mem, out) -> ExportSummary:
    if fmt == "lime":
        return export_lime(mem, out)
    if fmt == "raw":
        return export_raw(mem, out)
    return export_elf(mem, out, vmcoreinfo=VMCOREINFO, page_offset_base=BASE)


def _whole(fmt: str) -> bytes:
    if fmt == "raw":
        f = LimitedFile(1 << 30, errno.EFBIG)
        export_raw(memory(), f)
        return bytes(f.data)
    out = io.BytesIO()
    _export(fmt, memory(), out)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["lime", "raw", "elf"])
@pytest.mark.parametrize(
    ("errno_", "reason"),
    [(errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")],
)
def test_a_short_write_is_finished_and_the_failure_reported(fmt, errno_, reason):
    whole = _whole(fmt)
    # Cut 7 bytes before the end of the data: the last write comes back short without an
    # error; only writing the rest again says why. (A raw file ends with a hole: the
    # excluded page 0x101000, never written.)
    limit = (0x101000 if fmt == "raw" else len(whole)) - 7
    out = LimitedFile(limit, errno_, name=f"out.{fmt}")
    with pytest.raises(CollectorError) as e:
        _export(fmt, memory(), out)
    assert str(e.value) == f"out.{fmt}: write failed at byte {limit}: {reason}"
    assert bytes(out.data) == whole[:limit]
    asked, written = out.calls[-2]
    assert written == asked - 7 and out.calls[-1] == (7, -1)


@pytest.mark.parametrize("fmt", ["lime", "raw", "elf"])
def test_every_cut_point_is_an_error(fmt):
    whole = _whole(fmt)
    for limit in sorted({1, 31, 32, 33, 4095, 4096, len(whole) // 2, len(whole) - 1}):
        out = LimitedFile(limit, errno.EFBIG)
        at = limit
        if fmt == "raw":
            # Holes are not written: the first write past the limit is at the next data,
            # and a limit inside the final hole stops the truncate that sets the size.
            at = next((s for s in (0x1000, 0x3000, 0x10000, 0x100000) if s >= limit), 0x101000)
            at = max(at, limit) if limit < 0x101000 else 0x101000
        with pytest.raises(CollectorError, match=f"write failed at byte {at}: File too large"):
            _export(fmt, memory(), out)
    out = LimitedFile(len(whole), errno.EFBIG)
    _export(fmt, memory(), out)  # exactly enough room: no error
    assert bytes(out.data) == whole


class SilentSink(io.RawIOBase):
    """A stream that takes nothing and says so only by returning 0, or None."""

    name = "sink"

    def __init__(self, answer: int | None) -> None:
        self.answer = answer

    def writable(self) -> bool:
        return True

    def write(self, b) -> int | None:
        return self.answer


@pytest.mark.parametrize(("answer", "what"), [(0, "wrote nothing"), (None, "would block")])
def test_a_stream_that_takes_nothing_is_an_error(answer, what):
    with pytest.raises(CollectorError) as e:
        export_lime(memory(), SilentSink(answer))
    assert str(e.value) == (
        f"sink: write failed at byte 0: the output {what} (32 bytes left to write)"
    )


def test_nonzero_finds_one_byte_anywhere():
    from collector.image.export import _nonzero

    assert not _nonzero(b"") and not _nonzero(bytes(3 << 20))
    for at in (0, 4095, 1 << 20, (3 << 20) - 1):
        data = bytearray(3 << 20)
        data[at] = 1
        assert _nonzero(memoryview(data)), at
