"""ID allocators: ``struct idr`` lookups and walks (include/linux/idr.h, lib/idr.c).

An IDR is a radix tree (``idr_rt``, a ``struct xarray`` since 4.20) indexed by ID minus
``idr_base``; see :mod:`collector.helpers.xarray` for the layouts read.
"""

from __future__ import annotations

from collections.abc import Iterator

from collector.helpers.xarray import DEFAULT_MAX_COUNT, radix_tree_for_each, radix_tree_lookup
from collector.kernel.btf import Kind
from collector.kernel.object import Object, Value


def _idr(idr: Object) -> Object:
    return idr.deref() if idr.type.resolved().kind is Kind.PTR else idr


def _base(idr: Object) -> int:
    # idr_base came with 4.16 ("idr: Make 1-based IDRs more efficient"); before it every
    # IDR started at 0.
    if idr.type.resolved().has_member("idr_base"):
        return int(idr.member("idr_base"))
    return 0


def idr_find(idr: Object, id: int) -> Object:
    """``idr_find(idr, id)``: the pointer stored for ``id``, or NULL.

    :param idr: ``struct idr *``
    :param id: the ID.
    :returns: ``void *``
    """
    obj = _idr(idr)
    index = id - _base(obj)
    if index < 0:
        return Value(obj.kernel, obj.kernel.type("void *"), 0)
    return radix_tree_lookup(obj.member("idr_rt"), index)


def idr_for_each(idr: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[tuple[int, Object]]:
    """``idr_for_each(idr, fn, data)`` as an iterator: every ID with a pointer, in order.

    :param idr: ``struct idr *``
    :param max_count: the most entries before the tree is called broken.
    :returns: ``(id, void *)`` pairs; NULL entries (allocated, not yet filled) are skipped.
    """
    obj = _idr(idr)
    base = _base(obj)
    for index, entry in radix_tree_for_each(obj.member("idr_rt"), max_count):
        yield index + base, entry
