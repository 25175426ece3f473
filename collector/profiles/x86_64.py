"""The x86_64 profile: 4- and 5-level page-table walks and the kernel's address-space layout.

Mirrors arch/x86/include/asm/pgtable_types.h (entry bits), arch/x86/include/asm/page_64.h
(``__pa``/``__va``, ``__START_KERNEL_map``, ``phys_base``) and arch/x86/mm/kaslr.c (how
``page_offset_base`` and ``vmemmap_base`` are randomized).
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple, Protocol

from collector.elf import NO_PADDR
from collector.errors import CollectorError, ImageError
from collector.kcore import KcoreSegment, parse_kcore_phdrs
from collector.kernel.vmcoreinfo import VmcoreInfo
from collector.memory import PageNotCaptured, PhysicalMemory

name = "x86_64"
description = "x86_64 Linux: 4-level and 5-level paging, KASLR-aware layout"

PAGE_SIZE = 4096
PTRS_PER_TABLE = 512
#: ``__START_KERNEL_map``: where the kernel image is mapped (arch/x86/include/asm/page_64_types.h).
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: ``__PAGE_OFFSET_BASE_L4`` / ``__PAGE_OFFSET_BASE_L5``: the direct map without KASLR.
PAGE_OFFSET_DEFAULT = {4: 0xFFFF888000000000, 5: 0xFF11000000000000}
#: ``VMEMMAP_START`` without KASLR (``__VMEMMAP_BASE_L4`` / ``__VMEMMAP_BASE_L5``).
VMEMMAP_DEFAULT = {4: 0xFFFFEA0000000000, 5: 0xFFD4000000000000}
#: The module area, ``[MODULES_VADDR, MODULES_END)`` (arch/x86/include/asm/pgtable_64_types.h):
#: MODULES_VADDR is ``__START_KERNEL_map + KERNEL_IMAGE_SIZE``, 512 MiB in (1 GiB with
#: CONFIG_RANDOMIZE_BASE, so modules start at 0xffffffffc0000000 there); MODULES_END is the
#: fixmap's start (0xfffffffffe000000 with CONFIG_DEBUG_KMAP_LOCAL_FORCE_MAP). The same with
#: 4- and 5-level paging.
MODULES_VADDR = 0xFFFFFFFFA0000000
MODULES_END = 0xFFFFFFFFFF000000
#: KASLR places each region on a PUD_SIZE (1 GiB) boundary (arch/x86/mm/kaslr.c).
PUD_SIZE = 1 << 30
#: Bits 12..51 of an entry hold the physical address (``PTE_PFN_MASK`` with 52 physical bits).
ENTRY_ADDR_MASK = 0x000FFFFFFFFFF000
_PRESENT = 1 << 0
_PSE = 1 << 7  # _PAGE_PSE: a 1 GiB page in a PDPT entry, a 2 MiB page in a PD entry
_MAX_PHYS = 1 << 52
_U64 = (1 << 64) - 1

# (level name, shift of the virtual-address bits that index it), top level first.
_LEVELS = {
    4: (("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)),
    5: (("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12)),
}
_ENTRY = struct.Struct("<Q")


# -- errors ----------------------------------------------------------------------------------


class TranslationError(ImageError):
    """A virtual address does not translate; ``level`` names the level that refused it.

    :param vaddr: the virtual address.
    :param level: ``PML5``, ``PML4``, ``PDPT``, ``PD``, ``PT`` or ``canonical``.
    :param steps: the steps walked up to and including the refusing entry.
    """

    def __init__(self, message: str, vaddr: int, level: str, steps: tuple = ()) -> None:
        super().__init__(message)
        self.vaddr = vaddr
        self.level = level
        self.steps = steps


class PageNotPresent(TranslationError):
    """The entry at ``level`` has its present bit clear."""


class NonCanonicalAddress(TranslationError):
    """The address is not canonical for the paging mode (its top bits are not a sign extension)."""


# -- the walk ----------------------------------------------------------------------------------


class Step(NamedTuple):
    """One level of a walk: which entry of which table was read, and its raw value."""

    level: str
    table: int
    index: int
    entry_paddr: int
    entry: int

    def describe(self) -> str:
        return (
            f"{self.level:<4} table {self.table:#x} index {self.index:3d}"
            f"  entry @{self.entry_paddr:#x} = {self.entry:#018x}"
        )


class Translation(NamedTuple):
    """A translated address: ``paddr`` lies in a page of ``page_size`` bytes."""

    vaddr: int
    paddr: int
    page_size: int
    steps: tuple[Step, ...]

    def to_json(self) -> dict:
        """The walk as JSON-ready data: addresses as hex strings, one dict per step."""
        return {
            "vaddr": f"{self.vaddr:#x}",
            "paddr": f"{self.paddr:#x}",
            "page_size": self.page_size,
            "steps": [
                {
                    "level": s.level,
                    "table": f"{s.table:#x}",
                    "index": s.index,
                    "entry_paddr": f"{s.entry_paddr:#x}",
                    "entry": f"{s.entry:#018x}",
                }
                for s in self.steps
            ],
        }

    def describe(self) -> list[str]:
        """The walk as lines of text, one per level, then the result."""
        lines = [step.describe() for step in self.steps]
        lines.append(f"{self.vaddr:#x} -> {self.paddr:#x} ({_size_label(self.page_size)} page)")
        return lines


def _size_label(size: int) -> str:
    return {4096: "4 KiB", 1 << 21: "2 MiB", 1 << 30: "1 GiB"}.get(size, f"{size:#x}-byte")


def _entry_paddr(entry: int, sme_mask: int) -> int:
    return entry & ~sme_mask & ENTRY_ADDR_MASK


class X86_64Paging:
    """Walks x86_64 page tables held in captured physical memory.

    :param memory: the captured physical memory.
    :param top_table_paddr: physical address of the top table (PML4, or PML5 with 5 levels).
    :param levels: 4 or 5.
    :param sme_mask: the memory-encryption C-bit (VMCOREINFO ``NUMBER(sme_mask)``), cleared
        from every entry before its address is used.
    """

    def __init__(
        self, memory: PhysicalMemory, top_table_paddr: int, levels: int = 4, sme_mask: int = 0
    ) -> None:
        if levels not in _LEVELS:
            raise ImageError(f"x86_64 paging has 4 or 5 levels, not {levels}")
        if not 0 <= top_table_paddr < _MAX_PHYS or top_table_paddr % PAGE_SIZE:
            raise ImageError(f"top page table at {top_table_paddr:#x} is not a page address")
        self.memory = memory
        self.top_table_paddr = top_table_paddr
        self.levels = levels
        self.sme_mask = sme_mask & _U64
        self._walk = _LEVELS[levels]
        # Bits above the top level's index must copy bit 47 (4-level) or bit 56 (5-level).
        self._sign_bit = 47 if levels == 4 else 56

    @property
    def mode(self) -> str:
        return f"{self.levels}-level"

    def is_canonical(self, vaddr: int) -> bool:
        top = vaddr >> self._sign_bit
        return top == 0 or top == (1 << (64 - self._sign_bit)) - 1

    def translate(self, vaddr: int) -> Translation:
        """Walk the tables for ``vaddr``.

        :raises NonCanonicalAddress: the address is outside the paging mode's address space.
        :raises PageNotPresent: an entry on the way is not present (``.level`` says which).
        :raises TranslationError: an entry sets a bit the hardware reserves.
        :raises PageNotCaptured: a page-table page is not in the image.
        """
        if not 0 <= vaddr <= _U64:
            raise NonCanonicalAddress(f"{vaddr:#x} is not a 64-bit address", vaddr, "canonical")
        if not self.is_canonical(vaddr):
            raise NonCanonicalAddress(
                f"{vaddr:#x} is not canonical for {self.mode} paging", vaddr, "canonical"
            )
        read = self.memory.read
        table = self.top_table_paddr
        steps: list[Step] = []
        # One pass per level: at most five reads, never a loop over table contents.
        for level, shift in self._walk:
            index = (vaddr >> shift) & (PTRS_PER_TABLE - 1)
            entry_paddr = table + index * 8
            (entry,) = _ENTRY.unpack(read(entry_paddr, 8))
            steps.append(Step(level, table, index, entry_paddr, entry))
            if not entry & _PRESENT:
                raise PageNotPresent(
                    f"{vaddr:#x} is not mapped: {level} entry {index} at {entry_paddr:#x}"
                    f" is not present ({entry:#x})",
                    vaddr,
                    level,
                    tuple(steps),
                )
            base = _entry_paddr(entry, self.sme_mask)
            if level == "PT":
                return Translation(vaddr, base | (vaddr & 0xFFF), PAGE_SIZE, tuple(steps))
            if entry & _PSE:
                if level in ("PML5", "PML4"):
                    raise TranslationError(
                        f"{vaddr:#x}: {level} entry {index} at {entry_paddr:#x} sets the"
                        f" reserved page-size bit ({entry:#x})",
                        vaddr,
                        level,
                        tuple(steps),
                    )
                size = 1 << shift
                # In a large-page entry bit 12 is the PAT bit, not an address bit.
                base &= ~(size - 1)
                return Translation(vaddr, base | (vaddr & (size - 1)), size, tuple(steps))
            table = base
        raise AssertionError("unreachable: the PT level always returns")  # pragma: no cover


# -- the address-space layout ------------------------------------------------------------------


class _SymbolSource(Protocol):
    def get(self, name: str) -> int | None: ...


def _direct_map_from_kcore(segments: list[KcoreSegment]) -> int | None:
    """``p_vaddr - p_paddr`` of kcore's RAM segments (KCORE_RAM: ``p_vaddr = __va(p_paddr)``)."""
    deltas = Counter(
        (s.p_vaddr - s.p_paddr) & _U64
        for s in segments
        if s.kind == "ram" and s.p_vaddr < START_KERNEL_MAP
    )
    if not deltas:
        return None
    (delta, _count), *_ = deltas.most_common(1)
    return delta


