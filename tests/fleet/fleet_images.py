"""Small native images of made-up machines for the sweep tests: processes on init_task's
list and modules on the modules list, laid out like 6.4 and later kernels, under a host name
each; the expected rows follow from how they are built."""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import collector
from collector.testing import SyntheticKernel
from collector.testing.images import write_native_image

DECLARATIONS = """
struct list_head { struct list_head *next, *prev; };
typedef struct { uid_t val; } kuid_t;
typedef struct { gid_t val; } kgid_t;
struct cred { int usage; kuid_t uid; kgid_t gid; kuid_t suid; kgid_t sgid; kuid_t euid; kgid_t egid; };
struct mm_struct { unsigned long arg_start; };
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
};
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING, MODULE_STATE_UNFORMED };
typedef struct { int counter; } atomic_t;
struct kernel_param { char *name; };
enum mod_mem_type { MOD_TEXT = 0, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT,
    MOD_INIT_DATA, MOD_INIT_RODATA, MOD_MEM_NUM_TYPES, MOD_INVALID = -1 };
struct module_memory { void *base; unsigned int size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct kernel_param *kp;
    unsigned int num_kp;
    int (*init)(void);
    struct module_memory mem[7];
    unsigned long taints;
    struct list_head source_list;
    struct list_head target_list;
    void (*exit)(void);
    atomic_t refcnt;
};
"""

RELEASE = "6.1.0-test"
#: Module text addresses: above 2**63, where int64 would turn them negative.
MODULE_TEXT = 0xFFFFFFFFC0000000
PROCESSES = [(1, "init"), (2, "kthreadd"), (310, "sshd"), (311, "cron")]
MODULES = ["virtio", "ext4", "9p"]


@dataclass
class Machine:
    """One made-up host's image and the rows its analyses must give."""

    hostname: str
    path: Path
    boot_id: str
    start_time: str
    stream_sha256: str = ""
    pslist: list[dict[str, Any]] = field(default_factory=list)
    lsmod: list[dict[str, Any]] = field(default_factory=list)

    def rows(self, analysis: str) -> list[dict[str, Any]]:
        """The rows a sweep must write for ``analysis`` (pslist or lsmod) on this image."""
        plugin = {"pslist": "tasks", "lsmod": "modules"}[analysis]
        return [
            {
                **row,
                "image": str(self.path),
                "image_sha256": self.stream_sha256,
                "hostname": self.hostname,
                "kernel_release": RELEASE,
                "boot_id": self.boot_id,
                "captured_at": dt.datetime.fromisoformat(self.start_time),
                "plugin": plugin,
                "plugin_version": collector.__version__,
            }
            for row in getattr(self, analysis)
        ]


def _ring(sk: SyntheticKernel, head: int, nodes: list[int]) -> None:
    ring = [head, *nodes]
    for k, node in enumerate(ring):
        sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))


def build(
    path: Path,
    hostname: str,
    number: int,
    processes: list[tuple[int, str]] = PROCESSES,
    modules: list[str] = MODULES,
) -> Machine:
    """Write a machine's image at ``path``; ``number`` makes its boot id and capture time."""
    sk = SyntheticKernel(DECLARATIONS, release=RELEASE)
    init = sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    sk.global_("init_task_end", "u64")
    head = sk.global_("modules", "struct list_head")
    sk.global_("after_modules", "u64")
    cred = sk.new("struct cred", uid__val=0, gid__val=0, euid__val=0)
    machine = Machine(
        hostname,
        path,
        boot_id=f"00000000-0000-4000-8000-{number:012d}",
        start_time=f"2026-11-{number % 28 + 1:02d}T08:30:00.250000+00:00",
    )
    tasks = []
    for pid, comm in processes:
        signal = sk.new("struct signal_struct", nr_threads=1)
        task = sk.new("struct task_struct", pid=pid, tgid=pid, comm=comm.encode(),
                      signal=signal, real_parent=init, cred=cred,
                      start_time=pid * 1000, start_boottime=pid * 1000)  # fmt: skip
        node = task + sk.offsetof("struct task_struct", "thread_node")
        _ring(sk, signal + sk.offsetof("struct signal_struct", "thread_head"), [node])
        tasks.append(task)
        # init_task is pid 0: every parent here reads as 0, kernel threads' parent too.
        machine.pslist.append(
            {"pid": pid, "tgid": pid, "ppid": 0, "comm": comm, "uid": 0, "gid": 0, "euid": 0,
             "state": "R", "flags": 0, "start_time": pid * 1000, "started": None,
             "kthread": False, "address": task, "note": None}
        )  # fmt: skip
    off = sk.offsetof("struct task_struct", "tasks")
    _ring(sk, init + off, [t + off for t in tasks])
    mods = []
    for i, name in enumerate(modules):
        base, size = MODULE_TEXT + i * 0x100000, 0x1000 * (i + 1)
        module = sk.new("struct module", name=name.encode())
        sk.fill(module, "struct module",
                {"refcnt.counter": 1, "mem[0].base": base, "mem[0].size": size})  # fmt: skip
        for member in ("source_list", "target_list"):
            _ring(sk, module + sk.offsetof("struct module", member), [])
        mods.append(module)
        # refcnt counts the module's own reference too: lsmod shows one less.
        machine.lsmod.append(
            {"name": name, "address": base, "size": size, "core_size": size, "init_size": 0,
             "state": "Live", "refcount": 0, "users": "-", "taints": "", "parameters": "",
             "module": module, "proc_modules": None, "notes": None}
        )  # fmt: skip
    off = sk.offsetof("struct module", "list")
    _ring(sk, head, [m + off for m in mods])
    end = write_native_image(
        sk.memory(),
        path,
        host={
            "hostname": hostname,
            "boot_id": machine.boot_id,
            "uname": {"release": RELEASE, "nodename": hostname},
        },
        start_time=machine.start_time,
    )
    machine.stream_sha256 = end["stream_sha256"]
    return machine
