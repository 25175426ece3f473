"""Red-black trees: walking ``struct rb_root`` in order (include/linux/rbtree.h,
include/linux/rbtree_types.h, lib/rbtree.c).

Nodes are ``struct rb_node *``; an entry holding its node as a member is reached with
:func:`rbtree_inorder_for_each_entry` (``rb_entry`` is ``container_of``). Every walk is
bounded in depth and count and stops with :class:`~collector.errors.BrokenStructure` on a
cycle, a misaligned link or a tree deeper than any red-black tree can be.
"""

from __future__ import annotations

from collections.abc import Iterator

from collector.errors import BrokenStructure
from collector.kernel.btf import Kind
from collector.kernel.object import Object, Value, container_of

#: The most nodes a walk yields before it calls the tree broken.
DEFAULT_MAX_COUNT = 1 << 22
#: A red-black tree of n nodes is at most 2*log2(n+1) deep: 128 covers 2**64 nodes.
MAX_DEPTH = 128
#: ``__rb_parent_color`` keeps the colour in bit 0; bit 1 is unused and always clear.
_COLOR_MASK = 3
#: struct rb_node is ``__attribute__((aligned(sizeof(long))))``.
_NODE_ALIGN = 8


class _Layout:
    """Offsets of ``struct rb_node``'s links in this kernel's BTF."""

    def __init__(self, sample: Object) -> None:
        t = sample.kernel.type("struct rb_node")
        self.kernel = sample.kernel
        self.node_ptr = sample.kernel.type("struct rb_node *")
        self.parent_color = t.member("__rb_parent_color")[0] // 8
        self.right = t.member("rb_right")[0] // 8
        self.left = t.member("rb_left")[0] // 8

    def ptr(self, address: int) -> Object:
        return Value(self.kernel, self.node_ptr, address)

    def link(self, node: int, offset: int, what: str) -> int:
        value = self.kernel.read_pointer(node + offset)
        if value % _NODE_ALIGN:
            raise BrokenStructure(
                f"rbtree: {what} of struct rb_node {node:#x} is {value:#x}, not aligned to"
                f" {_NODE_ALIGN} bytes"
            )
        return value

    def parent(self, node: int) -> int:
        return self.kernel.read_pointer(node + self.parent_color) & ~_COLOR_MASK


def _address(obj: Object) -> int:
    """The address an ``Object`` names: a pointer's value, else the object's own address."""
    return obj.value() if obj.type.resolved().kind is Kind.PTR else obj.address


def _root_node(root: Object) -> int:
    """``root->rb_node`` for a ``struct rb_root`` or ``struct rb_root_cached`` (or pointer)."""
    target = root.type.resolved()
    if target.kind is Kind.PTR:
        target = target.pointee.resolved()
    if target.tag == "rb_root_cached":
        return root.member("rb_root.rb_node").value()
    if target.tag != "rb_root":
        raise TypeError(f"expected struct rb_root or struct rb_root_cached, got {root.type}")
    return root.member("rb_node").value()


def _descend(layout: _Layout, node: int, offset: int) -> int:
    """Follow one link (left or right) as far as it goes, bounded by :data:`MAX_DEPTH`."""
    for _ in range(MAX_DEPTH):
        child = layout.link(node, offset, "a child link")
        if not child:
            return node
        node = child
    raise BrokenStructure(f"rbtree: deeper than {MAX_DEPTH} levels below {node:#x} (a cycle?)")


def _ascend(layout: _Layout, node: int, from_side: int) -> int:
    """Go up while ``node`` is its parent's child on side ``from_side``; return the parent
    reached the other way, or 0 at the root."""
    for _ in range(MAX_DEPTH):
        parent = layout.parent(node)
        if not parent or layout.link(parent, from_side, "a child link") != node:
            return parent
        node = parent
    raise BrokenStructure(f"rbtree: more than {MAX_DEPTH} parents above {node:#x} (a cycle?)")


def rb_parent(node: Object) -> Object:
    """``rb_parent(node)``: the parent of a node (NULL for the root).

    :param node: ``struct rb_node *``
    :returns: ``struct rb_node *``
    """
    layout = _Layout(node)
    return layout.ptr(layout.parent(_address(node)))


