"""Tasks: processes, threads and their states (include/linux/sched.h,
include/linux/sched/signal.h, fs/proc/array.c).

Every task is a ``struct task_struct``. Thread-group leaders are linked from ``init_task``
through ``tasks`` (``for_each_process``); the threads of a group through
``signal->thread_head`` and ``thread_node`` (``for_each_thread``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from construct import ConstructError

from collector.errors import BrokenStructure, CollectorError, ImageError, NotApplicable
from collector.helpers.list import (
    DEFAULT_MAX_COUNT,
    LIST_POISON2,
    list_for_each,
    list_for_each_entry,
    list_for_each_reverse,
)
from collector.helpers.pid import find_pid, pid_task
from collector.kernel.object import Object, ObjectError
from collector.memory import PageNotCaptured

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

# Task state bits (include/linux/sched.h); the reported ones have kept their values since
# TASK_REPORT was introduced, and TASK_FROZEN (0x8000) is unused before 6.1.
TASK_RUNNING = 0x0000
TASK_INTERRUPTIBLE = 0x0001
TASK_UNINTERRUPTIBLE = 0x0002
TASK_NOLOAD = 0x0400
TASK_RTLOCK_WAIT = 0x1000
TASK_FROZEN = 0x8000
TASK_REPORT = (
    0x7F  # INTERRUPTIBLE | UNINTERRUPTIBLE | STOPPED | TRACED | EXIT_DEAD | EXIT_ZOMBIE | PARKED
)
TASK_REPORT_IDLE = TASK_REPORT + 1
TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD

#: fs/proc/array.c's task_state_array: what /proc/PID/stat and ps show, by state index.
TASK_STATE_ARRAY = (
    "R (running)",
    "S (sleeping)",
    "D (disk sleep)",
    "T (stopped)",
    "t (tracing stop)",
    "X (dead)",
    "Z (zombie)",
    "P (parked)",
    "I (idle)",
)

#: ``PF_KTHREAD`` (include/linux/sched.h): the task is a kernel thread.
PF_KTHREAD = 0x00200000


#: ``PID_MAX_LIMIT`` (include/linux/threads.h) on 64-bit: no PID reaches it.
PID_MAX_LIMIT = 4 * 1024 * 1024

#: The errors reading one task can meet: a page the image lacks, an address no table maps,
#: a broken structure, bytes construct cannot parse.
_READ_ERRORS = (CollectorError, ConstructError)


class ProcessEntry:
    """A process found on ``init_task.tasks``: its task, why it is torn (None when it is
    not) and what to say about the list where it was found (None when nothing)."""

    __slots__ = ("note", "task", "torn")

    def __init__(self, task: Object, torn: str | None) -> None:
        self.task = task
        self.torn = torn
        self.note: str | None = None


def torn_reason(task: Object, leader: int | None = None) -> str | None:
    """Why a task read from a list cannot be trusted, or None: unlinked while the capture
    ran, an ID out of range, a leader that is not its group's (or, given ``leader``, a
    thread of another group), a task_struct the image lacks."""
    try:
        # list_del_rcu() leaves ->next for RCU readers and poisons ->prev
        # (include/linux/rculist.h): a process reaped while the capture ran, still reachable
        # from the entry before it, its task_struct on its way to being freed.
        if leader is None and task.tasks.prev.value() == LIST_POISON2:
            return (
                "exited while the capture ran: unlinked from init_task.tasks (tasks.prev is"
                " LIST_POISON2)"
            )
        pid = task.pid.value()
        tgid = task.tgid.value()
    except _READ_ERRORS as e:
        return f"torn record: {e}"
    if not 1 <= pid < PID_MAX_LIMIT:
        return f"torn record: pid {pid} is outside 1..{PID_MAX_LIMIT - 1}"
    if leader is not None:
        if tgid != leader:
            return f"torn record: tgid {tgid} is not its leader's pid {leader}"
    elif tgid != pid:
        return f"torn record: tgid {tgid} is not its pid {pid}"
    return None


def for_each_process_entry(
    kernel: Kernel,
    max_count: int = DEFAULT_MAX_COUNT,
    validate: Callable[[Object], None] | None = None,
    validate_count: int = 0,
) -> Iterator[ProcessEntry]:
    """Every process on ``init_task.tasks``, the idle task excluded, each with why it cannot
    be trusted (:attr:`ProcessEntry.torn`), streamed in list order.

    A live capture reads the list over seconds while processes come and go, so it can break
    at a process that exited meanwhile (its memory freed and reused, or its links poisoned).
    Going forward stops at the first bad link; the list is then walked backwards from
    ``init_task`` (through ``prev``) up to the part already seen, and the break is said in
    the notes of the entries on either side of it. A break right after a torn entry (one
    unlinked or with impossible IDs) is what exiting processes do and ends the walk quietly;
    a break after a sound entry that the backward walk cannot bridge is a list that does
    not close: :class:`BrokenStructure`, after the entries found.

    :param validate: called on each of the first ``validate_count`` tasks going forward;
        what it raises ends the walk (a plugin's plausibility check).
    """
    init_task = kernel.variable("init_task")
    head = init_task.tasks
    seen: set[int] = set()
    pending: ProcessEntry | None = None
    count = 0
    forward: CollectorError | None = None
    nodes = list_for_each(head, max_count)
    while True:
        try:
            node = next(nodes, None)
        except (ImageError, PageNotCaptured) as e:
            forward = e
            break
        if node is None:
            break
        task = node.container_of(init_task.type, "tasks")
        if validate is not None and count < validate_count:
            validate(task)
        count += 1
        seen.add(node.address)
        if pending is not None:
            yield pending
        pending = ProcessEntry(task, torn_reason(task))
    if forward is None:
        if pending is not None:
            yield pending
        return

    recovered: list[ProcessEntry] = []
    backward: CollectorError | None = None
    try:
        for node in list_for_each_reverse(head, max_count):
            if node.address in seen:
                break
            task = node.container_of(init_task.type, "tasks")
            recovered.append(ProcessEntry(task, torn_reason(task)))
    except (ImageError, PageNotCaptured) as e:
        backward = e
    explained = pending is not None and pending.torn is not None
    if not recovered and not explained:
        detail = f"; walking it backwards from init_task: {backward}" if backward else ""
        if pending is not None:
            yield pending
        raise BrokenStructure(f"init_task.tasks: {forward}{detail}")
    if pending is not None:
        pending.note = f"init_task.tasks breaks after this process: {forward}"
        yield pending
    for i, entry in enumerate(reversed(recovered)):
        if i == 0:
            entry.note = (
                "found walking init_task.tasks backwards from its head, past where it broke"
                + (f" (and that walk broke too: {backward})" if backward else "")
            )
        yield entry


def for_each_process(kernel: Kernel, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_process()``: every thread-group leader (``struct task_struct``), in the
    order of ``init_task.tasks``; ``init_task`` itself (the idle task, PID 0) excluded.

    Processes that exited while a live capture ran, or whose task_struct the image holds
    torn, are left out, and a list broken at such a process is bridged by walking it back
    from its head (see :func:`for_each_process_entry`, which gives them with the reason).
    """
    for entry in for_each_process_entry(kernel, max_count):
        if entry.torn is None:
            yield entry.task


def for_each_thread(task: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_thread()``: every thread of ``task``'s group (``struct task_struct *``),
    the leader included."""
    t = task.deref() if task.type.resolved().kind.name == "PTR" else task
    # Since 3.14 ("signal: introduce for_each_thread() ...") threads hang on
    # signal->thread_head through thread_node; thread_group, the older list, went in 6.7.
    if t.signal.type.resolved().pointee.has_member("thread_head"):
        return list_for_each_entry(t.type, t.signal.thread_head, "thread_node", max_count)
    return _thread_group(t, max_count)


def _thread_group(leader: Object, max_count: int) -> Iterator[Object]:
    yield leader
    yield from list_for_each_entry(leader.type, leader.thread_group, "thread_group", max_count)


def for_each_task(kernel: Kernel, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_process_thread()``: every task (every thread of every process)."""
    for process in for_each_process(kernel, max_count):
        yield from for_each_thread(process, max_count)


def find_task(kernel: Kernel, pid: int) -> Object | None:
    """The task whose PID (thread ID) is ``pid``, or None: ``find_task_by_pid_ns()`` in the
    initial PID namespace, through its IDR (4.15 and later), else by walking every task.
    PID 0 is the idle task, ``init_task``."""
    if pid == 0:
        return kernel.variable("init_task")
    if _pid_idr(kernel):
        task = pid_task(find_pid(kernel, pid), "PIDTYPE_PID")
        if task.is_null():
            return None
        found = task.deref()
        # A PID freed and reused while the capture ran can leave the IDR pointing at
        # another task's struct pid: trust the task's own number.
        if found.pid.value() == pid:
            return found
    for task in for_each_task(kernel):
        if task.pid.value() == pid:
            return task
    return None


def _pid_idr(kernel: Kernel) -> bool:
    # 4.15 ("pid: replace pid bitmap implementation with IDR API") put PIDs in an IDR.
    try:
        return kernel.type("struct pid_namespace").has_member("idr")
    except ObjectError:
        return False


def task_state_index(task: Object) -> int:
    """``task_state_index()``: the index into :data:`TASK_STATE_ARRAY` of a task's state."""
    # 5.14 renamed task_struct.state to __state ("sched: Change task_struct::state").
    state = (task.member("__state") if task.type.has_member("__state") else task.state).value()
    exit_state = task.exit_state.value()
    report = (state | exit_state) & TASK_REPORT
    if state & TASK_IDLE == TASK_IDLE:
        report = TASK_REPORT_IDLE
    if state & (TASK_RTLOCK_WAIT | TASK_FROZEN):
        report = TASK_UNINTERRUPTIBLE
    return report.bit_length()


def task_state(task: Object) -> str:
    """The state as /proc/PID/status shows it (``"S (sleeping)"``); its first letter is
    the one /proc/PID/stat and ``ps`` show."""
    return TASK_STATE_ARRAY[task_state_index(task)]


def is_kthread(task: Object) -> bool:
    """Whether a task is a kernel thread (``PF_KTHREAD``)."""
    return bool(task.flags.value() & PF_KTHREAD)


def task_cred_ids(task: Object) -> dict[str, int]:
    """The task's real and effective user and group IDs (``task->cred``), as numbers."""
    cred = task.cred
    if cred.is_null():
        raise NotApplicable(f"task at {task.address:#x} has no credentials")
    return {name: cred.member(name).val.value() for name in ("uid", "gid", "euid", "egid")}
