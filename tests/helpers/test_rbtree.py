"""rbtree helpers over red-black trees built in synthetic memory by lib/rbtree.c's insertion."""

from __future__ import annotations

import random

import pytest

from collector.errors import BrokenStructure
from collector.helpers.rbtree import (
    RB_EMPTY_NODE,
    rb_first,
    rb_last,
    rb_next,
    rb_parent,
    rb_prev,
    rbtree_inorder_for_each,
    rbtree_inorder_for_each_entry,
)
from collector.memory import Fate, PageNotCaptured
from collector.testing import SyntheticKernel
from collector.testing.trees import RBTREE, rb_insert

DECLS = RBTREE + "struct item { long key; struct rb_node node; struct rb_root_cached in; };"


def build(keys: list[int], apart: int | None = None) -> tuple[SyntheticKernel, int, dict[int, int]]:
    """A tree of ``struct item`` keyed by ``key``, inserted in the order given; the item
    keyed ``apart`` alone on its own page."""
    sk = SyntheticKernel(DECLS)
    root = sk.new("struct rb_root")
    items = {key: sk.new("struct item", key=key) for key in keys if key != apart}
    if apart is not None:
        items[apart] = sk.alloc_page()
        sk.set(items[apart], "struct item", "key", apart)
        sk.alloc_page()  # nothing else shares it
    node = sk.offsetof("struct item", "node")
    rb_insert(sk, root, [(key, items[key] + node) for key in keys])
    return sk, root, items


def root_ptr(sk: SyntheticKernel, root: int):
    kernel = sk.kernel()
    return kernel.object("struct rb_root", root).address_of()


def test_inorder_of_a_few_hundred_nodes_inserted_at_random_is_sorted() -> None:
    keys = random.Random(7).sample(range(100_000), 400)
    sk, root, items = build(keys)
    entries = list(rbtree_inorder_for_each_entry("struct item", root_ptr(sk, root), "node"))
    assert [int(e.key) for e in entries] == sorted(keys)
    assert [e.address for e in entries] == [items[k] for k in sorted(keys)]


def test_first_last_next_prev_and_parent_walk_the_same_order() -> None:
    keys = random.Random(3).sample(range(1000), 300)
    sk, root, items = build(keys)
    ptr = root_ptr(sk, root)
    offset = sk.offsetof("struct item", "node")
    want = [items[k] + offset for k in sorted(keys)]
    forward, node = [], rb_first(ptr)
    while not node.is_null():
        forward.append(node.value())
        node = rb_next(node)
    assert forward == want
    backward, node = [], rb_last(ptr)
    while not node.is_null():
        backward.append(node.value())
        node = rb_prev(node)
    assert backward == want[::-1]
    top = sk.kernel().object("struct rb_root", root).rb_node
    assert rb_parent(top).is_null()
    assert rb_parent(top.rb_left).value() == top.value()
    assert not RB_EMPTY_NODE(top)


def test_rb_root_cached_and_an_empty_tree() -> None:
    sk, root, _items = build([2, 1, 3])
    cached = sk.new("struct rb_root_cached")
    kernel = sk.kernel()
    empty = kernel.object("struct rb_root_cached", cached)
    assert list(rbtree_inorder_for_each(empty)) == []
    assert rb_first(empty).is_null() and rb_last(empty.address_of()).is_null()
    real = kernel.object("struct rb_root", root).rb_node.value()
    sk.set(cached, "struct rb_root_cached", "rb_root.rb_node", real)
    kernel = sk.kernel()
    got = rbtree_inorder_for_each_entry(
        "struct item", kernel.object("struct rb_root_cached", cached), "node"
    )
    assert [int(e.key) for e in got] == [1, 2, 3]


def test_empty_node_has_no_next() -> None:
    sk = SyntheticKernel(DECLS)
    node = sk.new("struct rb_node")
    sk.write_u64(node, node)  # RB_CLEAR_NODE
    ptr = sk.kernel().object("struct rb_node", node).address_of()
    assert RB_EMPTY_NODE(ptr)
    assert rb_next(ptr).is_null() and rb_prev(ptr).is_null()


def test_a_child_link_back_to_an_ancestor_is_a_cycle() -> None:
    sk, root, items = build(list(range(20)))
    leaf = items[19] + sk.offsetof("struct item", "node")
    top = sk.kernel().object("struct rb_root", root).rb_node.value()
    sk.set(leaf, "struct rb_node", "rb_right", top)
    with pytest.raises(BrokenStructure, match="reached twice"):
        list(rbtree_inorder_for_each(root_ptr(sk, root)))
    with pytest.raises(BrokenStructure, match="deeper than"):
        rb_last(root_ptr(sk, root))


def test_max_count_and_a_misaligned_link() -> None:
    sk, root, items = build(list(range(50)))
    with pytest.raises(BrokenStructure, match="more than 10 nodes"):
        list(rbtree_inorder_for_each(root_ptr(sk, root), max_count=10))
    node = items[0] + sk.offsetof("struct item", "node")
    sk.set(node, "struct rb_node", "rb_left", 0x1234567)
    with pytest.raises(BrokenStructure, match="not aligned"):
        list(rbtree_inorder_for_each(root_ptr(sk, root)))


def test_a_node_in_a_page_the_image_lacks() -> None:
    sk, root, items = build([10, 5, 15, 20], apart=20)
    sk.drop(items[20], Fate.UNREADABLE)
    walk = rbtree_inorder_for_each_entry("struct item", root_ptr(sk, root), "node")
    assert [int(next(walk).key) for _ in range(3)] == [5, 10, 15]
    with pytest.raises(PageNotCaptured, match="unreadable") as caught:
        next(walk)
    assert caught.value.fate is Fate.UNREADABLE