def RB_EMPTY_NODE(node: Object) -> bool:
    """``RB_EMPTY_NODE(node)``: whether a node is marked as in no tree (its parent is itself).

    :param node: ``struct rb_node *``
    """
    layout = _Layout(node)
    address = _address(node)
    return layout.kernel.read_pointer(address + layout.parent_color) == address


def rb_first(root: Object) -> Object:
    """``rb_first(root)``: the leftmost (smallest) node, or NULL for an empty tree.

    :param root: ``struct rb_root *`` (or ``struct rb_root_cached *``; either as an object)
    :returns: ``struct rb_node *``
    """
    layout = _Layout(root)
    node = _root_node(root)
    return layout.ptr(node and _descend(layout, node, layout.left))


def rb_last(root: Object) -> Object:
    """``rb_last(root)``: the rightmost (largest) node, or NULL for an empty tree.

    :param root: ``struct rb_root *`` (or ``struct rb_root_cached *``)
    :returns: ``struct rb_node *``
    """
    layout = _Layout(root)
    node = _root_node(root)
    return layout.ptr(node and _descend(layout, node, layout.right))


def _step(node: Object, forward: bool) -> Object:
    layout = _Layout(node)
    address = _address(node)
    if layout.kernel.read_pointer(address + layout.parent_color) == address:
        return layout.ptr(0)  # RB_EMPTY_NODE
    near, far = (layout.right, layout.left) if forward else (layout.left, layout.right)
    child = layout.link(address, near, "a child link")
    if child:
        return layout.ptr(_descend(layout, child, far))
    return layout.ptr(_ascend(layout, address, near))


def rb_next(node: Object) -> Object:
    """``rb_next(node)``: the node after ``node`` in order, or NULL after the last.

    :param node: ``struct rb_node *``
    :returns: ``struct rb_node *``
    """
    return _step(node, forward=True)


def rb_prev(node: Object) -> Object:
    """``rb_prev(node)``: the node before ``node`` in order, or NULL before the first.

    :param node: ``struct rb_node *``
    :returns: ``struct rb_node *``
    """
    return _step(node, forward=False)


def rbtree_inorder_for_each(root: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """Every node of a tree in order (smallest first), following child links only.

    :param root: ``struct rb_root *`` (or ``struct rb_root_cached *``; either as an object)
    :param max_count: the most nodes before the tree is called broken.
    :returns: ``struct rb_node *`` objects.
    :raises BrokenStructure: a node reached twice (a cycle), a misaligned link, a tree deeper
        than :data:`MAX_DEPTH` or holding more than ``max_count`` nodes.
    """
    layout = _Layout(root)
    node = _root_node(root)
    if node % _NODE_ALIGN:
        raise BrokenStructure(f"rbtree: root node {node:#x} is not aligned to {_NODE_ALIGN}")
    seen: set[int] = set()
    stack: list[int] = []
    count = 0
    while stack or node:
        while node:
            if node in seen:
                raise BrokenStructure(f"rbtree: struct rb_node {node:#x} is reached twice")
            seen.add(node)
            if len(stack) >= MAX_DEPTH:
                raise BrokenStructure(f"rbtree: deeper than {MAX_DEPTH} levels at {node:#x}")
            stack.append(node)
            node = layout.link(node, layout.left, "rb_left")
        node = stack.pop()
        count += 1
        if count > max_count:
            raise BrokenStructure(f"rbtree: more than {max_count} nodes")
        yield layout.ptr(node)
        node = layout.link(node, layout.right, "rb_right")


def rbtree_inorder_for_each_entry(
    type: str, root: Object, member: str, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[Object]:
    """Every entry of a tree in order: ``rb_entry(node, type, member)`` of each node.

    :param type: the entry type, e.g. ``"struct vmap_area"``.
    :param root: ``struct rb_root *`` (or ``struct rb_root_cached *``)
    :param member: the entry's ``struct rb_node`` member, e.g. ``"rb_node"``.
    :param max_count: the most nodes before the tree is called broken.
    :returns: ``type`` objects (as :func:`~collector.kernel.object.container_of` gives them).
    """
    for node in rbtree_inorder_for_each(root, max_count):
        yield container_of(node, type, member)
