"""xarray and radix tree helpers over xarrays built in synthetic memory as xas_store() lays
them out."""

from __future__ import annotations

import random

import pytest

from collector.errors import BrokenStructure
from collector.helpers.xarray import (
    XA_RETRY_ENTRY,
    XA_ZERO_ENTRY,
    radix_tree_for_each,
    radix_tree_lookup,
    xa_for_each,
    xa_is_internal,
    xa_is_node,
    xa_is_retry,
    xa_is_value,
    xa_is_zero,
    xa_load,
    xa_to_node,
    xa_to_value,
)
from collector.memory import Fate, PageNotCaptured
from collector.testing import SyntheticKernel
from collector.testing.trees import XARRAY, xa_build, xa_mk_internal, xa_mk_value


def make(entries: dict[int, int]) -> tuple[SyntheticKernel, int, dict[int, int]]:
    sk = SyntheticKernel(XARRAY)
    xa = sk.new("struct xarray")
    nodes = xa_build(sk, xa, entries)
    return sk, xa, nodes


def xa_of(sk: SyntheticKernel, xa: int):
    return sk.kernel().object("struct xarray", xa).address_of()


def pointers(sk: SyntheticKernel, n: int) -> list[int]:
    """``n`` distinct, 8-byte aligned kernel pointers (entries ending in 00)."""
    return [sk.alloc(8) for _ in range(n)]


def test_entry_kinds() -> None:
    assert xa_is_value(xa_mk_value(7)) and xa_to_value(xa_mk_value(7)) == 7
    assert xa_is_internal(XA_ZERO_ENTRY) and xa_is_zero(XA_ZERO_ENTRY)
    assert xa_is_retry(XA_RETRY_ENTRY) and not xa_is_node(XA_RETRY_ENTRY)
    assert xa_is_node(0xFFFF888000001002) and not xa_is_value(0xFFFF888000001000)


def test_several_levels_with_pointers_and_values() -> None:
    rng = random.Random(11)
    sk = SyntheticKernel(XARRAY)
    xa = sk.new("struct xarray")
    ptrs = pointers(sk, 300)
    indices = sorted(rng.sample(range(1 << 20), 300))  # needs 4 levels of 64 slots
    entries = {
        index: (xa_mk_value(index * 3) if n % 3 == 0 else ptrs[n])
        for n, index in enumerate(indices)
    }
    nodes = xa_build(sk, xa, entries)
    assert set(nodes.values()) == {0, 6, 12, 18}
    got = [(i, e.value()) for i, e in xa_for_each(xa_of(sk, xa))]
    assert got == sorted(entries.items())
    for index in indices[:50]:
        assert xa_load(xa_of(sk, xa), index).value() == entries[index]
    for absent in (1 << 20, (1 << 24) + 5, indices[0] + 1 if indices[0] + 1 not in entries else 0):
        if absent not in entries:
            assert xa_load(xa_of(sk, xa), absent).value() == 0
    values = [xa_to_value(e) for i, e in xa_for_each(xa_of(sk, xa)) if xa_is_value(e)]
    assert values == [i * 3 for n, i in enumerate(indices) if n % 3 == 0]
    assert [(i, e.value()) for i, e in radix_tree_for_each(xa_of(sk, xa))] == got
    assert radix_tree_lookup(xa_of(sk, xa), indices[7]).value() == entries[indices[7]]


def test_head_entry_and_empty_array() -> None:
    sk, xa, _nodes = make({})
    assert list(xa_for_each(xa_of(sk, xa))) == [] and xa_load(xa_of(sk, xa), 0).value() == 0
    sk = SyntheticKernel(XARRAY)
    xa = sk.new("struct xarray")
    (p,) = pointers(sk, 1)
    assert xa_build(sk, xa, {0: p}) == {}
    assert [(i, e.value()) for i, e in xa_for_each(xa_of(sk, xa))] == [(0, p)]
    assert xa_load(xa_of(sk, xa), 0).value() == p
    assert xa_load(xa_of(sk, xa), 1).value() == 0


