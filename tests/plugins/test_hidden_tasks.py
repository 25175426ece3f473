"""hidden_tasks on synthetic kernels: tasks laid in task_struct slabs of a memory map, linked
on the task list and filed in the PID IDR as the kernel does, some of them left out of one."""

from __future__ import annotations

import pytest

from collector.analyze import analyze_kernel
from collector.plugin_manager import PluginManager
from collector.testing.pages import MemoryMap
from collector.testing.trees import XARRAY, xa_build

TASKS = (
    XARRAY.replace("struct list_head { struct list_head *next, *prev; };\n", "")
    + """
struct hlist_node { struct hlist_node *next, **pprev; };
struct hlist_head { struct hlist_node *first; };
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_PGID, PIDTYPE_SID, PIDTYPE_MAX };
struct upid { int nr; struct pid_namespace *ns; };
struct pid { atomic_t count; unsigned int level; struct hlist_head tasks[4];
             struct upid numbers[1]; };
struct pid_namespace { struct idr idr; unsigned int pid_allocated; unsigned int level; };
typedef struct { atomic_t refs; } refcount_t;
struct signal_struct { int nr_threads; struct list_head thread_head; };
struct task_struct {
    unsigned int __state; void *stack; refcount_t usage; unsigned int flags;
    struct list_head tasks; int exit_state; pid_t pid; pid_t tgid;
    struct task_struct *group_leader; struct list_head thread_node;
    struct pid *thread_pid; struct hlist_node pid_links[4];
    u64 start_boottime; struct signal_struct *signal; char comm[16];
};
struct rq { unsigned int nr_running; struct task_struct *idle; };
DEFINE_PER_CPU(struct rq, runqueues);
"""
)

#: The task_struct cache: 256-byte slots, the free pointer mid-object, hardened freelists.
SIZE = 256
FREE_OFFSET = 128
RANDOM = 0x5EED5EED12345678
#: Per-CPU offsets (MemoryMap's per-CPU areas are a page each; zones use 0x100-0x2ff).
CPU_SLAB = 0x800
RUNQUEUES = 0xC00
#: PFNs, from the memory map's start: a CPU's slab (order 0), another slab (order 1), and a
#: slab of another cache holding a task-like object.
SLAB_A, SLAB_B, OTHER = 4, 8, 12
STACK = 0xFFFFC90000010000
PF_KTHREAD, PF_IDLE, PF_EXITING = 0x00200000, 0x2, 0x4
EXIT_DEAD, EXIT_ZOMBIE = 0x10, 0x20


def swab64(value: int) -> int:
    return int.from_bytes(value.to_bytes(8, "little"), "big")


