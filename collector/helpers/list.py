"""Doubly linked lists and hash lists (include/linux/list.h, include/linux/types.h).

``struct list_head { struct list_head *next, *prev; }`` is embedded in the structures it
links; the list's head is a bare ``list_head`` (a global such as ``modules``, or a member
such as ``init_task.tasks``). ``struct hlist_head { struct hlist_node *first; }`` heads a
NULL-terminated list of ``struct hlist_node { struct hlist_node *next, **pprev; }``.

Every walk stops with :class:`~collector.errors.BrokenStructure` at a NULL or poisoned link,
at a loop that does not pass through the head, or after ``max_count`` entries.
"""

from __future__ import annotations

from collections.abc import Iterator

from collector.errors import BrokenStructure
from collector.kernel.object import Object, Type, container_of

#: The most entries a walk follows unless told otherwise: far above any real kernel list
#: (a machine with a million tasks is not one this project meets) and low enough that a
#: hostile image cannot keep an analysis busy for long.
DEFAULT_MAX_COUNT = 1_000_000

#: ``LIST_POISON1``/``LIST_POISON2`` (include/linux/poison.h) with x86_64's
#: ``POISON_POINTER_DELTA`` (CONFIG_ILLEGAL_POINTER_VALUE 0xdead000000000000): the links a
#: deleted entry keeps.
LIST_POISON1 = 0xDEAD000000000100
LIST_POISON2 = 0xDEAD000000000122


def _head(head: Object) -> Object:
    """A ``struct list_head``/``hlist_head`` object from itself or a pointer to it."""
    if head.type.resolved().kind.name == "PTR":
        return head.deref()
    return head


def _check_link(where: str, node: int, link: int) -> None:
    if link == 0:
        raise BrokenStructure(f"{where}: the entry at {node:#x} has a NULL link")
    if link in (LIST_POISON1, LIST_POISON2):
        raise BrokenStructure(
            f"{where}: the entry at {node:#x} has a poisoned link {link:#x} (a deleted entry)"
        )


def _walk(head: Object, member: str, max_count: int) -> Iterator[int]:
    """Addresses of the ``list_head`` nodes of a list, following ``member`` (next or prev)."""
    head = _head(head)
    start = head.address
    kernel = head.kernel
    where = f"list at {start:#x}"
    offset = head.type.resolved().member(member)[0] // 8
    seen = {start}
    node = start
    count = 0
    while True:
        link = kernel.read_pointer(node + offset)
        _check_link(where, node, link)
        if link == start:
            return
        if link in seen:
            raise BrokenStructure(
                f"{where}: the entry at {node:#x} links back to {link:#x}, a loop that does"
                " not return to the head"
            )
        count += 1
        if count > max_count:
            raise BrokenStructure(f"{where}: more than {max_count} entries")
        seen.add(link)
        yield link
        node = link


def list_empty(head: Object) -> bool:
    """``list_empty()``: whether ``head`` (``struct list_head *``) has no entries."""
    head = _head(head)
    return head.next.value() == head.address


def list_is_singular(head: Object) -> bool:
    """``list_is_singular()``: whether the list has exactly one entry."""
    head = _head(head)
    nxt = head.next.value()
    return nxt != head.address and nxt == head.prev.value()


def list_for_each(head: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``list_for_each()``: every ``struct list_head`` of the list after ``head``."""
    head = _head(head)
    for node in _walk(head, "next", max_count):
        yield Object(head.kernel, head.type, node)


def list_for_each_reverse(head: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``list_for_each_prev()``: the list's ``struct list_head``s from the last to the first."""
    head = _head(head)
    for node in _walk(head, "prev", max_count):
        yield Object(head.kernel, head.type, node)


def list_for_each_entry(
    type: str | Type, head: Object, member: str, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[Object]:
    """``list_for_each_entry()``: every ``type`` linked through its ``member`` on ``head``.

    :param type: the entries' type, e.g. ``"struct task_struct"``.
    :param head: ``struct list_head *`` (or the ``list_head`` itself) heading the list.
    :param member: the ``list_head`` member of ``type`` that links the entries (``"tasks"``).
    :param max_count: the most entries followed before the list is called broken.
    :raises BrokenStructure: a NULL or poisoned link, a loop not through the head, too many.
    """
    for node in list_for_each(head, max_count):
        yield container_of(node, type, member)


def list_for_each_entry_reverse(
    type: str | Type, head: Object, member: str, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[Object]:
    """``list_for_each_entry_reverse()``: :func:`list_for_each_entry` from the last entry."""
    for node in list_for_each_reverse(head, max_count):
        yield container_of(node, type, member)


def list_first_entry(type: str | Type, head: Object, member: str) -> Object:
    """``list_first_entry()``: the first entry (the list must not be empty)."""
    head = _head(head)
    if list_empty(head):
        raise BrokenStructure(f"list at {head.address:#x} is empty: it has no first entry")
    return container_of(head.next, type, member)


def list_count(head: Object, max_count: int = DEFAULT_MAX_COUNT) -> int:
    """``list_count_nodes()``: how many entries the list holds."""
    return sum(1 for _ in _walk(_head(head), "next", max_count))


def validate_list(head: Object, max_count: int = DEFAULT_MAX_COUNT) -> None:
    """Check every entry's ``prev`` points back at the entry before it.

    :raises BrokenStructure: naming the first entry whose links disagree.
    """
    head = _head(head)
    kernel = head.kernel
    prev_offset = head.type.resolved().member("prev")[0] // 8
    prev = head.address
    for node in _walk(head, "next", max_count):
        back = kernel.read_pointer(node + prev_offset)
        if back != prev:
            raise BrokenStructure(
                f"list at {head.address:#x}: the entry at {node:#x} has prev {back:#x},"
                f" not {prev:#x}"
            )
        prev = node
    if kernel.read_pointer(head.address + prev_offset) != prev:
        raise BrokenStructure(f"list at {head.address:#x}: the head's prev is not the last entry")


# -- hash lists -----------------------------------------------------------------------------


def hlist_empty(head: Object) -> bool:
    """``hlist_empty()``: whether ``head`` (``struct hlist_head *``) has no entries."""
    return _head(head).first.value() == 0


def hlist_for_each(head: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``hlist_for_each()``: every ``struct hlist_node`` of the list, first to last."""
    head = _head(head)
    kernel = head.kernel
    node_type = head.first.type.resolved().pointee
    where = f"hlist at {head.address:#x}"
    next_offset = node_type.resolved().member("next")[0] // 8
    node = head.first.value()
    seen: set[int] = set()
    while node:
        if node in (LIST_POISON1, LIST_POISON2):
            raise BrokenStructure(f"{where}: a poisoned link {node:#x} (a deleted entry)")
        if node in seen:
            raise BrokenStructure(f"{where}: the entry at {node:#x} is reached twice (a loop)")
        if len(seen) >= max_count:
            raise BrokenStructure(f"{where}: more than {max_count} entries")
        seen.add(node)
        yield Object(kernel, node_type, node)
        node = kernel.read_pointer(node + next_offset)


def hlist_for_each_entry(
    type: str | Type, head: Object, member: str, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[Object]:
    """``hlist_for_each_entry()``: every ``type`` linked through its ``hlist_node member``."""
    for node in hlist_for_each(head, max_count):
        yield container_of(node, type, member)
