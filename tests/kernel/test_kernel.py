"""The Kernel object over a synthetic image: VMCOREINFO, page tables, kallsyms, reads."""

from __future__ import annotations

import struct

import pytest

from collector.errors import ImageError, NotApplicable
from collector.kernel.btf import BTF
from collector.kernel.kernel import MAX_READ, Kernel
from collector.kernel.symbols import SymbolNotFound
from collector.memory import PageNotCaptured
from collector.profiles.x86_64 import PageNotPresent
from collector.testing.btf_encoder import Encoder
from collector.testing.pagetables import PageTableBuilder
from tests.kernel import kallsyms_layout

MiB = 1 << 20
# KASLR'd kernel: KERNELOFFSET 0x1c600000, phys_base -0x18600000, so a kernel-image address
# v maps to v - 0xffffffff80000000 - 0x18600000: init_top_pgt 0xffffffff9f60a000 -> 0x700a000,
# the rodata 2 MiB page 0xffffffff9ee00000 -> 0x6800000.
TOP = 0x700A000
RODATA_V, RODATA_P = 0xFFFFFFFF9EE00000, 0x6800000
DIRECT = 0xFFFF8BAD40000000
VMALLOC = 0xFFFFB4C2C0001000
SYMBOLS = [
    ("_stext", "T", 0xFFFFFFFF9D600000),
    ("do_one_initcall", "T", 0xFFFFFFFF9D601F20),
    ("init_task", "D", 0xFFFFFFFF9F20C940),
    ("page_offset_base", "D", 0xFFFFFFFF9EE1A918),
    ("vmemmap_base", "D", 0xFFFFFFFF9EE1A920),
    ("jiffies", "D", 0xFFFFFFFF9F405000),
]
KALLSYMS_V = RODATA_V + 0x20000


def vmcoreinfo_text(kallsyms: kallsyms_layout.KallsymsImage) -> str:
    return (
        "OSRELEASE=6.1.0-56-amd64\n"
        "BUILD-ID=4f1ab6b2c3d9e0a1b2c3d4e5f60718293a4b5c6d\n"
        "PAGESIZE=4096\n"
        "SYMBOL(swapper_pg_dir)=ffffffff9f60a000\n"
        "SIZE(page)=64\n"
        + "\n".join(kallsyms.vmcoreinfo_lines())
        + "\nNUMBER(phys_base)=-408944640\n"
        "SYMBOL(init_top_pgt)=ffffffff9f60a000\n"
        "NUMBER(pgtable_l5_enabled)=0\n"
        "KERNELOFFSET=1c600000\n"
        "NUMBER(sme_mask)=0\n"
    )


def make_image(blobs=None, with_vmcoreinfo_blob=True, extra_data=None):
    kallsyms = kallsyms_layout.build(SYMBOLS, KALLSYMS_V, mode="absolute_percpu")
    b = PageTableBuilder(levels=4, top=TOP, alloc=0x7100000)
    b.map(RODATA_V, RODATA_P, size=2 * MiB)
    b.map(DIRECT + 0x100000, 0x100000)
    b.map(0xFFFFF97740004000, 0x100000)  # struct page of PFN 0x100, for the vmemmap check
    # Two consecutive vmalloc pages backed by physical pages in the opposite order.
    b.map(VMALLOC, 0x302000)
    b.map(VMALLOC + 0x1000, 0x301000)
    b.map(VMALLOC + 0x3000, 0x5000000)  # backed by a page the image lacks
    rodata = bytearray(0x30000)
    rodata[0x20000 : 0x20000 + len(kallsyms.data)] = kallsyms.data
    struct.pack_into("<QQ", rodata, 0x1A918, DIRECT, 0xFFFFF97740000000)
    page_a = bytes(range(256)) * 16
    page_b = b"hello, kernel\0" + b"B" * (4096 - 14)
    data = {RODATA_P: bytes(rodata), 0x100000: bytes(4096), 0x302000: page_a, 0x301000: page_b}
    data.update(extra_data or {})
    all_blobs = dict(blobs or {})
    if with_vmcoreinfo_blob:
        all_blobs["vmcoreinfo"] = vmcoreinfo_text(kallsyms).encode()
    return b.memory(data=data, blobs=all_blobs), kallsyms


def test_identity_and_layout():
    memory, _ = make_image()
    k = Kernel(memory)
    assert k.release == "6.1.0-56-amd64"
    assert k.build_id == "4f1ab6b2c3d9e0a1b2c3d4e5f60718293a4b5c6d"
    assert k.kaslr_offset == 0x1C600000
    assert k.paging_mode == "4-level"
    assert k.paging.top_table_paddr == TOP
    # page_offset_base is read from the variable (decoded kallsyms), checked by a walk.
    assert k.layout.page_offset_base == DIRECT
    assert k.layout.sources == {
        "page_offset_base": "page_offset_base variable",
        "vmemmap_base": "vmemmap_base variable",
    }
    assert k.pfn_to_page(0x100) == 0xFFFFF97740004000
    assert k.page_to_pfn(0xFFFFF97740004000) == 0x100


