"""The kernel's vmalloc areas: busy ``struct vmap_area`` lists (mm/vmalloc.c,
include/linux/vmalloc.h).

Every live vmalloc, vmap and module allocation has a ``struct vmap_area`` (its virtual range,
``va_start`` to ``va_end``, guard page included) and, unless it came from ``vm_map_ram()``, a
``struct vm_struct`` (``va->vm``) naming who asked for it (``vm->caller``). The busy areas
are kept twice, in an rbtree and in a list in address order: one global pair before 6.9
(``vmap_area_root``, ``vmap_area_list``), one pair per ``struct vmap_node`` since ("mm:
vmalloc: remove global vmap_area_root rb-tree", 6.9).

The helpers walk the lists: on live captures the trees tear more visibly (a rotation read
half before, half after), and a list can be walked from its end, where the module area's
allocations sit (they are the highest addresses vmalloc hands out on x86_64).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.errors import NotApplicable
from collector.helpers.list import (
    DEFAULT_MAX_COUNT,
    list_for_each_entry,
    list_for_each_entry_reverse,
)
from collector.kernel.object import Object
from collector.kernel.plausible import plausible_int

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: ``nr_vmap_nodes`` is at most the number of possible CPUs (``vmap_init_nodes()``), so
#: ``NR_CPUS``, whose largest x86_64 setting is 8192, bounds it.
MAX_VMAP_NODES = 8192


def vmap_area_lists(kernel: Kernel) -> list[Object]:
    """The heads of the busy ``struct vmap_area`` lists, each in address order.

    6.9 and later: ``vmap_nodes[i].busy.head`` for each of the ``nr_vmap_nodes`` nodes
    (``static struct vmap_node *vmap_nodes = &single;``). Before: ``&vmap_area_list``
    (``LIST_HEAD(vmap_area_list);``, which VMCOREINFO also names).

    :returns: ``struct list_head`` objects, linking ``struct vmap_area`` through ``list``.
    :raises NotApplicable: the image has neither layout's symbols and types.
    :raises Implausible: ``nr_vmap_nodes`` is not a possible node count.
    """
    symbols = kernel.symbols
    nodes_at = symbols.get("vmap_nodes")
    count_at = symbols.get("nr_vmap_nodes")
    if nodes_at is not None and count_at is not None:
        node_type = kernel.type("struct vmap_node")
        nodes = kernel.object("struct vmap_node *", nodes_at).value()
        count = plausible_int(
            kernel.object("unsigned int", count_at).value(), 1, MAX_VMAP_NODES, "nr_vmap_nodes"
        )
        return [
            kernel.object(node_type, nodes + i * node_type.size).busy.head for i in range(count)
        ]
    list_at = symbols.get("vmap_area_list")
    if list_at is not None:
        return [kernel.object("struct list_head", list_at)]
    raise NotApplicable(
        "the symbol table has neither vmap_nodes and nr_vmap_nodes (6.9 on) nor"
        " vmap_area_list (before 6.9): the busy vmap areas cannot be found"
    )


def for_each_vmap_area(kernel: Kernel, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """Every busy vmalloc area (``struct vmap_area``), list by list, each in address order.

    :raises BrokenStructure: a list that does not close (see
        :func:`~collector.helpers.list.list_for_each_entry`).
    """
    for head in vmap_area_lists(kernel):
        yield from list_for_each_entry("struct vmap_area", head, "list", max_count)


def for_each_vmap_area_reverse(
    head: Object, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[Object]:
    """The areas of one busy list (a head from :func:`vmap_area_lists`) from the highest
    address down: stop early to read only the top of the address space.
    """
    return list_for_each_entry_reverse("struct vmap_area", head, "list", max_count)
