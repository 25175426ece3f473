"""Translations per second of the x86_64 page-table walker, against a plain 8-byte read.

Run from the repository root: ``python bench/translate.py [--seconds 1.0]``. Prints rates
measured in one run and their ratio to the baseline; never a pass/fail.
"""

from __future__ import annotations

import argparse
import random
import struct
import time

from collector.image.sparse import SparseMemory
from collector.kernel.kernel import Kernel
from collector.kernel.vmcoreinfo import VmcoreInfo
from collector.profiles.x86_64 import X86_64Paging

TOP = 0x100000
TABLE_FLAGS = 0x63
PS = 0x80
DIRECT = 0xFFFF888000000000
PAGES = 4096  # 16 MiB of RAM mapped with 4 KiB pages
RAM = 0x1000000


def build() -> tuple[SparseMemory, int]:
    """RAM mapped twice: 4 KiB pages at DIRECT, 2 MiB pages at DIRECT + 1 GiB."""
    tables: dict[int, bytearray] = {}
    next_table = [TOP]

    def alloc() -> int:
        paddr = next_table[0]
        next_table[0] += 4096
        tables[paddr] = bytearray(4096)
        return paddr

    def entry(table: int, index: int) -> int:
        return struct.unpack_from("<Q", tables[table], index * 8)[0]

    def walk_to(vaddr: int, leaf_shift: int) -> tuple[int, int]:
        table = TOP
        for shift in (39, 30, 21, 12):
            index = (vaddr >> shift) & 511
            if shift == leaf_shift:
                return table, index
            e = entry(table, index)
            if not e & 1:
                new = alloc()
                struct.pack_into("<Q", tables[table], index * 8, new | TABLE_FLAGS)
                e = new
            table = e & 0x000FFFFFFFFFF000
        raise AssertionError

    alloc()
    for i in range(PAGES):
        table, index = walk_to(DIRECT + i * 4096, 12)
        struct.pack_into("<Q", tables[table], index * 8, (RAM + i * 4096) | TABLE_FLAGS)
    for i in range(PAGES * 4096 // (2 << 20)):
        table, index = walk_to(DIRECT + (1 << 30) + i * (2 << 20), 21)
        struct.pack_into("<Q", tables[table], index * 8, (RAM + i * (2 << 20)) | TABLE_FLAGS | PS)
    ranges = {p: bytes(b) for p, b in tables.items()}
    ranges[RAM] = random.Random(1).randbytes(PAGES * 4096)
    return SparseMemory(ranges), TOP


def rate(fn, args: list, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for a in args:
            fn(a)
        done += len(args)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    opts = parser.parse_args()
    memory, top = build()
    paging = X86_64Paging(memory, top, 4)
    rng = random.Random(2)
    offsets = [rng.randrange(PAGES * 4096 - 8) for _ in range(2000)]
    vmcoreinfo = VmcoreInfo.parse(
        "SYMBOL(init_top_pgt)=ffffffff80100000\nNUMBER(phys_base)=0\nPAGESIZE=4096\n"
    )
    kernel = Kernel(memory, vmcoreinfo=vmcoreinfo)

    results = [
        ("SparseMemory.read 8 bytes (baseline)", rate(
            lambda o: memory.read(RAM + o, 8), offsets, opts.seconds)),
        ("translate, 4 KiB pages (4 levels)", rate(
            lambda o: paging.translate(DIRECT + o), offsets, opts.seconds)),
        ("translate, 2 MiB pages (3 levels)", rate(
            lambda o: paging.translate(DIRECT + (1 << 30) + o), offsets, opts.seconds)),
        ("Kernel.read_virt 8 bytes, cached walks", rate(
            lambda o: kernel.read_virt(DIRECT + o, 8), offsets, opts.seconds)),
    ]  # fmt: skip
    base = results[0][1]
    for label, per_second in results:
        print(f"{label:<42} {per_second:>12,.0f}/s  {per_second / base:6.2f}x baseline")


if __name__ == "__main__":
    main()
