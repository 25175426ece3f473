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

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from collector.elf import (
    EM_X86_64,
    ET_CORE,
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
from collector.errors import CollectorError, ImageError
from collector.image.lime import write_lime_header
from collector.memory import Fate, PageNotCaptured, PhysicalMemory

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
    """

    ranges: int = 0
    bytes: int = 0
    zero_filled: dict[Fate, int] = field(default_factory=dict)
    zero_bytes: int = 0
    left_out: int = 0

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


def _write_error(out: object, e: OSError) -> CollectorError:
    name = getattr(out, "name", "output")
    return CollectorError(f"{name}: write failed: {e.strerror or e}")


def export_lime(
    memory: PhysicalMemory, out_fileobj: BinaryIO, chunk_size: int = DEFAULT_CHUNK
) -> ExportSummary:
    """Write ``memory`` as a LiME file (one header per range) to a stream, front to back."""
    summary = ExportSummary()
    spans = _checked_ranges(memory, summary)
    zeros = memoryview(bytes(max(chunk_size, memory.page_size)))
    try:
        for start, end in spans:
            out_fileobj.write(write_lime_header(start, end - 1))
            for _addr, data, length in _chunks(memory, start, end, chunk_size, summary):
                out_fileobj.write(zeros[:length] if data is None else data)
                summary.bytes += length
            summary.ranges += 1
    except OSError as e:
        raise _write_error(out_fileobj, e) from None
    return summary


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
    try:
        file_end = 0
        for start, end in spans:
            for addr, data, length in _chunks(memory, start, end, chunk_size, summary):
                if data is not None and data.count(0) != length:
                    out.seek(addr)
                    out.write(data)
                summary.bytes += length
            summary.ranges += 1
            file_end = end
        out.truncate(file_end)
    except OSError as e:
        raise CollectorError(
            f"{getattr(out, 'name', 'raw output')}: write failed: {e.strerror or e}"
        ) from None
    return summary


def _vmcoreinfo_note(vmcoreinfo: bytes) -> bytes:
    """The VMCOREINFO ELF note as the kernel writes it (kernel/crash_core.c append_elf_note)."""
    name = VMCOREINFO_NOTE_NAME.encode() + b"\0"
    return (
        Elf64_Nhdr.pack(len(name), len(vmcoreinfo), 0)
        + name.ljust((len(name) + 3) // 4 * 4, b"\0")
        + vmcoreinfo.ljust((len(vmcoreinfo) + 3) // 4 * 4, b"\0")
    )


def export_elf(
    memory: PhysicalMemory,
    out_fileobj: BinaryIO,
    vmcoreinfo: bytes | None = None,
    page_offset_base: int | None = None,
    e_machine: int = EM_X86_64,
    chunk_size: int = DEFAULT_CHUNK,
) -> ExportSummary:
    """Write ``memory`` as an ELF64 core laid out like /proc/vmcore, front to back.

    A PT_NOTE with the VMCOREINFO note (name "VMCOREINFO", type 0) comes first when
    ``vmcoreinfo`` is given, then one PT_LOAD per range with ``p_paddr`` = the physical
    address and ``p_vaddr`` = ``page_offset_base + p_paddr`` (0 when the base is unknown).
    Each segment of a page or more has a file offset congruent to its address modulo the
    page size.
    """
    summary = ExportSummary()
    spans = _checked_ranges(memory, summary)
    page = memory.page_size if memory.page_size > 0 else 4096
    note = _vmcoreinfo_note(vmcoreinfo) if vmcoreinfo is not None else b""
    phnum = len(spans) + (1 if note else 0)
    xnum = phnum >= PN_XNUM
    phoff = Elf64_Ehdr.size
    shoff = phoff + phnum * Elf64_Phdr.size if xnum else 0
    note_off = phoff + phnum * Elf64_Phdr.size + (Elf64_Shdr.size if xnum else 0)
    offset = note_off + len(note)

    phdrs = []
    if note:
        phdrs.append(Elf64_Phdr.pack(PT_NOTE, 0, note_off, 0, 0, len(note), len(note), 0))
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
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # ELFCLASS64, ELFDATA2LSB, EV_CURRENT
    ehdr = Elf64_Ehdr.pack(
        ident, ET_CORE, e_machine, 1, 0, phoff, shoff, 0, Elf64_Ehdr.size, Elf64_Phdr.size,
        PN_XNUM if xnum else phnum, Elf64_Shdr.size if xnum else 0, 1 if xnum else 0, 0,
    )  # fmt: skip
    # With PN_XNUM, section header 0 (SHT_NULL) carries the real count in sh_info.
    shdr = Elf64_Shdr.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if xnum else b""

    zeros = memoryview(bytes(max(chunk_size, page)))
    try:
        written = len(ehdr) + len(shdr) + len(note) + sum(len(p) for p in phdrs)
        out_fileobj.write(ehdr + b"".join(phdrs) + shdr + note)
        for (start, end), seg_off in zip(spans, layout, strict=True):
            while written < seg_off:
                n = min(seg_off - written, len(zeros))
                out_fileobj.write(zeros[:n])
                written += n
            for _addr, data, length in _chunks(memory, start, end, chunk_size, summary):
                out_fileobj.write(zeros[:length] if data is None else data)
                summary.bytes += length
                written += length
            summary.ranges += 1
    except OSError as e:
        raise _write_error(out_fileobj, e) from None
    return summary
