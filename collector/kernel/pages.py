"""What every page of physical memory is used for, read from the struct page array.

Mirrors the tests of include/linux/page-flags.h (PageBuddy, PageSlab, PageTable, PageHuge,
PageAnon, PageCompound...), applied to whole memory sections at once: a section's struct
pages are read as one numpy array, derived from the construct definition of ``struct page``
(from BTF, or from VMCOREINFO's offsets when an image carries no BTF), and classified with
vectorised tests. Which sections have a memory map comes from ``mem_section``; each node's
span and zones from ``node_data``. The ``pages`` and ``buddyinfo`` analyses and selective
capture use this module.

Kernel layouts drift; every difference is told apart by asking BTF or VMCOREINFO what the
kernel has, never by its version string (see :class:`PageFormat`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import construct
import numpy as np

from collector.errors import BrokenStructure, CollectorError, ImageError, NotApplicable
from collector.kernel.bulk import dtype_for
from collector.memory import PageNotCaptured

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

# -- the classes ----------------------------------------------------------------------------------

#: Every class a page can be given, in the order the tests are applied (the first that matches
#: wins). ``hole`` is a page with a struct page but no RAM behind it in the image's ranges.
CLASSES: tuple[str, ...] = (
    "hole",
    "uncaptured",
    "hwpoison",
    "buddy",
    "buddy-tail",
    "pcp",
    "offline",
    "unaccepted",
    "guard",
    "hugetlb",
    "slab",
    "pagetable",
    "zsmalloc",
    "large-kmalloc",
    "reserved",
    "swapcache",
    "anon",
    "file-writeback",
    "file-dirty",
    "file",
    "compound-head",
    "compound-tail",
    "zero-refcount",
    "other",
)
CODE = {name: i for i, name in enumerate(CLASSES)}
#: What each class means, for documentation and ``--help``.
DESCRIPTIONS = {
    "hole": "a struct page with no RAM behind it (outside the image's System RAM ranges)",
    "uncaptured": "its struct page is not in the image (that part of the memory map was not read)",
    "hwpoison": "PG_hwpoison: memory the kernel found broken",
    "buddy": "the first page of a free block in the buddy allocator (PageBuddy), order in private",
    "buddy-tail": "the other pages of a free buddy block",
    "pcp": "free on a per-CPU list (zone->per_cpu_pageset), every page of the block",
    "offline": "PageOffline: logically offline (balloon, virtio-mem)",
    "unaccepted": "PageUnaccepted: not yet accepted from the hypervisor",
    "guard": "PageGuard: a debug guard page of a free block",
    "hugetlb": "a page of a hugetlbfs huge page",
    "slab": "a page of a slab (PageSlab), attributed to its kmem_cache",
    "pagetable": "PageTable: a page-table page",
    "zsmalloc": "PageZsmalloc: a zsmalloc (zram, zswap) page",
    "large-kmalloc": "PageLargeKmalloc: a kmalloc too large for a slab",
    "reserved": "PG_reserved: the kernel image, firmware, boot allocations, the memory map",
    "swapcache": "in the swap cache (PG_swapcache with PG_swapbacked)",
    "anon": "anonymous memory (PAGE_MAPPING_ANON in mapping), KSM included",
    "file-writeback": "page cache under writeback (PG_writeback)",
    "file-dirty": "page cache, dirty (PG_dirty)",
    "file": "page cache, clean (mapping is an address_space)",
    "compound-head": "the first page of a compound page none of the above claims",
    "compound-tail": "another page of such a compound page",
    "zero-refcount": "allocated by none of the above and _refcount 0 (in transit, or frozen)",
    "other": "allocated (refcount > 0) but none of the above: driver and kernel allocations",
}
#: Classes whose pages are free memory.
FREE_CLASSES = ("buddy", "buddy-tail", "pcp")

#: The size of a page of the memory map itself (x86_64).
PAGE_SIZE = 4096
#: The most pages read and classified in one go: a 128 MiB section of 4 KiB pages.
MAX_BATCH = 1 << 15
#: A compound page larger than this (2^18 pages, 1 GiB) is not believed.
MAX_COMPOUND_ORDER = 18
#: The most entries of one per-CPU free list (pcp->high is a few thousand pages).
MAX_PCP_ENTRIES = 1 << 20
#: Entries in a row that cannot be free pages before a per-CPU list is given up.
PCP_MAX_MISSES = 8
#: The most NUMA nodes looked at (MAX_NUMNODES is 1 << CONFIG_NODES_SHIFT, at most 1024).
MAX_NODES = 1024
#: include/linux/mmzone.h: section_mem_map's low bits; SECTION_HAS_MEM_MAP has been bit 1
#: since sparsemem began (2.6.13), SECTION_IS_ONLINE bit 2 since 4.13.
SECTION_HAS_MEM_MAP = 1 << 1
SECTION_IS_ONLINE = 1 << 2
#: include/linux/page-flags.h: PAGE_MAPPING_ANON and PAGE_MAPPING_MOVABLE, low bits of mapping.
PAGE_MAPPING_ANON = 1
PAGE_MAPPING_FLAGS = 3
#: include/linux/page-flags.h, before 6.12: a page type is a cleared bit under this base.
PAGE_TYPE_BASE = 0xF0000000
#: include/linux/mmzone.h: PAGE_ALLOC_COSTLY_ORDER, 3 since 2.6.23.
PAGE_ALLOC_COSTLY_ORDER = 3


# -- the layout of struct page on this kernel -----------------------------------------------------


@dataclass
class PageFormat:
    """How to read ``struct page`` on one kernel, and which test means what.

    :param dtype: the compact numpy dtype of the fields the classifier reads, with the
        offsets and itemsize of ``struct page`` (from its construct definition).
    :param flag_bits: ``PG_*`` bit numbers by name (``PG_head`` → 16).
    :param types: page types by class: bytes of the top of ``page_type`` (6.12+) or the
        inverted bit (before), per :attr:`type_scheme`.
    """

    dtype: np.dtype
    size: int
    flag_bits: dict[str, int]
    type_scheme: str  # "top-byte" (6.12+) or "inverted" (before)
    types: dict[str, int]
    slab_by: str  # "flag" (PG_slab, before 6.10) or "type"
    hugetlb_by: str  # "dtor" (before 6.6), "flag" (6.6-6.8), "type" (6.9+), "" unknown
    hugetlb_value: int
    order_by: str  # "member" (compound_order in page[1], before 6.6) or "flags_1"
    max_order: int  # the largest buddy order (MAX_ORDER - 1 before 6.4, MAX_PAGE_ORDER after)
    nr_pageflags: int
    source: str  # "BTF" or "VMCOREINFO"
    needs_btf: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    #: Classes this image cannot show (their pages fall to another class), and why.
    unavailable: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> int:
        """The mask of ``PG_name``, or 0 when this kernel has no such flag."""
        bit = self.flag_bits.get(name)
        return 0 if bit is None else 1 << bit

    def flag_names(self, flags: int) -> str:
        """``flags`` (page flags only, node and zone bits dropped) as ``PG_`` names."""
        names = []
        for bit in range(min(self.nr_pageflags, 64)):
            if flags >> bit & 1:
                names.append(self._names_by_bit.get(bit, f"bit{bit}"))
        return "|".join(names)

    @property
    def flags_mask(self) -> int:
        return (1 << min(self.nr_pageflags, 64)) - 1

    def __post_init__(self) -> None:
        self._names_by_bit: dict[int, str] = {}
        for name, bit in self.flag_bits.items():
            self._names_by_bit.setdefault(bit, name.removeprefix("PG_"))


def _dtype_field(dt: np.dtype, path: str) -> tuple[int, np.dtype]:
    """Offset and dtype of ``path`` (``"_refcount.counter"``) in a nested structured dtype."""
    offset = 0
    for name in path.split("."):
        fields = dt.fields or {}
        if name not in fields:
            raise KeyError(path)
        dt, at = fields[name][0], fields[name][1]
        offset += at
    return offset, dt


def _first_field(dt: np.dtype, *paths: str) -> tuple[str, int, np.dtype] | None:
    for path in paths:
        try:
            offset, sub = _dtype_field(dt, path)
        except KeyError:
            continue
        return path, offset, sub
    return None


def _vmcoreinfo_page_struct(kernel: Kernel) -> construct.Construct:
    """struct page as VMCOREINFO describes it (``SIZE(page)``, ``OFFSET(page.*)``): a construct
    definition with only those members, for images that carry no BTF."""
    vi = kernel.vmcoreinfo
    size = vi.size("page")
    if size is None:
        raise NotApplicable("no BTF, and VMCOREINFO has no SIZE(page)")
    members: list[tuple[int, str, construct.Construct]] = []
    for name, subcon in (
        ("flags", construct.Int64ul),
        ("_refcount", construct.Int32sl),
        ("_mapcount", construct.Int32ul),
        ("mapping", construct.Int64ul),
        ("private", construct.Int64ul),
        ("compound_head", construct.Int64ul),
        ("compound_dtor", construct.Int8ul),
        ("compound_order", construct.Int8ul),
    ):
        at = vi.offset(f"page.{name}")
        if at is not None:
            members.append((at, name, subcon))
    missing = {"flags", "_refcount", "mapping"} - {m[1] for m in members}
    if missing:
        raise NotApplicable(f"no BTF, and VMCOREINFO lacks OFFSET(page.{sorted(missing)[0]})")
    parts: list[construct.Construct] = []
    pos = 0
    for at, name, subcon in sorted(members):
        if at < pos or at + subcon.sizeof() > size:
            raise ImageError(f"VMCOREINFO: OFFSET(page.{name})={at} overlaps or overruns")
        if at > pos:
            parts.append(construct.Padding(at - pos))
        parts.append(name / subcon)
        pos = at + subcon.sizeof()
    if size > pos:
        parts.append(construct.Padding(size - pos))
    return construct.Struct(*parts)


def page_format(kernel: Kernel) -> PageFormat:
    """Work out how this kernel lays out and marks its pages (BTF first, else VMCOREINFO).

    :raises NotApplicable: neither BTF nor VMCOREINFO describes struct page well enough.
    """
    vi = kernel.vmcoreinfo
    btf: Any = None
    try:
        btf = kernel.btf
    except NotApplicable:
        btf = None
    notes: list[str] = []
    needs_btf: list[str] = []
    unavailable: dict[str, str] = {}
    if btf is not None:
        full = dtype_for(kernel.struct("page"))
        source = "BTF"
    else:
        full = dtype_for(_vmcoreinfo_page_struct(kernel))
        source = "VMCOREINFO"
    size = full.itemsize

    def enum(name: str | None, enumerator: str) -> int | None:
        if btf is None:
            return None
        try:
            return btf.enum_value(name, enumerator)
        except ImageError:
            return None

    names, formats, offsets = [], [], []

    def take(as_name: str, *paths: str, need: bool = True) -> bool:
        found = _first_field(full, *paths)
        if found is None:
            if need:
                raise NotApplicable(f"struct page has none of {', '.join(paths)}")
            return False
        _, at, sub = found
        names.append(as_name)
        formats.append(sub.base if sub.shape == () else sub)
        offsets.append(at)
        return True

    # v6.18 wrapped page->flags in memdesc_flags_t (53fbef56e07d): the value is flags.f.
    take("flags", "flags.f", "flags")
    take("refcount", "_refcount.counter", "_refcount")
    # page_type shares its word with _mapcount (a union, both named, since 4.18).
    take("page_type", "page_type", "_mapcount.counter", "_mapcount")
    take("mapping", "mapping")
    take("private", "private", need=False)
    # v7.1 renamed compound_head to compound_info (it may then hold a mask rather than a
    # pointer; only the pointer form with bit 0 set is read here).
    take("compound_head", "compound_head", "compound_info")
    has_order_member = take("compound_order", "compound_order", need=False)
    has_dtor = take("compound_dtor", "compound_dtor", need=False)
    if btf is not None:
        # 5.17 split struct slab out of struct page (d122019bf061): slab_cache is a member of
        # struct slab, which overlays struct page; before that it was one of struct page.
        if btf.has_member("slab", "slab_cache"):
            slab_full = dtype_for(kernel.struct("slab"))
            at, sub = _dtype_field(slab_full, "slab_cache")
            names.append("slab_cache")
            formats.append(sub)
            offsets.append(at)
        else:
            take("slab_cache", "slab_cache", need=False)
    else:
        needs_btf.append("slab caches by name (struct slab)")
        needs_btf.append("zones (struct zone) and the per-CPU free lists")
        unavailable["pcp"] = "the per-CPU free lists are read through BTF"
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})

    # PG_* bit numbers: enum pageflags in BTF, else VMCOREINFO's NUMBER(PG_*).
    flag_bits: dict[str, int] = {}
    nr_pageflags = 0
    if btf is not None:
        for tid in btf.find_all("pageflags"):
            t = btf.type(btf.resolve(tid))
            for e in getattr(t, "enumerators", None) or ():
                if e.name == "__NR_PAGEFLAGS":
                    nr_pageflags = e.value
                elif e.name.startswith("PG_") and e.value < 64:
                    flag_bits.setdefault(e.name, e.value)
    for key, value in vi.entries().items():
        if key.startswith("NUMBER(PG_") and isinstance(value, int):
            name = key[len("NUMBER(") : -1]
            if name.endswith("_mask"):
                if value > 0 and value & (value - 1) == 0:
                    flag_bits.setdefault(name.removesuffix("_mask"), value.bit_length() - 1)
            elif 0 <= value < 64:
                flag_bits.setdefault(name, value)
    if not nr_pageflags:
        nr_pageflags = max(flag_bits.values(), default=0) + 1
    if "PG_reserved" not in flag_bits:
        needs_btf.append("reserved (PG_reserved)")
        unavailable["reserved"] = "PG_reserved is known from BTF only"
    for cls, flag in (("file-dirty", "PG_dirty"), ("file-writeback", "PG_writeback")):
        if flag not in flag_bits:
            needs_btf.append(f"{cls} ({flag})")
            unavailable[cls] = f"{flag} is known from BTF only"

    # Page types. From v6.12 a page has at most one type, kept in the top byte of
    # page_type (enum pagetype's PGTY_*); before, each type was a cleared bit under
    # PAGE_TYPE_BASE 0xf0000000 in _mapcount (-1 when untyped), enum pagetype from 6.10.
    types: dict[str, int] = {}
    type_names = {
        "buddy": "buddy",
        "offline": "offline",
        "pagetable": "table",
        "guard": "guard",
        "hugetlb": "hugetlb",
        "slab": "slab",
        "zsmalloc": "zsmalloc",
        "unaccepted": "unaccepted",
        "large-kmalloc": "large_kmalloc",
    }
    # Without BTF, VMCOREINFO's PAGE_BUDDY_MAPCOUNT_VALUE tells the two apart: 6.12 exports
    # PGTY_buddy << 24 (0xf0000000), earlier kernels ~PG_buddy (-129).
    buddy_value = vi.number("PAGE_BUDDY_MAPCOUNT_VALUE")
    top_byte_values = buddy_value is not None and buddy_value & 0xFFFFFF == 0
    if enum("pagetype", "PGTY_buddy") is not None or (btf is None and top_byte_values):
        scheme = "top-byte"
        for cls, vname in (
            ("buddy", "PAGE_BUDDY_MAPCOUNT_VALUE"),
            ("offline", "PAGE_OFFLINE_MAPCOUNT_VALUE"),
            ("hugetlb", "PAGE_HUGETLB_MAPCOUNT_VALUE"),
            ("slab", "PAGE_SLAB_MAPCOUNT_VALUE"),
            ("unaccepted", "PAGE_UNACCEPTED_MAPCOUNT_VALUE"),
        ):
            value = vi.number(vname)
            if value is not None and value & 0xFFFFFF == 0:
                types[cls] = (value & 0xFFFFFFFF) >> 24
        for cls, kname in type_names.items():
            value = enum("pagetype", f"PGTY_{kname}")
            if value is not None:
                types[cls] = value
    else:
        scheme = "inverted"
        for cls, kname in type_names.items():
            value = enum("pagetype", f"PG_{kname}")
            if value is not None:
                types[cls] = value
        # Before 6.10 the types were #defines; VMCOREINFO gives some as MAPCOUNT values.
        for cls, vname in (
            ("buddy", "PAGE_BUDDY_MAPCOUNT_VALUE"),
            ("offline", "PAGE_OFFLINE_MAPCOUNT_VALUE"),
            ("hugetlb", "PAGE_HUGETLB_MAPCOUNT_VALUE"),
            ("slab", "PAGE_SLAB_MAPCOUNT_VALUE"),
        ):
            value = vi.number(vname)
            if value is not None and cls not in types:
                types[cls] = ~value & 0xFFFFFFFF & ~PAGE_TYPE_BASE
        # PageTable and PageGuard are #defines VMCOREINFO does not export. PG_kmemcg (0x200)
        # went in 5.9 and PG_table moved from 0x400 to 0x200, PG_guard from 0x800 to 0x400;
        # page.memcg_data (it replaced mem_cgroup in 5.11)
        # proves a kernel after that move.
        later = btf is not None and btf.has_member("page", "memcg_data")
        if later and types.get("buddy") == 0x80 and types.get("offline") == 0x100:
            types.setdefault("pagetable", 0x200)
            types.setdefault("guard", 0x400)
    if scheme == "top-byte" and "buddy" not in types:
        raise NotApplicable("BTF's enum pagetype has no PGTY_buddy")
    if "buddy" not in types:
        raise NotApplicable("neither BTF nor VMCOREINFO gives the buddy page type")
    if "pagetable" not in types:
        needs_btf.append("pagetable (PG_table)")
        unavailable["pagetable"] = "the page-table type is known from BTF only"

    # Slab: PG_slab until v6.10 made slab a page type and dropped the flag (46df8e73a4a3).
    if "PG_slab" in flag_bits:
        slab_by = "flag"
    elif "slab" in types:
        slab_by = "type"
    else:
        slab_by = ""
        needs_btf.append("slab")
        unavailable["slab"] = "neither PG_slab nor the slab type is known"

    # Hugetlb: compound_dtor == HUGETLB_PAGE_DTOR in the second page before 6.6; PG_hugetlb
    # (PG_hugetlb = PG_active in enum pageflags) on the folio's second page from 6.6; a page
    # type from v6.9 ("mm: turn folio_test_hugetlb into a PageType", d99e3140a4d3).
    hugetlb_by, hugetlb_value = "", 0
    if "hugetlb" in types:
        hugetlb_by = "type"
    elif has_dtor:
        dtor = vi.number("HUGETLB_PAGE_DTOR")
        if dtor is None:
            dtor = enum("compound_dtor_id", "HUGETLB_PAGE_DTOR")
        if dtor is not None:
            hugetlb_by, hugetlb_value = "dtor", dtor
    elif "PG_hugetlb" in flag_bits:
        hugetlb_by = "flag"
    if not hugetlb_by:
        needs_btf.append("hugetlb")
        unavailable["hugetlb"] = "the hugetlb mark is known from BTF only"

    # Compound order: page[1].compound_order before 6.6; the low byte of the folio's
    # _flags_1 (page[1].flags) from v6.6, when the first tail page's fields were repacked.
    order_by = "member" if has_order_member else "flags_1"

    # MAX_ORDER: free_area has MAX_ORDER (later NR_PAGE_ORDERS) entries.
    length = vi.length("zone.free_area")
    if length is None and btf is not None:
        length = _array_length(kernel, "zone", "free_area")
    max_order = (length or 11) - 1
    if length is None:
        notes.append("free_area's length unknown: orders up to 10 assumed")
    if not 0 <= max_order < MAX_COMPOUND_ORDER:
        raise ImageError(f"zone.free_area has {length} orders")

    return PageFormat(
        dtype=dtype,
        size=size,
        flag_bits=flag_bits,
        type_scheme=scheme,
        types=types,
        slab_by=slab_by,
        hugetlb_by=hugetlb_by,
        hugetlb_value=hugetlb_value,
        order_by=order_by,
        max_order=max_order,
        nr_pageflags=nr_pageflags,
        source=source,
        needs_btf=tuple(dict.fromkeys(needs_btf)),
        unavailable=unavailable,
        notes=notes,
    )


def _array_length(kernel: Kernel, struct: str, member: str) -> int | None:
    """The element count of array member ``member`` of ``struct struct`` (BTF)."""
    try:
        _, _, t = kernel.type(f"struct {struct}").member(member)
        return t.resolved().array_length
    except (CollectorError, KeyError, AttributeError, TypeError):
        return None


# -- nodes, zones, sections -----------------------------------------------------------------------


@dataclass
class Zone:
    """One zone of a node: ``[start, end)`` in PFNs, and the kernel's own counts."""

    index: int
    name: str
    start: int
    end: int
    present: int | None
    address: int
    nr_free: list[int] | None  # free_area[order].nr_free


