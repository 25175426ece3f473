"""A synthetic x86_64 kernel in a few lines, for testing plugins and helpers without an image.

:class:`SyntheticKernel` lays out C declarations as BTF, allocates objects in a direct map of
made-up physical memory, places globals in the kernel image with their symbols, builds the
page tables and VMCOREINFO that reach them, and hands out a real
:class:`~collector.kernel.kernel.Kernel` over it::

    sk = SyntheticKernel('''
        struct list_head { struct list_head *next, *prev; };
        struct task_struct { int pid; char comm[16]; struct list_head tasks; };
    ''')
    init = sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    sk.set(init, "struct task_struct", "tasks.next", init + sk.offsetof("struct task_struct", "tasks"))
    kernel = sk.kernel()
    kernel.variable("init_task").comm.string()        # b"swapper/0"

Values are written with the layout the description gives (:mod:`collector.testing.cdecl`);
the kernel reads them back through the BTF that layout was encoded into.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import Any

from collector.image.sparse import SparseMemory
from collector.kernel.kernel import Kernel
from collector.memory import Fate, PageFate
from collector.testing.cdecl import CType, Layout, compile_btf
from collector.testing.pagetables import LEAF_FLAGS, USER, PageTableBuilder

PAGE = 4096
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: The direct map without KASLR (``__PAGE_OFFSET_BASE_L4`` / ``_L5``).
PAGE_OFFSET = {4: 0xFFFF888000000000, 5: 0xFF11000000000000}
#: The top page table's physical address; ``init_top_pgt`` is linked to reach it.
TOP_TABLE = 0x100000
#: Page-table pages are allocated from here up.
TABLES_AT = 0x200000
#: The kernel image: ``_stext`` at 0xffffffff81000000, physical 16 MiB.
IMAGE_PHYS = 0x1000000
IMAGE_VIRT = START_KERNEL_MAP + IMAGE_PHYS
#: Objects allocated with :meth:`SyntheticKernel.alloc` come from here up.
HEAP_PHYS = 0x10000000
#: Page tables of user address spaces (:meth:`SyntheticKernel.address_space`): 1 MiB each.
USER_TABLES_AT = 0x8000000
USER_TABLES_SIZE = 0x100000


class SyntheticKernel:
    """Builds a small kernel image in memory: types, objects, globals, page tables, symbols.

    :param declarations: C declarations of the types the test needs (see
        :func:`collector.testing.cdecl.compile_btf`; ``u8``..``u64``, ``bool``, ``pid_t``...
        are predeclared).
    :param levels: 4- or 5-level paging.
    :param release: the ``OSRELEASE`` VMCOREINFO gives.
    """

    def __init__(
        self, declarations: str = "", levels: int = 4, release: str = "6.1.0-test"
    ) -> None:
        self.btf, self.layout = compile_btf(declarations)
        self.levels = levels
        self.release = release
        self.page_offset = PAGE_OFFSET[levels]
        self.tables = PageTableBuilder(levels=levels, top=TOP_TABLE, alloc=TABLES_AT)
        self.data: dict[int, bytearray] = {}  # physical page -> contents
        self.fates: dict[int, PageFate] = {}
        self.symbols: list[tuple[str, str, int]] = [("_stext", "T", IMAGE_VIRT)]
        self.vmcoreinfo_extra: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self._heap = HEAP_PHYS
        self.address_spaces: list[AddressSpace] = []
        self._image = IMAGE_PHYS + PAGE  # the first page holds _stext
        self._page(IMAGE_PHYS)
        self.tables.map(IMAGE_VIRT, IMAGE_PHYS)

    # -- layout ----------------------------------------------------------------------------------

    def sizeof(self, type_name: str) -> int:
        return self.layout.sizeof(type_name)

    def offsetof(self, type_name: str, path: str) -> int:
        return self.layout.offsetof(type_name, path)

    # -- memory ----------------------------------------------------------------------------------

    def _page(self, paddr: int) -> bytearray:
        page = self.data.get(paddr)
        if page is None:
            page = self.data[paddr] = bytearray(PAGE)
        return page

    def alloc(self, size: int, align: int = 64) -> int:
        """``size`` bytes of zeroed memory in the direct map (like kmalloc); its address."""
        self._heap += -self._heap % align
        start = self._heap
        self._heap += max(size, 1)
        for p in range(start - start % PAGE, self._heap, PAGE):
            self._page(p)
        return self.page_offset + start

    def alloc_page(self) -> int:
        """One zeroed, page-aligned page in the direct map; its virtual address."""
        return self.alloc(PAGE, PAGE)

    def virt_to_phys(self, vaddr: int) -> int:
        """``__pa()`` for the direct map and the kernel image."""
        if vaddr >= START_KERNEL_MAP:
            return vaddr - START_KERNEL_MAP
        return vaddr - self.page_offset

    def write(self, vaddr: int, data: bytes) -> None:
        """Write bytes at a direct-map or kernel-image address (page by page)."""
        pos = 0
        while pos < len(data):
            paddr = self.virt_to_phys(vaddr + pos)
            page = self._page(paddr - paddr % PAGE)
            n = min(len(data) - pos, PAGE - paddr % PAGE)
            page[paddr % PAGE : paddr % PAGE + n] = data[pos : pos + n]
            pos += n

    def read(self, vaddr: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            paddr = self.virt_to_phys(vaddr + len(out))
            page = self._page(paddr - paddr % PAGE)
            n = min(size - len(out), PAGE - paddr % PAGE)
            out += page[paddr % PAGE : paddr % PAGE + n]
        return bytes(out)

    def write_u64(self, vaddr: int, value: int) -> None:
        self.write(vaddr, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def set(self, address: int, type_name: str, path: str, value: Any) -> None:
        """Write ``value`` into member ``path`` (``"a.b[2].c"``) of the ``type_name`` at
        ``address``: an int (bitfields included), bytes (char arrays), a bool, or an enum
        name."""
        bit, member = self.layout.member(type_name, path)
        t = member.type.resolved()
        for part in path.split(".")[-1:]:
            if "[" in part:
                # an element of an array member: the element type's size
                while t.kind == "array":
                    assert t.target is not None
                    t = t.target.resolved()
        self._store(address, bit, member.bits, t, value)

    def _store(self, address: int, bit: int, bits: int, t: CType, value: Any) -> None:
        if isinstance(value, str) and t.kind == "enum":
            value = dict(t.enumerators)[value]
        if bits:
            first = address + bit // 8
            shift = bit % 8
            nbytes = (shift + bits + 7) // 8
            raw = int.from_bytes(self.read(first, nbytes), "little")
            mask = ((1 << bits) - 1) << shift
            raw = (raw & ~mask) | ((int(value) << shift) & mask)
            self.write(first, raw.to_bytes(nbytes, "little"))
            return
        where = address + bit // 8
        if isinstance(value, bytes | bytearray):
            if len(value) > t.size:
                raise ValueError(f"{len(value)} bytes do not fit in {t.size}")
            self.write(where, bytes(value))
            return
        if t.kind == "float":
            self.write(where, struct.pack("<d" if t.size == 8 else "<f", value))
            return
        size = t.size
        self.write(where, (int(value) & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    def fill(self, address: int, type_name: str, values: Mapping[str, Any]) -> None:
        """:meth:`set` for each ``path: value``."""
        for path, value in values.items():
            self.set(address, type_name, path, value)

    def new(self, type_name: str, count: int = 1, /, **values: Any) -> int:
        """Allocate ``count`` objects of ``type_name`` in the direct map, write ``values``
        (member names; ``__`` between two names stands for ``.``) into the first; return its address.

        ``count`` is positional only, so a member called ``count`` is a value like any other.
        """
        t = self.layout.type(type_name).resolved()
        address = self.alloc(t.size * count, max(t.align, 8))
        self.fill(address, type_name, _paths(values))
        return address

    # -- the kernel image ---------------------------------------------------------------------------

    def symbol(self, name: str, address: int, kind: str = "D") -> None:
        """Add a symbol to the symbol table (kallsyms)."""
        self.symbols.append((name, kind, address))

    def global_(
        self, symbol: str, type_name: str, room: int | None = None, /, **values: Any
    ) -> int:
        """A global variable of ``type_name`` in the kernel image, with its symbol; its address.

        ``room`` (positional) reserves more bytes than the type (an array of unknown length).
        """
        t = self.layout.type(type_name).resolved()
        room = room if room is not None else t.size
        self._image += -self._image % max(t.align, 8)
        paddr = self._image
        self._image += max(room, 1)
        for p in range(paddr - paddr % PAGE, self._image, PAGE):
            self._page(p)
            self.tables.map(START_KERNEL_MAP + p, p)
        address = START_KERNEL_MAP + paddr
        self.symbol(symbol, address)
        self.fill(address, type_name, _paths(values))
        return address

    def drop(self, vaddr: int, fate: Fate = Fate.EXCLUDED) -> None:
        """Make the page holding ``vaddr`` one the image did not capture, with ``fate``."""
        paddr = self.virt_to_phys(vaddr)
        self.fates[paddr - paddr % PAGE] = PageFate(fate)

    def address_space(self) -> AddressSpace:
        """A new user address space (what ``mm->pgd`` points to); see :class:`AddressSpace`."""
        base = USER_TABLES_AT + len(self.address_spaces) * USER_TABLES_SIZE
        if base + USER_TABLES_SIZE > HEAP_PHYS:
            raise ValueError("too many address spaces")
        space = AddressSpace(self, base)
        self.address_spaces.append(space)
        return space

    # -- the image ---------------------------------------------------------------------------------

    def vmcoreinfo(self) -> str:
        top_symbol = START_KERNEL_MAP + TOP_TABLE
        return "\n".join(
            [
                f"OSRELEASE={self.release}",
                "PAGESIZE=4096",
                f"SYMBOL(init_top_pgt)={top_symbol:x}",
                "NUMBER(phys_base)=0",
                f"NUMBER(pgtable_l5_enabled)={int(self.levels == 5)}",
                "KERNELOFFSET=0",
                *self.vmcoreinfo_extra,
                "",
            ]
        )

    def memory(self) -> SparseMemory:
        """The physical memory: data pages, page tables (every page also in the direct map)."""
        mapped: set[int] = set()
        while True:
            user_tables = [p for space in self.address_spaces for p in space.tables.pages]
            pending = [p for p in (*self.data, *self.tables.pages, *user_tables) if p not in mapped]
            if not pending:
                break
            for p in pending:
                mapped.add(p)
                self.tables.map(self.page_offset + p, p)
        ranges = {p: bytes(b) for p, b in self.tables.pages.items()}
        for space in self.address_spaces:
            ranges.update((p, bytes(b)) for p, b in space.tables.pages.items())
        for p, b in self.data.items():
            ranges[p] = bytes(b)
        kallsyms = "".join(
            f"{a:016x} {k} {n}\n" for n, k, a in sorted(self.symbols, key=lambda s: s[2])
        )
        blobs = {
            "vmcoreinfo": self.vmcoreinfo().encode(),
            "kallsyms": kallsyms.encode(),
            "btf": self.btf,
            **self.blobs,
        }
        return SparseMemory(
            ranges, fates=dict(self.fates), blobs=blobs, metadata={"profile": "x86_64"}
        )

    def kernel(self) -> Kernel:
        """A :class:`~collector.kernel.kernel.Kernel` over everything built so far."""
        return Kernel(self.memory())


def _paths(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword names to member paths: ``tasks__next`` is ``tasks.next``; a leading ``__``
    (``__state``) is part of the name."""
    return {re.sub(r"(?<=[^_])__(?=[^_])", ".", k): v for k, v in values.items()}


