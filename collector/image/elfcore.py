"""ELF64 little-endian core files as physical memory: copies of /proc/kcore, kdump's
/proc/vmcore and QEMU's ``dump-guest-memory``, with their notes (VMCOREINFO among them).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from collector.elf import (
    COLLECTOR_NOTE_NAME,
    EM_X86_64,
    ET_CORE,
    MAX_NOTES,
    NO_PADDR,
    NT_COLLECTOR_BTF,
    NT_COLLECTOR_KALLSYMS,
    NT_COLLECTOR_PAGE_FATES,
    PAGE_FATES_HEAD,
    PAGE_FATES_RECORD,
    PT_LOAD,
    PT_NOTE,
    VMCOREINFO_NOTE_NAME,
    Elf64_Ehdr,
    ElfError,
    ElfNote,
    PhdrLimits,
    find_note,
    parse_elf_header,
    parse_notes,
    parse_program_headers,
)
from collector.errors import (
    ImageCorrupted,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImage,
)
from collector.image.raw import FileImage, RawFile
from collector.memory import Fate, FateRun, PageFate, PageNotCaptured

_U64 = 1 << 64
#: More program headers than any machine's memory map needs (one PT_LOAD per RAM range),
#: and enough for a core that needs PN_XNUM. Each costs about 600 bytes and tens of
#: microseconds per command here; a file claiming a million is refused rather than parsed
#: for seconds into hundreds of MiB.
MAX_CORE_SEGMENTS = 1 << 16
#: Core files may carry PN_XNUM and program headers longer than Elf64_Phdr.
CORE_LIMITS = PhdrLimits(pn_xnum=True, exact_phentsize=False, max_phnum=MAX_CORE_SEGMENTS)
MAX_NOTE_BYTES = 64 << 20
#: Problems listed one by one; beyond this they are only counted.
MAX_PROBLEMS = 100
#: x86-64 __PAGE_OFFSET before KASLR of the direct map (4-level paging, 64 TiB direct map).
X86_64_PAGE_OFFSET_L4 = 0xFFFF880000000000
X86_64_DIRECT_MAP_SIZE_L4 = 1 << 46

#: Fates a page-fates note may give: pages not read, so neither READ nor READ_ZERO (whose
#: zeros the export holds as data), and not the reader-side OUTSIDE.
_NOTE_FATES = frozenset(int(f) for f in Fate if not f.is_data and f != Fate.OUTSIDE)


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header, with how much of its data the file really holds.

    :param index: its position in the program header table.
    :param vaddr: ``p_vaddr`` (0 when the producer did not know it, as in QEMU dumps).
    :param paddr: the physical address used for physical reads, or None (kcore's vmalloc,
        modules and vmemmap segments carry ``p_paddr = -1``).
    :param offset: ``p_offset``.
    :param filesz: ``p_filesz``: bytes stored in the file.
    :param memsz: ``p_memsz``: bytes of memory described; beyond ``filesz`` nothing is stored.
    :param present: bytes of ``filesz`` the file really holds (less when it was cut short).
    """

    index: int
    vaddr: int
    paddr: int | None
    offset: int
    filesz: int
    memsz: int
    present: int


class _Piece(NamedTuple):
    """A part of the address space served by one segment whose first byte is at ``base``."""

    start: int
    end: int
    base: int
    seg: ElfSegment


class VirtualPageNotCaptured(PageNotCaptured):
    """A read by virtual address touched bytes the core does not hold."""

    def __init__(self, vaddr: int, fate: Fate) -> None:
        super().__init__(vaddr, fate)
        self.args = (f"virtual address {vaddr:#x} is not in the core: {fate.label}",)


def _build_map(entries: list[tuple[int, ElfSegment]]) -> tuple[list[_Piece], list[_Piece]]:
    """Lay segments on one address space: earlier-starting (then longer) segments win.

    Returns the pieces, and the pieces of segments that partly overlapped another. A segment
    wholly inside others contributes nothing and is not reported: kcore's kernel text segment
    lies inside a System RAM segment by design.
    """
    pieces: list[_Piece] = []
    trimmed: list[_Piece] = []
    covered = -1
    for base, seg in sorted(entries, key=lambda e: (e[0], -e[1].memsz, e[1].index)):
        end = base + seg.memsz
        if end <= covered:
            continue
        start = max(base, covered)
        piece = _Piece(start, end, base, seg)
        pieces.append(piece)
        if start > base:
            trimmed.append(piece)
        covered = end
    return pieces, trimmed


