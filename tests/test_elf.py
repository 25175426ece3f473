"""The shared ELF64 parser on headers and notes assembled by hand, and on hostile bytes."""

from __future__ import annotations

import contextlib
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.elf import (
    ElfError,
    ElfHeader,
    ElfNote,
    PhdrLimits,
    ProgramHeader,
    find_note,
    iter_notes,
    parse_elf_header,
    parse_notes,
    parse_program_headers,
    vmcoreinfo_from_note_bytes,
)
from collector.errors import ImageError


def ehdr(
    phnum: int,
    *,
    endian: str = "<",
    ei_class: int = 2,
    ei_data: int | None = None,
    e_type: int = 4,
    phoff: int = 64,
    phentsize: int = 56,
    shoff: int = 0,
    shentsize: int = 0,
) -> bytes:
    """An Elf64_Ehdr: e_machine 62, e_version 1, e_entry 0x1234, e_flags 5, e_shstrndx 3."""
    data = ei_data if ei_data is not None else (1 if endian == "<" else 2)
    ident = b"\x7fELF" + bytes([ei_class, data, 1, 0]) + bytes(8)
    return ident + struct.pack(
        endian + "HHIQQQIHHHHHH",
        e_type,
        62,
        1,
        0x1234,
        phoff,
        shoff,
        5,
        64,
        phentsize,
        phnum,
        shentsize,
        1 if shentsize else 0,
        3,
    )


def phdr(p_type: int, i: int, endian: str = "<") -> bytes:
    """A program header whose fields are distinct numbers derived from ``i``."""
    return struct.pack(
        endian + "IIQQQQQQ",
        p_type,
        i + 1,
        0x1000 * (i + 1),
        0xFFFF888000000000 + 0x10000 * i,
        0x10000 * i,
        0x100 + i,
        0x200 + i,
        4096,
    )


def expected(p_type: int, i: int) -> ProgramHeader:
    return ProgramHeader(
        p_type,
        i + 1,
        0x1000 * (i + 1),
        0xFFFF888000000000 + 0x10000 * i,
        0x10000 * i,
        0x100 + i,
        0x200 + i,
        4096,
    )


def note(name: bytes, ntype: int, desc: bytes, endian: str = "<", align: int = 4) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % align)

    return (
        struct.pack(endian + "III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)
    )


CORE = ehdr(3) + phdr(4, 0) + phdr(1, 1) + phdr(1, 2)
STRICT = PhdrLimits()
LOOSE = PhdrLimits(pn_xnum=True, exact_phentsize=False)


# -- the ELF header ---------------------------------------------------------------------------


def test_little_endian_header_fields():
    h = parse_elf_header(CORE)
    assert h == ElfHeader("<", CORE[:16], 4, 62, 1, 0x1234, 64, 0, 5, 64, 56, 3, 0, 0, 3)


def test_big_endian_header_only_when_asked():
    data = ehdr(2, endian=">", phoff=0x40)
    h = parse_elf_header(data, big_endian=True)
    assert (h.endian, h.e_type, h.e_machine, h.e_entry, h.e_phnum) == (">", 4, 62, 0x1234, 2)
    with pytest.raises(
        ElfError, match=r"^only little-endian ELF cores are supported \(EI_DATA 2\)$"
    ):
        parse_elf_header(data)


@pytest.mark.parametrize(
    ("data", "big", "message"),
    [
        (b"", False, "not an ELF file (no ELF magic)"),
        (b"MZ" + bytes(62), False, "not an ELF file (no ELF magic)"),
        (CORE[:20], False, "20 bytes, too short for an ELF header"),
        (
            ehdr(1, ei_class=1),
            False,
            "only 64-bit ELF cores are supported (EI_CLASS 1 is not ELFCLASS64)",
        ),
        (ehdr(1, ei_data=0), False, "only little-endian ELF cores are supported (EI_DATA 0)"),
        (ehdr(1, ei_data=3), True, "EI_DATA 3 is neither little- nor big-endian"),
    ],
)
def test_bad_header_is_one_elf_error(data, big, message):
    with pytest.raises(ElfError) as info:
        parse_elf_header(data, big_endian=big)
    assert str(info.value) == message
    assert isinstance(info.value, ImageError)


# -- program headers --------------------------------------------------------------------------


def test_program_headers_from_bytes_and_from_a_reader():
    want = [expected(4, 0), expected(1, 1), expected(1, 2)]
    h = parse_elf_header(CORE)
    assert parse_program_headers(CORE, h, STRICT) == want
    calls = []

    def read(offset: int, size: int) -> bytes:
        calls.append((offset, size))
        return CORE[offset : offset + size]

    assert parse_program_headers(read, h, STRICT, len(CORE)) == want
    assert calls == [(64, 3 * 56)]
    # Without a size (as for /proc/kcore) the table is read where the header says.
    assert parse_program_headers(read, h, STRICT) == want


def test_big_endian_program_headers():
    data = ehdr(2, endian=">") + phdr(4, 0, ">") + phdr(1, 1, ">")
    h = parse_elf_header(data, big_endian=True)
    assert parse_program_headers(data, h, STRICT) == [expected(4, 0), expected(1, 1)]


def test_longer_entries_are_read_with_their_stride_when_allowed():
    data = ehdr(2, phentsize=64) + phdr(1, 0) + b"\xee" * 8 + phdr(1, 1) + b"\xee" * 8
    h = parse_elf_header(data)
    assert parse_program_headers(data, h, LOOSE) == [expected(1, 0), expected(1, 1)]
    with pytest.raises(ElfError, match=r"^e_phentsize 64 is not 56$"):
        parse_program_headers(data, h, STRICT)


def test_pn_xnum_takes_the_count_from_section_header_0():
    shdr0 = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 2, 0, 0)  # sh_info = 2
    data = ehdr(0xFFFF, phoff=128, shoff=64, shentsize=64) + shdr0 + phdr(1, 0) + phdr(1, 1)
    h = parse_elf_header(data)
    assert parse_program_headers(data, h, LOOSE) == [expected(1, 0), expected(1, 1)]
    with pytest.raises(ElfError, match=r"^e_phnum 65535 is not a program header count$"):
        parse_program_headers(data, h, STRICT)
    with pytest.raises(ElfError, match="section header 0 is not in the file"):
        parse_program_headers(data[:100], h, LOOSE)
    zero = data[:64] + struct.pack("<IIQQQQIIQQ", *[0] * 10)
    with pytest.raises(ElfError, match=r"without program headers \(PN_XNUM with sh_info 0\)"):
        parse_program_headers(zero, h, LOOSE)


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (ehdr(1, phentsize=32) + bytes(56), LOOSE, "program header size 32 is below 56"),
        (ehdr(0), STRICT, "ELF core without program headers (e_phnum 0)"),
        (CORE, PhdrLimits(max_phnum=2), "claims 3 program headers (more than 2)"),
        (CORE, PhdrLimits(max_table=100), "program header table of 168 bytes is too large"),
        (
            CORE[:200],
            STRICT,
            "program header table (3 entries at 0x40) is cut short: it runs past the end of "
            "the file (0xc8 bytes)",
        ),
        (
            ehdr(1, phoff=1 << 63) + phdr(1, 0),
            STRICT,
            "program header table (1 entries at 0x8000000000000000) is cut short: it runs past "
            "the end of the file (0x78 bytes)",
        ),
    ],
)
def test_bad_table_is_one_elf_error(data, limits, message):
    with pytest.raises(ElfError) as info:
        parse_program_headers(data, parse_elf_header(data), limits)
    assert str(info.value) == message


