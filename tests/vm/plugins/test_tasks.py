"""pslist, pstree and psaux on real captures, against the guest's own /proc.

The guest listed its processes right before and right after the capture
(tests/vm/snapshot.py: /proc/PID/stat, status, cmdline, exe and task/). A process shown in
both with the same name, parent and start time lived throughout the capture, so the image
must hold it with exactly those values; a command line or executable is compared where /proc
showed the same before and after.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from collector.analyze import analyze_kernel
from collector.kernel.kernel import Kernel
from tests.vm.conftest import WITNESS, WITNESS_ARGS, Capture
from tests.vm.helpers.conftest import stable_processes, unchanged

pytestmark = pytest.mark.vm

#: PF_WQ_WORKER and PF_KTHREAD (include/linux/sched.h): a workqueue worker, a kernel thread.
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
#: TASK_COMM_LEN (include/linux/sched.h): comm's size, its NUL included.
TASK_COMM_LEN = 16
#: /proc/PID/stat's starttime is in clock ticks of USER_HZ, 100 on x86.
NSEC_PER_TICK = 1_000_000_000 // 100


def records(kernel: Kernel, name: str, **options: Any) -> list[dict[str, Any]]:
    result = analyze_kernel(kernel, name, options)
    assert result.error is None, result.error
    return result.records


def same_comm(image: str, p: dict) -> bool:
    """Whether task->comm read from the image is the name /proc showed."""
    if p["flags"] & PF_WQ_WORKER:
        # /proc names a workqueue worker after the work it is doing too
        # (wq_worker_comm(): "kworker/0:0-events"), which changes while it runs.
        return (
            p["comm"] == image
            or p["comm"].startswith(image + "-")
            or (len(image) == TASK_COMM_LEN - 1 and p["comm"].startswith(image))
        )
    if p["flags"] & PF_KTHREAD and len(image) == TASK_COMM_LEN - 1:
        # ... and a kernel thread after its full name, which comm holds cut to 15 characters
        # (get_kthread_comm(), 5.17 and later).
        return p["comm"].startswith(image)
    return image == p["comm"]


def ps_args(cmdline_hex: str) -> str:
    """/proc/PID/cmdline as ps shows it: the strings joined by spaces, the final NUL dropped."""
    data = bytes.fromhex(cmdline_hex)
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.replace(b"\0", b" ").decode("utf-8", "backslashreplace")


def arguments_moved(capture: Capture, pid: int) -> bool:
    """Whether a page of the process's arguments moved to another frame while the capture ran
    (compaction migrates movable pages, and collect is memory pressure): the image then holds
    its page tables and its pages from different moments."""
    before = capture.before["processes"][str(pid)]["arg_frames"]
    after = capture.after["processes"][str(pid)]["arg_frames"]
    return before != after or not before or 0 in before


def boot_seconds(capture: Capture) -> int:
    """The guest's /proc/stat btime: boot, in whole seconds since the epoch."""
    return int(capture.fact("btime").split()[1])


# -- the checks, shared by every guest ----------------------------------------------------------