def _elf_failure(name: str, size: int, e: ElfError) -> ImageError:
    """The kind of failure an ELF header or program header table that does not parse is."""
    text = str(e)
    if "no ELF magic" in text or "not an ELF core" in text:
        return NotAnImage(name, text)
    if "too short" in text or "cut short" in text or "not in the file" in text:
        return ImageTruncated(name, f"the file ends at byte {size}: {text}")
    if text.startswith("only "):  # 32-bit or big-endian
        return UnsupportedImage(name, text)
    return ImageCorrupted(name, text)


class ElfCore(FileImage):
    """A :class:`~collector.memory.PhysicalMemory` over an ELF64 little-endian core file.

    Physical reads use the PT_LOAD segments' ``p_paddr``. Each address has one fate:
    READ where the file holds the bytes; NOT_COVERED in the tail of a segment beyond
    ``p_filesz`` (the producer described the memory but stored nothing: QEMU does this for
    regions it does not dump, makedumpfile for pages it filters); MISSING where the file was
    cut before the end of ``p_filesz``; OUTSIDE elsewhere. Fates are exact to the byte.

    The COLLECTOR notes of a collector export (docs/interop/exports.md) are read back: BTF
    and kallsyms as blobs, and the pages its page-fates note lists with their fates (a read
    of one raises :class:`PageNotCaptured`, as on the image the export came from).

    Segments with ``p_paddr = -1`` (kcore's vmalloc, modules and vmemmap) are left out of
    the physical view. Every segment with a non-zero ``p_vaddr`` is in
    :attr:`virtual_segments` and can be read with :meth:`read_virtual`.

    Copies of /proc/kcore from kernels before "proc/kcore: update physical address for kcore
    ram and text" (v4.11) have ``p_paddr = 0`` in every PT_LOAD. For those, the physical
    address of a segment inside the direct map is ``p_vaddr - direct_map_base``; pass
    ``direct_map_base`` (the kernel's ``page_offset_base``) when it is known. On x86-64 it
    defaults to 0xffff880000000000, the fixed base before the direct map was randomized, and
    :attr:`problems` says that this assumption was made.

    :param source: a path, or a seekable binary file object (left open by :meth:`close`).
    :param direct_map_base: the direct map's base, used only when every ``p_paddr`` is 0.
    """

    def __init__(
        self, source: str | os.PathLike[str] | BinaryIO, direct_map_base: int | None = None
    ) -> None:
        self._file = RawFile(source)
        self.problems: list[str] = []
        self.notes: list[ElfNote] = []
        self.segments: list[ElfSegment] = []
        self.page_size = 4096
        self.metadata: dict = {}
        self._note_bytes = 0
        self._notes_full = False
        self._more_problems = 0
        try:
            self._parse(direct_map_base)
        except BaseException:
            self._file.close()
            raise

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self, direct_map_base: int | None) -> None:
        try:
            header = parse_elf_header(self._file.read_at(0, Elf64_Ehdr.size))
            if header.e_type != ET_CORE:
                raise ElfError(f"not an ELF core file (e_type {header.e_type})")
            phdrs = parse_program_headers(self._file.read_at, header, CORE_LIMITS, self._file.size)
        except ElfError as e:
            raise _elf_failure(self._file.name, self._file.size, e) from None
        self.e_machine = header.e_machine
        for i, ph in enumerate(phdrs):
            if ph.p_type == PT_LOAD:
                self._add_load(i, ph.p_offset, ph.p_vaddr, ph.p_paddr, ph.p_filesz, ph.p_memsz)
            elif ph.p_type == PT_NOTE:
                self._add_notes(i, ph.p_offset, ph.p_filesz, ph.p_align)
        self._build(direct_map_base)
        self._note_metadata()
        if self._more_problems:
            self.problems.append(f"... and {self._more_problems} more problems")

    def _add_load(
        self, i: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int
    ) -> None:
        if filesz > memsz:
            self._problem(
                f"PT_LOAD {i}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}; p_memsz used"
            )
            filesz = memsz
        if memsz == 0:
            return
        size = self._file.size
        present = max(0, min(filesz, size - offset))
        if present < filesz:
            self._problem(
                f"PT_LOAD {i} (p_paddr {paddr:#x}, p_vaddr {vaddr:#x}) is cut short: {present} of "
                f"{filesz} bytes present in the file"
            )
        if paddr != NO_PADDR and paddr + memsz > _U64:
            self._problem(f"PT_LOAD {i}: p_paddr {paddr:#x} + p_memsz wraps; not physical")
            paddr = NO_PADDR
        if vaddr + memsz > _U64:
            self._problem(f"PT_LOAD {i}: p_vaddr {vaddr:#x} + p_memsz wraps; not virtual")
            vaddr = 0
        self.segments.append(
            ElfSegment(
                i, vaddr, None if paddr == NO_PADDR else paddr, offset, filesz, memsz, present
            )
        )

    def _add_notes(self, i: int, offset: int, filesz: int, p_align: int) -> None:
        if self._notes_full:
            return
        size = self._file.size
        if offset >= size:
            if filesz:
                self._problem(f"PT_NOTE {i}: offset {offset:#x} is past the end of the file")
            return
        length = min(filesz, size - offset)
        if length < filesz:
            self._problem(f"PT_NOTE {i} is cut short: {length} of {filesz} bytes present")
        self._note_bytes += length
        if self._note_bytes > MAX_NOTE_BYTES:
            self._problem(f"PT_NOTE {i}: notes exceed {MAX_NOTE_BYTES} bytes; the rest are ignored")
            self._notes_full = True
            return
        buf = self._file.read_at(offset, length)
        found = parse_notes(
            buf, 8 if p_align == 8 else 4, lambda m: self._problem(f"PT_NOTE {i}: {m}")
        )
        room = MAX_NOTES - len(self.notes)
        if len(found) > room:
            self._problem(f"PT_NOTE {i}: more than {MAX_NOTES} notes; the rest are ignored")
            self._notes_full = True
        self.notes.extend(found[:room])

    def _problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self._more_problems += 1

    def _build(self, direct_map_base: int | None) -> None:
        physical: list[tuple[int, ElfSegment]] = []
        if (
            self.segments
            and all(s.paddr == 0 for s in self.segments)
            and any(s.vaddr >> 63 for s in self.segments)
        ):
            physical = self._derive_paddrs(direct_map_base)
        else:
            physical = [(s.paddr, s) for s in self.segments if s.paddr is not None]
        self._phys, trimmed = _build_map(physical)
        for p in trimmed:
            self._problem(
                f"PT_LOAD {p.seg.index} overlaps another segment at physical {p.base:#x}-"
                f"{p.start:#x}; the other segment is used there"
            )
        self._phys_starts = [p.start for p in self._phys]
        self.virtual_segments = [s for s in self.segments if s.vaddr != 0]
        self._virt, _ = _build_map([(s.vaddr, s) for s in self.virtual_segments])
        self._virt_starts = [p.start for p in self._virt]
        self.direct_map_base = self._direct_map_delta()
        self._fates: list[FateRun] = []
        self._fate_starts: list[int] = []

    def _derive_paddrs(self, direct_map_base: int | None) -> list[tuple[int, ElfSegment]]:
        base = direct_map_base
        if base is None:
            if self.e_machine != EM_X86_64:
                self._problem(
                    "p_paddr is 0 in every PT_LOAD and the direct map base is unknown for "
                    f"e_machine {self.e_machine}; no physical view (pass direct_map_base)"
                )
                return []
            base = X86_64_PAGE_OFFSET_L4
            self._problem(
                f"p_paddr is 0 in every PT_LOAD (kcore of a kernel before v4.11): physical "
                f"addresses taken as p_vaddr - {base:#x}, the x86-64 direct map base without "
                "KASLR; pass direct_map_base if the kernel randomized it"
            )
        out: list[tuple[int, ElfSegment]] = []
        # Kernels that left p_paddr at 0 predate 5-level paging on x86-64 (v4.14): the
        # direct map is at most 64 TiB there.
        for seg in self.segments:
            if base <= seg.vaddr and seg.vaddr + seg.memsz <= base + X86_64_DIRECT_MAP_SIZE_L4:
                out.append((seg.vaddr - base, seg))
        return out

    def _direct_map_delta(self) -> int | None:
        """``p_vaddr - p_paddr`` shared by most bytes of the segments that carry both.

        kcore and kexec's vmcore map System RAM segments at the direct map, so the winning
        difference is the kernel's ``page_offset_base``; kernel text, mapped elsewhere, has
        a different one and fewer bytes. None when no difference covers most bytes.
        """
        weight: dict[int, int] = {}
        total = 0
        for p in self._phys:
            if p.seg.vaddr and p.seg.vaddr >> 63:
                delta = (p.seg.vaddr - p.base) % _U64
                weight[delta] = weight.get(delta, 0) + p.seg.memsz
                total += p.seg.memsz
        if not weight:
            return None
        delta, bytes_ = max(weight.items(), key=lambda kv: kv[1])
        return delta if 2 * bytes_ > total else None

    def _note_metadata(self) -> None:
        info = self.blob("vmcoreinfo")
        if info:
            for line in info.splitlines():
                if line.startswith(b"PAGESIZE="):
                    try:
                        value = int(line[9:])
                    except ValueError:
                        value = 0
                    if 512 <= value <= 1 << 20 and value & (value - 1) == 0:
                        self.page_size = value
                    else:
                        self._problem(f"VMCOREINFO PAGESIZE {line[9:40]!r} ignored")
        self._load_fates()
        self.metadata = {
            "format": "elf-core",
            "e_machine": self.e_machine,
            "segments": len(self.segments),
            "notes": sorted({n.name for n in self.notes}),
        }
        if self.direct_map_base is not None:
            self.metadata["direct_map_base"] = self.direct_map_base

    def _load_fates(self) -> None:
        """The COLLECTOR page-fates note of a collector export: pages the image it came from
        had not read, held as zeros in the file, are reported with their fate again."""
        note = find_note(self.notes, COLLECTOR_NOTE_NAME, NT_COLLECTOR_PAGE_FATES)
        if note is None:
            return
        desc = note.desc
        if len(desc) < PAGE_FATES_HEAD.size:
            self._problem("COLLECTOR page-fates note too short; ignored")
            return
        version, page_size = PAGE_FATES_HEAD.unpack_from(desc)
        body = len(desc) - PAGE_FATES_HEAD.size
        if version != 1 or page_size != self.page_size or body % PAGE_FATES_RECORD.size:
            self._problem(
                f"COLLECTOR page-fates note (version {version}, page size {page_size}, "
                f"{body} bytes of records) does not fit this core; ignored"
            )
            return
        runs: list[FateRun] = []
        end = 0
        for paddr, count, fate, errno in PAGE_FATES_RECORD.iter_unpack(
            memoryview(desc)[PAGE_FATES_HEAD.size :]
        ):
            if fate not in _NOTE_FATES or paddr < end or paddr % page_size or count < 1:
                self._problem(
                    f"COLLECTOR page-fates note: record at {paddr:#x} is out of order or not "
                    "a fate; the note is ignored"
                )
                return
            end = paddr + count * page_size
            runs.append(FateRun(paddr, count, Fate(fate), errno))
        self._fates = runs
        self._fate_starts = [r.start for r in runs]

    def fate_runs(self) -> list[FateRun]:
        """The runs of pages not read that the COLLECTOR page-fates note lists (none for a
        core without it), in physical order."""
        return list(self._fates)

    def _fate_at(self, paddr: int, size: int = 1) -> FateRun | None:
        """The first listed run of pages not read that overlaps ``[paddr, paddr + size)``."""
        i = bisect.bisect_right(self._fate_starts, paddr) - 1
        for run in self._fates[max(i, 0) : max(i, 0) + 2]:
            if run.start < paddr + size and paddr < run.start + run.count * self.page_size:
                return run
        return None

    # -- reading ------------------------------------------------------------------------------

    @staticmethod
    def _locate(pieces: list[_Piece], starts: list[int], addr: int) -> _Piece | None:
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < pieces[i].end:
            return pieces[i]
        return None

    @staticmethod
    def _fate_in(piece: _Piece, addr: int) -> Fate:
        rel = addr - piece.base
        if rel < piece.seg.present:
            return Fate.READ
        if rel < piece.seg.filesz:
            return Fate.MISSING
        return Fate.NOT_COVERED

    def _read(
        self,
        pieces: list[_Piece],
        starts: list[int],
        addr: int,
        size: int,
        missing: Callable[[int, Fate], PageNotCaptured],
    ) -> bytes:
        def run(at: int) -> tuple[int, int]:
            piece = self._locate(pieces, starts, at)
            if piece is None:
                raise missing(at, Fate.OUTSIDE)
            fate = self._fate_in(piece, at)
            if fate != Fate.READ:
                raise missing(at, fate)
            end = min(piece.end, piece.base + piece.seg.present)
            return piece.seg.offset + at - piece.base, end - at

        return self._file.read_mapped(addr, size, run)

    def ranges(self) -> list[tuple[int, int]]:
        """Physical ranges as ``(start, end)``, end exclusive, one per segment piece."""
        return [(p.start, p.end) for p in self._phys]

    def captured_ranges(self) -> list[tuple[int, int]]:
        """Physical ranges whose bytes the file holds (no tail beyond ``p_filesz``, no part
        the file was cut before), pages listed as not read included."""
        out = []
        for p in self._phys:
            end = min(p.end, p.base + p.seg.present)
            if p.start < end:
                out.append((p.start, end))
        return out

    def readable_ranges(self) -> list[tuple[int, int]]:
        """:meth:`captured_ranges` less the pages listed as not read."""
        out = []
        runs = iter(self._fates)
        run = next(runs, None)
        for start, end in self.captured_ranges():
            while start < end:
                while run is not None and run.start + run.count * self.page_size <= start:
                    run = next(runs, None)
                if run is None or run.start >= end:
                    out.append((start, end))
                    break
                if run.start > start:
                    out.append((start, run.start))
                start = run.start + run.count * self.page_size
        return out

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Physical parts of segments that the file was cut before."""
        out = []
        for p in self._phys:
            start = max(p.start, p.base + p.seg.present)
            end = min(p.end, p.base + p.seg.filesz)
            if start < end:
                out.append((start, end))
        return out

    def fate(self, paddr: int) -> PageFate:
        piece = self._locate(self._phys, self._phys_starts, paddr)
        fate = Fate.OUTSIDE if piece is None else self._fate_in(piece, paddr)
        if fate == Fate.READ and self._fates:
            run = self._fate_at(paddr)
            if run is not None:
                return PageFate(run.fate, run.errno)
        return PageFate(fate)

    def read(self, paddr: int, size: int) -> bytes:
        if self._fates:
            run = self._fate_at(paddr, size)
            if run is not None:
                # The first page not read ends the read, as the native reader does.
                first = max(run.start, paddr - paddr % self.page_size)
                raise PageNotCaptured(first, run.fate, run.errno)
        return self._read(self._phys, self._phys_starts, paddr, size, PageNotCaptured)

    def virtual_ranges(self) -> list[tuple[int, int]]:
        """Virtual ranges as ``(start, end)``, end exclusive."""
        return [(p.start, p.end) for p in self._virt]

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """Read by ``p_vaddr``; bytes the core lacks raise :class:`VirtualPageNotCaptured`."""
        return self._read(self._virt, self._virt_starts, vaddr, size, VirtualPageNotCaptured)

    def blob(self, name: str) -> bytes | None:
        """``vmcoreinfo``: the VMCOREINFO note's text, without trailing NULs; ``btf`` and
        ``kallsyms``: the COLLECTOR notes of a collector export; else None."""
        if name == "vmcoreinfo":
            note = find_note(self.notes, VMCOREINFO_NOTE_NAME)
            return None if note is None else note.desc.rstrip(b"\0")
        type_ = _BLOB_NOTES.get(name)
        note = None if type_ is None else find_note(self.notes, COLLECTOR_NOTE_NAME, type_)
        return None if note is None else note.desc


_BLOB_NOTES = {"btf": NT_COLLECTOR_BTF, "kallsyms": NT_COLLECTOR_KALLSYMS}
