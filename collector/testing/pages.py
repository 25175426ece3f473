"""Synthetic memory maps for tests and benchmarks: struct page arrays in each kernel layout.

:class:`MemoryMap` declares ``struct page`` as one of four eras of the kernel lays it out
(include/linux/mm_types.h, page-flags.h), plus the node, zone, section and per-CPU
structures the page walker reads, in a :class:`~collector.testing.kernel.SyntheticKernel`;
a test then sets pages one by one (``buddy``, ``slab``, ``anon``...) through the layout the
BTF is compiled from, so the walker reads them back through the construct definition that
BTF gives, never through offsets written twice.

Eras: ``"6.1"`` (PG_slab, page types as inverted bits in _mapcount, compound_dtor and
compound_order in the second page), ``"6.6"`` (the order in the second page's flags,
PG_hugetlb on it), ``"6.9"`` (hugetlb a page type, still a #define), ``"6.10"`` (enum
pagetype of inverted bits: slab a type too), ``"6.12"`` (one type in the top byte of
page_type) and ``"6.18"`` (page->flags a memdesc_flags_t; large_kmalloc a type).
"""

from __future__ import annotations

import struct

from collector.testing.kernel import SyntheticKernel

ERAS = ("6.1", "6.6", "6.9", "6.10", "6.12", "6.18")
#: Eras whose page types are #defines (no enum pagetype), marked as inverted bits.
_DEFINED_TYPES = {
    "6.1": {"buddy": 0x80, "offline": 0x100, "table": 0x200, "guard": 0x400},
    "6.6": {"buddy": 0x80, "offline": 0x100, "table": 0x200, "guard": 0x400},
    "6.9": {"buddy": 0x80, "offline": 0x100, "table": 0x200, "guard": 0x400, "hugetlb": 0x800},
}
PAGE = 4096
HUGE = 2 << 20
#: The non-KASLR vmemmap_base of 4-level paging (arch/x86/include/asm/pgtable_64_types.h).
VMEMMAP_START = 0xFFFFEA0000000000
SECTION_SIZE_BITS = 27
PAGES_PER_SECTION = 1 << (SECTION_SIZE_BITS - 12)

_COMMON = """
struct list_head { struct list_head *next, *prev; };
typedef struct { int counter; } atomic_t;
typedef struct { long counter; } atomic_long_t;
struct cpumask { unsigned long bits[1]; };
struct address_space { unsigned long flags; };
struct slab;
struct kmem_cache_cpu { void **freelist; unsigned long tid; struct slab *slab; struct slab *partial; };
struct kmem_cache { struct kmem_cache_cpu *cpu_slab; unsigned long flags; unsigned int size;
    unsigned int object_size; unsigned int offset; unsigned int red_left_pad; char *name;
    unsigned long random; };
struct free_area { struct list_head free_list[5]; unsigned long nr_free; };
struct per_cpu_pages { int count; int high; int batch; struct list_head lists[13]; };
struct zone {
    unsigned long zone_start_pfn; unsigned long spanned_pages; unsigned long present_pages;
    char *name; struct per_cpu_pages *per_cpu_pageset; struct free_area free_area[11];
};
struct pglist_data {
    struct zone node_zones[2]; unsigned long node_start_pfn; unsigned long node_spanned_pages;
    int node_id;
};
struct mem_section { unsigned long section_mem_map; unsigned long *usage; };
enum zone_type { ZONE_DMA32, ZONE_NORMAL, __MAX_NR_ZONES };
enum migratetype { MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE, MIGRATE_PCPTYPES };
"""

