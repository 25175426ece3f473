"""Kernel symbol tables: from /proc/kallsyms text, from VMCOREINFO, or decoded from memory.

Name to address and address to name, like the kernel's ``kallsyms_lookup_name()`` and
``kallsyms_lookup()`` (kernel/kallsyms.c).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from collector.errors import ImageError, NotApplicable
from collector.kernel.vmcoreinfo import VmcoreInfo

#: An address further than this past the nearest symbol is not attributed to it: the gap
#: between per-CPU offsets and the kernel image, or past the last symbol, is not a symbol.
MAX_SYMBOL_OFFSET = 1 << 20


class SymbolNotFound(NotApplicable):
    """A symbol the caller needs is not in the table."""

    def __init__(self, name: str, source: str) -> None:
        super().__init__(f"symbol {name!r} is not in the kernel symbol table ({source})")
        self.name = name


class KallsymsHidden(ImageError):
    """/proc/kallsyms was read without privilege: every address shows as zero."""


@dataclass(frozen=True, slots=True)
class Symbol:
    """One symbol: ``type`` is the nm-style letter (``T`` text, ``D`` data, ``?`` unknown)."""

    name: str
    address: int
    type: str = "?"
    module: str | None = None


def _rank(sym: Symbol) -> tuple[bool, bool]:
    # When a name repeats, the core kernel's global symbol wins, as kallsyms_lookup_name()
    # prefers vmlinux over modules; among equals the first one stays.
    return (sym.module is None, sym.type.isupper())


class SymbolTable:
    """An immutable symbol table.

    :param symbols: the symbols, in any order.
    :param source: where they came from (``kallsyms text``, ``decoded from memory``...).
    """

    def __init__(self, symbols: Iterable[Symbol], source: str) -> None:
        self.source = source
        by_address = sorted(symbols, key=lambda s: s.address)
        self._symbols = by_address
        self._addresses = [s.address for s in by_address]
        by_name: dict[str, Symbol] = {}
        for sym in by_address:
            have = by_name.get(sym.name)
            if have is None or _rank(sym) > _rank(have):
                by_name[sym.name] = sym
        self._by_name = by_name

    # -- builders -------------------------------------------------------------------------

    @classmethod
    def from_kallsyms_text(cls, text: str | bytes) -> SymbolTable:
        """Parse /proc/kallsyms: ``ffffffff81000000 T _stext`` with an optional ``[module]``.

        Malformed lines (a capture cut mid-line) are skipped.

        :raises KallsymsHidden: every address is zero (read without privilege).
        :raises ImageError: no line parses.
        """
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8", errors="replace")
        symbols = []
        nonzero = False
        for line in text.splitlines():
            parts = line.split()
            if len(parts) not in (3, 4) or len(parts[1]) != 1 or len(parts[0]) > 16:
                continue
            try:
                address = int(parts[0], 16)
            except ValueError:
                continue
            module = None
            if len(parts) == 4:
                if not (parts[3].startswith("[") and parts[3].endswith("]")):
                    continue
                module = parts[3][1:-1]
            nonzero = nonzero or address != 0
            symbols.append(Symbol(parts[2], address, parts[1], module))
        if not symbols:
            raise ImageError("kallsyms text holds no symbol line")
        if not nonzero:
            raise KallsymsHidden(
                "kallsyms shows every address as 0: it was read without privilege"
                " (kptr_restrict), so it names symbols but not their addresses"
            )
        return cls(symbols, "kallsyms text")

    @classmethod
    def from_vmcoreinfo(cls, vmcoreinfo: VmcoreInfo) -> SymbolTable:
        """The ``SYMBOL(name)`` entries of VMCOREINFO (a few dozen well-known symbols)."""
        return cls((Symbol(n, a) for n, a in vmcoreinfo.symbols().items()), "vmcoreinfo")

    def merged(self, other: SymbolTable) -> SymbolTable:
        """This table plus ``other``'s symbols whose names this one lacks."""
        extra = [s for s in other if s.name not in self._by_name]
        if not extra:
            return self
        return SymbolTable([*self._symbols, *extra], f"{self.source} + {other.source}")

    # -- lookups ----------------------------------------------------------------------------

    def get(self, name: str) -> int | None:
        """The address of ``name``, or None."""
        sym = self._by_name.get(name)
        return None if sym is None else sym.address

    def lookup(self, name: str) -> int:
        """The address of ``name``.

        :raises SymbolNotFound: naming the symbol and the table's source.
        """
        sym = self._by_name.get(name)
        if sym is None:
            raise SymbolNotFound(name, self.source)
        return sym.address

    def symbol(self, name: str) -> Symbol | None:
        """The full :class:`Symbol` for ``name``, or None."""
        return self._by_name.get(name)

    def address_to_symbol(
        self, address: int, max_offset: int = MAX_SYMBOL_OFFSET
    ) -> tuple[str, int] | None:
        """``(name, offset)`` of the symbol containing ``address``, or None.

        Of several symbols at one address the first in table order is named, as
        ``get_symbol_pos()`` does.
        """
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return None
        start = self._addresses[i]
        offset = address - start
        if offset > max_offset:
            return None
        first = bisect.bisect_left(self._addresses, start)
        return self._symbols[first].name, offset

    def next_address(self, address: int) -> int | None:
        """The lowest symbol address above ``address``, or None when none is."""
        k = bisect.bisect_right(self._addresses, address)
        return self._addresses[k] if k < len(self._addresses) else None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)

    def __repr__(self) -> str:
        return f"SymbolTable({len(self)} symbols from {self.source})"