def test_zero_retry_and_sibling_entries() -> None:
    sk = SyntheticKernel(XARRAY)
    xa = sk.new("struct xarray")
    a, b = pointers(sk, 2)
    nodes = xa_build(sk, xa, {4: a, 5: XA_ZERO_ENTRY, 9: XA_RETRY_ENTRY, 64: b})
    leaf = max(n for n, shift in nodes.items() if shift == 0)  # the one holding 64
    slots = sk.offsetof("struct xa_node", "slots")
    # A multi-index entry: b also covers 65..67 (siblings pointing at slot 0 of its leaf).
    for i in (1, 2, 3):
        sk.write_u64(leaf + slots + 8 * i, xa_mk_internal(0))
    ptr = xa_of(sk, xa)
    assert [(i, e.value()) for i, e in xa_for_each(ptr)] == [(4, a), (64, b)]
    full = [(i, e.value()) for i, e in xa_for_each(ptr, advanced=True)]
    assert full == [(4, a), (5, XA_ZERO_ENTRY), (9, XA_RETRY_ENTRY), (64, b)]
    assert xa_load(ptr, 5).value() == 0 and xa_load(ptr, 5, advanced=True).value() == XA_ZERO_ENTRY
    assert [xa_load(ptr, i).value() for i in (64, 65, 66, 67, 68)] == [b, b, b, b, 0]


def test_a_node_pointing_back_up_is_a_cycle() -> None:
    sk, xa, nodes = make({1: xa_mk_value(1), 4000: xa_mk_value(2)})
    head = next(n for n, s in nodes.items() if s == 6)
    leaf = next(n for n, s in nodes.items() if s == 0)
    slots = sk.offsetof("struct xa_node", "slots")
    sk.write_u64(leaf + slots + 8 * 5, head | 2)
    with pytest.raises(BrokenStructure, match="shift 0 holds a node"):
        list(xa_for_each(xa_of(sk, xa)))


def test_nodes_that_do_not_fit_their_place() -> None:
    sk, xa, nodes = make({1: xa_mk_value(1), 4096: xa_mk_value(2)})
    head = max(nodes, key=lambda n: nodes[n])
    assert nodes[head] == 12
    middle = min(n for n in nodes if nodes[n] == 6)
    leaf = min(n for n in nodes if nodes[n] == 0)
    sk.set(leaf, "struct xa_node", "shift", 12)
    with pytest.raises(BrokenStructure, match="shift 12 where its parent's level needs 0"):
        list(xa_for_each(xa_of(sk, xa)))
    sk.set(leaf, "struct xa_node", "shift", 0)
    sk.set(leaf, "struct xa_node", "parent", leaf)
    with pytest.raises(BrokenStructure, match="parent"):
        xa_load(xa_of(sk, xa), 1)
    sk.set(leaf, "struct xa_node", "parent", middle)
    sk.set(leaf, "struct xa_node", "array", 0xFFFF888000123000)
    with pytest.raises(BrokenStructure, match="belongs to xarray"):
        list(xa_for_each(xa_of(sk, xa)))
    sk.set(leaf, "struct xa_node", "array", xa)
    sk.set(head, "struct xa_node", "shift", 13)
    with pytest.raises(BrokenStructure, match="impossible shift 13"):
        list(xa_for_each(xa_of(sk, xa)))


def test_max_count_and_a_leaf_the_image_lacks() -> None:
    sk, xa, nodes = make({i: xa_mk_value(i) for i in range(0, 640, 2)})
    with pytest.raises(BrokenStructure, match="more than 100 entries"):
        list(xa_for_each(xa_of(sk, xa), max_count=100))
    last_leaf = max(n for n, s in nodes.items() if s == 0)
    sk.drop(last_leaf, Fate.EXCLUDED)
    with pytest.raises(PageNotCaptured, match="excluded"):
        list(xa_for_each(xa_of(sk, xa)))


def test_xa_to_node() -> None:
    sk, xa, nodes = make({100: xa_mk_value(1)})
    head = sk.kernel().object("struct xarray", xa).xa_head
    assert xa_to_node(head).value() == min(nodes) and int(xa_to_node(head).shift) == 6