#: enum pageflags as 6.1 numbers them (NUMBER(PG_slab)=9, PG_head_mask 1 << 16 in VMCOREINFO).
_FLAGS_6_1 = """
enum pageflags { PG_locked = 0, PG_referenced = 1, PG_uptodate = 2, PG_dirty = 3, PG_lru = 4,
    PG_active = 5, PG_workingset = 6, PG_waiters = 7, PG_error = 8, PG_slab = 9,
    PG_owner_priv_1 = 10, PG_arch_1 = 11, PG_reserved = 12, PG_private = 13,
    PG_private_2 = 14, PG_writeback = 15, PG_head = 16, PG_mappedtodisk = 17, PG_reclaim = 18,
    PG_swapbacked = 19, PG_unevictable = 20, PG_mlocked = 21, PG_uncached = 22,
    PG_hwpoison = 23, __NR_PAGEFLAGS = 24, PG_swapcache = 10 };
"""
#: Later kernels renumbered the flags (PG_head moved down, PG_slab went): numbers that differ
#: from 6.1's, so a test proves they are read from the kernel.
_FLAGS_LATER = """
enum pageflags { PG_locked = 0, PG_writeback = 1, PG_referenced = 2, PG_uptodate = 3,
    PG_dirty = 4, PG_lru = 5, PG_head = 6, PG_waiters = 7, PG_active = 8, PG_workingset = 9,
    PG_owner_priv_1 = 10, PG_owner_2 = 11, PG_arch_1 = 12, PG_reserved = 13, PG_private = 14,
    PG_private_2 = 15, PG_reclaim = 16, PG_swapbacked = 17, PG_unevictable = 18,
    PG_mlocked = 19, PG_hwpoison = 20, __NR_PAGEFLAGS = 21, PG_swapcache = 10 };
"""

_PAGE_6_1 = """
struct page {
    unsigned long flags;
    union {
        struct { struct list_head lru; struct address_space *mapping; unsigned long index;
                 unsigned long private; };
        struct { unsigned long compound_head; unsigned char compound_dtor;
                 unsigned char compound_order; atomic_t compound_mapcount; };
    };
    union { atomic_t _mapcount; unsigned int page_type; };
    atomic_t _refcount;
    unsigned long memcg_data;
};
struct slab { unsigned long __page_flags; struct list_head slab_list;
    struct kmem_cache *slab_cache; void *freelist; SLAB_COUNTERS
    unsigned int __unused; atomic_t __page_refcount; unsigned long memcg_data; };
enum compound_dtor_id { NULL_COMPOUND_DTOR, COMPOUND_PAGE_DTOR, HUGETLB_PAGE_DTOR,
    TRANSHUGE_PAGE_DTOR, NR_COMPOUND_DTORS };
"""

#: 6.6 to 6.9: the later numbering, with PG_slab still a flag; 6.6 to 6.8 also mark hugetlb
#: folios with PG_hugetlb (sharing PG_active's bit) on their second page.
_FLAGS_MID = _FLAGS_LATER.replace("__NR_PAGEFLAGS = 21", "PG_slab = 21, __NR_PAGEFLAGS = 22")
_FLAGS_6_6 = _FLAGS_MID.replace("PG_swapcache = 10", "PG_swapcache = 10, PG_hugetlb = 8")

_PAGE_LATER = """
struct page {
    FLAGS_TYPE flags;
    union {
        struct { union { struct list_head lru; struct list_head pcp_list; };
                 struct address_space *mapping; unsigned long index; unsigned long private; };
        struct { unsigned long compound_head; };
    };
    union { unsigned int page_type; atomic_t _mapcount; };
    atomic_t _refcount;
    unsigned long memcg_data;
};
struct slab { unsigned long __page_flags; struct kmem_cache *slab_cache;
    struct list_head slab_list; void *freelist; SLAB_COUNTERS
    unsigned int __page_type; atomic_t __page_refcount; unsigned long obj_exts; };
"""

