"""LiME memory images: 32-byte range headers, each followed by the range's bytes.

The layout is LiME's "Memory Range Header Version 1": u32 magic 0x4C694D45, u32 version 1,
u64 first physical address, u64 last physical address (inclusive), 8 reserved bytes. Ranges
ascend and do not overlap. LiME, AVML and ``zstd -dc`` of a native image all produce it.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from collector.errors import (
    ImageCorrupted,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImage,
)
from collector.image.raw import FileImage, RawFile
from collector.memory import Fate, PageFate, PageNotCaptured

LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQ8s")
LIME_HEADER_SIZE = LIME_HEADER.size  # 32
LIME_MAGIC_BYTES = struct.pack("<I", LIME_MAGIC)  # b"EMiL"
#: More ranges than any machine's memory map has (LiME writes one per System RAM range: tens,
#: hundreds on large machines); a file claiming more is damaged or hostile.
MAX_RANGES = 1 << 14
#: Problems listed one by one; beyond this they are only counted.
MAX_PROBLEMS = 100
_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class LimeRange:
    """One range of a LiME file.

    :param start: first physical address.
    :param end: last physical address, inclusive, as LiME stores it.
    :param offset: file (or stream) offset of the range's first data byte.
    :param present: data bytes really present; less than :attr:`size` when the file is cut.
    """

    start: int
    end: int
    offset: int
    present: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def complete(self) -> bool:
        return self.present == self.size


class _BadHeader(Exception):
    """A 32-byte block that is not a usable LiME range header; the message says why."""


def write_lime_header(start: int, end_inclusive: int) -> bytes:
    """The 32-byte LiME header of the range ``start``..``end_inclusive`` (both included)."""
    if not 0 <= start <= end_inclusive <= _U64_MAX:
        raise ValueError(f"bad LiME range {start:#x}-{end_inclusive:#x}")
    return LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, start, end_inclusive, bytes(8))


def _first_header_error(name: str, head: bytes, e: _BadHeader) -> ImageError:
    """The kind of failure a bad first header is: no LiME magic, a version not read here,
    or a range that makes no sense."""
    if head[:4] != LIME_MAGIC_BYTES:
        return NotAnImage(name, f"not a LiME file: {e}")
    if "version" in str(e):
        return UnsupportedImage(name, str(e))
    return ImageCorrupted(name, f"the first LiME range header: {e}")


def _parse_header(head: bytes) -> tuple[int, int]:
    """Return ``(start, end_inclusive)`` of a 32-byte header, or raise :class:`_BadHeader`."""
    magic, version, start, end, _reserved = LIME_HEADER.unpack(head)
    if magic != LIME_MAGIC:
        raise _BadHeader(f"bad LiME magic {head[:4].hex(' ')}")
    if version != LIME_VERSION:
        raise _BadHeader(f"unsupported LiME header version {version}")
    if end < start:
        raise _BadHeader(f"LiME range ends ({end:#x}) before it starts ({start:#x})")
    return start, end


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes from a stream that may return short reads (a pipe)."""
    parts: list[bytes] = []
    while size > 0:
        part = stream.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def iter_lime_ranges(
    stream: BinaryIO,
    on_data: Callable[[int, bytes], None] | None = None,
    chunk_size: int = 1 << 20,
) -> Iterator[LimeRange]:
    """Check a LiME stream front to back (a file or a pipe) and yield each complete range.

    The stream is read once, never seeked, in chunks of at most ``chunk_size`` bytes. Each
    range is yielded after its data has been read; ``on_data(paddr, data)`` sees the data.
    Anything that is not strict LiME raises :class:`ImageError` naming the offset: a bad
    magic, version or range, ranges not ascending, a header or range cut short.
    """
    name = str(getattr(stream, "name", "<stream>"))
    offset = 0
    previous: LimeRange | None = None
    while True:
        head = _read_full(stream, LIME_HEADER_SIZE)
        if not head:
            return
        if len(head) < LIME_HEADER_SIZE:
            raise ImageError(
                f"{name}: LiME stream ends inside a range header at offset {offset:#x} "
                f"({len(head)} of {LIME_HEADER_SIZE} bytes)"
            )
        try:
            start, end = _parse_header(head)
        except _BadHeader as e:
            raise ImageError(f"{name}: offset {offset:#x}: {e}") from None
        if previous is not None and start <= previous.end:
            raise ImageError(
                f"{name}: offset {offset:#x}: LiME range {start:#x}-{end:#x} does not follow "
                f"the range before it (ending at {previous.end:#x})"
            )
        rng = LimeRange(start, end, offset + LIME_HEADER_SIZE, end - start + 1)
        paddr = start
        remaining = rng.size
        while remaining > 0:
            data = stream.read(min(chunk_size, remaining))
            if not data:
                raise ImageError(
                    f"{name}: LiME range {start:#x}-{end:#x} is cut short: "
                    f"{rng.size - remaining} of {rng.size} bytes present"
                )
            if on_data is not None:
                on_data(paddr, data)
            paddr += len(data)
            remaining -= len(data)
        yield rng
        previous = rng
        offset = rng.offset + rng.size


