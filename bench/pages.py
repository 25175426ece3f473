"""Benchmark: classify every struct page of a native image, against construct's per-object parse.

Builds a native image of a 6.12-layout kernel whose node spans ``--gib`` GiB of RAM (the RAM
itself is named in the image's ranges but not stored: only the memory map, page tables and
kernel structures are), with a realistic mix of pages: free blocks of every order, anonymous
and file pages, reserved, slabs (order 0 and order 3), page tables, hugetlb. Then, in one
run: the whole ``pages`` pipeline end to end (open the image, set up the kernel, read and
translate the vmemmap, decompress, classify, count), and construct's parse of the same
struct pages one object at a time. Prints both rates and the ratio. Not a pass/fail test.

Usage: ``python bench/pages.py [--gib 16]``.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import tracemalloc

import construct
import numpy as np

from collector.image.open import open_image
from collector.image.writer import ImageWriter
from collector.kernel.constructs import parse_struct
from collector.kernel.kernel import Kernel
from collector.kernel.pages import CLASSES, PageWalker, count_pages
from collector.testing.pages import MemoryMap

PAGE = 4096
CHUNK = 4 << 20
TILE = 4096  # pages in the pattern repeated over the node
START = 0x100000  # the node starts at 4 GiB
BASELINE_PAGES = 100_000


def tile_pattern(seed: int = 1) -> bytes:
    """One tile of TILE struct pages with the mix of an idle machine, in the 6.12 layout."""
    rng = random.Random(seed)
    m = MemoryMap("6.12", START, TILE, ram=False)
    pfn = START
    end = START + TILE
    while pfn < end:
        roll = rng.random()
        if roll < 0.45 and pfn % 1024 == 0 and pfn + 1024 <= end:
            m.buddy(pfn, 10)
            pfn += 1024
        elif roll < 0.55 and pfn % 8 == 0 and pfn + 8 <= end:
            order = rng.choice((0, 1, 2, 3))
            m.buddy(pfn, order)
            pfn += 1 << order
        elif roll < 0.75:
            m.in_use(pfn, flags=m.bit("PG_lru") | m.bit("PG_swapbacked"), mapping=0xFFFF8880AA0 | 1)
            pfn += 1
        elif roll < 0.83:
            m.in_use(pfn, flags=m.bit("PG_lru") | m.bit("PG_uptodate"), mapping=0xFFFF8880BB00)
            pfn += 1
        elif roll < 0.90:
            m.in_use(pfn, flags=m.bit("PG_reserved"))
            pfn += 1
        elif roll < 0.93 and pfn % 8 == 0 and pfn + 8 <= end:
            m.slab(pfn, "kmalloc-8k", order=3)
            pfn += 8
        elif roll < 0.96:
            m.slab(pfn, "dentry")
            pfn += 1
        elif roll < 0.97 and pfn % 4 == 0 and pfn + 4 <= end:
            m.hugetlb(pfn, 2)
            pfn += 4
        elif roll < 0.98:
            m.typed(pfn, "table")
            pfn += 1
        else:
            m.in_use(pfn)
            pfn += 1
    return m.array(START, TILE)


def build_image(path: str, gib: int) -> int:
    """Write the benchmark image; the number of struct pages it holds."""
    count = gib << 18
    template = np.frombuffer(tile_pattern(), dtype=np.uint8)
    m = MemoryMap("6.12", START, count, ram=False)
    size = m.size
    at = m.sk.offsetof("struct page", "compound_head")
    tile = template.reshape(TILE, size).copy()
    heads = tile[:, at : at + 8].copy().view("<u8").reshape(TILE)
    is_tail = (heads & 1) == 1
    base = m.vmemmap(START)
    # Pages in use get the entropy of a real memory map: LRU links to other struct pages and
    # a page offset, different in every copy of the tile. The memory map then compresses
    # about 12:1 at zstd level 1; an idle 384 MiB guest's compressed 18:1.
    lru = m.sk.offsetof("struct page", "lru")
    index = m.sk.offsetof("struct page", "index")
    refcount = m.sk.offsetof("struct page", "_refcount")
    page_type = m.sk.offsetof("struct page", "page_type")
    slab = tile[:, page_type + 3] == 0xF5  # PGTY_slab: slab_cache lives where lru does
    used = (tile[:, refcount : refcount + 4].copy().view("<i4").reshape(TILE) > 0) & ~is_tail
    used &= ~slab
    rng = np.random.default_rng(2)
    for first in range(START, START + count, TILE):
        # Compound tails point at their head: move the pointers with the tile.
        shifted = heads.copy()
        shifted[is_tail] += np.uint64((first - START) * size)
        tile[:, at : at + 8] = shifted.view(np.uint8).reshape(TILE, 8)
        n = int(used.sum())
        links = base + rng.integers(0, count, size=(n, 2), dtype=np.uint64) * np.uint64(size)
        tile[used, lru : lru + 16] = links.view(np.uint8).reshape(n, 16)
        offsets = rng.integers(0, 1 << 24, size=n, dtype=np.uint64)
        tile[used, index : index + 8] = offsets.view(np.uint8).reshape(n, 8)
        m.write_array(first, tile.tobytes())
    assert base == m.vmemmap(START)
    memory = m.sk.memory()
    ram = [[START * PAGE, (START + count) * PAGE]]
    stored = _runs(memory)
    with open(path, "wb") as out:
        writer = ImageWriter(
            out,
            page_size=PAGE,
            chunk_size=CHUNK,
            metadata={"profile": "x86_64", "ranges": sorted(ram + [list(r) for r in stored])},
            threads=2,
        )
        for name in ("vmcoreinfo", "kallsyms", "btf"):
            writer.add_blob(name, memory.blob(name))
        for lo, hi in stored:
            pos = lo
            while pos < hi:
                end = min(hi, (pos // CHUNK + 1) * CHUNK)
                bounds = (lo, hi) if pos == lo else (None, None)
                writer.add_chunk(pos, memory.read(pos, end - pos), [], *bounds)
                pos = end
        writer.finish({"reason": "benchmark"})
    return count


def _runs(memory) -> list[tuple[int, int]]:
    """Contiguous runs of the pages a synthetic memory holds."""
    out: list[tuple[int, int]] = []
    for start, end in memory.ranges():
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def walk(path: str) -> tuple[float, int, dict[str, int]]:
    start = time.perf_counter()
    memory = open_image(path)
    try:
        walker = PageWalker(Kernel(memory))
        counts = count_pages(walker, what={"zones"})
    finally:
        memory.close()
    elapsed = time.perf_counter() - start
    total = sum(counts.by_zone.values())
    return elapsed, counts.pages, {CLASSES[c]: int(n) for c, n in enumerate(total) if n}


def per_object(path: str, count: int) -> tuple[float, float]:
    """Seconds to parse ``count`` struct pages one at a time and make the walker's first test
    (is it a buddy page?): with the BTF struct definition (CStruct), and with construct's
    compiled parser of a Struct of the members the walker reads, at their BTF offsets."""
    memory = open_image(path)
    try:
        kernel = Kernel(memory)
        definition = kernel.struct("page")
        size = definition.sizeof()
        data = kernel.read_virt(kernel.pfn_to_page(START), count * size)
        start = time.perf_counter()
        free = 0
        for i in range(count):
            page = parse_struct(definition, data, i * size)
            free += page["page_type"] >> 24 == 0xF0
        t_cstruct = time.perf_counter() - start
        btf = kernel.btf
        members = [
            ("flags", construct.Int64ul, btf.offsetof("page", "flags")),
            ("compound_head", construct.Int64ul, btf.offsetof("page", "compound_head")),
            ("mapping", construct.Int64ul, btf.offsetof("page", "mapping")),
            ("private", construct.Int64ul, btf.offsetof("page", "private")),
            ("page_type", construct.Int32ul, btf.offsetof("page", "page_type")),
            ("refcount", construct.Int32sl, btf.offsetof("page", "_refcount")),
        ]
        parts, pos = [], 0
        for name, subcon, at in sorted(members, key=lambda m: m[2]):
            if at > pos:
                parts.append(construct.Padding(at - pos))
            parts.append(name / subcon)
            pos = at + subcon.sizeof()
        parts.append(construct.Padding(size - pos))
        compiled = construct.Struct(*parts).compile()
        start = time.perf_counter()
        again = 0
        for i in range(count):
            page = compiled.parse(data[i * size : (i + 1) * size])
            again += page.page_type >> 24 == 0xF0
        t_compiled = time.perf_counter() - start
        assert free == again
        return t_cstruct, t_compiled
    finally:
        memory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=16, help="RAM the node spans (default 16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pages.lime.zst")
        t = time.perf_counter()
        count = build_image(path, args.gib)
        print(
            f"image: {args.gib} GiB of RAM, {count:,} struct pages"
            f" ({count * 64 >> 20} MiB of memory map), {os.path.getsize(path) >> 20} MiB file,"
            f" built in {time.perf_counter() - t:.1f} s"
        )
        runs = [walk(path) for _ in range(3)]
        print("runs: " + ", ".join(f"{r[0]:.2f} s" for r in runs))
        elapsed, pages, classes = min(runs)
        print(f"classes: {classes}")
        rate = pages / elapsed
        print(
            f"pages end to end (open, translate, decompress, classify, count):"
            f" {elapsed:.2f} s, {rate:,.0f} struct pages/s"
        )
        tracemalloc.start()
        walk(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"peak memory traced during the walk: {peak / 2**20:.1f} MiB")
        t_cstruct, t_compiled = per_object(path, BASELINE_PAGES)
        base = BASELINE_PAGES / t_compiled
        print(
            f"one struct page at a time: construct compiled {base:,.0f} struct pages/s,"
            f" the BTF CStruct {BASELINE_PAGES / t_cstruct:,.0f}/s"
        )
        print(f"ratio: {rate / base:.1f}x construct's compiled per-object parse")


if __name__ == "__main__":
    main()