_TYPES = {
    "6.10": """
enum pagetype { PG_buddy = 128, PG_offline = 256, PG_table = 512, PG_guard = 1024,
    PG_hugetlb = 2048, PG_slab = 4096 };
""",
    "6.12": """
enum pagetype { PGTY_buddy = 240, PGTY_offline = 241, PGTY_table = 242, PGTY_guard = 243,
    PGTY_hugetlb = 244, PGTY_slab = 245, PGTY_zsmalloc = 246, PGTY_unaccepted = 247,
    PGTY_mapcount_underflow = 255 };
""",
    "6.18": """
enum pagetype { PGTY_buddy = 240, PGTY_offline = 241, PGTY_table = 242, PGTY_guard = 243,
    PGTY_hugetlb = 244, PGTY_slab = 245, PGTY_zsmalloc = 246, PGTY_unaccepted = 247,
    PGTY_large_kmalloc = 248, PGTY_mapcount_underflow = 255 };
""",
}


#: SLUB's counters word (mm/slab.h): objects in use, objects in the slab, frozen (a CPU's).
_SLAB_COUNTERS = """union { unsigned long counters;
        struct { unsigned int inuse:16; unsigned int objects:15; unsigned int frozen:1; }; };"""


def declarations(era: str) -> str:
    """The C declarations of one era's memory-management structures."""
    return _declarations(era).replace("SLAB_COUNTERS", _SLAB_COUNTERS)


def _declarations(era: str) -> str:
    if era == "6.1":
        return _COMMON + _FLAGS_6_1 + _PAGE_6_1
    flags_type = "memdesc_flags_t" if era == "6.18" else "unsigned long"
    extra = "typedef struct { unsigned long f; } memdesc_flags_t;\n" if era == "6.18" else ""
    flags = {"6.6": _FLAGS_6_6, "6.9": _FLAGS_MID}.get(era, _FLAGS_LATER)
    page = _PAGE_LATER.replace("FLAGS_TYPE", flags_type)
    return _COMMON + extra + flags + page + _TYPES.get(era, "")


