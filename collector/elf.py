"""ELF64 structures and bounded parsing shared by kcore, ELF cores and VMCOREINFO notes.

Every size and offset read from the bytes is checked before it is used: cores are untrusted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from collector.errors import ImageError

# include/uapi/linux/elf.h
ELFMAG = b"\x7fELF"
EI_CLASS = 4
EI_DATA = 5
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELFDATA2MSB = 2
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
#: e_phnum of a file with 0xffff or more program headers: the count is in section header
#: 0's sh_info.
PN_XNUM = 0xFFFF
VMCOREINFO_NOTE_NAME = "VMCOREINFO"
#: The owner of the notes `collect export --to elf` adds (docs/interop/exports.md): the
#: image's BTF and kallsyms as the kernel printed them, and the pages it did not read.
COLLECTOR_NOTE_NAME = "COLLECTOR"
#: Types far from the small numbers core files use (1 is NT_PRSTATUS, which tools may take
#: from a note of any owner): "COL" and a serial number.
NT_COLLECTOR_BTF = 0x434F4C01
NT_COLLECTOR_KALLSYMS = 0x434F4C02
NT_COLLECTOR_PAGE_FATES = 0x434F4C03
#: The page-fates note: u32 version (1), u32 page size, then one record per run of pages
#: not read: u64 physical address of the first page, u64 page count, u32 fate (the image
#: format's value), i32 errno.
PAGE_FATES_HEAD = struct.Struct("<II")
PAGE_FATES_RECORD = struct.Struct("<QQIi")
#: kcore sets p_paddr to this for segments with no physical address (vmalloc, modules, vmemmap).
NO_PADDR = 0xFFFFFFFFFFFFFFFF

_EHDR = "16sHHIQQQIHHHHHH"
_PHDR = "IIQQQQQQ"  # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
_SHDR = "IIQQQQIIQQ"
_NHDR = "III"  # n_namesz n_descsz n_type
Elf64_Ehdr = struct.Struct("<" + _EHDR)  # 64 bytes
Elf64_Phdr = struct.Struct("<" + _PHDR)  # 56 bytes
Elf64_Shdr = struct.Struct("<" + _SHDR)  # 64 bytes
Elf64_Nhdr = struct.Struct("<" + _NHDR)  # 12 bytes
_BY_ENDIAN = {
    "<": (Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr, Elf64_Nhdr),
    ">": tuple(struct.Struct(">" + f) for f in (_EHDR, _PHDR, _SHDR, _NHDR)),
}

#: Far more program headers than any real core has; a header claiming more is hostile.
MAX_PHNUM = 1 << 20
MAX_PHDR_TABLE = 64 << 20
MAX_NOTES = 1 << 16


class ElfError(ImageError):
    """Bytes that are not a usable ELF64 file. The message names no file: callers add it."""


@dataclass(frozen=True)
class ElfHeader:
    """``Elf64_Ehdr``, with ``endian`` (``<`` or ``>``) for unpacking what follows it."""

    endian: str
    e_ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_ehsize: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int


@dataclass(frozen=True, slots=True)
class ProgramHeader:
    """``Elf64_Phdr``."""

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass(frozen=True)
class PhdrLimits:
    """What a reader of program headers accepts beyond what every ELF64 file must satisfy.

    :param pn_xnum: follow ``e_phnum == PN_XNUM`` to section header 0's ``sh_info``; when
        False such a header is refused.
    :param exact_phentsize: ``e_phentsize`` must be 56; when False any size from 56 up is
        accepted and the entries are read with that stride.
    :param max_phnum: the most program headers accepted.
    :param max_table: the largest table accepted, in bytes. When the file's size is not
        known, the table must also lie after the ELF header and within this many bytes of
        the start of the file.
    """

    pn_xnum: bool = False
    exact_phentsize: bool = True
    max_phnum: int = MAX_PHNUM
    max_table: int = MAX_PHDR_TABLE


class ElfNote(NamedTuple):
    """One ELF note: its name without the NUL, its type and its descriptor bytes."""

    name: str
    type: int
    desc: bytes


def parse_elf_header(data: bytes, big_endian: bool = False) -> ElfHeader:
    """Parse the ELF header at the start of ``data``: an ELF64 file, little-endian unless
    ``big_endian`` allows both byte orders.

    :raises ElfError: no ELF magic, too short, not 64-bit, or a byte order not accepted.
    """
    if data[:4] != ELFMAG:
        raise ElfError("not an ELF file (no ELF magic)")
    if len(data) < Elf64_Ehdr.size:
        raise ElfError(f"{len(data)} bytes, too short for an ELF header")
    ei_class, ei_data = data[EI_CLASS], data[EI_DATA]
    if ei_class != ELFCLASS64:
        raise ElfError(
            f"only 64-bit ELF cores are supported (EI_CLASS {ei_class} is not ELFCLASS64)"
        )
    if big_endian:
        if ei_data not in (ELFDATA2LSB, ELFDATA2MSB):
            raise ElfError(f"EI_DATA {ei_data} is neither little- nor big-endian")
    elif ei_data != ELFDATA2LSB:
        raise ElfError(f"only little-endian ELF cores are supported (EI_DATA {ei_data})")
    endian = "<" if ei_data == ELFDATA2LSB else ">"
    return ElfHeader(endian, *_BY_ENDIAN[endian][0].unpack_from(data))


def parse_program_headers(
    source: bytes | Callable[[int, int], bytes],
    header: ElfHeader,
    limits: PhdrLimits,
    size: int | None = None,
) -> list[ProgramHeader]:
    """Read and check the program header table that ``header`` describes.

    :param source: the file's bytes from offset 0, or ``read(offset, size)`` returning the
        file's bytes there (errors it raises pass through unchanged).
    :param size: the file's size when ``source`` is a reader; None when it is not known
        (/proc/kcore's size is that of the kernel's address space, not of its headers).
    :raises ElfError: the table is not where the header says, or is larger than ``limits``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = source
        size = len(data)

        def read(offset: int, n: int) -> bytes:
            return bytes(data[offset : offset + n])

    else:
        read = source
    _ehdr, phdr, shdr, _nhdr = _BY_ENDIAN[header.endian]
    entsize = header.e_phentsize
    if limits.exact_phentsize and entsize != phdr.size:
        raise ElfError(f"e_phentsize {entsize} is not {phdr.size}")
    if entsize < phdr.size:
        raise ElfError(f"program header size {entsize} is below {phdr.size}")
    phnum = header.e_phnum
    if phnum == PN_XNUM:
        if not limits.pn_xnum:
            raise ElfError(f"e_phnum {phnum} is not a program header count")
        end = size if size is not None else limits.max_table
        if header.e_shentsize < shdr.size or header.e_shoff + shdr.size > end:
            raise ElfError("e_phnum is PN_XNUM but section header 0 is not in the file")
        sh0 = read(header.e_shoff, shdr.size)
        if len(sh0) < shdr.size:
            raise ElfError("e_phnum is PN_XNUM but section header 0 is cut short")
        phnum = shdr.unpack(sh0)[7]  # sh_info
    if phnum == 0:
        how = "e_phnum 0" if header.e_phnum == 0 else "PN_XNUM with sh_info 0"
        raise ElfError(f"ELF core without program headers ({how})")
    if phnum > limits.max_phnum:
        raise ElfError(f"claims {phnum} program headers (more than {limits.max_phnum})")
    table_size = phnum * entsize
    phoff = header.e_phoff
    if size is None:
        if phoff < Elf64_Ehdr.size or phoff + table_size > limits.max_table:
            raise ElfError(f"program headers at {phoff:#x} are out of bounds")
    else:
        if table_size > limits.max_table:
            raise ElfError(f"program header table of {table_size} bytes is too large")
        if phoff + table_size > size:
            raise ElfError(
                f"program header table ({phnum} entries at {phoff:#x}) is cut short: it runs "
                f"past the end of the file ({size:#x} bytes)"
            )
    table = read(phoff, table_size)[:table_size]
    if len(table) < table_size:
        raise ElfError(
            f"program header table is cut short: {len(table)} of {table_size} bytes read"
        )
    if entsize == phdr.size:
        return [ProgramHeader(*fields) for fields in phdr.iter_unpack(table)]
    return [ProgramHeader(*phdr.unpack_from(table, i * entsize)) for i in range(phnum)]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def iter_notes(
    buf: bytes,
    align: int = 4,
    problem: Callable[[str], None] | None = None,
    *,
    endian: str = "<",
) -> Iterator[ElfNote]:
    """Yield the notes of a PT_NOTE segment's bytes one by one, bounds-checking every size.

    Each note takes at least 12 bytes, so there are at most ``len(buf) // 12``. All-zero
    padding after the last note ends the walk. A note running past the end of ``buf`` ends
    it too, and is reported through ``problem`` (which may raise).
    """
    nhdr = _BY_ENDIAN[endian][3]
    off = 0
    while off + nhdr.size <= len(buf):
        namesz, descsz, ntype = nhdr.unpack_from(buf, off)
        if namesz == 0 and descsz == 0 and ntype == 0:
            # final_note() ends kexec's per-CPU note buffers with an all-zero header.
            return
        name_off = off + nhdr.size
        desc_off = name_off + _align(namesz, align)
        if desc_off + descsz > len(buf):
            if problem:
                problem(
                    f"note at offset {off:#x} (namesz {namesz}, descsz {descsz}) runs past "
                    "the end of its segment"
                )
            return
        name = buf[name_off : name_off + namesz].split(b"\0", 1)[0].decode("ascii", "replace")
        yield ElfNote(name, ntype, bytes(buf[desc_off : desc_off + descsz]))
        off = desc_off + _align(descsz, align)