class Machine:
    """A kernel with tasks in two task_struct slabs, on the task list and in the IDR."""

    def __init__(self, era: str) -> None:
        self.m = m = MemoryMap(era, cpus=2, extra=TASKS)
        self.sk = sk = m.sk
        self.init = sk.global_(
            "init_task", "struct task_struct", pid=0, tgid=0, comm=b"swapper/0", __state=0
        )
        sk.set(self.init, "struct task_struct", "usage.refs.counter", 2)
        sk.set(self.init, "struct task_struct", "group_leader", self.init)
        self.ns = sk.global_("init_pid_ns", "struct pid_namespace", idr__idr_base=1)
        sk.global_("after_init_pid_ns", "u64")
        sk.symbol("runqueues", RUNQUEUES)
        self.cache = m.kmem_cache("task_struct")
        sk.fill(
            self.cache,
            "struct kmem_cache",
            {
                "cpu_slab": CPU_SLAB,
                "size": SIZE,
                "object_size": sk.sizeof("struct task_struct"),
                "offset": FREE_OFFSET,
                "random": RANDOM,
            },
        )
        self.start = m.start
        m.slab(m.start + SLAB_A, "task_struct")
        m.slab(m.start + SLAB_B, "task_struct", order=1)
        m.slab(m.start + OTHER, "cred_jar")
        self.slab_objects = {SLAB_A: 16, SLAB_B: 32}
        for at, objects in self.slab_objects.items():
            self.slab_set(at, objects=objects, inuse=objects)
        self.processes: list[list[int]] = []  # on the task list, threads of each
        self.pids: dict[int, int] = {}  # PID -> task in the IDR

    # -- laying out ------------------------------------------------------------------------

    def slot(self, slab: int, index: int) -> int:
        return self.sk.page_offset + (self.start + slab) * 4096 + index * SIZE

    def slab_set(self, slab: int, **values: object) -> None:
        self.sk.fill(self.m.page(self.start + slab), "struct slab", values)

    def task(
        self,
        at: int,
        pid: int,
        comm: bytes,
        tgid: int | None = None,
        leader: int | None = None,
        usage: int = 2,
        stack: int | None = STACK,
        **values: object,
    ) -> int:
        tgid = pid if tgid is None else tgid
        sk = self.sk
        sk.fill(
            at,
            "struct task_struct",
            {
                "pid": pid,
                "tgid": tgid,
                "comm": comm,
                "__state": 1,
                "stack": stack if stack is not None else 0,
                "usage.refs.counter": usage,
                "group_leader": leader if leader is not None else at,
                **values,
            },
        )
        return at

    def link(self, head: int, nodes: list[int]) -> None:
        ring = [head, *nodes]
        for k, node in enumerate(ring):
            self.sk.write_u64(node, ring[(k + 1) % len(ring)])
            self.sk.write_u64(node + 8, ring[k - 1])

    def process(self, tasks: list[int], listed: bool = True, in_idr: bool = True) -> None:
        sk = self.sk
        signal = sk.new("struct signal_struct", nr_threads=len(tasks))
        node = sk.offsetof("struct task_struct", "thread_node")
        for t in tasks:
            sk.set(t, "struct task_struct", "signal", signal)
        self.link(
            signal + sk.offsetof("struct signal_struct", "thread_head"), [t + node for t in tasks]
        )
        if listed:
            self.processes.append(tasks)
        if in_idr:
            for t in tasks:
                pid = int.from_bytes(
                    sk.read(t + sk.offsetof("struct task_struct", "pid"), 4), "little"
                )
                self.pids[pid] = t

    def free(self, obj: int, next_free: int) -> None:
        """Make ``obj`` a free object whose free pointer leads to ``next_free``."""
        where = obj + FREE_OFFSET
        self.sk.write_u64(where, next_free ^ RANDOM ^ swab64(where))

    def kernel(self):
        sk = self.sk
        offset = sk.offsetof("struct task_struct", "tasks")
        self.link(self.init + offset, [p[0] + offset for p in self.processes])
        links = sk.offsetof("struct task_struct", "pid_links")
        structs = {}
        for nr, task in self.pids.items():
            pid = structs[nr] = sk.new("struct pid", level=0)
            sk.set(pid, "struct pid", "numbers[0].nr", nr)
            sk.set(pid, "struct pid", "tasks[0].first", task + links)
            sk.set(task, "struct task_struct", "thread_pid", pid)
        xa_build(sk, self.ns, {nr - 1: s for nr, s in structs.items()})
        return sk.kernel()


