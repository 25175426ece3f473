"""PID helpers on real kernels: every PID /proc showed before and after the capture is
found through init_pid_ns's IDR and leads to the task /proc describes."""

from __future__ import annotations

import pytest

from collector.helpers.idr import idr_for_each
from collector.helpers.pid import find_pid, for_each_pid, pid_task
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm

#: include/linux/sched.h: a kernel thread, whose /proc comm may be longer than task->comm
#: (its full name, or a workqueue worker's current work).
PF_KTHREAD = 0x00200000


def stable(capture: Capture) -> dict[int, dict]:
    """Processes alive in both snapshots, with the same start time (the same process)."""
    before, after = capture.before["processes"], capture.after["processes"]
    return {
        int(pid): p
        for pid, p in before.items()
        if pid in after and after[pid]["starttime"] == p["starttime"]
    }


def comm_matches(task_comm: str, proc: dict) -> bool:
    if proc["flags"] & PF_KTHREAD:
        return proc["comm"].startswith(task_comm)
    return proc["comm"] == task_comm


def test_find_pid_and_pid_task_for_every_stable_pid(capture: Capture, kernel: Kernel) -> None:
    processes = stable(capture)
    assert capture.witness in processes
    threads = 0
    for nr, proc in processes.items():
        task = pid_task(find_pid(kernel, nr), "PIDTYPE_PID")
        assert not task.is_null(), f"PID {nr} ({proc['comm']}) not found"
        assert int(task.pid) == nr and int(task.tgid) == proc["tgid"]
        assert comm_matches(task.comm.text(), proc), (task.comm.text(), proc["comm"])
        after = capture.after["processes"][str(nr)]["threads"]
        for tid in set(proc["threads"]) & set(after):
            thread = pid_task(find_pid(kernel, tid))
            assert int(thread.pid) == tid and int(thread.tgid) == nr
            threads += 1
        leader = pid_task(find_pid(kernel, nr), "PIDTYPE_TGID")
        assert int(leader.tgid) == nr
    witness = capture.after["processes"][str(capture.witness)]["threads"]
    assert len(witness) == 2
    print(
        f"{kernel.release}: {len(processes)} stable processes and their {threads} threads (leaders"
        " included) found through init_pid_ns.idr"
    )


def test_idr_for_each_holds_every_stable_pid(capture: Capture, kernel: Kernel) -> None:
    ns = kernel.variable("init_pid_ns")
    ids = dict(idr_for_each(ns.idr.address_of()))
    wanted = set(stable(capture))
    for proc in stable(capture).values():
        wanted |= set(proc["threads"]) & set(
            capture.after["processes"][str(proc["pid"])]["threads"]
        )
    assert wanted <= set(ids)
    # Each entry is the struct pid numbered by its index (level 0: the initial namespace).
    # Only for the stable PIDs: a capture reads memory over seconds while processes come
    # and go, so a transient PID's slot and its struct pid may be read at different moments.
    pids = dict(for_each_pid(kernel))
    assert pids.keys() == ids.keys()
    for nr in wanted:
        assert int(pids[nr].numbers[0].nr) == nr
    torn = sorted(nr for nr, pid in pids.items() if int(pid.numbers[0].nr) != nr)
    print(
        f"{kernel.release}: idr_for_each gave {len(ids)} PIDs, a superset of the {len(wanted)}"
        f" stable ones; transient PIDs whose struct pid was reused meanwhile: {torn or 'none'}"
    )
