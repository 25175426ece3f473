"""Builds synthetic x86_64 page tables in physical pages, independently of the walker.

Entry layout from the Intel SDM vol. 3A, 4.5: bit 0 present, bit 1 writable, bit 7 page size
in PDPT/PD entries, bits 12..51 the physical address.
"""

from __future__ import annotations

import struct

from collector.image.sparse import SparseMemory
from collector.memory import PageFate

PRESENT = 0x1
RW = 0x2
USER = 0x4
ACCESSED = 0x20
DIRTY = 0x40
PS = 0x80
PAT_LARGE = 0x1000  # the PAT bit of a 2 MiB/1 GiB entry
NX = 1 << 63
TABLE_FLAGS = PRESENT | RW | ACCESSED | DIRTY
LEAF_FLAGS = PRESENT | RW | ACCESSED | DIRTY
ADDR = 0x000FFFFFFFFFF000

SHIFTS = {4: (39, 30, 21, 12), 5: (48, 39, 30, 21, 12)}
NAMES = {4: ("PML4", "PDPT", "PD", "PT"), 5: ("PML5", "PML4", "PDPT", "PD", "PT")}
LEAF_SHIFT = {4096: 12, 2 << 20: 21, 1 << 30: 30}


class PageTableBuilder:
    """Page tables plus data pages, turned into a SparseMemory by :meth:`memory`.

    :param levels: 4 or 5.
    :param top: physical address of the top table.
    :param alloc: where further table pages are allocated, one page after another.
    :param sme_mask: a C-bit set in every entry written, as SME does.
    """

    def __init__(
        self, levels: int = 4, top: int = 0x100000, alloc: int = 0x200000, sme_mask: int = 0
    ) -> None:
        self.levels = levels
        self.sme_mask = sme_mask
        self.pages: dict[int, bytearray] = {}
        self._next = alloc
        self.top = top
        self.pages[top] = bytearray(4096)
        #: (vaddr's table at each level) -> table paddr, for tests that poke entries.
        self.tables: dict[tuple[str, int], int] = {}

    def _alloc(self) -> int:
        while self._next in self.pages:
            self._next += 4096
        paddr = self._next
        self.pages[paddr] = bytearray(4096)
        self._next += 4096
        return paddr

    def entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.pages[table], index * 8)[0]

    def set_entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.pages[table], index * 8, value)

    def table_at(self, vaddr: int, level: str) -> int:
        """The physical address of the table at ``level`` that ``vaddr`` walks through."""
        table = self.top
        for name, shift in zip(NAMES[self.levels], SHIFTS[self.levels], strict=True):
            if name == level:
                return table
            entry = self.entry(table, (vaddr >> shift) & 511)
            if not entry & PRESENT:
                raise KeyError(f"{vaddr:#x} has no {level} table")
            table = entry & ADDR & ~self.sme_mask
        raise KeyError(level)

    def map(self, vaddr: int, paddr: int, size: int = 4096, flags: int = LEAF_FLAGS) -> None:
        """Map one page of ``size`` (4 KiB, 2 MiB or 1 GiB) at ``vaddr`` to ``paddr``."""
        leaf = LEAF_SHIFT[size]
        assert vaddr % size == 0 and paddr % size == 0
        table = self.top
        for shift in SHIFTS[self.levels]:
            index = (vaddr >> shift) & 511
            if shift == leaf:
                value = paddr | flags | (PS if size > 4096 else 0) | self.sme_mask
                self.set_entry(table, index, value)
                return
            entry = self.entry(table, index)
            if entry & PRESENT:
                assert not entry & PS or shift == 12, "remapping inside a large page"
                table = entry & ADDR & ~self.sme_mask
            else:
                new = self._alloc()
                self.set_entry(table, index, new | TABLE_FLAGS | self.sme_mask)
                table = new

    def memory(
        self,
        data: dict[int, bytes] | None = None,
        fates: dict[int, PageFate] | None = None,
        blobs: dict[str, bytes] | None = None,
        metadata: dict | None = None,
    ) -> SparseMemory:
        """The tables and ``data`` (``{paddr: bytes}``, page-aligned) as physical memory."""
        ranges: dict[int, bytes] = {p: bytes(b) for p, b in self.pages.items()}
        for paddr, blob in (data or {}).items():
            for off in range(0, len(blob), 4096):
                assert paddr + off not in ranges, f"data overlaps a table at {paddr + off:#x}"
            ranges[paddr] = bytes(blob)
        return SparseMemory(ranges, fates=fates, blobs=blobs, metadata=metadata)