class AddressSpace:
    """A process's page tables and user pages, built beside a :class:`SyntheticKernel`.

    The top table lives in a page of its own in the direct map, as ``mm->pgd`` does; user
    pages are allocated from the kernel's heap (so they are in the direct map too)::

        space = sk.address_space()
        space.map(0x400000)                      # one 4 KiB page
        space.map(0x600000, 2 << 20)             # one 2 MiB page
        space.write(0x400ff0, b"crosses into the next page")
        sk.new("struct mm_struct", pgd=space.pgd)

    :param sk: the kernel whose memory holds it.
    :param base: where its table pages are allocated, one page after another (1 MiB room).
    """

    def __init__(self, sk: SyntheticKernel, base: int) -> None:
        self._sk = sk
        self.tables = PageTableBuilder(levels=sk.levels, top=base, alloc=base + PAGE)
        self._limit = base + USER_TABLES_SIZE
        #: user page address -> (physical address of its backing, page size)
        self.pages: dict[int, tuple[int, int]] = {}

    @property
    def pgd(self) -> int:
        """``mm->pgd``: the direct-map address of the top table."""
        return self._sk.page_offset + self.tables.top

    def map(self, uaddr: int, size: int = PAGE, flags: int = LEAF_FLAGS | USER) -> int:
        """Back the user page at ``uaddr`` (4 KiB or 2 MiB, aligned) with new zeroed memory;
        the backing's direct-map address."""
        backing = self._sk.alloc(size, size)
        self.tables.map(uaddr, self._sk.virt_to_phys(backing), size, flags)
        if self.tables._next > self._limit:
            raise ValueError("the address space ran out of room for page tables")
        self.pages[uaddr] = (self._sk.virt_to_phys(backing), size)
        return backing

    def _backing(self, uaddr: int) -> tuple[int, int]:
        """(physical address, bytes to the end of its page) for a mapped user address."""
        for size in (PAGE, 2 << 20):
            base = uaddr - uaddr % size
            hit = self.pages.get(base)
            if hit is not None and hit[1] == size:
                return hit[0] + uaddr - base, base + size - uaddr
        raise KeyError(f"user address {uaddr:#x} is not mapped")

    def write(self, uaddr: int, data: bytes) -> None:
        """Write bytes at mapped user addresses, across page boundaries."""
        pos = 0
        while pos < len(data):
            paddr, room = self._backing(uaddr + pos)
            n = min(room, len(data) - pos)
            self._sk.write(self._sk.page_offset + paddr, data[pos : pos + n])
            pos += n

    def physical(self, uaddr: int) -> int:
        """The physical address backing a mapped user address."""
        return self._backing(uaddr)[0]

    def set_pte(self, uaddr: int, value: int) -> None:
        """Write ``value`` into the last-level entry for ``uaddr`` (e.g. a swap entry, present
        bit clear), making the page table that holds it if needed."""
        leaf = uaddr - uaddr % PAGE
        try:
            table = self.tables.table_at(leaf, "PT")
        except KeyError:
            # Map a throwaway page to make the tables, then overwrite the entry.
            self.tables.map(leaf, 0, PAGE)
            table = self.tables.table_at(leaf, "PT")
        self.tables.set_entry(table, (leaf >> 12) & 511, value)
        self.pages.pop(leaf, None)

    def drop(self, uaddr: int, fate: Fate = Fate.EXCLUDED) -> None:
        """Make the page backing ``uaddr`` one the image did not capture."""
        paddr = self.physical(uaddr)
        self._sk.fates[paddr - paddr % PAGE] = PageFate(fate)


def layout_of(declarations: str) -> Layout:
    """The layout of C declarations alone (no kernel)."""
    return compile_btf(declarations)[1]
