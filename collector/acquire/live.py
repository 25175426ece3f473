"""The running kernel's struct page array, classified while the machine runs.

The classifier is the one the ``pages`` analysis uses (:mod:`collector.kernel.pages`), over
a :class:`LiveKernel`: VMCOREINFO from /proc/kcore's note (or the note /sys/kernel/vmcoreinfo
locates), BTF from /sys/kernel/btf/vmlinux, and struct pages read through kcore's vmemmap
segments, or, where kcore is refused, through the kernel's page tables and /dev/mem. Nothing
else of RAM is read: no node_data, mem_section, symbols or per-CPU lists. The PFNs walked
are System RAM's, whose struct pages kcore maps.

``collect plan --mem-usage`` counts what each ``--skip`` class would save;
``collect --skip`` asks, before reading each chunk, which of its pages to leave out.
numpy is imported with this module, never by a plain capture.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from collector.acquire.sources import Kcore, pread_exact
from collector.errors import CollectorError, ImageError
from collector.kernel import pages as kpages
from collector.kernel.kernel import Kernel
from collector.kernel.symbols import SymbolTable
from collector.kernel.vmcoreinfo import VmcoreInfo
from collector.memory import Fate, PageFate, PageNotCaptured

PAGE = 4096
#: What ``--skip`` accepts, and the fate a skipped page gets.
SKIP_FATES = {"free": Fate.SKIPPED_FREE, "cache": Fate.SKIPPED_CACHE}
SKIP_CHOICES = (*SKIP_FATES, "zero")
#: The classes each ``--skip`` choice leaves out. ``cache`` is clean page cache that no
#: process maps (_mapcount -1) and that is not swap-backed (shmem, tmpfs): mapped files
#: (executables, libraries) are kept.
_FREE = tuple(kpages.CODE[c] for c in kpages.FREE_CLASSES)
_FILE = kpages.CODE["file"]
#: The fate ``--skip free`` gives each class code (0, READ, for every class it keeps).
_FREE_FATE = np.zeros(len(kpages.CLASSES), dtype=np.int16)
_FREE_FATE[list(_FREE)] = int(Fate.SKIPPED_FREE)
_NO_FATE = np.zeros(len(kpages.CLASSES), dtype=np.int16)
#: The groups ``--mem-usage`` reports, each from classifier classes.
USAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "free": kpages.FREE_CLASSES,
    # "file" pages --skip cache may leave out, split out of the rest below
    "cache clean, unmapped": (),
    "cache clean, other": ("file",),
    "cache dirty": ("file-dirty", "file-writeback"),
    "anon": ("anon", "swapcache"),
    "slab": ("slab",),
    "kernel and other": tuple(
        c
        for c in kpages.CLASSES
        if c
        not in (
            *kpages.FREE_CLASSES,
            "file",
            "file-dirty",
            "file-writeback",
            "anon",
            "swapcache",
            "slab",
            "hole",
            "uncaptured",
        )
    ),
    "not classified": ("hole", "uncaptured"),
}
#: Which ``--skip`` choice leaves each group out.
GROUP_SKIP = {"free": "free", "cache clean, unmapped": "cache"}


#: The symbols the live classifier may look up: the layout's bases and the per-CPU lists'
#: walk. Only their lines of /proc/kallsyms are parsed: all 100,000 take 0.3 s here and
#: ten seconds on a slow machine, before the first chunk is read.
LIVE_SYMBOLS = (
    "page_offset_base",
    "vmemmap_base",
    "vmalloc_base",
    "phys_base",
    "init_top_pgt",
    "_text",
    "_stext",
    "node_data",
    "contig_page_data",
    "nr_cpu_ids",
    "__per_cpu_offset",
    "__cpu_possible_mask",
    "__cpu_online_mask",
    "__cpu_present_mask",
)


def kallsyms_subset(text: bytes, names: tuple[str, ...]) -> SymbolTable:
    """The symbols ``names`` from /proc/kallsyms text (the kernel's own, not modules')."""
    alternatives = b"|".join(re.escape(n.encode()) for n in names)
    pattern = re.compile(rb"^[0-9a-fA-F]{1,16} [A-Za-z] (?:" + alternatives + rb")$", re.M)
    lines = pattern.findall(bytes(text))
    return SymbolTable.from_kallsyms_text(b"\n".join(lines))


class LiveUnavailable(CollectorError):
    """The struct page array cannot be read or is not understood; the reason is the message."""


class LiveMemory:
    """Physical memory of the running machine, through the capture plan's sources.

    Only what the classifier asks for is read (page tables, struct pages); every read is
    counted in :attr:`bytes_read`.
    """

    page_size = PAGE

    def __init__(self, plan, blobs: Mapping[str, bytes]) -> None:
        self.metadata = {"profile": "x86_64"}
        self._ranges = [(r.start, r.end) for r in plan.ram_ranges]
        self._entries = sorted(
            (e for e in plan.entries if e.source and not e.kernel_zero), key=lambda e: e.start
        )
        self._starts = [e.start for e in self._entries]
        self._plan = plan
        self._blobs = dict(blobs)
        self.bytes_read = 0

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def read(self, paddr: int, size: int) -> bytes:
        k = bisect.bisect_right(self._starts, paddr) - 1
        if k < 0 or paddr + size > self._entries[k].end:
            raise PageNotCaptured(paddr, Fate.NOT_COVERED)
        try:
            data = self._plan.source(self._entries[k].source).read(paddr, size)
        except OSError as e:
            raise PageNotCaptured(paddr, Fate.UNREADABLE, e.errno or 0) from None
        self.bytes_read += size
        return data

    def fate(self, paddr: int) -> PageFate:
        return PageFate(Fate.READ)

    def blob(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def close(self) -> None:
        pass


class LiveKernel(Kernel):
    """A :class:`Kernel` over :class:`LiveMemory` that reads the vmemmap through kcore.

    :param kcore: the open /proc/kcore, or None to walk the page tables for every read.
    """

    def __init__(
        self, memory: LiveMemory, vmcoreinfo: VmcoreInfo, btf, kcore: Kcore | None
    ) -> None:
        symbols = SymbolTable.from_vmcoreinfo(vmcoreinfo)
        kallsyms = memory.blob("kallsyms")
        if kallsyms:
            # /proc/kallsyms as root: the per-CPU lists' walk needs __per_cpu_offset and the
            # CPU masks, which VMCOREINFO does not name.
            with contextlib.suppress(CollectorError):
                symbols = kallsyms_subset(kallsyms, LIVE_SYMBOLS).merged(symbols)
        super().__init__(memory, vmcoreinfo=vmcoreinfo, symbols=symbols, btf=btf, profile="x86_64")
        self.live_memory = memory
        self._kcore = kcore
        self._segments = []
        if kcore is not None:
            # Every segment: the vmemmap (struct pages) and, for the per-CPU lists' walk, the
            # kernel image (node_data, __per_cpu_offset), the direct map (the nodes, zones and
            # per-CPU areas) and vmalloc (per-CPU areas allocated later).
            self._segments = sorted(
                (s for s in kcore.segments if s.p_filesz), key=lambda s: s.p_vaddr
            )
        self._seg_starts = [s.p_vaddr for s in self._segments]

    def _make_layout(self):
        """With kcore, the layout from its program headers alone (no page-table walk)."""
        from collector.profiles import x86_64 as prof

        kcore = self._kcore
        vi = self.vmcoreinfo
        if kcore is not None:
            size = vi.size("page") or 64
            base = prof._vmemmap_from_kcore(kcore.segments, size)
            if base is not None and kcore.page_offset_base is not None:
                top, levels, sme = prof.top_table_from_vmcoreinfo(vi)
                return prof.KernelLayout(
                    levels=levels,
                    top_table_paddr=top,
                    phys_base=vi.phys_base or 0,
                    kaslr_offset=vi.kerneloffset or 0,
                    sme_mask=sme,
                    page_offset_base=kcore.page_offset_base,
                    vmemmap_base=base,
                    sizeof_page=size,
                    sources={
                        "page_offset_base": "kcore program headers",
                        "vmemmap_base": "kcore program headers",
                    },
                )
        return super()._make_layout()

    def read_virt(self, vaddr: int, size: int) -> bytes:
        k = bisect.bisect_right(self._seg_starts, vaddr) - 1
        if k >= 0:
            seg = self._segments[k]
            if vaddr + size <= seg.p_vaddr + seg.p_filesz:
                assert self._kcore is not None
                try:
                    data = pread_exact(
                        self._kcore.fd, size, seg.p_offset + vaddr - seg.p_vaddr, "/proc/kcore"
                    )
                except OSError as e:
                    raise PageNotCaptured(vaddr, Fate.UNREADABLE, e.errno or 0) from None
                self.live_memory.bytes_read += size
                return data
        if self._kcore is not None and self._segments:
            # kcore maps the struct pages of all RAM and every other kernel mapping: what it
            # does not map is not there (or is device memory, never read).
            raise PageNotCaptured(vaddr, Fate.NOT_COVERED)
        return super().read_virt(vaddr, size)


@dataclass
class Usage:
    """What ``--mem-usage`` found: pages per group, and how long reading and classifying took."""

    pages: dict[str, int] = field(default_factory=dict)
    #: pages on the per-CPU free lists as walked, and their lists' own count (pcp->count)
    pcp_walked: int = 0
    pcp_counted: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)


class LivePages:
    """The running kernel's struct pages, classified on request."""

    def __init__(self, walker: kpages.PageWalker, memory: LiveMemory) -> None:
        self.walker = walker
        self.memory = memory
        #: time spent reading and classifying struct pages for skip decisions
        self.seconds = 0.0
        # Reader threads ask in turn: the walker's caches are not shared safely, and the
        # struct pages of a 4 MiB chunk are 64 KiB, read in well under a millisecond.
        self._lock = threading.Lock()

    def classify(
        self, start_pfn: int, end_pfn: int, free_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Class codes of PFNs ``[start_pfn, end_pfn)`` (``hole`` where no RAM), and which of
        them are clean page cache ``--skip cache`` may leave out (None with ``free_only``,
        which stops once the free classes are decided: see :func:`kpages.classify`)."""
        classes = np.full(end_pfn - start_pfn, kpages.CODE["hole"], dtype=np.uint8)
        cache = None if free_only else np.zeros(end_pfn - start_pfn, dtype=bool)
        for nid, lo, hi in self.walker.spans(start_pfn, end_pfn):
            batch = self.walker.classify_range(nid, lo, hi, free_only=free_only)
            classes[lo - start_pfn : hi - start_pfn] = batch.classes
            if cache is not None:
                cache[lo - start_pfn : hi - start_pfn] = self._skippable_cache(batch, hi - lo)
        return classes, cache

    def _skippable_cache(self, batch: kpages.Batch, n: int) -> np.ndarray:
        """Clean file pages no process maps (``_mapcount`` -1) and not swap-backed: shmem
        and tmpfs pages have no copy on disk, so they are never left out."""
        pages = batch.pages[:n]
        ok = (batch.classes[:n] == _FILE) & (
            pages["page_type"].astype(np.uint32) == np.uint32(0xFFFFFFFF)
        )
        swapbacked = self.walker.format.flag("PG_swapbacked")
        if swapbacked:
            ok &= (pages["flags"].astype(np.uint64) & np.uint64(swapbacked)) == 0
        return ok

    def skip_runs(self, start: int, end: int, skip: frozenset[str]) -> list[tuple[int, int, Fate]]:
        """Physical ``(start, end, fate)`` runs of whole pages in ``[start, end)`` to leave
        unread, as ``skip`` asks (``free``, ``cache``)."""
        first, last = -(-start // PAGE), end // PAGE
        runs: list[tuple[int, int, Fate]] = []
        if last <= first:
            return runs
        with self._lock:
            t0 = time.perf_counter()
            classes, cache = self.classify(first, last, free_only="cache" not in skip)
            self.seconds += time.perf_counter() - t0
        fate = (_FREE_FATE if "free" in skip else _NO_FATE)[classes]
        if cache is not None:
            fate[cache] = int(Fate.SKIPPED_CACHE)
        edges = np.flatnonzero(fate[1:] != fate[:-1]) + 1
        bounds = [0, *edges.tolist(), len(fate)]
        for a, b in itertools.pairwise(bounds):
            if fate[a]:
                runs.append(((first + a) * PAGE, (first + b) * PAGE, Fate(int(fate[a]))))
        return runs

    def usage(self) -> Usage:
        """Pages per group over all System RAM (``--mem-usage``)."""
        t0 = time.perf_counter()
        counts = np.zeros(len(kpages.CLASSES), dtype=np.int64)
        skippable = 0
        for nid, lo, hi in self.walker.spans():
            batch = self.walker.classify_range(nid, lo, hi)
            counts += np.bincount(batch.classes, minlength=len(kpages.CLASSES))
            skippable += int(np.count_nonzero(self._skippable_cache(batch, hi - lo)))
        out = Usage(notes=list(self.walker.notes))
        for walked, counted in self.walker.pcp_counted.values():
            out.pcp_walked += walked
            out.pcp_counted += counted or 0
        for group, classes in USAGE_GROUPS.items():
            out.pages[group] = int(sum(counts[kpages.CODE[c]] for c in classes))
        out.pages["cache clean, unmapped"] = skippable
        out.pages["cache clean, other"] -= skippable
        out.seconds = time.perf_counter() - t0
        out.bytes_read = self.memory.bytes_read
        return out


def open_live_pages(plan, blobs: Mapping[str, bytes]) -> LivePages:
    """The struct page array of the machine ``plan`` reads, ready to classify.

    :param blobs: ``vmcoreinfo`` and ``btf`` as the capture gathers them.
    :raises LiveUnavailable: one line saying what is missing or not understood.
    """
    from collector.kernel.btf import BTF

    text = blobs.get("vmcoreinfo")
    if not text:
        raise LiveUnavailable("no VMCOREINFO (neither /proc/kcore's note nor the note in RAM)")
    raw_btf = blobs.get("btf")
    if not raw_btf:
        raise LiveUnavailable("no BTF (/sys/kernel/btf/vmlinux): struct page is not described")
    try:
        vi = VmcoreInfo.parse(text)
        btf = BTF.parse(raw_btf)
    except (CollectorError, ImageError) as e:
        raise LiveUnavailable(f"kernel metadata not understood: {e}") from None
    memory = LiveMemory(plan, blobs)
    kernel = LiveKernel(memory, vi, btf, plan.kcore)
    spans = []
    for r in plan.ram_ranges:
        first, last = -(-r.start // PAGE), r.end // PAGE
        if last > first:
            spans.append((first, last))
    try:
        walker = kpages.PageWalker(kernel, with_pcp=True, spans=spans, pcp_recheck=True)
        # Read one struct page now, so a vmemmap that cannot be reached fails here, once.
        walker.read(spans[0][0], 1)
    except (CollectorError, ImageError, PageNotCaptured) as e:
        raise LiveUnavailable(f"struct pages not readable: {e}") from None
    return LivePages(walker, memory)