def test_without_a_size_the_table_must_follow_the_header_within_the_cap():
    def read(offset: int, size: int) -> bytes:
        raise AssertionError("nothing is read for a table out of bounds")

    for phoff in (8, 1 << 40):
        h = parse_elf_header(ehdr(2, phoff=phoff))
        with pytest.raises(ElfError, match=rf"^program headers at {phoff:#x} are out of bounds$"):
            parse_program_headers(read, h, STRICT)
    h = parse_elf_header(ehdr(2, phoff=1000))
    with pytest.raises(ElfError, match="out of bounds"):
        parse_program_headers(read, h, PhdrLimits(max_table=1000 + 111))


def test_reader_errors_pass_through_and_short_reads_are_caught():
    h = parse_elf_header(CORE)

    def refuse(offset: int, size: int) -> bytes:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        parse_program_headers(refuse, h, STRICT)
    with pytest.raises(ElfError, match=r"^program header table is cut short: 100 of 168 bytes"):
        parse_program_headers(lambda o, n: CORE[o : o + 100], h, STRICT, len(CORE))


# -- notes ------------------------------------------------------------------------------------

VMCI = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
NOTES = note(b"CORE", 1, b"\x11" * 7) + note(b"CORE", 3, b"\x22" * 5) + note(b"VMCOREINFO", 0, VMCI)
WANT = [
    ElfNote("CORE", 1, b"\x11" * 7),
    ElfNote("CORE", 3, b"\x22" * 5),
    ElfNote("VMCOREINFO", 0, VMCI),
]


def test_notes_in_both_byte_orders_and_alignments():
    assert parse_notes(NOTES) == WANT
    big = b"".join(note(n.name.encode(), n.type, n.desc, ">") for n in WANT)
    assert parse_notes(big, endian=">") == WANT
    wide = b"".join(note(n.name.encode(), n.type, n.desc, align=8) for n in WANT)
    assert parse_notes(wide, 8) == WANT


def test_zero_padding_ends_the_notes_and_a_short_tail_is_ignored():
    assert parse_notes(NOTES + bytes(12) + note(b"LATE", 1, b"")) == WANT
    assert parse_notes(NOTES + b"\x01" * 11) == WANT
    assert parse_notes(b"") == []


