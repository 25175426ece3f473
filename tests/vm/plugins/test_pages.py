"""The page classifier on real captures, against the guest's own account of its pages.

The oracles are read in the guest right before and right after the capture
(tests/vm/snapshot.py): /proc/kpageflags (the kernel's flags for every PFN), /proc/meminfo,
/proc/buddyinfo, /proc/zoneinfo and /proc/slabinfo, plus /proc/iomem's System RAM.

A capture is not an instant: collect reads RAM for tens of seconds while the guest runs, and
collect itself allocates. Its own memory is accounted for from what the guest showed: its
resident anonymous memory (RssAnon of /proc/PID/status, sampled while it ran) and the page
cache and slab that grew between the two snapshots are taken out of the free memory the
guest had before. Per-PFN comparisons use only pages whose kpageflags bit was the same
before and after.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest

from collector.errors import CollectorError
from collector.helpers.sched import for_each_process
from collector.kernel.kernel import Kernel
from collector.kernel.pages import CLASSES, CODE, PageWalker, count_pages
from tests.vm.conftest import Capture, iomem_entries
from tools.vm.guest import REPO_ROOT

pytestmark = pytest.mark.vm

PAGE = 4096
#: include/uapi/linux/kernel-page-flags.h (and include/linux/kernel-page-flags.h for RESERVED).
KPF = {"SLAB": 7, "BUDDY": 10, "ANON": 12, "HEAD": 15, "TAIL": 16, "PGTABLE": 26, "RESERVED": 32}
#: Classes that cannot change while a capture runs, and the kpageflags bit of each.
STABLE = {"reserved": "RESERVED", "slab": "SLAB", "pagetable": "PGTABLE"}
TOLERANCE = 0.05
#: Page-table pages of the processes that read /proc for a snapshot (a shell, a Python).
SNAPSHOT_PAGE_TABLES = 16


_walks: dict[str, tuple[PageWalker, np.ndarray, object]] = {}


def walk(capture: Capture, kernel: Kernel) -> tuple[PageWalker, np.ndarray, object]:
    """The classifier's walker, the class of every PFN (255: not walked), and the counts."""
    key = str(capture.image)
    if key not in _walks:
        walker = PageWalker(kernel)
        end = max(n.end for n in walker.nodes)
        classes = np.full(end, 255, dtype=np.uint8)
        batches = []
        for batch in walker.batches():
            classes[batch.start : batch.start + len(batch.classes)] = batch.classes
            batches.append(batch)
        _walks[key] = (walker, classes, count_pages(walker, iter(batches)))
    return _walks[key]


def kpageflags(snapshot: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(snapshot["kpageflags"])), "<u8")


def meminfo(snapshot: dict) -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out = {}
    for line in snapshot["memory"]["meminfo"].splitlines():
        name, _, value = line.partition(":")
        out[name] = int(value.split()[0])
    return out


