"""Maple trees: ``struct maple_tree`` lookups and walks (include/linux/maple_tree.h,
lib/maple_tree.c). Maple trees came with 6.1 ("Maple Tree: add new data structure").

``ma_root`` holds either one entry (for index 0 alone) or an encoded node pointer: the node
is 256-byte aligned, so the low byte of the pointer says what it is. Bits 3-6 hold the
``enum maple_type``, bit 2 marks a NULL below, and in ``ma_root`` bit 1 (MAPLE_ROOT_NODE)
marks a node, which makes the root an xarray-style internal entry. The root node's
``parent`` is the tree's address with bit 0 (MA_ROOT_PARENT) set; every other node's is its
parent node with the slot and type in the low byte. Leaves are ``maple_leaf_64`` (pivots)
or ``maple_dense`` (one index per slot); internal nodes are ``maple_range_64``, or
``maple_arange_64`` in trees that track gaps (``MT_FLAGS_ALLOC_RANGE``, such as
``mm->mm_mt``). Slot and pivot counts come from this kernel's BTF.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.errors import BrokenStructure
from collector.helpers.xarray import xa_is_node, xa_is_zero
from collector.kernel.btf import Kind
from collector.kernel.object import Object, ObjectError, Type, Value

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: The most entries a walk yields before it calls the tree broken.
DEFAULT_MAX_COUNT = 1 << 22
#: include/linux/maple_tree.h: the tallest tree the height bits of ma_flags can describe.
MAPLE_HEIGHT_MAX = 31
MAPLE_NODE_MASK = 0xFF
MAPLE_NODE_TYPE_SHIFT = 3
MAPLE_NODE_TYPE_MASK = 0x0F
#: lib/maple_tree.c: bit 1 of ma_root marks a node; bit 0 of a root node's parent.
MAPLE_ROOT_NODE = 0x02
MA_ROOT_PARENT = 1
ULONG_MAX = (1 << 64) - 1

# enum maple_type (include/linux/maple_tree.h); read from BTF when it has the enum.
_TYPE_NAMES = ("maple_dense", "maple_leaf_64", "maple_range_64", "maple_arange_64")


def mte_to_node(enode: int) -> int:
    """``mte_to_node(entry)``: the ``struct maple_node`` address of an encoded node."""
    return enode & ~MAPLE_NODE_MASK


def mte_node_type(enode: int) -> int:
    """``mte_node_type(entry)``: the ``enum maple_type`` value an encoded node carries."""
    return (enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK


def mte_safe_root(enode: int) -> int:
    """``mte_safe_root(node)``: ``ma_root`` without its MAPLE_ROOT_NODE bit."""
    return enode & ~MAPLE_ROOT_NODE


@dataclass(frozen=True)
class _Kind:
    """How one node type is laid out: where its pivots, slots and end marker lie."""

    name: str
    leaf: bool
    pivots: int  # offset of pivot[] (unused when npivots is 0)
    npivots: int
    slots: int  # offset of slot[]
    nslots: int
    meta_end: int | None  # offset of meta.end; None for dense nodes


class _Layout:
    def __init__(self, kernel: Kernel) -> None:
        t = kernel.type("struct maple_node")
        self.size = t.size
        self.parent = t.member("parent")[0] // 8
        try:
            names = dict((v, n) for n, v in kernel.type("enum maple_type").enumerators())
        except ObjectError:  # a BTF without the enum: the header's order
            names = dict(enumerate(_TYPE_NAMES))
        self.names = names
        self.kinds: dict[int, _Kind] = {}
        for value, name in names.items():
            if name == "maple_dense":
                bit, _, st = t.member("slot")
                n = st.resolved().array_length
                self.kinds[value] = _Kind(name, True, 0, 0, bit // 8, n, None)
            elif name in ("maple_leaf_64", "maple_range_64", "maple_arange_64"):
                member = "ma64" if name == "maple_arange_64" else "mr64"
                base, _, mt = t.member(member)
                r = mt.resolved()
                pbit, _, pt = r.member("pivot")
                sbit, _, st = r.member("slot")
                mbit = _path_offset(r, "meta.end")
                self.kinds[value] = _Kind(
                    name,
                    name == "maple_leaf_64",
                    (base + pbit) // 8,
                    pt.resolved().array_length,
                    (base + sbit) // 8,
                    st.resolved().array_length,
                    (base + mbit) // 8,
                )


def _path_offset(t: Type, path: str) -> int:
    bit = 0
    cur = t
    for part in path.split("."):
        b, _, nxt = cur.member(part)
        bit += b
        cur = nxt.resolved()
    return bit


@dataclass
class _Node:
    address: int
    kind: _Kind
    parent: int
    pivots: tuple[int, ...]
    slots: tuple[int, ...]
    end: int  # the last slot in use


class _Walker:
    def __init__(self, mt: Object) -> None:
        obj = mt.deref() if mt.type.resolved().kind is Kind.PTR else mt
        if obj.type.resolved().tag != "maple_tree":
            raise TypeError(f"expected struct maple_tree, got {mt.type}")
        self.kernel = obj.kernel
        self.mt = obj.address
        self.root = obj.member("ma_root").value()
        self.layout = _Layout(self.kernel)
        self.void_ptr = self.kernel.type("void *")
        self.seen: set[int] = set()

    def entry(self, value: int) -> Object:
        return Value(self.kernel, self.void_ptr, value)

    def node(self, enode: int, parent: int, slot: int, lo: int, hi: int, depth: int) -> _Node:
        """Decode and check the node ``enode`` reached from ``parent`` (0 for the root)."""
        address = mte_to_node(enode)
        type_value = mte_node_type(enode)
        where = f"maple tree {self.mt:#x}: node {address:#x}"
        kind = self.layout.kinds.get(type_value)
        if kind is None:
            known = self.layout.names.get(type_value)
            what = (
                f"node type {type_value} ({known}), which this reader does not know"
                if known
                else f"impossible node type {type_value}"
            )
            raise BrokenStructure(f"{where} has {what}")
        if not address:
            raise BrokenStructure(f"{where}: a NULL child in slot {slot} of {parent:#x}")
        if depth > MAPLE_HEIGHT_MAX:
            raise BrokenStructure(f"{where} is deeper than {MAPLE_HEIGHT_MAX} levels")
        if address in self.seen:
            raise BrokenStructure(f"{where} is reached twice (a cycle)")
        self.seen.add(address)
        data = self.kernel.read_virt(address, self.layout.size)
        node_parent = int.from_bytes(data[self.layout.parent : self.layout.parent + 8], "little")
        if node_parent == address:
            raise BrokenStructure(f"{where} is dead (its parent is itself): freed while in use")
        if parent == 0:
            if node_parent != self.mt | MA_ROOT_PARENT:
                raise BrokenStructure(
                    f"{where} is the root but its parent is {node_parent:#x}, not the tree"
                )
        elif node_parent & MA_ROOT_PARENT or mte_to_node(node_parent) != parent:
            raise BrokenStructure(
                f"{where}: parent {node_parent:#x}, but it was reached from {parent:#x} slot {slot}"
            )
        slots = struct.unpack_from(f"<{kind.nslots}Q", data, kind.slots)
        pivots = struct.unpack_from(f"<{kind.npivots}Q", data, kind.pivots) if kind.npivots else ()
        if kind.meta_end is None:  # maple_dense: one index per slot, up to the node's max
            if hi - lo >= kind.nslots:
                raise BrokenStructure(
                    f"{where}: a dense node of {kind.nslots} slots spans {lo:#x}-{hi:#x}"
                )
            return _Node(address, kind, node_parent, pivots, slots, hi - lo)
        end = self._data_end(kind, data, pivots, hi)
        if end >= kind.nslots:
            raise BrokenStructure(f"{where}: end of data {end} past its {kind.nslots} slots")
        first = lo
        for i in range(end):
            if pivots[i] < first or pivots[i] >= hi:
                raise BrokenStructure(
                    f"{where}: pivot {i} is {pivots[i]:#x}, out of order in {first:#x}-{hi:#x}"
                )
            first = pivots[i] + 1
        return _Node(address, kind, node_parent, pivots, slots, end)

    @staticmethod
    def _data_end(kind: _Kind, data: bytes, pivots: tuple[int, ...], hi: int) -> int:
        """``ma_data_end()``: the last slot in use."""
        assert kind.meta_end is not None
        meta = data[kind.meta_end]
        if kind.name == "maple_arange_64":
            return meta
        last = kind.npivots - 1
        if not pivots[last]:
            return meta  # not full: the metadata (in the last slot) says where data ends
        if pivots[last] == hi:
            return last
        return kind.npivots

    def ranges(self, node: _Node, lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
        """``(slot, first, last, entry)`` for each slot in use of a decoded node."""
        if node.kind.meta_end is None:
            for i in range(node.end + 1):
                yield i, lo + i, lo + i, node.slots[i]
            return
        first = lo
        for i in range(node.end):
            yield i, first, node.pivots[i], node.slots[i]
            first = node.pivots[i] + 1
        yield node.end, first, hi, node.slots[node.end]


def _visible(entry: int, advanced: bool) -> bool:
    return bool(entry) and (advanced or not xa_is_zero(entry))


def mt_for_each(
    mt: Object, advanced: bool = False, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[tuple[int, int, Object]]:
    """``mt_for_each(mt, entry, index, max)``: every entry with the range it covers, in order.

    :param mt: ``struct maple_tree *``
    :param advanced: also give zero entries (XA_ZERO_ENTRY, read as NULL by the normal API).
    :param max_count: the most entries before the tree is called broken.
    :returns: ``(first, last, void *)`` with both indices inclusive.
    :raises BrokenStructure: a node of an impossible type, a pivot out of order, a node whose
        parent is not the node it was reached from (or is itself: a dead node), a cycle, a
        tree deeper than MAPLE_HEIGHT_MAX, more than ``max_count`` entries.
    """
    w = _Walker(mt)
    if not xa_is_node(w.root):
        if _visible(w.root, advanced):
            yield 0, 0, w.entry(w.root)
        return
    count = 0
    root = w.node(mte_safe_root(w.root), 0, 0, 0, ULONG_MAX, 1)
    # Depth-first, slots in order: a stack of iterators over (slot, first, last, entry).
    stack = [(root, w.ranges(root, 0, ULONG_MAX), 1)]
    while stack:
        node, ranges, depth = stack[-1]
        item = next(ranges, None)
        if item is None:
            stack.pop()
            continue
        slot, first, last, entry = item
        if node.kind.leaf:
            if _visible(entry, advanced):
                count += 1
                if count > max_count:
                    raise BrokenStructure(f"maple tree {w.mt:#x}: more than {max_count} entries")
                yield first, last, w.entry(entry)
            continue
        child = w.node(entry, node.address, slot, first, last, depth + 1)
        stack.append((child, w.ranges(child, first, last), depth + 1))


def mtree_load(mt: Object, index: int, advanced: bool = False) -> Object:
    """``mtree_load(mt, index)``: the entry whose range holds ``index``, or NULL.

    :param mt: ``struct maple_tree *``
    :param index: the index.
    :param advanced: return a zero entry as it is rather than as NULL.
    :returns: ``void *``
    :raises BrokenStructure: as :func:`mt_for_each`, for the nodes on the way.
    """
    w = _Walker(mt)
    if not xa_is_node(w.root):
        return w.entry(w.root if index == 0 and _visible(w.root, advanced) else 0)
    lo, hi, depth = 0, ULONG_MAX, 1
    node = w.node(mte_safe_root(w.root), 0, 0, lo, hi, depth)
    while True:
        hit = next((r for r in w.ranges(node, lo, hi) if r[1] <= index <= r[2]), None)
        if hit is None:
            return w.entry(0)  # a dense node that ends before index
        slot, first, last, entry = hit
        if node.kind.leaf:
            return w.entry(entry if _visible(entry, advanced) else 0)
        depth += 1
        lo, hi = first, last
        node = w.node(entry, node.address, slot, lo, hi, depth)