@dataclass
class Node:
    nid: int
    start: int
    end: int
    zones: list[Zone]
    address: int


def _offset(kernel: Kernel, struct: str, member: str) -> int:
    """``OFFSET(struct.member)``: VMCOREINFO first (present without BTF), then BTF."""
    at = kernel.vmcoreinfo.offset(f"{struct}.{member}")
    if at is not None:
        return at
    try:
        return kernel.btf.offsetof(struct, member)
    except NotApplicable:
        raise NotApplicable(
            f"needs OFFSET({struct}.{member}): not in VMCOREINFO and the image has no BTF"
        ) from None


def _size(kernel: Kernel, name: str) -> int:
    size = kernel.vmcoreinfo.size(name)
    if size is not None:
        return size
    return kernel.btf.sizeof(name)


def nodes(kernel: Kernel) -> list[Node]:
    """Every node with memory: ``node_data[nid]`` and its zones (zones need BTF).

    :raises NotApplicable: no ``node_data`` symbol.
    """
    vi = kernel.vmcoreinfo
    table = vi.symbol("node_data")
    if table is None:
        table = kernel.symbol("node_data")
    count = min(vi.length("node_data") or MAX_NODES, MAX_NODES)
    start_at = _offset(kernel, "pglist_data", "node_start_pfn")
    spanned_at = _offset(kernel, "pglist_data", "node_spanned_pages")
    raw = kernel.read_virt(table, 8 * count)
    out = []
    for nid in range(count):
        pgdat = int.from_bytes(raw[8 * nid : 8 * nid + 8], "little")
        if not pgdat:
            continue
        start = kernel.read_u64(pgdat + start_at)
        spanned = kernel.read_u64(pgdat + spanned_at)
        if spanned == 0:
            continue
        if start + spanned > 1 << 52:
            raise BrokenStructure(f"node {nid}: span {start:#x}+{spanned:#x} is not believable")
        out.append(Node(nid, start, start + spanned, _zones(kernel, pgdat, start), pgdat))
    if not out:
        raise NotApplicable("node_data holds no node with memory")
    return out