class LimeImage(FileImage):
    """A :class:`~collector.memory.PhysicalMemory` over a LiME file.

    Opening walks the range headers only (seeking past the data), so it costs one small read
    per range. Damage after the first header does not stop the image from opening: what can
    be used is kept and each problem is described in :attr:`problems`. A range cut short by
    the end of the file keeps its planned extent in :meth:`ranges`; its absent tail is listed
    by :meth:`missing_ranges` and reads there raise :class:`PageNotCaptured` with
    ``Fate.MISSING``. Addresses in no range are ``Fate.OUTSIDE``. Fates are exact to the byte
    (LiME ranges need not be page aligned); :class:`PageNotCaptured` names the first byte the
    image lacks.

    :param source: a path, or a seekable binary file object (left open by :meth:`close`).
    :param page_size: the page size of the captured machine; LiME does not record it.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, page_size: int = 4096) -> None:
        self._file = RawFile(source)
        self.page_size = page_size
        self.metadata: dict = {"format": "lime"}
        self.problems: list[str] = []
        self.lime_ranges: list[LimeRange] = []
        self._more_problems = 0
        try:
            self._walk()
        except BaseException:
            self._file.close()
            raise
        if self._more_problems:
            self.problems.append(f"... and {self._more_problems} more problems")
        self._starts = [r.start for r in self.lime_ranges]

    def _walk(self) -> None:
        name, size = self._file.name, self._file.size
        if size == 0:
            raise NotAnImage(name, "the file is empty")
        pos = 0
        while pos < size:
            if len(self.lime_ranges) >= MAX_RANGES:
                self._problem(
                    f"offset {pos:#x}: more than {MAX_RANGES} ranges; the remaining "
                    f"{size - pos} bytes are ignored"
                )
                return
            head = self._file.read_at(pos, LIME_HEADER_SIZE)
            if len(head) < LIME_HEADER_SIZE:
                if pos == 0:
                    raise ImageTruncated(
                        name, f"the file ends at byte {size}, inside the first LiME range header"
                    )
                self._problem(
                    f"offset {pos:#x}: {len(head)} trailing bytes, too short for a LiME "
                    "range header; ignored"
                )
                return
            try:
                start, end = _parse_header(head)
            except _BadHeader as e:
                if pos == 0:
                    raise _first_header_error(name, head, e) from None
                self._problem(f"offset {pos:#x}: {e}; the remaining {size - pos} bytes are ignored")
                return
            data = pos + LIME_HEADER_SIZE
            length = end - start + 1
            last = self.lime_ranges[-1] if self.lime_ranges else None
            if last is not None and start <= last.end:
                self._problem(
                    f"offset {pos:#x}: range {start:#x}-{end:#x} overlaps or precedes the range "
                    f"before it (ending at {last.end:#x}); skipped"
                )
            else:
                rng = LimeRange(start, end, data, max(0, min(length, size - data)))
                self.lime_ranges.append(rng)
                if not rng.complete:
                    self._problem(
                        f"range {start:#x}-{end:#x} is cut short: {rng.present} of {length} "
                        f"bytes present; {start + rng.present:#x}-{end + 1:#x} missing"
                    )
            pos = data + length

    def _problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self._more_problems += 1

    def _locate(self, paddr: int) -> LimeRange | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr <= self.lime_ranges[i].end:
            return self.lime_ranges[i]
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """Every range as ``(start, end)``, end exclusive, including ranges cut short."""
        return [(r.start, r.end + 1) for r in self.lime_ranges]

    def missing_ranges(self) -> list[tuple[int, int]]:
        """The parts of ranges that the file was cut before, as ``(start, end)``."""
        return [(r.start + r.present, r.end + 1) for r in self.lime_ranges if not r.complete]

    def fate(self, paddr: int) -> PageFate:
        rng = self._locate(paddr)
        if rng is None:
            return PageFate(Fate.OUTSIDE)
        return PageFate(Fate.READ if paddr < rng.start + rng.present else Fate.MISSING)

    def _run(self, paddr: int) -> tuple[int, int]:
        rng = self._locate(paddr)
        if rng is None:
            raise PageNotCaptured(paddr, Fate.OUTSIDE)
        available = rng.start + rng.present
        if paddr >= available:
            raise PageNotCaptured(paddr, Fate.MISSING)
        return rng.offset + paddr - rng.start, available - paddr
