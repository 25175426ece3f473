"""pslist, pstree and psaux on synthetic kernels laid out like the real ones: task_struct with
``__state`` (5.14 and later) or ``state``, threads on ``signal->thread_head`` or on the older
``thread_group`` list, command lines across pages the image lacks or memory does not hold, and
task lists torn the way a live capture tears them or broken the way a hostile image breaks them.
"""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from collector.analyze import analyze_kernel
from collector.memory import Fate
from collector.plugin_manager import PluginManager
from collector.plugins import tasks as tasks_plugin
from collector.testing import SyntheticKernel
from collector.testing.fs import FS, new_dentry

COMMON = (
    FS
    + """
struct list_head { struct list_head *next, *prev; };
typedef struct { uid_t val; } kuid_t;
typedef struct { gid_t val; } kgid_t;
struct cred { int usage; kuid_t uid; kgid_t gid; kuid_t suid; kgid_t sgid; kuid_t euid; kgid_t egid; };
typedef struct { unsigned long pgd; } pgd_t;
struct file { struct path f_path; };
struct mm_struct {
    pgd_t *pgd;
    unsigned long arg_start, arg_end, env_start, env_end;
    struct file *exe_file;
};
typedef s64 ktime_t;
struct timekeeper { u64 cycle_last; ktime_t offs_real; ktime_t offs_boot; };
struct tk_data { unsigned int seq; struct timekeeper timekeeper; };
"""
)

#: 5.14 on: __state; threads on signal->thread_head (3.14 on; the only list from 6.7).
NEW = (
    COMMON
    + """
struct signal_struct { int nr_threads; struct list_head thread_head; };
struct task_struct {
    unsigned int __state;
    unsigned int flags;
    int exit_state;
    pid_t pid;
    pid_t tgid;
    struct list_head tasks;
    struct task_struct *real_parent;
    struct list_head thread_node;
    struct signal_struct *signal;
    u64 start_time;
    u64 start_boottime;
    const struct cred *cred;
    char comm[16];
    struct mm_struct *mm;
    struct fs_struct *fs;
};
"""
)

#: Before 5.14: a long state; threads on thread_group; before 5.5 real_start_time.
OLD = (
    COMMON
    + """
struct signal_struct { int nr_threads; };
struct task_struct {
    volatile long state;
    unsigned int flags;
    int exit_state;
    pid_t pid;
    pid_t tgid;
    struct list_head tasks;
    struct task_struct *real_parent;
    struct list_head thread_group;
    struct signal_struct *signal;
    u64 start_time;
    u64 real_start_time;
    const struct cred *cred;
    char comm[16];
    struct mm_struct *mm;
    struct fs_struct *fs;
};
"""
)

PF_KTHREAD = 0x00200000
LIST_POISON2 = 0xDEAD000000000122
#: tk_core: CLOCK_REALTIME - CLOCK_MONOTONIC and CLOCK_BOOTTIME - CLOCK_MONOTONIC.
OFFS_REAL = 1_700_000_000_000_000_000 + 123
OFFS_BOOT = 2_000_000_000
BOOT_NS = OFFS_REAL - OFFS_BOOT  # 2023-11-14T22:13:18Z
ARGS_AT = 0x7FFD00000F00  # 256 bytes before a page boundary


def iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // 10**9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class World:
    """A kernel with processes and threads linked as the kernel links them, a mount tree for
    their executables, and their arguments in their own address spaces."""

    def __init__(self, layout: str = "new", with_tk_core: bool = True) -> None:
        self.new_layout = layout == "new"
        sk = self.sk = SyntheticKernel(NEW if self.new_layout else OLD)
        self.init = sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
        if with_tk_core:
            tk_core = sk.global_("tk_core", "struct tk_data")
            sk.set(tk_core, "struct tk_data", "timekeeper.offs_real", OFFS_REAL)
            sk.set(tk_core, "struct tk_data", "timekeeper.offs_boot", OFFS_BOOT)
        else:
            sk.global_("init_task_end", "u64")  # the symbol after init_task
        self.order: list[int] = []  # the processes on init_task.tasks after init_task
        # Links written over the rings once they are made: (list_head address, next, prev),
        # None keeping what the ring wrote.
        self.links: list[tuple[int, int | None, int | None]] = []
        self.creds: dict[tuple[int, int, int], int] = {}
        # The mount tree: / with /usr/bin/python3 and /sbin/init; / is also every root.
        self.mnt_offset = sk.offsetof("struct mount", "mnt")
        self.root = self.dentry(b"/", None)
        mount = sk.new("struct mount", mnt__mnt_root=self.root)
        sk.set(mount, "struct mount", "mnt_parent", mount)
        sk.set(mount, "struct mount", "mnt_mountpoint", self.root)
        self.vfsmount = mount + self.mnt_offset
        usr = self.dentry(b"usr", self.root)
        bin_ = self.dentry(b"bin", usr)
        sbin = self.dentry(b"sbin", self.root)
        self.files = {
            "/usr/bin/python3": self.file(self.dentry(b"python3", bin_)),
            "/sbin/init": self.file(self.dentry(b"init", sbin)),
        }
        self.fs = sk.new("struct fs_struct", root__mnt=self.vfsmount, root__dentry=self.root)

    def dentry(self, name: bytes, parent: int | None) -> int:
        return new_dentry(self.sk, name, parent, hashed=parent is not None)

    def file(self, dentry: int) -> int:
        return self.sk.new("struct file", f_path__mnt=self.vfsmount, f_path__dentry=dentry)

    def cred(self, uid: int, gid: int, euid: int) -> int:
        key = (uid, gid, euid)
        if key not in self.creds:
            self.creds[key] = self.sk.new("struct cred", uid__val=uid, gid__val=gid, euid__val=euid)
        return self.creds[key]

    def mm(self, argv: bytes, exe: str, at: int = 0x7FFE00000100) -> tuple[int, object]:
        """An address space whose arguments are ``argv`` at ``at``."""
        sk = self.sk
        space = sk.address_space()
        for page in range(at & ~0xFFF, at + len(argv), 4096):
            space.map(page)
        space.write(at, argv)
        mm = sk.new(
            "struct mm_struct",
            pgd=space.pgd,
            arg_start=at,
            arg_end=at + len(argv),
            env_start=at + len(argv),
            env_end=at + len(argv) + 16,
            exe_file=self.files[exe],
        )
        return mm, space

    def process(
        self,
        pid: int,
        comm: bytes,
        parent: int | None = None,
        threads: int = 1,
        state: int = 1,
        ids: tuple[int, int, int] = (0, 0, 0),
        start: int = 0,
        mm: int = 0,
        flags: int = 0,
        on_list: bool = True,
    ) -> list[int]:
        """A thread group of ``threads`` tasks with IDs pid, pid+1...; its tasks' addresses.
        Each thread starts 1 ms after the one before."""
        sk = self.sk
        state_member = "__state" if self.new_layout else "state"
        start_member = "start_boottime" if self.new_layout else "real_start_time"
        signal = sk.new("struct signal_struct", nr_threads=threads)
        group = []
        for t in range(threads):
            task = sk.new(
                "struct task_struct",
                pid=pid + t,
                tgid=pid,
                comm=comm,
                signal=signal,
                real_parent=self.init if parent is None else parent,
                cred=self.cred(*ids),
                flags=flags,
                mm=mm,
                fs=0 if flags & PF_KTHREAD else self.fs,
                # CLOCK_MONOTONIC: 2 s behind CLOCK_BOOTTIME (the machine was suspended)
                start_time=start + t * 1_000_000 - OFFS_BOOT,
            )
            sk.set(task, "struct task_struct", state_member, state)
            sk.set(task, "struct task_struct", start_member, start + t * 1_000_000)
            group.append(task)
        if self.new_layout:
            node = sk.offsetof("struct task_struct", "thread_node")
            head = signal + sk.offsetof("struct signal_struct", "thread_head")
            self.ring(head, [t + node for t in group])
        else:
            node = sk.offsetof("struct task_struct", "thread_group")
            self.ring(group[0] + node, [t + node for t in group[1:]])
        if on_list:
            self.order.append(group[0])
        return group

    def ring(self, head: int, nodes: list[int]) -> None:
        ring = [head, *nodes]
        for k, node in enumerate(ring):
            self.sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))

    def tasks_node(self, task: int) -> int:
        return task + self.sk.offsetof("struct task_struct", "tasks")

    def kernel(self):
        self.ring(self.tasks_node(self.init), [self.tasks_node(t) for t in self.order])
        for node, nxt, prev in self.links:
            if nxt is not None:
                self.sk.write_u64(node, nxt)
            if prev is not None:
                self.sk.write_u64(node + 8, prev)
        return self.sk.kernel()


