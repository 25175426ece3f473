"""Offline analysis of images captured in real guests, against what the guests and QEMU show.

Each kernel is captured once per session (``capture``; ``la57_capture`` for 6.12 with 5-level
paging) and analysed on the host. The oracles are the guest's own files (uname, /proc/stat,
/proc/kallsyms, /sys/kernel/notes, Debian's kernel config) and QEMU's page walks and physical
reads (QMP ``gva2gpa``, ``pmemsave``), which the guest cannot influence.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import collector
from collector.kernel.btf import cross_check
from collector.kernel.kallsyms_decode import decode_kallsyms
from collector.kernel.kernel import Kernel
from collector.kernel.vmcoreinfo import scan_for_vmcoreinfo
from collector.memory import PageFate, PhysicalMemory
from tests.vm.conftest import Capture, iomem_entries
from tools.vm.guest import REPO_ROOT, Guest
from tools.vm.qmp import QMP

pytestmark = pytest.mark.vm

PAGE = 4096
#: __START_KERNEL_map (arch/x86/include/asm/page_64_types.h): where the kernel image is linked.
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: arch/x86/include/asm/dma.h: ZONE_DMA is the first 16 MiB, ZONE_DMA32 the first 4 GiB.
MAX_DMA_PFN = (16 << 20) // PAGE
MAX_DMA32_PFN = (4 << 30) // PAGE
NT_GNU_BUILD_ID = 3
ELF_NOTE = struct.Struct("<III")  # namesz, descsz, type
#: Read through the kernel's view and QEMU's in the kernel-view checks (as /proc/kcore was).
VIEW_SYMBOLS = ("init_task", "jiffies", "init_top_pgt", "_stext", "linux_banner", "init_uts_ns")
#: Of those, the ones whose first 512 bytes do not change once the system is up: boot code,
#: read-only data, the host name, and the user half of the top page table (always empty).
STABLE_SYMBOLS = ("init_top_pgt", "_stext", "linux_banner", "init_uts_ns")


# -- the guest's own view -------------------------------------------------------------------------

_kallsyms_cache: dict[Path, list[tuple[int, str, str, str | None]]] = {}


def kallsyms_lines(capture: Capture) -> list[tuple[int, str, str, str | None]]:
    """/proc/kallsyms as the guest printed it: ``(address, type, name, module or None)``."""
    lines = _kallsyms_cache.get(capture.image)
    if lines is None:
        lines = []
        for line in capture.fact("kallsyms").decode().splitlines():
            address, kind, name, *module = line.split()
            lines.append((int(address, 16), kind, name, module[0][1:-1] if module else None))
        _kallsyms_cache[capture.image] = lines
    return lines


def core_symbol(capture: Capture, name: str) -> int:
    """The address /proc/kallsyms gives the core kernel's symbol ``name``."""
    (address,) = {a for a, _, n, m in kallsyms_lines(capture) if n == name and m is None}
    return address


def guest_extras(capture: Capture) -> dict[str, bytes]:
    """Guest files the shared capture does not copy: /sys/kernel/notes, /proc/version, the NIS
    domain name and /proc/meminfo's MemTotal line, copied once per capture."""
    out = capture.facts / "analysis"
    if not (out / "meminfo").exists():
        out.mkdir(exist_ok=True)
        where = capture.guest.to_guest(out)
        capture.guest.run(
            f"cat /sys/kernel/notes > {where}/notes && cat /proc/version > {where}/version && "
            f"cat /proc/sys/kernel/domainname > {where}/domainname && "
            f"grep ^MemTotal: /proc/meminfo > {where}/meminfo"
        ).check()
    return {p.name: p.read_bytes() for p in out.iterdir()}