def check_pslist(capture: Capture, kernel: Kernel) -> None:
    listed = records(kernel, "pslist")
    by_pid: dict[int, dict] = {}
    for r in listed:
        if r["note"] is None:
            assert r["pid"] not in by_pid, r
            by_pid[r["pid"]] = r
    assert 0 not in by_pid  # the idle task is not listed, as ps does not list it
    stable = stable_processes(capture)
    assert sorted(set(stable) - set(by_pid)) == []
    btime = boot_seconds(capture)
    for pid, p in stable.items():
        r = by_pid[pid]
        assert same_comm(r["comm"], p), (pid, r["comm"], p["comm"])
        assert (r["tgid"], r["ppid"]) == (p["tgid"], p["ppid"]), pid
        assert (r["uid"], r["gid"], r["euid"]) == (p["uid"], p["gid"], p["euid"]), pid
        assert r["kthread"] == bool(p["flags"] & PF_KTHREAD), pid
        # start_time is start_boottime, which /proc/PID/stat's starttime counts in ticks.
        assert r["start_time"] // NSEC_PER_TICK == p["starttime"], pid
        # The wall clock: btime and starttime are both cut to their unit, so one second.
        started = dt.datetime.strptime(r["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        assert abs(started - (btime + p["starttime"] / 100)) <= 1, (pid, r["started"])
    # What else the image holds lived only while the capture ran: the command that ran
    # collect, collect itself and the snapshot's poller, and ones that exited meanwhile.
    shown = {int(pid) for pid in (*capture.before["processes"], *capture.after["processes"])}
    unknown = sorted(r["comm"] for pid, r in by_pid.items() if pid not in shown)
    assert "collect" in unknown and len(unknown) <= 6, unknown
    torn = [r for r in listed if r["note"] is not None]
    assert len(torn) <= 4, torn
    print(
        f"{kernel.release}: pslist: {len(listed)} records, {len(stable)} processes /proc"
        f" showed throughout all found; lived only during the capture: {unknown};"
        f" marked: {[(r['pid'], r['comm'], r['note']) for r in torn]}"
    )


def check_witness_threads(capture: Capture, kernel: Kernel) -> None:
    witness = capture.witness
    threads = capture.before["processes"][str(witness)]["threads"]
    assert threads == capture.after["processes"][str(witness)]["threads"]
    assert len(threads) == 2
    got = records(kernel, "pslist", threads=True, pid=witness)
    assert [(r["pid"], r["tid"], r["tgid"]) for r in got] == [
        (witness, t, witness) for t in threads
    ]
    assert all(r["comm"] == "python" and r["note"] is None for r in got)


def check_psaux(capture: Capture, kernel: Kernel) -> None:
    aux = {r["pid"]: r for r in records(kernel, "psaux") if r["note"] is None}
    witness = capture.witness
    w = capture.before["processes"][str(witness)]
    if not arguments_moved(capture, witness):
        expected = " ".join(["python", "-c", WITNESS, *WITNESS_ARGS])
        assert aux[witness]["cmdline"] == expected == ps_args(w["cmdline"])
    assert aux[witness]["exe"] == w["exe"] == capture.after["processes"][str(witness)]["exe"]
    # The guest runs the witness chrooted into the host's root, mounted at /host.
    assert aux[witness]["root"] == "/host"
    compared = kthreads = 0
    moved = []
    for pid, p in unchanged(capture, "cmdline").items():
        r = aux[pid]
        if p["flags"] & PF_KTHREAD:
            # /proc gives a kernel thread no command line; ps shows its name in brackets.
            assert p["cmdline"] == "" and r["cmdline"] == f"[{r['comm']}]", pid
            kthreads += 1
            continue
        if arguments_moved(capture, pid):
            moved.append(pid)
            continue
        assert r["cmdline"] == ps_args(p["cmdline"]), (pid, p["comm"])
        compared += 1
    exes = 0
    for pid, p in unchanged(capture, "exe").items():
        # /proc/PID/exe, read by the snapshot in the witness's root, names the file from that
        # root; the image names it from the process's own: the same for every process here.
        assert aux[pid]["exe"] == p["exe"], (pid, p["comm"])
        exes += p["exe"] is not None
    # The guest is small: its init and the witness are its user processes, and either's
    # arguments may have moved while the capture ran.
    assert compared + len(moved) >= 2 and compared >= 1, (compared, moved)
    assert kthreads > 30 and exes >= 2, (kthreads, exes)
    print(
        f"{kernel.release}: psaux: {compared} user command lines and {exes} executables match"
        f" /proc, {kthreads} kernel threads shown as [comm]; arguments moved: {moved}"
    )


#: The note on a task found by walking the task list backwards past a break in it (a process
#: that exited while the capture ran broke the list). Such a task, if whole, is placed under
#: its parent like any other; a torn or unlinked one is not.
PAST_BREAK = "past where it broke"


def placed(r: dict) -> bool:
    """Whether pstree must put this task in the tree by its parent."""
    return r["note"] is None or (PAST_BREAK in r["note"] and r["ppid"] is not None)


def check_pstree(capture: Capture, kernel: Kernel) -> None:
    listed = {r["pid"]: r for r in records(kernel, "pslist") if placed(r)}
    tree = records(kernel, "pstree")
    depth: dict[int, int] = {}
    for r in tree:
        if not placed(r):
            # torn, unlinked, or its parent not on the list: shown at depth 0
            assert r["depth"] == 0, r
            continue
        pid = r["pid"]
        assert pid not in depth, pid
        assert r["ppid"] == listed[pid]["ppid"], pid
        assert r["tree"] == "  " * r["depth"] + r["comm"]
        if r["ppid"] == 0:
            assert r["depth"] == 0, pid
        else:
            # Depth first: a child comes after its parent, one level below it.
            assert r["depth"] == depth[r["ppid"]] + 1, pid
        depth[pid] = r["depth"]
    assert set(depth) == set(listed)
    assert [r["pid"] for r in tree if r["depth"] == 0 and r["note"] is None] == [1, 2]
    # kthreadd's children are listed in PID order
    kids = [r["pid"] for r in tree if r["ppid"] == 2 and r["note"] is None]
    assert kids == sorted(kids) and len(kids) > 30


CHECKS = [check_pslist, check_witness_threads, check_psaux, check_pstree]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_tasks(capture: Capture, kernel: Kernel, check) -> None:
    check(capture, kernel)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_tasks_five_level(la57_capture: Capture, la57_kernel: Kernel, check) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check(la57_capture, la57_kernel)
