"""Maple tree helpers over trees built in synthetic memory as lib/maple_tree.c lays them out:
every node type, several levels, gaps, zero entries, and broken trees."""

from __future__ import annotations

import itertools
import random

import pytest

from collector.errors import BrokenStructure
from collector.helpers.maple_tree import mt_for_each, mte_node_type, mte_to_node, mtree_load
from collector.helpers.xarray import XA_ZERO_ENTRY
from collector.memory import Fate, PageNotCaptured
from collector.testing import SyntheticKernel
from collector.testing.trees import (
    MAPLE_ARANGE_64,
    MAPLE_DENSE,
    MAPLE_LEAF_64,
    MAPLE_RANGE_64,
    MAPLE_TREE,
    ULONG_MAX,
    XARRAY,
    MapleBuilder,
    fill_gaps,
    mt_build,
)


def new_tree() -> tuple[SyntheticKernel, int]:
    sk = SyntheticKernel(XARRAY + MAPLE_TREE)
    return sk, sk.new("struct maple_tree")


def mt_of(sk: SyntheticKernel, mt: int):
    return sk.kernel().object("struct maple_tree", mt).address_of()


def walk(sk: SyntheticKernel, mt: int, **kw) -> list[tuple[int, int, int]]:
    return [(a, b, e.value()) for a, b, e in mt_for_each(mt_of(sk, mt), **kw)]


def random_ranges(sk: SyntheticKernel, n: int, seed: int) -> list[tuple[int, int, int]]:
    """``n`` disjoint page-aligned ranges like VMAs, some adjacent, some with gaps."""
    rng = random.Random(seed)
    out, at = [], 0x400000
    for _ in range(n):
        at += rng.choice((0, 0, 0x1000, 0x10000, 0x7000000))
        size = rng.randrange(1, 64) * 0x1000
        out.append((at, at + size - 1, sk.alloc(8)))
        at += size
    return out


