"""Hidden tasks: three views of the tasks set side by side, and every task missing from one.

The views are the task list (``init_task.tasks`` and each group's threads,
include/linux/sched/signal.h), the initial PID namespace's IDR (``init_pid_ns.idr``, each
``struct pid``'s ``PIDTYPE_PID`` task, kernel/pid.c) and the ``task_struct`` objects found in
the slabs of the ``task_struct`` cache (kernel/fork.c's ``task_struct_cachep``, mm/slub.c).
A process unlinked from the task list by a rootkit (direct kernel object manipulation) is
still in the IDR and in its slab; one taken out of the IDR too is still in its slab.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.api import (
    Analysis,
    BrokenStructure,
    CollectorError,
    Field,
    ImageError,
    Implausible,
    NotApplicable,
    Option,
    PageNotCaptured,
    for_each_pid,
    for_each_possible_cpu,
    for_each_process_entry,
    for_each_thread,
    hookimpl,
    per_cpu,
    pid_task,
)
from collector.helpers.slab import (
    cpu_freelists,
    find_slabs,
    is_slub,
    slab_freelist,
    slab_objects,
)
from collector.plugins.sysinfo import getboottime64

if TYPE_CHECKING:
    from collector.api import Kernel, Object

#: The three views, as records name them.
TASK_LIST = "task list"
PID_IDR = "pid idr"
SLAB = "task_struct slab"
VIEWS = (TASK_LIST, PID_IDR, SLAB)

#: ``PID_MAX_LIMIT`` on 64-bit kernels (include/linux/threads.h): no PID is larger, so no
#: walk of tasks is longer.
PID_MAX_LIMIT = 4 * 1024 * 1024
#: The first entries of each view are checked strictly: a wrong one means the image's types
#: do not fit its memory, not that a task came or went while the capture ran.
STRICT = 3
#: ``TASK_COMM_LEN`` (include/linux/sched.h).
TASK_COMM_LEN = 16
#: ``TASK_STATE_MAX`` (include/linux/sched.h, 6.1 on; smaller before): no state bit is
#: at or above it.
TASK_STATE_MAX = 0x10000
#: ``TASK_NEW`` (include/linux/sched.h): set by sched_fork() until wake_up_new_task().
TASK_NEW = 0x0800
#: ``exit_state`` values (include/linux/sched.h).
EXIT_DEAD = 0x10
EXIT_ZOMBIE = 0x20
EXIT_TRACE = EXIT_ZOMBIE | EXIT_DEAD
EXIT_STATES = {
    0: None,
    EXIT_DEAD: "EXIT_DEAD",
    EXIT_ZOMBIE: "EXIT_ZOMBIE",
    EXIT_TRACE: "EXIT_TRACE",
}
#: ``PF_EXITING`` and ``PF_IDLE`` (include/linux/sched.h).
PF_EXITING = 0x00000004
PF_IDLE = 0x00000002
#: The most references a task is believed to hold (refcount_t saturates at INT_MIN / 2).
MAX_USAGE = 1 << 30
#: The lowest kernel address under either paging mode (5-level's direct map starts above).
KERNEL_HALF = 0xFF00000000000000
PAGE_SIZE = 4096

FIELDS = (
    Field(
        "kind",
        "str",
        "task: a task missing from a view (with --all, every task); idle: a CPU's idle task"
        " (--all only); summary: the last record, the counts of each view",
    ),
    Field("pid", "int", "task_struct.pid: the thread ID"),
    Field("tgid", "int", "task_struct.tgid: the process (thread group) ID"),
    Field("comm", "str", "task_struct.comm"),
    Field("address", "hex", "the struct task_struct's address"),
    Field("seen_in", "str", "the views holding the task, comma-separated"),
    Field("missing_from", "str", "the views not holding it, comma-separated"),
    Field(
        "exiting",
        "bool",
        "the task looks exited or exiting (exit_state set, PF_EXITING, or usage 0): a live"
        " capture may have read one view before it left and another after",
    ),
    Field(
        "starting",
        "bool",
        "the task is still being created (TASK_NEW) or started after the capture began"
        " (start_boottime): a capture may see it in one view only",
    ),
    Field("note", "str", "why the task is missing where it is; the summary's counts"),
)

HIDDEN_TASKS = Analysis(
    name="hidden_tasks",
    summary="tasks missing from the task list, the PID IDR or the task_struct slabs",
    fields=FIELDS,
    options=(Option("all", bool, False, "list every task with the views it is in"),),
    run=lambda kernel, options: hidden_tasks(kernel, bool(options.get("all"))),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [HIDDEN_TASKS]


# -- reading one task -------------------------------------------------------------------------


def _task(kernel: Kernel, address: int) -> Object:
    return kernel.object("struct task_struct", address)


def _usage(task: Object) -> int:
    usage = task.usage
    # 5.0 made usage a refcount_t ("sched/core: Convert task_struct.usage to refcount_t").
    return (usage.refs.counter if usage.type.has_member("refs") else usage.counter).value()


def _state(task: Object) -> int:
    # 5.14 renamed state to __state ("sched: Change task_struct::state").
    return (task.member("__state") if task.type.has_member("__state") else task.state).value()


def _comm(task: Object) -> str | None:
    """comm when it is non-empty printable text ending within TASK_COMM_LEN; else None."""
    raw = task.comm.read_bytes()[:TASK_COMM_LEN]
    nul = raw.find(b"\0")
    if nul <= 0:
        return None
    try:
        text = raw[:nul].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def not_a_task(task: Object) -> str | None:
    """Why a slab slot holding ``task`` is not a live task, or None when it is one.

    The tests, in order (see docs/analyses/hidden_tasks.md):
    ``usage`` between 1 and 2^30 (a freed task's last reference is gone); ``pid`` and
    ``tgid`` in 0..PID_MAX_LIMIT; ``comm`` non-empty printable text; ``__state`` below
    TASK_STATE_MAX and ``exit_state`` one of 0, EXIT_DEAD, EXIT_ZOMBIE, EXIT_TRACE;
    ``stack`` a page-aligned kernel address (NULL allowed once the task has exited, whose
    stack release_task_stack() gives back); ``group_leader`` itself for a group leader, else
    a task of the same ``tgid``.
    """
    kernel = task.kernel
    usage = _usage(task)
    if not 1 <= usage <= MAX_USAGE:
        return f"usage {usage}: no reference holds it (freed or being freed)"
    pid, tgid = task.pid.value(), task.tgid.value()
    if not (0 <= pid <= PID_MAX_LIMIT and 0 <= tgid <= PID_MAX_LIMIT):
        return f"pid {pid}, tgid {tgid}: outside 0..{PID_MAX_LIMIT}"
    if _comm(task) is None:
        return "comm is not text"
    state, exit_state = _state(task), task.exit_state.value()
    if not 0 <= state < TASK_STATE_MAX:
        return f"__state {state:#x} has bits no state has"
    if exit_state not in EXIT_STATES:
        return f"exit_state {exit_state:#x} is no exit state"
    exited = exit_state or task.flags.value() & PF_EXITING
    stack = task.stack.value()
    if stack == 0 and not exited:
        return "no stack, yet not exited"
    if stack and (stack < KERNEL_HALF or stack % PAGE_SIZE):
        return f"stack {stack:#x} is not a page of kernel memory"
    leader = task.group_leader.value()
    if pid == tgid and leader != task.address:
        return f"a group leader (pid == tgid) whose group_leader is {leader:#x}"
    if pid != tgid:
        if leader == 0 or leader == task.address:
            return f"a thread (pid {pid} != tgid {tgid}) leading its own group"
        leader_tgid = _task(kernel, leader).tgid.value()
        if leader_tgid != tgid:
            return f"group_leader {leader:#x} has tgid {leader_tgid}, not {tgid}"
    return None


def transient(task: Object, began: int | None = None) -> tuple[bool, bool, list[str]]:
    """Whether a task looks exiting and whether it is starting, and the signs seen.

    :param began: CLOCK_BOOTTIME (ns) when the capture began, if known: a task started
        later began while the capture ran.
    """
    signs = []
    exit_state = task.exit_state.value()
    if exit_state:
        signs.append(EXIT_STATES.get(exit_state) or f"exit_state {exit_state:#x}")
    if task.flags.value() & PF_EXITING:
        signs.append("PF_EXITING")
    if _usage(task) == 0:
        signs.append("usage 0")
    exiting = bool(signs)
    starting = False
    if not exiting:
        if _state(task) & TASK_NEW:
            starting = True
            signs.append("TASK_NEW")
        started = _start_boottime(task)
        if began is not None and started is not None and started > began:
            starting = True
            signs.append(
                f"started {started / 1e9:.3f} s after boot, after the capture began"
                f" ({began / 1e9:.3f} s)"
            )
    return exiting, starting, signs


def _start_boottime(task: Object) -> int | None:
    # 5.5 renamed real_start_time to start_boottime ("sched: Rename real_start_time").
    for name in ("start_boottime", "real_start_time"):
        if task.type.has_member(name):
            return task.member(name).value()
    return None


def capture_began(kernel: Kernel) -> int | None:
    """CLOCK_BOOTTIME in ns when the capture began: the image's start time (wall clock)
    less the boot time the timekeeper gives (as sysinfo's boot_time); None when either is
    unknown."""
    start = kernel.memory.metadata.get("start_time")
    if not isinstance(start, str):
        return None
    try:
        when = dt.datetime.fromisoformat(start)
        boot = getboottime64(kernel)
    except (ValueError, CollectorError, PageNotCaptured):
        return None
    if when.tzinfo is None:
        return None
    began = int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000 - boot
    return began if began > 0 else None


# -- the views --------------------------------------------------------------------------------


@dataclass
class Views:
    """What the walks found: each view's tasks by address, and what to tell the reader."""

    seen: dict[str, set[int]] = field(default_factory=lambda: {v: set() for v in VIEWS})
    idle: dict[int, int] = field(default_factory=dict)  # address -> CPU
    #: Why a slot of a task_struct slab is not a task: address -> reason.
    slots: dict[int, str] = field(default_factory=dict)
    slabs: int = 0
    slots_total: int = 0
    free: int = 0
    rejected: int = 0
    notes: list[str] = field(default_factory=list)
    #: CLOCK_BOOTTIME when the capture began (:func:`capture_began`).
    began: int | None = None
    #: The runqueues could not be read: a PID 0 task with PF_IDLE is taken as an idle task.
    idle_by_flag: bool = False


def idle_tasks(kernel: Kernel, views: Views) -> None:
    """The idle tasks: ``init_task`` and each CPU's ``rq->idle`` (kernel/sched/sched.h).
    They have PID 0 and sit on no list and in no IDR by design."""
    init = kernel.variable("init_task")
    views.idle[init.address] = 0
    try:
        for cpu in for_each_possible_cpu(kernel):
            idle = per_cpu(kernel, "runqueues", cpu).idle.value()
            if idle:
                views.idle.setdefault(idle, cpu)
    except (ImageError, PageNotCaptured, KeyError) as e:
        views.notes.append(f"idle tasks: runqueues not read ({e}); PF_IDLE trusted instead")
        views.idle_by_flag = True


def _strict_task(task: Object, what: str) -> None:
    pid = task.pid.value()
    if not 0 <= pid <= PID_MAX_LIMIT:
        raise Implausible(f"{what} pid", f"is {pid}, outside 0..{PID_MAX_LIMIT}")
    if _comm(task) is None:
        raise Implausible(f"{what} comm", f"is not text: {task.comm.read_bytes().hex()}")


def walk_task_list(kernel: Kernel, views: Views) -> None:
    """``for_each_process_thread()``, kept going over what a live capture tears: a break
    in ``init_task.tasks`` is walked around from the other end, and a thread list that
    breaks keeps the threads found before the break."""
    init = kernel.variable("init_task")
    if init.pid.value() != 0:
        raise Implausible("init_task.pid", f"is {init.pid.value()}, not 0")
    _strict_task(init, "init_task")
    found = views.seen[TASK_LIST]
    processes: list[Object] = []

    def strict(process: Object) -> None:
        _strict_task(process, f"task {process.address:#x} (process {len(processes) + 1})")

    # for_each_process_entry bridges a list a live capture tore (forward, then backwards
    # from init_task) and notes where; tasks it calls torn are still judged below.
    try:
        for entry in for_each_process_entry(kernel, PID_MAX_LIMIT, strict, STRICT):
            if entry.note:
                views.notes.append(f"task list at pid {entry.task.pid.value()}: {entry.note}")
            processes.append(entry.task)
    except BrokenStructure as e:
        views.notes.append(f"task list: {e}")
    for process in processes:
        if not _plausible_task(process):
            views.notes.append(f"task list: {process.address:#x} is not a task; skipped")
            continue
        found.add(process.address)
        try:
            for thread in for_each_thread(process, PID_MAX_LIMIT):
                if _plausible_task(thread):
                    found.add(thread.address)
        except (BrokenStructure, ImageError, PageNotCaptured) as e:
            views.notes.append(f"threads of {process.pid.value()}: {e}")


def _plausible_task(task: Object) -> bool:
    try:
        pid = task.pid.value()
        return 0 < pid <= PID_MAX_LIMIT and _comm(task) is not None
    except (ImageError, PageNotCaptured):
        return False


def walk_pid_idr(kernel: Kernel, views: Views) -> None:
    """Each PID of ``init_pid_ns`` and the task that uses it as its own (``PIDTYPE_PID``).
    A PID with no such task (a process group or session whose leader left) adds none."""
    found = views.seen[PID_IDR]
    n = 0
    try:
        for nr, pid in for_each_pid(kernel, max_count=PID_MAX_LIMIT):
            n += 1
            if not 0 < nr <= PID_MAX_LIMIT:
                if n <= STRICT:
                    raise Implausible(
                        "init_pid_ns.idr", f"gives PID {nr}, outside 1..{PID_MAX_LIMIT}"
                    )
                views.notes.append(f"pid idr: PID {nr} is out of range; skipped")
                continue
            try:
                task = pid_task(pid, "PIDTYPE_PID")
                if task.is_null():
                    continue
                task = task.deref()
                if n <= STRICT:
                    _strict_task(task, f"the task of PID {nr}")
                    if task.pid.value() != nr:
                        raise Implausible(f"the task of PID {nr}", f"has pid {task.pid.value()}")
                if _plausible_task(task):
                    found.add(task.address)
                else:
                    views.notes.append(f"pid idr: PID {nr} leads to no task; skipped")
            except (BrokenStructure, PageNotCaptured) as e:
                views.notes.append(f"pid idr: PID {nr}: {e}")
    except BrokenStructure as e:
        if n == 0:
            raise
        views.notes.append(f"pid idr: {e}")


def walk_task_slabs(kernel: Kernel, views: Views) -> None:
    """The live tasks in the slabs of the ``task_struct`` cache (see :func:`not_a_task`)."""
    if not is_slub(kernel):
        raise NotApplicable("the kernel's slab allocator is not SLUB")
    found = views.seen[SLAB]
    by_cache: dict[int, list[tuple[Object, int]]] = {}
    caches: dict[int, Object] = {}
    for cache, slab, order in find_slabs(kernel, "task_struct"):
        caches.setdefault(cache.value(), cache)
        by_cache.setdefault(cache.value(), []).append((slab, order))
    if not caches:
        raise NotApplicable("no slab of a kmem_cache named task_struct in the memory map")
    for address, cache in caches.items():
        _check_cache(kernel, cache)
        cpu_lists: dict[int, list[int]] = {}
        for _, slab, first in cpu_freelists(cache):
            cpu_lists.setdefault(slab.value(), []).append(first)
        for slab, order in by_cache[address]:
            views.slabs += 1
            objects = slab_objects(cache, slab, order)
            views.slots_total += len(objects)
            free = _free_objects(cache, slab, objects, cpu_lists.get(slab.value(), []), views)
            views.free += len(free)
            for obj in objects:
                if obj in free:
                    views.slots[obj] = "its slot in the task_struct slab is on a freelist"
                    continue
                task = _task(kernel, obj)
                try:
                    reason = not_a_task(task)
                except (ImageError, PageNotCaptured) as e:
                    reason = f"unreadable: {e}"
                if reason is None and task.pid.value() == 0:
                    idle = obj in views.idle or (
                        views.idle_by_flag and task.flags.value() & PF_IDLE
                    )
                    if not idle:
                        reason = "pid 0, yet no CPU's idle task"
                    elif obj not in views.idle:
                        views.idle[obj] = -1
                if reason is None:
                    found.add(obj)
                else:
                    views.rejected += 1
                    views.slots[obj] = f"its slot in the task_struct slab fails the test: {reason}"


def _check_cache(kernel: Kernel, cache: Object) -> None:
    """The cache's object size must hold every member read (x86 sizes task_struct at run
    time, arch_task_struct_size, below BTF's size, which counts the largest FPU state)."""
    t = kernel.type("struct task_struct")
    needed = max(
        t.member(m)[0] // 8 + t.member(m)[2].size
        for m in ("comm", "group_leader", "stack", "exit_state", "pid", "tgid", "flags")
    )
    size = (
        cache.object_size.value()
        if cache.type.resolved().pointee.has_member("object_size")
        else cache.size.value()
    )
    if not needed <= size <= 1 << 20:
        raise Implausible(
            f"kmem_cache task_struct at {cache.value():#x} object_size",
            f"is {size}, below the {needed} bytes task_struct's members need",
        )


def _free_objects(
    cache: Object, slab: Object, objects: list[int], cpu_firsts: list[int], views: Views
) -> set[int]:
    """The slab's free objects: its own freelist and the CPU freelists that draw on it."""
    free: set[int] = set()
    firsts = [slab.freelist.value(), *cpu_firsts]
    for first in firsts:
        try:
            free.update(slab_freelist(cache, slab, first, objects))
        except (BrokenStructure, ImageError, PageNotCaptured) as e:
            views.notes.append(f"slab {slab.value():#x}: {e}")
            counters = slab.deref()
            if (
                counters.type.has_member("inuse")
                and counters.inuse.value() == 0
                and not counters.frozen.value()
            ):
                # No object of an unfrozen slab is in use: all of them are free.
                free.update(objects)
    return free


# -- the analysis -----------------------------------------------------------------------------


def hidden_tasks(kernel: Kernel, show_all: bool = False) -> Iterator[dict[str, Any]]:
    views = Views(began=capture_began(kernel))
    walk_task_list(kernel, views)
    idle_tasks(kernel, views)
    walk_pid_idr(kernel, views)
    walk_task_slabs(kernel, views)
    everything = set().union(*views.seen.values())
    by_pid: dict[int, list[int]] = {}
    rows = []
    for address in everything:
        if address in views.idle:
            continue
        try:
            task = _task(kernel, address)
            pid = task.pid.value()
        except (ImageError, PageNotCaptured):
            pid = None
        rows.append((pid if pid is not None else -1, address))
        if pid is not None:
            by_pid.setdefault(pid, []).append(address)
    differ = transients = 0
    for pid, address in sorted(rows):
        seen = [v for v in VIEWS if address in views.seen[v]]
        missing = [v for v in VIEWS if v not in seen]
        if missing:
            differ += 1
        if not missing and not show_all:
            continue
        record = _record(kernel, address, seen, missing, views, by_pid.get(pid, []))
        if missing and (record["exiting"] or record["starting"]):
            transients += 1
        yield record
    if show_all:
        for address, cpu in sorted(views.idle.items(), key=lambda kv: kv[1]):
            yield _idle_record(kernel, address, cpu, views)
    yield _summary(views, differ, transients)


def _record(
    kernel: Kernel, address: int, seen: list[str], missing: list[str], views: Views, same: list[int]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "task",
        "pid": None,
        "tgid": None,
        "comm": None,
        "address": address,
        "seen_in": ", ".join(seen),
        "missing_from": ", ".join(missing),
        "exiting": None,
        "starting": None,
        "note": None,
    }
    notes = []
    try:
        task = _task(kernel, address)
        record["pid"] = task.pid.value()
        record["tgid"] = task.tgid.value()
        record["comm"] = task.comm.text()
        exiting, starting, signs = transient(task, views.began)
        record["exiting"], record["starting"] = exiting, starting
        notes.extend(signs)
    except (ImageError, PageNotCaptured) as e:
        notes.append(f"unreadable: {e}")
    if SLAB in missing:
        notes.append(views.slots.get(address, "not in a slab of the task_struct cache"))
    others = [a for a in same if a != address]
    if others:
        notes.append("its pid is also the task at " + ", ".join(f"{a:#x}" for a in others))
    record["note"] = "; ".join(notes) or None
    return record


def _idle_record(kernel: Kernel, address: int, cpu: int, views: Views) -> dict[str, Any]:
    task = _task(kernel, address)
    seen = [v for v in VIEWS if address in views.seen[v]]
    where = f"CPU {cpu}" if cpu >= 0 else "a CPU (PF_IDLE)"
    return {
        "kind": "idle",
        "pid": task.pid.value(),
        "tgid": task.tgid.value(),
        "comm": task.comm.text(),
        "address": address,
        "seen_in": ", ".join(seen),
        "missing_from": ", ".join(v for v in VIEWS if v not in seen),
        "exiting": False,
        "starting": False,
        "note": f"the idle task of {where}: on no list and in no IDR by design; not compared",
    }


def _summary(views: Views, differ: int, transients: int) -> dict[str, Any]:
    idle = set(views.idle)
    tasks = {v: len(views.seen[v] - idle) for v in VIEWS}
    counts = (
        f"tasks: task list {tasks[TASK_LIST]}, pid idr {tasks[PID_IDR]},"
        f" task_struct slab {tasks[SLAB]}; {views.slabs} task_struct slabs of {views.slots_total}"
        f" slots: {views.free} free, {views.rejected} failing the task test;"
        f" {len(idle)} idle tasks, not compared"
    )
    if differ == 0:
        verdict = "the three views agree"
    else:
        verdict = f"{differ} tasks differ, {transients} of them starting or exiting"
    parts = [f"{verdict}: {counts}", *views.notes]
    return {
        "kind": "summary",
        "pid": None,
        "tgid": None,
        "comm": None,
        "address": None,
        "seen_in": None,
        "missing_from": None,
        "exiting": None,
        "starting": None,
        "note": "; ".join(parts),
    }