def test_name_is_the_c_string_before_the_first_nul():
    raw = struct.pack("<III", 8, 1, 7) + b"CORE\0XYZ" + b"a\0\0\0"
    assert parse_notes(raw) == [ElfNote("CORE", 7, b"a")]


def test_overrun_and_too_many_notes_are_problems(monkeypatch):
    problems: list[str] = []
    bad = struct.pack("<III", 5, 0x10000, 9) + b"CORE\0\0\0\0"
    assert parse_notes(NOTES + bad, problem=problems.append) == WANT
    assert problems == [
        f"note at offset {len(NOTES):#x} (namesz 5, descsz 65536) runs past the end of its segment"
    ]
    monkeypatch.setattr("collector.elf.MAX_NOTES", 2)
    problems.clear()
    assert parse_notes(NOTES, problem=problems.append) == WANT[:2]
    assert problems == ["more than 2 notes; the rest are ignored"]


def test_iter_notes_stops_where_the_problem_callback_raises():
    def fail(message: str) -> None:
        raise ImageError(message)

    bad = struct.pack("<III", 5, 0x10000, 9) + b"CORE\0\0\0\0"
    walk = iter_notes(NOTES + bad, problem=fail)
    assert [next(walk), next(walk), next(walk)] == WANT
    with pytest.raises(ImageError, match="runs past the end"):
        next(walk)


def test_find_note_by_name_and_type_stops_at_the_match():
    assert find_note(WANT, "CORE") == WANT[0]
    assert find_note(WANT, "CORE", 3) == WANT[1]
    assert find_note(WANT, "CORE", 4) is None
    assert find_note(WANT, "NOPE") is None
    # A damaged note after the match is never reached.
    bad = struct.pack("<III", 5, 0x10000, 9)

    def fail(message: str) -> None:
        raise AssertionError(message)

    found = find_note(iter_notes(NOTES + bad, problem=fail), "VMCOREINFO")
    assert found == WANT[2]


def test_vmcoreinfo_from_one_note():
    # As at /sys/kernel/vmcoreinfo's address: the note, then the rest of the kernel's buffer.
    assert vmcoreinfo_from_note_bytes(note(b"VMCOREINFO", 0, VMCI) + bytes(100)) == VMCI
    nul_padded = VMCI + b"\0\0"
    assert vmcoreinfo_from_note_bytes(note(b"VMCOREINFO", 0, nul_padded)) == nul_padded
    assert vmcoreinfo_from_note_bytes(note(b"CORE", 0, VMCI)) is None
    assert vmcoreinfo_from_note_bytes(note(b"VMCOREINFO", 0, VMCI)[:-8]) is None
    assert vmcoreinfo_from_note_bytes(bytes(64)) is None
    assert vmcoreinfo_from_note_bytes(b"") is None


# -- hostile input ----------------------------------------------------------------------------

BIG_CORE = (
    ehdr(0xFFFF, phoff=128, shoff=64, shentsize=64)
    + struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 3, 0, 0)
    + phdr(4, 0)
    + phdr(1, 1)
    + phdr(1, 2)
)


def mutated(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos % len(out)] ^= 1 << bit
    return bytes(out[: len(out) - cut])


flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 7)), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([CORE, BIG_CORE]),
    flips,
    st.integers(0, 120),
    st.sampled_from([STRICT, LOOSE]),
    st.booleans(),
)
def test_damaged_headers_parse_or_raise_elf_error(data, bits, cut, limits, known_size):
    data = mutated(data, bits, cut)
    t0 = time.monotonic()
    try:
        h = parse_elf_header(data[:64], big_endian=True)
        source = data if known_size else (lambda o, n: data[o : o + n])
        phdrs = parse_program_headers(source, h, limits)
    except ElfError as e:
        assert "\n" not in str(e)
    else:
        assert 1 <= len(phdrs) <= limits.max_phnum
        assert len(phdrs) * h.e_phentsize <= len(data)
    assert time.monotonic() - t0 < 1


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([NOTES, NOTES + bytes(12)]), flips, st.integers(0, 40), st.sampled_from([4, 8])
)
def test_damaged_notes_stay_within_their_bytes(data, bits, cut, align):
    data = mutated(data, bits, cut)
    t0 = time.monotonic()
    problems: list[str] = []
    notes = parse_notes(data, align, problems.append)
    assert len(notes) <= len(data) // 12
    assert sum(len(n.desc) for n in notes) <= len(data)
    assert len(problems) <= 1
    vmcoreinfo_from_note_bytes(data)
    assert time.monotonic() - t0 < 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_escape_the_documented_errors(data):
    problems: list[str] = []
    parse_notes(data, problem=problems.append)
    vmcoreinfo_from_note_bytes(data)
    with contextlib.suppress(ElfError):
        parse_program_headers(data, parse_elf_header(data), LOOSE)