@pytest.mark.parametrize("alloc_range", [False, True], ids=["range_64", "arange_64"])
def test_several_levels_of_internal_nodes(alloc_range: bool) -> None:
    sk, mt = new_tree()
    ranges = random_ranges(sk, 500, seed=5)
    top = mt_build(sk, mt, ranges, alloc_range=alloc_range, leaf_fill=7, fanout=4)
    assert top is not None
    kind = MAPLE_ARANGE_64 if alloc_range else MAPLE_RANGE_64
    assert mte_node_type(top.enode) == kind
    depth, node = 1, top
    while node.children:
        node, depth = node.children[0], depth + 1
    assert depth >= 4 and mte_node_type(node.enode) == MAPLE_LEAF_64
    assert walk(sk, mt) == ranges
    ptr = mt_of(sk, mt)
    for first, last, entry in ranges[::25]:
        assert mtree_load(ptr, first).value() == entry
        assert mtree_load(ptr, last).value() == entry
        assert mtree_load(ptr, (first + last) // 2).value() == entry
    for first, last, entry in fill_gaps(ranges):
        if not entry:
            assert mtree_load(ptr, first).value() == 0 and mtree_load(ptr, last).value() == 0


def test_full_leaves_use_every_slot() -> None:
    # 16 ranges per leaf: the last slot has no pivot and runs to the node's max; 15: the
    # last pivot is the node's max; fewer: the metadata says where the data ends.
    for fill in (16, 15, 3):
        sk, mt = new_tree()
        ranges = random_ranges(sk, 200, seed=fill)
        mt_build(sk, mt, ranges, leaf_fill=fill)
        assert walk(sk, mt) == ranges, fill


def test_every_node_type_in_one_tree() -> None:
    sk, mt = new_tree()
    b = MapleBuilder(sk)
    p = [sk.alloc(8) for _ in range(8)]
    leaf1 = b.leaf([(0, 9, 0), (10, 19, p[0]), (20, 99, p[1])])
    dense = b.leaf(
        [(i, i, p[2] if i == 100 else p[3] if i == 117 else 0) for i in range(100, 131)],
        MAPLE_DENSE,
    )
    leaf2 = b.leaf([(131, 999, 0), (1000, 1000, p[4]), (1001, ULONG_MAX - 1, 0)])
    leaf3 = b.leaf([(ULONG_MAX, ULONG_MAX, p[5])])
    left = b.internal([leaf1, dense], MAPLE_RANGE_64)
    right = b.internal([leaf2, leaf3], MAPLE_RANGE_64)
    top = b.internal([left, right], MAPLE_ARANGE_64)
    b.root(mt, top, height=3, flags=1)
    assert {mte_node_type(n.enode) for n in (leaf1, dense, left, top)} == {0, 1, 2, 3}
    want = [
        (10, 19, p[0]),
        (20, 99, p[1]),
        (100, 100, p[2]),
        (117, 117, p[3]),
        (1000, 1000, p[4]),
        (ULONG_MAX, ULONG_MAX, p[5]),
    ]
    assert walk(sk, mt) == want
    ptr = mt_of(sk, mt)
    loads = {i: mtree_load(ptr, i).value() for i in (5, 15, 99, 100, 101, 117, 130, 131, 1000)}
    assert loads == {
        5: 0,
        15: p[0],
        99: p[1],
        100: p[2],
        101: 0,
        117: p[3],
        130: 0,
        131: 0,
        1000: p[4],
    }
    assert mtree_load(ptr, ULONG_MAX).value() == p[5]
    assert mte_to_node(top.enode) == top.address


def test_lone_root_entry_empty_tree_and_zero_entries() -> None:
    sk, mt = new_tree()
    (p,) = [sk.alloc(8)]
    assert mt_build(sk, mt, [(0, 0, p)]) is None
    assert walk(sk, mt) == [(0, 0, p)]
    assert mtree_load(mt_of(sk, mt), 0).value() == p and mtree_load(mt_of(sk, mt), 1).value() == 0
    sk, mt = new_tree()
    mt_build(sk, mt, [])
    assert walk(sk, mt) == [] and mtree_load(mt_of(sk, mt), 0).value() == 0
    sk, mt = new_tree()
    mt_build(sk, mt, [(0x1000, 0x1FFF, XA_ZERO_ENTRY), (0x2000, 0x2FFF, p)])
    assert walk(sk, mt) == [(0x2000, 0x2FFF, p)]
    assert walk(sk, mt, advanced=True) == [(0x1000, 0x1FFF, XA_ZERO_ENTRY), (0x2000, 0x2FFF, p)]
    assert mtree_load(mt_of(sk, mt), 0x1800).value() == 0
    assert mtree_load(mt_of(sk, mt), 0x1800, advanced=True).value() == XA_ZERO_ENTRY


def two_levels() -> tuple[SyntheticKernel, int, object, list[tuple[int, int, int]]]:
    sk, mt = new_tree()
    ranges = random_ranges(sk, 40, seed=9)
    top = mt_build(sk, mt, ranges, leaf_fill=10)
    return sk, mt, top, ranges


def test_impossible_node_type() -> None:
    sk, mt, top, _ = two_levels()
    slot = sk.offsetof("struct maple_node", "mr64.slot")
    child = top.children[1]
    sk.write_u64(top.address + slot + 8, child.address | (7 << 3) | 4)
    with pytest.raises(BrokenStructure, match="impossible node type 7"):
        walk(sk, mt)


def test_pivot_out_of_order() -> None:
    sk, mt, top, _ = two_levels()
    leaf = top.children[2]
    pivot = sk.offsetof("struct maple_node", "mr64.pivot")
    sk.write_u64(leaf.address + pivot + 8 * 3, 5)
    with pytest.raises(BrokenStructure, match="pivot 3 is 0x5, out of order"):
        walk(sk, mt)


def test_an_internal_node_cut_short() -> None:
    sk, mt, top, ranges = two_levels()
    slot = sk.offsetof("struct maple_node", "mr64.slot")
    sk.write_u64(top.address + slot + 8 * 1, 0)
    entries = mt_for_each(mt_of(sk, mt))
    first_leaf = [r for r in ranges if r[1] <= top.children[0].last]
    assert [(a, b, e.value()) for a, b, e in itertools.islice(entries, len(first_leaf))] == (
        first_leaf
    )
    with pytest.raises(BrokenStructure, match="a NULL child in slot 1"):
        next(entries)


def test_cycle_dead_node_and_wrong_parent() -> None:
    sk, mt, top, _ = two_levels()
    slot = sk.offsetof("struct maple_node", "mr64.slot")
    parent = sk.offsetof("struct maple_node", "parent")
    sk.write_u64(top.address + slot + 8 * 2, top.children[0].enode)
    with pytest.raises(BrokenStructure, match="reached twice"):
        walk(sk, mt)
    sk, mt, top, _ = two_levels()
    leaf = top.children[1]
    sk.write_u64(leaf.address + parent, leaf.address)
    with pytest.raises(BrokenStructure, match="dead"):
        walk(sk, mt)
    sk.write_u64(leaf.address + parent, top.children[0].address | 0x6)
    with pytest.raises(BrokenStructure, match="reached from"):
        walk(sk, mt)
    sk.write_u64(top.address + parent, 0xFFFF888000ABC001)
    with pytest.raises(BrokenStructure, match="is the root but its parent"):
        mtree_load(mt_of(sk, mt), 0)


def test_max_count_and_a_node_the_image_lacks() -> None:
    sk, mt, _top, _ranges = two_levels()
    with pytest.raises(BrokenStructure, match="more than 5 entries"):
        walk(sk, mt, max_count=5)
    sk, mt = new_tree()
    b = MapleBuilder(sk)
    p, q = sk.alloc(8), sk.alloc(8)
    first = b.leaf([(0, 0xFFF, 0), (0x1000, 0x1FFF, p)])
    sk.alloc_page()
    second = b.leaf([(0x2000, 0x2FFF, q), (0x3000, ULONG_MAX, 0)])  # alone on its page
    sk.alloc_page()
    b.root(mt, b.internal([first, second]), height=2)
    sk.drop(second.address, Fate.NOT_COVERED)
    entries = mt_for_each(mt_of(sk, mt))
    assert next(entries)[2].value() == p
    with pytest.raises(PageNotCaptured, match="not-covered"):
        next(entries)
