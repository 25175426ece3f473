"""The capture loop: walk the plan chunk by chunk, read each page once, account for all of it.

Reads are large (a whole chunk from one source at a time). When a large read fails, that
part is retried page by page so one bad page costs one page, and its errno is recorded.
Pages the tool did not read are zero in the stream and carry their fate in the DESC record.
Where every source allows concurrent ``pread`` (kcore and /dev/mem do), several reader
threads read the next chunks ahead, a bounded window of them, handed to the writer in
address order. With ``--skip zero`` the thread that read a chunk also finds its all-zero
pages (:func:`zero_runs`), recorded READ_ZERO: data, which the stream keeps.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun

#: A capture stopped inside a range pads the rest of it with zeros (recorded MISSING) when
#: the rest is at most this large; beyond it the image ends inside the range, as one cut short
#: does, so that a signal is obeyed within seconds even on a machine with terabytes of RAM.
PAD_LIMIT = 1 << 30

#: Pages are checked for zeros this many bytes at a time first (one ``memcmp`` each), page by
#: page only inside a block that is not all zeros.
ZERO_BLOCK = 64 << 10


@functools.lru_cache(maxsize=16)
def _zeros(size: int) -> bytes:
    return bytes(size)


class Reader(Protocol):
    """What the capture loop needs of a source: exactly ``size`` bytes, or OSError."""

    def read(self, paddr: int, size: int) -> bytes: ...


def concurrent_ok(sources: Mapping[str, Reader]) -> bool:
    """Whether every source serves ``pread`` from several threads at once (a source says
    so with ``concurrent_reads``; one that does not say is read by one thread)."""
    return all(getattr(s, "concurrent_reads", False) for s in sources.values())


@dataclass
class Progress:
    """Running totals, handed to the progress callback after every chunk."""

    total_bytes: int
    done_bytes: int = 0
    unreadable_pages: int = 0
    chunks: int = 0


@dataclass
class CaptureResult:
    """How the loop ended: ``stopped_by`` is None when every planned range was written."""

    progress: Progress
    stopped_by: str | None = None
    errors: list[str] = field(default_factory=list)
    #: ``(start, end)`` of the rest of a range a stopped capture left unpadded (see PAD_LIMIT).
    unpadded: tuple[int, int] | None = None


def iter_chunks(start: int, end: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, end)`` at multiples of ``chunk_size`` (chunks align to physical addresses).

    A generator: a range is never turned into a list, whatever size a host claims for it.
    """
    pos = start
    while pos < end:
        stop = min(end, (pos // chunk_size + 1) * chunk_size)
        yield pos, stop
        pos = stop


class _Fates:
    """Fates of one chunk's pages, kept as page intervals and folded into runs at the end.

    Intervals, not pages: a chunk whose pages are skipped or unreadable in long stretches
    costs a few list entries, not a dictionary entry per page.
    """

    def __init__(self, paddr: int, page_size: int) -> None:
        self.first_page = paddr // page_size
        self.page_size = page_size
        #: ``(first, end, fate, errno)`` page indexes within the chunk, in marking order
        self.marks: list[tuple[int, int, Fate, int]] = []

    def mark(self, start: int, end: int, fate: Fate, errno: int = 0) -> None:
        first = start // self.page_size - self.first_page
        last = (end - 1) // self.page_size + 1 - self.first_page
        self.marks.append((first, last, fate, errno))

    def runs(self) -> list[FateRun]:
        # A page shared by two plan entries is only as good as its worst part: the first
        # mark of a page wins, so a later mark only fills what earlier ones left. Marks come
        # nearly in address order and seldom overlap (at a page two entries share), so each
        # finds its neighbours by binary search.
        starts: list[int] = []
        taken: list[tuple[int, int, Fate, int]] = []
        for first, last, fate, errno in self.marks:
            k = bisect.bisect_right(starts, first) - 1
            k = max(k, 0)
            pos = first
            pieces = []
            while pos < last:
                while k < len(taken) and taken[k][1] <= pos:
                    k += 1
                if k < len(taken) and taken[k][0] <= pos:
                    pos = taken[k][1]
                    continue
                stop = min(last, taken[k][0]) if k < len(taken) else last
                pieces.append((pos, stop))
                pos = stop
            for lo, hi in pieces:
                at = bisect.bisect_left(starts, lo)
                starts.insert(at, lo)
                taken.insert(at, (lo, hi, fate, errno))
        runs: list[FateRun] = []
        for first, last, fate, errno in taken:
            prev = runs[-1] if runs else None
            if (
                prev
                and prev.start + prev.count == first
                and (prev.fate, prev.errno)
                == (
                    fate,
                    errno,
                )
            ):
                runs[-1] = FateRun(prev.start, prev.count + last - first, fate, errno)
            else:
                runs.append(FateRun(first, last - first, fate, errno))
        return runs


#: Fates of whole pages that no read touched (skipped pages, cut out of the entries before
#: the chunk is read): the buffer holds zeros there already.
_NEVER_WRITTEN = frozenset({Fate.SKIPPED_FREE, Fate.SKIPPED_CACHE})


def read_chunk(
    paddr: int,
    end: int,
    entries: list,
    sources: Mapping[str, Reader],
    page_size: int,
) -> tuple[bytes | bytearray, list[FateRun]]:
    """Read ``[paddr, end)`` following the plan entries that cover it.

    :param entries: plan entries (``start``, ``end``, ``source``, ``fate``, ``kernel_zero``)
        overlapping the chunk, in address order.
    :returns: the chunk's bytes (zero wherever a page was not read) and its fate runs.
    """
    large_failed = False
    if len(entries) == 1:
        only = entries[0]
        if only.source and not only.kernel_zero and only.start <= paddr and end <= only.end:
            # The common case: one source for the whole chunk, read without a copy.
            try:
                return sources[only.source].read(paddr, end - paddr), []
            except OSError:
                large_failed = True
    fates = _Fates(paddr, page_size)
    if all(e.source is None for e in entries):
        # Nothing of the chunk is read (all skipped or excluded): zeros straight from calloc,
        # without building and copying a buffer.
        covered = paddr
        for e in entries:
            start, stop = max(paddr, e.start), min(end, e.end)
            if start < stop:
                if start > covered:
                    fates.mark(covered, start, Fate.NOT_COVERED)
                fates.mark(start, stop, e.fate)
                covered = stop
        if covered < end:
            fates.mark(covered, end, Fate.NOT_COVERED)
        return bytes(end - paddr), fates.runs()
    buf = bytearray(end - paddr)
    covered = paddr
    for entry in entries:
        start, stop = max(paddr, entry.start), min(end, entry.end)
        if start >= stop:
            continue
        if start > covered:
            fates.mark(covered, start, Fate.NOT_COVERED)
        covered = stop
        if entry.source is None:
            fates.mark(start, stop, entry.fate)
            continue
        source = sources[entry.source]
        try:
            if large_failed:
                raise OSError("the large read of this chunk already failed")
            buf[start - paddr : stop - paddr] = source.read(start, stop - start)
            pieces = [(start, stop)]
        except OSError:
            pieces = _read_pages(source, start, stop, buf, paddr, fates, page_size)
        if entry.kernel_zero:
            for p_start, p_stop in pieces:
                _mark_kernel_zero(buf, paddr, p_start, p_stop, fates, page_size)
    if covered < end:
        fates.mark(covered, end, Fate.NOT_COVERED)
    runs = fates.runs()
    for run in runs:  # never let bytes of a page we do not vouch for into the stream
        if run.fate in _NEVER_WRITTEN:
            continue
        lo = max(paddr, (fates.first_page + run.start) * page_size)
        hi = min(end, (fates.first_page + run.start + run.count) * page_size)
        buf[lo - paddr : hi - paddr] = bytes(hi - lo)
    # The buffer itself, not a copy: the writer only reads it (copying 4 MiB a chunk, and
    # faulting in the copy's pages, was a third of a --skip capture's reading time under
    # emulation).
    return buf, runs


def zero_runs(
    data: bytes | bytearray, paddr: int, page_size: int, start: int = 0, end: int | None = None
) -> list[tuple[int, int]]:
    """The pages of a chunk whose bytes in ``data[start:end]`` are all zero, as
    ``(first, end)`` page indexes within the chunk (page 0 holds ``paddr``), in order and
    merged.

    ``bytes.startswith`` against a block of zeros is a ``memcmp`` without a copy that stops
    at the first non-zero byte, so a page of data costs a few bytes compared; blocks of
    :data:`ZERO_BLOCK` bytes are tried first so that zero stretches cost one call per block.
    A partial page (a range that starts or ends inside a page, or ``start`` or ``end`` inside
    one) is judged on the bytes the chunk has of it.
    """
    end = len(data) if end is None else end
    starts = data.startswith
    lead = paddr % page_size

    def index(offset: int) -> int:  # the page holding byte ``offset`` of the chunk
        return (lead + offset) // page_size

    found: list[tuple[int, int]] = []
    pos = start
    head = min(end, (index(pos) + 1) * page_size - lead) if (lead + pos) % page_size else pos
    if head > pos:  # a partial first page
        if starts(_zeros(head - pos), pos, head):
            found.append((index(pos), index(pos) + 1))
        pos = head
    body = pos + (end - pos) // page_size * page_size  # the end of the whole pages
    block = max(1, ZERO_BLOCK // page_size) * page_size
    block_zeros, page_zeros = _zeros(block), _zeros(page_size)
    for off in range(pos, body, block):
        stop = min(body, off + block)
        if starts(block_zeros if stop - off == block else _zeros(stop - off), off, stop):
            found.append((index(off), index(off) + (stop - off) // page_size))
            continue
        # The common case for RAM in use: one call per page, comparing a few bytes each.
        for o in [o for o in range(off, stop, page_size) if starts(page_zeros, o, o + page_size)]:
            found.append((index(o), index(o) + 1))
    if body < end and starts(_zeros(end - body), body, end):
        found.append((index(body), index(body) + 1))
    out: list[tuple[int, int]] = []
    for lo, hi in found:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def with_zero_pages(data: bytes, paddr: int, page_size: int, runs: list[FateRun]) -> list[FateRun]:
    """``runs`` (a chunk's fates, sorted) with every read page of ``data`` that is all zeros
    added as READ_ZERO. Pages with another fate keep it: their zeros are not RAM's.

    Only the read pages are looked at: in a chunk ``--skip free`` left mostly unread, the
    rest is known to be zeros already and has its fate."""
    lead = paddr % page_size
    pages = (lead + len(data) + page_size - 1) // page_size
    added: list[FateRun] = []
    pos = 0
    for first, stop in [*((r.start, r.start + r.count) for r in runs), (pages, pages)]:
        if first > pos:  # pages [pos, first) were read
            lo = max(0, pos * page_size - lead)
            hi = min(len(data), first * page_size - lead)
            for a, b in zero_runs(data, paddr, page_size, lo, hi):
                added.append(FateRun(a, b - a, Fate.READ_ZERO))
        pos = max(pos, stop)
    # Each zero run lies between two of ``runs``: none overlaps them or touches another.
    return sorted([*runs, *added], key=lambda r: r.start) if added else runs


def _read_pages(
    source: Reader,
    start: int,
    stop: int,
    buf: bytearray,
    paddr: int,
    fates: _Fates,
    page_size: int,
) -> list[tuple[int, int]]:
    """Page-by-page fallback after a large read failed; returns the pieces that were read."""
    good = []
    pos = start
    while pos < stop:
        nxt = min(stop, (pos // page_size + 1) * page_size)
        try:
            buf[pos - paddr : nxt - paddr] = source.read(pos, nxt - pos)
            good.append((pos, nxt))
        except OSError as e:
            fates.mark(pos, nxt, Fate.UNREADABLE, e.errno or 0)
        pos = nxt
    return good


def _mark_kernel_zero(
    buf: bytearray, paddr: int, start: int, stop: int, fates: _Fates, page_size: int
) -> None:
    """Zero pages from a source known to fabricate them are the kernel's, not RAM's."""
    pos = start
    while pos < stop:
        nxt = min(stop, (pos // page_size + 1) * page_size)
        if not any(buf[pos - paddr : nxt - paddr]):
            fates.mark(pos, nxt, Fate.KERNEL_ZERO)
        pos = nxt


@dataclass
class _Job:
    index: int  # chunk number within its range
    start: int  # the range's start and end
    end: int
    c_start: int
    c_end: int
    entries: list


def _jobs(plan, chunk_size: int) -> Iterator[_Job]:
    entries = sorted(plan.entries, key=lambda e: e.start)
    ends = [e.end for e in entries]
    for r in plan.ram_ranges:
        for i, (c_start, c_end) in enumerate(iter_chunks(r.start, r.end, chunk_size)):
            # Entries are sorted and disjoint: the first one ending after the chunk's start,
            # and those following it that start before the chunk's end.
            k = bisect.bisect_right(ends, c_start)
            overlapping = []
            while k < len(entries) and entries[k].start < c_end:
                overlapping.append(entries[k])
                k += 1
            yield _Job(i, r.start, r.end, c_start, c_end, overlapping)


def run_capture(
    plan,
    sources: Mapping[str, Reader],
    writer: ImageWriter,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    readers: int = 1,
    skip: Callable[[int, int], list[tuple[int, int, Fate]]] | None = None,
    zero: bool = False,
) -> CaptureResult:
    """Capture every range of ``plan`` into ``writer``; stops early when ``stop`` is set.

    :param plan: the plan (``ram_ranges`` and ``entries``, see :mod:`collector.acquire.plan`).
    :param sources: open sources by name.
    :param writer: the image writer; the caller finishes it.
    :param stop: set by a signal handler: the current chunk is completed, the range under
        way is padded (up to :data:`PAD_LIMIT`), then the loop ends.
    :param readers: reader threads when the sources allow concurrent reads; at most
        ``2 * readers`` chunks are read ahead of the writer.
    :param skip: asked for each chunk ``[start, end)`` just before it is read: the
        ``(start, end, fate)`` runs of pages to leave unread, recorded with that fate.
    :param zero: record each page read whose bytes are all zero as READ_ZERO (found by the
        thread that read the chunk, right after reading it).
    """
    progress = Progress(total_bytes=sum(r.end - r.start for r in plan.ram_ranges))
    result = CaptureResult(progress)
    page = writer.page_size

    def read(job: _Job) -> tuple[bytes | bytearray, list[FateRun]]:
        entries = job.entries
        if skip is not None:
            # Decided from the chunk's struct pages read just now, right before its RAM.
            entries = without(entries, skip(job.c_start, job.c_end))
        data, runs = read_chunk(job.c_start, job.c_end, entries, sources, page)
        if zero:
            runs = with_zero_pages(data, job.c_start, page, runs)
        return data, runs

    jobs = _jobs(plan, writer.chunk_size)
    pool = None
    if readers > 1 and concurrent_ok(sources):
        pool = ThreadPoolExecutor(readers, thread_name_prefix="read")
    window: deque[tuple[_Job, Future]] = deque()
    try:
        while True:
            if pool is not None:
                while len(window) < 2 * readers:
                    job = next(jobs, None)
                    if job is None:
                        break
                    window.append((job, pool.submit(read, job)))
                if not window:
                    break
                job, pending = window[0]
            else:
                job = next(jobs, None)
                if job is None:
                    break
            if stop is not None and stop.is_set():
                # Chunks read ahead are dropped: the one under way was the last written.
                result.stopped_by = getattr(stop, "reason", "interrupted")
                if job.index and job.end - job.c_start <= PAD_LIMIT:
                    pad_range(writer, job.c_start, job.end)
                elif job.index:
                    result.unpadded = (job.c_start, job.end)
                return result
            if pool is not None:
                window.popleft()
                data, runs = pending.result()
            else:
                data, runs = read(job)
            if job.index == 0:
                writer.add_chunk(job.c_start, data, runs, job.start, job.end)
            else:
                writer.add_chunk(job.c_start, data, runs)
            progress.done_bytes += job.c_end - job.c_start
            progress.chunks += 1
            progress.unreadable_pages += sum(r.count for r in runs if r.fate == Fate.UNREADABLE)
            if on_progress is not None:
                on_progress(progress)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return result


@dataclass
class _Piece:
    """A plan entry cut around skipped pages (what :func:`read_chunk` reads of an entry)."""

    start: int
    end: int
    source: str | None
    fate: Fate = Fate.READ
    kernel_zero: bool = False


def without(entries: list, runs: list[tuple[int, int, Fate]]) -> list:
    """``entries`` with the ``runs`` cut out of those that read a source, each run becoming
    a piece of its own with no source and the run's fate. Entries and runs are sorted."""
    if not runs:
        return entries
    out: list = []
    for e in entries:
        if e.source is None:
            out.append(e)
            continue
        pos = e.start
        for start, end, fate in runs:
            lo, hi = max(start, e.start), min(end, e.end)
            if lo >= hi:
                continue
            if lo > pos:
                out.append(_Piece(pos, lo, e.source, Fate.READ, e.kernel_zero))
            out.append(_Piece(lo, hi, None, fate))
            pos = hi
        if pos < e.end:
            out.append(_Piece(pos, e.end, e.source, Fate.READ, e.kernel_zero))
    return out


def pad_range(writer: ImageWriter, start: int, end: int) -> None:
    """Finish a range the capture stopped inside: zeros recorded as MISSING, never as data.

    The range's LiME header, written with its first chunk, announced all of it, so the
    stream must carry that many bytes to stay a valid LiME file. All-zero chunks cost no
    compression (the writer reuses one frame), only the stream hash: about a second per GiB,
    which is why :func:`run_capture` pads at most :data:`PAD_LIMIT` bytes.
    """
    page = writer.page_size
    for c_start, c_end in iter_chunks(start, end, writer.chunk_size):
        first = c_start // page
        pages = (c_end + page - 1) // page - first
        writer.add_chunk(c_start, bytes(c_end - c_start), [FateRun(0, pages, Fate.MISSING)])
