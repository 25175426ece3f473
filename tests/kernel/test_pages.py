"""The page classifier on synthetic memory maps, one per layout era of struct page.

Each test lays out 64 pages by hand (collector.testing.pages writes them through the C
layout the image's BTF is compiled from) and states the class of every PFN; the walker reads
them back through the construct definition that BTF gives.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from collector.analyze import analyze_kernel
from collector.errors import CollectorError
from collector.kernel.pages import CLASSES, FREE_CLASSES, PageWalker, count_pages, page_format
from collector.plugin_manager import PluginManager
from collector.testing.pages import ERAS, MemoryMap

START = 0x20000
ANON_VMA = 0xFFFF888012345670  # an anon_vma: mapping's low bit marks anonymous memory
ADDRESS_SPACE = 0xFFFF888012345000


def build(era: str) -> tuple[MemoryMap, dict[int, str]]:
    """A node of 64 pages in two zones of 32, every PFN given a known use; and the classes
    the walker must find."""
    m = MemoryMap(era, START, 64, holes=(START + 62, START + 63))
    want: dict[int, str] = {}

    def at(offset: int, cls: str, count: int = 1) -> None:
        for i in range(count):
            want[START + offset + i] = cls

    p = START
    m.in_use(p + 0, flags=m.bit("PG_reserved"))
    at(0, "reserved")
    m.in_use(p + 1, flags=m.bit("PG_hwpoison") | m.bit("PG_lru"), mapping=ADDRESS_SPACE)
    at(1, "hwpoison")
    m.buddy(p + 2, 1)
    at(2, "buddy")
    at(3, "buddy-tail")
    m.buddy(p + 4, 2)
    at(4, "buddy")
    at(5, "buddy-tail", 3)
    m.nr_free("DMA32", 1, 1)
    m.nr_free("DMA32", 2, 1)
    m.pcp("DMA32", p + 8)
    at(8, "pcp")
    m.slab(p + 9, "cache-a")
    at(9, "slab")
    m.typed(p + 10, "table")
    at(10, "pagetable")
    m.in_use(p + 11, flags=m.bit("PG_lru") | m.bit("PG_swapbacked"), mapping=ANON_VMA | 1)
    m.set(p + 11, _mapcount__counter=0)
    at(11, "anon")
    m.in_use(p + 12, flags=m.bit("PG_uptodate") | m.bit("PG_lru"), mapping=ADDRESS_SPACE)
    at(12, "file")
    m.in_use(p + 13, flags=m.bit("PG_dirty") | m.bit("PG_lru"), mapping=ADDRESS_SPACE)
    at(13, "file-dirty")
    m.in_use(p + 14, flags=m.bit("PG_writeback") | m.bit("PG_dirty"), mapping=ADDRESS_SPACE)
    at(14, "file-writeback")
    m.in_use(p + 15, flags=m.bit("PG_swapcache") | m.bit("PG_swapbacked"), mapping=ANON_VMA | 1)
    at(15, "swapcache")
    m.slab(p + 16, "cache-b", order=3)
    at(16, "slab", 8)
    m.hugetlb(p + 24, 2)
    at(24, "hugetlb", 4)
    if m.has_type("large_kmalloc"):
        m.compound(p + 28, 2)
        m.set(p + 28, page_type=m._type_word("large_kmalloc"))
        at(28, "large-kmalloc", 4)
    else:  # before a type marked them, large kmallocs are plain compound pages
        m.compound(p + 28, 2)
        at(28, "compound-head")
        at(29, "compound-tail", 3)
    # ZONE_NORMAL from here.
    m.typed(p + 32, "offline")
    at(32, "offline")
    m.in_use(p + 33, refcount=0)
    at(33, "zero-refcount")
    m.in_use(p + 34)
    at(34, "other")
    m.in_use(p + 35, mapping=ANON_VMA | 3)  # KSM
    at(35, "anon")
    for offset, kind in ((36, "zsmalloc"), (37, "unaccepted")):
        if m.has_type(kind):
            m.typed(p + offset, kind)
            at(offset, kind)
        else:
            m.in_use(p + offset)
            at(offset, "other")
    # A stale tail: compound_head names a page that is no compound head.
    m.in_use(p + 38)
    m.set(p + 38, compound_head=m.vmemmap(p + 34) | 1)
    at(38, "other")
    m.in_use(p + 39)
    at(39, "other")
    m.buddy(p + 40, 3)
    at(40, "buddy")
    at(41, "buddy-tail", 7)
    m.nr_free("Normal", 3, 1)
    m.pcp("Normal", p + 48, index=3)  # list 3 holds order-1 blocks
    at(48, "pcp", 2)
    for offset in range(50, 56):
        m.in_use(p + offset)
        at(offset, "other")
    at(56, "zero-refcount", 6)  # struct pages never written: all zero
    at(62, "hole", 2)
    assert sorted(want) == list(range(START, START + 64))
    return m, want


def walk(m: MemoryMap) -> tuple[PageWalker, dict[int, str], list]:
    walker = PageWalker(m.kernel())
    got, batches = {}, []
    for batch in walker.batches():
        batches.append(batch)
        for i, code in enumerate(batch.classes.tolist()):
            got[batch.start + i] = CLASSES[code]
    return walker, got, batches


@pytest.mark.parametrize("era", ERAS)
def test_every_page_gets_its_class(era: str) -> None:
    m, want = build(era)
    walker, got, batches = walk(m)
    assert got == want
    # Orders of free blocks and compound heads; tails name their head.
    order = {b.start + i: o for b in batches for i, o in enumerate(b.order.tolist()) if o >= 0}
    assert order == {
        START + 2: 1,
        START + 4: 2,
        START + 16: 3,
        START + 24: 2,
        START + 28: 2,
        START + 40: 3,
    }
    head = {b.start + i: h for b in batches for i, h in enumerate(b.head.tolist()) if h >= 0}
    assert head == {
        **{START + i: START + 16 for i in range(17, 24)},
        **{START + i: START + 24 for i in range(25, 28)},
        **{START + i: START + 28 for i in range(29, 32)},
    }
    assert walker.pcp == {START + 8: 0, START + 48: 1}
    assert walker.notes == []


@pytest.mark.parametrize("era", ERAS)
def test_free_only_stops_once_the_free_pages_are_known(era: str) -> None:
    m, want = build(era)
    walker = PageWalker(m.kernel())
    got = {}
    for nid, lo, hi in walker.spans():
        batch = walker.classify_range(nid, lo, hi, free_only=True)
        got.update((lo + i, CLASSES[c]) for i, c in enumerate(batch.classes.tolist()))
    # Free, and what comes before free in the order the tests are applied, as the whole
    # classification has it; everything after is left "other".
    early = ("hole", "uncaptured", "hwpoison", *FREE_CLASSES)
    assert got == {pfn: cls if cls in early else "other" for pfn, cls in want.items()}
    assert {c for c in want.values() if c in FREE_CLASSES} == set(FREE_CLASSES)


@pytest.mark.parametrize("era", ERAS)
def test_walked_early_the_per_cpu_lists_count_only_pages_still_free(era: str) -> None:
    # As a live capture sees them: the lists walked once, the struct pages read later. The
    # page on the DMA32 list is allocated in between (refcount 1, on an LRU, a mapping).
    m, want = build(era)
    spans = [(START, START + 62)]  # the RAM: a live capture walks System RAM's frames
    walker = PageWalker(m.kernel(), spans=spans, pcp_recheck=True)
    stale = PageWalker(m.kernel(), spans=spans)
    assert walker.pcp == stale.pcp == {START + 8: 0, START + 48: 1}
    m.in_use(START + 8, flags=m.bit("PG_lru"), mapping=ADDRESS_SPACE)
    walker.kernel = stale.kernel = m.kernel()  # the memory as it is now

    def classes(w: PageWalker) -> dict[int, str]:
        out = {}
        for nid, lo, hi in w.spans():
            batch = w.classify_range(nid, lo, hi)
            out.update((lo + i, CLASSES[c]) for i, c in enumerate(batch.classes.tolist()))
        return out

    now = {pfn: cls for pfn, cls in want.items() if cls != "hole"}
    assert classes(stale) == now  # a walk taken as still true calls the page free
    now[START + 8] = "file"
    assert classes(walker) == now


@pytest.mark.parametrize("era", ERAS)
def test_counts_per_zone_flags_and_slab_cache(era: str) -> None:
    m, want = build(era)
    walker, _, _ = walk(m)
    counts = count_pages(walker)
    zones = {z.name: z.index for z in walker.nodes[0].zones}
    for name, lo in (("DMA32", 0), ("Normal", 32)):
        expected = Counter(want[START + i] for i in range(lo, lo + 32))
        got = counts.by_zone[(0, zones[name])]
        assert {CLASSES[c]: n for c, n in enumerate(got.tolist()) if n} == expected
    assert counts.pages == 64
    # Flags: every page but the holes, by combination (node and zone bits are none here).
    assert sum(counts.flags.values()) == 62
    assert counts.flags[m.bit("PG_reserved")] == 1
    names = {walker.format.flag_names(f) for f in counts.flags}
    assert "dirty|lru" in names or "lru|dirty" in names
    assert counts.slab_caches == {m.names["cache-a"]: [1, 1], m.names["cache-b"]: [8, 1]}
    assert counts.buddy_heads[(0, zones["DMA32"])].tolist()[:4] == [0, 1, 1, 0]
    assert counts.buddy_heads[(0, zones["Normal"])].tolist()[:4] == [0, 0, 0, 1]


@pytest.mark.parametrize("era", ERAS)
def test_the_layout_is_told_apart_by_what_the_kernel_has(era: str) -> None:
    m, _ = build(era)
    fmt = page_format(m.kernel())
    assert fmt.type_scheme == ("top-byte" if era in ("6.12", "6.18") else "inverted")
    assert fmt.slab_by == ("flag" if era in ("6.1", "6.6", "6.9") else "type")
    assert fmt.hugetlb_by == {"6.1": "dtor", "6.6": "flag"}.get(era, "type")
    assert fmt.order_by == ("member" if era == "6.1" else "flags_1")
    assert fmt.flag_bits["PG_head"] == (16 if era == "6.1" else 6)
    assert fmt.max_order == 10
    assert fmt.source == "BTF"


def manager() -> PluginManager:
    return PluginManager(autoload=False)


def test_pages_analysis_views() -> None:
    m, want = build("6.12")
    kernel = m.kernel()
    result = analyze_kernel(kernel, "pages", manager=manager())
    assert result.error is None
    assert [f.name for f in result.fields] == ["node", "zone", "class", "pages", "bytes"]
    got = Counter()
    for r in result.records:
        got[(r["zone"], r["class"])] += r["pages"]
        assert r["bytes"] == r["pages"] * 4096
    expected = Counter(
        ("DMA32" if pfn < START + 32 else "Normal", cls) for pfn, cls in want.items()
    )
    assert got == expected

    slabs = analyze_kernel(kernel, "pages", {"by": "slab-cache"}, manager=manager()).records
    assert slabs == [
        {"cache": "cache-b", "slabs": 1, "pages": 8, "bytes": 8 * 4096},
        {"cache": "cache-a", "slabs": 1, "pages": 1, "bytes": 4096},
    ]
    summary = {
        r["key"]: r["pages"]
        for r in analyze_kernel(kernel, "pages", {"by": "summary"}, manager=manager()).records
    }
    assert summary["ram"] == 62
    assert summary["free"] == 2 + 4 + 8 + 1 + 2
    assert summary["slab"] == 9
    assert summary["file"] == 3
    assert summary["hole"] == 2


def test_per_pfn_records_stream_like_kmem_p() -> None:
    m, _ = build("6.1")
    kernel = m.kernel()
    result = analyze_kernel(
        kernel, "pages", {"pfn": f"{START + 15:#x}-{START + 18:#x}"}, manager=manager(), stream=True
    )
    records = list(result.records)
    assert result.final_error() is None
    assert [r["pfn"] for r in records] == [START + 15, START + 16, START + 17]
    swap, head, tail = records
    assert swap["class"] == "swapcache" and swap["flag_names"] == "owner_priv_1|swapbacked"
    assert swap["mapping"] == ANON_VMA | 1 and swap["zone"] == "DMA32"
    assert head["class"] == "slab" and head["order"] == 3 and head["flag_names"] == "slab|head"
    assert head["page"] == m.vmemmap(START + 16) and head["refcount"] == 1
    assert tail["class"] == "slab" and tail["head"] == START + 16 and tail["order"] is None


@pytest.mark.parametrize("text", ["x", "5-3", "0x10-0x10", "1-0x200000000"])
def test_a_bad_pfn_range_is_one_line(text: str) -> None:
    m, _ = build("6.1")
    with pytest.raises(CollectorError, match="--pfn"):
        list(analyze_kernel(m.kernel(), "pages", {"pfn": text}, manager=manager()).records)


def test_buddyinfo_sets_nr_free_beside_the_heads() -> None:
    m, _ = build("6.10")
    m.nr_free("Normal", 0, 5)  # the zone says five order-0 blocks; the map has none
    records = analyze_kernel(m.kernel(), "buddyinfo", manager=manager()).records
    rows = {(r["zone"], r["order"]): r for r in records}
    assert len(records) == 22
    assert rows[("DMA32", 1)] == {
        "node": 0,
        "zone": "DMA32",
        "order": 1,
        "nr_free": 1,
        "heads": 1,
        "difference": 0,
        "agrees": True,
    }
    assert rows[("Normal", 3)]["heads"] == 1 and rows[("Normal", 3)]["agrees"]
    assert rows[("Normal", 0)]["difference"] == -5 and not rows[("Normal", 0)]["agrees"]


def test_without_btf_vmcoreinfo_offsets_still_classify() -> None:
    """An image from another tool: VMCOREINFO's OFFSET(page.*), NUMBER(PG_*) and the
    MAPCOUNT values, no BTF. Classes that need BTF fall back, and the walker says which."""
    m, want = build("6.1")
    sk = m.sk
    for member in ("flags", "_refcount", "mapping", "lru", "_mapcount", "private"):
        sk.vmcoreinfo_extra.append(f"OFFSET(page.{member})={sk.offsetof('struct page', member)}")
    for member in ("compound_head", "compound_dtor", "compound_order"):
        sk.vmcoreinfo_extra.append(f"OFFSET(page.{member})={sk.offsetof('struct page', member)}")
    for member in ("node_start_pfn", "node_spanned_pages", "node_zones"):
        at = sk.offsetof("struct pglist_data", member)
        sk.vmcoreinfo_extra.append(f"OFFSET(pglist_data.{member})={at}")
    bits = dict(sk.layout.type("enum pageflags").enumerators)
    for flag in ("PG_lru", "PG_private", "PG_swapcache", "PG_swapbacked", "PG_slab", "PG_hwpoison"):
        sk.vmcoreinfo_extra.append(f"NUMBER({flag})={bits[flag]}")
    sk.vmcoreinfo_extra.append(f"NUMBER(PG_head_mask)={1 << bits['PG_head']}")
    sk.blobs["btf"] = b""
    walker, got, _ = walk(m)
    assert walker.format.source == "VMCOREINFO"
    assert set(walker.format.needs_btf) >= {
        "reserved (PG_reserved)",
        "pagetable (PG_table)",
        "slab caches by name (struct slab)",
    }
    assert set(walker.format.unavailable) == {
        "reserved",
        "pagetable",
        "file-dirty",
        "file-writeback",
        "pcp",
    }
    assert "per-CPU lists not walked: they need BTF" in walker.notes
    assert walker.nodes[0].zones == []
    # Without PG_reserved, PG_dirty, PG_writeback, the table type and the per-CPU lists:
    fallback = {
        START + 0: "other",
        START + 8: "zero-refcount",
        START + 10: "other",
        START + 13: "file",
        START + 14: "file",
        START + 48: "zero-refcount",
        START + 49: "zero-refcount",
    }
    assert got == {**want, **fallback}
    summary = {
        r["key"]: r
        for r in analyze_kernel(m.kernel(), "pages", {"by": "summary"}, manager=manager()).records
    }
    assert summary["reserved"]["note"] == "reserved: PG_reserved is known from BTF only"
    assert summary["pcp"]["note"] == "pcp: the per-CPU free lists are read through BTF"
    assert summary["slab"]["note"] is None and summary["slab"]["pages"] == 9


def test_a_hostile_order_or_head_is_not_believed() -> None:
    m, want = build("6.12")
    m.set(START + 2, private=200)  # a buddy head of order 200
    m.set(START + 34, compound_head=0xDEAD | 1)  # a tail whose head is no struct page
    _, got, _ = walk(m)
    # A buddy page of an impossible order is not believed to head a free block.
    assert got[START + 2] == "zero-refcount"
    assert got[START + 3] == "zero-refcount"
    assert got[START + 34] == "other"
    assert np.all([got[p] == want[p] for p in want if p not in (START + 2, START + 3, START + 34)])


def test_a_memory_map_page_the_image_lacks_leaves_its_pages_uncaptured() -> None:
    """128 pages, whose struct pages fill two pages of memory map; the second was not
    captured. Its 64 pages are uncaptured, the first 64 classified as ever."""
    from collector.memory import Fate

    m = MemoryMap("6.12", START, 128)
    m.in_use(START, flags=m.bit("PG_reserved"))
    m.buddy(START + 64, 3)
    m.slab(START + 8, "cache-a", order=3)
    m.sk.drop(m.page(START + 64), Fate.UNREADABLE)
    walker, got, _ = walk(m)
    assert got[START] == "reserved"
    assert [got[START + i] for i in range(8, 16)] == ["slab"] * 8
    assert {got[START + i] for i in range(64, 128)} == {"uncaptured"}
    counts = count_pages(walker)
    assert int(sum(counts.by_zone.values())[CLASSES.index("uncaptured")]) == 64
