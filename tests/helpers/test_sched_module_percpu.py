"""Task, module and per-CPU helpers on synthetic kernels laid out like the real ones."""

from __future__ import annotations

import struct

import pytest

from collector.helpers.module import (
    for_each_module,
    module_address,
    module_core_size,
    module_init_size,
    module_name,
    module_refcount,
    module_size,
    module_state,
)
from collector.helpers.percpu import (
    for_each_online_cpu,
    for_each_possible_cpu,
    per_cpu,
    per_cpu_ptr,
)
from collector.helpers.sched import (
    find_task,
    for_each_process,
    for_each_task,
    for_each_thread,
    is_kthread,
    task_cred_ids,
    task_state,
)
from collector.testing import SyntheticKernel

TASKS = """
struct list_head { struct list_head *next, *prev; };
typedef struct { uid_t val; } kuid_t;
typedef struct { gid_t val; } kgid_t;
struct cred { int usage; kuid_t uid; kgid_t gid; kuid_t suid; kgid_t sgid; kuid_t euid; kgid_t egid; };
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
    const struct cred *cred;
    char comm[16];
};
"""


class Tasks:
    """Processes and threads linked as the kernel links them."""

    def __init__(self) -> None:
        self.sk = SyntheticKernel(TASKS)
        self.init = self.sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
        self.order = [self.init]
        self.cred = self.sk.new("struct cred", uid__val=1000, gid__val=100, euid__val=0)

    def link(self, head: int, nodes: list[int]) -> None:
        ring = [head, *nodes]
        for k, node in enumerate(ring):
            self.sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))

    def process(self, pid: int, comm: bytes, threads: int = 1, **values: object) -> list[int]:
        sk = self.sk
        signal = sk.new("struct signal_struct", nr_threads=threads)
        tasks = []
        for t in range(threads):
            tasks.append(
                sk.new(
                    "struct task_struct",
                    pid=pid + t,
                    tgid=pid,
                    comm=comm,
                    signal=signal,
                    real_parent=self.init,
                    cred=self.cred,
                    **values,
                )
            )
        node = sk.offsetof("struct task_struct", "thread_node")
        self.link(
            signal + sk.offsetof("struct signal_struct", "thread_head"), [t + node for t in tasks]
        )
        self.order.append(tasks[0])
        return tasks

    def kernel(self):
        off = self.sk.offsetof("struct task_struct", "tasks")
        self.link(self.init + off, [t + off for t in self.order[1:]])
        return self.sk.kernel()


def test_processes_threads_and_states() -> None:
    tasks = Tasks()
    (init,) = tasks.process(1, b"init", __state=1)
    kthread = tasks.process(2, b"kthreadd", __state=0x402, flags=0x00200040)
    threads = tasks.process(300, b"python3", threads=3, __state=2)
    (zombie,) = tasks.process(400, b"defunct", exit_state=0x20)
    kernel = tasks.kernel()
    assert [(t.pid.value(), t.comm.text()) for t in for_each_process(kernel)] == [
        (1, "init"),
        (2, "kthreadd"),
        (300, "python3"),
        (400, "defunct"),
    ]
    assert [t.pid.value() for t in for_each_task(kernel)] == [1, 2, 300, 301, 302, 400]
    leader = find_task(kernel, 300)
    assert leader is not None and leader.address == threads[0]
    assert [t.address for t in for_each_thread(leader)] == threads
    assert find_task(kernel, 301).address == threads[1]
    assert find_task(kernel, 999) is None
    assert find_task(kernel, 0).address == tasks.init
    states = {t.pid.value(): task_state(t) for t in for_each_task(kernel)}
    assert states == {
        1: "S (sleeping)",
        2: "I (idle)",
        300: "D (disk sleep)",
        301: "D (disk sleep)",
        302: "D (disk sleep)",
        400: "Z (zombie)",
    }
    assert task_state(kernel.variable("init_task")) == "R (running)"
    assert is_kthread(kernel.object("struct task_struct", kthread[0]))
    assert not is_kthread(kernel.object("struct task_struct", init))
    assert task_cred_ids(kernel.object("struct task_struct", zombie)) == {
        "uid": 1000,
        "gid": 100,
        "euid": 0,
        "egid": 0,
    }


MODULES = """
struct list_head { struct list_head *next, *prev; };
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING, MODULE_STATE_UNFORMED };
enum mod_mem_type { MOD_TEXT = 0, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT,
    MOD_INIT_DATA, MOD_INIT_RODATA, MOD_MEM_NUM_TYPES };
typedef struct { int counter; } atomic_t;
struct module_memory { void *base; unsigned int size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct module_memory mem[7];
    atomic_t refcnt;
};
"""

