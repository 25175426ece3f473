"""Lays out a kallsyms table in memory the way the kernel's scripts/kallsyms.c does.

Independent of the decoder under test: it compresses names with the same token-table
algorithm as scripts/kallsyms.c (repeatedly give the most frequent adjacent pair an unused
byte code), writes the token count as one byte or as two-byte ULEB128 (6.1's "big"
symbols), and encodes addresses in one of the kernel's four schemes.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

from collector.memory import Fate, PageNotCaptured

# The address encodings, newest first:
#   "pc_relative"      s32 entry relative to the entry's own address, no relative base
#   "relative"         u32 offset from kallsyms_relative_base (6.15 and later)
#   "absolute_percpu"  x86_64 SMP before 6.15: per-CPU symbols absolute, others negative
#   "absolute"         u64 kallsyms_addresses (before 6.11, never the x86_64 default)
MODES = ("pc_relative", "relative", "absolute_percpu", "absolute")


@dataclass
class KallsymsImage:
    """The laid-out tables: ``data`` starts at virtual address ``base``."""

    base: int
    data: bytes
    addresses: dict[str, int]  # kallsyms_* label -> virtual address
    token_counts: list[int]  # tokens per symbol, in table order
    sorted_symbols: list[tuple[str, str, int]]  # (name, type, address) in table order

    def vmcoreinfo_lines(self) -> list[str]:
        """The SYMBOL() lines VMCOREINFO carries for these tables."""
        wanted = (
            "kallsyms_names",
            "kallsyms_num_syms",
            "kallsyms_token_table",
            "kallsyms_token_index",
            "kallsyms_offsets",
            "kallsyms_relative_base",
            "kallsyms_addresses",
        )
        return [f"SYMBOL({k})={self.addresses[k]:x}" for k in wanted if k in self.addresses]

    def read(self, vaddr: int, size: int) -> bytes:
        """A read_virt over the laid-out bytes alone: beyond them nothing was captured."""
        off = vaddr - self.base
        if off < 0 or off + size > len(self.data):
            raise PageNotCaptured(max(vaddr, self.base + len(self.data)), Fate.OUTSIDE)
        return self.data[off : off + size]


def compress(names: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Table-compress ``names``: returns (token strings by code, compressed names)."""
    table: list[bytes | None] = [None] * 256
    for name in names:
        for c in name:
            table[c] = bytes([c])
    seqs = [list(n) for n in names]
    # scripts/kallsyms.c optimize_result(): fill unused codes from 255 down.
    for code in range(255, -1, -1):
        if table[code] is not None:
            continue
        pairs: Counter[tuple[int, int]] = Counter()
        for seq in seqs:
            pairs.update(pairwise(seq))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        table[code] = table[a] + table[b]
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(code)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return [t or b"" for t in table], [bytes(s) for s in seqs]


def _align(buf: bytearray, n: int) -> None:
    buf += b"\0" * (-len(buf) % n)


def build(
    symbols: list[tuple[str, str, int]],
    base: int,
    mode: str = "absolute_percpu",
    percpu: frozenset[str] = frozenset(),
) -> KallsymsImage:
    """Lay out ``symbols`` (name, type letter, address) at virtual address ``base``.

    :param percpu: names whose addresses are absolute per-CPU offsets (absolute_percpu).
    """
    assert mode in MODES
    order = sorted(range(len(symbols)), key=lambda i: (symbols[i][2], i))
    table = [symbols[i] for i in order]
    tokens, compressed = compress([(t + n).encode() for n, t, _ in table])
    names = bytearray()
    for c in compressed:
        n = len(c)
        assert 0 < n <= 0x3FFF
        names += bytes([n]) if n <= 0x7F else bytes([(n & 0x7F) | 0x80, (n >> 7) & 0x7F])
        names += c
    markers = bytearray()
    off = 0
    for i, c in enumerate(compressed):
        if i % 256 == 0:
            markers += struct.pack("<I", off)
        off += len(c) + (1 if len(c) <= 0x7F else 2)
    token_table = bytearray()
    token_index = []
    for t in tokens:
        token_index.append(len(token_table))
        token_table += t + b"\0"

    buf = bytearray()
    where: dict[str, int] = {}

    def label(name: str, data: bytes, align: int) -> None:
        _align(buf, align)
        where[name] = base + len(buf)
        buf.extend(data)

    count = len(table)
    if mode == "pc_relative":
        # Layout after "kallsyms: Get rid of kallsyms relative base": labels .balign 4,
        # num_syms first, offsets after the names.
        label("kallsyms_num_syms", struct.pack("<I", count), 4)
        label("kallsyms_names", bytes(names), 4)
        label("kallsyms_markers", bytes(markers), 4)
        label("kallsyms_token_table", bytes(token_table), 4)
        label("kallsyms_token_index", struct.pack("<256H", *token_index), 4)
        _align(buf, 4)
        start = base + len(buf)
        offsets = []
        for i, (_n, _t, addr) in enumerate(table):
            rel = addr - (start + 4 * i)
            assert -(1 << 31) <= rel < (1 << 31)
            offsets.append(rel)
        label("kallsyms_offsets", struct.pack(f"<{count}i", *offsets), 4)
    else:
        # 6.1 layout (write_src()): ALGN is .balign 8 on 64-bit.
        if mode == "absolute":
            addrs = [a for _n, _t, a in table]
            label("kallsyms_addresses", struct.pack(f"<{count}Q", *addrs), 8)
        else:
            if mode == "relative":
                relative_base = table[0][2]
                offsets = [a - relative_base for _n, _t, a in table]
                assert all(0 <= o <= 0xFFFFFFFF for o in offsets)
                packed = struct.pack(f"<{count}I", *offsets)
            else:
                relative_base = min(a for n, _t, a in table if n not in percpu)
                offsets = []
                for n, _t, a in table:
                    if n in percpu:
                        assert 0 <= a <= 0x7FFFFFFF
                        offsets.append(a)
                    else:
                        offsets.append(relative_base - a - 1)
                        assert -(1 << 31) <= offsets[-1] < 0
                packed = struct.pack(f"<{count}i", *offsets)
            label("kallsyms_offsets", packed, 8)
            label("kallsyms_relative_base", struct.pack("<Q", relative_base), 8)
        label("kallsyms_num_syms", struct.pack("<I", count), 8)
        label("kallsyms_names", bytes(names), 8)
        label("kallsyms_markers", bytes(markers), 8)
        label("kallsyms_token_table", bytes(token_table), 8)
        label("kallsyms_token_index", struct.pack("<256H", *token_index), 8)
    return KallsymsImage(
        base=base,
        data=bytes(buf),
        addresses=where,
        token_counts=[len(c) for c in compressed],
        sorted_symbols=table,
    )
