"""What physical memory is used for, page by page, and the buddy allocator's free lists.

The classification is the kernel layer's (:mod:`collector.kernel.pages`); these analyses
choose the view: counts per node, zone and class (the default), per flag combination, per
slab cache, a summary to set beside /proc/meminfo, one record per page of a PFN range (like
crash's ``kmem -p``), and a picture. ``buddyinfo`` sets the zones' own free counts beside
the free blocks found in the memory map.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from collector.api import Analysis, Field, NotApplicable, Option, hookimpl
from collector.errors import CollectorError, UsageError
from collector.kernel.pages import (
    CLASSES,
    CODE,
    FREE_CLASSES,
    PageCounts,
    PageWalker,
    count_pages,
    zone_slices,
)

if TYPE_CHECKING:
    from collector.api import Kernel

#: The most PFNs one ``--pfn`` range may cover (2^32 pages: 16 TiB).
MAX_PFN_RANGE = 1 << 32
#: The longest slab cache name read.
MAX_CACHE_NAME = 64
#: Per-order counts of free blocks agree when they differ by at most this fraction, or by
#: BUDDY_SMEAR_BLOCKS: a live capture reads the zone and the memory map at different moments.
BUDDY_SMEAR = 0.05
BUDDY_SMEAR_BLOCKS = 2

_VIEWS = ("zone", "flags", "slab-cache", "summary")

_FIELDS = (
    Field("pfn", "hex", "page frame number"),
    Field("page", "hex", "the struct page's address in the vmemmap"),
    Field("node", "int", "NUMA node"),
    Field(
        "zone", "str", "zone name (DMA, DMA32, Normal...); null outside every zone or without BTF"
    ),
    Field("class", "str", "what the page is used for (see `collect plugins pages`)"),
    Field("key", "str", "summary: what is counted"),
    Field("cache", "str", "slab-cache: the kmem_cache's name"),
    Field("slabs", "int", "slab-cache: slabs of the cache"),
    Field("pages", "int", "pages counted"),
    Field("bytes", "int", "their size in bytes"),
    Field("meminfo", "str", "summary: the /proc/meminfo line the count corresponds to"),
    Field("note", "str", "summary: why a count is not complete (a class needing BTF)"),
    Field("flags", "hex", "page->flags without the node and zone bits"),
    Field("flag_names", "str", "those flags by name (PG_ dropped)"),
    Field("refcount", "int", "page->_refcount"),
    Field("mapcount", "int", "page_mapcount(): _mapcount + 1; null for typed pages"),
    Field("mapping", "hex", "page->mapping (an address_space, or anon_vma | 1)"),
    Field("private", "hex", "page->private (the order of a free block)"),
    Field("order", "int", "order of a free block's or compound page's head"),
    Field("head", "hex", "the head PFN of a compound tail"),
)

_VIEW_FIELDS = {
    "zone": ("node", "zone", "class", "pages", "bytes"),
    "flags": ("flags", "flag_names", "pages", "bytes"),
    "slab-cache": ("cache", "slabs", "pages", "bytes"),
    "summary": ("key", "pages", "bytes", "meminfo", "note"),
    "pfn": (
        "pfn",
        "page",
        "node",
        "zone",
        "class",
        "flags",
        "flag_names",
        "refcount",
        "mapcount",
        "mapping",
        "private",
        "order",
        "head",
    ),
}


def _fields_for(options: dict[str, Any]) -> tuple[str, ...]:
    if options.get("pfn") is not None:
        return _VIEW_FIELDS["pfn"]
    return _VIEW_FIELDS.get(options.get("by") or "zone", _VIEW_FIELDS["zone"])


PAGES = Analysis(
    name="pages",
    summary="what every page of physical memory is used for: counts per node, zone and class",
    fields=_FIELDS,
    options=(
        Option("by", str, "zone", "zone, flags, slab-cache or summary (/proc/meminfo's terms)"),
        Option(
            "pfn", str, None, "one record per page of START[-END] (END exclusive), like kmem -p"
        ),
        Option("map", str, None, "also draw physical memory, coloured by class, into this PNG"),
    ),
    run=lambda kernel, options: pages(kernel, options),
    fields_for=_fields_for,
)

BUDDYINFO = Analysis(
    name="buddyinfo",
    summary="free blocks per node, zone and order: the zone's count and the memory map's",
    fields=(
        Field("node", "int", "NUMA node"),
        Field("zone", "str", "zone name"),
        Field("order", "int", "block order (2^order pages)"),
        Field("nr_free", "int", "zone->free_area[order].nr_free, as /proc/buddyinfo prints it"),
        Field("heads", "int", "buddy pages of that order found in the memory map"),
        Field("difference", "int", "heads - nr_free"),
        Field(
            "agrees",
            "bool",
            f"the two differ by at most {BUDDY_SMEAR:.0%} or {BUDDY_SMEAR_BLOCKS} blocks"
            " (a live capture reads them at different moments)",
        ),
    ),
    run=lambda kernel, options: buddyinfo(kernel),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [PAGES, BUDDYINFO]


# -- pages ----------------------------------------------------------------------------------------


def parse_pfn_range(text: str) -> tuple[int, int]:
    """``START[-END]`` (END exclusive; either in any base ``int(x, 0)`` reads) as a range.

    :raises UsageError: not a range, or an empty or huge one.
    """
    start_text, sep, end_text = text.partition("-")
    try:
        start = int(start_text, 0)
        end = int(end_text, 0) if sep else start + 1
    except ValueError:
        raise UsageError(f"pages: --pfn {text!r} is not START[-END]") from None
    if not 0 <= start < end or end - start > MAX_PFN_RANGE:
        raise UsageError(f"pages: --pfn {text!r} is an empty or too large range")
    return start, end


def pages(kernel: Kernel, options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    view = options.get("by") or "zone"
    if view not in _VIEWS:
        raise UsageError(f"pages: --by must be one of {', '.join(_VIEWS)}")
    pfn_range = parse_pfn_range(options["pfn"]) if options.get("pfn") is not None else None
    if options.get("map"):
        from collector.plugins.pages.pagemap import check_map_path

        check_map_path(options["map"])
    walker = PageWalker(kernel)
    if pfn_range is not None:
        yield from per_pfn(walker, *pfn_range)
        return
    page_size = kernel.memory.page_size or 4096
    what = {"zone": {"zones"}, "flags": {"flags"}, "slab-cache": {"slab-caches"}}.get(
        view, {"zones"}
    )
    batches = walker.batches()
    if options.get("map"):
        from collector.plugins.pages.pagemap import draw_map

        batches = draw_map(walker, options["map"], batches)
    counts = count_pages(walker, batches, what)
    if view == "zone":
        yield from by_zone(walker, counts, page_size)
    elif view == "flags":
        for flags, n in sorted(counts.flags.items(), key=lambda kv: -kv[1]):
            names = walker.format.flag_names(flags)
            yield {"flags": flags, "flag_names": names, "pages": n, "bytes": n * page_size}
    elif view == "slab-cache":
        yield from by_slab_cache(kernel, counts, page_size)
    else:
        yield from summary(walker, counts, page_size)


def _zone_name(walker: PageWalker, nid: int, index: int) -> str | None:
    for node in walker.nodes:
        if node.nid == nid:
            for zone in node.zones:
                if zone.index == index:
                    return zone.name
    return None


def by_zone(walker: PageWalker, counts: PageCounts, page_size: int) -> Iterator[dict[str, Any]]:
    for (nid, zone), classes in sorted(counts.by_zone.items()):
        name = _zone_name(walker, nid, zone)
        for code, n in enumerate(classes.tolist()):
            if n:
                yield {
                    "node": nid,
                    "zone": name,
                    "class": CLASSES[code],
                    "pages": n,
                    "bytes": n * page_size,
                }


def by_slab_cache(kernel: Kernel, counts: PageCounts, page_size: int) -> Iterator[dict[str, Any]]:
    if not counts.slab_caches and walker_needs_btf(kernel):
        raise NotApplicable("slab caches are named through struct slab, which needs BTF")
    rows = []
    for cache, (n, slabs) in counts.slab_caches.items():
        try:
            name = kernel.object("struct kmem_cache", cache).name.text(MAX_CACHE_NAME)
        except CollectorError as e:
            name = f"? ({cache:#x}: {e})"
        rows.append({"cache": name, "slabs": slabs, "pages": n, "bytes": n * page_size})
    yield from sorted(rows, key=lambda r: (-r["pages"], r["cache"]))


def walker_needs_btf(kernel: Kernel) -> bool:
    try:
        _ = kernel.btf
    except NotApplicable:
        return True
    return False


#: The summary's keys: classes summed, and the /proc/meminfo line each corresponds to.
SUMMARY = (
    ("ram", None, "MemTotal (which counts only pages the allocator manages)"),
    ("free", FREE_CLASSES, "MemFree (which leaves out the per-CPU lists)"),
    ("buddy", ("buddy", "buddy-tail"), "MemFree"),
    ("pcp", ("pcp",), None),
    ("slab", ("slab",), "Slab"),
    ("anon", ("anon",), "AnonPages (which counts mapped anonymous pages)"),
    ("swapcache", ("swapcache",), "SwapCached"),
    ("file", ("file", "file-dirty", "file-writeback"), "Cached + Buffers (Shmem included)"),
    ("dirty", ("file-dirty",), "Dirty"),
    ("writeback", ("file-writeback",), "Writeback"),
    ("pagetables", ("pagetable",), "PageTables"),
    ("hugetlb", ("hugetlb",), "Hugetlb"),
    ("reserved", ("reserved",), None),
    ("hole", ("hole",), None),
)


def summary(walker: PageWalker, counts: PageCounts, page_size: int) -> Iterator[dict[str, Any]]:
    total = sum((c for c in counts.by_zone.values()), np.zeros(len(CLASSES), dtype=np.int64))
    unavailable = dict(walker.format.unavailable)
    if not walker.pcp_counted and "pcp" not in unavailable:
        unavailable["pcp"] = "the per-CPU free lists were not walked"
    for key, classes, meminfo in SUMMARY:
        if classes is None:
            n = int(total.sum() - total[CODE["hole"]])
        else:
            n = int(sum(total[CODE[c]] for c in classes))
        missing = [f"{c}: {unavailable[c]}" for c in classes or () if c in unavailable]
        yield {
            "key": key,
            "pages": n,
            "bytes": n * page_size,
            "meminfo": meminfo,
            "note": "; ".join(missing) or None,
        }
    # What the walk had to leave out or work around (a per-CPU list torn by a live capture).
    if walker.notes:
        yield {"key": "notes", "note": "; ".join(walker.notes)}


def per_pfn(walker: PageWalker, start: int, end: int) -> Iterator[dict[str, Any]]:
    fmt = walker.format
    mask = fmt.flags_mask
    names: dict[int, str] = {}
    typed = {CODE[c] for c in ("buddy", "offline", "pagetable", "guard", "unaccepted")}
    typed |= {CODE[c] for c in ("slab", "hugetlb", "zsmalloc", "large-kmalloc") if c in fmt.types}
    has_private = "private" in fmt.dtype.names
    for batch in walker.batches(start, end):
        zones = {}
        for zone, lo, hi in zone_slices(walker, batch):
            zones[(lo, hi)] = _zone_name(walker, batch.nid, zone)
        p = batch.pages
        flags = (p["flags"] & np.uint64(mask)).tolist()
        refcount = p["refcount"].tolist()
        page_type = p["page_type"].astype(np.int64).tolist()
        mapping = p["mapping"].tolist()
        private = p["private"].tolist() if has_private else [None] * len(flags)
        classes = batch.classes.tolist()
        order = batch.order.tolist()
        head = batch.head.tolist()
        for (lo, hi), zone_name in zones.items():
            for i in range(lo, hi):
                f = flags[i]
                fn = names.get(f)
                if fn is None:
                    fn = names[f] = fmt.flag_names(f)
                cls = classes[i]
                pt = page_type[i]
                yield {
                    "pfn": batch.start + i,
                    "page": walker.vmemmap + (batch.start + i) * fmt.size,
                    "node": batch.nid,
                    "zone": zone_name,
                    "class": CLASSES[cls],
                    "flags": f,
                    "flag_names": fn,
                    "refcount": refcount[i],
                    "mapcount": None
                    if cls in typed
                    else (pt - (1 << 32) if pt >= 1 << 31 else pt) + 1,
                    "mapping": mapping[i],
                    "private": private[i],
                    "order": order[i] if order[i] >= 0 else None,
                    "head": head[i] if head[i] >= 0 else None,
                }


# -- buddyinfo ------------------------------------------------------------------------------------


def buddyinfo(kernel: Kernel) -> Iterator[dict[str, Any]]:
    walker = PageWalker(kernel, with_pcp=False)
    if not any(node.zones for node in walker.nodes):
        raise NotApplicable("zones are read through BTF, which the image lacks")
    counts = count_pages(walker)
    for node in walker.nodes:
        for zone in node.zones:
            if zone.end <= zone.start or not zone.nr_free:
                continue
            heads = counts.buddy_heads.get((node.nid, zone.index))
            for order, nr_free in enumerate(zone.nr_free):
                found = int(heads[order]) if heads is not None and order < len(heads) else 0
                diff = found - nr_free
                yield {
                    "node": node.nid,
                    "zone": zone.name,
                    "order": order,
                    "nr_free": nr_free,
                    "heads": found,
                    "difference": diff,
                    "agrees": abs(diff) <= max(BUDDY_SMEAR_BLOCKS, BUDDY_SMEAR * nr_free),
                }
