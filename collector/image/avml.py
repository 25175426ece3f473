"""AVML memory images: LiME's range headers with snappy-compressed ranges.

AVML (Microsoft's Linux acquisition tool, src/image.rs) writes, per range, LiME's 32-byte
header with magic ``AVML`` (0x4C4D5641) and version 2, then the range's bytes as one snappy
*framed* stream (github.com/google/snappy framing_format.txt: chunks of a one-byte type and
a three-byte length; compressed and uncompressed chunks carry a masked CRC-32C and at most
64 KiB of data), then the stream's length in bytes as a u64. Ranges are cut at 16 MiB, and a
range of at most 16 MiB that is all zeros is left out: such RAM is a gap between ranges here.
AVML reads version 1 (plain LiME) headers too, so a file may mix both.

Opening walks the chunk headers (a few bytes read per 64 KiB of memory) and keeps where
each chunk starts; reads decompress only the chunks they touch, with a small cache. The
snappy decoder is cramjam's (the optional ``avml`` extra), which checks every chunk's CRC.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

from collector.errors import ImageError, ImageTruncated, NotAnImage
from collector.image.lime import (
    LIME_HEADER,
    LIME_HEADER_SIZE,
    LIME_MAGIC,
    LIME_VERSION,
    MAX_PROBLEMS,
    MAX_RANGES,
)
from collector.image.raw import FileImage, RawFile
from collector.memory import Fate, PageFate, PageNotCaptured

AVML_MAGIC = 0x4C4D5641
AVML_VERSION = 2
AVML_MAGIC_BYTES = struct.pack("<I", AVML_MAGIC)  # b"AVML"

#: framing_format.txt: "the uncompressed data in a chunk must be no longer than 65536 bytes".
MAX_CHUNK_DATA = 65536
#: snappy's MaxCompressedLength(65536) (32 + n + n/6): no compressor writes a longer block.
MAX_COMPRESSED = 32 + MAX_CHUNK_DATA + MAX_CHUNK_DATA // 6
STREAM_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"
CHUNK_COMPRESSED = 0x00
CHUNK_UNCOMPRESSED = 0x01
CHUNK_PADDING = 0xFE
#: Non-data chunks (stream identifiers, padding, skippable chunks) allowed per range: a
#: writer emits one identifier; more is a file built to make opening slow.
MAX_OTHER_CHUNKS = 64
#: Decompressed chunks kept for the next read (64 KiB each).
CACHE_CHUNKS = 64
#: How much of the file is read at a time while walking chunk headers: one read per 64 KiB
#: chunk, and many small chunks per read.
_WINDOW = 4096

# Kinds of the pieces a range is cut into, as stored in the index.
_RAW, _SNAPPY, _PLAIN = 0, 1, 2


@dataclass(frozen=True)
class AvmlRange:
    """One range: ``start``..``end`` inclusive (as the header says), ``present`` bytes of
    it readable (less when the file is cut or damaged), ``version`` 1 (LiME) or 2 (AVML)."""

    start: int
    end: int
    present: int
    version: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


class _Cut(Exception):
    """The walk of one range stopped early; the message says why."""


def cramjam_module() -> Any:
    """The cramjam package (its ``snappy`` codec), or one clear error saying how to get it."""
    try:
        import cramjam
    except ImportError:
        raise ImageError(
            "reading AVML's compressed ranges needs the cramjam package:"
            " pip install 'collector[avml]'"
        ) from None
    return cramjam


def _varint(data: bytes) -> int | None:
    """snappy's preamble: the uncompressed length as a little-endian base-128 varint."""
    value = 0
    for i, byte in enumerate(data[:5]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value
    return None


class AvmlImage(FileImage):
    """A :class:`~collector.memory.PhysicalMemory` over an AVML file.

    Damage after the first header does not stop the image from opening, as with
    :class:`~collector.image.lime.LimeImage`: a range whose stream is cut short or broken
    keeps its planned extent, the part after the last whole chunk is listed by
    :meth:`missing_ranges` (reads there raise :class:`PageNotCaptured` with
    ``Fate.MISSING``), and each problem is described in :attr:`problems`. A chunk whose
    CRC does not match raises :class:`ImageError` when read.

    :param source: a path, or a seekable binary file object (left open by :meth:`close`).
    :param page_size: the page size of the captured machine; AVML does not record it.
    :raises ImageError: not an AVML file, or cramjam is missing.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, page_size: int = 4096) -> None:
        self._cramjam = cramjam_module()
        self._file = RawFile(source)
        self.page_size = page_size
        self.metadata: dict = {"format": "avml"}
        self.problems: list[str] = []
        self.avml_ranges: list[AvmlRange] = []
        # One entry per piece: physical start, file offset of its bytes, stored length,
        # kind (_RAW: a LiME range read as it is; _SNAPPY/_PLAIN: one framed chunk).
        self._piece_start = array("Q")
        self._piece_offset = array("Q")
        self._piece_length = array("Q")
        self._piece_kind = array("B")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._more_problems = 0
        try:
            self._walk()
        except BaseException:
            self._file.close()
            raise
        if self._more_problems:
            self.problems.append(f"... and {self._more_problems} more problems")
        self._starts = [r.start for r in self.avml_ranges]

    # -- opening -------------------------------------------------------------------------

    def _problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self._more_problems += 1

    def _walk(self) -> None:
        name, size = self._file.name, self._file.size
        if size == 0:
            raise NotAnImage(name, "the file is empty")
        pos = 0
        while pos < size:
            if len(self.avml_ranges) >= MAX_RANGES:
                self._problem(
                    f"offset {pos:#x}: more than {MAX_RANGES} ranges; the remaining"
                    f" {size - pos} bytes are ignored"
                )
                return
            head = self._file.read_at(pos, LIME_HEADER_SIZE)
            if len(head) < LIME_HEADER_SIZE:
                if pos == 0:
                    raise ImageTruncated(
                        name, f"the file ends at byte {size}, inside the first AVML range header"
                    )
                self._problem(
                    f"offset {pos:#x}: {len(head)} trailing bytes, too short for a range"
                    " header; ignored"
                )
                return
            magic, version, start, end, _reserved = LIME_HEADER.unpack(head)
            known = (magic, version) in ((AVML_MAGIC, AVML_VERSION), (LIME_MAGIC, LIME_VERSION))
            why = None
            if not known:
                why = f"not an AVML (or LiME) range header: {head[:8].hex(' ')}"
            elif end < start:
                why = f"range ends ({end:#x}) before it starts ({start:#x})"
            elif self.avml_ranges and start <= self.avml_ranges[-1].end:
                why = (
                    f"range {start:#x}-{end:#x} overlaps or precedes the range before it"
                    f" (ending at {self.avml_ranges[-1].end:#x})"
                )
            if why is not None:
                if pos == 0:
                    raise NotAnImage(name, f"not an AVML image: {why}")
                # Without a sound header the next one cannot be found: the rest is lost.
                self._problem(
                    f"offset {pos:#x}: {why}; the remaining {size - pos} bytes are ignored"
                )
                return
            data = pos + LIME_HEADER_SIZE
            if version == LIME_VERSION:
                length = end - start + 1
                present = max(0, min(length, size - data))
                if present:
                    self._add(start, data, present, _RAW)
                self.avml_ranges.append(AvmlRange(start, end, present, version))
                if present < length:
                    self._problem(
                        f"range {start:#x}-{end:#x} is cut short: {present} of {length} bytes"
                        f" present; {start + present:#x}-{end + 1:#x} missing"
                    )
                    return
                pos = data + length
                continue
            pos, present, cut = self._walk_stream(data, start, end)
            self.avml_ranges.append(AvmlRange(start, end, present, version))
            if cut is not None:
                self._problem(
                    f"range {start:#x}-{end:#x} at offset {data:#x}: {cut};"
                    f" {start + present:#x}-{end + 1:#x} missing"
                    + (f", the remaining {size - pos} bytes are ignored" if pos < size else "")
                )
                return

    def _add(self, start: int, offset: int, length: int, kind: int) -> None:
        self._piece_start.append(start)
        self._piece_offset.append(offset)
        self._piece_length.append(length)
        self._piece_kind.append(kind)

    def _walk_stream(self, at: int, start: int, end: int) -> tuple[int, int, str | None]:
        """Index the framed stream of one range from file offset ``at``.

        Returns the file offset after the range (past the trailing length), the bytes of the
        range that whole chunks hold, and why the walk stopped early (None when it did not).
        """
        size = end - start + 1
        total = 0  # uncompressed bytes indexed so far
        pos = at
        others = 0
        # Enough data chunks for the range in 64 KiB pieces, with room for a writer that
        # flushes a little more often; a stream of tiny chunks is refused.
        max_data_chunks = 2 * (-(-size // MAX_CHUNK_DATA)) + 16
        data_chunks = 0
        window = b""
        window_at = pos
        try:
            while total < size:
                if pos + 13 > window_at + len(window):
                    window_at = pos
                    window = self._file.read_at(pos, _WINDOW)
                head = window[pos - window_at : pos - window_at + 13]
                if len(head) < 4:
                    raise _Cut("the snappy stream is cut short in a chunk header")
                kind = head[0]
                length = int.from_bytes(head[1:4], "little")
                body = pos + 4
                if body + length > self._file.size:
                    raise _Cut(f"the snappy chunk at {pos:#x} ({length} bytes) is cut short")
                if kind in (CHUNK_COMPRESSED, CHUNK_UNCOMPRESSED):
                    data_chunks += 1
                    if data_chunks > max_data_chunks:
                        raise _Cut(f"more than {max_data_chunks} snappy chunks for {size} bytes")
                    if kind == CHUNK_UNCOMPRESSED:
                        produced = length - 4
                        if not 0 < produced <= MAX_CHUNK_DATA:
                            raise _Cut(f"uncompressed chunk at {pos:#x} holds {produced} bytes")
                        piece = _PLAIN
                    else:
                        if not 5 <= length <= 4 + MAX_COMPRESSED:
                            raise _Cut(f"compressed chunk at {pos:#x} is {length} bytes long")
                        produced = _varint(head[8 : 4 + min(length, 9)])
                        if produced is None or not 0 < produced <= MAX_CHUNK_DATA:
                            raise _Cut(
                                f"compressed chunk at {pos:#x} declares {produced} bytes"
                                f" (at most {MAX_CHUNK_DATA})"
                            )
                        piece = _SNAPPY
                    if total + produced > size:
                        raise _Cut(f"the snappy stream holds more than the range's {size} bytes")
                    self._add(start + total, body, length, piece)
                    total += produced
                elif kind == 0xFF:
                    others += 1
                    if length != 6 or head[4:10] != STREAM_IDENTIFIER[4:]:
                        raise _Cut(f"bad snappy stream identifier at {pos:#x}")
                elif CHUNK_PADDING >= kind >= 0x80:
                    others += 1  # padding and reserved skippable chunks
                else:
                    raise _Cut(f"reserved unskippable snappy chunk type {kind:#x} at {pos:#x}")
                if others > MAX_OTHER_CHUNKS:
                    raise _Cut(f"more than {MAX_OTHER_CHUNKS} snappy chunks without data")
                pos = body + length
        except _Cut as e:
            return self._file.size, total, str(e)
        while True:
            trailer = self._file.read_at(pos, 8)
            if len(trailer) < 8:
                # Every chunk is there, only the length after them is not: the data reads.
                self._problem(f"range {start:#x}-{end:#x}: the stream length after it is missing")
                return pos + len(trailer), total, None
            (recorded,) = struct.unpack("<Q", trailer)
            if recorded == pos - at:
                return pos + 8, total, None
            # Padding or skippable chunks may follow the last data chunk of a stream.
            kind, length = trailer[0], int.from_bytes(trailer[1:4], "little")
            if kind >= 0x80 and others < MAX_OTHER_CHUNKS and pos + 4 + length <= self._file.size:
                others += 1
                pos += 4 + length
                continue
            self._problem(
                f"range {start:#x}-{end:#x}: the stream is {pos - at} bytes, but the length"
                f" after it says {recorded}"
            )
            return pos + 8, total, None

    # -- reading -------------------------------------------------------------------------

    def _locate(self, paddr: int) -> AvmlRange | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr <= self.avml_ranges[i].end:
            return self.avml_ranges[i]
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """Every range as ``(start, end)``, end exclusive, including ranges cut short."""
        return [(r.start, r.end + 1) for r in self.avml_ranges]

    def missing_ranges(self) -> list[tuple[int, int]]:
        """The parts of ranges that the file does not hold whole chunks of."""
        return [(r.start + r.present, r.end + 1) for r in self.avml_ranges if r.present < r.size]

    def fate(self, paddr: int) -> PageFate:
        rng = self._locate(paddr)
        if rng is None:
            return PageFate(Fate.OUTSIDE)
        return PageFate(Fate.READ if paddr < rng.start + rng.present else Fate.MISSING)

    def _piece(self, i: int) -> bytes:
        """The uncompressed bytes of snappy chunk ``i``."""
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        offset, length = self._piece_offset[i], self._piece_length[i]
        chunk = self._file.read_at(offset - 4, length + 4)
        if len(chunk) != length + 4:
            raise ImageError(f"{self._file.name}: file shrank while reading offset {offset:#x}")
        # The framed decoder checks the chunk's CRC-32C; one chunk after a stream identifier
        # is a whole stream to it.
        try:
            data = bytes(self._cramjam.snappy.decompress(STREAM_IDENTIFIER + chunk))
        except self._cramjam.DecompressionError as e:
            raise ImageError(
                f"{self._file.name}: snappy chunk at offset {offset - 4:#x} does not"
                f" decompress: {e}"
            ) from None
        expected = self._piece_end(i) - self._piece_start[i]
        if len(data) != expected:
            raise ImageError(
                f"{self._file.name}: snappy chunk at offset {offset - 4:#x} gives"
                f" {len(data)} bytes, not the {expected} it declares"
            )
        with self._lock:
            self._cache[i] = data
            if len(self._cache) > CACHE_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def _piece_end(self, i: int) -> int:
        """Physical address after piece ``i``."""
        if self._piece_kind[i] == _RAW:
            return self._piece_start[i] + self._piece_length[i]
        rng = self._locate(self._piece_start[i])
        assert rng is not None
        if i + 1 < len(self._piece_start) and self._piece_start[i + 1] <= rng.end:
            return self._piece_start[i + 1]
        return rng.start + rng.present

    def read(self, paddr: int, size: int) -> bytes:
        if size < 0:
            raise ValueError(f"negative read size {size}")
        out = bytearray()
        while size > 0:
            rng = self._locate(paddr)
            if rng is None:
                raise PageNotCaptured(paddr, Fate.OUTSIDE)
            if paddr >= rng.start + rng.present:
                raise PageNotCaptured(paddr, Fate.MISSING)
            i = bisect.bisect_right(self._piece_start, paddr) - 1
            start, end = self._piece_start[i], self._piece_end(i)
            n = min(size, end - paddr)
            if self._piece_kind[i] == _RAW:
                data = self._file.read_at(self._piece_offset[i] + paddr - start, n)
                if len(data) != n:
                    raise ImageError(f"{self._file.name}: file shrank while reading {paddr:#x}")
                out += data
            else:
                out += self._piece(i)[paddr - start : paddr - start + n]
            paddr += n
            size -= n
        return bytes(out)
