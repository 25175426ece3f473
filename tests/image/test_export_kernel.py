"""The ELF export as /proc/vmcore: VMCOREINFO (from memory when the image has no blob), a
PT_LOAD for the kernel image at ``__START_KERNEL_map``, and the COLLECTOR notes; checked on
a synthetic kernel whose layout the test sets, by parsing the ELF with struct."""

from __future__ import annotations

import io
import struct

import pytest

from collector.cli import main
from collector.errors import ImageError
from collector.image.elfcore import ElfCore
from collector.image.export import KernelMap, export_elf, export_lime
from collector.image.sparse import SparseMemory
from collector.kernel.kernel import Kernel, kernel_image_map
from collector.testing.kernel import SyntheticKernel

START_KERNEL_MAP = 0xFFFFFFFF80000000
IMAGE_PHYS = 0x1000000  # where SyntheticKernel puts _stext
TWO_MIB = 0x200000


def synthetic() -> SyntheticKernel:
    """Three image pages mapped 4 KiB at a time from 0x1000000 (_stext and two globals'
    pages), a 2 MiB page at 0x1200000, and a stray page mapped elsewhere than
    __pa_symbol() says, which must not count as the kernel image."""
    sk = SyntheticKernel("struct big { char a[5000]; };")
    sk.global_("jiffies_like", "struct big")  # 0x1001000 .. into 0x1002000
    sk.tables.map(START_KERNEL_MAP + 0x1200000, 0x1200000, size=TWO_MIB)
    sk.tables.map(START_KERNEL_MAP + 0x1600000, 0x5000000)
    return sk


def phdrs(data: bytes) -> list[tuple]:
    (e_phoff,) = struct.unpack_from("<Q", data, 32)
    (e_phnum,) = struct.unpack_from("<H", data, 56)
    return [struct.unpack_from("<IIQQQQQQ", data, e_phoff + 56 * i) for i in range(e_phnum)]


def test_kernel_image_from_the_page_tables():
    sk = synthetic()
    kernel = sk.kernel()
    m = kernel_image_map(kernel)
    # _stext's page up to the end of the 2 MiB page; the stray page is not the image.
    assert (m.vaddr, m.paddr, m.size, m.source) == (
        START_KERNEL_MAP + IMAGE_PHYS,
        IMAGE_PHYS,
        0x1400000 - IMAGE_PHYS,
        "page tables",
    )


IOMEM = """\
00001000-0009fbff : System RAM
00100000-1fffffff : System RAM
  01000000-01000fff : Kernel code
  01001000-01001fff : Kernel rodata
  01002000-01002fff : Kernel data
  01003000-01003fff : Kernel bss
"""


def test_kernel_image_from_iomem():
    sk = synthetic()
    sk.blobs["iomem"] = IOMEM.encode()
    m = kernel_image_map(sk.kernel())
    assert (m.vaddr, m.paddr, m.size, m.source) == (
        START_KERNEL_MAP + IMAGE_PHYS,
        IMAGE_PHYS,
        0x4000,
        "iomem",
    )


def test_iomem_that_the_page_tables_contradict_is_refused():
    sk = synthetic()
    sk.blobs["iomem"] = IOMEM.replace(
        "01000000-01000fff : Kernel code", "00900000-00900fff : Kernel code"
    ).encode()
    with pytest.raises(ImageError) as e:
        kernel_image_map(sk.kernel())
    assert str(e.value).startswith(
        f"the kernel image at {START_KERNEL_MAP + 0x900000:#x} (from iomem) is not mapped"
    )


def test_export_elf_kernel_segments_point_into_the_ram_already_written():
    sk = synthetic()
    memory = sk.memory()
    out = io.BytesIO()
    kmap = KernelMap(START_KERNEL_MAP + IMAGE_PHYS, IMAGE_PHYS, 0x400000)
    summary = export_elf(memory, out, vmcoreinfo=sk.vmcoreinfo().encode(), kernel_map=kmap)
    data = out.getvalue()
    loads = [p for p in phdrs(data) if p[0] == 1]
    ram = [p for p in loads if p[3] == 0]  # no direct map base given: p_vaddr 0
    kern = [p for p in loads if p[3] != 0]
    # SparseMemory keeps each page as its own range: the image's three pages held are three
    # kernel PT_LOADs, after the RAM ones, each at its RAM segment's file offset.
    assert summary.kernel_segments == 3 and loads[-3:] == kern
    by_paddr = {p[4]: p for p in ram}
    assert [p[4] for p in kern] == [IMAGE_PHYS, IMAGE_PHYS + 0x1000, IMAGE_PHYS + 0x2000]
    for _, flags, off, vaddr, paddr, filesz, memsz, _ in kern:
        assert flags == 7  # PF_R | PF_W | PF_X, as kexec-tools writes
        assert vaddr == START_KERNEL_MAP + paddr
        assert (off, filesz, memsz) == (by_paddr[paddr][2], 0x1000, 0x1000)
        assert data[off : off + 0x1000] == memory.read(paddr, 0x1000)
    assert len(data) == max(p[2] + p[5] for p in ram)  # nothing stored twice
    core = ElfCore(io.BytesIO(data))
    assert core.problems == []
    assert core.read_virtual(START_KERNEL_MAP + IMAGE_PHYS + 0x1000, 5000) == sk.read(
        START_KERNEL_MAP + IMAGE_PHYS + 0x1000, 5000
    )
    assert core.ranges() == memory.ranges()  # the kernel segments add no physical range


