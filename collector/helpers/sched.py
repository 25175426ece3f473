"""Tasks: processes, threads and their states (include/linux/sched.h,
include/linux/sched/signal.h, fs/proc/array.c).

Every task is a ``struct task_struct``. Thread-group leaders are linked from ``init_task``
through ``tasks`` (``for_each_process``); the threads of a group through
``signal->thread_head`` and ``thread_node`` (``for_each_thread``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.errors import NotApplicable
from collector.helpers.list import DEFAULT_MAX_COUNT, list_for_each_entry
from collector.helpers.pid import find_pid, pid_task
from collector.kernel.object import Object, ObjectError

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


def for_each_process(kernel: Kernel, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_process()``: every thread-group leader (``struct task_struct``), in the
    order of ``init_task.tasks``; ``init_task`` itself (the idle task, PID 0) excluded."""
    init_task = kernel.variable("init_task")
    return list_for_each_entry(init_task.type, init_task.tasks, "tasks", max_count)


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
