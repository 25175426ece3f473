"""The physical-memory interface every image reader offers, and the fate of a page.

A capture records, for every page of every range it planned, what happened to it. Readers
hand out bytes only for pages that were really read (``read``, and ``read-zero`` for a page
read and found all zeros); any other page raises :class:`PageNotCaptured` with its fate, so
a zero-filled gap is never mistaken for data.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from collector.errors import CollectorError


class Fate(enum.IntEnum):
    """What happened to one page. The numbers are part of the image format."""

    READ = 0  #: read from the source: real data
    UNREADABLE = 1  #: the source refused or failed (errno recorded)
    KERNEL_ZERO = 2  #: the kernel returned fabricated zeros (e.g. low RAM via strict /dev/mem)
    NOT_COVERED = 3  #: no source covers this page (e.g. a sub-page tail kcore omits)
    EXCLUDED = 4  #: excluded on the user's request
    MISSING = 5  #: planned but absent from the image (capture cut short); reader-side only
    OUTSIDE = 6  #: not in any captured range at all; reader-side only
    SKIPPED_FREE = 7  #: not read: its struct page said free (``collect --skip free``)
    SKIPPED_CACHE = 8  #: not read: clean page cache no process maps (``--skip cache``)
    #: read, and every byte was zero (``--skip zero``): real data, the zeros are the content
    READ_ZERO = 9

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @property
    def is_data(self) -> bool:
        """Whether the image's bytes for such a page are what RAM held (READ, READ_ZERO)."""
        return self in (Fate.READ, Fate.READ_ZERO)


@dataclass(frozen=True)
class PageFate:
    """The fate of one page: ``fate`` and, for UNREADABLE, the ``errno`` the source gave."""

    fate: Fate
    errno: int = 0


@dataclass(frozen=True)
class FateRun:
    """A run of ``count`` pages starting at physical address ``start`` sharing one fate."""

    start: int
    count: int
    fate: Fate
    errno: int = 0


class PageNotCaptured(CollectorError):
    """A read touched a page whose contents the image does not have.

    :param paddr: physical address of the first page that was not read.
    :param fate: what happened to it.
    :param errno: the errno for UNREADABLE pages, else 0.
    """

    def __init__(self, paddr: int, fate: Fate, errno: int = 0) -> None:
        detail = f" (errno {errno})" if errno else ""
        super().__init__(f"physical page {paddr:#x} was not captured: {fate.label}{detail}")
        self.paddr = paddr
        self.fate = fate
        self.errno = errno


@runtime_checkable
class PhysicalMemory(Protocol):
    """Random access to captured physical memory. Every reader implements this.

    ``ranges()`` lists the captured ranges as ``(start, end)`` with ``end`` exclusive.
    ``read(paddr, size)`` returns exactly ``size`` bytes or raises :class:`PageNotCaptured`
    (for a page inside the ranges that was not read, or an address outside them).
    ``fate(paddr)`` tells what happened to the page holding ``paddr``.
    ``blob(name)`` returns a metadata blob (``vmcoreinfo``, ``btf``, ``kallsyms``...) or None.
    ``metadata`` is the image's JSON header (empty for formats that carry none).
    """

    page_size: int
    metadata: dict

    def ranges(self) -> list[tuple[int, int]]: ...

    def read(self, paddr: int, size: int) -> bytes: ...

    def fate(self, paddr: int) -> PageFate: ...

    def blob(self, name: str) -> bytes | None: ...

    def close(self) -> None: ...


def iter_pages(start: int, end: int, page_size: int) -> Iterator[int]:
    """Yield the start address of every page that overlaps ``[start, end)``."""
    first = start - start % page_size
    yield from range(first, end, page_size)
