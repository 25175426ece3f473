"""PID helpers: the init namespace's IDR and the tasks a struct pid lists."""

from __future__ import annotations

import pytest

from collector.errors import NotApplicable
from collector.helpers.pid import find_pid, find_pid_ns, for_each_pid, pid_task
from collector.testing import SyntheticKernel
from collector.testing.trees import XARRAY, xa_build

DECLS = (
    XARRAY
    + """
struct hlist_node { struct hlist_node *next, **pprev; };
struct hlist_head { struct hlist_node *first; };
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_PGID, PIDTYPE_SID, PIDTYPE_MAX };
struct upid { int nr; struct pid_namespace *ns; };
struct pid { unsigned int count; unsigned int level; struct hlist_head tasks[4];
             struct upid numbers[1]; };
struct pid_namespace { struct idr idr; unsigned int pid_allocated; unsigned int level; };
struct task_struct { long state; pid_t pid; pid_t tgid; char comm[16];
                     struct hlist_node pid_links[4]; };
"""
)


def build(pids: dict[int, str]) -> tuple[SyntheticKernel, dict[int, int], dict[int, int]]:
    """A namespace whose IDR maps each PID to a struct pid used by one task (its PID and,
    for PIDs divisible by 10, the thread group of the task numbered one higher too)."""
    sk = SyntheticKernel(DECLS)
    ns = sk.global_("init_pid_ns", "struct pid_namespace", idr__idr_base=1)
    structs, tasks = {}, {}
    links = sk.offsetof("struct task_struct", "pid_links")
    for nr, comm in pids.items():
        structs[nr] = sk.new("struct pid", level=0)
        sk.set(structs[nr], "struct pid", "numbers[0].nr", nr)
        tasks[nr] = sk.new("struct task_struct", pid=nr, tgid=nr, comm=comm.encode())
        sk.set(structs[nr], "struct pid", "tasks[0].first", tasks[nr] + links)
    for nr in pids:
        if nr % 10 == 0 and nr + 1 in pids:
            # the thread nr + 1 of group nr: tasks[PIDTYPE_TGID] of pid nr is its pid_links[1]
            sk.set(structs[nr], "struct pid", "tasks[1].first", tasks[nr + 1] + links + 16)
    xa_build(sk, ns, {nr - 1: structs[nr] for nr in pids})
    return sk, structs, tasks


def test_find_pid_and_pid_task() -> None:
    pids = {1: "init", 2: "kthreadd", 10: "python", 11: "python", 700: "sshd", 4200: "bash"}
    sk, structs, tasks = build(pids)
    kernel = sk.kernel()
    for nr, comm in pids.items():
        pid = find_pid(kernel, nr)
        assert pid.value() == structs[nr]
        task = pid_task(pid, "PIDTYPE_PID")
        assert task.value() == tasks[nr]
        assert int(task.pid) == nr and task.comm.text() == comm
    assert pid_task(find_pid(kernel, 10), "PIDTYPE_TGID").value() == tasks[11]
    assert pid_task(find_pid(kernel, 700), 1).is_null()
    assert find_pid(kernel, 3).is_null() and pid_task(find_pid(kernel, 3)).is_null()
    assert find_pid(kernel, 0).is_null()  # below idr_base
    ns = kernel.variable("init_pid_ns").address_of()
    assert find_pid_ns(4200, ns).value() == structs[4200]
    assert [(nr, p.value()) for nr, p in for_each_pid(kernel)] == sorted(structs.items())
    with pytest.raises(ValueError, match="PIDTYPE_NOPE"):
        pid_task(find_pid(kernel, 1), "PIDTYPE_NOPE")


def test_a_namespace_without_an_idr() -> None:
    sk = SyntheticKernel("struct pid_namespace { void *pidmap; }; struct pid { int x; };")
    sk.global_("init_pid_ns", "struct pid_namespace")
    with pytest.raises(NotApplicable, match="no idr"):
        find_pid(sk.kernel(), 1)
