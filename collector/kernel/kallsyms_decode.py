"""Decode the kernel's compressed symbol table (kallsyms) from memory, found via VMCOREINFO.

The layout is written by scripts/kallsyms.c and read by kernel/kallsyms.c:
``kallsyms_names`` holds, per symbol, a token count then that many token codes; each code
indexes ``kallsyms_token_index`` (256 u16 offsets) into ``kallsyms_token_table`` (256
NUL-terminated strings). The first expanded character is the nm type letter. Addresses
come from ``kallsyms_offsets`` (u32 each), decoded as the kernel at hand encoded them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from collector.errors import CollectorError, ImageError
from collector.kernel.symbols import Symbol, SymbolTable
from collector.kernel.vmcoreinfo import VmcoreInfo

#: KSYM_NAME_LEN since 6.1 ("kallsyms: increase maximum kernel symbol length to 512").
KSYM_NAME_LEN = 512
#: A sanity cap on kallsyms_num_syms: a large KALLSYMS_ALL kernel has a few hundred thousand.
MAX_SYMS = 4_000_000
#: Two-byte ULEB128 token counts reach at most 0x3FFF (scripts/kallsyms.c).
MAX_TOKENS = 0x3FFF
_CHUNK = 256 * 1024
_PAGE = 4096
_U64 = (1 << 64) - 1
# Bytes a decoded name may hold: printable ASCII without the space.
_NAME_BYTES = bytes(range(0x21, 0x7F))

ReadVirt = Callable[[int, int], bytes]


def _read(read_virt: ReadVirt, what: str, vaddr: int, size: int) -> bytes:
    try:
        data = read_virt(vaddr, size)
    except CollectorError as exc:
        raise ImageError(f"kallsyms: cannot read {what} at {vaddr:#x}: {exc}") from exc
    if len(data) != size:
        raise ImageError(f"kallsyms: short read of {what} at {vaddr:#x}")
    return data


def _read_upto(read_virt: ReadVirt, vaddr: int, size: int) -> bytes:
    """Read ``size`` bytes, or as many whole pages of them as are readable."""
    try:
        return read_virt(vaddr, size)
    except CollectorError:
        pass
    out = bytearray()
    while len(out) < size:
        at = vaddr + len(out)
        step = min(size - len(out), _PAGE - at % _PAGE)
        try:
            out += read_virt(at, step)
        except CollectorError:
            break
    return bytes(out)


class _Stream:
    """The bytes of ``kallsyms_names``, read in chunks as the decoder walks forward."""

    def __init__(self, read_virt: ReadVirt, start: int, limit: int) -> None:
        self._read_virt = read_virt
        self.start = start
        self.limit = limit
        self.buf = bytearray()

    def ensure(self, end: int) -> None:
        if end > self.limit:
            raise ImageError(f"kallsyms_names runs past {self.limit} bytes")
        while len(self.buf) < end:
            at = self.start + len(self.buf)
            want = min(max(_CHUNK, end - len(self.buf)), self.limit - len(self.buf))
            data = _read_upto(self._read_virt, at, want)
            short = end - len(self.buf) - len(data)
            if short > 0:
                # The chunk ran into unreadable memory: read only what is needed now.
                gap = at + len(data)
                try:
                    data += self._read_virt(gap, short)
                except CollectorError as exc:
                    raise ImageError(
                        f"kallsyms: kallsyms_names unreadable at {gap:#x}: {exc}"
                    ) from exc
            self.buf += data


def _tokens(read_virt: ReadVirt, table_addr: int, index_addr: int) -> list[bytes]:
    index = struct.unpack("<256H", _read(read_virt, "kallsyms_token_index", index_addr, 512))
    # A token expands to at most one symbol name, so the table ends within this bound.
    size = max(index) + KSYM_NAME_LEN + 1
    table = _read_upto(read_virt, table_addr, size)
    tokens = []
    for code, offset in enumerate(index):
        end = table.find(b"\0", offset)
        if end < 0:
            raise ImageError(f"kallsyms: token {code} at offset {offset} is not terminated")
        tokens.append(bytes(table[offset:end]))
    return tokens


def _addresses(read_virt: ReadVirt, vmcoreinfo: VmcoreInfo, count: int) -> list[int]:
    """Decode symbol addresses by the encoding the kernel used, newest first."""
    offsets_addr = vmcoreinfo.symbol("kallsyms_offsets")
    relative_base_addr = vmcoreinfo.symbol("kallsyms_relative_base")
    if offsets_addr is not None and relative_base_addr is None:
        # "kallsyms: Get rid of kallsyms relative base": each entry is a place-relative
        # s32, the address is &kallsyms_offsets[i] + kallsyms_offsets[i].
        raw = _read(read_virt, "kallsyms_offsets", offsets_addr, 4 * count)
        offsets = struct.unpack(f"<{count}i", raw)
        return [(offsets_addr + 4 * i + off) & _U64 for i, off in enumerate(offsets)]
    if offsets_addr is not None:
        raw = _read(read_virt, "kallsyms_offsets", offsets_addr, 4 * count)
        offsets = struct.unpack(f"<{count}i", raw)
        (base,) = struct.unpack(
            "<Q", _read(read_virt, "kallsyms_relative_base", relative_base_addr, 8)
        )
        if any(off < 0 for off in offsets):
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86_64 SMP until 6.15, "kallsyms: Remove
            # KALLSYMS_ABSOLUTE_PERCPU"): a non-negative entry is an absolute per-CPU
            # offset, a negative one is relative_base - 1 - entry. Only this encoding
            # stores negative entries: the others are offsets within the kernel image.
            return [off if off >= 0 else (base - 1 - off) & _U64 for off in offsets]
        return [(base + off) & _U64 for off in offsets]
    addresses_addr = vmcoreinfo.symbol("kallsyms_addresses")
    if addresses_addr is not None:
        # !CONFIG_KALLSYMS_BASE_RELATIVE, gone since 6.11 ("kallsyms: get rid of code for
        # absolute kallsyms"): plain unsigned longs.
        raw = _read(read_virt, "kallsyms_addresses", addresses_addr, 8 * count)
        return list(struct.unpack(f"<{count}Q", raw))
    raise ImageError(
        "VMCOREINFO has neither SYMBOL(kallsyms_offsets) nor SYMBOL(kallsyms_addresses)"
    )


def decode_kallsyms(read_virt: ReadVirt, vmcoreinfo: VmcoreInfo) -> SymbolTable:
    """Decode every symbol of the core kernel from memory.

    :param read_virt: ``read_virt(vaddr, size) -> bytes`` through the kernel's page tables.
    :param vmcoreinfo: must carry ``SYMBOL(kallsyms_names)``, ``kallsyms_num_syms``,
        ``kallsyms_token_table``, ``kallsyms_token_index`` and the offsets (6.0 and later,
        "vmcoreinfo: add kallsyms_num_syms symbol").
    :raises ImageError: a table is missing, unreadable or decodes to garbage.
    """
    need = ("kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table", "kallsyms_token_index")
    where = {}
    for sym in need:
        addr = vmcoreinfo.symbol(sym)
        if addr is None:
            raise ImageError(f"VMCOREINFO has no SYMBOL({sym}): cannot decode kallsyms")
        where[sym] = addr
    (count,) = struct.unpack(
        "<I", _read(read_virt, "kallsyms_num_syms", where["kallsyms_num_syms"], 4)
    )
    if not 0 < count <= MAX_SYMS:
        raise ImageError(f"kallsyms_num_syms is {count}: not a plausible symbol count")
    tokens = _tokens(read_virt, where["kallsyms_token_table"], where["kallsyms_token_index"])
    addresses = _addresses(read_virt, vmcoreinfo, count)
    for i in range(1, count):
        # scripts/kallsyms.c sorts by address; a table out of order was misread.
        if addresses[i] < addresses[i - 1]:
            raise ImageError(
                f"kallsyms: decoded addresses are out of order at symbol {i}"
                f" ({addresses[i - 1]:#x} > {addresses[i]:#x})"
            )
    names = _Stream(read_virt, where["kallsyms_names"], count * (MAX_TOKENS + 2))
    symbols = []
    pos = 0
    for i in range(count):
        names.ensure(pos + 1)
        length = names.buf[pos]
        # "kallsyms: support "big" kernel symbols" (6.1): with the high bit set the count
        # is a two-byte ULEB128. Before 6.1 no name reached 128 tokens (KSYM_NAME_LEN 128).
        if length & 0x80:
            names.ensure(pos + 2)
            length = (length & 0x7F) | (names.buf[pos + 1] << 7)
            pos += 2
        else:
            pos += 1
        # Every real token expands to at least one character, so a name never has more
        # tokens than KSYM_NAME_LEN; refusing here bounds the expansion below.
        if not 0 < length <= KSYM_NAME_LEN:
            raise ImageError(f"kallsyms: symbol {i} claims {length} tokens")
        names.ensure(pos + length)
        buf = names.buf
        expanded = b"".join([tokens[code] for code in buf[pos : pos + length]])
        pos += length
        if (
            len(expanded) < 2
            or len(expanded) > KSYM_NAME_LEN
            or expanded.translate(None, _NAME_BYTES)
        ):
            raise ImageError(
                f"kallsyms: symbol {i} decodes to {expanded[:40]!r}, not a symbol name"
            )
        symbols.append(Symbol(expanded[1:].decode("ascii"), addresses[i], chr(expanded[0])))
    return SymbolTable(symbols, "decoded from memory")