def _zones(kernel: Kernel, pgdat: int, node_start: int) -> list[Zone]:
    try:
        btf = kernel.btf
    except NotApplicable:
        return []
    zones_at = _offset(kernel, "pglist_data", "node_zones")
    zone_size = _size(kernel, "zone")
    nr = btf.enum_value("zone_type", "__MAX_NR_ZONES")
    free_area_at = btf.offsetof("zone", "free_area")
    free_area_size = btf.sizeof("free_area")
    nr_free_at = btf.offsetof("free_area", "nr_free")
    orders = _array_length(kernel, "zone", "free_area") or 0
    out = []
    for i in range(min(nr, 8)):
        z = pgdat + zones_at + i * zone_size
        start = kernel.read_u64(z + btf.offsetof("zone", "zone_start_pfn"))
        spanned = kernel.read_u64(z + btf.offsetof("zone", "spanned_pages"))
        present = kernel.read_u64(z + btf.offsetof("zone", "present_pages"))
        name_ptr = kernel.read_pointer(z + btf.offsetof("zone", "name"))
        name = kernel.read_cstring(name_ptr, 32).decode("ascii", "backslashreplace")
        nr_free = [
            kernel.read_u64(z + free_area_at + o * free_area_size + nr_free_at)
            for o in range(min(orders, MAX_COMPOUND_ORDER))
        ]
        out.append(Zone(i, name, start, start + spanned, present, z, nr_free))
    return out


