"""ELF core reader on cores assembled by hand with struct.pack, and on hostile bytes."""

from __future__ import annotations

import contextlib
import io
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.elf import ElfNote, parse_notes
from collector.errors import ImageError
from collector.image.elfcore import ElfCore, VirtualPageNotCaptured
from collector.memory import Fate, PageFate, PageNotCaptured, PhysicalMemory

NO_PADDR = 0xFFFFFFFFFFFFFFFF


def elf_header(
    phnum,
    phoff=64,
    e_type=4,
    ei_class=2,
    ei_data=1,
    machine=62,
    shoff=0,
    shentsize=0,
    shnum=0,
    phentsize=56,
):
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1, 0]) + bytes(8)
    return ident + struct.pack(
        "<HHIQQQIHHHHHH",
        e_type,
        machine,
        1,
        0,
        phoff,
        shoff,
        0,
        64,
        phentsize,
        phnum,
        shentsize,
        shnum,
        0,
    )


def phdr(p_type, offset, vaddr, paddr, filesz, memsz, align=0):
    return struct.pack("<IIQQQQQQ", p_type, 7, offset, vaddr, paddr, filesz, memsz, align)


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad4(name + b"\0") + pad4(desc)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) % 251 for i in range(n))


def assemble(notes: bytes, loads: list[tuple[int, int, bytes, int]], machine=62) -> bytes:
    """An ELF core: PT_NOTE (when ``notes``), then PT_LOADs of ``(paddr, vaddr, data, memsz)``."""
    phnum = len(loads) + (1 if notes else 0)
    offset = 64 + 56 * phnum
    table = b""
    body = b""
    if notes:
        table += phdr(4, offset, 0, 0, len(notes), len(notes))
        body += notes
        offset += len(notes)
    for paddr, vaddr, data, memsz in loads:
        table += phdr(1, offset, vaddr, paddr, len(data), memsz, 4096)
        body += data
        offset += len(data)
    return elf_header(phnum, machine=machine) + table + body


VMCOREINFO = b"OSRELEASE=6.1.0-56-amd64\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff8e00a000\n"
R1 = pattern(0x2000, 1)
R2 = pattern(0x3000, 2)
V = pattern(0x1000, 3)
KCORE_NOTES = (
    note(b"CORE", 1, b"\x11" * 7)
    + note(b"CORE", 3, b"\x22" * 5)
    + note(b"VMCOREINFO", 0, VMCOREINFO)
)
# Like /proc/kcore: System RAM at the direct map, kernel text inside RAM, vmalloc with no paddr.
KCORE = assemble(
    KCORE_NOTES,
    [
        (0x1000, 0xFFFF888000001000, R1, len(R1)),
        (0x100000, 0xFFFF888000100000, R2, len(R2)),
        (0x101000, 0xFFFFFFFF81000000, R2[0x1000:0x2000], 0x1000),
        (NO_PADDR, 0xFFFFC90000000000, V, len(V)),
    ],
)


def test_kcore_like_core(tmp_path):
    path = tmp_path / "kcore"
    path.write_bytes(KCORE)
    with ElfCore(path) as core:
        assert isinstance(core, PhysicalMemory)
        assert core.problems == []
        assert core.ranges() == [(0x1000, 0x3000), (0x100000, 0x103000)]
        assert core.read(0x1000, 0x2000) == R1
        assert core.read(0x102FF0, 0x10) == R2[-0x10:]
        assert core.fate(0x2FFF) == PageFate(Fate.READ)
        assert core.fate(0x3000) == PageFate(Fate.OUTSIDE)
        with pytest.raises(PageNotCaptured) as e:
            core.read(0x2FF0, 0x20)
        assert (e.value.paddr, e.value.fate) == (0x3000, Fate.OUTSIDE)
        assert core.notes == [
            ElfNote("CORE", 1, b"\x11" * 7),
            ElfNote("CORE", 3, b"\x22" * 5),
            ElfNote("VMCOREINFO", 0, VMCOREINFO),
        ]
        assert core.blob("vmcoreinfo") == VMCOREINFO
        assert core.blob("btf") is None
        assert core.page_size == 4096
        assert core.metadata == {
            "format": "elf-core",
            "e_machine": 62,
            "segments": 4,
            "notes": ["CORE", "VMCOREINFO"],
            "direct_map_base": 0xFFFF888000000000,
        }
        assert [s.vaddr for s in core.virtual_segments] == [
            0xFFFF888000001000,
            0xFFFF888000100000,
            0xFFFFFFFF81000000,
            0xFFFFC90000000000,
        ]
        assert core.virtual_segments[3].paddr is None
        assert core.read_virtual(0xFFFFC90000000100, 0x10) == V[0x100:0x110]
        assert core.read_virtual(0xFFFFFFFF81000008, 8) == R2[0x1008:0x1010]
        assert core.read_virtual(0xFFFF888000002FF8, 8) == R1[-8:]
        with pytest.raises(VirtualPageNotCaptured, match="virtual address 0xffffc90000001000"):
            core.read_virtual(0xFFFFC90000000FF0, 0x20)


