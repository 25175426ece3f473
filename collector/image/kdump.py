"""makedumpfile's compressed dumps (``kdump-compressed``, the "KDUMP   " diskdump layout) as
physical memory: what kdump-tools and kexec-tools save by default (``makedumpfile -c -d 31``).

The layout (makedumpfile's diskdump_mod.h; crash's diskdump.c reads the same), for a 64-bit
little-endian machine, in blocks of ``block_size`` bytes (the page size):

- block 0: ``struct disk_dump_header`` ("KDUMP   ", header_version, utsname, status with the
  compression of the whole dump and DUMP_DH_COMPRESSED_INCOMPLETE, block_size, sub_hdr_size,
  bitmap_blocks, max_mapnr);
- block 1: ``struct kdump_sub_header`` (phys_base, dump_level, split, the offsets and sizes of
  the VMCOREINFO text (version 3+) and of the ELF notes (version 4+), max_mapnr_64 (6+)),
  followed by the notes and VMCOREINFO themselves, ``sub_hdr_size`` blocks in all;
- ``bitmap_blocks`` blocks: the 1st bitmap (a bit per page frame: the page is memory the
  dumped kernel had) then the 2nd (the page is in the dump), each half of the blocks, bit
  ``pfn & 7`` of byte ``pfn >> 3``;
- a ``page_desc`` (offset, size, flags, page_flags: 24 bytes) per page set in the 2nd bitmap,
  in PFN order;
- the pages' data, each compressed alone (flags: zlib 0x1, lzo 0x2, snappy 0x4, zstd 0x20) or
  stored whole (``size == block_size``, no flag).

A page in the 1st bitmap but not the 2nd was dropped by the dump level (zero, cache, user or
free pages): its fate is EXCLUDED, never zeros. A page whose descriptor or data lies beyond
the end of the file (a dump cut short, status DUMP_DH_COMPRESSED_INCOMPLETE) is MISSING.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from collector.elf import VMCOREINFO_NOTE_NAME, find_note, parse_notes
from collector.errors import ImageCorrupted, ImageTruncated, UnsupportedImage
from collector.image.raw import FileImage, RawFile
from collector.memory import Fate, FateRun, PageFate, PageNotCaptured

KDUMP_SIGNATURE = b"KDUMP   "
DISKDUMP_SIGNATURE = b"DISKDUMP"
#: makedumpfile -F writes this "flattened" stream for pipes; makedumpfile -R turns it back.
FLATTENED_SIGNATURE = b"makedumpfile"

# struct disk_dump_header: signature, header_version, utsname (6 x 65), padding to the
# 8-byte timeval, timestamp, status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr,
# total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")  # 464 bytes
# struct kdump_sub_header: phys_base, dump_level, split, start_pfn, end_pfn,
# offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note, offset_eraseinfo,
# size_eraseinfo, start_pfn_64, end_pfn_64, max_mapnr_64.
KDUMP_SUB_HEADER = struct.Struct("<QiiQQqQqQqQQQQ")  # 104 bytes
PAGE_DESC = struct.Struct("<qIIQ")  # offset, size, flags, page_flags: 24 bytes

# disk_dump_header.status and page_desc.flags
DUMP_DH_COMPRESSED_ZLIB = 0x1
DUMP_DH_COMPRESSED_LZO = 0x2
DUMP_DH_COMPRESSED_SNAPPY = 0x4
DUMP_DH_COMPRESSED_INCOMPLETE = 0x8
DUMP_DH_EXCLUDED_VMEMMAP = 0x10
DUMP_DH_COMPRESSED_ZSTD = 0x20
COMPRESSIONS = {
    DUMP_DH_COMPRESSED_ZLIB: "zlib",
    DUMP_DH_COMPRESSED_LZO: "lzo",
    DUMP_DH_COMPRESSED_SNAPPY: "snappy",
    DUMP_DH_COMPRESSED_ZSTD: "zstd",
}
_ANY_COMPRESSION = sum(COMPRESSIONS)
SUPPORTED = ("zlib", "zstd")

#: More page frames than a machine with 64 TiB of 4 KiB pages has (a 4 GiB bitmap pair).
MAX_MAPNR = 1 << 34
MAX_NOTE_BYTES = 16 << 20
MAX_VMCOREINFO = 1 << 20
#: Decompressed pages kept, most recently used first.
CACHE_PAGES = 512
#: Bits of the 2nd bitmap per entry of the rank table (a descriptor index per 4096 pages).
_RANK_BITS = 4096
#: Set bits of each byte value (for the rank table), and numpy itself, loaded on first use:
#: every command opens images through this module's signatures, and most never read a dump.
_POPCOUNT = [bin(i).count("1") for i in range(256)]


@dataclass(frozen=True)
class KdumpHeader:
    """What the reader takes from ``disk_dump_header`` and ``kdump_sub_header``."""

    header_version: int
    release: str
    nodename: str
    machine: str
    status: int
    block_size: int
    sub_hdr_size: int
    bitmap_blocks: int
    max_mapnr: int
    phys_base: int
    dump_level: int
    split: bool
    offset_vmcoreinfo: int
    size_vmcoreinfo: int
    offset_note: int
    size_note: int


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _bit_runs(bitmap: bytes) -> Iterator[tuple[int, int]]:
    """Runs of set bits (bit ``i & 7`` of byte ``i >> 3``) as ``(first, end)``, end exclusive."""
    import numpy as np

    chunk = 1 << 20
    open_at: int | None = None
    for base in range(0, len(bitmap), chunk):
        bits = np.unpackbits(
            np.frombuffer(bitmap[base : base + chunk], dtype=np.uint8), bitorder="little"
        )
        prev = 0 if open_at is None else 1
        # Changes alternate, starting with a rise when no run is open here and a fall else.
        for pos in np.flatnonzero(np.diff(bits.astype(np.int8), prepend=prev)).tolist():
            if open_at is None:
                open_at = base * 8 + pos
            else:
                yield open_at, base * 8 + pos
                open_at = None
    if open_at is not None:
        yield open_at, len(bitmap) * 8


def _popcount(data: bytes) -> int:
    return int.from_bytes(data, "little").bit_count()


class KdumpImage(FileImage):
    """A :class:`~collector.memory.PhysicalMemory` over a kdump-compressed file.

    :param source: a path, or a seekable binary file object (left open by :meth:`close`).
    :raises ImageError: the file is no kdump-compressed dump (or one of a kind not read here:
        another byte order, a split dump, a flattened stream, pages compressed with lzo or
        snappy), or its headers are cut short or contradict the file.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO) -> None:
        self._file = RawFile(source)
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    # -- parsing ------------------------------------------------------------------------------

    def _need(self, offset: int, size: int, what: str) -> bytes:
        data = self._file.read_at(offset, size)
        if len(data) < size:
            raise ImageTruncated(
                self._file.name,
                f"the file ends at byte {self._file.size} inside the {what} "
                f"(bytes {offset:#x}-{offset + size - 1:#x})",
            )
        return data

    def _parse(self) -> None:
        name = self._file.name
        head = self._file.read_at(0, DISK_DUMP_HEADER.size)
        if head.startswith(FLATTENED_SIGNATURE):
            raise UnsupportedImage(
                name,
                "a flattened makedumpfile stream (makedumpfile -F); "
                "`makedumpfile -R FILE < STREAM` turns it into a kdump-compressed file",
            )
        if head[:8] == DISKDUMP_SIGNATURE:
            raise UnsupportedImage(name, "a DISKDUMP dump of the old diskdump driver")
        if head[:8] != KDUMP_SIGNATURE:
            raise ImageCorrupted(name, "no KDUMP signature")
        head = self._need(0, DISK_DUMP_HEADER.size, "disk_dump_header")
        (
            _sig, version, uts, _sec, _usec, status, block_size, sub_hdr_size, bitmap_blocks,
            max_mapnr32, *_rest,
        ) = DISK_DUMP_HEADER.unpack(head)  # fmt: skip
        if version <= 0 or version > 1 << 16:
            raise UnsupportedImage(
                name, f"kdump header_version {version} (another byte order or a damaged header)"
            )
        if not (512 <= block_size <= 1 << 20) or block_size & (block_size - 1):
            raise ImageCorrupted(name, f"block_size {block_size} is not a page size")
        if sub_hdr_size < 1 or bitmap_blocks < 2 or bitmap_blocks % 2:
            raise ImageCorrupted(
                name, f"sub_hdr_size {sub_hdr_size} or bitmap_blocks {bitmap_blocks} is impossible"
            )
        sub = KDUMP_SUB_HEADER.unpack(self._need(block_size, KDUMP_SUB_HEADER.size, "sub header"))
        (phys_base, dump_level, split, _sp, _ep, off_vi, size_vi, off_note, size_note,
         _oe, _se, _sp64, _ep64, max_mapnr64) = sub  # fmt: skip
        max_mapnr = max_mapnr64 if version >= 6 else max_mapnr32
        self.header = KdumpHeader(
            header_version=version,
            # utsname: sysname, nodename, release, version, machine, domainname (65 each).
            release=_text(uts[130:195]),
            nodename=_text(uts[65:130]),
            machine=_text(uts[260:325]),
            status=status,
            block_size=block_size,
            sub_hdr_size=sub_hdr_size,
            bitmap_blocks=bitmap_blocks,
            max_mapnr=max_mapnr,
            phys_base=phys_base,
            dump_level=dump_level if version >= 1 else -1,
            split=bool(split) if version >= 2 else False,
            offset_vmcoreinfo=off_vi if version >= 3 else 0,
            size_vmcoreinfo=size_vi if version >= 3 else 0,
            offset_note=off_note if version >= 4 else 0,
            size_note=size_note if version >= 4 else 0,
        )
        if self.header.split:
            raise UnsupportedImage(
                name,
                "one part of a split dump (makedumpfile --split); "
                "`makedumpfile --reassemble` joins the parts into one file",
            )
        for flag, label in COMPRESSIONS.items():
            if status & flag and label not in SUPPORTED:
                raise UnsupportedImage(
                    name,
                    f"kdump-compressed pages compressed with {label}, which is not read here "
                    f"(read: {', '.join(SUPPORTED)}; makedumpfile -c writes zlib, -z zstd)",
                )
        if max_mapnr > MAX_MAPNR:
            raise ImageCorrupted(name, f"max_mapnr {max_mapnr} is more page frames than RAM has")
        self.page_size = block_size
        half = bitmap_blocks * block_size // 2
        if max_mapnr > half * 8:
            raise ImageCorrupted(
                name, f"max_mapnr {max_mapnr} needs more bits than the bitmaps' {half * 8}"
            )
        self.max_mapnr = max_mapnr
        bitmap_off = (1 + sub_hdr_size) * block_size
        nbytes = (max_mapnr + 7) // 8
        self._bitmap1 = self._need(bitmap_off, nbytes, "1st bitmap")
        self._bitmap2 = self._need(bitmap_off + half, nbytes, "2nd bitmap")
        # Bits past max_mapnr in the last byte are not pages.
        if max_mapnr % 8:
            keep = (1 << (max_mapnr % 8)) - 1
            self._bitmap1 = self._bitmap1[:-1] + bytes([self._bitmap1[-1] & keep])
            self._bitmap2 = self._bitmap2[:-1] + bytes([self._bitmap2[-1] & keep])
        self._desc_off = bitmap_off + bitmap_blocks * block_size
        self._build_rank()
        self._ranges = self._runs(self._bitmap1)
        self._starts = [s for s, _ in self._ranges]
        self.dumped_pages = self._rank[-1]
        if self.dumped_pages and self._desc_off + self.dumped_pages * PAGE_DESC.size > (
            self._file.size
        ):
            self.problems.append(
                f"the page descriptors end past the end of the file ({self._file.size} bytes): "
                "pages whose descriptor is not there are missing"
            )
        if status & DUMP_DH_COMPRESSED_INCOMPLETE:
            self.problems.append(
                "makedumpfile marked the dump incomplete (DUMP_DH_COMPRESSED_INCOMPLETE: it "
                "stopped writing, e.g. on a full disk); pages it did not write are missing"
            )
        self.metadata = {
            "format": "kdump-compressed",
            "header_version": version,
            "dump_level": self.header.dump_level,
            "release": self.header.release,
            "nodename": self.header.nodename,
            "machine": self.header.machine,
            "phys_base": phys_base,
            "compression": [label for flag, label in COMPRESSIONS.items() if status & flag],
            "page_size": block_size,
        }
        self._notes = self._read_notes()

    def _build_rank(self) -> None:
        """``_rank[i]``: descriptors before page frame ``i * _RANK_BITS`` (last: the total)."""
        import numpy as np

        step = _RANK_BITS // 8
        counts = [0]
        total = 0
        chunk = step << 12  # 2 MiB of bitmap at a time: no copy of a large bitmap at once
        for base in range(0, len(self._bitmap2), chunk):
            part = np.frombuffer(self._bitmap2[base : base + chunk], dtype=np.uint8)
            part = np.concatenate([part, np.zeros((-len(part)) % step, np.uint8)])
            per_block = (
                np.array(_POPCOUNT, dtype=np.uint8)[part]
                .reshape(-1, step)
                .sum(axis=1, dtype=np.int64)
            )
            for n in np.cumsum(per_block).tolist():
                counts.append(total + n)
            total = counts[-1]
        self._rank = counts

    def _runs(self, bitmap: bytes) -> list[tuple[int, int]]:
        """Runs of set bits as physical ``(start, end)``, end exclusive."""
        return [(s * self.page_size, e * self.page_size) for s, e in _bit_runs(bitmap)]

    def _read_notes(self) -> list:
        h = self.header
        if not (h.offset_note and h.size_note):
            return []
        if h.size_note > MAX_NOTE_BYTES:
            self.problems.append(f"the notes claim {h.size_note} bytes; ignored")
            return []
        buf = self._file.read_at(h.offset_note, h.size_note)
        if len(buf) < h.size_note:
            self.problems.append("the ELF notes are cut short by the end of the file")
        return parse_notes(buf, 4, lambda m: self.problems.append(f"notes: {m}"))

    # -- bitmaps and descriptors --------------------------------------------------------------

    @staticmethod
    def _bit(bitmap: bytes, pfn: int) -> bool:
        return 0 <= pfn < len(bitmap) * 8 and bool(bitmap[pfn >> 3] >> (pfn & 7) & 1)

    def _index(self, pfn: int) -> int:
        """The descriptor index of a page set in the 2nd bitmap: the set bits before it."""
        block = pfn // _RANK_BITS
        lo = block * (_RANK_BITS // 8)
        byte = pfn >> 3
        partial = self._bitmap2[byte] & ((1 << (pfn & 7)) - 1)
        return self._rank[block] + _popcount(self._bitmap2[lo:byte]) + partial.bit_count()

    def _desc(self, pfn: int) -> tuple[int, int, int] | None:
        """``(offset, size, flags)`` of a dumped page, or None when the file lacks it."""
        raw = self._file.read_at(self._desc_off + self._index(pfn) * PAGE_DESC.size, 24)
        if len(raw) < PAGE_DESC.size:
            return None
        offset, size, flags, _page_flags = PAGE_DESC.unpack(raw)
        if offset <= 0 or size == 0 or offset + size > self._file.size:
            # makedumpfile leaves the descriptors of pages it never wrote zero.
            return None
        return offset, size, flags

    def _fate_of(self, pfn: int) -> Fate:
        if not self._bit(self._bitmap1, pfn):
            return Fate.OUTSIDE
        if not self._bit(self._bitmap2, pfn):
            return Fate.EXCLUDED
        return Fate.READ if self._desc(pfn) is not None else Fate.MISSING

    def _page(self, pfn: int) -> bytes:
        with self._lock:
            data = self._cache.get(pfn)
            if data is not None:
                self._cache.move_to_end(pfn)
                return data
        fate = Fate.READ
        if not self._bit(self._bitmap1, pfn):
            fate = Fate.OUTSIDE
        elif not self._bit(self._bitmap2, pfn):
            fate = Fate.EXCLUDED
        desc = self._desc(pfn) if fate == Fate.READ else None
        if desc is None:
            raise PageNotCaptured(pfn * self.page_size, Fate.MISSING if fate == Fate.READ else fate)
        data = self._decode(pfn, *desc)
        with self._lock:
            self._cache[pfn] = data
            if len(self._cache) > CACHE_PAGES:
                self._cache.popitem(last=False)
        return data

    def _decode(self, pfn: int, offset: int, size: int, flags: int) -> bytes:
        name, page = self._file.name, self.page_size
        where = f"page frame {pfn:#x} (data at {offset:#x})"
        if size > page + (page >> 3) + 1024:
            raise ImageCorrupted(name, f"{where}: {size} bytes for one page")
        raw = self._file.read_at(offset, size)
        kind = flags & _ANY_COMPRESSION
        try:
            if kind == 0:
                if size != page:
                    raise ImageCorrupted(name, f"{where}: {size} bytes stored, not a whole page")
                return raw
            if kind == DUMP_DH_COMPRESSED_ZLIB:
                d = zlib.decompressobj()
                data = d.decompress(raw, page)
                if d.unconsumed_tail or not d.eof:
                    raise ImageCorrupted(name, f"{where}: zlib data is not one page")
            elif kind == DUMP_DH_COMPRESSED_ZSTD:
                data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=page)
            else:
                label = COMPRESSIONS.get(kind, f"flags {flags:#x}")
                raise UnsupportedImage(
                    name,
                    f"{where} is compressed with {label}, which is not read here "
                    f"(read: {', '.join(SUPPORTED)})",
                )
        except (zlib.error, zstandard.ZstdError) as e:
            raise ImageCorrupted(name, f"{where}: {e}") from None
        if len(data) != page:
            raise ImageCorrupted(name, f"{where}: decompresses to {len(data)} bytes, not {page}")
        return data

    # -- PhysicalMemory -----------------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """The runs of the 1st bitmap: the memory the dumped kernel had."""
        return list(self._ranges)

    def captured_ranges(self) -> list[tuple[int, int]]:
        """Every page of :meth:`ranges` has a recorded fate (read, excluded or missing)."""
        return list(self._ranges)

    def fate(self, paddr: int) -> PageFate:
        return PageFate(self._fate_of(paddr // self.page_size))

    def read(self, paddr: int, size: int) -> bytes:
        if size < 0:
            raise ValueError(f"negative read size {size}")
        page = self.page_size
        out = bytearray()
        while size > 0:
            pfn, skip = divmod(paddr, page)
            try:
                data = self._page(pfn)
            except PageNotCaptured as e:
                raise PageNotCaptured(paddr, e.fate) from None
            n = min(size, page - skip)
            out += data[skip : skip + n]
            paddr += n
            size -= n
        return bytes(out)

    def fate_runs(self) -> Iterator[FateRun]:
        """Runs of pages inside :meth:`ranges` that are not READ: EXCLUDED, and MISSING
        where the dump was cut short, in address order."""
        import numpy as np

        page = self.page_size
        b1 = np.frombuffer(self._bitmap1, dtype=np.uint8)
        b2 = np.frombuffer(self._bitmap2, dtype=np.uint8)
        excluded = list(_bit_runs((b1 & ~b2).tobytes()))
        missing: list[tuple[int, int]] = []
        if self.problems:  # only a cut or incomplete dump has pages without data
            for first, end in _bit_runs(self._bitmap2):
                for pfn in range(first, end):
                    if self._desc(pfn) is None:
                        if missing and missing[-1][1] == pfn:
                            missing[-1] = (missing[-1][0], pfn + 1)
                        else:
                            missing.append((pfn, pfn + 1))
        runs = [(s, e, Fate.EXCLUDED) for s, e in excluded] + [
            (s, e, Fate.MISSING) for s, e in missing
        ]
        for first, end, fate in sorted(runs):
            yield FateRun(first * page, end - first, fate)

    def blob(self, name: str) -> bytes | None:
        """``vmcoreinfo``: the VMCOREINFO text the dump carries; else None."""
        if name != "vmcoreinfo":
            return None
        h = self.header
        if h.offset_vmcoreinfo and 0 < h.size_vmcoreinfo <= MAX_VMCOREINFO:
            data = self._file.read_at(h.offset_vmcoreinfo, h.size_vmcoreinfo)
            if len(data) == h.size_vmcoreinfo:
                return data.rstrip(b"\0")
        note = find_note(self._notes, VMCOREINFO_NOTE_NAME)
        return None if note is None else note.desc.rstrip(b"\0")