def _vmemmap_from_kcore(segments: list[KcoreSegment], sizeof_page: int) -> int | None:
    """Recover ``vmemmap_base`` from kcore's KCORE_VMEMMAP segments.

    fs/proc/kcore.c adds, right after each RAM segment of PFN ``p``, a segment starting at
    ``pfn_to_page(p) & PAGE_MASK`` (``get_sparsemem_vmemmap_info()``). With a PUD-aligned
    base that gives ``vmemmap_base = vaddr - ((p * sizeof(struct page)) & PAGE_MASK)``.
    Every pair must agree.
    """
    found: set[int] = set()
    for ram, nxt in pairwise(segments):
        if ram.kind != "ram" or ram.p_vaddr >= START_KERNEL_MAP or nxt.p_paddr != NO_PADDR:
            continue
        pfn = ram.p_paddr // PAGE_SIZE
        base = (nxt.p_vaddr - ((pfn * sizeof_page) & ~(PAGE_SIZE - 1))) & _U64
        if base % PUD_SIZE == 0:
            found.add(base)
    return found.pop() if len(found) == 1 else None


def top_table_from_vmcoreinfo(vmcoreinfo: VmcoreInfo) -> tuple[int, int, int]:
    """Return ``(top table paddr, levels, sme_mask)`` from VMCOREINFO alone.

    :raises ImageError: VMCOREINFO lacks the top table symbol or ``NUMBER(phys_base)``.
    """
    levels = 5 if vmcoreinfo.pgtable_l5_enabled else 4
    # init_top_pgt since 4.13 ("x86/mm: Rename init_level4_pgt to init_top_pgt"); the
    # generic SYMBOL(swapper_pg_dir) names the same table on x86_64.
    top = vmcoreinfo.symbol("init_top_pgt")
    if top is None:
        top = vmcoreinfo.symbol("swapper_pg_dir")
    if top is None:
        raise ImageError("VMCOREINFO has neither SYMBOL(init_top_pgt) nor SYMBOL(swapper_pg_dir)")
    phys_base = vmcoreinfo.phys_base
    if phys_base is None:
        raise ImageError("VMCOREINFO has no NUMBER(phys_base)")
    paddr = pa_symbol(top, phys_base)
    return paddr, levels, (vmcoreinfo.sme_mask or 0) & _U64


