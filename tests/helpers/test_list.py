"""include/linux/list.h helpers on synthetic kernels: exact entries, and every kind of breakage."""

from __future__ import annotations

import pytest

from collector.errors import BrokenStructure
from collector.helpers.list import (
    LIST_POISON1,
    hlist_empty,
    hlist_for_each_entry,
    list_count,
    list_empty,
    list_first_entry,
    list_for_each,
    list_for_each_entry,
    list_for_each_entry_reverse,
    list_is_singular,
    validate_list,
)
from collector.memory import Fate, PageNotCaptured
from collector.testing import SyntheticKernel

TYPES = """
struct list_head { struct list_head *next, *prev; };
struct hlist_node { struct hlist_node *next, **pprev; };
struct hlist_head { struct hlist_node *first; };
struct item { int id; struct list_head link; struct hlist_node hnode; };
struct holder { struct list_head items; struct hlist_head bucket; };
"""


def build(ids: list[int], spread: bool = False) -> tuple[SyntheticKernel, int, list[int]]:
    """A holder whose ``items`` list links items with ``ids`` in order, as list_add_tail would;
    ``spread`` puts each item on a page of its own."""
    sk = SyntheticKernel(TYPES)
    holder = sk.global_("holder", "struct holder")
    link = sk.offsetof("struct item", "link")
    head = holder + sk.offsetof("struct holder", "items")
    items = []
    for i in ids:
        if spread:
            sk.alloc_page()
        items.append(sk.new("struct item", id=i))
    nodes = [head] + [i + link for i in items]
    for k, node in enumerate(nodes):
        sk.write_u64(node, nodes[(k + 1) % len(nodes)])  # next
        sk.write_u64(node + 8, nodes[k - 1])  # prev
    return sk, holder, items


def holder_items(kernel, holder: int):
    return kernel.object("struct holder", holder).items


@pytest.mark.parametrize("ids", [[], [7], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_walks_give_the_entries_in_order(ids: list[int]) -> None:
    sk, holder, items = build(ids)
    kernel = sk.kernel()
    head = holder_items(kernel, holder)
    entries = list(list_for_each_entry("struct item", head, "link"))
    assert [e.address for e in entries] == items
    assert [e.id.value() for e in entries] == ids
    backwards = list_for_each_entry_reverse("struct item", head.address_of(), "link")
    assert [e.id.value() for e in backwards] == ids[::-1]
    assert list_empty(head) == (ids == [])
    assert list_is_singular(head) == (len(ids) == 1)
    assert list_count(head) == len(ids)
    assert [n.address for n in list_for_each(head)] == [
        i + sk.offsetof("struct item", "link") for i in items
    ]
    validate_list(head)
    if ids:
        assert list_first_entry("struct item", head, "link").id.value() == ids[0]
    else:
        with pytest.raises(BrokenStructure, match="empty"):
            list_first_entry("struct item", head, "link")


def test_a_loop_that_misses_the_head_is_broken_not_endless() -> None:
    sk, holder, items = build([1, 2, 3])
    link = sk.offsetof("struct item", "link")
    sk.write_u64(items[2] + link, items[1] + link)  # the third entry points back at the second
    head = holder_items(sk.kernel(), holder)
    with pytest.raises(BrokenStructure, match="loop that does not return to the head"):
        list(list_for_each_entry("struct item", head, "link"))


def test_null_poisoned_and_overlong_lists() -> None:
    sk, holder, items = build([1, 2])
    link = sk.offsetof("struct item", "link")
    sk.write_u64(items[1] + link, 0)
    with pytest.raises(BrokenStructure, match="NULL link"):
        list(list_for_each(holder_items(sk.kernel(), holder)))
    sk.write_u64(items[1] + link, LIST_POISON1)
    with pytest.raises(BrokenStructure, match="poisoned"):
        list(list_for_each(holder_items(sk.kernel(), holder)))
    sk, holder, _ = build(list(range(50)))
    with pytest.raises(BrokenStructure, match="more than 10 entries"):
        list(list_for_each(holder_items(sk.kernel(), holder), max_count=10))


def test_validate_list_finds_a_wrong_prev() -> None:
    sk, holder, items = build([1, 2, 3])
    link = sk.offsetof("struct item", "link")
    sk.write_u64(items[2] + link + 8, items[0] + link)
    with pytest.raises(BrokenStructure, match="has prev"):
        validate_list(holder_items(sk.kernel(), holder))


def test_a_next_pointer_that_leaves_captured_memory() -> None:
    sk, holder, items = build([1, 2, 3], spread=True)
    sk.drop(items[2], Fate.EXCLUDED)
    head = holder_items(sk.kernel(), holder)
    walked = []
    with pytest.raises(PageNotCaptured, match="excluded"):
        for entry in list_for_each_entry("struct item", head, "link"):
            walked.append(entry.id.value())
    assert walked == [1, 2]


def test_hlist() -> None:
    sk = SyntheticKernel(TYPES)
    holder = sk.global_("holder", "struct holder")
    bucket = holder + sk.offsetof("struct holder", "bucket")
    hnode = sk.offsetof("struct item", "hnode")
    items = [sk.new("struct item", id=i) for i in (10, 20, 30)]
    sk.write_u64(bucket, items[0] + hnode)
    sk.write_u64(items[0] + hnode, items[1] + hnode)
    sk.write_u64(items[1] + hnode, items[2] + hnode)
    kernel = sk.kernel()
    head = kernel.object("struct holder", holder).bucket
    assert not hlist_empty(head)
    assert [e.id.value() for e in hlist_for_each_entry("struct item", head, "hnode")] == [
        10,
        20,
        30,
    ]
    sk.write_u64(items[2] + hnode, items[0] + hnode)
    head = sk.kernel().object("struct holder", holder).bucket
    with pytest.raises(BrokenStructure, match="reached twice"):
        list(hlist_for_each_entry("struct item", head, "hnode"))
    empty = SyntheticKernel(TYPES)
    at = empty.global_("holder", "struct holder")
    assert hlist_empty(empty.kernel().object("struct holder", at).bucket)
