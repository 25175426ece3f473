"""Kernel-like trees in synthetic memory: red-black trees, xarrays and maple trees laid out
as the kernel lays them out, for testing the helpers and plugins that walk them.

Each builder writes real nodes (with their parent links, shifts, pivots, metadata and
encoded pointers) into a :class:`~collector.testing.kernel.SyntheticKernel` built with the
matching declarations below, so a test knows exactly what the tree holds::

    sk = SyntheticKernel(RBTREE + "struct item { long key; struct rb_node node; };")
    root = sk.new("struct rb_root")
    items = {key: sk.new("struct item", key=key) for key in (5, 1, 9)}
    rb_insert(sk, root, [(key, items[key] + sk.offsetof("struct item", "node")) for key in items])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from collector.testing.kernel import SyntheticKernel

#: include/linux/rbtree_types.h
RBTREE = """
struct rb_node { unsigned long __rb_parent_color; struct rb_node *rb_right;
                 struct rb_node *rb_left; };
struct rb_root { struct rb_node *rb_node; };
struct rb_root_cached { struct rb_root rb_root; struct rb_node *rb_leftmost; };
"""

#: include/linux/xarray.h and include/linux/idr.h (XA_CHUNK_SHIFT 6), with what they use.
XARRAY = """
typedef struct { unsigned int lock; } spinlock_t;
typedef unsigned int gfp_t;
struct list_head { struct list_head *next, *prev; };
struct rcu_head { struct rcu_head *next; void (*func)(struct rcu_head *head); };
struct xarray { spinlock_t xa_lock; gfp_t xa_flags; void *xa_head; };
struct xa_node {
    unsigned char shift; unsigned char offset; unsigned char count; unsigned char nr_values;
    struct xa_node *parent; struct xarray *array;
    union { struct list_head private_list; struct rcu_head rcu_head; };
    void *slots[64];
    union { unsigned long tags[3][1]; unsigned long marks[3][1]; };
};
struct idr { struct xarray idr_rt; unsigned int idr_base; unsigned int idr_next; };
"""

#: include/linux/maple_tree.h (64-bit sizes). Needs ``spinlock_t`` and ``struct rcu_head``
#: (from :data:`XARRAY`, which maple tree users include anyway).
MAPLE_TREE = """
struct maple_pnode;
struct maple_enode;
struct maple_metadata { unsigned char end; unsigned char gap; };
struct maple_range_64 {
    struct maple_pnode *parent;
    unsigned long pivot[15];
    union { void *slot[16]; struct { void *pad[15]; struct maple_metadata meta; }; };
};
struct maple_arange_64 {
    struct maple_pnode *parent; unsigned long pivot[9]; void *slot[10];
    unsigned long gap[10]; struct maple_metadata meta;
};
struct maple_alloc {
    unsigned long total; unsigned char node_count; unsigned int request_count;
    struct maple_alloc *slot[30];
};
enum maple_type { maple_dense, maple_leaf_64, maple_range_64, maple_arange_64 };
struct maple_node {
    union {
        struct { struct maple_pnode *parent; void *slot[31]; };
        struct { void *pad; struct rcu_head rcu; struct maple_enode *piv_parent;
                 unsigned char parent_slot; enum maple_type type; unsigned char slot_len;
                 unsigned int ma_flags; };
        struct maple_range_64 mr64;
        struct maple_arange_64 ma64;
        struct maple_alloc alloc;
    };
};
struct maple_tree { union { spinlock_t ma_lock; }; void *ma_root; unsigned int ma_flags; };
"""

ULONG_MAX = (1 << 64) - 1

# -- red-black trees ------------------------------------------------------------------------------

_RED, _BLACK = 0, 1


@dataclass(eq=False)
class _RB:
    key: int
    address: int
    color: int = _RED
    parent: _RB | None = None
    left: _RB | None = None
    right: _RB | None = None


def rb_insert(sk: SyntheticKernel, root: int, nodes: Iterable[tuple[int, int]]) -> None:
    """Insert ``(key, struct rb_node address)`` pairs, in the order given, into the
    ``struct rb_root`` at ``root`` with the red-black insertion of lib/rbtree.c (recolouring
    and rotations), then write every node's links and colour.

    Keys order the tree; equal keys go right of each other, as most kernel users do.
    """
    top: _RB | None = None

    def rotate(x: _RB, left: bool) -> None:
        nonlocal top
        y = x.right if left else x.left
        assert y is not None
        inner = y.left if left else y.right
        if left:
            x.right = inner
        else:
            x.left = inner
        if inner is not None:
            inner.parent = x
        y.parent = x.parent
        if x.parent is None:
            top = y
        elif x is x.parent.left:
            x.parent.left = y
        else:
            x.parent.right = y
        if left:
            y.left = x
        else:
            y.right = x
        x.parent = y

    all_nodes: list[_RB] = []
    for key, address in nodes:
        z = _RB(key, address)
        all_nodes.append(z)
        parent, cur = None, top
        while cur is not None:
            parent = cur
            cur = cur.left if key < cur.key else cur.right
        z.parent = parent
        if parent is None:
            top = z
        elif key < parent.key:
            parent.left = z
        else:
            parent.right = z
        while z.parent is not None and z.parent.color == _RED:
            p = z.parent
            g = p.parent
            assert g is not None
            left_side = p is g.left
            uncle = g.right if left_side else g.left
            if uncle is not None and uncle.color == _RED:
                p.color = uncle.color = _BLACK
                g.color = _RED
                z = g
                continue
            if z is (p.right if left_side else p.left):
                z = p
                rotate(z, left=left_side)
                p = z.parent
                assert p is not None
            p.color = _BLACK
            g.color = _RED
            rotate(g, left=not left_side)
        assert top is not None
        top.color = _BLACK
    for n in all_nodes:
        parent_address = n.parent.address if n.parent else 0
        sk.write_u64(n.address, parent_address | n.color)
        sk.set(n.address, "struct rb_node", "rb_right", n.right.address if n.right else 0)
        sk.set(n.address, "struct rb_node", "rb_left", n.left.address if n.left else 0)
    sk.set(root, "struct rb_root", "rb_node", top.address if top else 0)


# -- xarrays ----------------------------------------------------------------------------------------

XA_CHUNK_SHIFT = 6
XA_CHUNK_SIZE = 1 << XA_CHUNK_SHIFT


def xa_mk_value(v: int) -> int:
    """``xa_mk_value(v)``: the entry storing integer ``v``."""
    return (v << 1) | 1


def xa_mk_internal(v: int) -> int:
    """``xa_mk_internal(v)``: an internal entry (sibling, retry, zero, node numbers)."""
    return (v << 2) | 2


def xa_build(sk: SyntheticKernel, xa: int, entries: dict[int, int]) -> dict[int, int]:
    """Store ``{index: entry}`` in the empty ``struct xarray`` at ``xa`` as xas_store() would:
    a lone entry at index 0 sits in ``xa_head``; anything else goes in ``struct xa_node``
    levels of 64 slots, as many as the largest index needs.

    :returns: ``{node address: shift}`` of the nodes made, for tests that break them.
    """
    entries = {i: e for i, e in entries.items() if e}
    made: dict[int, int] = {}
    if not entries:
        return made
    top = max(entries)
    if top == 0 and entries[0] & 3 != 2:
        sk.set(xa, "struct xarray", "xa_head", entries[0])
        return made
    shift = 0
    while top >> shift >= XA_CHUNK_SIZE:
        shift += XA_CHUNK_SHIFT

    def node(shift: int, parent: int, offset: int) -> int:
        address = sk.new("struct xa_node", shift=shift, offset=offset, parent=parent, array=xa)
        made[address] = shift
        return address

    head = node(shift, 0, 0)
    sk.set(xa, "struct xarray", "xa_head", head | 2)
    slots = sk.offsetof("struct xa_node", "slots")
    children: dict[tuple[int, int], int] = {}  # (parent node, slot) -> child node
    for index, entry in sorted(entries.items()):
        cur, s = head, shift
        while s > 0:
            offset = (index >> s) & (XA_CHUNK_SIZE - 1)
            child = children.get((cur, offset))
            if child is None:
                child = children[(cur, offset)] = node(s - XA_CHUNK_SHIFT, cur, offset)
                sk.write_u64(cur + slots + 8 * offset, child | 2)
                _bump(sk, cur)
            cur, s = child, s - XA_CHUNK_SHIFT
        sk.write_u64(cur + slots + 8 * (index & (XA_CHUNK_SIZE - 1)), entry)
        _bump(sk, cur, value=bool(entry & 1))
    return made


def _bump(sk: SyntheticKernel, node: int, value: bool = False) -> None:
    count = sk.read(node + sk.offsetof("struct xa_node", "count"), 1)[0]
    sk.set(node, "struct xa_node", "count", count + 1)
    if value:
        nr = sk.read(node + sk.offsetof("struct xa_node", "nr_values"), 1)[0]
        sk.set(node, "struct xa_node", "nr_values", nr + 1)


# -- maple trees ----------------------------------------------------------------------------------------

MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = range(4)
_MAPLE_SLOTS = {MAPLE_DENSE: 31, MAPLE_LEAF_64: 16, MAPLE_RANGE_64: 16, MAPLE_ARANGE_64: 10}
MT_FLAGS_ALLOC_RANGE = 0x01
MT_FLAGS_HEIGHT_OFFSET = 0x02
MAPLE_ROOT_NODE = 0x02
MAPLE_ENODE_NULL = 0x04


def mt_mk_node(node: int, type: int) -> int:
    """``mt_mk_node(node, type)``: an encoded node pointer."""
    return node | (type << 3) | MAPLE_ENODE_NULL


@dataclass
class MapleNode:
    """A node written by :class:`MapleBuilder`: its encoded pointer and the range it spans."""

    enode: int
    first: int
    last: int
    gap: int = 0  # the largest run of NULL indices below it (for maple_arange_64 parents)
    children: list[MapleNode] = field(default_factory=list)

    @property
    def address(self) -> int:
        return self.enode & ~0xFF


class MapleBuilder:
    """Writes maple tree nodes, one call per node, bottom up.

    A leaf takes the ``(first, last, entry)`` ranges it holds (contiguous, NULL for gaps);
    an internal node takes its children, whose ranges must be contiguous. :meth:`root`
    hangs the top node (or a lone entry) off a ``struct maple_tree``.
    """

    def __init__(self, sk: SyntheticKernel) -> None:
        self.sk = sk
        self.size = sk.sizeof("struct maple_node")

    def _new(self) -> int:
        return self.sk.alloc(self.size, 256)

    def leaf(self, ranges: Sequence[tuple[int, int, int]], type: int = MAPLE_LEAF_64) -> MapleNode:
        """A ``maple_leaf_64`` (pivots, up to 16 ranges) or ``maple_dense`` (up to 31
        consecutive single indices) leaf."""
        sk = self.sk
        node = self._new()
        first, last = ranges[0][0], ranges[-1][1]
        gap = max((b - a + 1 for a, b, e in ranges if not e), default=0)
        if type == MAPLE_DENSE:
            if last - first + 1 > 31 or any(a != b for a, b, _ in ranges):
                raise ValueError("a dense leaf holds up to 31 single indices")
            slot = sk.offsetof("struct maple_node", "slot")
            for a, _, entry in ranges:
                sk.write_u64(node + slot + 8 * (a - first), entry)
            return MapleNode(mt_mk_node(node, type), first, last, gap)
        self._ranges(node, "mr64", 16, ranges)
        return MapleNode(mt_mk_node(node, type), first, last, gap)

    def _ranges(
        self, node: int, member: str, nslots: int, ranges: Sequence[tuple[int, int, int]]
    ) -> None:
        sk = self.sk
        n = len(ranges)
        if not 0 < n <= nslots:
            raise ValueError(f"{n} ranges in a node of {nslots} slots")
        pivot = sk.offsetof("struct maple_node", f"{member}.pivot")
        slot = sk.offsetof("struct maple_node", f"{member}.slot")
        for i, (_, b, entry) in enumerate(ranges):
            if i < nslots - 1:
                sk.write_u64(node + pivot + 8 * i, b)
            sk.write_u64(node + slot + 8 * i, entry)
        if member == "ma64" or n < nslots - 1:
            # ma_data_end() reads the end from the metadata when the node is not full.
            sk.set(node, "struct maple_node", f"{member}.meta.end", n - 1)

    def internal(self, children: Sequence[MapleNode], type: int = MAPLE_RANGE_64) -> MapleNode:
        """A ``maple_range_64`` (up to 16 children) or ``maple_arange_64`` (up to 10, with
        the gap of each) node over ``children``; sets each child's parent link."""
        sk = self.sk
        node = self._new()
        member = "ma64" if type == MAPLE_ARANGE_64 else "mr64"
        self._ranges(
            node, member, _MAPLE_SLOTS[type], [(c.first, c.last, c.enode) for c in children]
        )
        parent_offset = sk.offsetof("struct maple_node", "parent")
        for i, child in enumerate(children):
            # ma_set_parent(): the parent node, the slot in bits 3-6, 64-bit range type 0x6.
            sk.write_u64(child.address + parent_offset, node | (i << 3) | 0x6)
        gap = max(c.gap for c in children)
        if type == MAPLE_ARANGE_64:
            gaps = sk.offsetof("struct maple_node", "ma64.gap")
            for i, child in enumerate(children):
                sk.write_u64(node + gaps + 8 * i, child.gap)
            best = max(range(len(children)), key=lambda i: children[i].gap)
            sk.set(node, "struct maple_node", "ma64.meta.gap", best)
        return MapleNode(
            mt_mk_node(node, type), children[0].first, children[-1].last, gap, list(children)
        )

    def root(self, mt: int, top: MapleNode | int, height: int = 0, flags: int = 0) -> None:
        """Hang ``top`` (a node, or a lone entry for index 0) off the tree at ``mt``."""
        sk = self.sk
        sk.set(mt, "struct maple_tree", "ma_flags", flags | (height << MT_FLAGS_HEIGHT_OFFSET))
        if isinstance(top, int):
            sk.set(mt, "struct maple_tree", "ma_root", top)
            return
        sk.set(mt, "struct maple_tree", "ma_root", top.enode | MAPLE_ROOT_NODE)
        sk.write_u64(top.address + sk.offsetof("struct maple_node", "parent"), mt | 1)