def parse_notes(
    buf: bytes,
    align: int = 4,
    problem: Callable[[str], None] | None = None,
    *,
    endian: str = "<",
) -> list[ElfNote]:
    """Parse a PT_NOTE segment's bytes into at most :data:`MAX_NOTES` notes.

    Linux pads names and descriptors to 4 bytes in ELF64 cores too (fs/proc/kcore.c,
    kernel/crash_core.c append_elf_note); ``align`` is 8 only for segments with p_align 8.
    A note running past the end, or one note too many, stops parsing and is reported through
    ``problem``.
    """
    notes: list[ElfNote] = []
    for note in iter_notes(buf, align, problem, endian=endian):
        if len(notes) >= MAX_NOTES:
            if problem:
                problem(f"more than {MAX_NOTES} notes; the rest are ignored")
            break
        notes.append(note)
    return notes


def find_note(notes: Iterable[ElfNote], name: str, type: int | None = None) -> ElfNote | None:
    """The first note called ``name`` (of type ``type`` when given), or None.

    Given :func:`iter_notes`, it stops reading at the match.
    """
    for note in notes:
        if note.name == name and (type is None or note.type == type):
            return note
    return None


def vmcoreinfo_from_note_bytes(data: bytes) -> bytes | None:
    """The descriptor of the ELF note at the start of ``data`` if it is ``VMCOREINFO`` (as at
    the address /sys/kernel/vmcoreinfo gives), else None. Trailing NULs are kept."""
    note = next(iter_notes(data), None)
    if note is None or note.name != VMCOREINFO_NOTE_NAME:
        return None
    return note.desc