def build(era: str, hide: bool = True) -> tuple[Machine, dict[str, int]]:
    """The kernel of the tests; with ``hide``, a task unlinked from the task list, one
    missing from the IDR, and one exiting that the IDR has already let go of."""
    k = Machine(era)
    a = {
        "swapper/1": k.slot(SLAB_A, 0),
        "init": k.slot(SLAB_A, 1),
        "kthreadd": k.slot(SLAB_A, 2),
        "cpufree": k.slot(SLAB_A, 3),
        "sshd": k.slot(SLAB_A, 4),
        "sshd-thread": k.slot(SLAB_A, 5),
        "zombie": k.slot(SLAB_B, 0),
        "hidden": k.slot(SLAB_B, 1),
        "noidr": k.slot(SLAB_B, 2),
        "freed": k.slot(SLAB_B, 3),
        "exiting": k.slot(SLAB_B, 4),
        "freed2": k.slot(SLAB_B, 5),
        "dead": k.slot(SLAB_B, 6),
        "other-cache": k.sk.page_offset + (k.start + OTHER) * 4096,
    }
    k.task(a["swapper/1"], 0, b"swapper/1", __state=0, flags=PF_KTHREAD | PF_IDLE)
    k.sk.fill(k.m.areas[0] + RUNQUEUES, "struct rq", {"idle": k.init})
    k.sk.fill(k.m.areas[1] + RUNQUEUES, "struct rq", {"idle": a["swapper/1"]})
    k.process([k.task(a["init"], 1, b"init")])
    k.process([k.task(a["kthreadd"], 2, b"kthreadd", flags=PF_KTHREAD)])
    sshd = k.task(a["sshd"], 100, b"sshd")
    k.process([sshd, k.task(a["sshd-thread"], 101, b"sshd", tgid=100, leader=sshd)])
    # A zombie has given back its stack and is still on every list.
    k.process([k.task(a["zombie"], 150, b"defunct", exit_state=EXIT_ZOMBIE, stack=None)])
    if hide:
        # The DKOM classic: unlinked from init_task.tasks, still in the IDR and its slab.
        k.process([k.task(a["hidden"], 200, b"rootkitd")], listed=False)
        k.process([k.task(a["noidr"], 300, b"noidr")], in_idr=False)
        exiting = k.task(
            a["exiting"], 500, b"exiting", exit_state=EXIT_DEAD, flags=PF_EXITING, usage=1
        )
        k.process([exiting], in_idr=False)
    # Free objects: two on slab B's own freelist (the first still looks like a live task:
    # only the freelist says it is free), one on CPU 0's freelist for slab A.
    k.task(a["freed"], 400, b"freed-live", usage=1)
    k.free(a["freed"], a["freed2"])
    k.free(a["freed2"], 0)
    k.slab_set(SLAB_B, freelist=a["freed"], inuse=30)
    k.task(a["cpufree"], 401, b"cpufree", usage=1)
    k.free(a["cpufree"], 0)
    k.sk.fill(k.m.areas[0] + CPU_SLAB, "struct kmem_cache_cpu", {"freelist": a["cpufree"]})
    k.sk.set(
        k.m.areas[0] + CPU_SLAB, "struct kmem_cache_cpu", "slab", k.m.vmemmap(k.start + SLAB_A)
    )
    k.slab_set(SLAB_A, frozen=1)
    # A task freed without a freelist to say so: its last reference is gone.
    k.task(a["dead"], 402, b"dead", usage=0, exit_state=EXIT_DEAD, stack=None)
    # A task-like object in another cache's slab is no task_struct.
    k.task(a["other-cache"], 600, b"elsewhere")
    return k, a


def run(kernel, **options: object) -> list[dict]:
    result = analyze_kernel(kernel, "hidden_tasks", options, manager=PluginManager(autoload=False))
    assert result.final_error() is None
    return [
        {k: v for k, v in r.items() if k not in ("plugin", "plugin_version")}
        for r in result.records
    ]


def task_record(
    pid: int, comm: str, address: int, seen: str, missing: str, exiting=False, note=None
) -> dict:
    return {
        "kind": "task",
        "pid": pid,
        "tgid": pid,
        "comm": comm,
        "address": address,
        "seen_in": seen,
        "missing_from": missing,
        "exiting": exiting,
        "starting": False,
        "note": note,
    }


def summary(note: str) -> dict:
    return {
        "kind": "summary",
        **dict.fromkeys(("pid", "tgid", "comm", "address", "seen_in", "missing_from")),
        "exiting": None,
        "starting": None,
        "note": note,
    }


ERAS = ("6.1", "6.12")


@pytest.mark.parametrize("era", ERAS)
def test_tasks_missing_from_a_view(era: str) -> None:
    k, a = build(era)
    records = run(k.kernel())
    assert records == [
        task_record(200, "rootkitd", a["hidden"], "pid idr, task_struct slab", "task list"),
        task_record(300, "noidr", a["noidr"], "task list, task_struct slab", "pid idr"),
        task_record(
            500,
            "exiting",
            a["exiting"],
            "task list, task_struct slab",
            "pid idr",
            exiting=True,
            note="EXIT_DEAD; PF_EXITING",
        ),
        # 48 slots: 9 live tasks (the idle swapper/1 among them), 3 free, 36 empty or dead.
        summary(
            "3 tasks differ, 1 of them starting or exiting: tasks: task list 7, pid idr 6,"
            " task_struct slab 8; 2 task_struct slabs of 48 slots: 3 free, 36 failing the"
            " task test; 2 idle tasks, not compared"
        ),
    ]