class MemoryMap:
    """One node of ``count`` pages from ``start`` (a PFN) with two zones, in one era's layout.

    :param zones: ``(name, start, end)`` of each zone, PFNs.
    :param holes: PFNs with a struct page but no RAM in the image.
    :param ram: give the node's pages contents (False for large maps whose RAM the image
        only names in its ranges: benchmarks).
    :param extra: more C declarations (the structures a test lays in the slabs).
    """

    def __init__(
        self,
        era: str,
        start: int = 0x20000,
        count: int = 64,
        zones: tuple[tuple[str, int, int], ...] | None = None,
        holes: tuple[int, ...] = (),
        cpus: int = 1,
        ram: bool = True,
        extra: str = "",
    ) -> None:
        if era not in ERAS:
            raise ValueError(f"era {era!r}: one of {ERAS}")
        self.era = era
        self.sk = sk = SyntheticKernel(declarations(era) + extra, release=f"{era}.0-test")
        self.start, self.count = start, count
        self.size = sk.sizeof("struct page")
        half = start + count // 2
        self.zones = zones or (("DMA32", start, half), ("Normal", half, start + count))
        # RAM: every page of the node but the holes (the image's ranges say which).
        if ram:
            for pfn in range(start, start + count):
                if pfn not in holes:
                    sk._page(pfn * PAGE)
        # The memory map: struct pages in pages of their own, mapped at the vmemmap (in
        # 2 MiB pages, as the kernel maps it, when it is that large).
        first = start * self.size // PAGE * PAGE
        last = -(-(start + count) * self.size // PAGE) * PAGE
        self._map_phys: dict[int, int] = {}
        step = HUGE if first % HUGE == 0 and last - first >= HUGE else PAGE
        for offset in range(first, last, step):
            paddr = sk.virt_to_phys(sk.alloc(step, step))
            sk.tables.map(VMEMMAP_START + offset, paddr, step)
            for sub in range(0, step, PAGE):
                self._map_phys[offset + sub] = paddr + sub
        self._vmcoreinfo()
        self._percpu(cpus)
        self._node()
        self.names: dict[str, int] = {}

    # -- the page array -----------------------------------------------------------------------

    def page(self, pfn: int) -> int:
        """The direct-map address of ``pfn``'s struct page (where the test writes it)."""
        offset = pfn * self.size
        return self.sk.page_offset + self._map_phys[offset - offset % PAGE] + offset % PAGE

    def vmemmap(self, pfn: int) -> int:
        """``pfn_to_page(pfn)``: its address in the vmemmap, as the kernel sees it."""
        return VMEMMAP_START + pfn * self.size

    def set(self, pfn: int, **values: object) -> None:
        """Write members of ``pfn``'s struct page (``_refcount__counter=1``)."""
        paths = {k.replace("__", "."): v for k, v in values.items()}
        if "flags" in paths and self.era == "6.18":
            paths["flags.f"] = paths.pop("flags")
        self.sk.fill(self.page(pfn), "struct page", paths)

    def array(self, pfn: int, count: int) -> bytes:
        """The raw struct pages of ``count`` PFNs from ``pfn``."""
        out = bytearray()
        pos, end = pfn * self.size, (pfn + count) * self.size
        while pos < end:
            n = min(end - pos, PAGE - pos % PAGE)
            base = self.sk.page_offset + self._map_phys[pos - pos % PAGE]
            out += self.sk.read(base + pos % PAGE, n)
            pos += n
        return bytes(out)

    def write_array(self, pfn: int, data: bytes) -> None:
        """Write raw struct pages from ``pfn`` on (a bulk copy for benchmarks)."""
        pos = 0
        while pos < len(data):
            at = pfn * self.size + pos
            n = min(len(data) - pos, PAGE - at % PAGE)
            base = self.sk.page_offset + self._map_phys[at - at % PAGE]
            self.sk.write(base + at % PAGE, data[pos : pos + n])
            pos += n

    def bit(self, name: str) -> int:
        return 1 << dict(self.sk.layout.type("enum pageflags").enumerators)[name]

    def _type_word(self, kind: str) -> int:
        """The page_type value that marks ``kind`` (buddy, table, slab...) in this era."""
        if self.era in _DEFINED_TYPES:
            return 0xFFFFFFFF & ~_DEFINED_TYPES[self.era][kind]
        enum = dict(self.sk.layout.type("enum pagetype").enumerators)
        if self.era == "6.10":
            return 0xFFFFFFFF & ~enum[f"PG_{kind}"]
        return enum[f"PGTY_{kind}"] << 24

    def has_type(self, kind: str) -> bool:
        if self.era in _DEFINED_TYPES:
            return kind in _DEFINED_TYPES[self.era]
        enum = dict(self.sk.layout.type("enum pagetype").enumerators)
        return f"PG_{kind}" in enum or f"PGTY_{kind}" in enum

    def in_use(self, pfn: int, flags: int = 0, refcount: int = 1, mapping: int = 0) -> None:
        """An allocated, untyped page (``_mapcount`` -1)."""
        self.set(
            pfn, flags=flags, _refcount__counter=refcount, mapping=mapping, page_type=0xFFFFFFFF
        )

    def typed(self, pfn: int, kind: str, refcount: int = 1, flags: int = 0) -> None:
        self.set(pfn, flags=flags, _refcount__counter=refcount, page_type=self._type_word(kind))

    def buddy(self, pfn: int, order: int) -> None:
        """A free block of 2^order pages whose head is ``pfn`` (its tails stay unmarked)."""
        self.typed(pfn, "buddy", refcount=0)
        self.set(pfn, private=order)
        for tail in range(pfn + 1, pfn + (1 << order)):
            self.set(tail, page_type=0xFFFFFFFF)

    def compound(self, pfn: int, order: int, flags: int = 0, refcount: int = 1) -> None:
        """A compound page: PG_head on the head, its order in the second page, tails pointing
        at the head through compound_head (bit 0 set)."""
        self.in_use(pfn, flags=flags | self.bit("PG_head"), refcount=refcount)
        for tail in range(pfn + 1, pfn + (1 << order)):
            self.set(tail, compound_head=self.vmemmap(pfn) | 1, page_type=0xFFFFFFFF)
        if self.era == "6.1":
            self.set(pfn + 1, compound_order=order)
        else:
            # The folio's _flags_1: the order in its low byte (6.6, "mm: free up a word in
            # the first tail page").
            self.set(pfn + 1, flags=order)

    def hugetlb(self, pfn: int, order: int) -> None:
        self.compound(pfn, order)
        if self.era == "6.1":
            self.set(pfn + 1, compound_dtor=2)  # HUGETLB_PAGE_DTOR
        elif self.era == "6.6":
            self.set(pfn + 1, flags=order | self.bit("PG_hugetlb"))
        else:
            self.set(pfn, page_type=self._type_word("hugetlb"))

    def kmem_cache(self, name: str) -> int:
        """A ``struct kmem_cache`` named ``name``; its address."""
        if name not in self.names:
            text = self.sk.alloc(len(name) + 1)
            self.sk.write(text, name.encode() + b"\0")
            self.names[name] = self.sk.new("struct kmem_cache", size=64, name=text)
        return self.names[name]

    def slab(self, pfn: int, cache: str, order: int = 0) -> None:
        """A slab of ``cache``: PG_slab (6.1) or the slab type on its (head) page."""
        if order:
            self.compound(pfn, order)
        else:
            self.in_use(pfn)
        at = self.sk.offsetof("struct slab", "slab_cache")
        self.sk.write_u64(self.page(pfn) + at, self.kmem_cache(cache))
        if self.era in ("6.1", "6.6", "6.9"):
            flags = self.bit("PG_slab") | (self.bit("PG_head") if order else 0)
            self.set(pfn, flags=flags)
        else:
            self.set(pfn, page_type=self._type_word("slab"))

    # -- the kernel's bookkeeping -------------------------------------------------------------

    def _vmcoreinfo(self) -> None:
        sk = self.sk
        roots = sk.alloc(8 * 16, 64)
        self.sections = sk.alloc(PAGE, PAGE)
        sk.write_u64(roots, self.sections)
        self.sk.vmcoreinfo_extra += [
            f"SYMBOL(mem_section)={roots:x}",
            "LENGTH(mem_section)=16",
            f"SIZE(mem_section)={sk.sizeof('struct mem_section')}",
            "OFFSET(mem_section.section_mem_map)=0",
            f"NUMBER(SECTION_SIZE_BITS)={SECTION_SIZE_BITS}",
            f"SIZE(page)={self.size}",
            "LENGTH(zone.free_area)=11",
        ]
        if self.era in _DEFINED_TYPES:
            sk.vmcoreinfo_extra += [
                "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129",
                "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)=-257",
            ]
        if self.era == "6.1":
            sk.vmcoreinfo_extra.append("NUMBER(HUGETLB_PAGE_DTOR)=2")
        if self.era == "6.9":
            sk.vmcoreinfo_extra.append("NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)=-2049")
        elif self.era == "6.10":
            sk.vmcoreinfo_extra += [
                "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129",
                "NUMBER(PAGE_HUGETLB_MAPCOUNT_VALUE)=-2049",
                "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)=-4097",
            ]
        # Sections of the node: present, with a memory map, online.
        per_section = PAGES_PER_SECTION
        for nr in range(self.start // per_section, -(-(self.start + self.count) // per_section)):
            entry = self.sections + nr * sk.sizeof("struct mem_section")
            sk.write_u64(entry, 0x7)

    def _percpu(self, cpus: int) -> None:
        sk = self.sk
        nr = sk.global_("nr_cpu_ids", "u32")
        sk.write(nr, struct.pack("<I", cpus))
        self.offsets = sk.global_("__per_cpu_offset", "u64", 64 * 8)
        for name in ("__cpu_possible_mask", "__cpu_online_mask", "__cpu_present_mask"):
            mask = sk.global_(name, "struct cpumask")
            sk.write_u64(mask, (1 << cpus) - 1)
        sk.global_("after_masks", "u64")
        self.areas = []
        for cpu in range(cpus):
            area = sk.alloc(PAGE, PAGE)
            sk.write_u64(self.offsets + 8 * cpu, area)
            self.areas.append(area)

    def _node(self) -> None:
        sk = self.sk
        table = sk.global_("node_data", "u64", 8)
        sk.global_("after_node_data", "u64")
        self.pgdat = sk.new(
            "struct pglist_data", node_start_pfn=self.start, node_spanned_pages=self.count
        )
        sk.write_u64(table, self.pgdat)
        sk.vmcoreinfo_extra += [f"SYMBOL(node_data)={table:x}", "LENGTH(node_data)=1"]
        self.zone_at: dict[str, int] = {}
        lists_at = sk.offsetof("struct per_cpu_pages", "lists")
        for i, (name, lo, hi) in enumerate(self.zones):
            zone = self.pgdat + sk.offsetof("struct pglist_data", f"node_zones[{i}]")
            text = sk.alloc(len(name) + 1)
            sk.write(text, name.encode() + b"\0")
            # The per-CPU pointer is an offset into each CPU's area: 0x100 per zone.
            pcp = 0x100 + 0x100 * i
            sk.fill(
                zone,
                "struct zone",
                {
                    "zone_start_pfn": lo,
                    "spanned_pages": hi - lo,
                    "present_pages": hi - lo,
                    "name": text,
                    "per_cpu_pageset": pcp,
                },
            )
            for area in self.areas:
                for index in range(13):
                    head = area + pcp + lists_at + 16 * index
                    sk.write_u64(head, head)
                    sk.write_u64(head + 8, head)
            self.zone_at[name] = zone

    def nr_free(self, zone: str, order: int, count: int) -> None:
        """``zone->free_area[order].nr_free``."""
        self.sk.set(self.zone_at[zone], "struct zone", f"free_area[{order}].nr_free", count)

    def pcp(self, zone: str, pfn: int, index: int = 0, cpu: int = 0) -> None:
        """Put the free page ``pfn`` on CPU ``cpu``'s list ``index`` of ``zone``."""
        sk = self.sk
        self.set(pfn, flags=0, _refcount__counter=0, page_type=0xFFFFFFFF, mapping=0)
        pcp_offset = self.zones.index(next(z for z in self.zones if z[0] == zone)) * 0x100 + 0x100
        area = self.areas[cpu] + pcp_offset
        head = area + sk.offsetof("struct per_cpu_pages", "lists") + 16 * index
        node = self.vmemmap(pfn) + sk.offsetof("struct page", "lru")
        last = int.from_bytes(sk.read(head + 8, 8), "little")
        # list_add_tail: node between the last entry and the head.
        self._write_link(node, head, last)
        self._write_link(last, None, None, next_=node)
        sk.write_u64(head + 8, node)
        order = index // 3 if index < 12 else 9
        count = int.from_bytes(sk.read(area, 4), "little") + (1 << order)
        sk.set(area, "struct per_cpu_pages", "count", count)

    def _write_link(
        self, node: int, next_head: int | None, prev: int | None, next_: int | None = None
    ) -> None:
        """Write a list_head's links; ``node`` is either in the vmemmap or the direct map."""
        where = self._direct(node)
        if next_head is not None:
            self.sk.write_u64(where, next_head)
        if next_ is not None:
            self.sk.write_u64(where, next_)
        if prev is not None:
            self.sk.write_u64(where + 8, prev)

    def _direct(self, vaddr: int) -> int:
        if vaddr >= VMEMMAP_START and vaddr < VMEMMAP_START + (1 << 40):
            offset = vaddr - VMEMMAP_START
            return self.sk.page_offset + self._map_phys[offset - offset % PAGE] + offset % PAGE
        return vaddr

    def kernel(self):
        return self.sk.kernel()