def manager() -> PluginManager:
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(tasks_plugin, name="tasks", version="test")
    return pm


def run(kernel, name: str, **options):
    return analyze_kernel(kernel, name, options, manager=manager())


def standard(layout: str = "new", **options: bool) -> tuple[World, dict[str, object]]:
    """init (pid 1), kthreadd (2), a two-thread python3 (300, uid 1000) and its child sh
    (400), in that order on init_task.tasks."""
    w = World(layout, **options)
    init_mm, _ = w.mm(b"/sbin/init\0splash\0", "/sbin/init")
    (init,) = w.process(1, b"init", ids=(0, 0, 0), start=100_000_000, mm=init_mm)
    (kthreadd,) = w.process(2, b"kthreadd", flags=PF_KTHREAD | 0x40, start=110_000_000)
    py_mm, _ = w.mm(b"python3\0-c\0print('two words')\0\0", "/usr/bin/python3")
    python = w.process(
        300, b"python3", parent=init, threads=2, state=2, ids=(1000, 100, 0),
        start=5_000_000_000, mm=py_mm,
    )  # fmt: skip
    sh_mm, _ = w.mm(b"sh\0", "/usr/bin/python3")
    (sh,) = w.process(
        400, b"sh", parent=python[1], state=0, ids=(1000, 100, 1000), start=6_500_000_000,
        mm=sh_mm,
    )  # fmt: skip
    return w, {"init": init, "kthreadd": kthreadd, "python": python, "sh": sh}


def pslist_record(w: World, task: int, **values: object) -> dict[str, object]:
    record: dict[str, object] = dict.fromkeys(f.name for f in tasks_plugin.PSLIST_FIELDS)
    record.update({"address": task, "kthread": False, "note": None, **values})
    record["started"] = iso(BOOT_NS + record["start_time"])
    return record


def expected_pslist(w: World, t: dict, threads: bool) -> list[dict[str, object]]:
    python, sh = t["python"], t["sh"]
    rows = [
        pslist_record(w, t["init"], pid=1, tid=1, tgid=1, ppid=0, comm="init", uid=0, gid=0,
                      euid=0, state="S", flags=0, start_time=100_000_000),
        pslist_record(w, t["kthreadd"], pid=2, tid=2, tgid=2, ppid=0, comm="kthreadd", uid=0,
                      gid=0, euid=0, state="S", flags=0x00200040, start_time=110_000_000,
                      kthread=True),
        pslist_record(w, python[0], pid=300, tid=300, tgid=300, ppid=1, comm="python3",
                      uid=1000, gid=100, euid=0, state="D", flags=0, start_time=5_000_000_000),
    ]  # fmt: skip
    if threads:
        rows.append(
            pslist_record(w, python[1], pid=300, tid=301, tgid=300, ppid=1, comm="python3",
                          uid=1000, gid=100, euid=0, state="D", flags=0,
                          start_time=5_001_000_000)
        )  # fmt: skip
    # sh was forked by python3's second thread: its parent is that thread, whose tgid is 300.
    rows.append(
        pslist_record(w, sh, pid=400, tid=400, tgid=400, ppid=300, comm="sh", uid=1000,
                      gid=100, euid=1000, state="R", flags=0, start_time=6_500_000_000)
    )  # fmt: skip
    if not threads:
        for row in rows:
            del row["tid"]
    return rows


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("threads", [False, True])
def test_pslist_in_both_layouts(layout: str, threads: bool) -> None:
    w, t = standard(layout)
    result = run(w.kernel(), "pslist", threads=threads)
    assert result.error is None
    assert result.records == expected_pslist(w, t, threads)


