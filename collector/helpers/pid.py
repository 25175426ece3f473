"""PIDs: from a number to its ``struct pid`` and the tasks using it (include/linux/pid.h,
kernel/pid.c).

A PID namespace files its ``struct pid`` objects in an IDR (``ns->idr``, since 4.15 "pid:
replace pid bitmap implementation with IDR API"); that is the only layout read here. A
``struct pid`` lists the tasks using it per ``enum pid_type`` through their
``pid_links[type]`` (4.19, "pids: Move the pgrp and session pid pointers from task_struct
to signal_struct" turned ``pids[type].node`` into ``pid_links[type]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.errors import BrokenStructure, NotApplicable
from collector.helpers.idr import idr_find, idr_for_each
from collector.helpers.xarray import DEFAULT_MAX_COUNT
from collector.kernel.btf import Kind
from collector.kernel.object import Object, Value

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel


def _ns(kernel: Kernel, ns: Object | None) -> Object:
    if ns is None:
        ns = kernel.variable("init_pid_ns")
    ns = ns.deref() if ns.type.resolved().kind is Kind.PTR else ns
    if not ns.type.resolved().has_member("idr"):
        raise NotApplicable(
            f"{ns.type} has no idr: PID namespaces before 4.15 hash their PIDs instead"
        )
    return ns


def find_pid_ns(nr: int, ns: Object) -> Object:
    """``find_pid_ns(nr, ns)``: the ``struct pid`` numbered ``nr`` in namespace ``ns``.

    :param nr: the PID number as seen in ``ns``.
    :param ns: ``struct pid_namespace *``
    :returns: ``struct pid *`` (NULL when no PID has that number).
    """
    ns = _ns(ns.kernel, ns)
    kernel = ns.kernel
    entry = idr_find(ns.member("idr").address_of(), nr)
    return Value(kernel, kernel.type("struct pid *"), entry.value())


def find_pid(kernel: Kernel, nr: int, ns: Object | None = None) -> Object:
    """``find_vpid(nr)`` for a namespace given outright: the ``struct pid`` numbered ``nr``.

    :param kernel: the kernel.
    :param nr: the PID number.
    :param ns: ``struct pid_namespace *``; the initial namespace (``init_pid_ns``) if None.
    :returns: ``struct pid *`` (NULL when no PID has that number).
    """
    return find_pid_ns(nr, _ns(kernel, ns))


def for_each_pid(
    kernel: Kernel, ns: Object | None = None, max_count: int = DEFAULT_MAX_COUNT
) -> Iterator[tuple[int, Object]]:
    """Every PID of a namespace, by number: ``(nr, struct pid *)``.

    :param ns: ``struct pid_namespace *``; ``init_pid_ns`` if None.
    :param max_count: the most PIDs before the IDR is called broken.
    """
    ns = _ns(kernel, ns)
    pid_ptr = kernel.type("struct pid *")
    for nr, entry in idr_for_each(ns.member("idr").address_of(), max_count):
        yield nr, Value(kernel, pid_ptr, entry.value())


def _pid_type(kernel: Kernel, pid_type: str | int) -> int:
    if isinstance(pid_type, int):
        return pid_type
    for name, value in kernel.type("enum pid_type").enumerators():
        if name == pid_type:
            return value
    raise ValueError(f"enum pid_type has no {pid_type!r}")


def pid_task(pid: Object, pid_type: str | int = "PIDTYPE_PID") -> Object:
    """``pid_task(pid, type)``: the first task using ``pid`` as its ``type`` PID.

    :param pid: ``struct pid *``
    :param pid_type: ``enum pid_type``, by name (``"PIDTYPE_TGID"``) or value.
    :returns: ``struct task_struct *`` (NULL when ``pid`` is NULL or no task uses it so).
    """
    kernel = pid.kernel
    task_ptr = kernel.type("struct task_struct *")
    if pid.is_null():
        return Value(kernel, task_ptr, 0)
    index = _pid_type(kernel, pid_type)
    heads = pid.member("tasks")
    if not 0 <= index < len(heads):
        raise ValueError(f"pid type {pid_type!r} is outside struct pid's tasks[]")
    first = heads[index].member("first").value()
    if not first:
        return Value(kernel, task_ptr, 0)
    task = kernel.type("struct task_struct")
    links_bit, _, links = task.member("pid_links")
    offset = links_bit // 8 + index * links.resolved().pointee.size
    address = first - offset
    if address <= 0:
        raise BrokenStructure(f"struct pid {pid.value():#x}: tasks[{index}].first is {first:#x}")
    return Value(kernel, task_ptr, address)