def test_symbols_decoded_from_memory_and_merged_with_vmcoreinfo():
    memory, kallsyms = make_image()
    k = Kernel(memory)
    assert k.symbols.source == "decoded from memory + vmcoreinfo"
    assert k.symbol("init_task") == 0xFFFFFFFF9F20C940
    assert k.symbol("jiffies") == 0xFFFFFFFF9F405000
    assert k.symbol("init_top_pgt") == 0xFFFFFFFF9F60A000  # from VMCOREINFO only
    assert k.symbol("kallsyms_names") == kallsyms.addresses["kallsyms_names"]
    assert k.symbols.address_to_symbol(0xFFFFFFFF9D601F28) == ("do_one_initcall", 8)
    with pytest.raises(SymbolNotFound, match="'modules'"):
        k.symbol("modules")


def test_kallsyms_blob_wins_unless_unprivileged():
    text = b"ffffffff9d600000 T _stext\nffffffff9f20c940 D init_task\n"
    memory, _ = make_image(blobs={"kallsyms": text})
    k = Kernel(memory)
    assert k.symbols.source == "kallsyms text + vmcoreinfo"
    assert k.symbols.get("jiffies") is None  # not in the text
    zeros = b"0000000000000000 T _stext\n0000000000000000 D init_task\n"
    memory, _ = make_image(blobs={"kallsyms": zeros})
    k = Kernel(memory)
    assert k.symbols.source == "decoded from memory + vmcoreinfo"
    assert k.symbol("jiffies") == 0xFFFFFFFF9F405000
    assert any("without privilege" in n for n in k.notes)


def test_read_virt_across_differently_mapped_pages():
    memory, _ = make_image()
    k = Kernel(memory)
    page_a = bytes(range(256)) * 16
    got = k.read_virt(VMALLOC + 4090, 12)
    assert got == page_a[4090:] + b"hello,"
    assert k.translate(VMALLOC + 4096).paddr == 0x301000
    assert k.read_cstring(VMALLOC + 4096) == b"hello, kernel"
    assert k.read_cstring(VMALLOC + 4096, max_len=5) == b"hello"
    assert k.read_u32(VMALLOC + 4) == 0x07060504
    assert k.read_u64(VMALLOC + 8) == 0x0F0E0D0C0B0A0908
    assert k.read_u8(VMALLOC + 255) == 255
    assert k.read_u16(VMALLOC + 4094) == 0xFFFE
    assert k.read_s32(VMALLOC + 0xFC) == struct.unpack("<i", bytes([252, 253, 254, 255]))[0]
    # A 2 MiB page read straight through the kernel-image mapping.
    assert k.read_pointer(RODATA_V + 0x1A918) == DIRECT
    assert k.read_phys(0x301000, 5) == b"hello"


def test_read_virt_errors():
    memory, _ = make_image()
    k = Kernel(memory)
    with pytest.raises(PageNotPresent):
        k.read_virt(VMALLOC + 0x2000, 8)
    with pytest.raises(ImageError, match="refused"):
        k.read_virt(VMALLOC, MAX_READ + 1)
    with pytest.raises(ImageError, match="refused"):
        k.read_virt(VMALLOC, -1)
    # Mapped, but the backing page is not in the image.
    with pytest.raises(PageNotCaptured):
        k.read_virt(VMALLOC + 0x3000, 1)
    with pytest.raises(PageNotCaptured):
        k.read_phys(0x5000000, 1)


def test_vmcoreinfo_found_in_memory_without_blob():
    _, kallsyms = make_image()
    text = vmcoreinfo_text(kallsyms).encode()
    memory, _ = make_image(with_vmcoreinfo_blob=False, extra_data={0x4000000: text})
    k = Kernel(memory)
    assert k.release == "6.1.0-56-amd64"
    assert k.symbol("jiffies") == 0xFFFFFFFF9F405000


def test_no_vmcoreinfo_is_not_applicable():
    memory, _ = make_image(with_vmcoreinfo_blob=False)
    k = Kernel(memory)
    with pytest.raises(NotApplicable, match="no VMCOREINFO"):
        _ = k.vmcoreinfo
    with pytest.raises(NotApplicable):  # remembered, not searched again
        _ = k.release
    # A kallsyms blob still gives symbols without VMCOREINFO.
    memory, _ = make_image(
        with_vmcoreinfo_blob=False, blobs={"kallsyms": b"ffffffff9d600000 T _stext\n"}
    )
    assert Kernel(memory).symbol("_stext") == 0xFFFFFFFF9D600000


def test_btf_is_lazy_and_structs_delegate():
    memory, _ = make_image()
    with pytest.raises(NotApplicable, match="BTF"):
        _ = Kernel(memory).btf

    # struct pair { u32 a; u64 b; } __packed;
    enc = Encoder()
    u32 = enc.int("unsigned int", 4)
    u64 = enc.int("long long unsigned int", 8)
    enc.struct("pair", 12, [("a", u32, 0), ("b", u64, 32)])
    k = Kernel(memory, btf=BTF.parse(enc.encode()))
    assert k.struct("pair") is k.struct("pair")
    assert [f.name for f in k.struct("pair").fields] == ["a", "b"]
    got = k.read_struct("pair", VMALLOC + 4)
    assert (got.a, got.b) == (0x07060504, 0x0F0E0D0C0B0A0908)
    pytest.importorskip("collector.kernel.bulk")
    arr = k.read_array("pair", VMALLOC + 4, 2)
    assert list(arr["a"]) == [0x07060504, 0x13121110]
    with pytest.raises(ImageError, match="too large"):
        k.read_array("pair", VMALLOC, MAX_READ)