def test_pslist_of_one_pid() -> None:
    w, t = standard()
    kernel = w.kernel()
    result = run(kernel, "pslist", pid=300, threads=True)
    assert [(r["pid"], r["tid"], r["address"]) for r in result.records] == [
        (300, 300, t["python"][0]),
        (300, 301, t["python"][1]),
    ]
    assert run(kernel, "pslist", pid=301).records == []  # a thread ID is no process ID
    assert run(kernel, "pslist", pid=999).records == []


def test_pslist_does_not_show_the_idle_task() -> None:
    # As ps, /proc and Volatility's linux.pslist: PID 0 is init_task, the list's head.
    w, _ = standard()
    pids = [r["pid"] for r in run(w.kernel(), "pslist").records]
    assert pids == [1, 2, 300, 400]


def test_start_time_without_a_boot_time_has_no_wall_clock() -> None:
    # No tk_core symbol in the table: the boot-relative time stays, the wall clock goes.
    w, _ = standard(with_tk_core=False)
    records = run(w.kernel(), "pslist").records
    assert [(r["start_time"], r["started"]) for r in records] == [
        (100_000_000, None),
        (110_000_000, None),
        (5_000_000_000, None),
        (6_500_000_000, None),
    ]


def torn(task: int, pid: int, comm: str, note: str) -> dict[str, object]:
    """What pslist shows of a torn record: what identifies it, and why."""
    record: dict[str, object] = dict.fromkeys(f.name for f in tasks_plugin.PSLIST_FIELDS)
    del record["tid"]
    record.update(address=task, pid=pid, tgid=pid, comm=comm, note=note)
    return record


UNLINKED = (
    "exited while the capture ran: unlinked from init_task.tasks (tasks.prev is LIST_POISON2)"
)


def test_torn_and_unlinked_records_mid_list_are_marked_and_the_walk_goes_on() -> None:
    w, t = standard()
    freed = w.sk.new("struct task_struct")  # a task_struct freed and zeroed: pid 0, no name
    w.order.append(freed)
    (mv,) = w.process(258, b"mv", state=0, start=7_000_000_000)
    (last,) = w.process(500, b"last", start=8_000_000_000)
    last_row = pslist_record(w, last, pid=500, tgid=500, ppid=0, comm="last", uid=0, gid=0,
                             euid=0, state="S", flags=0, start_time=8_000_000_000)  # fmt: skip
    del last_row["tid"]
    # mv was reaped while the capture ran: list_del_rcu() poisoned its prev, kept its next.
    w.links.append((w.tasks_node(mv), None, LIST_POISON2))
    result = run(w.kernel(), "pslist")
    assert result.error is None
    assert result.records == [
        *expected_pslist(w, t, threads=False),
        torn(freed, 0, "", "torn record: pid 0 is outside 1..4194303"),
        torn(mv, 258, "mv", UNLINKED),
        last_row,
    ]


def test_a_list_torn_at_its_tail_is_walked_from_both_ends() -> None:
    # What a live capture of Debian 6.12 showed: the forward walk reaches a process reaped
    # meanwhile whose next leads back to an earlier one, and the head's prev is another reaped
    # process whose own prev is poisoned.
    w, t = standard()
    (mv,) = w.process(258, b"mv", state=0, start=7_000_000_000)
    (usleep,) = w.process(441, b"usleep", state=0, start=9_000_000_000, on_list=False)
    head = w.tasks_node(w.init)
    python_node = w.tasks_node(t["python"][0])
    w.links.append((w.tasks_node(mv), python_node, LIST_POISON2))
    w.links.append((w.tasks_node(usleep), head, LIST_POISON2))
    w.links.append((head, None, w.tasks_node(usleep)))
    result = run(w.kernel(), "pslist")
    assert result.error is None
    mv_node, usleep_node = w.tasks_node(mv), w.tasks_node(usleep)
    assert result.records == [
        *expected_pslist(w, t, threads=False),
        torn(mv, 258, "mv", f"{UNLINKED}; init_task.tasks breaks after this process: list at"
             f" {head:#x}: the entry at {mv_node:#x} links back to {python_node:#x}, a loop"
             " that does not return to the head"),
        torn(usleep, 441, "usleep", f"{UNLINKED}; found walking init_task.tasks backwards from"
             " its head, past where it broke (and that walk broke too: list at"
             f" {head:#x}: the entry at {usleep_node:#x} has a poisoned link"
             " 0xdead000000000122 (a deleted entry))"),
    ]  # fmt: skip


