"""XArrays and radix trees: ``struct xarray`` lookups and walks (include/linux/xarray.h,
lib/xarray.c; include/linux/radix-tree.h).

An entry is a ``void *``. Its two low bits say what it is: ``x1`` a value entry (an integer
shifted left by one), ``10`` an internal entry (a node, a sibling of a multi-index entry,
the retry or zero entry), ``00`` a pointer. Since 4.20 ("radix tree: use xarray" series,
``#define radix_tree_root xarray``) a radix tree is an xarray with the same nodes; only that
layout is read here: a ``struct radix_tree_root`` with ``rnode`` (before 4.20) raises
:class:`~collector.errors.NotApplicable`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.errors import BrokenStructure, NotApplicable
from collector.kernel.btf import Kind
from collector.kernel.object import Object, Value

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: The most entries a walk yields before it calls the array broken.
DEFAULT_MAX_COUNT = 1 << 22
_ULONG_BITS = 64

# include/linux/xarray.h: internal entries are xa_mk_internal(v) == (v << 2) | 2.
XA_RETRY_ENTRY = (256 << 2) | 2
XA_ZERO_ENTRY = (257 << 2) | 2
#: Internal entries above this are nodes (xa_is_node); the ones below are reserved.
_NODE_MIN = 4096


def _raw(entry: Object | int) -> int:
    return entry if isinstance(entry, int) else entry.value()


def xa_is_value(entry: Object | int) -> bool:
    """``xa_is_value(entry)``: whether an entry is a value entry (an integer, not a pointer)."""
    return bool(_raw(entry) & 1)


def xa_to_value(entry: Object | int) -> int:
    """``xa_to_value(entry)``: the integer a value entry holds."""
    return _raw(entry) >> 1


def xa_is_internal(entry: Object | int) -> bool:
    """``xa_is_internal(entry)``: whether an entry is internal to the xarray."""
    return _raw(entry) & 3 == 2


def xa_to_internal(entry: Object | int) -> int:
    """``xa_to_internal(entry)``: the number an internal entry holds."""
    return _raw(entry) >> 2


def xa_is_node(entry: Object | int) -> bool:
    """``xa_is_node(entry)``: whether an entry points to a ``struct xa_node``."""
    value = _raw(entry)
    return value & 3 == 2 and value > _NODE_MIN


def xa_is_zero(entry: Object | int) -> bool:
    """``xa_is_zero(entry)``: whether an entry is the zero entry (reserved, reads as NULL)."""
    return _raw(entry) == XA_ZERO_ENTRY


def xa_is_retry(entry: Object | int) -> bool:
    """``xa_is_retry(entry)``: whether an entry is the retry entry (left in a node being
    freed, or in slot 0 of a node whose entry moved to the head)."""
    return _raw(entry) == XA_RETRY_ENTRY


def xa_to_node(entry: Object | int, kernel: Kernel | None = None) -> Object:
    """``xa_to_node(entry)``: the ``struct xa_node *`` a node entry points to.

    :param entry: ``void *`` (an Object; with a bare int, pass ``kernel``).
    """
    k = entry.kernel if isinstance(entry, Object) else kernel
    if k is None:
        raise TypeError("xa_to_node of a bare int needs the kernel")
    return Value(k, k.type("struct xa_node *"), _raw(entry) - 2)


@dataclass(frozen=True)
class _NodeLayout:
    """Where ``struct xa_node``'s members lie, and XA_CHUNK_SHIFT, from this kernel's BTF."""

    size: int
    shift: int
    offset: int
    parent: int
    array: int
    slots: int
    chunk_shift: int

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift

    def is_sibling(self, entry: int) -> bool:
        # xa_is_sibling(): internal entries below xa_mk_internal(XA_CHUNK_SIZE - 1).
        return entry & 3 == 2 and entry < (((self.chunk_size - 1) << 2) | 2)


def _node_layout(kernel: Kernel) -> _NodeLayout:
    t = kernel.type("struct xa_node")
    slots_bit, _, slots_type = t.member("slots")
    n = slots_type.resolved().array_length
    if n < 2 or n & (n - 1):
        raise BrokenStructure(f"xarray: struct xa_node has {n} slots, not a power of two")
    return _NodeLayout(
        size=t.size,
        shift=t.member("shift")[0] // 8,
        offset=t.member("offset")[0] // 8,
        parent=t.member("parent")[0] // 8,
        array=t.member("array")[0] // 8,
        slots=slots_bit // 8,
        chunk_shift=n.bit_length() - 1,
    )


@dataclass
class _Node:
    address: int
    shift: int
    offset: int
    parent: int
    array: int
    slots: tuple[int, ...]


def _read_node(kernel: Kernel, layout: _NodeLayout, address: int) -> _Node:
    data = kernel.read_virt(address, layout.size)
    slots = struct.unpack_from(f"<{layout.chunk_size}Q", data, layout.slots)
    return _Node(
        address,
        data[layout.shift],
        data[layout.offset],
        int.from_bytes(data[layout.parent : layout.parent + 8], "little"),
        int.from_bytes(data[layout.array : layout.array + 8], "little"),
        slots,
    )


def _head(xa: Object) -> tuple[int, int]:
    """(address of the ``struct xarray``, ``xa->xa_head``)."""
    target = xa.type.resolved()
    obj = xa.deref() if target.kind is Kind.PTR else xa
    if not obj.type.resolved().has_member("xa_head"):
        if obj.type.resolved().has_member("rnode"):
            raise NotApplicable(
                f"{obj.type} is a radix tree from before 4.20 (rnode); only the xarray layout"
                " is read"
            )
        raise TypeError(f"expected struct xarray, got {xa.type}")
    return obj.address, obj.member("xa_head").value()


class _Walker:
    """Reads nodes of one xarray, checking each against its parent and the array."""

    def __init__(self, xa: Object) -> None:
        self.kernel = xa.kernel
        self.xa, self.head = _head(xa)
        self.layout = _node_layout(self.kernel)
        self.void_ptr = self.kernel.type("void *")
        self.seen: set[int] = set()

    def entry(self, value: int) -> Object:
        return Value(self.kernel, self.void_ptr, value)

    def node(self, entry: int, parent: int, offset: int, shift: int | None) -> _Node:
        """The node a node entry points to; ``shift`` None for the head (any valid shift)."""
        address = entry - 2
        where = f"xarray {self.xa:#x}: node {address:#x}"
        if address % 8:
            raise BrokenStructure(f"{where} is not aligned")
        if address in self.seen:
            raise BrokenStructure(f"{where} is reached twice (a cycle)")
        self.seen.add(address)
        node = _read_node(self.kernel, self.layout, address)
        chunk = self.layout.chunk_shift
        if shift is None:
            if node.shift % chunk or node.shift >= _ULONG_BITS:
                raise BrokenStructure(f"{where}: impossible shift {node.shift} at the head")
        elif node.shift != shift:
            raise BrokenStructure(
                f"{where}: shift {node.shift} where its parent's level needs {shift}"
            )
        if node.parent != parent or (parent and node.offset != offset):
            raise BrokenStructure(
                f"{where}: parent {node.parent:#x} offset {node.offset}, but it was reached"
                f" from {parent:#x} slot {offset}"
            )
        if node.array != self.xa:
            raise BrokenStructure(f"{where} belongs to xarray {node.array:#x}")
        return node

    def sibling_target(self, node: _Node, offset: int) -> tuple[int, int]:
        """Follow a sibling entry in ``node.slots[offset]`` to its canonical slot."""
        entry = node.slots[offset]
        if self.layout.is_sibling(entry):
            target = xa_to_internal(entry)
            if target >= offset:
                raise BrokenStructure(
                    f"xarray {self.xa:#x}: node {node.address:#x} slot {offset} is a sibling of"
                    f" slot {target}, which does not come before it"
                )
            return target, node.slots[target]
        return offset, entry


def _visible(entry: int, advanced: bool) -> bool:
    if not entry:
        return False
    return advanced or not (xa_is_zero(entry) or xa_is_retry(entry))


def xa_load(xa: Object, index: int, advanced: bool = False) -> Object:
    """``xa_load(xa, index)``: the entry at ``index``, or NULL.

    :param xa: ``struct xarray *``
    :param index: the index.
    :param advanced: also return the zero and retry entries (normally read as NULL).
    :returns: ``void *``
    :raises BrokenStructure: a node that does not fit its place (shift, parent, array), a
        cycle, a node entry in a leaf.
    """
    w = _Walker(xa)
    entry = w.head
    if not xa_is_node(entry):
        return w.entry(entry if index == 0 and _visible(entry, advanced) else 0)
    node = w.node(entry, 0, 0, None)
    if index >> node.shift >= w.layout.chunk_size:
        return w.entry(0)
    while True:
        offset = (index >> node.shift) & (w.layout.chunk_size - 1)
        offset, entry = w.sibling_target(node, offset)
        if xa_is_node(entry):
            if node.shift == 0:
                raise BrokenStructure(
                    f"xarray {w.xa:#x}: node {node.address:#x} at shift 0 holds a node entry"
                    f" in slot {offset}"
                )
            node = w.node(entry, node.address, offset, node.shift - w.layout.chunk_shift)
            continue
        return w.entry(entry if _visible(entry, advanced) else 0)


def xa_for_each(
    xa: Object, advanced: bool = False, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[tuple[int, Object]]:
    """``xa_for_each(xa, index, entry)``: every present entry, by increasing index.

    A multi-index entry is given once, at its first index. NULL slots are skipped, and so
    are the zero and retry entries unless ``advanced``.

    :param xa: ``struct xarray *``
    :param advanced: also give the zero and retry entries.
    :param max_count: the most entries before the array is called broken.
    :returns: ``(index, void *)`` pairs.
    :raises BrokenStructure: see :func:`xa_load`; or more than ``max_count`` entries.
    """
    w = _Walker(xa)
    if not xa_is_node(w.head):
        if _visible(w.head, advanced):
            yield 0, w.entry(w.head)
        return
    count = 0
    chunk = w.layout.chunk_shift
    head = w.node(w.head, 0, 0, None)
    # Depth-first, each node's slots in order; a stack of (node, next offset, first index).
    stack: list[tuple[_Node, int, int]] = [(head, 0, 0)]
    while stack:
        node, offset, base = stack.pop()
        while offset < w.layout.chunk_size:
            entry = node.slots[offset]
            index = base + (offset << node.shift)
            offset += 1
            if not entry or w.layout.is_sibling(entry):
                continue
            if xa_is_node(entry):
                if node.shift == 0:
                    raise BrokenStructure(
                        f"xarray {w.xa:#x}: node {node.address:#x} at shift 0 holds a node"
                        f" entry in slot {offset - 1}"
                    )
                child = w.node(entry, node.address, offset - 1, node.shift - chunk)
                stack.append((node, offset, base))
                node, offset, base = child, 0, index
                continue
            if not _visible(entry, advanced):
                continue
            count += 1
            if count > max_count:
                raise BrokenStructure(f"xarray {w.xa:#x}: more than {max_count} entries")
            yield index, w.entry(entry)


def radix_tree_lookup(root: Object, index: int) -> Object:
    """``radix_tree_lookup(root, index)``: the entry at ``index``, or NULL.

    :param root: ``struct radix_tree_root *`` (a ``struct xarray`` since 4.20)
    :returns: ``void *``
    """
    return xa_load(root, index)


def radix_tree_for_each(
    root: Object, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[tuple[int, Object]]:
    """``radix_tree_for_each_slot``: every present entry as ``(index, void *)``.

    :param root: ``struct radix_tree_root *`` (a ``struct xarray`` since 4.20)
    :param max_count: the most entries before the tree is called broken.
    """
    return xa_for_each(root, max_count=max_count)
