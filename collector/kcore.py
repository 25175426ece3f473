"""The layout of /proc/kcore (fs/proc/kcore.c): its PT_LOAD segments and which map RAM.

Shared by acquisition, which reads RAM through the live file, and the profiles, which find
the direct map and the vmemmap from the ``kcore-phdrs`` blob an image carries.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from collector.elf import (
    NO_PADDR,
    PT_LOAD,
    ElfError,
    PhdrLimits,
    parse_elf_header,
    parse_program_headers,
)
from collector.errors import ImageError

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class KcoreSegment:
    """One PT_LOAD of /proc/kcore.

    ``kind`` is ``ram`` for the direct map (the physical reads come from these), ``text``
    for another mapping of physical memory (the kernel image), ``virtual`` for memory with no
    physical address given (vmalloc, modules, vmemmap: ``p_paddr = -1``, or old layouts).
    ``paddr`` is the physical address used for reads (None unless ``ram``).
    """

    index: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    kind: str
    paddr: int | None = None

    @property
    def phys_span(self) -> tuple[int, int] | None:
        """``(start, end)`` of the RAM a ``ram`` segment maps, end exclusive; else None."""
        if self.paddr is None:
            return None
        return self.paddr, self.paddr + self.p_filesz


#: A PT_LOAD as kcore parsing sees it: (index, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz).
Load = tuple[int, int, int, int, int, int]


def classify_loads(loads: Iterable[Load]) -> tuple[int | None, list[KcoreSegment]]:
    """Classify the PT_LOADs of a kcore with physical addresses (Linux 4.11 and later).

    Since commit 464920104bf7 ("/proc/kcore: update physical address for kcore ram and
    text") KCORE_RAM and KCORE_TEXT carry their physical address and every other segment
    ``p_paddr = -1``. The direct map holds all of RAM, so its offset ``p_vaddr - p_paddr``
    carries the most bytes; the kernel text mapping is the only other physical one.

    :returns: the direct map's offset (page_offset_base), or None without physical
        segments, and the segments.
    """
    loads = list(loads)
    totals: dict[int, int] = defaultdict(int)
    for _i, _off, vaddr, paddr, filesz, _memsz in loads:
        if paddr != NO_PADDR:
            totals[(vaddr - paddr) & _U64] += filesz
    base = min(totals, key=lambda d: (-totals[d], d)) if totals else None
    segments = []
    for i, off, vaddr, paddr, filesz, memsz in loads:
        if paddr == NO_PADDR:
            kind, phys = "virtual", None
        elif (vaddr - paddr) & _U64 == base:
            kind, phys = "ram", paddr
        else:
            kind, phys = "text", None
        segments.append(KcoreSegment(i, off, vaddr, paddr, filesz, memsz, kind, phys))
    return base, segments


def parse_kcore_phdrs(data: bytes, max_phdrs: int = 65535) -> list[KcoreSegment]:
    """The PT_LOAD segments of /proc/kcore's ELF header bytes (the ``kcore-phdrs`` blob).

    The bytes are checked as /proc/kcore itself is (:class:`collector.acquire.sources.Kcore`),
    except that the byte order must be little-endian and ``e_type`` is not looked at.

    :raises ImageError: not a little-endian ELF64 header, no program header count, or the
        table is cut short.
    """
    try:
        header = parse_elf_header(data)
        phdrs = parse_program_headers(data, header, PhdrLimits(max_phnum=max_phdrs))
    except ElfError as exc:
        raise ImageError(f"kcore-phdrs: {exc}") from None
    loads = [
        (i, ph.p_offset, ph.p_vaddr, ph.p_paddr, ph.p_filesz, ph.p_memsz)
        for i, ph in enumerate(phdrs)
        if ph.p_type == PT_LOAD
    ]
    return classify_loads(loads)[1]