def test_qemu_like_core_with_unstored_tail():
    """QEMU writes p_vaddr 0 and a p_filesz below p_memsz for memory it does not store."""
    notes = note(b"CORE", 1, bytes(8)) + note(b"QEMU", 0, bytes(12))
    lo, hi = pattern(0x2000, 4), pattern(0x1000, 5)
    data = assemble(notes, [(0, 0, lo, 0x2000), (0x100000, 0, hi, 0x3000)])
    core = ElfCore(io.BytesIO(data))
    assert core.problems == []
    assert core.ranges() == [(0, 0x2000), (0x100000, 0x103000)]
    assert core.virtual_segments == []
    assert core.blob("vmcoreinfo") is None
    assert core.read(0, 0x2000) == lo
    assert core.read(0x100FF0, 0x10) == hi[-0x10:]
    assert core.fate(0x100FFF) == PageFate(Fate.READ)
    assert core.fate(0x101000) == PageFate(Fate.NOT_COVERED)
    assert core.fate(0x102FFF) == PageFate(Fate.NOT_COVERED)
    with pytest.raises(PageNotCaptured) as e:
        core.read(0x100FF8, 0x10)
    assert (e.value.paddr, e.value.fate) == (0x101000, Fate.NOT_COVERED)
    assert "direct_map_base" not in core.metadata


def test_truncated_core_reports_missing_bytes():
    data = assemble(b"", [(0x1000, 0, R1, len(R1)), (0x8000, 0, R2, len(R2))])
    core = ElfCore(io.BytesIO(data[:-0x1800]))
    assert core.ranges() == [(0x1000, 0x3000), (0x8000, 0xB000)]
    assert core.missing_ranges() == [(0x9800, 0xB000)]
    assert core.problems == [
        "PT_LOAD 1 (p_paddr 0x8000, p_vaddr 0x0) is cut short: 6144 of 12288 bytes present in the file"
    ]
    assert core.read(0x8000, 0x1800) == R2[:0x1800]
    assert core.fate(0x9800) == PageFate(Fate.MISSING)
    with pytest.raises(PageNotCaptured) as e:
        core.read(0x97FF, 2)
    assert (e.value.paddr, e.value.fate) == (0x9800, Fate.MISSING)


OLD_KCORE_LOADS = [
    (0, 0xFFFF880000001000, R1, len(R1)),
    (0, 0xFFFF880000100000, R2, len(R2)),
    (0, 0xFFFFC90000000000, V, len(V)),  # vmalloc: not in the direct map
    (0, 0xFFFFFFFF81000000, R2[0x1000:0x2000], 0x1000),  # kernel text mapping
]


def test_old_kcore_without_paddr_derives_from_the_direct_map():
    core = ElfCore(io.BytesIO(assemble(KCORE_NOTES, OLD_KCORE_LOADS)))
    assert core.ranges() == [(0x1000, 0x3000), (0x100000, 0x103000)]
    assert core.read(0x100000, 0x3000) == R2
    assert len(core.problems) == 1
    assert "p_vaddr - 0xffff880000000000" in core.problems[0]
    assert core.read_virtual(0xFFFFC90000000000, 4) == V[:4]


def test_old_kcore_with_given_direct_map_base():
    loads = [(0, 0xFFFF9A0000001000 + i * 0x10000, pattern(0x1000, i), 0x1000) for i in range(2)]
    core = ElfCore(io.BytesIO(assemble(b"", loads)), direct_map_base=0xFFFF9A0000000000)
    assert core.problems == []
    assert core.ranges() == [(0x1000, 0x2000), (0x11000, 0x12000)]
    assert core.read(0x11000, 0x1000) == pattern(0x1000, 1)


def test_old_kcore_of_another_machine_needs_the_base():
    core = ElfCore(io.BytesIO(assemble(b"", OLD_KCORE_LOADS, machine=183)))
    assert core.ranges() == []
    assert "pass direct_map_base" in core.problems[0]
    assert core.read_virtual(0xFFFF880000001000, 4) == R1[:4]


def test_pagesize_from_vmcoreinfo():
    notes = note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\nPAGESIZE=16384\n\0\0\0")
    core = ElfCore(io.BytesIO(assemble(notes, [(0x40000000, 0, R1, len(R1))], machine=183)))
    assert core.page_size == 16384
    assert core.blob("vmcoreinfo") == b"OSRELEASE=6.1\nPAGESIZE=16384\n"


def test_pn_xnum_takes_the_count_from_section_header_0():
    # e_phnum = PN_XNUM; section header 0 at offset 64 holds the real count (2) in sh_info.
    shdr = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 2, 0, 0)
    phoff = 64 + 64
    data_off = phoff + 2 * 56
    table = phdr(1, data_off, 0, 0x1000, 0x10, 0x10) + phdr(
        1, data_off + 0x10, 0, 0x2000, 0x10, 0x10
    )
    data = (
        elf_header(0xFFFF, phoff=phoff, shoff=64, shentsize=64, shnum=1) + shdr + table + R1[:0x20]
    )
    core = ElfCore(io.BytesIO(data))
    assert core.ranges() == [(0x1000, 0x1010), (0x2000, 0x2010)]
    assert core.read(0x2000, 0x10) == R1[0x10:0x20]