def test_a_break_after_a_sound_process_is_bridged_from_the_head() -> None:
    # The forward walk stops at a NULL link after sh; walking back from the head finds the
    # process the forward walk could not reach.
    w, t = standard()
    (late,) = w.process(500, b"late", start=8_000_000_000)
    sh_node = w.tasks_node(t["sh"])
    w.links.append((sh_node, 0, None))
    head = w.tasks_node(w.init)
    result = run(w.kernel(), "pslist")
    assert result.error is None
    rows = expected_pslist(w, t, threads=False)
    rows[-1]["note"] = (
        f"init_task.tasks breaks after this process: list at {head:#x}: the entry at"
        f" {sh_node:#x} has a NULL link"
    )
    last = pslist_record(w, late, pid=500, tgid=500, ppid=0, comm="late", uid=0, gid=0,
                         euid=0, state="S", flags=0, start_time=8_000_000_000)  # fmt: skip
    del last["tid"]
    last["note"] = "found walking init_task.tasks backwards from its head, past where it broke"
    assert result.records == [*rows, last]


# -- hostile images -------------------------------------------------------------------------------


def test_a_list_that_never_closes_is_one_line_after_the_records() -> None:
    w, t = standard()
    head = w.tasks_node(w.init)
    sh_node, python_node = w.tasks_node(t["sh"]), w.tasks_node(t["python"][0])
    # sh leads back to python3, and the head's prev is sh: neither direction closes.
    w.links.append((sh_node, python_node, None))
    kernel = w.kernel()
    for name in ("pslist", "pstree", "psaux"):
        result = run(kernel, name)
        assert result.error == (
            f"{name}: stopped after {4 if name != 'pstree' else 0} records: init_task.tasks:"
            f" list at {head:#x}: the entry at {sh_node:#x} links back to {python_node:#x},"
            " a loop that does not return to the head"
        ), name
    assert [r["pid"] for r in run(kernel, "pslist").records] == [1, 2, 300, 400]


def test_a_negative_pid_in_the_first_process_is_implausible() -> None:
    w, t = standard()
    w.sk.set(t["init"], "struct task_struct", "pid", -5)
    result = run(w.kernel(), "pslist")
    assert result.records == []
    assert result.error == (
        f"pslist: stopped after 0 records: the kernel metadata looks wrong for this image:"
        f" process at {t['init']:#x}: pid is -5, outside 1..4194303 (are the image's BTF and"
        " symbols those of the captured kernel?)"
    )


def test_a_binary_name_in_the_first_processes_is_implausible() -> None:
    w, t = standard()
    binary = b"\x01\xfe\xff binary"
    raw = binary.ljust(16, b"\0").hex()
    w.sk.set(t["kthreadd"], "struct task_struct", "comm", binary)
    result = run(w.kernel(), "psaux")
    assert result.records == []
    assert result.error == (
        "psaux: stopped after 0 records: the kernel metadata looks wrong for this image:"
        f" process at {t['kthreadd']:#x} (pid 2): comm is not text:"
        f" {raw} (are the image's BTF and symbols"
        " those of the captured kernel?)"
    )


