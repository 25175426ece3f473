"""Tasks read from real captures against the guest's /proc (include/linux/sched.h helpers)."""

from __future__ import annotations

import pytest

from collector.helpers.sched import (
    find_task,
    for_each_process,
    for_each_task,
    for_each_thread,
    is_kthread,
    task_cred_ids,
    task_state,
)
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture
from tests.vm.helpers.conftest import stable_processes

pytestmark = pytest.mark.vm

#: PF_WQ_WORKER and PF_KTHREAD (include/linux/sched.h): a workqueue worker, a kernel thread.
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
#: TASK_COMM_LEN (include/linux/sched.h): comm's size, its NUL included.
TASK_COMM_LEN = 16


def test_for_each_process_matches_proc(capture: Capture, kernel: Kernel) -> None:
    stable = stable_processes(capture)
    seen = {}
    for task in for_each_process(kernel):
        seen[task.pid.value()] = task
    # Every process /proc showed before and after the capture is in the image, with /proc's
    # name, parent, thread group, credentials and kernel-thread flag.
    missing = sorted(set(stable) - set(seen))
    assert missing == []
    for pid, p in stable.items():
        task = seen[pid]
        comm = task.comm.text()
        if p["flags"] & PF_WQ_WORKER:
            # /proc names a workqueue worker after the work it is doing too
            # (wq_worker_comm(): "kworker/0:0-events"), which changes while it runs.
            assert (
                p["comm"] == comm
                or p["comm"].startswith(comm + "-")
                or (len(comm) == TASK_COMM_LEN - 1 and p["comm"].startswith(comm))
            ), pid
        elif p["flags"] & PF_KTHREAD and len(comm) == TASK_COMM_LEN - 1:
            # ... and a kernel thread after its full name, which comm holds cut to 15
            # characters (get_kthread_comm(), 5.17 and later).
            assert p["comm"].startswith(comm), pid
        else:
            assert comm == p["comm"], pid
        assert task.real_parent.tgid.value() == p["ppid"], pid
        assert task.tgid.value() == p["tgid"] == pid
        ids = task_cred_ids(task)
        assert (ids["uid"], ids["euid"], ids["gid"]) == (p["uid"], p["euid"], p["gid"]), pid
        assert is_kthread(task) == bool(p["flags"] & PF_KTHREAD), pid
    # And nothing else: a process in the image that /proc never showed lived only while the
    # capture ran: the command that ran collect, collect itself and the agent's poller, each
    # the child of a process the image holds too.
    shown = {int(pid) for pid in (*capture.before["processes"], *capture.after["processes"])}
    unknown = set(seen) - shown
    names = sorted(seen[pid].comm.text() for pid in unknown)
    assert "collect" in names and len(unknown) <= 6, names
    assert all(seen[pid].real_parent.tgid.value() in seen for pid in unknown), names
    assert len(stable) > 40  # kernel threads, init, the agent, the witness


def test_for_each_thread_and_task(capture: Capture, kernel: Kernel) -> None:
    witness = capture.before["processes"][str(capture.witness)]
    task = find_task(kernel, capture.witness)
    assert task is not None and task.comm.text() == witness["comm"]
    threads = sorted(t.pid.value() for t in for_each_thread(task))
    assert (
        threads == witness["threads"] == capture.after["processes"][str(capture.witness)]["threads"]
    )
    every = {t.pid.value() for t in for_each_task(kernel)}
    assert set(witness["threads"]) <= every
    assert {int(p) for p in stable_processes(capture)} <= every


def test_task_state_of_sleeping_tasks(capture: Capture, kernel: Kernel) -> None:
    # The witness sleeps in time.sleep() throughout, in both of its threads.
    witness = find_task(kernel, capture.witness)
    assert witness is not None
    assert [task_state(t) for t in for_each_thread(witness)] == ["S (sleeping)"] * 2
    # A task asleep (S, I) right before and right after the capture is asleep in the image,
    # unless it woke up while the capture ran (periodic kernel threads do): then it is R.
    stable = stable_processes(capture)
    compared = exact = 0
    for task in for_each_process(kernel):
        pid = task.pid.value()
        p = stable.get(pid)
        if p is None:
            continue
        if p["state"] == capture.after["processes"][str(pid)]["state"] and p["state"] in "SI":
            got = task_state(task)[0]
            assert got in (p["state"], "R"), (pid, p["comm"], got)
            compared += 1
            exact += got == p["state"]
    assert compared > 30 and exact >= 0.8 * compared, (compared, exact)
    assert task_state(kernel.variable("init_task"))[0] == "R"  # the idle task
