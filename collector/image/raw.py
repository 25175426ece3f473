"""Positioned reads over an image file, and padded raw images (file offset = physical address)."""

from __future__ import annotations

import bisect
import os
import stat
import threading
from collections.abc import Callable
from typing import BinaryIO, Self

from collector.errors import CannotOpenImage, ImageError
from collector.memory import Fate, PageFate, PageNotCaptured


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], allow_block: bool = False) -> int:
    """Open ``path`` read-only and return its descriptor, refusing at once anything that is
    not a regular file (or a block device, when ``allow_block``).

    ``O_NONBLOCK`` keeps the open of a FIFO from waiting for a writer; a character device
    (``/dev/zero``, ``/dev/mem``) or a FIFO has no end to read up to.

    :raises CannotOpenImage: one line naming the path and why.
    """
    name = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except IsADirectoryError:
        raise CannotOpenImage(name, "it is a directory, not an image file") from None
    except OSError as e:
        raise CannotOpenImage(name, e.strerror or str(e)) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise CannotOpenImage(name, e.strerror or str(e)) from None
    if not (stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode))):
        os.close(fd)
        raise CannotOpenImage(name, f"it is {_kind(mode)}, not an image file")
    return fd


class RawFile:
    """Thread-safe reads at given offsets of a file named by path or passed open.

    A path is opened here (and closed by :meth:`close`); an open binary file object is used
    as it is, must be seekable, and is left open. ``size`` is the file size when opened.

    :param source: a path, or a seekable binary file object.
    """

    def __init__(self, source: str | os.PathLike[str] | BinaryIO) -> None:
        self._fd: int | None = None
        self._fileobj: BinaryIO | None = None
        self._lock = threading.Lock()
        if isinstance(source, str | bytes | os.PathLike):
            self.name = os.fsdecode(source)
            fd = open_regular(source, allow_block=True)
            try:
                # lseek rather than st_size: block devices report st_size 0.
                self.size = os.lseek(fd, 0, os.SEEK_END)
            except OSError as e:
                os.close(fd)
                raise CannotOpenImage(self.name, e.strerror or str(e)) from None
            self._fd = fd
        else:
            self.name = str(getattr(source, "name", "<file object>"))
            try:
                self.size = source.seek(0, os.SEEK_END)
            except (OSError, ValueError) as e:
                raise ImageError(f"{self.name}: not a seekable file: {e}") from None
            self._fileobj = source

    def read_at(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes from ``offset``, fewer only where the file ends."""
        if offset < 0 or size <= 0 or offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        parts: list[bytes] = []
        try:
            if self._fd is not None:
                while size > 0:
                    part = os.pread(self._fd, size, offset)
                    if not part:
                        break
                    parts.append(part)
                    offset += len(part)
                    size -= len(part)
            elif self._fileobj is not None:
                with self._lock:
                    self._fileobj.seek(offset)
                    while size > 0:
                        part = self._fileobj.read(size)
                        if not part:
                            break
                        parts.append(part)
                        size -= len(part)
            else:
                raise ImageError(f"{self.name}: read after close")
        except OSError as e:
            raise ImageError(
                f"{self.name}: read failed at offset {offset:#x}: {e.strerror}"
            ) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_mapped(self, addr: int, size: int, locate: Callable[[int], tuple[int, int]]) -> bytes:
        """Read ``size`` bytes of an address space laid out over the file, run by run.

        ``locate(addr)`` gives ``(file offset of addr, bytes the file holds from there
        without a break)``, at least 1, or raises :class:`PageNotCaptured` for an address
        the file does not hold.
        """
        if size < 0:
            raise ValueError(f"negative read size {size}")
        out = bytearray()
        while size > 0:
            offset, run = locate(addr)
            n = min(size, run)
            data = self.read_at(offset, n)
            if len(data) != n:
                raise ImageError(f"{self.name}: file shrank while reading {addr:#x}")
            out += data
            addr += n
            size -= n
        return bytes(out)

    def close(self) -> None:
        """Close the file if it was opened here; a file object passed in stays open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fileobj = None


class FileImage:
    """What every file-backed reader shares: reads mapped through ``_run`` onto ``_file``,
    no blobs unless a format has some, and closing as a context manager.

    A subclass sets ``self._file`` (a :class:`RawFile`) and defines
    ``_run(paddr) -> (file offset, bytes available from there)``.
    """

    _file: RawFile

    def _run(self, paddr: int) -> tuple[int, int]:
        raise NotImplementedError

    def read(self, paddr: int, size: int) -> bytes:
        return self._file.read_mapped(paddr, size, self._run)

    def readable_ranges(self) -> list[tuple[int, int]]:
        """The parts of :meth:`ranges` whose bytes the file really holds, ``(start, end)``."""
        holes = sorted(self.missing_ranges())
        out = []
        for start, end in self.ranges():
            pos = start
            for hs, he in holes:
                if he <= pos or hs >= end:
                    continue
                if hs > pos:
                    out.append((pos, hs))
                pos = max(pos, he)
            if pos < end:
                out.append((pos, end))
        return out

    def ranges(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def missing_ranges(self) -> list[tuple[int, int]]:
        return []

    def blob(self, name: str) -> bytes | None:
        return None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawImage(FileImage):
    """A padded raw image: the byte at file offset ``p`` is physical address ``p``.

    The format carries no range list, and holes read back as zeros, so the caller says which
    ranges hold memory (for example the System RAM lines of the captured machine's iomem).
    Bytes of a range beyond the end of the file are MISSING (the file was cut short).

    :param source: a path, or a seekable binary file object.
    :param ranges: ``[(start, end)]`` with ``end`` exclusive; default: the whole file.
    :param page_size: the page size of the captured machine.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        ranges: list[tuple[int, int]] | None = None,
        page_size: int = 4096,
    ) -> None:
        self._file = RawFile(source)
        self.page_size = page_size
        self.metadata: dict = {"format": "raw"}
        self.problems: list[str] = []
        spans = sorted(ranges) if ranges is not None else [(0, self._file.size)]
        self._ranges: list[tuple[int, int]] = []
        for start, end in spans:
            if start < 0 or end <= start:
                raise ImageError(f"{self._file.name}: empty or negative range {start:#x}-{end:#x}")
            if self._ranges and start < self._ranges[-1][1]:
                raise ImageError(f"{self._file.name}: ranges overlap at {start:#x}")
            self._ranges.append((start, end))
        self._starts = [s for s, _ in self._ranges]
        for start, end in self.missing_ranges():
            self.problems.append(
                f"range {start:#x}-{end:#x} lies beyond the end of the file ({self._file.size:#x})"
            )

    def _locate(self, paddr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Parts of the ranges past the end of the file."""
        size = self._file.size
        return [(max(s, size), e) for s, e in self._ranges if e > size]

    def fate(self, paddr: int) -> PageFate:
        if self._locate(paddr) is None:
            return PageFate(Fate.OUTSIDE)
        return PageFate(Fate.READ if paddr < self._file.size else Fate.MISSING)

    def _run(self, paddr: int) -> tuple[int, int]:
        span = self._locate(paddr)
        if span is None:
            raise PageNotCaptured(paddr, Fate.OUTSIDE)
        if paddr >= self._file.size:
            raise PageNotCaptured(paddr, Fate.MISSING)
        return paddr, min(span[1], self._file.size) - paddr
