"""Export any physical memory to the formats other tools read: LiME, padded raw, ELF core.

None of these formats can say that a page was not captured, so pages the image holds a
record of but not the contents (unreadable, excluded...) are written as zeros and counted in
the returned :class:`ExportSummary`, for the caller to warn about. RAM the image announces
but does not hold at all (a cut file's tail, a range a header claims beyond the file) is left
out rather than zero-filled, so an export never writes more than the image holds: a LiME
file or ELF core gets one range per stretch the image holds, a raw file keeps the gap as a
hole. Data is streamed in bounded chunks; memory use does not grow with the size of RAM.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from collector.elf import (
    COLLECTOR_NOTE_NAME,
    EM_X86_64,
    ET_CORE,
    NT_COLLECTOR_BTF,
    NT_COLLECTOR_KALLSYMS,
    NT_COLLECTOR_PAGE_FATES,
    PAGE_FATES_HEAD,
    PAGE_FATES_RECORD,
    PF_R,
    PF_W,
    PF_X,
    PN_XNUM,
    PT_LOAD,
    PT_NOTE,
    VMCOREINFO_NOTE_NAME,
    Elf64_Ehdr,
    Elf64_Nhdr,
    Elf64_Phdr,
    Elf64_Shdr,
)
from collector.errors import ImageError
from collector.image.lime import write_lime_header
from collector.memory import Fate, PageNotCaptured, PhysicalMemory
from collector.outfile import CheckedWriter

DEFAULT_CHUNK = 1 << 20
_U64 = 1 << 64
_MAX_FILE_OFFSET = (1 << 63) - 1  # off_t


@dataclass
class ExportSummary:
    """What an export wrote.

    :param ranges: ranges written.
    :param bytes: RAM bytes written (real data and zero fill; headers not counted).
    :param zero_filled: pages written as zeros because the source lacks them, by fate.
    :param zero_bytes: bytes of that zero fill.
    :param left_out: bytes of announced ranges the image does not hold, not written.
    :param kernel_segments: PT_LOADs written for the kernel image's virtual addresses (ELF).
    :param notes: what the export left out besides RAM, one line each.
    """

    ranges: int = 0
    bytes: int = 0
    zero_filled: dict[Fate, int] = field(default_factory=dict)
    zero_bytes: int = 0
    left_out: int = 0
    kernel_segments: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def pages_not_captured(self) -> int:
        return sum(self.zero_filled.values())

    def warning(self) -> str | None:
        """One line for the user when pages were zero-filled or left out, else None."""
        parts = []
        if self.zero_filled:
            detail = ", ".join(
                f"{n} {fate.label}"
                for fate, n in sorted(self.zero_filled.items(), key=lambda kv: kv[0])
            )
            n = self.pages_not_captured
            pages = "1 page was" if n == 1 else f"{n} pages were"
            parts.append(f"{pages} not captured and written as zeros ({detail})")
        if self.left_out:
            parts.append(
                f"{self.left_out} bytes of announced RAM the image does not hold were left out"
            )
        return "; ".join(parts) or None


def _checked_ranges(
    memory: PhysicalMemory, summary: ExportSummary | None = None
) -> list[tuple[int, int]]:
    """The stretches to export: the ranges, less what the image does not hold at all."""
    spans = sorted((s, e) for s, e in memory.ranges() if e > s)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise ImageError(f"memory ranges overlap at {start:#x}; cannot export")
    held = _held(memory)
    if held is None:
        return spans
    out = []
    i = 0
    for start, end in spans:  # both sorted: one pass over each
        while i < len(held) and held[i][1] <= start:
            i += 1
        j = i
        while j < len(held) and held[j][0] < end:
            lo, hi = max(start, held[j][0]), min(end, held[j][1])
            if lo < hi:
                out.append((lo, hi))
            j += 1
    if summary is not None:
        summary.left_out = sum(e - s for s, e in spans) - sum(e - s for s, e in out)
    return out


def _held(memory: PhysicalMemory) -> list[tuple[int, int]] | None:
    """The stretches whose pages the image holds (data, or a record of why not), or None
    when the reader cannot tell. A native image holds its chunks; a file-backed image the
    bytes its file really has."""
    for name in ("captured_ranges", "readable_ranges"):
        method = getattr(memory, name, None)
        if callable(method):
            return sorted(method())
    return None


def _chunks(
    memory: PhysicalMemory, start: int, end: int, chunk_size: int, summary: ExportSummary
) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield ``(paddr, data, length)`` covering ``[start, end)``; ``data`` None means zeros.

    Chunks end on multiples of ``chunk_size`` (a multiple of the page size) so that a page
    is never split between chunks and is counted at most once.
    """
    page = memory.page_size if memory.page_size > 0 else 4096
    chunk_size = max(page, chunk_size - chunk_size % page)
    addr = start
    while addr < end:
        stop = min(end, (addr // chunk_size + 1) * chunk_size)
        while addr < stop:
            try:
                data = memory.read(addr, stop - addr)
            except PageNotCaptured as e:
                err = e
            else:
                if len(data) != stop - addr:
                    raise ImageError(
                        f"reader returned {len(data)} bytes for {stop - addr} at {addr:#x}"
                    )
                yield addr, data, stop - addr
                addr = stop
                continue
            bad = err.paddr if addr < err.paddr < stop else addr
            if bad > addr:
                try:
                    data = memory.read(addr, bad - addr)
                except PageNotCaptured as e:
                    err, bad = e, addr
                else:
                    yield addr, data, bad - addr
                    addr = bad
            # Zero-fill to the end of the page, then on over whole pages of the same fate
            # (cheaper than one exception per page through a large absent stretch).
            fate = err.fate
            hole_end = min(stop, max(addr + 1, addr - addr % page + page))
            pages = 1
            while (
                fate != Fate.READ
                and hole_end < stop
                and hole_end % page == 0
                and memory.fate(hole_end).fate == fate
            ):
                hole_end = min(stop, hole_end + page)
                pages += 1
            summary.zero_filled[fate] = summary.zero_filled.get(fate, 0) + pages
            summary.zero_bytes += hole_end - addr
            yield addr, None, hole_end - addr
            addr = hole_end


class _FateRun(NamedTuple):
    """Bytes ``[start, end)`` whose pages the image records as not read."""

    start: int
    end: int
    fate: Fate
    errno: int


def _not_read(memory: PhysicalMemory, spans: list[tuple[int, int]]) -> list[_FateRun] | None:
    """The runs of pages not read inside ``spans``, in order; None when the reader keeps no
    such records (a LiME or raw file: every byte it holds was read). Pages read and found
    all zeros (READ_ZERO) are data, not listed."""
    fate_runs = getattr(memory, "fate_runs", None)
    if not callable(fate_runs):
        return None
    page = memory.page_size if memory.page_size > 0 else 4096
    runs = []
    i = 0
    for r in fate_runs():  # in physical order, as are the spans
        if r.fate.is_data:  # a read-zero page's zeros are its content, exported as such
            continue
        start, end = r.start, r.start + r.count * page
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            lo, hi = max(start, spans[j][0]), min(end, spans[j][1])
            if lo < hi:
                runs.append(_FateRun(lo, hi, r.fate, r.errno))
            j += 1
    return runs


def _pieces(
    memory: PhysicalMemory,
    start: int,
    end: int,
    chunk_size: int,
    summary: ExportSummary,
    runs: list[_FateRun] | None,
) -> Iterator[tuple[int, bytes | memoryview | None, int]]:
    """Like :func:`_chunks`, but from a reader that can stream its stored chunks whole and
    lists the pages it did not read (the native reader): one decompression per chunk, no
    copy and no cache, and the listed pages zero-filled without an exception each."""
    stream = getattr(memory, "stream", None)
    if runs is None or not callable(stream):
        yield from _chunks(memory, start, end, chunk_size, summary)
        return
    page = memory.page_size if memory.page_size > 0 else 4096
    k = bisect.bisect_right(runs, start, key=lambda r: r.end)
    for addr, view in stream(start, end):
        stop = addr + len(view)
        pos = addr
        while k < len(runs) and runs[k].start < stop:
            run = runs[k]
            lo, hi = max(pos, run.start), min(stop, run.end)
            if lo > pos:
                yield pos, view[pos - addr : lo - addr], lo - pos
            summary.zero_filled[run.fate] = (
                summary.zero_filled.get(run.fate, 0) + (hi - 1) // page - lo // page + 1
            )
            summary.zero_bytes += hi - lo
            yield lo, None, hi - lo
            pos = hi
            if run.end > stop:
                break
            k += 1
        if pos < stop:
            yield pos, view[pos - addr :], stop - pos


def export_lime(
    memory: PhysicalMemory, out_fileobj: BinaryIO, chunk_size: int = DEFAULT_CHUNK
) -> ExportSummary:
    """Write ``memory`` as a LiME file (one header per range) to a stream, front to back."""
    summary = ExportSummary()
    spans = _checked_ranges(memory, summary)
    runs = _not_read(memory, spans)
    sink = CheckedWriter(out_fileobj)
    zeros = _Zeros(memory, chunk_size)
    try:
        for start, end in spans:
            sink.write(write_lime_header(start, end - 1))
            for _addr, data, length in _pieces(memory, start, end, chunk_size, summary, runs):
                zeros.write(sink, length) if data is None else sink.write(data)
                summary.bytes += length
            summary.ranges += 1
    except OSError as e:
        raise sink.error(e) from None
    return summary


class _Zeros:
    """Zero fill of any length, from one bounded buffer."""

    def __init__(self, memory: PhysicalMemory, chunk_size: int) -> None:
        self.buf = memoryview(bytes(max(chunk_size, memory.page_size, 1 << 16)))

    def write(self, sink: CheckedWriter, length: int) -> None:
        while length > 0:
            n = min(length, len(self.buf))
            sink.write(self.buf[:n])
            length -= n


def export_raw(
    memory: PhysicalMemory,
    out: str | os.PathLike[str] | BinaryIO,
    chunk_size: int = DEFAULT_CHUNK,
) -> ExportSummary:
    """Write ``memory`` as a padded raw file: each byte at the offset of its physical address.

    Gaps between ranges, pages not captured and all-zero chunks are left as holes, so the
    file is sparse where the file system allows; they read back as zeros.

    :param out: a path, or a seekable binary file opened for writing.
    """
    if isinstance(out, str | os.PathLike):
        with open(out, "wb") as f:
            return export_raw(memory, f, chunk_size)
    summary = ExportSummary()
    spans = _checked_ranges(memory, summary)
    if spans and spans[-1][1] > _MAX_FILE_OFFSET:
        raise ImageError(
            f"memory at {spans[-1][0]:#x}-{spans[-1][1] - 1:#x} lies beyond the largest offset "
            "a raw file can have (2^63 - 1); export it as LiME or ELF instead"
        )
    runs = _not_read(memory, spans)
    sink = CheckedWriter(out)
    try:
        file_end = 0
        for start, end in spans:
            for addr, data, length in _pieces(memory, start, end, chunk_size, summary, runs):
                if data is not None and _nonzero(data):
                    if sink.offset != addr:
                        sink.seek(addr)
                    sink.write(data)
                summary.bytes += length
            summary.ranges += 1
            file_end = end
        sink.truncate(file_end)
    except OSError as e:
        raise sink.error(e) from None
    return summary


_ZEROS = bytes(1 << 20)


def _nonzero(data: bytes | memoryview) -> bool:
    """Whether ``data`` holds a byte that is not zero. ``bytes.startswith`` compares with
    memcmp() and no copy (comparing memoryviews goes item by item, 40 times slower)."""
    view = memoryview(data).cast("B")
    for at in range(0, len(view), len(_ZEROS)):
        if not _ZEROS.startswith(view[at : at + len(_ZEROS)]):
            return True
    return False


def _note(name: str, type_: int, desc: bytes) -> list[bytes]:
    """One ELF note as the kernel writes it (kernel/crash_core.c append_elf_note): 4-byte
    aligned name and descriptor. In pieces, so that a large descriptor is not copied."""
    raw = name.encode() + b"\0"
    return [
        Elf64_Nhdr.pack(len(raw), len(desc), type_) + raw.ljust((len(raw) + 3) // 4 * 4, b"\0"),
        desc,
        bytes(-len(desc) % 4),
    ]


def _vmcoreinfo_note(vmcoreinfo: bytes) -> list[bytes]:
    """The VMCOREINFO note (name "VMCOREINFO", type 0), as /proc/vmcore carries it."""
    return _note(VMCOREINFO_NOTE_NAME, 0, vmcoreinfo)


def _page_fates_desc(page_size: int, runs: list[_FateRun]) -> bytes:
    """The COLLECTOR page-fates note's descriptor (layout in collector.elf)."""
    records = []
    for run in runs:
        first = run.start - run.start % page_size
        pages = -(-(run.end - first) // page_size)
        if records and records[-1][0] + records[-1][1] * page_size > first:
            # A page shared by two stretches (a range ending inside it) is listed once.
            continue
        records.append((first, pages, int(run.fate), run.errno))
    return PAGE_FATES_HEAD.pack(1, page_size) + b"".join(
        PAGE_FATES_RECORD.pack(*r) for r in records
    )


#: The page-fates note is left out beyond this many runs (24 bytes each): a hostile image
#: alternating fates page by page must not fill memory with the note before any data.
MAX_FATE_RECORDS = 1 << 20


def collector_notes(
    memory: PhysicalMemory, runs: list[_FateRun] | None, summary: ExportSummary
) -> list[list[bytes]]:
    """The COLLECTOR notes an ELF export carries: the image's BTF and kallsyms blobs as they
    are, and the runs of pages it did not read (which the ELF file holds as zeros)."""
    notes = []
    for type_, blob in ((NT_COLLECTOR_BTF, "btf"), (NT_COLLECTOR_KALLSYMS, "kallsyms")):
        data = memory.blob(blob)
        if data:
            notes.append(_note(COLLECTOR_NOTE_NAME, type_, data))
    if runs:
        if len(runs) <= MAX_FATE_RECORDS:
            desc = _page_fates_desc(memory.page_size or 4096, runs)
            notes.append(_note(COLLECTOR_NOTE_NAME, NT_COLLECTOR_PAGE_FATES, desc))
        else:
            summary.notes.append(
                f"{len(runs)} runs of pages not read, more than {MAX_FATE_RECORDS}: the "
                "page-fates note was left out"
            )
    return notes


class KernelMap(NamedTuple):
    """A mapping of physical memory at virtual addresses to describe with its own PT_LOADs
    (the kernel image at ``__START_KERNEL_map``, as /proc/vmcore has it)."""

    vaddr: int
    paddr: int
    size: int


def export_elf(
    memory: PhysicalMemory,
    out_fileobj: BinaryIO,
    vmcoreinfo: bytes | None = None,
    page_offset_base: int | None = None,
    e_machine: int = EM_X86_64,
    chunk_size: int = DEFAULT_CHUNK,
    kernel_map: KernelMap | None = None,
) -> ExportSummary:
    """Write ``memory`` as an ELF64 core laid out like /proc/vmcore, front to back.

    One PT_NOTE comes first: the VMCOREINFO note (name "VMCOREINFO", type 0) when
    ``vmcoreinfo`` is given, then the COLLECTOR notes (:func:`collector_notes`). Then one
    PT_LOAD per range with ``p_paddr`` = the physical address and ``p_vaddr`` =
    ``page_offset_base + p_paddr`` (0 when the base is unknown). Each segment of a page or
    more has a file offset congruent to its address modulo the page size.

    ``kernel_map`` adds one PT_LOAD per exported range it overlaps, at its virtual
    addresses, after the others. Its file offsets point into the bytes already written for
    those ranges: the kernel image is not stored twice.
    """
    summary = ExportSummary()
    spans = _checked_ranges(memory, summary)
    runs = _not_read(memory, spans)
    page = memory.page_size if memory.page_size > 0 else 4096
    notes = ([_vmcoreinfo_note(vmcoreinfo)] if vmcoreinfo is not None else []) + collector_notes(
        memory, runs, summary
    )
    note_size = sum(len(piece) for n in notes for piece in n)
    kernel: list[tuple[int, int, int, int]] = []  # (span index, vaddr, paddr, size)
    if kernel_map is not None:
        k_end = kernel_map.paddr + kernel_map.size
        for i, (start, end) in enumerate(spans):
            lo, hi = max(start, kernel_map.paddr), min(end, k_end)
            if lo < hi:
                kernel.append((i, (kernel_map.vaddr + lo - kernel_map.paddr) % _U64, lo, hi - lo))
        if not kernel:
            summary.notes.append(
                f"the kernel image at physical {kernel_map.paddr:#x} is not in the exported "
                "ranges: no PT_LOAD for its virtual addresses"
            )
    phnum = len(spans) + len(kernel) + (1 if note_size else 0)
    xnum = phnum >= PN_XNUM
    phoff = Elf64_Ehdr.size
    shoff = phoff + phnum * Elf64_Phdr.size if xnum else 0
    note_off = phoff + phnum * Elf64_Phdr.size + (Elf64_Shdr.size if xnum else 0)
    offset = note_off + note_size

    phdrs = []
    if note_size:
        phdrs.append(Elf64_Phdr.pack(PT_NOTE, 0, note_off, 0, 0, note_size, note_size, 0))
    layout: list[int] = []
    for start, end in spans:
        if end - start >= page:
            # Pad so that offset = start (mod page) and the segment can be mapped; not for
            # segments shorter than a page, so padding never outweighs the data exported.
            offset += (start - offset) % page
        layout.append(offset)
        vaddr = (page_offset_base + start) % _U64 if page_offset_base is not None else 0
        phdrs.append(
            Elf64_Phdr.pack(
                PT_LOAD, PF_R | PF_W | PF_X, offset, vaddr, start, end - start, end - start, 0
            )
        )
        offset += end - start
    for i, vaddr, paddr, size in kernel:
        seg_off = layout[i] + paddr - spans[i][0]
        phdrs.append(
            Elf64_Phdr.pack(PT_LOAD, PF_R | PF_W | PF_X, seg_off, vaddr, paddr, size, size, 0)
        )
    summary.kernel_segments = len(kernel)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # ELFCLASS64, ELFDATA2LSB, EV_CURRENT
    ehdr = Elf64_Ehdr.pack(
        ident, ET_CORE, e_machine, 1, 0, phoff, shoff, 0, Elf64_Ehdr.size, Elf64_Phdr.size,
        PN_XNUM if xnum else phnum, Elf64_Shdr.size if xnum else 0, 1 if xnum else 0, 0,
    )  # fmt: skip
    # With PN_XNUM, section header 0 (SHT_NULL) carries the real count in sh_info.
    shdr = Elf64_Shdr.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if xnum else b""

    sink = CheckedWriter(out_fileobj)
    zeros = _Zeros(memory, chunk_size)
    try:
        sink.write(ehdr + b"".join(phdrs) + shdr)
        for pieces in notes:
            for piece in pieces:
                sink.write(piece)
        del notes  # the blobs are not needed while RAM is written
        for (start, end), seg_off in zip(spans, layout, strict=True):
            zeros.write(sink, seg_off - sink.offset)
            for _addr, data, length in _pieces(memory, start, end, chunk_size, summary, runs):
                zeros.write(sink, length) if data is None else sink.write(data)
                summary.bytes += length
            summary.ranges += 1
    except OSError as e:
        raise sink.error(e) from None
    return summary