def sections(kernel: Kernel, end_pfn: int) -> list[tuple[int, int]]:
    """PFN ranges ``[start, end)`` of the online sections that have a memory map, up to
    ``end_pfn`` (``mem_section``, CONFIG_SPARSEMEM_EXTREME: an array of root pointers)."""
    vi = kernel.vmcoreinfo
    bits = vi.number("SECTION_SIZE_BITS")
    roots_at = vi.symbol("mem_section")
    if bits is None or roots_at is None:
        raise NotApplicable("VMCOREINFO lacks SECTION_SIZE_BITS or SYMBOL(mem_section)")
    page_shift = (kernel.memory.page_size or 4096).bit_length() - 1
    per_section = 1 << (bits - page_shift)
    ms_size = vi.size("mem_section") or _size(kernel, "mem_section")
    map_at = vi.offset("mem_section.section_mem_map") or 0
    per_root = 4096 // ms_size
    nr_roots = vi.length("mem_section") or 0
    wanted = -(-end_pfn // per_section)
    roots = min(nr_roots, -(-wanted // per_root))
    if roots <= 0:
        raise NotApplicable("VMCOREINFO's LENGTH(mem_section) is not usable")
    root_ptrs = kernel.read_virt(roots_at, 8 * roots)
    out: list[tuple[int, int]] = []
    for r in range(roots):
        root = int.from_bytes(root_ptrs[8 * r : 8 * r + 8], "little")
        if not root:
            continue
        data = kernel.read_virt(root, per_root * ms_size)
        for i in range(per_root):
            nr = r * per_root + i
            if nr >= wanted:
                break
            word = int.from_bytes(data[i * ms_size + map_at : i * ms_size + map_at + 8], "little")
            if word & SECTION_HAS_MEM_MAP and word & SECTION_IS_ONLINE:
                start = nr * per_section
                if out and out[-1][1] == start:
                    out[-1] = (out[-1][0], start + per_section)
                else:
                    out.append((start, start + per_section))
    return out


# -- per-CPU free lists ---------------------------------------------------------------------------


def pcp_pages(
    kernel: Kernel, zone: Zone, plausible: Callable[[int], bool] | None = None
) -> tuple[dict[int, int], int, list[str]]:
    """The free blocks on a zone's per-CPU lists (``zone->per_cpu_pageset``):
    ``{pfn: order}``, the lists' own page count (``pcp->count`` summed) to check against, and
    the lists that broke off (one line each).

    :param plausible: tells whether the page at a PFN can be a free page on a list; the walk
        of a list stops at the first that cannot (a list torn while the capture read it
        otherwise leads into an LRU list, which shares the link).

    A list's order follows from its index (mm/page_alloc.c ``pindex_to_order``): lists come
    in MIGRATE_PCPTYPES per order up to PAGE_ALLOC_COSTLY_ORDER, then the pageblock-order
    (THP) lists.
    """
    from collector.helpers.list import list_for_each
    from collector.helpers.percpu import for_each_possible_cpu, per_cpu_ptr

    btf = kernel.btf
    z = kernel.object("struct zone", zone.address)
    if not btf.has_member("zone", "per_cpu_pageset"):
        # 5.14 "mm/page_alloc: split per cpu page lists and zone stats" named it
        # per_cpu_pageset; older kernels keep pageset->pcp, not read here.
        raise NotApplicable("zone has no per_cpu_pageset (before 5.14)")
    lists_len = _array_length(kernel, "per_cpu_pages", "lists") or 0
    pcptypes = btf.enum_value("migratetype", "MIGRATE_PCPTYPES")
    low = pcptypes * (PAGE_ALLOC_COSTLY_ORDER + 1)
    # pageblock_order: HPAGE_PMD_ORDER on x86_64 (a 2 MiB PMD of 4 KiB pages).
    pageblock_order = 9
    found: dict[int, int] = {}
    broken: list[str] = []
    counted = 0
    link = "pcp_list" if btf.has_member("page", "pcp_list") else "lru"
    link_at = btf.offsetof("page", link)
    layout = kernel.layout
    for cpu in for_each_possible_cpu(kernel):
        pcp = per_cpu_ptr(z.per_cpu_pageset, cpu)
        count = pcp.count.value()
        counted += count
        # Links the capture read after a CPU changed them can lead into an LRU list (the link
        # is shared): entries that cannot be free pages are skipped, and a run of them, or
        # far more entries than pcp->count, ends the walk of that CPU's list.
        budget = 4 * max(count, 0) + 64
        for pindex in range(lists_len):
            if lists_len == pcptypes:
                order = 0
            elif pindex < low:
                order = pindex // pcptypes
            else:
                order = pageblock_order
            misses = 0
            try:
                for node in list_for_each(pcp.lists[pindex], max_count=MAX_PCP_ENTRIES):
                    budget -= 1
                    pfn = layout.page_to_pfn(node.address - link_at)
                    if plausible is None or plausible(pfn):
                        found[pfn] = order
                        misses = 0
                    else:
                        misses += 1
                    if misses >= PCP_MAX_MISSES or budget <= 0:
                        broken.append(f"CPU {cpu} list {pindex}: left at PFN {pfn:#x}")
                        break
            except (BrokenStructure, ImageError) as e:
                broken.append(f"CPU {cpu} list {pindex}: {e}")
    return found, counted, broken


# -- classification -------------------------------------------------------------------------------


@dataclass
class Batch:
    """Classified pages ``[start, start + len(classes))`` of one node and section."""

    nid: int
    start: int
    pages: np.ndarray  # the compact struct page records
    classes: np.ndarray  # uint8 codes into CLASSES
    order: np.ndarray  # int8: order of a buddy or compound head, -1 elsewhere
    head: np.ndarray  # int64: the head PFN of a compound tail, -1 elsewhere


class PageWalker:
    """Classifies every page of an image's kernel, a section at a time.

    :param kernel: the kernel of the image.
    :param with_pcp: walk the per-CPU free lists (needs BTF); without it their pages count as
        ``zero-refcount``.
    :param spans: PFN ranges ``[start, end)`` whose struct pages exist, to walk instead of
        those ``node_data`` and ``mem_section`` give (one node 0 without zones is assumed). A
        live machine's System RAM is such a list: reading it costs no kernel data besides
        the struct pages (and, ``with_pcp``, the zones and per-CPU list heads).
    :param pcp_recheck: the per-CPU lists are walked once, here, and the struct pages read
        later (a live machine, where they change meanwhile): a page found on a list counts
        as ``pcp`` only while its struct page, read with its batch, still shows a free page.
    """

    def __init__(
        self,
        kernel: Kernel,
        with_pcp: bool = True,
        spans: list[tuple[int, int]] | None = None,
        pcp_recheck: bool = False,
    ) -> None:
        self.kernel = kernel
        self._lock = threading.Lock()
        self.format = page_format(kernel)
        self.notes = list(self.format.notes)
        if spans is not None:
            if not spans:
                raise NotApplicable("no page frames to classify")
            self.nodes = [Node(0, min(s for s, _ in spans), max(e for _, e in spans), [], 0)]
            self.sections = sorted(spans)
        else:
            self.nodes = nodes(kernel)
            end = max(n.end for n in self.nodes)
            self.sections = sections(kernel, end)
        self.vmemmap = kernel.layout.vmemmap_base
        page_size = kernel.memory.page_size or 4096
        ram = []
        for s, e in kernel.memory.ranges():
            first, last = -(-s // page_size), e // page_size
            if last > first:
                ram.append((first, last))
        self.ram = ram
        self.pcp: dict[int, int] = {}
        self.pcp_counted: dict[tuple[int, int], tuple[int, int | None]] = {}
        self.pcp_recheck = pcp_recheck
        if with_pcp and self.format.source == "BTF":
            zoned = self.nodes
            if spans is not None:
                try:
                    zoned = nodes(kernel)
                except (NotApplicable, BrokenStructure, ImageError, PageNotCaptured) as e:
                    self.notes.append(f"per-CPU lists not walked: no zones ({e})")
                    zoned = []
            for node in zoned:
                for zone in node.zones:
                    if zone.end <= zone.start:
                        continue
                    try:
                        found, counted, broken = pcp_pages(kernel, zone, self._free_page)
                    except NotApplicable as e:
                        self.notes.append(f"per-CPU lists not walked: {e}")
                        break
                    except (CollectorError, AttributeError, LookupError) as e:
                        if spans is None:
                            raise
                        # Live, the lists only add to what is skipped: without them, their
                        # pages are read.
                        self.notes.append(f"per-CPU lists not walked: {e}")
                        self.pcp.clear()
                        self.pcp_counted.clear()
                        zoned = []
                        break
                    self.pcp.update(found)
                    self.notes.extend(f"zone {zone.name}: per-CPU {b}" for b in broken)
                    walked = sum(1 << o for o in found.values())
                    self.pcp_counted[(node.nid, zone.index)] = (walked, counted)
        elif with_pcp:
            self.notes.append("per-CPU lists not walked: they need BTF")
        keys = sorted(self.pcp)
        self._pcp_start = np.array(keys, dtype=np.int64)
        self._pcp_len = np.array([1 << self.pcp[k] for k in keys], dtype=np.int64)
        self._heads: dict[int, tuple[int, int]] = {}

    def _free_page(self, pfn: int) -> bool:
        """Whether the struct page of ``pfn`` can be a free page on a per-CPU list: no
        references, no mapping, no type, not on an LRU list, not part of a compound page."""
        if not self._has_map(pfn):
            return False
        try:
            page = self.read(pfn, 1)
        except (PageNotCaptured, ImageError):
            return False
        return bool(_looks_free(self.format, page)[0])

    # -- spans ----------------------------------------------------------------------------------

    def spans(self, start: int = 0, end: int = 1 << 62) -> Iterator[tuple[int, int, int]]:
        """``(nid, start, end)`` runs of PFNs with a memory map, at most MAX_BATCH long."""
        for node in self.nodes:
            for s, e in self.sections:
                lo, hi = max(s, node.start, start), min(e, node.end, end)
                while lo < hi:
                    step = min(hi, lo + MAX_BATCH - lo % MAX_BATCH)
                    yield node.nid, lo, step
                    lo = step

    def batches(self, start: int = 0, end: int = 1 << 62) -> Iterator[Batch]:
        """Classified pages of every span, in PFN order.

        The next span is read (translated, decompressed) on a second thread while this one
        is classified: zstd and numpy let go of the GIL, so two cores both work. At most two
        spans are held at a time.
        """
        spans = self.spans(start, end)
        current = next(spans, None)
        if current is None:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="pages") as pool:
            ahead = pool.submit(self._read_span, *current[1:])
            while current is not None:
                nid, lo, hi = current
                pages, lost = ahead.result()
                current = next(spans, None)
                if current is not None:
                    ahead = pool.submit(self._read_span, *current[1:])
                classes, order, head = classify(self, pages, lo, hi - lo, lost=lost)
                yield Batch(nid, lo, pages[: hi - lo], classes, order, head)

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` struct pages from PFN ``start``, as the compact records."""
        size = self.format.size
        with self._lock:  # the image's reader is not shared between threads
            data = self.kernel.read_virt(self.vmemmap + start * size, count * size)
        return np.frombuffer(data, dtype=self.format.dtype, count=count)

    def _read_span(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The struct pages of ``[start, end)`` and one more when it exists (a head's second
        page); and which of them the image lacks (None: it has them all)."""
        extra = 1 if self._has_map(end) else 0
        count = end - start + extra
        try:
            return self.read(start, count), None
        except (PageNotCaptured, ImageError):
            pass
        # Part of this memory map was not captured (or is not mapped): read it a page at a
        # time, and the struct pages in the missing pages are "uncaptured", never guessed.
        size = self.format.size
        vaddr = self.vmemmap + start * size
        total = count * size
        data = bytearray(total)
        lost = np.zeros(total, dtype=bool)
        pos = 0
        while pos < total:
            n = min(total - pos, PAGE_SIZE - (vaddr + pos) % PAGE_SIZE)
            try:
                with self._lock:
                    data[pos : pos + n] = self.kernel.read_virt(vaddr + pos, n)
            except (PageNotCaptured, ImageError):
                lost[pos : pos + n] = True
            pos += n
        pages = np.frombuffer(bytes(data), dtype=self.format.dtype, count=count)
        return pages, lost.reshape(count, size).any(axis=1)

    def classify_range(self, nid: int, start: int, end: int, free_only: bool = False) -> Batch:
        """Read and classify the pages ``[start, end)`` of node ``nid`` (see :func:`classify`
        for ``free_only``)."""
        pages, lost = self._read_span(start, end)
        classes, order, head = classify(
            self, pages, start, end - start, lost=lost, free_only=free_only
        )
        return Batch(nid, start, pages[: end - start], classes, order, head)

    def _has_map(self, pfn: int) -> bool:
        """Whether ``pfn`` has a struct page to read: in a node's span and a section with a
        memory map."""
        return any(n.start <= pfn < n.end for n in self.nodes) and any(
            s <= pfn < e for s, e in self.sections
        )

    def head_info(self, pfn: int) -> tuple[int, int]:
        """The class and order of the compound head at ``pfn`` (outside the batch at hand)."""
        hit = self._heads.get(pfn)
        if hit is None:
            if not self._has_map(pfn):
                hit = (CODE["other"], -1)
            else:
                pages, lost = self._read_span(pfn, pfn + 1)
                classes, order, _ = classify(self, pages, pfn, 1, False, lost)
                hit = (int(classes[0]), int(order[0]))
            if len(self._heads) > 4096:
                self._heads.clear()
            self._heads[pfn] = hit
        return hit

    def in_ram(self, start: int, count: int) -> np.ndarray:
        """Which of ``count`` PFNs from ``start`` have RAM behind them in the image."""
        out = np.zeros(count, dtype=bool)
        for s, e in self.ram:
            lo, hi = max(s, start), min(e, start + count)
            if lo < hi:
                out[lo - start : hi - start] = True
        return out

    def zone_of(self, nid: int, pfn: int) -> Zone | None:
        for node in self.nodes:
            if node.nid == nid:
                for zone in node.zones:
                    if zone.start <= pfn < zone.end:
                        return zone
        return None


def _looks_free(fmt: PageFormat, pages: np.ndarray) -> np.ndarray:
    """Which of ``pages`` (compact struct page records) show what free_pages_prepare()
    leaves on a page it frees and page_expected_state() checks: no references, no mapping,
    no page type (_mapcount -1), not on an LRU list, not part of a compound page."""
    page_type = pages["page_type"].astype(np.uint32)
    if fmt.type_scheme == "top-byte":
        untyped = (page_type >> np.uint32(24)) == np.uint32(0xFF)
    else:
        untyped = page_type == np.uint32(0xFFFFFFFF)
    bits = np.uint64(fmt.flag("PG_lru") | fmt.flag("PG_head"))
    return (
        (pages["refcount"] == 0)
        & (pages["mapping"] == 0)
        & untyped
        & ((pages["flags"].astype(np.uint64) & bits) == 0)
        & ((pages["compound_head"].astype(np.uint64) & np.uint64(1)) == 0)
    )


def _type_is(fmt: PageFormat, page_type: np.ndarray, cls: str) -> np.ndarray | None:
    value = fmt.types.get(cls)
    if value is None:
        return None
    if fmt.type_scheme == "top-byte":
        return (page_type >> np.uint32(24)) == np.uint32(value)
    mask = np.uint32(PAGE_TYPE_BASE | value)
    return (page_type & mask) == np.uint32(PAGE_TYPE_BASE)


def classify(
    walker: PageWalker,
    pages: np.ndarray,
    start: int,
    count: int,
    resolve_tails: bool = True,
    lost: np.ndarray | None = None,
    free_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classify ``count`` struct pages from PFN ``start`` (``pages`` may hold one more: the
    page after, read for a head's second page).

    :param free_only: stop once the free classes (:data:`FREE_CLASSES`) are given, leaving
        ``other`` on every page not yet decided. The tests are applied in :data:`CLASSES`
        order and a decided page is never revisited, so the pages called free are exactly
        those a whole classification calls free, for a quarter of the work (what a live
        ``--skip free`` asks before every chunk).
    :returns: class codes, orders (heads of free blocks and compound pages; -1 elsewhere)
        and head PFNs of compound tails (-1 elsewhere).
    """
    fmt = walker.format
    n = count
    flags = pages["flags"].astype(np.uint64)
    page_type = pages["page_type"].astype(np.uint32)
    refcount = pages["refcount"][:n]
    mapping = pages["mapping"][:n]
    chead = pages["compound_head"][:n]
    classes = np.full(n, CODE["other"], dtype=np.uint8)
    decided = np.zeros(n, dtype=bool)
    order = np.full(n, -1, dtype=np.int8)
    head = np.full(n, -1, dtype=np.int64)

    def give(mask: np.ndarray | None, cls: str) -> None:
        if mask is None:
            return
        mask = mask[:n] & ~decided
        classes[mask] = CODE[cls]
        decided[mask] = True

    def flag(name: str) -> np.ndarray | None:
        bit = fmt.flag(name)
        return None if not bit else (flags & np.uint64(bit)) != 0

    give(~walker.in_ram(start, n), "hole")
    if lost is not None:
        give(lost[:n], "uncaptured")
    give(flag("PG_hwpoison"), "hwpoison")

    # Free blocks: a buddy head's order is in private; its tail pages carry no mark.
    buddy = _type_is(fmt, page_type, "buddy")[:n] & ~decided
    if "private" in pages.dtype.names:
        border = pages["private"][:n].astype(np.int64)
    else:
        border = np.zeros(n, dtype=np.int64)
    buddy &= (border >= 0) & (border <= fmt.max_order)
    give(buddy, "buddy")
    idx = np.nonzero(buddy)[0]
    order[idx] = border[idx]
    if len(idx):
        ends = np.minimum(idx + (1 << border[idx]), n)
        delta = (
            np.bincount(idx + 1, minlength=n + 1)[: n + 1]
            - np.bincount(ends, minlength=n + 1)[: n + 1]
        )
        give(np.cumsum(delta)[:n] > 0, "buddy-tail")

    # Per-CPU free lists: blocks found by walking zone->per_cpu_pageset.
    if len(walker._pcp_start):
        # Walked before these struct pages were read (a live machine): a block counts while
        # its head still looks free. A block whose head is outside this batch is not believed.
        fresh = _looks_free(fmt, pages[:n]) if walker.pcp_recheck else None
        pcp = np.zeros(n + 1, dtype=np.int64)
        lo = np.searchsorted(walker._pcp_start + walker._pcp_len, start, side="right")
        hi = np.searchsorted(walker._pcp_start, start + n, side="left")
        for s, length in zip(walker._pcp_start[lo:hi], walker._pcp_len[lo:hi], strict=True):
            a, b = max(int(s) - start, 0), min(int(s + length) - start, n)
            if fresh is not None and (int(s) < start or not fresh[a]):
                continue
            if a < b:
                pcp[a] += 1
                pcp[b] -= 1
        give(np.cumsum(pcp)[:n] > 0, "pcp")
    if free_only:
        return classes, order, head

    # Second-page values of each head: page[i + 1] (the folio's first tail page).
    nxt_flags = np.zeros(n, dtype=np.uint64)
    nxt_flags[: len(flags) - 1] = flags[1 : n + 1] if len(flags) > 1 else nxt_flags[:0]
    if fmt.order_by == "member":
        second_order = np.zeros(n, dtype=np.int64)
        co = pages["compound_order"].astype(np.int64)
        second_order[: len(co) - 1] = co[1 : n + 1]
    else:
        second_order = (nxt_flags & np.uint64(0xFF)).astype(np.int64)

    give(_type_is(fmt, page_type, "offline"), "offline")
    give(_type_is(fmt, page_type, "unaccepted"), "unaccepted")
    give(_type_is(fmt, page_type, "guard"), "guard")

    # Compound tails: compound_head holds the head's address with bit 0 set.
    tail = ((chead & np.uint64(1)) != 0) & ~decided
    head_addr = (chead & ~np.uint64(1)).astype(np.uint64)
    # Wrapping uint64 arithmetic, then signed: a head below vmemmap_base comes out negative.
    rel = (head_addr - np.uint64(walker.vmemmap)).astype(np.int64)
    head_pfn = rel // fmt.size
    pfns = np.arange(start, start + n, dtype=np.int64)
    tail &= (
        (rel % fmt.size == 0) & (head_pfn < pfns) & (pfns - head_pfn < (1 << MAX_COMPOUND_ORDER))
    )
    bad_tail = ((chead & np.uint64(1)) != 0) & ~decided & ~tail
    head[tail] = head_pfn[tail]
    decided |= tail  # classes filled in below, from their heads

    is_head = flag("PG_head")
    if is_head is None:
        is_head = np.zeros(len(flags), dtype=bool)
    is_head = is_head[:n] & ~decided
    hidx = np.nonzero(is_head)[0]
    hord = second_order[hidx]
    hord = np.where((hord >= 1) & (hord <= MAX_COMPOUND_ORDER), hord, -1)
    order[hidx] = hord

    # hugetlb
    if fmt.hugetlb_by == "type":
        give(_type_is(fmt, page_type, "hugetlb"), "hugetlb")
    elif fmt.hugetlb_by == "dtor":
        dt = np.zeros(n, dtype=np.int64)
        cd = pages["compound_dtor"].astype(np.int64)
        dt[: len(cd) - 1] = cd[1 : n + 1]
        give(is_head & (dt == fmt.hugetlb_value), "hugetlb")
    elif fmt.hugetlb_by == "flag":
        give(is_head & ((nxt_flags & np.uint64(fmt.flag("PG_hugetlb"))) != 0), "hugetlb")

    if fmt.slab_by == "flag":
        give(flag("PG_slab"), "slab")
    elif fmt.slab_by == "type":
        give(_type_is(fmt, page_type, "slab"), "slab")
    give(_type_is(fmt, page_type, "pagetable"), "pagetable")
    give(_type_is(fmt, page_type, "zsmalloc"), "zsmalloc")
    give(_type_is(fmt, page_type, "large-kmalloc"), "large-kmalloc")
    give(flag("PG_reserved"), "reserved")
    swapcache, swapbacked = flag("PG_swapcache"), flag("PG_swapbacked")
    if swapcache is not None and swapbacked is not None:
        give(swapcache & swapbacked, "swapcache")
    low = mapping & np.uint64(PAGE_MAPPING_FLAGS)
    give(low == np.uint64(PAGE_MAPPING_ANON), "anon")
    give(low == np.uint64(PAGE_MAPPING_FLAGS), "anon")  # KSM: both bits
    is_file = (low == 0) & (mapping != 0)
    writeback, dirty = flag("PG_writeback"), flag("PG_dirty")
    if writeback is not None:
        give(is_file & writeback[:n], "file-writeback")
    if dirty is not None:
        give(is_file & dirty[:n], "file-dirty")
    give(is_file, "file")
    give(is_head, "compound-head")
    give(refcount == 0, "zero-refcount")

    # Tails take their head's class; a head with no class of its own makes compound-tails.
    if resolve_tails:
        tidx = np.nonzero(tail)[0]
        if len(tidx):
            hp = head_pfn[tidx]
            inside = hp >= start
            hcls = np.empty(len(tidx), dtype=np.uint8)
            hcls[inside] = classes[hp[inside] - start]
            horder = np.full(len(tidx), -1, dtype=np.int64)
            horder[inside] = order[hp[inside] - start]
            for j in np.nonzero(~inside)[0]:
                c, o = walker.head_info(int(hp[j]))
                hcls[j], horder[j] = c, o
            # A tail beyond its head's order is stale: its head says it is not a tail.
            span_ok = (horder >= 1) & (tidx + start - hp < (np.int64(1) << np.maximum(horder, 0)))
            hcls = np.where(hcls == CODE["compound-head"], CODE["compound-tail"], hcls)
            # Free and hole heads make no compound pages: such a tail is stale. A head the
            # image lacks leaves its tails unknown too.
            unknown = hcls == CODE["uncaptured"]
            stale = (~span_ok & ~unknown) | np.isin(
                hcls, [CODE[c] for c in ("hole", *FREE_CLASSES)]
            )
            hcls = np.where(stale, CODE["other"], hcls)
            classes[tidx] = hcls
            head[tidx[stale]] = -1
            decided[tidx] = True
    give(bad_tail, "other")
    return classes, order, head


# -- counting -------------------------------------------------------------------------------------


@dataclass
class PageCounts:
    """Everything counted in one walk over the memory map.

    ``by_zone[(nid, zone index or -1)]`` holds pages per class code; ``flags`` pages per
    combination of page flags (node and zone bits dropped); ``slab_caches`` pages and slabs
    per ``struct kmem_cache *``; ``buddy_heads[(nid, zone)]`` free blocks per order found in
    the array.
    """

    by_zone: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    flags: dict[int, int] = field(default_factory=dict)
    slab_caches: dict[int, list[int]] = field(default_factory=dict)
    buddy_heads: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    pages: int = 0


def zone_slices(walker: PageWalker, batch: Batch) -> Iterator[tuple[int, int, int]]:
    """``(zone index or -1, lo, hi)``: the parts of a batch in each zone of its node."""
    n = len(batch.classes)
    node = next(nd for nd in walker.nodes if nd.nid == batch.nid)
    pos = 0
    for zone in sorted(node.zones, key=lambda z: z.start):
        lo, hi = max(zone.start - batch.start, pos), min(zone.end - batch.start, n)
        if lo < hi:
            if lo > pos:
                yield -1, pos, lo
            yield zone.index, lo, hi
            pos = hi
    if pos < n:
        yield -1, pos, n


#: What :func:`count_pages` can count.
COUNTS = frozenset({"zones", "flags", "slab-caches", "buddy"})


def count_pages(
    walker: PageWalker,
    batches: Iterator[Batch] | None = None,
    what: frozenset[str] | set[str] = COUNTS,
) -> PageCounts:
    """Count the classes per zone, and (as ``what`` asks) flag combinations, slab caches and
    free blocks per order, of every page."""
    counts = PageCounts()
    fmt = walker.format
    nclasses = len(CLASSES)
    mask = np.uint64(fmt.flags_mask)
    slab_code, hole_code = CODE["slab"], CODE["hole"]
    for batch in batches if batches is not None else walker.batches():
        counts.pages += len(batch.classes)
        for zone, lo, hi in zone_slices(walker, batch):
            key = (batch.nid, zone)
            classes = batch.classes[lo:hi]
            got = np.bincount(classes, minlength=nclasses)
            have = counts.by_zone.get(key)
            counts.by_zone[key] = got if have is None else have + got
            buddy = np.nonzero(classes == CODE["buddy"])[0] if "buddy" in what else ()
            if len(buddy):
                orders = np.bincount(batch.order[lo:hi][buddy], minlength=fmt.max_order + 1)
                have = counts.buddy_heads.get(key)
                counts.buddy_heads[key] = orders if have is None else have + orders
        if "flags" in what:
            real = batch.classes != hole_code
            values, n = np.unique(batch.pages["flags"][real] & mask, return_counts=True)
            for v, c in zip(values.tolist(), n.tolist(), strict=True):
                counts.flags[v] = counts.flags.get(v, 0) + c
        if "slab-caches" in what and "slab_cache" in batch.pages.dtype.names:
            heads = np.nonzero((batch.classes == slab_code) & (batch.head < 0))[0]
            if len(heads):
                caches = batch.pages["slab_cache"][heads]
                sizes = np.left_shift(1, np.maximum(batch.order[heads], 0).astype(np.int64))
                for cache, size in zip(caches.tolist(), sizes.tolist(), strict=True):
                    entry = counts.slab_caches.setdefault(cache, [0, 0])
                    entry[0] += size
                    entry[1] += 1
    return counts
