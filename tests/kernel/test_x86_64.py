"""x86_64 page-table walks, the kernel layout discovery, and the profile registry.

Indices below were computed by hand from the address bits: for 0xffff888000123456,
bits 47..39 = 0x111 = 273, bits 38..30 = 0, bits 29..21 = 0, bits 20..12 = 0x123 = 291.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import profiles
from collector.errors import CollectorError, ImageError
from collector.kcore import parse_kcore_phdrs
from collector.kernel.vmcoreinfo import VmcoreInfo
from collector.memory import Fate, PageFate, PageNotCaptured
from collector.profiles.x86_64 import (
    KernelLayout,
    NonCanonicalAddress,
    PageNotPresent,
    TranslationError,
    X86_64Paging,
    check_machine,
)
from collector.testing.pagetables import PAT_LARGE, PS, PageTableBuilder

GiB = 1 << 30
MiB = 1 << 20


def walk(builder: PageTableBuilder, vaddr: int, memory=None, sme_mask: int = 0):
    memory = memory if memory is not None else builder.memory()
    return X86_64Paging(memory, builder.top, builder.levels, sme_mask).translate(vaddr)


# -- 4-level ---------------------------------------------------------------------------------


def test_4level_4k_page_and_steps():
    b = PageTableBuilder(levels=4, top=0x100000)
    b.map(0xFFFF888000123000, 0x5000000)
    t = walk(b, 0xFFFF888000123456)
    assert (t.paddr, t.page_size) == (0x5000456, 4096)
    assert [s.level for s in t.steps] == ["PML4", "PDPT", "PD", "PT"]
    assert [s.index for s in t.steps] == [273, 0, 0, 291]
    assert t.steps[0].table == 0x100000
    assert t.steps[0].entry_paddr == 0x100000 + 273 * 8
    pdpt = b.table_at(0xFFFF888000123456, "PDPT")
    assert t.steps[0].entry & 0x000FFFFFFFFFF000 == pdpt
    assert t.steps[1].table == pdpt
    assert t.steps[3].entry & 0x000FFFFFFFFFF000 == 0x5000000
    data = t.to_json()
    assert data["paddr"] == "0x5000456" and data["page_size"] == 4096
    assert data["steps"][0] == {
        "level": "PML4",
        "table": "0x100000",
        "index": 273,
        "entry_paddr": "0x100888",
        "entry": f"{t.steps[0].entry:#018x}",
    }
    lines = t.describe()
    assert len(lines) == 5
    assert lines[-1] == "0xffff888000123456 -> 0x5000456 (4 KiB page)"
    assert "index 273" in lines[0]


def test_4level_2m_page_ignores_pat_bit():
    b = PageTableBuilder(levels=4)
    b.map(0xFFFFFFFF81200000, 0x3200000, size=2 * MiB, flags=0x63 | PAT_LARGE)
    t = walk(b, 0xFFFFFFFF81234567)
    assert (t.paddr, t.page_size) == (0x3234567, 2 * MiB)
    assert [s.level for s in t.steps] == ["PML4", "PDPT", "PD"]
    assert [s.index for s in t.steps] == [511, 510, 9]
    assert t.steps[-1].entry & PS
    assert t.describe()[-1].endswith("(2 MiB page)")


def test_4level_1g_page():
    b = PageTableBuilder(levels=4)
    b.map(0xFFFF888040000000, 0x40000000, size=GiB)
    t = walk(b, 0xFFFF888052345678)
    assert (t.paddr, t.page_size) == (0x52345678, GiB)
    assert [(s.level, s.index) for s in t.steps] == [("PML4", 273), ("PDPT", 1)]


# -- 5-level ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vaddr, base, paddr, size, expect, indices",
    [
        (0xFF11000000123456, 0xFF11000000123000, 0x5000000, 4096, 0x5000456, [273, 0, 0, 0, 291]),
        (0xFF11000012345678, 0xFF11000012200000, 0x7A00000, 2 * MiB, 0x7B45678, [273, 0, 0, 145]),
        (0xFF110000C0345678, 0xFF110000C0000000, 0x80000000, GiB, 0x80345678, [273, 0, 3]),
    ],
)
def test_5level_pages(vaddr, base, paddr, size, expect, indices):
    b = PageTableBuilder(levels=5)
    b.map(base, paddr, size=size)
    t = walk(b, vaddr)
    assert (t.paddr, t.page_size) == (expect, size)
    assert [s.index for s in t.steps] == indices
    assert [s.level for s in t.steps] == ["PML5", "PML4", "PDPT", "PD", "PT"][: len(indices)]


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [4, 5])
def test_not_present_at_each_level(levels):
    names = ["PML5", "PML4", "PDPT", "PD", "PT"][5 - levels :]
    b = PageTableBuilder(levels=levels)
    base = 0xFF11000000000000 if levels == 5 else 0xFFFF888000000000
    b.map(base, 0x5000000)
    memory = b.memory()
    # Each address shares the mapped path down to one level and then diverges.
    shifts = [48, 39, 30, 21, 12][5 - levels :]
    for level, shift in zip(names, shifts, strict=True):
        other = base + (1 << shift)
        with pytest.raises(PageNotPresent) as info:
            walk(b, other, memory)
        assert info.value.level == level
        assert level in str(info.value)
        assert info.value.vaddr == other
        assert info.value.steps[-1].level == level


def test_sme_mask_is_stripped():
    c_bit = 1 << 47
    b = PageTableBuilder(levels=4, sme_mask=c_bit)
    b.map(0xFFFF888000123000, 0x5000000)
    memory = b.memory()
    t = walk(b, 0xFFFF888000123456, memory, sme_mask=c_bit)
    assert t.paddr == 0x5000456
    assert t.steps[-1].entry & c_bit
    # Without the mask the C-bit reads as an address bit: the next table is not in the image.
    with pytest.raises(PageNotCaptured) as info:
        walk(b, 0xFFFF888000123456, memory, sme_mask=0)
    assert info.value.paddr >= c_bit


@pytest.mark.parametrize(
    "levels, vaddr",
    [
        (4, 0x0000800000000000),
        (4, 0xFFFF7FFFFFFFFFFF),
        (4, 0xFF11000000000000),
        (5, 0x0100000000000000),
        (5, 0xFEFFFFFFFFFFFFFF),
        (4, 1 << 64),
        (4, -1),
    ],
)
def test_non_canonical(levels, vaddr):
    b = PageTableBuilder(levels=levels)
    with pytest.raises(NonCanonicalAddress) as info:
        walk(b, vaddr)
    assert info.value.level == "canonical"


def test_canonical_in_5level_only():
    # Bit 47 set with bits 63..48 clear: canonical for 5-level, not for 4-level.
    b = PageTableBuilder(levels=5)
    with pytest.raises(PageNotPresent) as info:
        walk(b, 0x0000800000000000)
    assert info.value.level == "PML5"


def test_missing_table_page_raises_page_not_captured():
    b = PageTableBuilder(levels=4)
    b.map(0xFFFF888000123000, 0x5000000)
    pd = b.table_at(0xFFFF888000123000, "PD")
    memory = b.memory(fates={pd: PageFate(Fate.UNREADABLE, 5)})
    with pytest.raises(PageNotCaptured) as info:
        walk(b, 0xFFFF888000123456, memory)
    assert info.value.paddr == pd
    assert info.value.fate == Fate.UNREADABLE


def test_reserved_page_size_bit_in_pml4():
    b = PageTableBuilder(levels=4)
    b.set_entry(b.top, 273, 0x200000 | 0x63 | PS)
    with pytest.raises(TranslationError, match="reserved") as info:
        walk(b, 0xFFFF888000000000)
    assert info.value.level == "PML4"


def test_bad_constructor_arguments():
    memory = PageTableBuilder().memory()
    with pytest.raises(ImageError):
        X86_64Paging(memory, 0x100000, levels=3)
    with pytest.raises(ImageError):
        X86_64Paging(memory, 0x100123, levels=4)


_ENTRY = st.one_of(
    st.integers(0, 2**64 - 1),
    # Entries pointing at the captured pages, with random flag bits.
    st.builds(
        lambda page, flags, high: (0x1000 * page) | flags | (high << 52),
        st.integers(1, 6),
        st.integers(0, 0xFFF),
        st.integers(0, 0xFFF),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    levels=st.sampled_from([4, 5]),
    sme=st.sampled_from([0, 1 << 47]),
    pages=st.lists(st.lists(_ENTRY, min_size=1, max_size=6), min_size=6, max_size=6),
    vaddr=st.integers(0, 2**64 - 1),
)
def test_random_tables_only_raise_documented_errors(levels, sme, pages, vaddr):
    from collector.image.sparse import SparseMemory

    ranges = {}
    for i, entries in enumerate(pages):
        tile = (entries * (512 // len(entries) + 1))[:512]
        ranges[0x1000 * (i + 1)] = struct.pack("<512Q", *tile)
    paging = X86_64Paging(SparseMemory(ranges), 0x1000, levels, sme)
    try:
        t = paging.translate(vaddr)
    except (TranslationError, PageNotCaptured):
        return
    assert t.page_size in (4096, 2 * MiB, GiB)
    assert 0 <= t.paddr < 1 << 52
    assert t.paddr % t.page_size == vaddr % t.page_size
    assert len(t.steps) <= levels


# -- the layout --------------------------------------------------------------------------------

VMCOREINFO = """\
OSRELEASE=6.1.0-56-amd64
PAGESIZE=4096
SYMBOL(init_top_pgt)=ffffffff9f60a000
SIZE(page)=64
NUMBER(phys_base)=-408944640
NUMBER(pgtable_l5_enabled)=0
KERNELOFFSET=1c600000
NUMBER(sme_mask)=0
"""
# phys_base = -0x18600000: init_top_pgt is at 0x9f60a000 - 0x80000000 - 0x18600000 = 0x700a000.
TOP = 0x700A000
DIRECT = 0xFFFF8BAD40000000  # a randomized page_offset_base (seen on a 6.1 guest)
VMEMMAP = 0xFFFFF97740000000  # a randomized vmemmap_base (seen on a 6.1 guest)
NO_PADDR = 2**64 - 1


def kcore_header(segments: list[tuple[int, int, int, int]]) -> bytes:
    """/proc/kcore's ELF header and program headers: (p_type, vaddr, paddr, size)."""
    ehdr = bytearray(64)
    ehdr[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHI", ehdr, 16, 4, 62, 1)  # ET_CORE, EM_X86_64
    struct.pack_into("<Q", ehdr, 0x20, 64)
    struct.pack_into("<HHH", ehdr, 0x34, 64, 56, len(segments))
    out = bytes(ehdr)
    for p_type, vaddr, paddr, size in segments:
        out += struct.pack("<IIQQQQQQ", p_type, 7, 0, vaddr, paddr, size, size, 4096)
    return out


KCORE = kcore_header(
    [
        (4, 0, 0, 0),  # PT_NOTE
        (1, 0xFFFFFFFF9D600000, 0x5000000, 0x2800000),  # kernel text
        (1, 0xFFFFB4C2C0000000, NO_PADDR, 32 << 40),  # vmalloc
        (1, DIRECT + 0x1000, 0x1000, 0x9E000),  # RAM, PFN 1
        (1, VMEMMAP, NO_PADDR, 0x1000),  # its struct pages: (1 * 64) & ~0xfff = 0
        (1, DIRECT + 0x100000, 0x100000, 0x3FEE0000),  # RAM, PFN 0x100
        (1, VMEMMAP + 0x4000, NO_PADDR, 0xFFC000),  # (0x100 * 64) & ~0xfff = 0x4000
    ]
)


def layout_tables() -> PageTableBuilder:
    """Tables at init_top_pgt's physical address, mapping the probe page both ways."""
    b = PageTableBuilder(levels=4, top=TOP, alloc=0x7100000)
    b.map(DIRECT + 0x100000, 0x100000)
    b.map(VMEMMAP + 0x4000, 0x7800000)
    return b


def test_layout_from_kcore_headers():
    b = layout_tables()
    memory = b.memory(data={0x100000: bytes(4096)}, blobs={"kcore-phdrs": KCORE})
    info = VmcoreInfo.parse(VMCOREINFO)
    layout = KernelLayout.from_image(memory, info, symbols=None)
    assert layout.levels == 4
    assert layout.paging_mode == "4-level"
    assert layout.top_table_paddr == TOP
    assert layout.phys_base == -0x18600000
    assert layout.kaslr_offset == 0x1C600000
    assert layout.page_offset_base == DIRECT
    assert layout.vmemmap_base == VMEMMAP
    assert layout.sources == {
        "page_offset_base": "kcore program headers",
        "vmemmap_base": "kcore program headers",
    }
    assert layout.notes == ()
    # __pa_symbol, __pa, __va, pfn_to_page, page_to_pfn with hand-computed values.
    assert layout.virt_to_phys(0xFFFFFFFF9F60A000) == TOP
    assert layout.virt_to_phys(0xFFFFFFFF9D600000) == 0x5000000
    assert layout.virt_to_phys(DIRECT + 0x1234) == 0x1234
    assert layout.phys_to_virt(0x1234) == 0xFFFF8BAD40001234
    assert layout.pfn_to_page(0x100) == 0xFFFFF97740004000
    assert layout.page_to_pfn(0xFFFFF97740004000) == 0x100
    with pytest.raises(ImageError):
        layout.page_to_pfn(VMEMMAP + 1)
    with pytest.raises(ImageError):
        layout.virt_to_phys(0xFFFF800000000000)


def test_layout_from_variables_when_kcore_is_wrong():
    b = layout_tables()
    # page_offset_base at ffffffff9f800010: __pa_symbol = 0x1f800010 - 0x18600000 = 0x7200010.
    var_page = bytearray(4096)
    struct.pack_into("<QQ", var_page, 0x10, DIRECT, VMEMMAP)
    wrong = kcore_header([(1, 0xFFFF9D0E80000000 + 0x100000, 0x100000, 0x1000)])
    memory = b.memory(
        data={0x100000: bytes(4096), 0x7200000: bytes(var_page)}, blobs={"kcore-phdrs": wrong}
    )
    symbols = {"page_offset_base": 0xFFFFFFFF9F800010, "vmemmap_base": 0xFFFFFFFF9F800018}
    layout = KernelLayout.from_image(memory, VmcoreInfo.parse(VMCOREINFO), symbols)
    assert layout.page_offset_base == DIRECT
    assert layout.vmemmap_base == VMEMMAP
    assert layout.sources == {
        "page_offset_base": "page_offset_base variable",
        "vmemmap_base": "vmemmap_base variable",
    }
    assert any("0xffff9d0e80000000" in n and "passed over" in n for n in layout.notes)


def test_layout_defaults_without_kaslr():
    b = PageTableBuilder(levels=4, top=TOP, alloc=0x7100000)
    b.map(0xFFFF888000100000, 0x100000)
    b.map(0xFFFFEA0000004000, 0x7800000)
    memory = b.memory(data={0x100000: bytes(4096)})
    layout = KernelLayout.from_image(memory, VmcoreInfo.parse(VMCOREINFO), None)
    assert layout.page_offset_base == 0xFFFF888000000000
    assert layout.vmemmap_base == 0xFFFFEA0000000000
    assert layout.sources["page_offset_base"] == "default"


def test_layout_5level_defaults_and_unverifiable_notes():
    text = VMCOREINFO.replace("pgtable_l5_enabled)=0", "pgtable_l5_enabled)=1")
    b = PageTableBuilder(levels=5, top=TOP, alloc=0x7100000)
    memory = b.memory(data={0x100000: bytes(4096)})
    layout = KernelLayout.from_image(memory, VmcoreInfo.parse(text), None)
    assert layout.levels == 5
    assert layout.page_offset_base == 0xFF11000000000000
    assert layout.vmemmap_base == 0xFFD4000000000000
    # Nothing maps the probe page: the default is kept, and the notes say it is unverified.
    assert layout.sources["page_offset_base"] == "default (unverified)"
    assert any("no candidate checked out" in n for n in layout.notes)


def test_layout_needs_top_table_and_phys_base():
    memory = PageTableBuilder().memory()
    with pytest.raises(ImageError, match="init_top_pgt"):
        KernelLayout.from_image(memory, VmcoreInfo.parse("NUMBER(phys_base)=0\n"), None)
    with pytest.raises(ImageError, match="phys_base"):
        KernelLayout.from_image(
            memory, VmcoreInfo.parse("SYMBOL(init_top_pgt)=ffffffff82a0a000\n"), None
        )


def test_parse_kcore_phdrs_rejects_nonsense():
    segs = parse_kcore_phdrs(KCORE)
    assert len(segs) == 6  # the PT_NOTE is not a PT_LOAD
    assert segs[2].paddr == 0x1000 and segs[3].paddr is None
    with pytest.raises(ImageError, match="ELF"):
        parse_kcore_phdrs(b"\0" * 64)
    with pytest.raises(ImageError, match="cut short"):
        parse_kcore_phdrs(KCORE[:200])


# -- the profile ----------------------------------------------------------------------------


def test_check_machine():
    with pytest.raises(CollectorError, match="aarch64"):
        check_machine("aarch64", [], None)
    l5 = VmcoreInfo.parse("PAGESIZE=4096\nNUMBER(pgtable_l5_enabled)=1\n")
    assert "5-level" in check_machine("x86_64", ["la57"], l5)
    l4 = VmcoreInfo.parse("PAGESIZE=4096\nNUMBER(pgtable_l5_enabled)=0\n")
    assert "4-level" in check_machine("x86_64", ["la57"], l4)
    assert "la57" in check_machine("x86_64", ["fpu", "la57"], None)
    assert "4-level" in check_machine("x86_64", ["fpu"], None)
    with pytest.raises(CollectorError, match="PAGESIZE=16384"):
        check_machine("x86_64", [], VmcoreInfo.parse("PAGESIZE=16384\n"))


def test_registry():
    assert profiles.names() == ["x86_64"]
    assert [p.name for p in profiles.available()] == ["x86_64"]
    profile = profiles.get("x86_64")
    assert profile.description
    assert profile.name == "x86_64"
    assert profile.Paging is X86_64Paging
    with pytest.raises(CollectorError, match="available: x86_64"):
        profiles.get("sparc")
