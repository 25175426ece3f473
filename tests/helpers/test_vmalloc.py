"""The busy vmap area lists, in the global (before 6.9) and per-node (6.9 on) layouts."""

from __future__ import annotations

import struct

import pytest

from collector.api import (
    Implausible,
    for_each_vmap_area,
    for_each_vmap_area_reverse,
    vmap_area_lists,
)
from collector.errors import NotApplicable
from collector.testing import SyntheticKernel

DECLS = """
struct list_head { struct list_head *next, *prev; };
struct rb_node { unsigned long __rb_parent_color; struct rb_node *rb_right; struct rb_node *rb_left; };
struct rb_root { struct rb_node *rb_node; };
typedef struct { unsigned int lock; } spinlock_t;
struct vmap_area {
    unsigned long va_start; unsigned long va_end; struct rb_node rb_node; struct list_head list;
    union { unsigned long subtree_max_size; void *vm; };
};
struct rb_list { struct rb_root root; struct list_head head; spinlock_t lock; };
struct vmap_node { struct rb_list busy; struct rb_list lazy; unsigned long nr_purged; };
"""

STARTS = [0xFFFFC90000000000, 0xFFFFC90000005000, 0xFFFFFFFFC0001000, 0xFFFFFFFFC0010000]


def ring(sk: SyntheticKernel, head: int, nodes: list[int]) -> None:
    links = [head, *nodes]
    for k, node in enumerate(links):
        sk.write(node, struct.pack("<QQ", links[(k + 1) % len(links)], links[k - 1]))


def areas(sk: SyntheticKernel, starts: list[int]) -> list[int]:
    off = sk.offsetof("struct vmap_area", "list")
    return [sk.new("struct vmap_area", va_start=s, va_end=s + 0x2000) + off for s in starts]


@pytest.mark.parametrize("nodes", [0, 1, 3])
def test_every_busy_area_list_by_list_in_address_order(nodes: int) -> None:
    sk = SyntheticKernel(DECLS)
    if nodes == 0:  # before 6.9: LIST_HEAD(vmap_area_list)
        heads = [sk.global_("vmap_area_list", "struct list_head")]
    else:
        array = sk.new("struct vmap_node", nodes)
        size = sk.sizeof("struct vmap_node")
        heads = [
            array + i * size + sk.offsetof("struct vmap_node", "busy.head") for i in range(nodes)
        ]
        sk.write_u64(sk.global_("vmap_nodes", "u64"), array)
        sk.write(sk.global_("nr_vmap_nodes", "u64"), struct.pack("<I", nodes))
    per_list = [STARTS[i :: len(heads)] for i in range(len(heads))]
    for head, starts in zip(heads, per_list, strict=True):
        ring(sk, head, areas(sk, starts))
    kernel = sk.kernel()
    assert [h.address for h in vmap_area_lists(kernel)] == heads
    assert [va.va_start.value() for va in for_each_vmap_area(kernel)] == [
        s for starts in per_list for s in starts
    ]
    top = vmap_area_lists(kernel)[0]
    assert [va.va_end.value() for va in for_each_vmap_area_reverse(top)] == [
        s + 0x2000 for s in reversed(per_list[0])
    ]


def test_an_impossible_node_count_is_implausible() -> None:
    sk = SyntheticKernel(DECLS)
    sk.write_u64(sk.global_("vmap_nodes", "u64"), sk.new("struct vmap_node"))
    sk.write(sk.global_("nr_vmap_nodes", "u64"), struct.pack("<I", 0))
    with pytest.raises(Implausible, match=r"nr_vmap_nodes is 0, outside 1\.\.8192"):
        vmap_area_lists(sk.kernel())


def test_without_either_layout_it_does_not_apply() -> None:
    with pytest.raises(NotApplicable, match="neither vmap_nodes"):
        vmap_area_lists(SyntheticKernel(DECLS).kernel())