def test_an_idle_task_that_is_not_pid_0_is_implausible() -> None:
    w, _ = standard()
    w.sk.set(w.init, "struct task_struct", "pid", 7)
    result = run(w.kernel(), "pstree")
    assert result.error == (
        "pstree: stopped after 0 records: the kernel metadata looks wrong for this image:"
        " init_task.pid is 7, outside 0..0 (are the image's BTF and symbols those of the"
        " captured kernel?)"
    )


def test_a_binary_name_later_is_shown_escaped_and_noted() -> None:
    # prctl(PR_SET_NAME) takes any bytes: a later process may carry them.
    w, t = standard()
    w.sk.set(t["sh"], "struct task_struct", "comm", b"\x1b[31mred")
    records = run(w.kernel(), "pslist").records
    assert (records[-1]["comm"], records[-1]["note"]) == (
        "\x1b[31mred",
        "comm is not printable text",
    )


# -- pstree ---------------------------------------------------------------------------------------


def tree_row(task: int, pid: int, ppid: int | None, depth: int, comm: str, note=None) -> dict:
    return {
        "pid": pid,
        "ppid": ppid,
        "depth": depth,
        "tree": "  " * depth + comm,
        "comm": comm,
        "address": task,
        "note": note,
    }


def test_pstree_children_in_pid_order_under_their_parents() -> None:
    w, t = standard()
    # Created out of PID order: the tree sorts children by PID, whatever the list's order.
    (late,) = w.process(350, b"late", parent=t["init"], start=9_000_000_000)
    result = run(w.kernel(), "pstree")
    assert result.error is None
    assert result.records == [
        tree_row(t["init"], 1, 0, 0, "init"),
        tree_row(t["python"][0], 300, 1, 1, "python3"),
        tree_row(t["sh"], 400, 300, 2, "sh"),
        tree_row(late, 350, 1, 1, "late"),
        tree_row(t["kthreadd"], 2, 0, 0, "kthreadd"),
    ]


def test_pstree_keeps_orphans_loops_and_torn_records_at_depth_0() -> None:
    w, t = standard()
    (gone,) = w.process(999, b"gone", on_list=False)  # a parent not on the list
    (orphan,) = w.process(500, b"orphan", parent=gone)
    (a,) = w.process(600, b"a")
    (b,) = w.process(601, b"b", parent=a)
    w.sk.set(a, "struct task_struct", "real_parent", b)  # a's parent is b, b's is a
    (child,) = w.process(700, b"child", parent=b)
    freed = w.sk.new("struct task_struct")
    w.order.append(freed)
    (mv,) = w.process(258, b"mv", parent=t["sh"])
    w.links.append((w.tasks_node(mv), None, LIST_POISON2))
    (under_mv,) = w.process(800, b"under-mv", parent=mv)
    result = run(w.kernel(), "pstree")
    assert result.error is None
    assert result.records == [
        tree_row(t["init"], 1, 0, 0, "init"),
        tree_row(t["python"][0], 300, 1, 1, "python3"),
        tree_row(t["sh"], 400, 300, 2, "sh"),
        tree_row(t["kthreadd"], 2, 0, 0, "kthreadd"),
        tree_row(orphan, 500, 999, 0, "orphan", "its parent (pid 999) is not on the task list"),
        # mv is torn, so it is nobody's parent: its child is an orphan too
        tree_row(under_mv, 800, 258, 0, "under-mv",
                 "its parent (pid 258) is not on the task list"),
        tree_row(a, 600, 601, 0, "a", "its parents form a loop (parent pid 601)"),
        tree_row(b, 601, 600, 1, "b"),
        tree_row(child, 700, 601, 2, "child"),
        tree_row(freed, 0, None, 0, "", "torn record: pid 0 is outside 1..4194303"),
        tree_row(mv, 258, None, 0, "mv", UNLINKED),
    ]  # fmt: skip


# -- psaux ----------------------------------------------------------------------------------------


def aux_row(task: int, pid: int, ppid: int, uid: int, comm: str, cmdline: str, **more) -> dict:
    row = {
        "pid": pid, "ppid": ppid, "uid": uid, "comm": comm, "cmdline": cmdline, "exe": None,
        "root": None, "address": task, "note": None,
    }  # fmt: skip
    row.update(more)
    return row