OLD_MODULES = """
struct list_head { struct list_head *next, *prev; };
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING, MODULE_STATE_UNFORMED };
typedef struct { int counter; } atomic_t;
struct module_layout { void *base; unsigned int size; unsigned int text_size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct module_layout core_layout;
    struct module_layout init_layout;
    atomic_t refcnt;
};
"""


def build_modules(declarations: str, entries: list[dict]) -> SyntheticKernel:
    sk = SyntheticKernel(declarations)
    head = sk.global_("modules", "struct list_head")
    sk.global_("after_modules", "u64")
    off = sk.offsetof("struct module", "list")
    mods = []
    for e in entries:
        mods.append(sk.new("struct module"))
        sk.fill(mods[-1], "struct module", e)
    ring = [head, *(m + off for m in mods)]
    for k, node in enumerate(ring):
        sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))
    return sk


def test_modules_as_proc_modules_shows_them() -> None:
    sk = build_modules(
        MODULES,
        [
            {"name": b"9p", "state": "MODULE_STATE_LIVE", "refcnt.counter": 1,
             "mem[0].base": 0xFFFFFFFFC0200000, "mem[0].size": 0x9000, "mem[1].size": 0x3000,
             "mem[2].size": 0x1000},
            {"name": b"virtio_pci", "state": "MODULE_STATE_COMING", "refcnt.counter": 3,
             "mem[0].base": 0xFFFFFFFFC0100000, "mem[0].size": 0x4000, "mem[4].size": 0x1000},
        ],
    )  # fmt: skip
    kernel = sk.kernel()
    got = [
        (module_name(m), module_address(m), module_size(m), module_core_size(m),
         module_init_size(m), module_refcount(m), module_state(m))
        for m in for_each_module(kernel)
    ]  # fmt: skip
    assert got == [
        ("9p", 0xFFFFFFFFC0200000, 0xD000, 0xD000, 0, 0, "Live"),
        ("virtio_pci", 0xFFFFFFFFC0100000, 0x5000, 0x4000, 0x1000, 2, "Loading"),
    ]


def test_modules_before_6_4_use_the_layouts() -> None:
    sk = build_modules(
        OLD_MODULES,
        [{"name": b"ext4", "state": "MODULE_STATE_LIVE", "refcnt.counter": 2,
          "core_layout.base": 0xFFFFFFFFC0400000, "core_layout.size": 0x80000,
          "init_layout.size": 0x2000}],
    )  # fmt: skip
    (m,) = for_each_module(sk.kernel())
    assert (module_name(m), module_address(m), module_size(m), module_refcount(m)) == (
        "ext4",
        0xFFFFFFFFC0400000,
        0x82000,
        1,
    )


PERCPU = """
struct cpumask { unsigned long bits[2]; };
struct counter { unsigned long hits; int cpu; };
DEFINE_PER_CPU(struct counter, counter);
"""


@pytest.mark.parametrize("online", [[0], [0, 1, 5], [0, 64, 70]])
def test_per_cpu_copies_and_masks(online: list[int]) -> None:
    sk = SyntheticKernel(PERCPU)
    nr = sk.global_("nr_cpu_ids", "u32")
    sk.write(nr, struct.pack("<I", 72))
    offsets = sk.global_("__per_cpu_offset", "u64", 72 * 8)
    possible = sk.global_("__cpu_possible_mask", "struct cpumask")
    on = sk.global_("__cpu_online_mask", "struct cpumask")
    sk.global_("__cpu_present_mask", "struct cpumask")
    sk.global_("after_masks", "u64")
    # The per-CPU variable "counter" at per-CPU offset 0x1000; each CPU's area elsewhere.
    sk.symbol("counter", 0x1000)
    for mask, cpus in ((possible, range(72)), (on, online)):
        words = [0, 0]
        for cpu in cpus:
            words[cpu // 64] |= 1 << cpu % 64
        sk.write(mask, struct.pack("<QQ", *words))
    areas = {}
    for cpu in online:
        area = sk.alloc(0x2000, 4096)
        areas[cpu] = area
        sk.write_u64(offsets + 8 * cpu, area)
        sk.set(area + 0x1000, "struct counter", "hits", 100 + cpu)
        sk.set(area + 0x1000, "struct counter", "cpu", cpu)
    kernel = sk.kernel()
    assert list(for_each_online_cpu(kernel)) == online
    assert list(for_each_possible_cpu(kernel)) == list(range(72))
    for cpu in online:
        c = per_cpu(kernel, "counter", cpu)
        assert c.address == areas[cpu] + 0x1000
        assert (c.hits.value(), c.cpu.value()) == (100 + cpu, cpu)
        pointer = kernel.object("struct counter", 0x1000).address_of()
        assert per_cpu_ptr(pointer, cpu) == c