def test_partial_overlap_is_a_problem():
    data = assemble(b"", [(0x1000, 0, R1, len(R1)), (0x2000, 0, R2, len(R2))])
    core = ElfCore(io.BytesIO(data))
    assert core.ranges() == [(0x1000, 0x3000), (0x3000, 0x5000)]
    assert core.read(0x2FFF, 2) == R1[-1:] + R2[0x1000:0x1001]
    assert core.problems == [
        "PT_LOAD 1 overlaps another segment at physical 0x2000-0x3000; the other segment is used there"
    ]


def test_parse_notes_bounds():
    problems: list[str] = []
    good = note(b"CORE", 1, b"abc")
    bad = struct.pack("<III", 5, 0xFFFFFFFF, 7) + b"CORE\0\0\0\0"
    assert parse_notes(good + bad, problem=problems.append) == [ElfNote("CORE", 1, b"abc")]
    assert problems == [
        "note at offset 0x18 (namesz 5, descsz 4294967295) runs past the end of its segment"
    ]
    assert parse_notes(good + bytes(24)) == [ElfNote("CORE", 1, b"abc")]
    assert parse_notes(b"\x01\x02") == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF file"),
        (b"MZ" + bytes(100), "not an ELF file"),
        (b"\x7fELF\x02\x01", "too short for an ELF header"),
        (elf_header(1, ei_class=1), "only 64-bit ELF cores"),
        (elf_header(1, ei_data=2), "only little-endian ELF cores"),
        (elf_header(1, e_type=2), "not an ELF core file (e_type 2)"),
        (elf_header(0), "without program headers"),
        (elf_header(3), "runs past the end of the file"),
        (elf_header(1, phoff=1 << 63), "runs past the end of the file"),
        (elf_header(1, phentsize=32) + bytes(56), "program header size 32"),
        (elf_header(0xFFFF), "section header 0 is not in the file"),
        (
            elf_header(0xFFFF, shoff=64, shentsize=64, shnum=1)
            + struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0, 0),
            "claims 4294967295 program headers",
        ),
    ],
)
def test_unusable_header_is_one_image_error(data, message):
    with pytest.raises(ImageError) as e:
        ElfCore(io.BytesIO(data))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_odd_segments_become_problems():
    table = (
        phdr(1, 64 + 3 * 56, 0, 0x1000, 0x20, 0x10)  # p_filesz > p_memsz
        + phdr(1, 64 + 3 * 56, 0, 0xFFFFFFFFFFFFF000, 0x10, 0x2000)  # wraps past 2**64
        + phdr(4, 1 << 40, 0, 0, 0x100, 0x100)  # notes past the end of the file
    )
    core = ElfCore(io.BytesIO(elf_header(3) + table + R1[:0x20]))
    assert core.ranges() == [(0x1000, 0x1010)]
    assert core.read(0x1000, 0x10) == R1[:0x10]
    assert core.problems == [
        "PT_LOAD 0: p_filesz 0x20 exceeds p_memsz 0x10; p_memsz used",
        "PT_LOAD 1: p_paddr 0xfffffffffffff000 + p_memsz wraps; not physical",
        "PT_NOTE 2: offset 0x10000000000 is past the end of the file",
    ]


# -- hostile input -----------------------------------------------------------------------------

SMALL = assemble(
    note(b"CORE", 1, b"\x01" * 6) + note(b"VMCOREINFO", 0, b"PAGESIZE=4096\n"),
    [
        (0x1000, 0xFFFF888000001000, pattern(0x40, 7), 0x40),
        (NO_PADDR, 0xFFFFC90000000000, pattern(0x20, 8), 0x30),
    ],
)


def exercise(data: bytes) -> None:
    """Open ``data`` as an ELF core: a working reader or one ImageError, quickly."""
    t0 = time.monotonic()
    try:
        core = ElfCore(io.BytesIO(data))
    except ImageError as e:
        assert "\n" not in str(e)
        return
    got = 0
    for start, end in core.ranges():
        for addr in (start, end - 1):
            if core.fate(addr).fate == Fate.READ:
                got += len(core.read(addr, 1))
            else:
                with pytest.raises(PageNotCaptured):
                    core.read(addr, 1)
    for start, end in core.virtual_ranges():
        with contextlib.suppress(VirtualPageNotCaptured):
            core.read_virtual(start, min(end - start, 64))
    core.blob("vmcoreinfo")
    assert core.page_size & (core.page_size - 1) == 0
    assert time.monotonic() - t0 < 2


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_header(data):
    exercise(elf_header(2) + data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data):
    exercise(data)


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