def gnu_build_id(notes: bytes) -> str:
    """The NT_GNU_BUILD_ID descriptor among ELF notes (/sys/kernel/notes), in hex."""
    pos = 0
    while pos + ELF_NOTE.size <= len(notes):
        namesz, descsz, ntype = ELF_NOTE.unpack_from(notes, pos)
        name_at = pos + ELF_NOTE.size
        desc_at = name_at + (namesz + 3) // 4 * 4
        if notes[name_at : name_at + namesz] == b"GNU\0" and ntype == NT_GNU_BUILD_ID:
            return notes[desc_at : desc_at + descsz].hex()
        pos = desc_at + (descsz + 3) // 4 * 4
    raise AssertionError("no GNU build-id note in /sys/kernel/notes")


def config(capture: Capture, option: str) -> str:
    """A ``CONFIG_`` value of the Debian kernel the guest booted."""
    assert capture.guest.kernel is not None
    value = capture.guest.kernel.config_value(option)
    assert value is not None, f"{option} is not set"
    return value


def ram_range_holding(capture: Capture, paddr: int) -> tuple[int, int]:
    (found,) = [r for r in iomem_entries(capture.iomem, "System RAM") if r[0] <= paddr < r[1]]
    return found


# -- QEMU's view ----------------------------------------------------------------------------------


@contextlib.contextmanager
def stopped_in_kernel(guest: Guest) -> Iterator[QMP]:
    """Stop the guest with its CPU in kernel mode (CPL 0), and let it go on afterwards.

    gva2gpa walks the page tables the CPU has loaded. Under page-table isolation (Intel CPU
    models) a CPU stopped in user mode has tables without the direct map (docs/vm.md); the
    bench's AMD model has no isolation, but waiting for CPL 0 keeps the oracle independent of
    that. The agent sleeps between commands, so the CPU is nearly always in the idle loop.
    """
    qmp = guest.qmp
    for _ in range(100):
        qmp.stop()
        if re.search(r"\bCPL=0\b", qmp.human("info registers")):
            break
        qmp.cont()
        time.sleep(0.01)
    else:
        pytest.fail("the guest's CPU never stopped in kernel mode")
    try:
        yield qmp
    finally:
        qmp.cont()


def gva2gpa(qmp: QMP, vaddr: int) -> int:
    paddr = qmp.gva2gpa(vaddr)
    assert paddr is not None, f"QEMU: {vaddr:#x} is not mapped"
    return paddr


def pieces(vaddr: int, size: int) -> list[tuple[int, int]]:
    """``[vaddr, vaddr + size)`` cut at page boundaries: ``(vaddr, size)`` each."""
    out = []
    while size > 0:
        n = min(size, PAGE - vaddr % PAGE)
        out.append((vaddr, n))
        vaddr, size = vaddr + n, size - n
    return out


def qemu_virt(guest: Guest, qmp: QMP, vaddr: int, size: int) -> bytes:
    """Kernel virtual memory as QEMU sees it: each page walked by gva2gpa, then pmemsave'd."""
    return b"".join(
        qmp.read_physical(gva2gpa(qmp, v), n, guest.out_dir) for v, n in pieces(vaddr, size)
    )


def qemu_pointer(guest: Guest, qmp: QMP, vaddr: int) -> int:
    return struct.unpack("<Q", qemu_virt(guest, qmp, vaddr, 8))[0]


