"""ELF64 little-endian core files as physical memory: copies of /proc/kcore, kdump's
/proc/vmcore and QEMU's ``dump-guest-memory``, with their notes (VMCOREINFO among them).
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from collector.errors import ImageError
from collector.image.raw import RawFile
from collector.memory import Fate, PageFate, PageNotCaptured

# include/uapi/linux/elf.h
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
EM_X86_64 = 62
PF_X, PF_W, PF_R = 1, 2, 4
VMCOREINFO_NOTE_NAME = "VMCOREINFO"

Elf64_Ehdr = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
Elf64_Phdr = struct.Struct(
    "<IIQQQQQQ"
)  # 56 bytes: p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
Elf64_Shdr = struct.Struct("<IIQQQQIIQQ")  # 64 bytes
Elf64_Nhdr = struct.Struct("<III")  # n_namesz n_descsz n_type

#: kcore sets p_paddr to this for segments with no physical address (vmalloc, modules, vmemmap).
NO_PADDR = 0xFFFFFFFFFFFFFFFF
_U64 = 1 << 64
#: Far more program headers than any real core has; a header claiming more is hostile.
MAX_PHNUM = 1 << 20
MAX_PHDR_TABLE = 64 << 20
MAX_NOTE_BYTES = 64 << 20
MAX_NOTES = 1 << 16
#: Problems listed one by one; beyond this they are only counted.
MAX_PROBLEMS = 100
#: x86-64 __PAGE_OFFSET before KASLR of the direct map (4-level paging, 64 TiB direct map).
X86_64_PAGE_OFFSET_L4 = 0xFFFF880000000000
X86_64_DIRECT_MAP_SIZE_L4 = 1 << 46


class ElfNote(NamedTuple):
    """One ELF note: its name without the NUL, its type and its descriptor bytes."""

    name: str
    type: int
    desc: bytes


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


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def parse_notes(
    buf: bytes, align: int = 4, problem: Callable[[str], None] | None = None
) -> list[ElfNote]:
    """Parse a PT_NOTE segment's bytes into notes, bounds-checking every size.

    Linux pads names and descriptors to 4 bytes in ELF64 cores too (fs/proc/kcore.c,
    kernel/crash_core.c append_elf_note); ``align`` is 8 only for segments with p_align 8.
    A note running past the end stops parsing and is reported through ``problem``.
    """
    notes: list[ElfNote] = []
    off = 0
    while off + Elf64_Nhdr.size <= len(buf):
        namesz, descsz, ntype = Elf64_Nhdr.unpack_from(buf, off)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break  # zero padding after the last note (kexec's per-CPU note buffers)
        name_off = off + Elf64_Nhdr.size
        desc_off = name_off + _align(namesz, align)
        if desc_off + descsz > len(buf):
            if problem:
                problem(
                    f"note at offset {off:#x} (namesz {namesz}, descsz {descsz}) runs past "
                    "the end of its segment"
                )
            break
        if len(notes) >= MAX_NOTES:
            if problem:
                problem(f"more than {MAX_NOTES} notes; the rest are ignored")
            break
        name = buf[name_off : name_off + namesz].split(b"\0", 1)[0].decode("ascii", "replace")
        notes.append(ElfNote(name, ntype, buf[desc_off : desc_off + descsz]))
        off = desc_off + _align(descsz, align)
    return notes


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


class ElfCore:
    """A :class:`~collector.memory.PhysicalMemory` over an ELF64 little-endian core file.

    Physical reads use the PT_LOAD segments' ``p_paddr``. Each address has one fate:
    READ where the file holds the bytes; NOT_COVERED in the tail of a segment beyond
    ``p_filesz`` (the producer described the memory but stored nothing: QEMU does this for
    regions it does not dump, makedumpfile for pages it filters); MISSING where the file was
    cut before the end of ``p_filesz``; OUTSIDE elsewhere. Fates are exact to the byte.

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
        name, size = self._file.name, self._file.size
        head = self._file.read_at(0, Elf64_Ehdr.size)
        if head[:4] != ELFMAG:
            raise ImageError(f"{name}: not an ELF file")
        if len(head) < Elf64_Ehdr.size:
            raise ImageError(f"{name}: {size} bytes, too short for an ELF header")
        (ident, e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize,
         e_phentsize, e_phnum, e_shentsize, _shnum, _shstrndx) = Elf64_Ehdr.unpack(head)  # fmt: skip
        if ident[4] != ELFCLASS64:
            raise ImageError(f"{name}: only 64-bit ELF cores are supported (EI_CLASS {ident[4]})")
        if ident[5] != ELFDATA2LSB:
            raise ImageError(
                f"{name}: only little-endian ELF cores are supported (EI_DATA {ident[5]})"
            )
        if e_type != ET_CORE:
            raise ImageError(f"{name}: not an ELF core file (e_type {e_type})")
        self.e_machine = e_machine
        phnum = e_phnum
        if e_phnum == PN_XNUM:
            # More than 0xfffe headers: the real count is in section header 0's sh_info.
            if e_shentsize < Elf64_Shdr.size or e_shoff + Elf64_Shdr.size > size:
                raise ImageError(
                    f"{name}: e_phnum is PN_XNUM but section header 0 is not in the file"
                )
            phnum = Elf64_Shdr.unpack(self._file.read_at(e_shoff, Elf64_Shdr.size))[7]
        if phnum == 0:
            raise ImageError(f"{name}: ELF core without program headers")
        if phnum > MAX_PHNUM:
            raise ImageError(f"{name}: claims {phnum} program headers (more than {MAX_PHNUM})")
        if e_phentsize < Elf64_Phdr.size:
            raise ImageError(
                f"{name}: program header size {e_phentsize} is below {Elf64_Phdr.size}"
            )
        table_size = phnum * e_phentsize
        if table_size > MAX_PHDR_TABLE:
            raise ImageError(f"{name}: program header table of {table_size} bytes is too large")
        if e_phoff + table_size > size:
            raise ImageError(
                f"{name}: program header table ({phnum} entries at {e_phoff:#x}) runs past the "
                f"end of the file ({size:#x} bytes)"
            )
        table = self._file.read_at(e_phoff, table_size)
        for i in range(phnum):
            p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = (
                Elf64_Phdr.unpack_from(table, i * e_phentsize)
            )
            if p_type == PT_LOAD:
                self._add_load(i, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz)
            elif p_type == PT_NOTE:
                self._add_notes(i, p_offset, p_filesz, p_align)
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
        self.metadata = {
            "format": "elf-core",
            "e_machine": self.e_machine,
            "segments": len(self.segments),
            "notes": sorted({n.name for n in self.notes}),
        }
        if self.direct_map_base is not None:
            self.metadata["direct_map_base"] = self.direct_map_base

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
        if size < 0:
            raise ValueError(f"negative read size {size}")
        out = bytearray()
        while size > 0:
            piece = self._locate(pieces, starts, addr)
            if piece is None:
                raise missing(addr, Fate.OUTSIDE)
            fate = self._fate_in(piece, addr)
            if fate != Fate.READ:
                raise missing(addr, fate)
            n = min(size, piece.end - addr, piece.base + piece.seg.present - addr)
            data = self._file.read_at(piece.seg.offset + addr - piece.base, n)
            if len(data) != n:
                raise ImageError(f"{self._file.name}: file shrank while reading {addr:#x}")
            out += data
            addr += n
            size -= n
        return bytes(out)

    def ranges(self) -> list[tuple[int, int]]:
        """Physical ranges as ``(start, end)``, end exclusive, one per segment piece."""
        return [(p.start, p.end) for p in self._phys]

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
        return PageFate(Fate.OUTSIDE if piece is None else self._fate_in(piece, paddr))

    def read(self, paddr: int, size: int) -> bytes:
        return self._read(self._phys, self._phys_starts, paddr, size, PageNotCaptured)

    def virtual_ranges(self) -> list[tuple[int, int]]:
        """Virtual ranges as ``(start, end)``, end exclusive."""
        return [(p.start, p.end) for p in self._virt]

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """Read by ``p_vaddr``; bytes the core lacks raise :class:`VirtualPageNotCaptured`."""
        return self._read(self._virt, self._virt_starts, vaddr, size, VirtualPageNotCaptured)

    def blob(self, name: str) -> bytes | None:
        """``vmcoreinfo``: the VMCOREINFO note's text, without trailing NULs; else None."""
        if name == "vmcoreinfo":
            for note in self.notes:
                if note.name == VMCOREINFO_NOTE_NAME:
                    return note.desc.rstrip(b"\0")
        return None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ElfCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
