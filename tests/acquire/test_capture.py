"""The capture loop's page accounting: large reads, page-by-page fallback, fates, zeroing."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

from collector.acquire.capture import iter_chunks, read_chunk, run_capture
from collector.image.reader import NativeImage
from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun

PAGE = 4096


class FailingSource:
    """Bytes from ``ram``; any read touching a page in ``bad`` fails with that page's errno."""

    def __init__(self, ram: dict[int, bytes], bad: dict[int, int] | None = None) -> None:
        self.ram = ram
        self.bad = bad or {}
        self.reads: list[tuple[int, int]] = []

    def read(self, paddr: int, size: int) -> bytes:
        self.reads.append((paddr, size))
        for page, err in self.bad.items():
            if paddr < page + PAGE and page < paddr + size:
                raise OSError(err, "injected")
        for start, data in self.ram.items():
            if start <= paddr and paddr + size <= start + len(data):
                return data[paddr - start : paddr - start + size]
        raise OSError(errno.EIO, "outside")


@dataclass
class Entry:
    start: int
    end: int
    source: str | None
    fate: Fate = Fate.READ
    kernel_zero: bool = False
    reason: str = ""


@dataclass
class Range:
    start: int
    end: int


@dataclass
class Plan:
    ram_ranges: list[Range]
    entries: list[Entry]


def dense(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def test_chunks_align_to_physical_addresses():
    assert list(iter_chunks(0x1000, 0x9FC00, 0x40000)) == [
        (0x1000, 0x40000),
        (0x40000, 0x80000),
        (0x80000, 0x9FC00),
    ]


def test_one_large_read_when_nothing_fails():
    ram = {0x100000: dense(16 * PAGE)}
    src = FailingSource(ram)
    data, runs = read_chunk(0x100000, 0x110000, [Entry(0x100000, 0x110000, "m")], {"m": src}, PAGE)
    assert data == ram[0x100000] and runs == []
    assert src.reads == [(0x100000, 16 * PAGE)]


def test_failed_pages_fall_back_page_by_page_and_keep_their_errno():
    ram = {0x100000: dense(16 * PAGE)}
    bad = {
        0x100000 + 3 * PAGE: errno.EIO,
        0x100000 + 4 * PAGE: errno.EIO,
        0x100000 + 9 * PAGE: errno.EFAULT,
    }
    src = FailingSource(ram, bad)
    data, runs = read_chunk(0x100000, 0x110000, [Entry(0x100000, 0x110000, "m")], {"m": src}, PAGE)
    assert runs == [
        FateRun(3, 2, Fate.UNREADABLE, errno.EIO),
        FateRun(9, 1, Fate.UNREADABLE, errno.EFAULT),
    ]
    expected = bytearray(ram[0x100000])
    for page in bad:
        expected[page - 0x100000 : page - 0x100000 + PAGE] = bytes(PAGE)
    assert data == bytes(expected)
    assert len(src.reads) == 1 + 16  # the large read, then each page once


def test_kernel_zero_pages_are_not_reported_as_data():
    low = bytearray(dense(8 * PAGE))
    low[0 : 2 * PAGE] = bytes(2 * PAGE)  # the kernel gave zeros here
    src = FailingSource({0x1000: bytes(low)})
    entry = Entry(0x1000, 0x9000, "m", kernel_zero=True)
    data, runs = read_chunk(0x1000, 0x9000, [entry], {"m": src}, PAGE)
    assert runs == [FateRun(0, 2, Fate.KERNEL_ZERO)]
    assert data == bytes(low)


def test_gaps_and_sourceless_entries_get_their_fate():
    ram = {0x1000: dense(0x9EC00)}
    src = FailingSource(ram)
    entries = [
        Entry(0x1000, 0x9F000, "kcore"),
        Entry(0x9F000, 0x9FC00, None, Fate.NOT_COVERED),
    ]
    data, runs = read_chunk(0x1000, 0x9FC00, entries, {"kcore": src}, PAGE)
    assert runs == [FateRun(0x9E, 1, Fate.NOT_COVERED)]
    assert data == ram[0x1000][:0x9E000] + bytes(0xC00)
    excluded = [Entry(0x1000, 0x3000, "kcore"), Entry(0x3000, 0x5000, None, Fate.EXCLUDED)]
    _, runs = read_chunk(0x1000, 0x6000, excluded, {"kcore": src}, PAGE)
    assert runs == [FateRun(2, 2, Fate.EXCLUDED), FateRun(4, 1, Fate.NOT_COVERED)]


def test_run_capture_writes_every_range_and_stops_on_request(tmp_path):
    import threading

    ram = {0x1000: dense(0x9EC00, 1), 0x100000: dense(0x300000, 2)}
    src = FailingSource(ram, {0x200000: errno.EPERM})
    plan = Plan(
        [Range(s, s + len(d)) for s, d in ram.items()],
        [Entry(s, s + len(d), "m") for s, d in ram.items()],
    )
    path = tmp_path / "i.lime.zst"
    with open(path, "wb") as f:
        w = ImageWriter(
            f,
            page_size=PAGE,
            chunk_size=1 << 20,
            metadata={"ranges": [[r.start, r.end] for r in plan.ram_ranges]},
        )
        result = run_capture(plan, {"m": src}, w)
        w.finish({})
    assert result.stopped_by is None and result.progress.unreadable_pages == 1
    with NativeImage(path) as img:
        assert img.read(0x1000, 0x9EC00) == ram[0x1000]
        assert img.fate(0x200000).errno == errno.EPERM
        assert img.read(0x201000, 0x1000) == ram[0x100000][0x101000:0x102000]

    stop = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.chunks)
        if p.chunks == 2:
            stop.set()

    path2 = tmp_path / "j.lime.zst"
    with open(path2, "wb") as f:
        w = ImageWriter(
            f,
            page_size=PAGE,
            chunk_size=1 << 20,
            metadata={"ranges": [[r.start, r.end] for r in plan.ram_ranges]},
        )
        result = run_capture(plan, {"m": src}, w, stop=stop, on_progress=progress)
        w.finish({}, clean=False)
    assert result.stopped_by and seen == [1, 2]
    with NativeImage(path2) as img:
        assert img.missing_ranges() == [(0x200000, 0x400000)]