def test_a_kernel_image_outside_the_ranges_is_noted():
    memory = SparseMemory({0x1000: b"\1" * 0x1000})
    summary = export_elf(
        memory, io.BytesIO(), kernel_map=KernelMap(START_KERNEL_MAP, 0x100000, 0x1000)
    )
    assert summary.kernel_segments == 0
    assert summary.notes == [
        "the kernel image at physical 0x100000 is not in the exported ranges: no PT_LOAD for "
        "its virtual addresses"
    ]


def notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    note = next(p for p in phdrs(data) if p[0] == 4)
    off, end = note[2], note[2] + note[5]
    out = []
    while off < end:
        namesz, descsz, type_ = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off : off + namesz].rstrip(b"\0")
        off += (namesz + 3) // 4 * 4
        out.append((name, type_, data[off : off + descsz]))
        off += (descsz + 3) // 4 * 4
    return out


def test_lime_to_elf_finds_vmcoreinfo_in_memory_and_maps_the_kernel(tmp_path, capsys):
    sk = synthetic()
    # The kernel keeps VMCOREINFO in a page of its own (vmcoreinfo_data); LiME has no blob.
    text = sk.vmcoreinfo().encode()
    sk.write(sk.page_offset + 0x3000000, text)
    lime = tmp_path / "k.lime"
    with open(lime, "wb") as f:
        export_lime(sk.memory(), f)
    elf = tmp_path / "k.elf"
    assert main(["export", str(lime), "--to", "elf", "-o", str(elf), "--json"]) == 0
    capsys.readouterr()
    data = elf.read_bytes()
    assert notes(data) == [(b"VMCOREINFO", 0, text)]  # no blobs, no fates in a LiME file
    kern = [p for p in phdrs(data) if p[0] == 1 and p[3] >= START_KERNEL_MAP]
    assert [(p[3], p[4], p[5]) for p in kern] == [
        (START_KERNEL_MAP + IMAGE_PHYS + i * 0x1000, IMAGE_PHYS + i * 0x1000, 0x1000)
        for i in range(3)
    ]
    # ... and the page-offset base comes from the same VMCOREINFO through the page tables.
    ram = [p for p in phdrs(data) if p[0] == 1 and p[3] < START_KERNEL_MAP]
    assert all(p[3] == sk.page_offset + p[4] for p in ram)


def test_elf_export_carries_btf_kallsyms_and_fates_as_collector_notes():
    sk = synthetic()
    sk.drop(START_KERNEL_MAP + IMAGE_PHYS + 0x2000)  # excluded
    memory = sk.memory()
    out = io.BytesIO()
    export_elf(memory, out, vmcoreinfo=sk.vmcoreinfo().encode())
    got = notes(out.getvalue())
    assert [(n, t) for n, t, _ in got] == [
        (b"VMCOREINFO", 0),
        (b"COLLECTOR", 0x434F4C01),
        (b"COLLECTOR", 0x434F4C02),
        (b"COLLECTOR", 0x434F4C03),
    ]
    assert got[1][2] == sk.btf and got[1][2][:2] == b"\x9f\xeb"  # BTF magic
    assert got[2][2] == memory.blob("kallsyms")
    assert got[3][2] == struct.pack("<II", 1, 4096) + struct.pack(
        "<QQIi", IMAGE_PHYS + 0x2000, 1, 4, 0
    )
    core = ElfCore(io.BytesIO(out.getvalue()))
    assert Kernel(core).btf is not None and core.blob("btf") == sk.btf


def test_a_kernel_whose_page_tables_are_gone_costs_a_bounded_walk(monkeypatch):
    from collector.kernel.vmcoreinfo import VmcoreInfo
    from collector.profiles import x86_64

    # A PML4 whose kernel entry (511) points at a PDPT page the image does not hold: every
    # translation in the kernel image mapping fails on reading it.
    pml4 = bytearray(4096)
    pml4[511 * 8 : 512 * 8] = struct.pack("<Q", 0x200000 | 0x63)
    memory = SparseMemory({0x100000: bytes(pml4)})
    info = VmcoreInfo.parse("OSRELEASE=6.1\nPAGESIZE=4096\nNUMBER(phys_base)=0\n")
    paging = x86_64.X86_64Paging(memory, 0x100000, 4)
    calls = []
    real = paging.translate
    monkeypatch.setattr(paging, "translate", lambda v: calls.append(v) or real(v))
    with pytest.raises(ImageError, match="nothing in the kernel image mapping"):
        x86_64.kernel_image_map(memory, info, paging, None)
    assert len(calls) == (1 << 30) // TWO_MIB  # one per 2 MiB, not one per 4 KiB page