@pytest.mark.parametrize("layout", ["new", "old"])
def test_psaux_command_lines_and_executables(layout: str) -> None:
    w, t = standard(layout)
    result = run(w.kernel(), "psaux")
    assert result.error is None
    assert result.records == [
        aux_row(t["init"], 1, 0, 0, "init", "/sbin/init splash", exe="/sbin/init", root="/"),
        aux_row(t["kthreadd"], 2, 0, 0, "kthreadd", "[kthreadd]"),
        # the empty last argument leaves a space, as ps shows it
        aux_row(t["python"][0], 300, 1, 1000, "python3", "python3 -c print('two words') ",
                exe="/usr/bin/python3", root="/"),
        aux_row(t["sh"], 400, 300, 1000, "sh", "sh", exe="/usr/bin/python3", root="/"),
    ]  # fmt: skip
    assert [r["pid"] for r in run(w.kernel(), "psaux", pid=400).records] == [400]


def test_psaux_marks_each_page_of_arguments_it_cannot_read() -> None:
    w, _ = standard()
    sk = w.sk
    # 1064 arguments of 8 bytes over four pages: 256 bytes, two whole pages, 64 bytes.
    data = b"".join(b"arg%04d\0" % i for i in range(1064))
    space = sk.address_space()
    for page in range(4):
        space.map(0x7FFD00000000 + page * 4096)
    space.write(ARGS_AT, data)
    dropped = space.physical(0x7FFD00001000)
    space.drop(0x7FFD00001000, Fate.EXCLUDED)  # not captured
    swap_entry = 0x3F_0000_0200
    space.set_pte(0x7FFD00002000, swap_entry)  # swapped out
    mm = sk.new(
        "struct mm_struct", pgd=space.pgd, arg_start=ARGS_AT, arg_end=ARGS_AT + len(data),
        env_start=ARGS_AT + len(data), env_end=ARGS_AT + len(data) + 8,
        exe_file=w.files["/usr/bin/python3"],
    )  # fmt: skip
    (big,) = w.process(900, b"big", mm=mm)
    records = run(w.kernel(), "psaux", pid=900).records
    head = " ".join(f"arg{i:04d}" for i in range(32))
    tail = " ".join(f"arg{i:04d}" for i in range(1056, 1064))
    assert records == [
        aux_row(
            big, 900, 0, 0, "big",
            head + " [... 4096 bytes at 0x7ffd00001000 not captured ...]"
            "[... 4096 bytes at 0x7ffd00002000 not in memory ...]" + tail,
            exe="/usr/bin/python3", root="/",
            note="cmdline: user address 0x7ffd00001000 of pid 900 (big): the page behind it at"
            f" physical {dropped:#x} was not captured: excluded; cmdline: user address"
            " 0x7ffd00002000 of pid 900 (big) is not in memory: its PT entry holds"
            f" {swap_entry:#x}, not present: swapped out or being migrated",
        )
    ]  # fmt: skip


def test_psaux_of_a_zombie_and_of_a_broken_executable_path() -> None:
    w, t = standard()
    (zombie,) = w.process(450, b"defunct", parent=t["sh"], state=0)
    w.sk.set(zombie, "struct task_struct", "exit_state", 0x20)  # EXIT_ZOMBIE, its mm gone
    # An executable whose dentry's parent link is NULL: that field is noted, the rest read.
    nameless = w.sk.new("struct dentry")
    mm, _ = w.mm(b"odd\0", "/usr/bin/python3")
    w.sk.set(mm, "struct mm_struct", "exe_file", w.file(nameless))
    (odd,) = w.process(460, b"odd", parent=t["sh"], mm=mm)
    records = run(w.kernel(), "psaux").records
    assert records[-2:] == [
        aux_row(zombie, 450, 400, 0, "defunct", "[defunct]", root="/"),
        aux_row(
            odd,
            460,
            400,
            0,
            "odd",
            "odd",
            root="/",
            note=f"exe: d_path: dentry {nameless:#x} has a NULL d_parent",
        ),
    ]
