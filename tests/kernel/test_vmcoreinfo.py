"""VMCOREINFO parsing, ELF notes, and finding the text in captured physical memory."""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.errors import ImageError
from collector.image.lime import LimeImage
from collector.image.sparse import SparseMemory
from collector.kernel.vmcoreinfo import VmcoreInfo, scan_for_vmcoreinfo
from collector.memory import Fate, PageFate
from collector.profiles.x86_64 import pa_symbol, top_table_from_vmcoreinfo

FIXTURE = Path(__file__).parent.parent / "data" / "kernel" / "vmcoreinfo-6.1.txt"

SMALL = (
    "OSRELEASE=6.12.9-amd64\n"
    "BUILD-ID=00112233445566778899aabbccddeeff00112233\n"
    "PAGESIZE=4096\n"
    "SYMBOL(init_top_pgt)=ffffffffa3e0a000\n"
    "OFFSET(page.flags)=0\n"
    "NUMBER(phys_base)=-1073741824\n"
    "NUMBER(pgtable_l5_enabled)=1\n"
    "KERNELOFFSET=22000000\n"
    "CRASHTIME=1700000000\n"
)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF64 note: header, name padded to 4, descriptor padded to 4."""
    name_z = name + b"\0"
    return (
        struct.pack("<III", len(name_z), len(desc), ntype)
        + name_z
        + b"\0" * (-len(name_z) % 4)
        + desc
        + b"\0" * (-len(desc) % 4)
    )


def test_fixture_measured_values():
    info = VmcoreInfo.parse(FIXTURE.read_text())
    assert info.osrelease == "6.1.0-56-amd64"
    assert info.build_id == "eb4fbcd037e7253717950bf2b93bd5566f47c56f"
    assert info.page_size == 4096
    assert info.size("page") == 64
    assert info.offset("page.flags") == 0
    assert info.offset("page._refcount") == 52
    assert info.offset("page.mapping") == 24
    assert info.offset("page.lru") == 8
    assert info.offset("page._mapcount") == 48
    assert info.offset("page.private") == 40
    assert info.offset("page.compound_head") == 8
    assert info.number("SECTION_SIZE_BITS") == 27
    assert info.number("MAX_PHYSMEM_BITS") == 46
    assert info.number("PG_lru") == 4
    assert info.number("PG_slab") == 9
    assert info.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129
    assert info.pgtable_l5_enabled is False
    assert info.phys_base == -0x9C00000
    assert info.kerneloffset == 0x16800000
    assert info.symbol("init_top_pgt") == 0xFFFFFFFF99210000
    assert info.symbol("swapper_pg_dir") == 0xFFFFFFFF99210000
    assert info.symbol("_stext") == 0xFFFFFFFF97800000
    assert info.length("node_data") == 1024
    assert info.sme_mask == 0
    for name in (
        "kallsyms_names",
        "kallsyms_num_syms",
        "kallsyms_token_table",
        "kallsyms_token_index",
        "kallsyms_offsets",
        "kallsyms_relative_base",
        "prb",
        "mem_section",
        "node_data",
    ):
        assert info.symbol(name) is not None, name


def test_fixture_address_arithmetic_matches_the_same_boot():
    info = VmcoreInfo.parse(FIXTURE.read_text())
    # KERNELOFFSET moves _stext from its link address 0xffffffff81000000.
    assert 0xFFFFFFFF81000000 + info.kerneloffset == info.symbol("_stext")
    # kcore's text segment in that boot had p_paddr 0xdc00000 for _stext.
    assert pa_symbol(info.symbol("_stext"), info.phys_base) == 0xDC00000
    # 0xffffffff99210000 - 0xffffffff80000000 - 0x9c00000 = 0xf610000, 4 levels, no C-bit.
    assert top_table_from_vmcoreinfo(info) == (0xF610000, 4, 0)


def test_accessors_and_entries():
    info = VmcoreInfo.parse(SMALL.encode())
    assert info.osrelease == "6.12.9-amd64"
    assert info.build_id == "00112233445566778899aabbccddeeff00112233"
    assert info.phys_base == -1073741824
    assert info.pgtable_l5_enabled is True
    assert info.kerneloffset == 0x22000000
    assert info.crashtime == 1700000000
    entries = info.entries()
    assert entries["SYMBOL(init_top_pgt)"] == 0xFFFFFFFFA3E0A000
    assert entries["OFFSET(page.flags)"] == 0
    assert entries["OSRELEASE"] == "6.12.9-amd64"
    assert info.raw_entries()["SYMBOL(init_top_pgt)"] == "ffffffffa3e0a000"
    assert "PAGESIZE" in info
    assert info.symbols() == {"init_top_pgt": 0xFFFFFFFFA3E0A000}


def test_missing_keys_give_none_or_a_named_error():
    info = VmcoreInfo.parse(SMALL)
    assert info.symbol("init_task") is None
    assert info.size("page") is None
    assert info.length("mem_section") is None
    assert info.sme_mask is None
    with pytest.raises(ImageError, match=r"VMCOREINFO has no SIZE\(page\)"):
        info.require("SIZE", "page")
    assert info.require("NUMBER", "phys_base") == -1073741824


def test_hex_number_and_trailing_nul_padding():
    info = VmcoreInfo.parse(b"NUMBER(kimage_voffset)=0xffffffc008000000\nPAGESIZE=4096\n\0\0\0")
    assert info.number("kimage_voffset") == 0xFFFFFFC008000000


@pytest.mark.parametrize(
    "text, message",
    [
        ("OSRELEASE=1\n" + "A" * 5000 + "=1\n", "longer than"),
        ("no equals sign here\n", "not KEY=VALUE"),
        ("SYMBOL(init_top_pgt)=zzzz\n", "not a hex address"),
        ("SIZE(page)=sixty-four\n", "not a number"),
        ("PAGESIZE=4095\n", "not a power of two"),
        ("NUMBER(x)=99999999999999999999\n", "does not fit"),
        ("", "no KEY=VALUE"),
        ("bad key!=1\n", "not KEY=VALUE"),
    ],
)
def test_nonsense_is_an_image_error(text, message):
    with pytest.raises(ImageError, match=message):
        VmcoreInfo.parse(text)


def test_binary_garbage_and_huge_input():
    with pytest.raises(ImageError, match="non-ASCII"):
        VmcoreInfo.parse(b"OSRELEASE=\xff\xfe\n")
    with pytest.raises(ImageError, match="more than"):
        VmcoreInfo.parse(b"A=1\n" * 20000)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600)))
def test_hostile_text_parses_or_raises_image_error(data):
    with contextlib.suppress(ImageError):
        VmcoreInfo.parse(data)


def test_from_elf_notes():
    text = SMALL.encode()
    notes = note(b"CORE", 1, b"\1" * 336) + note(b"VMCOREINFO", 0, text)
    info = VmcoreInfo.from_elf_notes(notes)
    assert info.osrelease == "6.12.9-amd64"
    with pytest.raises(ImageError, match="no VMCOREINFO"):
        VmcoreInfo.from_elf_notes(note(b"CORE", 1, b"x" * 8))
    with pytest.raises(ImageError, match="past the end"):
        VmcoreInfo.from_elf_notes(notes[:-20])
    # A whole note as the 'vmcoreinfo' blob, as well as bare text.
    assert VmcoreInfo.from_blob(note(b"VMCOREINFO", 0, text)).symbol("init_top_pgt") == (
        0xFFFFFFFFA3E0A000
    )
    assert VmcoreInfo.from_blob(text).page_size == 4096


def _page(fill: int) -> bytearray:
    return bytearray([fill]) * 4096


def test_scan_finds_page_aligned_text_and_skips_format_strings():
    text = SMALL.encode() + b"\0"
    ram = bytearray(8 * 4096)
    # rodata-like decoy: the kernel's own format strings.
    decoy = b"OSRELEASE=%s\n\0PAGESIZE=%ld\n\0"
    ram[0x1100 : 0x1100 + len(decoy)] = decoy
    ram[5 * 4096 : 5 * 4096 + len(text)] = text
    memory = SparseMemory({0x40000000: bytes(ram)})
    info = scan_for_vmcoreinfo(memory, chunk=8192)
    assert info is not None and info.osrelease == "6.12.9-amd64"
    assert info.paddr == 0x40000000 + 5 * 4096


def test_scan_prefers_metadata_paddr_note():
    other = SMALL.replace("6.12.9-amd64", "6.12.9-stale").encode()
    real = note(b"VMCOREINFO", 0, SMALL.encode())
    ram = bytearray(4 * 4096)
    ram[0 : len(other)] = other
    ram[2 * 4096 : 2 * 4096 + len(real)] = real
    memory = SparseMemory({0x1000000: bytes(ram)}, metadata={"vmcoreinfo_paddr": "0x1002000"})
    assert scan_for_vmcoreinfo(memory).osrelease == "6.12.9-amd64"
    # The capture's header records /sys/kernel/vmcoreinfo as [paddr, size].
    memory = SparseMemory(
        {0x1000000: bytes(ram)}, metadata={"vmcoreinfo_location": [0x1002000, 1024]}
    )
    assert scan_for_vmcoreinfo(memory).osrelease == "6.12.9-amd64"
    memory = SparseMemory({0x1000000: bytes(ram)})
    assert scan_for_vmcoreinfo(memory).osrelease == "6.12.9-stale"


def test_scan_aligned_note_beats_unaligned_copy_and_skips_uncaptured_pages():
    stray = SMALL.replace("6.12.9-amd64", "6.12.9-copy").encode()
    real = note(b"VMCOREINFO", 0, SMALL.encode())
    ram = bytearray(6 * 4096)
    ram[0x234 : 0x234 + len(stray)] = stray
    ram[4 * 4096 : 4 * 4096 + len(real)] = real
    fates = {0x2000 + 2 * 4096: PageFate(Fate.UNREADABLE, 5)}
    memory = SparseMemory({0x2000: bytes(ram)}, fates=fates)
    info = scan_for_vmcoreinfo(memory, chunk=4096)
    assert info.osrelease == "6.12.9-amd64"
    # The text starts after the note's 12-byte header and its 12-byte name "VMCOREINFO\0".
    assert info.paddr == 0x2000 + 4 * 4096 + 24


def test_scan_falls_back_to_unaligned_copy_and_returns_none_without_any():
    stray = SMALL.encode()
    ram = bytearray(3 * 4096)
    ram[0x777 : 0x777 + len(stray)] = stray
    info = scan_for_vmcoreinfo(SparseMemory({0: bytes(ram)}))
    assert (info.osrelease, info.paddr) == ("6.12.9-amd64", 0x777)
    assert scan_for_vmcoreinfo(SparseMemory({0: bytes(3 * 4096)})) is None


def test_scan_limit_bounds_the_work():
    ram = bytearray(16 * 4096)
    text = SMALL.encode()
    ram[12 * 4096 : 12 * 4096 + len(text)] = text
    memory = SparseMemory({0: bytes(ram)})
    assert scan_for_vmcoreinfo(memory, chunk=4096, limit=8 * 4096) is None
    assert scan_for_vmcoreinfo(memory, chunk=4096) is not None


def test_scan_of_memory_full_of_the_needle_is_bounded():
    flood = (b"OSRELEASE=" * 26000)[: 64 * 4096]
    memory = SparseMemory({0: flood})
    assert scan_for_vmcoreinfo(memory) is None


def test_scan_skips_ranges_the_image_announces_but_does_not_hold():
    # A LiME file whose first range claims 2^63 bytes but holds one page, followed by
    # nothing: the scan must skip the missing 2^63 - 4096 bytes whole, not page by page.
    # (At a microsecond a page, a page-by-page scan would take about 70,000 years.)
    page = bytearray(4096)
    text = SMALL.encode() + b"\0"
    page[: len(text)] = text
    header = struct.pack("<IIQQ8x", 0x4C694D45, 1, 0x100000, 0x100000 + (1 << 63) - 1)
    memory = LimeImage(io.BytesIO(header + bytes(page)))
    assert memory.readable_ranges() == [(0x100000, 0x101000)]
    info = scan_for_vmcoreinfo(memory)
    assert info is not None and info.osrelease == "6.12.9-amd64"