@pytest.mark.parametrize("era", ERAS)
def test_no_difference(era: str) -> None:
    k, _ = build(era, hide=False)
    assert run(k.kernel()) == [
        summary(
            "the three views agree: tasks: task list 5, pid idr 5, task_struct slab 5;"
            " 2 task_struct slabs of 48 slots: 3 free, 39 failing the task test;"
            " 2 idle tasks, not compared"
        )
    ]


def test_all_lists_every_task_with_its_views() -> None:
    k, a = build("6.12")
    records = run(k.kernel(), all=True)
    every = "task list, pid idr, task_struct slab"
    got = [(r["kind"], r["pid"], r["comm"], r["address"], r["seen_in"]) for r in records]
    assert got == [
        ("task", 1, "init", a["init"], every),
        ("task", 2, "kthreadd", a["kthreadd"], every),
        ("task", 100, "sshd", a["sshd"], every),
        ("task", 101, "sshd", a["sshd-thread"], every),
        ("task", 150, "defunct", a["zombie"], every),
        ("task", 200, "rootkitd", a["hidden"], "pid idr, task_struct slab"),
        ("task", 300, "noidr", a["noidr"], "task list, task_struct slab"),
        ("task", 500, "exiting", a["exiting"], "task list, task_struct slab"),
        ("idle", 0, "swapper/0", k.init, ""),
        ("idle", 0, "swapper/1", a["swapper/1"], "task_struct slab"),
        ("summary", None, None, None, None),
    ]
    zombie = records[4]
    assert zombie["missing_from"] == "" and zombie["exiting"] is True
    assert zombie["note"] == "EXIT_ZOMBIE"
    assert records[9]["note"] == (
        "the idle task of CPU 1: on no list and in no IDR by design; not compared"
    )


def test_a_task_in_no_slab_is_named_so() -> None:
    """A task_struct allocated outside the task_struct cache (here: kmalloc'ed memory),
    linked on the task list and in the IDR, is missing from the slab view."""
    k, _ = build("6.12", hide=False)
    outside = k.sk.alloc(SIZE, 64)
    k.process([k.task(outside, 700, b"outsider")])
    records = run(k.kernel())
    assert records[0] == task_record(
        700,
        "outsider",
        outside,
        "task list, pid idr",
        "task_struct slab",
        note="not in a slab of the task_struct cache",
    )


def test_an_idr_of_absurd_pids_is_implausible() -> None:
    k, a = build("6.12", hide=False)
    k.pids = {5_000_000: a["init"]}
    result = analyze_kernel(k.kernel(), "hidden_tasks", manager=PluginManager(autoload=False))
    assert result.records == []
    assert result.final_error() == (
        "hidden_tasks: stopped after 0 records: the kernel metadata looks wrong for this image:"
        " init_pid_ns.idr gives PID 5000000, outside 1..4194304 (are the image's BTF and"
        " symbols those of the captured kernel?)"
    )


def test_a_torn_task_list_is_walked_from_both_ends() -> None:
    """A live capture can read a link after its task left: the walk goes on from the head
    backwards, and the summary says where the list broke."""
    k, a = build("6.12", hide=False)
    k.kernel()  # links everything
    tasks = k.sk.offsetof("struct task_struct", "tasks")
    k.sk.write_u64(a["kthreadd"] + tasks, 0)
    assert run(k.sk.kernel()) == [
        summary(
            "the three views agree: tasks: task list 5, pid idr 5, task_struct slab 5;"
            " 2 task_struct slabs of 48 slots: 3 free, 39 failing the task test;"
            " 2 idle tasks, not compared; task list at pid 2: init_task.tasks breaks after"
            f" this process: list at {k.init + tasks:#x}: the entry at"
            f" {a['kthreadd'] + tasks:#x} has a NULL link; task list at pid 100: found walking"
            " init_task.tasks backwards from its head, past where it broke"
        )
    ]
