"""Physical memory held in a Python dict of ranges: for tests, fixtures and small imports."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from collector.memory import Fate, FateRun, PageFate, PageNotCaptured


class SparseMemory:
    """A :class:`~collector.memory.PhysicalMemory` over in-memory byte ranges.

    :param ranges: ``{physical start: bytes}``; ranges must not overlap.
    :param page_size: the page size reads are accounted in.
    :param fates: optional ``{page address: PageFate}`` for pages inside the ranges that were
        not read; reading them raises :class:`PageNotCaptured`.
    :param blobs: optional metadata blobs by name.
    :param metadata: optional image metadata.
    """

    def __init__(
        self,
        ranges: dict[int, bytes | bytearray],
        page_size: int = 4096,
        fates: dict[int, PageFate] | None = None,
        blobs: dict[str, bytes] | None = None,
        metadata: dict | None = None,
    ) -> None:
        self.page_size = page_size
        self._starts = sorted(ranges)
        self._data = [bytes(ranges[s]) for s in self._starts]
        for i in range(1, len(self._starts)):
            if self._starts[i - 1] + len(self._data[i - 1]) > self._starts[i]:
                raise ValueError(f"ranges overlap at {self._starts[i]:#x}")
        self._fates = dict(fates or {})
        self._blobs = dict(blobs or {})
        self.metadata = dict(metadata or {})

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, s + len(d)) for s, d in zip(self._starts, self._data, strict=True)]

    def readable_ranges(self) -> list[tuple[int, int]]:
        """Every range: the bytes are all held (pages of other fates raise on reading)."""
        return self.ranges()

    def _locate(self, paddr: int) -> int | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr < self._starts[i] + len(self._data[i]):
            return i
        return None

    def fate(self, paddr: int) -> PageFate:
        if self._locate(paddr) is None:
            return PageFate(Fate.OUTSIDE)
        return self._fates.get(paddr - paddr % self.page_size, PageFate(Fate.READ))

    def fate_runs(self) -> Iterator[FateRun]:
        """Every page of ``fates`` other than READ (READ_ZERO included, as the native reader
        lists it), in physical order, one run each."""
        for page in sorted(self._fates):
            f = self._fates[page]
            if f.fate != Fate.READ and self._locate(page) is not None:
                yield FateRun(page, 1, f.fate, f.errno)

    def read(self, paddr: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            i = self._locate(paddr)
            if i is None:
                raise PageNotCaptured(paddr, Fate.OUTSIDE)
            page = paddr - paddr % self.page_size
            f = self._fates.get(page)
            if f is not None and not f.fate.is_data:
                raise PageNotCaptured(page, f.fate, f.errno)
            end = min(self._starts[i] + len(self._data[i]), page + self.page_size, paddr + size)
            off = paddr - self._starts[i]
            out += self._data[i][off : off + end - paddr]
            size -= end - paddr
            paddr = end
        return bytes(out)

    def blob(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def blob_names(self) -> list[str]:
        """The names of the blobs held, in the order given."""
        return list(self._blobs)

    def close(self) -> None:
        pass