def qemu_vmcoreinfo(capture: Capture) -> dict[str, str]:
    """VMCOREINFO as QEMU reads it where /sys/kernel/vmcoreinfo said it is, by key."""
    address, size = capture.fact("vmcoreinfo-location").split()
    # Both are hexadecimal, the size without 0x (kernel/ksysfs.c prints "%pa %x").
    guest = capture.guest
    note = guest.qmp.read_physical(int(address, 16), int(size, 16), guest.out_dir)
    namesz, descsz, ntype = ELF_NOTE.unpack_from(note)
    assert (note[12 : 12 + namesz], ntype) == (b"VMCOREINFO\0", 0)
    text = note[12 + (namesz + 3) // 4 * 4 :][:descsz].split(b"\0", 1)[0].decode()
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def cr4_la57(qmp: QMP) -> bool:
    """Whether the CPU runs 5-level paging: CR4.LA57 (bit 12), as QEMU shows the register."""
    (cr4,) = re.findall(r"\bCR4=([0-9a-f]+)", qmp.human("info registers"))
    return bool(int(cr4, 16) & 1 << 12)


# -- the collector on the host --------------------------------------------------------------------


def host_collect(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `collect` on the host: analysis needs only the image."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def translate_json(capture: Capture, address: str) -> dict[str, Any]:
    result = host_collect("translate", str(capture.image), address, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class WithoutBlobs:
    """An image as if the capture had not stored some blobs (and, optionally, no metadata)."""

    def __init__(self, memory: PhysicalMemory, *hidden: str, metadata: dict | None = None) -> None:
        self._memory = memory
        self._hidden = set(hidden)
        self.page_size = memory.page_size
        self.metadata = memory.metadata if metadata is None else metadata

    def ranges(self) -> list[tuple[int, int]]:
        return self._memory.ranges()

    def read(self, paddr: int, size: int) -> bytes:
        return self._memory.read(paddr, size)

    def fate(self, paddr: int) -> PageFate:
        return self._memory.fate(paddr)

    def blob(self, name: str) -> bytes | None:
        return None if name in self._hidden else self._memory.blob(name)

    def close(self) -> None:
        pass


# -- sysinfo --------------------------------------------------------------------------------------


def check_sysinfo(capture: Capture, paging_mode: str) -> None:
    result = host_collect("analyze", str(capture.image), "sysinfo", "--format", "json")
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    extras = guest_extras(capture)

    # coreutils' uname -a: -s -n -r -v -m, then -o (-p and -i are left out when unknown).
    uname = [record[f] for f in ("sysname", "nodename", "release", "version", "machine")]
    assert capture.fact("uname-a").decode() == " ".join(uname) + " GNU/Linux\n"
    release = capture.fact("uname-r").decode().strip()
    assert record["release"] == record["osrelease"] == release
    assert record["nodename"] == capture.fact("uname-n").decode().strip()
    assert record["domainname"] == extras["domainname"].decode().strip()

    # /proc/stat's btime is getboottime64()'s tv_sec (fs/proc/stat.c): tk_core.timekeeper's
    # offs_real - offs_boot, truncated to whole seconds. sysinfo reads the same two fields from
    # the captured memory and prints whole seconds too, so the two are equal: offs_real moves
    # only when the wall clock is stepped (settimeofday, an NTP step) and offs_boot only across
    # suspend, and the guest does neither between the read of /proc/stat and the capture.
    (btime,) = re.findall(rb"^btime (\d+)$", capture.fact("btime"), re.MULTILINE)
    boot = dt.datetime.strptime(record["boot_time"], "%Y-%m-%dT%H:%M:%SZ")
    assert int(boot.replace(tzinfo=dt.UTC).timestamp()) == int(btime)

    assert record["build_id"] == gnu_build_id(extras["notes"])

    # KERNELOFFSET is kaslr_offset(): _text minus its link address __START_KERNEL, which is
    # __START_KERNEL_map + CONFIG_PHYSICAL_START (aligned to CONFIG_PHYSICAL_ALIGN).
    physical_start = int(config(capture, "CONFIG_PHYSICAL_START"), 0)
    assert physical_start % int(config(capture, "CONFIG_PHYSICAL_ALIGN"), 0) == 0
    link_text = START_KERNEL_MAP + physical_start
    assert link_text == 0xFFFFFFFF81000000
    text = core_symbol(capture, "_text")
    assert record["kerneloffset"] == text - link_text
    # iomem's "Kernel code" starts at __pa_symbol(_text) = _text - __START_KERNEL_map + phys_base.
    (code_start, _), *_ = iomem_entries(capture.iomem, "Kernel code")
    assert record["phys_base"] == code_start - (text - START_KERNEL_MAP)

    assert record["paging_mode"] == paging_mode
    with stopped_in_kernel(capture.guest) as qmp:
        assert cr4_la57(qmp) is (paging_mode == "5-level")
    assert record["page_size"] == PAGE
    ram = iomem_entries(capture.iomem, "System RAM")
    assert record["range_bytes"] == sum(end - start for start, end in ram)
    (mem_total_kib,) = re.findall(rb"^MemTotal:\s+(\d+) kB$", extras["meminfo"], re.MULTILINE)
    assert record["mem_total"] == int(mem_total_kib) * 1024
    assert record["notes"] is None


def test_sysinfo_matches_the_guest(capture: Capture) -> None:
    check_sysinfo(capture, "4-level")


def test_sysinfo_matches_the_five_level_guest(la57_capture: Capture) -> None:
    check_sysinfo(la57_capture, "5-level")


# -- translate ------------------------------------------------------------------------------------


def check_translate(capture: Capture, top_level: str) -> None:
    guest = capture.guest
    names = ("_stext", "start_kernel", "init_task", "jiffies_64")
    start, end = ram_range_holding(capture, 0x100000)
    # One page near the start of RAM and the last one, at offsets inside them.
    ram_pages = (start + 0x5123, end - PAGE + 0x7FF)
    with stopped_in_kernel(guest) as qmp:
        page_offset_base = qemu_pointer(guest, qmp, core_symbol(capture, "page_offset_base"))
        want = {name: gva2gpa(qmp, core_symbol(capture, name)) for name in names}
        for paddr in ram_pages:
            want[hex(page_offset_base + paddr)] = gva2gpa(qmp, page_offset_base + paddr)
    for paddr in ram_pages:
        assert want[hex(page_offset_base + paddr)] == paddr
    for address, paddr in want.items():
        walk = translate_json(capture, address)
        vaddr = int(address, 16) if address.startswith("0x") else core_symbol(capture, address)
        assert (int(walk["vaddr"], 16), int(walk["paddr"], 16)) == (vaddr, paddr), address
        assert walk["steps"][0]["level"] == top_level


def test_translate_matches_qemu(capture: Capture) -> None:
    check_translate(capture, "PML4")


def test_translate_matches_qemu_on_five_level_paging(la57_capture: Capture) -> None:
    check_translate(la57_capture, "PML5")


def check_translate_pfn(capture: Capture) -> None:
    guest = capture.guest
    _, end = ram_range_holding(capture, 0x100000)
    pfn = end // PAGE - 1
    size_of_page = int(qemu_vmcoreinfo(capture)["SIZE(page)"])
    with stopped_in_kernel(guest) as qmp:
        vmemmap_base = qemu_pointer(guest, qmp, core_symbol(capture, "vmemmap_base"))
        page = vmemmap_base + pfn * size_of_page
        paddr = gva2gpa(qmp, page)
    result = host_collect("translate", str(capture.image), "--pfn", hex(pfn), "--json")
    assert result.returncode == 0, result.stderr
    walk = json.loads(result.stdout)
    assert walk["pfn"] == pfn
    assert (int(walk["vaddr"], 16), int(walk["paddr"], 16)) == (page, paddr)


def test_translate_pfn_matches_qemu(capture: Capture) -> None:
    check_translate_pfn(capture)


def test_translate_pfn_matches_qemu_on_five_level_paging(la57_capture: Capture) -> None:
    check_translate_pfn(la57_capture)


# -- BTF against VMCOREINFO -----------------------------------------------------------------------


def test_btf_layout_of_struct_page_agrees_with_vmcoreinfo(capture: Capture, kernel: Kernel) -> None:
    assert kernel.memory.blob("btf") == capture.fact("btf")
    oracle = qemu_vmcoreinfo(capture)
    assert kernel.vmcoreinfo.raw_entries() == oracle
    layout = [k for k in oracle if k.startswith(("SIZE(", "OFFSET(", "LENGTH("))]
    assert len(layout) > 60
    checked = cross_check(kernel.btf, kernel.vmcoreinfo.entries())
    assert list(checked) == []
    # Every type and member VMCOREINFO names is in these kernels' BTF.
    assert checked.missing == []
    btf = kernel.btf
    assert btf.sizeof("page") == int(oracle["SIZE(page)"])
    for member in ("flags", "_refcount", "mapping", "lru", "_mapcount", "private", "compound_head"):
        assert btf.offsetof("page", member) == int(oracle[f"OFFSET(page.{member})"]), member


# -- symbols --------------------------------------------------------------------------------------


def check_decoded_symbols(capture: Capture, kernel: Kernel) -> None:
    decoded = decode_kallsyms(kernel.read_virt, kernel.vmcoreinfo)
    got = Counter((s.address, s.type, s.name) for s in decoded)
    # /proc/kallsyms prints the core kernel's type letters as kallsyms stores them; only module
    # symbols get their case from being exported (kernel/kallsyms.c s_show), so letters agree.
    want = Counter((a, t, n) for a, t, n, module in kallsyms_lines(capture) if module is None)
    assert sum(want.values()) > 50_000
    missing, extra = want - got, got - want
    assert not missing and not extra, (list(missing)[:5], list(extra)[:5])


def test_symbols_decoded_from_memory_equal_proc_kallsyms(capture: Capture, kernel: Kernel) -> None:
    check_decoded_symbols(capture, kernel)


def test_symbols_decoded_from_memory_equal_proc_kallsyms_five_level(
    la57_capture: Capture, la57_kernel: Kernel
) -> None:
    check_decoded_symbols(la57_capture, la57_kernel)


def test_kallsyms_analysis_finds_init_task_and_writes_csv(capture: Capture) -> None:
    image = str(capture.image)
    source = "kallsyms text + vmcoreinfo"
    common = {"source": source, "plugin": "kallsyms", "plugin_version": collector.__version__}
    result = host_collect("analyze", image, "kallsyms", "--name", "init_task", "--format", "json")
    assert result.returncode == 0, result.stderr
    (kind,) = {t for _, t, n, m in kallsyms_lines(capture) if n == "init_task" and m is None}
    assert json.loads(result.stdout) == [
        {
            "address": core_symbol(capture, "init_task"),
            "type": kind,
            "name": "init_task",
            "module": None,
            **common,
        }
    ]

    result = host_collect("analyze", image, "kallsyms", "--format", "csv")
    assert result.returncode == 0, result.stderr
    header, *rows = csv.reader(io.StringIO(result.stdout))
    assert header == ["address", "type", "name", "module", *common]
    assert {len(row) for row in rows} == {len(header)}
    assert {tuple(row[4:]) for row in rows} == {tuple(common.values())}
    addresses = [int(row[0]) for row in rows]
    assert addresses == sorted(addresses)
    # Every line of /proc/kallsyms, plus VMCOREINFO's SYMBOL() entries it does not name.
    want = Counter((a, t, n, m or "") for a, t, n, m in kallsyms_lines(capture))
    named = {n for _, _, n, _ in kallsyms_lines(capture)}
    for key, value in qemu_vmcoreinfo(capture).items():
        found = re.fullmatch(r"SYMBOL\((\w+)\)", key)
        if found and found.group(1) not in named:
            want[(int(value, 16), "?", found.group(1), "")] += 1
    got = Counter((int(a), t, n, m) for a, t, n, m, *_ in rows)
    missing, extra = want - got, got - want
    assert not missing and not extra, (list(missing)[:5], list(extra)[:5])


# -- struct page, in bulk -------------------------------------------------------------------------


def zones_shift(max_nr_zones: int) -> int:
    """ZONES_SHIFT of include/linux/page-flags-layout.h."""
    for shift, zones in ((0, 1), (1, 2), (2, 4), (3, 8)):
        if max_nr_zones <= zones:
            return shift
    raise AssertionError(f"{max_nr_zones} zones")


def check_struct_page_array(capture: Capture, kernel: Kernel) -> None:
    guest, btf = capture.guest, kernel.btf
    # 4096 pages around the ZONE_DMA/ZONE_DMA32 boundary at 16 MiB.
    pfn0, count = MAX_DMA_PFN - 2048, 4096
    start, end = ram_range_holding(capture, pfn0 * PAGE)
    assert start <= pfn0 * PAGE and (pfn0 + count) * PAGE <= end
    pages = kernel.read_array("page", kernel.pfn_to_page(pfn0), count)
    one_by_one = [kernel.read_struct("page", kernel.pfn_to_page(pfn0 + i)) for i in range(count)]
    # v6.18 "mm: introduce memdesc_flags_t" wrapped page->flags in a struct.
    if btf.has_member("page", "flags.f"):
        flags, expected_flags = pages["flags"]["f"].tolist(), [p.flags.f for p in one_by_one]
    else:
        flags, expected_flags = pages["flags"].tolist(), [p.flags for p in one_by_one]
    assert flags == expected_flags
    refcounts = pages["_refcount"]["counter"].tolist()
    assert refcounts == [p._refcount.counter for p in one_by_one]

    # page->flags keeps the node and zone in its top bits: with SPARSEMEM_VMEMMAP no section
    # bits, then NODES_WIDTH = CONFIG_NODES_SHIFT bits (when they fit beside the page flags),
    # then ZONES_WIDTH = ZONES_SHIFT bits (include/linux/page-flags-layout.h, linux/mm.h).
    assert config(capture, "CONFIG_SPARSEMEM_VMEMMAP") == "y"
    nodes = int(config(capture, "CONFIG_NODES_SHIFT"))
    zones = zones_shift(btf.enum_value("zone_type", "__MAX_NR_ZONES"))
    assert zones + nodes <= 64 - btf.enum_value("pageflags", "__NR_PAGEFLAGS")
    zones_pgoff = 64 - nodes - zones

    def node_and_zone(flags: int) -> tuple[int, int]:
        return flags >> (64 - nodes), flags >> zones_pgoff & ((1 << zones) - 1)

    dma, dma32 = btf.enum_value("zone_type", "ZONE_DMA"), btf.enum_value("zone_type", "ZONE_DMA32")
    # One node (the guest has no NUMA); zones by physical address.
    want = [(0, dma if pfn < MAX_DMA_PFN else dma32) for pfn in range(pfn0, pfn0 + count)]
    assert [node_and_zone(f) for f in flags] == want

    # QEMU reads two of those struct pages; the rest of them may have changed since the capture.
    oracle = qemu_vmcoreinfo(capture)
    size_of_page, flags_at = int(oracle["SIZE(page)"]), int(oracle["OFFSET(page.flags)"])
    with stopped_in_kernel(guest) as qmp:
        vmemmap_base = qemu_pointer(guest, qmp, core_symbol(capture, "vmemmap_base"))
        raw = {}
        for pfn in (pfn0, MAX_DMA_PFN):
            page = vmemmap_base + pfn * size_of_page
            assert kernel.pfn_to_page(pfn) == page
            assert kernel.translate(page).paddr == gva2gpa(qmp, page)
            raw[pfn] = qemu_virt(guest, qmp, page, size_of_page)
    for pfn, data in raw.items():
        (qemu_flags,) = struct.unpack_from("<Q", data, flags_at)
        assert node_and_zone(qemu_flags) == node_and_zone(flags[pfn - pfn0]) == want[pfn - pfn0]


def test_struct_page_array_agrees_with_struct_reads_and_qemu(
    capture: Capture, kernel: Kernel
) -> None:
    check_struct_page_array(capture, kernel)


def test_struct_page_array_agrees_with_struct_reads_and_qemu_five_level(
    la57_capture: Capture, la57_kernel: Kernel
) -> None:
    check_struct_page_array(la57_capture, la57_kernel)


# -- the kernel view without the capture's helpers ------------------------------------------------


def check_kernel_view(capture: Capture, kernel: Kernel, la57: bool) -> None:
    """What the kernel layer works out from memory alone, against QEMU.

    Without the kallsyms blob the symbols are decoded from memory; without kcore's program
    headers the direct map and vmemmap come from the kernel's variables; VMCOREINFO is found by
    scanning. Each must agree with the guest as QEMU sees it.
    """
    guest, memory = capture.guest, kernel.memory
    oracle = qemu_vmcoreinfo(capture)
    assert oracle["NUMBER(pgtable_l5_enabled)"] == str(int(la57))
    assert kernel.vmcoreinfo.pgtable_l5_enabled is la57

    location = int(capture.fact("vmcoreinfo-location").split()[0], 16)
    assert memory.metadata["vmcoreinfo_location"][0] == location
    # Found at the address the capture recorded, and by a scan of memory without it.
    for where in (memory, WithoutBlobs(memory, "vmcoreinfo", metadata={})):
        found = scan_for_vmcoreinfo(where)
        assert found is not None and found.raw_entries() == oracle

    from_kcore = Kernel(WithoutBlobs(memory, "kallsyms"))
    from_memory = Kernel(WithoutBlobs(memory, "kallsyms", "kcore-phdrs"))
    struct_page = from_memory.pfn_to_page(0x201)
    with stopped_in_kernel(guest) as qmp:
        variables = [
            qemu_pointer(guest, qmp, core_symbol(capture, name))
            for name in ("page_offset_base", "vmemmap_base")
        ]
        walks, stable = {}, {}
        for name in VIEW_SYMBOLS:
            address = core_symbol(capture, name)
            walks[name] = [(gva2gpa(qmp, v), n) for v, n in pieces(address, 512)]
            if name in STABLE_SYMBOLS:
                stable[name] = qemu_virt(guest, qmp, address, 512)
        struct_page_paddr = gva2gpa(qmp, struct_page)

    assert [from_kcore.layout.page_offset_base, from_kcore.layout.vmemmap_base] == variables
    assert from_kcore.layout.sources == {
        "page_offset_base": "kcore program headers",
        "vmemmap_base": "kcore program headers",
    }
    assert [from_memory.layout.page_offset_base, from_memory.layout.vmemmap_base] == variables
    assert from_memory.layout.sources == {
        "page_offset_base": "page_offset_base variable",
        "vmemmap_base": "vmemmap_base variable",
    }
    assert from_memory.symbols.source == "decoded from memory + vmcoreinfo"
    assert from_memory.paging_mode == ("5-level" if la57 else "4-level")

    for name in VIEW_SYMBOLS:
        address = core_symbol(capture, name)
        assert from_memory.symbol(name) == address, name
        paddrs = [from_memory.translate(v).paddr for v, _ in pieces(address, 512)]
        assert paddrs == [p for p, _ in walks[name]], name
        data = from_memory.read_virt(address, 512)
        assert data == b"".join(memory.read(p, n) for p, n in walks[name]), name
        if name in STABLE_SYMBOLS:
            assert data == stable[name], name

    release = capture.fact("uname-r").decode().strip()
    banner = from_memory.read_cstring(core_symbol(capture, "linux_banner"), 512).decode()
    assert banner.startswith(f"Linux version {release} ")
    assert banner == guest_extras(capture)["version"].decode()

    assert struct_page == variables[1] + 0x201 * int(oracle["SIZE(page)"])
    assert from_memory.translate(struct_page).paddr == struct_page_paddr
    assert from_memory.read_virt(struct_page, 64) == memory.read(struct_page_paddr, 64)


def test_kernel_view_from_memory_alone_agrees_with_qemu(capture: Capture, kernel: Kernel) -> None:
    check_kernel_view(capture, kernel, la57=False)


def test_kernel_view_from_memory_alone_agrees_with_qemu_five_level(
    la57_capture: Capture, la57_kernel: Kernel
) -> None:
    check_kernel_view(la57_capture, la57_kernel, la57=True)