def ram_pfns(capture: Capture, end: int) -> np.ndarray:
    """Which PFNs below ``end`` lie wholly in /proc/iomem's System RAM."""
    ram = np.zeros(end, dtype=bool)
    for start, stop in iomem_entries(capture.iomem, "System RAM"):
        ram[-(-start // PAGE) : min(stop // PAGE, end)] = True
    return ram


def zoneinfo(snapshot: dict) -> dict[str, dict[str, int]]:
    """spanned, present and start_pfn of every zone of node 0 in /proc/zoneinfo."""
    zones: dict[str, dict[str, int]] = {}
    current = None
    for line in snapshot["memory"]["zoneinfo"].splitlines():
        found = re.match(r"Node (\d+), zone\s+(\S+)", line)
        if found:
            current = zones.setdefault(found.group(2), {})
            continue
        words = line.split()
        if current is not None and len(words) == 2 and words[0] in ("spanned", "present"):
            current[words[0]] = int(words[1])
        if current is not None and words[:1] == ["start_pfn:"]:
            current["start_pfn"] = int(words[1])
    return zones


#: x86_64 page-table entries: present, a large page (PS) at the PUD and PMD levels, the frame.
PTE_PRESENT, PTE_PSE, PTE_FRAME = 1, 1 << 7, 0x000FFFFFFFFFF000


#: More page-table pages than a test guest has: a walk past this is a loop.
MAX_TABLES = 1 << 20


def table_pages(kernel: Kernel, top: int, kernel_half: bool = False) -> set[int]:
    """PFNs of the page-table pages under the top table at physical ``top``: its user half
    (a process's own), or its kernel half (the kernel's, shared by every process)."""
    levels = 5 if kernel.paging_mode == "5-level" else 4
    found = {top // PAGE}
    todo = [(top, levels, slice(256, 512) if kernel_half else slice(0, 256))]
    while todo and len(found) < MAX_TABLES:
        table, level, entries = todo.pop()
        data = np.frombuffer(kernel.read_phys(table, PAGE), "<u8")[entries]
        for entry in data[(data & PTE_PRESENT) != 0].tolist():
            if level == 1 or (level in (2, 3) and entry & PTE_PSE):
                continue
            child = entry & PTE_FRAME
            if child // PAGE in found:
                continue
            found.add(child // PAGE)
            if level > 2:
                todo.append((child, level - 1, slice(0, 512)))
    return found


def process_tables(kernel: Kernel) -> dict[int, set[int]]:
    """Per process in the image, by PID, the page-table pages reachable from the user half of
    its top table. A process that exited while its task or tables were being read leaves a
    torn record (an mm freed and reused): its tables cannot be found, so they stay unknown,
    which can only make the comparisons below stricter, never looser."""
    tables: dict[int, set[int]] = {}
    for task in for_each_process(kernel):
        if task.mm.is_null():
            continue
        try:
            tables[task.pid.value()] = table_pages(
                kernel, kernel.translate(task.mm.pgd.value()).paddr
            )
        except CollectorError as error:
            print(f"pid {task.pid.value()}: page tables not walkable ({error})")
    return tables


def capture_tables(capture: Capture, tables: dict[int, set[int]]) -> set[int]:
    """Of ``tables``, those of the processes that lived only during the capture (collect
    itself, and the process that sampled its memory): the capture's own page tables."""
    steady = {
        int(pid)
        for pid, p in capture.before["processes"].items()
        if capture.after["processes"].get(pid, {}).get("starttime") == p["starttime"]
    }
    return {pfn for pid, pfns in tables.items() if pid not in steady for pfn in pfns}


def class_pages(counts: object, *names: str) -> int:
    total = sum(counts.by_zone.values())  # type: ignore[attr-defined]
    return int(sum(total[CODE[n]] for n in names))


def analyze(capture: Capture, *args: str) -> subprocess.CompletedProcess[str]:
    """``collect analyze IMAGE ARGS...`` on the host; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "collector", "analyze", str(capture.image), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result


def within(value: float, low: float, high: float) -> bool:
    return low * (1 - TOLERANCE) <= value <= high * (1 + TOLERANCE)


# -- the memory map --------------------------------------------------------------------------------


def test_every_page_of_system_ram_is_counted_once_per_zone(
    capture: Capture, kernel: Kernel
) -> None:
    check_system_ram(capture, kernel)


def test_stable_classes_agree_with_kpageflags(capture: Capture, kernel: Kernel) -> None:
    check_stable_classes(capture, kernel)


def test_five_level_paging(la57_capture: Capture, la57_kernel: Kernel) -> None:
    """The same on Debian 6.12 with 5-level paging (its vmemmap and page tables differ)."""
    check_system_ram(la57_capture, la57_kernel)
    check_stable_classes(la57_capture, la57_kernel)


def check_system_ram(capture: Capture, kernel: Kernel) -> None:
    walker, classes, counts = walk(capture, kernel)
    ram = ram_pfns(capture, len(classes))
    # Every System RAM page has a class; pages outside it that have a struct page are holes.
    assert not (classes[ram] == 255).any()
    assert not (classes[ram] == CODE["hole"]).any()
    walked = classes != 255
    assert set(np.unique(classes[walked & ~ram]).tolist()) <= {CODE["hole"]}
    assert counts.pages - class_pages(counts, "hole") == int(ram.sum())
    # Per zone: what /proc/zoneinfo calls present, and where the zone starts and ends.
    oracle = zoneinfo(capture.before)
    for node in walker.nodes:
        for zone in node.zones:
            want = oracle[zone.name]
            assert zone.end - zone.start == want["spanned"], zone.name
            if want["spanned"]:
                assert zone.start == want["start_pfn"], zone.name
            got = counts.by_zone.get((node.nid, zone.index))
            present = 0 if got is None else int(got.sum() - got[CODE["hole"]])
            assert present == want["present"], zone.name


def check_stable_classes(capture: Capture, kernel: Kernel) -> None:
    """Reserved, slab and page-table pages against KPF_RESERVED, KPF_SLAB and KPF_PGTABLE,
    over System RAM pages whose bit did not change during the capture and that were in use
    throughout."""
    _, classes, _ = walk(capture, kernel)
    before, after = kpageflags(capture.before), kpageflags(capture.after)
    n = min(len(classes), len(before), len(after))
    ram = ram_pfns(capture, n)
    agree = union = 0
    report = {}
    # A page free (KPF_BUDDY) before or after may have been the capture's own: collect's
    # page tables, its slab objects. Such pages are not steady, whatever their bit says.
    # Nor are the capture's own processes' page tables.
    free = (((before[:n] >> KPF["BUDDY"]) | (after[:n] >> KPF["BUDDY"])) & 1) == 1
    # The capture's own page tables are free at both snapshots (on a per-CPU list, where
    # kpageflags shows no flag at all): found by walking the tables of its processes. A
    # page the image shows as a table of the kernel's own (vmalloc's, which reading
    # /proc/kcore grows), typed as one, that kpageflags called no table before nor after,
    # was made and freed during the capture too.
    tables = process_tables(kernel)
    own = np.array(sorted(capture_tables(capture, tables)), dtype=np.int64)
    free[own[own < n]] = True
    pgtable = (((before[:n] | after[:n]) >> KPF["PGTABLE"]) & 1) == 1
    kernel_tables = np.array(
        sorted(table_pages(kernel, kernel.layout.top_table_paddr, kernel_half=True)),
        dtype=np.int64,
    )
    kernel_tables = kernel_tables[kernel_tables < n]
    typed = classes[kernel_tables] == CODE["pagetable"]
    transient = kernel_tables[typed & ~pgtable[kernel_tables]]
    free[transient] = True
    # A page the image types as a page table that no process in the image reaches, nor the
    # kernel, and that kpageflags never called one: a table of a process that lived only
    # while the capture ran (the guest's command loop forks a usleep every 50 ms), its
    # tables read before it exited and its task after. Such orphans are fewer than the tables
    # the live processes reach; a classifier that typed pages as tables at random would
    # make far more.
    user_tables = set().union(*tables.values())
    reachable = np.array(sorted(user_tables | set(kernel_tables.tolist())), dtype=np.int64)
    typed_tables = np.nonzero(classes[:n] == CODE["pagetable"])[0]
    orphans = typed_tables[~np.isin(typed_tables, reachable) & ~pgtable[typed_tables]]
    assert len(orphans) <= len(user_tables), (len(orphans), len(user_tables))
    free[orphans] = True
    print(
        f"{len(own)} page-table pages of the capture's own processes; {len(transient)} of the"
        f" kernel's {len(kernel_tables)} made during the capture; {len(orphans)} reached by no"
        f" process in the image (of {len(user_tables)} that are)"
    )
    for cls, bit in STABLE.items():
        b = (before[:n] >> KPF[bit]) & 1
        a = (after[:n] >> KPF[bit]) & 1
        steady = ram & (a == b) & ~free
        theirs = steady & (b == 1)
        ours = steady & (classes[:n] == CODE[cls])
        both, either = int((theirs & ours).sum()), int((theirs | ours).sum())
        report[cls] = (both, either)
        only_ours = np.nonzero(ours & ~theirs)[0]
        only_theirs = np.nonzero(theirs & ~ours)[0]
        print(
            f"{cls}: only here {[hex(p) for p in only_ours[:8]]} ({len(only_ours)}),"
            f" only in kpageflags {[(hex(p), CLASSES[classes[p]]) for p in only_theirs[:8]]}"
            f" ({len(only_theirs)})"
        )
        agree += both
        union += either
    print("kpageflags agreement (pages in both / in either):", report)
    assert report["reserved"][1] > 1000 and report["slab"][1] > 1000
    assert agree / union >= 0.99, report
    for cls in ("reserved", "slab"):
        both, either = report[cls]
        assert both / either >= 0.99, (cls, report)
    # Page tables are few (tens of pages), and reading kpageflags moves some: the page
    # tables of the shell and Python that take the snapshot before are freed when they
    # exit, and those that take it after get the same pages back (the per-CPU free lists
    # hand out the last page freed first), so kpageflags shows a page table there both
    # times while the pages were free, or someone else's, when the capture read them. One
    # such pair of processes has about a dozen page-table pages: the rest must agree.
    both, either = report["pagetable"]
    assert either - both <= SNAPSHOT_PAGE_TABLES, report


def test_compound_and_anonymous_pages_agree_with_kpageflags(
    capture: Capture, kernel: Kernel
) -> None:
    """Pages kpageflags calls anonymous (and not slab: KPF_ANON is mapping's low bit, which a
    slab's own field there can set) before and after are anonymous here; compound tails of a
    stable head are tails of the same class."""
    _, classes, _ = walk(capture, kernel)
    before, after = kpageflags(capture.before), kpageflags(capture.after)
    n = min(len(classes), len(before))
    ram = ram_pfns(capture, n)

    def steady(bit: str) -> np.ndarray:
        return ram & ((before[:n] >> KPF[bit]) & 1 == 1) & ((after[:n] >> KPF[bit]) & 1 == 1)

    anon = steady("ANON") & ~steady("SLAB") & ~((before[:n] >> KPF["SLAB"]) & 1 == 1)
    ours = np.isin(classes[:n][anon], [CODE["anon"], CODE["swapcache"]])
    print(f"kpageflags ANON: {int(ours.sum())} of {int(anon.sum())} anonymous here")
    assert anon.sum() > 500
    assert ours.mean() >= 0.99
    slab_tails = steady("TAIL") & steady("SLAB")
    assert (classes[:n][slab_tails] == CODE["slab"]).mean() >= 0.99


# -- against /proc/meminfo, /proc/slabinfo, /proc/buddyinfo ----------------------------------------


def test_free_memory_agrees_with_the_kernel_and_meminfo(capture: Capture, kernel: Kernel) -> None:
    walker, _, counts = walk(capture, kernel)
    buddy = class_pages(counts, "buddy", "buddy-tail")
    free = buddy + class_pages(counts, "pcp")
    # The kernel's own count as of the capture: zone->vm_stat[NR_FREE_PAGES], which MemFree
    # sums (it leaves the per-CPU lists out).
    item = kernel.btf.enum_value("zone_stat_item", "NR_FREE_PAGES")
    counter = sum(
        kernel.object("struct zone", z.address).vm_stat[item].counter.value()
        for node in walker.nodes
        for z in node.zones
    )
    # The guest's view: MemFree before, less what the capture itself took (collect's
    # resident anonymous memory at its largest, and the page cache and slab that grew, mostly
    # collect's own files), is the least it can have been; MemFree after (collect gone), the
    # most.
    b, a = meminfo(capture.before), meminfo(capture.after)
    taken = capture.collect_rss_anon // 1024 + max(0, a["Cached"] - b["Cached"])
    taken += max(0, a["Slab"] - b["Slab"])
    low, high = (b["MemFree"] - taken) * 1024 // PAGE, a["MemFree"] * 1024 // PAGE
    print(
        f"free pages: buddy {buddy}, with per-CPU lists {free}; NR_FREE_PAGES {counter};"
        f" MemFree before {b['MemFree']} KiB, after {a['MemFree']} KiB, collect took"
        f" {taken} KiB: expected between {low} and {high} pages"
    )
    assert abs(buddy - counter) <= TOLERANCE * counter
    assert within(free, low, high)
    # Per-CPU lists: found pages against their own pcp->count.
    for walked, counted in walker.pcp_counted.values():
        assert walked <= counted * 2 + 64


def slabinfo_pages(snapshot: dict) -> dict[str, int]:
    """Pages per cache in /proc/slabinfo: num_slabs x pagesperslab."""
    out = {}
    for line in snapshot["memory"]["slabinfo"].splitlines()[2:]:
        words = line.split()
        out[words[0]] = int(words[14]) * int(words[5])
    return out


def test_slab_agrees_with_slabinfo_and_meminfo(capture: Capture, kernel: Kernel) -> None:
    _, _, counts = walk(capture, kernel)
    slab = class_pages(counts, "slab")
    before, after = slabinfo_pages(capture.before), slabinfo_pages(capture.after)
    low, high = sorted((sum(before.values()), sum(after.values())))
    print(f"slab pages {slab}; /proc/slabinfo before {low}, after {high}")
    assert within(slab, low, high)
    # Slab in /proc/meminfo also counts kmalloc's large allocations (NR_SLAB_UNRECLAIMABLE_B),
    # which these kernels leave unmarked: compound pages of no other class.
    large = class_pages(counts, "large-kmalloc", "compound-head", "compound-tail")
    kib = sorted((meminfo(capture.before)["Slab"], meminfo(capture.after)["Slab"]))
    print(f"slab + large kmalloc {slab + large} pages; Slab {kib} KiB")
    assert within((slab + large) * PAGE // 1024, *kib)


def test_slab_caches_read_like_slabinfo(capture: Capture) -> None:
    result = analyze(capture, "pages", "--by", "slab-cache", "--format", "json")
    ours = {r["cache"]: r["pages"] for r in json.loads(result.stdout)}
    before, after = slabinfo_pages(capture.before), slabinfo_pages(capture.after)
    steady = {name: n for name, n in before.items() if n and after.get(name) == n}
    same = [name for name, n in steady.items() if ours.get(name) == n]
    print(f"{len(same)} of {len(steady)} caches unchanged in slabinfo have its page count")
    assert len(steady) > 30
    assert len(same) >= 0.9 * len(steady)


def buddyinfo(snapshot: dict) -> dict[str, list[int]]:
    out = {}
    for line in snapshot["memory"]["buddyinfo"].splitlines():
        words = line.split()
        out[words[3]] = [int(w) for w in words[4:]]
    return out


def test_buddyinfo_agrees_with_proc_buddyinfo(capture: Capture) -> None:
    result = analyze(capture, "buddyinfo", "--format", "json")
    records = json.loads(result.stdout)
    before, after = buddyinfo(capture.before), buddyinfo(capture.after)
    assert {r["zone"] for r in records} >= set(before)
    # collect allocates from one zone (DMA32 here) while the zone and the memory map are read
    # moments apart: an order there can go from 3 blocks to 74 and back between the two
    # snapshots, so the guest's counts are no oracle for that zone. A zone whose every order
    # was the same before and after (ZONE_DMA, which no allocation of the capture reaches)
    # is held to them, order by order; in the others the two counts from the image must
    # add up to the same free pages (below).
    steady = [z for z in before if before[z] == after[z]]
    pages: dict[str, list[int]] = {}
    for r in records:
        if r["zone"] not in before:
            continue
        assert r["difference"] == r["heads"] - r["nr_free"]
        total = pages.setdefault(r["zone"], [0, 0])
        total[0] += r["nr_free"] << r["order"]
        total[1] += r["heads"] << r["order"]
        if r["zone"] in steady:
            was = before[r["zone"]][r["order"]]
            assert r["agrees"], r
            for value in (r["nr_free"], r["heads"]):
                assert abs(value - was) <= max(2, TOLERANCE * was), r
    print(f"zones untouched by the capture, every order as /proc/buddyinfo: {steady}")
    assert "DMA" in steady
    # Per zone, the free pages the two counts add up to differ by no more than the smear.
    for zone, (by_nr_free, by_heads) in pages.items():
        print(f"{zone}: free pages by nr_free {by_nr_free}, by buddy heads {by_heads}")
        assert abs(by_heads - by_nr_free) <= TOLERANCE * by_nr_free, zone


# -- without BTF -----------------------------------------------------------------------------------


class WithoutBTF:
    """The capture of a kernel without BTF: no BTF blob, and no __start_BTF in kallsyms
    (with it, the kernel's own .BTF section would be read from memory instead)."""

    def __init__(self, memory: object) -> None:
        self._memory = memory
        self.page_size = memory.page_size  # type: ignore[attr-defined]
        self.metadata = memory.metadata  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._memory, name)

    def blob(self, name: str) -> bytes | None:
        if name == "btf":
            return None
        data = self._memory.blob(name)  # type: ignore[attr-defined]
        if name == "kallsyms" and data:
            data = b"".join(
                line for line in data.splitlines(keepends=True) if b" __start_BTF" not in line
            )
        return data


def test_without_btf_vmcoreinfo_classifies_all_but_what_needs_btf(
    capture: Capture, kernel: Kernel
) -> None:
    """VMCOREINFO's offsets, PG_* numbers and MAPCOUNT values classify every page the same
    as BTF does, but for the classes the walker says need BTF, which fall back as stated."""
    _, with_btf, _ = walk(capture, kernel)
    walker = PageWalker(Kernel(WithoutBTF(kernel.memory)))
    assert walker.format.source == "VMCOREINFO"
    assert set(walker.format.unavailable) == {
        "reserved",
        "pagetable",
        "file-dirty",
        "file-writeback",
        "pcp",
    }
    fallback = {
        "reserved": "other",
        "pagetable": "other",
        "file-dirty": "file",
        "pcp": "zero-refcount",
    }
    fallback["file-writeback"] = "file"
    differ = Counter()
    for batch in walker.batches():
        ours = batch.classes
        theirs = with_btf[batch.start : batch.start + len(ours)]
        for a, b in zip(theirs.tolist(), ours.tolist(), strict=True):
            if a != b:
                differ[(CLASSES[a], CLASSES[b])] += 1
    print(f"classes that differ without BTF: {dict(differ)}")
    assert set(differ) <= set(fallback.items())


# -- per-PFN records --------------------------------------------------------------------------------


def test_per_pfn_records_of_the_kernel_image(capture: Capture) -> None:
    (code, _), *_ = iomem_entries(capture.iomem, "Kernel code")
    pfn = code // PAGE
    result = analyze(capture, "pages", "--pfn", f"{pfn:#x}-{pfn + 4:#x}", "--format", "jsonl")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["pfn"] for r in records] == list(range(pfn, pfn + 4))
    flags = kpageflags(capture.before)
    for r in records:
        assert r["class"] == "reserved"
        assert "reserved" in r["flag_names"].split("|")
        assert flags[r["pfn"]] >> KPF["RESERVED"] & 1
        assert r["zone"] == "DMA32" and r["node"] == 0
        assert CLASSES[CODE[r["class"]]] == r["class"]