def pa_symbol(vaddr: int, phys_base: int) -> int:
    """``__pa_symbol(x)``: ``x - __START_KERNEL_map + phys_base`` for a kernel-image address.

    ``phys_base`` is a signed ``long`` (negative under KASLR); the sum wraps like C's.

    :raises ImageError: ``vaddr`` is outside the kernel image mapping or the result is not
        a physical address.
    """
    if not START_KERNEL_MAP <= vaddr <= _U64:
        raise ImageError(f"{vaddr:#x} is not in the kernel image mapping")
    paddr = (vaddr - START_KERNEL_MAP + phys_base) & _U64
    if paddr >= _MAX_PHYS:
        raise ImageError(
            f"__pa_symbol({vaddr:#x}) with phys_base {phys_base:#x} gives {paddr:#x},"
            " which is not a physical address"
        )
    return paddr


@dataclass(frozen=True)
class KernelLayout:
    """Where the running kernel put things, as far as the image tells.

    ``sources`` says where ``page_offset_base`` and ``vmemmap_base`` came from; ``notes``
    records every fallback taken and why.
    """

    levels: int
    top_table_paddr: int
    phys_base: int
    kaslr_offset: int
    sme_mask: int
    page_offset_base: int
    vmemmap_base: int
    sizeof_page: int
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def paging_mode(self) -> str:
        return f"{self.levels}-level"

    @classmethod
    def from_image(
        cls,
        memory: PhysicalMemory,
        vmcoreinfo: VmcoreInfo,
        symbols: _SymbolSource | None,
        kcore_phdrs: bytes | None = None,
        paging: X86_64Paging | None = None,
    ) -> KernelLayout:
        """Work out the layout from VMCOREINFO, kcore's headers, symbols and page tables.

        ``page_offset_base``: kcore's RAM segments (``p_vaddr - p_paddr``), else the
        ``page_offset_base`` variable read through the kernel image mapping, else the
        non-KASLR default. ``vmemmap_base``: kcore's vmemmap segments, else the
        ``vmemmap_base`` variable, else the default. Each candidate is checked by walking
        the page tables for one captured RAM page; one that maps elsewhere is passed over.

        :param kcore_phdrs: /proc/kcore's ELF header bytes; None reads blob ``kcore-phdrs``.
        :param paging: the walker to check candidates with; built from VMCOREINFO if None.
        """
        top, levels, sme_mask = top_table_from_vmcoreinfo(vmcoreinfo)
        phys_base = vmcoreinfo.phys_base or 0
        if paging is None:
            paging = X86_64Paging(memory, top, levels, sme_mask)
        sizeof_page = vmcoreinfo.size("page") or 64
        notes: list[str] = []
        if vmcoreinfo.size("page") is None:
            notes.append("VMCOREINFO has no SIZE(page): assuming 64")
        if kcore_phdrs is None:
            kcore_phdrs = memory.blob("kcore-phdrs")
        segments: list[KcoreSegment] = []
        if kcore_phdrs:
            try:
                segments = parse_kcore_phdrs(kcore_phdrs)
            except ImageError as exc:
                notes.append(f"kcore-phdrs ignored: {exc}")

        probe = _probe_page(memory)

        def variable(sym: str) -> int | None:
            addr = symbols.get(sym) if symbols is not None else None
            if addr is None:
                return None
            try:
                (value,) = _ENTRY.unpack(memory.read(pa_symbol(addr, phys_base), 8))
            except (ImageError, PageNotCaptured) as exc:
                notes.append(f"{sym} variable at {addr:#x} unreadable: {exc}")
                return None
            return value

        direct_candidates = [
            ("kcore program headers", lambda: _direct_map_from_kcore(segments)),
            ("page_offset_base variable", lambda: variable("page_offset_base")),
            ("default", lambda: PAGE_OFFSET_DEFAULT[levels]),
        ]
        page_offset_base, direct_source = _choose(
            "page_offset_base",
            direct_candidates,
            lambda base: None if probe is None else _maps_to(paging, base + probe, probe),
            notes,
        )
        vmemmap_candidates = [
            ("kcore program headers", lambda: _vmemmap_from_kcore(segments, sizeof_page)),
            ("vmemmap_base variable", lambda: variable("vmemmap_base")),
            ("default", lambda: VMEMMAP_DEFAULT[levels]),
        ]
        vmemmap_base, vmemmap_source = _choose(
            "vmemmap_base",
            vmemmap_candidates,
            lambda base: (
                None
                if probe is None
                else _maps_to(paging, base + (probe // PAGE_SIZE) * sizeof_page, None)
            ),
            notes,
        )
        return cls(
            levels=levels,
            top_table_paddr=top,
            phys_base=phys_base,
            kaslr_offset=vmcoreinfo.kerneloffset or 0,
            sme_mask=sme_mask,
            page_offset_base=page_offset_base,
            vmemmap_base=vmemmap_base,
            sizeof_page=sizeof_page,
            sources={"page_offset_base": direct_source, "vmemmap_base": vmemmap_source},
            notes=tuple(notes),
        )

    # -- helpers named after the kernel's --------------------------------------------------

    def pa_symbol(self, vaddr: int) -> int:
        """``__pa_symbol()``: physical address of a kernel-image virtual address."""
        return pa_symbol(vaddr, self.phys_base)

    def virt_to_phys(self, vaddr: int) -> int:
        """``__pa()``/``virt_to_phys()``: for the kernel image mapping or the direct map.

        :raises ImageError: the address is in neither (vmalloc, vmemmap: walk the tables).
        """
        if vaddr >= START_KERNEL_MAP:
            return self.pa_symbol(vaddr)
        paddr = vaddr - self.page_offset_base
        if not 0 <= paddr < _MAX_PHYS:
            raise ImageError(f"{vaddr:#x} is not in the direct map at {self.page_offset_base:#x}")
        return paddr

    def phys_to_virt(self, paddr: int) -> int:
        """``__va()``/``phys_to_virt()``: the direct-map address of a physical address."""
        if not 0 <= paddr < _MAX_PHYS:
            raise ImageError(f"{paddr:#x} is not a physical address")
        return self.page_offset_base + paddr

    def pfn_to_page(self, pfn: int) -> int:
        """``pfn_to_page()`` with SPARSEMEM_VMEMMAP: the ``struct page *`` of a PFN."""
        if not 0 <= pfn < _MAX_PHYS // PAGE_SIZE:
            raise ImageError(f"PFN {pfn:#x} is out of range")
        return self.vmemmap_base + pfn * self.sizeof_page

    def page_to_pfn(self, page: int) -> int:
        """``page_to_pfn()``: the PFN of a ``struct page *``.

        :raises ImageError: the pointer is not a struct page in the vmemmap.
        """
        offset = page - self.vmemmap_base
        if (
            offset < 0
            or offset % self.sizeof_page
            or offset // self.sizeof_page >= (_MAX_PHYS // PAGE_SIZE)
        ):
            raise ImageError(
                f"{page:#x} is not a struct page in the vmemmap at {self.vmemmap_base:#x}"
            )
        return offset // self.sizeof_page


#: ``KERNEL_IMAGE_SIZE`` with CONFIG_RANDOMIZE_BASE (arch/x86/include/asm/page_64_types.h):
#: the kernel image mapping ``__START_KERNEL_map`` covers at most this much.
KERNEL_IMAGE_SIZE = 1 << 30
_IOMEM_KERNEL = re.compile(r"^ *([0-9a-f]+)-([0-9a-f]+) : Kernel (?:code|rodata|data|bss)$", re.M)
#: Levels whose absent entry leaves this much unmapped (x86_64 entry spans).
_SPAN = {"PML5": 1 << 48, "PML4": 1 << 39, "PDPT": 1 << 30, "PD": 1 << 21, "PT": 1 << 12}


class KernelImageMap(NamedTuple):
    """The kernel image's own mapping at ``__START_KERNEL_map``: ``size`` bytes at virtual
    ``vaddr`` and physical ``paddr``, and where the bounds came from."""

    vaddr: int
    paddr: int
    size: int
    source: str


def kernel_image_map(
    memory: PhysicalMemory, vmcoreinfo: VmcoreInfo, paging: X86_64Paging, iomem: str | None
) -> KernelImageMap:
    """Where the kernel image lies, physically and in its ``__START_KERNEL_map`` mapping, as
    the kernel-text PT_LOAD of /proc/vmcore describes it (kexec-tools takes the physical
    bounds from the "Kernel code" .. "Kernel bss" lines of /proc/iomem).

    The bounds come from ``iomem`` when it has those lines; else from the page tables: the
    first and last pages mapped in ``[__START_KERNEL_map, + KERNEL_IMAGE_SIZE)`` at
    ``__pa_symbol()`` distance (cleanup_highmap() leaves ``_text`` .. ``_brk_end`` rounded
    to 2 MiB mapped there). Either way the first page must translate to its
    ``__pa_symbol()`` address.

    :raises ImageError: no ``NUMBER(phys_base)``, or no mapping that checks.
    """
    phys_base = vmcoreinfo.phys_base
    if phys_base is None:
        raise ImageError("VMCOREINFO has no NUMBER(phys_base)")
    delta = (START_KERNEL_MAP - phys_base) & _U64  # vaddr = paddr + delta
    spans = [(int(a, 16), int(b, 16) + 1) for a, b in _IOMEM_KERNEL.findall(iomem or "")]
    if spans:
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        if hi - lo > KERNEL_IMAGE_SIZE:
            raise ImageError(
                f"iomem's Kernel code .. bss lines span {hi - lo:#x} bytes, more than the "
                f"{KERNEL_IMAGE_SIZE:#x} the kernel image mapping holds"
            )
        vaddr = (lo + delta) & _U64
        try:
            first = paging.translate(vaddr).paddr
        except (ImageError, PageNotCaptured) as exc:
            raise ImageError(
                f"the kernel image at {vaddr:#x} (from iomem) is not mapped: {exc}"
            ) from None
        if first != lo:
            raise ImageError(
                f"the kernel image at {vaddr:#x} maps to {first:#x}, not to {lo:#x} as iomem's "
                "'Kernel code' and phys_base say"
            )
        return KernelImageMap(vaddr, lo, hi - lo, "iomem")
    start = end = None
    vaddr = START_KERNEL_MAP
    while vaddr < START_KERNEL_MAP + KERNEL_IMAGE_SIZE:
        try:
            t = paging.translate(vaddr)
        except TranslationError as exc:  # not present (or a reserved bit) at exc.level
            span = _SPAN.get(exc.level, _SPAN["PD"])
            vaddr += span - vaddr % span
            continue
        except (ImageError, PageNotCaptured):
            # A table page the image lacks: skip what a page-table page maps at least,
            # so a kernel whose tables are gone costs 512 steps, not 262144.
            vaddr += _SPAN["PD"] - vaddr % _SPAN["PD"]
            continue
        step = t.page_size - vaddr % t.page_size
        if (t.paddr + delta) & _U64 == vaddr:
            start = vaddr if start is None else start
            end = vaddr + step
        vaddr += step
    if start is None or end is None:
        raise ImageError(
            f"nothing in the kernel image mapping at {START_KERNEL_MAP:#x} maps to its "
            f"__pa_symbol() address (phys_base {phys_base:#x})"
        )
    return KernelImageMap(start, (start - delta) & _U64, end - start, "page tables")


def _probe_page(memory: PhysicalMemory) -> int | None:
    """A captured RAM page to check direct-map candidates against, above 1 MiB if any."""
    ranges = memory.ranges()
    for start, end in ranges:
        first = max(start, 0x100000)
        first += -first % PAGE_SIZE
        if first + PAGE_SIZE <= end:
            return first
    for start, end in ranges:
        first = start + -start % PAGE_SIZE
        if first + PAGE_SIZE <= end:
            return first
    return None


def _maps_to(paging: X86_64Paging, vaddr: int, expect: int | None) -> bool | None:
    """Whether ``vaddr`` is mapped (to ``expect`` if given); None when the tables are missing."""
    try:
        result = paging.translate(vaddr)
    except PageNotCaptured:
        return None
    except TranslationError:
        return False
    return expect is None or result.paddr == expect


def _choose(
    what: str,
    candidates: list[tuple[str, Callable[[], int | None]]],
    verify: Callable[[int], bool | None],
    notes: list[str],
) -> tuple[int, str]:
    """Take the first candidate the page tables confirm, or the first one they cannot refute."""
    unrefuted: tuple[int, str] | None = None
    for source, get in candidates:
        value = get()
        if value is None:
            continue
        verdict = verify(value)
        if verdict is True:
            return value, source
        if verdict is None:
            if unrefuted is None:
                unrefuted = (value, source)
            continue
        notes.append(f"{what} {value:#x} from {source} does not map RAM: passed over")
    if unrefuted is not None:
        value, source = unrefuted
        notes.append(f"{what} {value:#x} from {source} could not be checked against page tables")
        return value, source
    # Every candidate mapped elsewhere: keep the default, say so.
    value = candidates[-1][1]()
    notes.append(f"{what}: no candidate checked out; using the default {value:#x}")
    return value, "default (unverified)"


# -- the live-machine check --------------------------------------------------------------------


def check_machine(
    uname_machine: str, cpu_flags: Iterable[str], vmcoreinfo: VmcoreInfo | None
) -> str:
    """Refuse a machine this profile cannot describe; return a one-line summary otherwise.

    Both 4- and 5-level paging are supported, so the ``la57`` CPU flag alone refuses
    nothing: it says the CPU can do 5-level paging, not that the kernel does (a kernel
    without CONFIG_X86_5LEVEL, or booted with ``no5lvl``, runs 4-level). The paging mode is
    read from VMCOREINFO's ``NUMBER(pgtable_l5_enabled)`` when it is available, here or
    offline from the image.

    :raises CollectorError: not x86_64, or VMCOREINFO describes a page size other than 4 KiB.
    """
    if uname_machine != "x86_64":
        raise CollectorError(
            f"profile x86_64 does not describe a {uname_machine or 'unknown'} machine"
        )
    if vmcoreinfo is not None:
        if vmcoreinfo.page_size not in (None, PAGE_SIZE):
            raise CollectorError(
                f"VMCOREINFO says PAGESIZE={vmcoreinfo.page_size}; x86_64 uses {PAGE_SIZE}"
            )
        l5 = vmcoreinfo.pgtable_l5_enabled
        if l5 is not None:
            return f"x86_64, {5 if l5 else 4}-level paging (VMCOREINFO)"
    if "la57" in set(cpu_flags):
        return "x86_64, CPU has la57: 4- or 5-level paging, read from VMCOREINFO offline"
    return "x86_64, 4-level paging (CPU has no la57)"


class Profile:
    """The x86_64 profile as the registry hands it out."""

    name = name
    description = description
    Paging = X86_64Paging
    Layout = KernelLayout
    MODULES_VADDR = MODULES_VADDR
    MODULES_END = MODULES_END

    @staticmethod
    def paging_for(memory: PhysicalMemory, vmcoreinfo: VmcoreInfo) -> X86_64Paging:
        """The walker for the kernel's own page tables, found through VMCOREINFO."""
        top, levels, sme_mask = top_table_from_vmcoreinfo(vmcoreinfo)
        return X86_64Paging(memory, top, levels, sme_mask)

    @staticmethod
    def kernel_image_map(
        memory: PhysicalMemory, vmcoreinfo: VmcoreInfo, paging: X86_64Paging, iomem: str | None
    ) -> KernelImageMap:
        """See :func:`kernel_image_map`."""
        return kernel_image_map(memory, vmcoreinfo, paging, iomem)

    @staticmethod
    def check_machine(
        uname_machine: str, cpu_flags: Iterable[str], vmcoreinfo: VmcoreInfo | None
    ) -> str:
        return check_machine(uname_machine, cpu_flags, vmcoreinfo)


PROFILE = Profile()