def fill_gaps(entries: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``(first, last, entry)`` ranges, sorted and disjoint, with NULL ranges between them so
    they cover 0..ULONG_MAX as a maple tree's leaves do."""
    out: list[tuple[int, int, int]] = []
    at = 0
    for first, last, entry in sorted(entries):
        if first < at:
            raise ValueError(f"range {first:#x}-{last:#x} overlaps the one before")
        if first > at:
            out.append((at, first - 1, 0))
        out.append((first, last, entry))
        at = last + 1
    if at <= ULONG_MAX:
        out.append((at, ULONG_MAX, 0))
    return out


def mt_build(
    sk: SyntheticKernel,
    mt: int,
    entries: Sequence[tuple[int, int, int]],
    alloc_range: bool = False,
    leaf_fill: int = 16,
    fanout: int | None = None,
) -> MapleNode | None:
    """Store ``(first, last, entry)`` ranges in the empty ``struct maple_tree`` at ``mt``:
    ``maple_leaf_64`` leaves of up to ``leaf_fill`` ranges (gaps included), then levels of
    ``maple_range_64`` (``maple_arange_64`` with ``alloc_range``) nodes of up to ``fanout``
    children, until one node remains. A lone entry at index 0 sits in ``ma_root``.

    :returns: the top node (None for a lone entry or an empty tree).
    """
    b = MapleBuilder(sk)
    flags = MT_FLAGS_ALLOC_RANGE if alloc_range else 0
    if not entries:
        b.root(mt, 0, flags=flags)
        return None
    if len(entries) == 1 and entries[0][:2] == (0, 0) and entries[0][2] & 3 != 2:
        b.root(mt, entries[0][2], flags=flags)
        return None
    ranges = fill_gaps(entries)
    level = [b.leaf(ranges[i : i + leaf_fill]) for i in range(0, len(ranges), leaf_fill)]
    height = 1
    kind = MAPLE_ARANGE_64 if alloc_range else MAPLE_RANGE_64
    per = fanout or _MAPLE_SLOTS[kind]
    while len(level) > 1:
        level = [b.internal(level[i : i + per], kind) for i in range(0, len(level), per)]
        height += 1
    b.root(mt, level[0], height, flags)
    return level[0]
