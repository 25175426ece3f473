"""The maps plugin on synthetic kernels: processes found through the PID IDR, their VMAs in a
maple tree (6.1+) or a vm_next list (before), named as /proc/PID/maps names them; broken
and torn address spaces among several processes; the plausibility check.

Each process's map is written from the text of its /proc/PID/maps lines (:data:`PYTHON`,
:data:`INIT`), and the records are compared with what those lines say.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from collector.analyze import analyze_kernel
from collector.api import Kernel
from collector.errors import UsageError
from collector.plugin_manager import PluginManager
from collector.plugins import maps as maps_plugin
from collector.testing import SyntheticKernel
from collector.testing.fs import new_dentry
from collector.testing.trees import MAPLE_TREE, XARRAY, mt_build, xa_build

COMMON = """
typedef unsigned int dev_t;
struct hlist_node { struct hlist_node *next, **pprev; };
struct hlist_head { struct hlist_node *first; };
struct hlist_bl_node { struct hlist_bl_node *next, **pprev; };
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_PGID, PIDTYPE_SID, PIDTYPE_MAX };
struct upid { int nr; struct pid_namespace *ns; };
struct pid { unsigned int count; unsigned int level; struct hlist_head tasks[4];
             struct upid numbers[1]; };
struct pid_namespace { struct idr idr; unsigned int pid_allocated; unsigned int level; };
struct super_block { dev_t s_dev; };
struct inode { unsigned int i_mode; unsigned long i_ino; struct super_block *i_sb; };
struct qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; };
              const unsigned char *name; };
struct dentry;
struct dentry_operations { char *(*d_dname)(struct dentry *, char *, int); };
struct dentry { unsigned int d_flags; struct hlist_bl_node d_hash; struct dentry *d_parent;
                struct qstr d_name; struct inode *d_inode;
                const struct dentry_operations *d_op; };
struct vfsmount { struct dentry *mnt_root; void *mnt_sb; int mnt_flags; };
struct mount { struct hlist_node mnt_hash; struct mount *mnt_parent;
               struct dentry *mnt_mountpoint; struct vfsmount mnt; };
struct path { struct vfsmount *mnt; struct dentry *dentry; };
struct fs_struct { int users; struct path root, pwd; };
struct file { struct path f_path; struct inode *f_inode; };
struct vm_operations_struct { void *open; void *close; const char *(*name)(void *vma); };
struct vm_special_mapping { const char *name; void *pages; };
struct anon_vma_name { unsigned int kref; char name[]; };
typedef struct { unsigned long ctx_id; unsigned long flags; } mm_context_t;
"""
#: 6.1 on: VMAs in mm->mm_mt, named anonymous memory (CONFIG_ANON_VMA_NAME).
NEW = (
    XARRAY
    + MAPLE_TREE
    + COMMON
    + """
struct mm_struct { struct maple_tree mm_mt; unsigned long start_brk, brk, start_stack;
                   mm_context_t context; };
struct vm_area_struct {
    unsigned long vm_start; unsigned long vm_end; struct mm_struct *vm_mm;
    union { const unsigned long vm_flags; unsigned long __vm_flags; };
    struct { void *rb; unsigned long rb_subtree_last; } shared;
    unsigned long vm_pgoff; struct file *vm_file; void *vm_private_data;
    const struct vm_operations_struct *vm_ops; struct anon_vma_name *anon_name;
};
"""
)
#: Before 6.1: VMAs on the mm->mmap list through vm_next, no anon_name.
OLD = (
    XARRAY
    + COMMON
    + """
struct vm_area_struct;
struct mm_struct { struct vm_area_struct *mmap; unsigned long start_brk, brk, start_stack;
                   mm_context_t context; };
struct vm_area_struct {
    unsigned long vm_start; unsigned long vm_end; struct vm_area_struct *vm_next;
    struct mm_struct *vm_mm; unsigned long vm_flags; unsigned long vm_pgoff;
    struct file *vm_file; void *vm_private_data; const struct vm_operations_struct *vm_ops;
};
"""
)
TASK = """
struct task_struct { unsigned int flags; pid_t pid; pid_t tgid; char comm[16];
                     struct mm_struct *mm; struct fs_struct *fs;
                     struct hlist_node pid_links[4]; };
"""

#: /proc/120/maps of a Python process: its executable, heap, plain and named anonymous
#: memory, a shared file mapping, the stack, vvar and vDSO.
PYTHON = [
    "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234                       /usr/bin/python3",
    "55d0c0a01000-55d0c0a05000 r-xp 00001000 08:01 1234                       /usr/bin/python3",
    "55d0c0a05000-55d0c0a06000 rw-p 00005000 08:01 1234                       /usr/bin/python3",
    "55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]",
    "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 ",
    "7f0000100000-7f0000101000 rw-p 00000000 00:00 0                          [anon:cache]",
    "7f0000200000-7f0000210000 r--s 00000000 00:1a 99                         /dev/shm/x",
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
    "7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]",
    "7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]",
]
#: /proc/1/maps of a small init.
INIT = [
    "00400000-00401000 r-xp 00000000 08:01 16                                 /sbin/init",
    "7ffe00000000-7ffe00021000 rw-p 00000000 00:00 0                          [stack]",
]
VSYSCALL = "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]"
PERMS = {"r": 0x1, "w": 0x2, "x": 0x4, "s": 0x88}  # VM_SHARED | VM_MAYSHARE
PF_KTHREAD = 0x00200000


class Machine:
    """A synthetic kernel with processes, their address spaces and a small file tree."""

    def __init__(self, decls: str, release: str = "6.1.0-test") -> None:
        self.sk = sk = SyntheticKernel(decls + TASK, release=release)
        self.maple = "mm_mt" in decls
        self.anon_name = "anon_name" in decls
        self.pids: dict[int, int] = {}  # nr -> struct pid
        self.tasks: dict[int, int] = {}
        self.mms: dict[int, int] = {}
        self.vmas: dict[int, list[int]] = {}
        self.links = sk.offsetof("struct task_struct", "pid_links")
        self.mnt_offset = sk.offsetof("struct mount", "mnt")
        # "/" with /usr/bin/python3, /sbin/init and /dev/shm/x, on one mount.
        self.root = self.dentry(b"/", None)
        self.mount = sk.new("struct mount", mnt__mnt_root=self.root)
        sk.set(self.mount, "struct mount", "mnt_parent", self.mount)
        sk.set(self.mount, "struct mount", "mnt_mountpoint", self.root)
        self.fs = sk.new("struct fs_struct", users=1)
        sk.set(self.fs, "struct fs_struct", "root.mnt", self.mount + self.mnt_offset)
        sk.set(self.fs, "struct fs_struct", "root.dentry", self.root)
        self.files: dict[str, int] = {}
        name_method = sk.global_("special_mapping_name", "u64")
        self.special_ops = sk.global_(
            "special_mapping_vmops", "struct vm_operations_struct", name=name_method
        )
        self.special: dict[str, int] = {}
        for name in ("[vvar]", "[vdso]"):
            text = sk.alloc(16)
            sk.write(text, name.encode() + b"\0")
            self.special[name] = sk.new("struct vm_special_mapping", name=text)

    def dentry(self, name: bytes, parent: int | None) -> int:
        return new_dentry(self.sk, name, parent, hashed=parent is not None)

    def file(self, path: str, dev: str, ino: int) -> int:
        if path not in self.files:
            sk = self.sk
            d = self.root
            for part in path.strip("/").split("/"):
                d = self.dentry(part.encode(), d)
            major, minor = (int(x, 16) for x in dev.split(":"))
            sb = sk.new("struct super_block", s_dev=(major << 20) | minor)
            inode = sk.new("struct inode", i_ino=ino, i_sb=sb)
            f = sk.new("struct file", f_inode=inode)
            sk.set(f, "struct file", "f_path.mnt", self.mount + self.mnt_offset)
            sk.set(f, "struct file", "f_path.dentry", d)
            self.files[path] = f
        return self.files[path]

    def process(self, nr: int, comm: str, lines: list[str], brk: tuple[int, int] = (0, 0)) -> int:
        """A process with the VMAs ``lines`` describe; returns its mm."""
        sk = self.sk
        stack = next((ln for ln in lines if ln.endswith("[stack]")), None)
        start_stack = int(stack.split("-")[1][:12], 16) - 0x100 if stack else 0
        mm = sk.new("struct mm_struct", start_brk=brk[0], brk=brk[1], start_stack=start_stack)
        sk.set(mm, "struct mm_struct", "context.flags", 1 << 1)  # MM_CONTEXT_HAS_VSYSCALL
        vmas = []
        for line in lines:
            span, perms, offset, dev, inode, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            vma = sk.new("struct vm_area_struct", vm_start=start, vm_end=end, vm_mm=mm)
            sk.set(vma, "struct vm_area_struct", "vm_flags", sum(PERMS.get(c, 0) for c in perms))
            path = rest[0] if rest else ""
            if path.startswith("/"):
                sk.set(vma, "struct vm_area_struct", "vm_file", self.file(path, dev, int(inode)))
                sk.set(vma, "struct vm_area_struct", "vm_pgoff", int(offset, 16) >> 12)
            elif path in self.special:
                sk.set(vma, "struct vm_area_struct", "vm_ops", self.special_ops)
                sk.set(vma, "struct vm_area_struct", "vm_private_data", self.special[path])
            elif path.startswith("[anon:") and self.anon_name:
                name = sk.alloc(64)  # struct anon_vma_name and the name after it
                sk.write(name + 4, path[6:-1].encode() + b"\0")
                sk.set(vma, "struct vm_area_struct", "anon_name", name)
            vmas.append(vma)
        if self.maple:
            entries = [
                (int(ln.split("-")[0], 16), int(ln.split()[0].split("-")[1], 16) - 1, v)
                for ln, v in zip(lines, vmas, strict=True)
            ]
            mt_build(sk, mm, entries, alloc_range=True, leaf_fill=4, fanout=3)
        else:
            sk.set(mm, "struct mm_struct", "mmap", vmas[0])
            for a, b in itertools.pairwise(vmas):
                sk.set(a, "struct vm_area_struct", "vm_next", b)
        self.task(nr, comm, mm=mm)
        self.mms[nr], self.vmas[nr] = mm, vmas
        return mm

    def task(self, nr: int, comm: str, mm: int = 0, flags: int = 0, leader: int = 0) -> int:
        """A task numbered ``nr``; a thread of ``leader`` when given (then no TGID link)."""
        sk = self.sk
        tgid = leader or nr
        t = sk.new("struct task_struct", flags=flags, pid=nr, tgid=tgid, comm=comm.encode())
        sk.set(t, "struct task_struct", "mm", mm)
        sk.set(t, "struct task_struct", "fs", self.fs)
        pid = sk.new("struct pid", level=0)
        sk.set(pid, "struct pid", "numbers[0].nr", nr)
        sk.set(pid, "struct pid", "tasks[0].first", t + self.links)
        if not leader:
            sk.set(pid, "struct pid", "tasks[1].first", t + self.links + 16)
        self.pids[nr], self.tasks[nr] = pid, t
        return t

    def kernel(self) -> Kernel:
        ns = self.sk.global_("init_pid_ns", "struct pid_namespace", idr__idr_base=1)
        xa_build(self.sk, ns, {nr - 1: p for nr, p in self.pids.items()})
        return self.sk.kernel()


def machine(decls: str, release: str = "6.1.0-test") -> Machine:
    """init (PID 1), kthreadd (2), python (120) with a second thread (121)."""
    m = Machine(decls, release)
    m.process(1, "init", INIT)
    m.task(2, "kthreadd", flags=PF_KTHREAD)
    lines = PYTHON if m.anon_name else [ln for ln in PYTHON if "[anon:" not in ln]
    m.process(120, "python", lines, brk=(0x55D0C1000000, 0x55D0C1020F00))
    m.task(121, "python", mm=m.mms[120], leader=120)
    return m


def manager() -> PluginManager:
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(maps_plugin, name="maps", version="test")
    return pm


def run(kernel: Kernel, **options: Any) -> tuple[list[dict[str, Any]], str | None]:
    result = analyze_kernel(kernel, "maps", options, manager=manager())
    return list(result.records), result.error


def expected(pid: int, comm: str, lines: list[str], vmas: list[int]) -> list[dict[str, Any]]:
    """The records /proc/PID/maps lines say, parsed here from the text."""
    out = []
    for line, vma in zip(lines, vmas, strict=True):
        span, perms, offset, dev, inode, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        flags = sum(PERMS.get(c, 0) for c in perms)
        out.append(
            {
                "pid": pid,
                "comm": comm,
                "vma": vma,
                "start": start,
                "end": end,
                "perms": perms,
                "offset": int(offset, 16),
                "dev": dev,
                "inode": int(inode),
                "path": rest[0] if rest else "",
                "flags": flags,
                "line": line,
                "error": None,
            }
        )
    return out


def marker(pid: int, comm: str | None, error: str) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(f.name for f in maps_plugin.FIELDS)
    return record | {"pid": pid, "comm": comm, "error": error}


@pytest.mark.parametrize("decls", [NEW, OLD], ids=["maple-tree-6.1", "vm_next-list"])
def test_every_user_process_as_proc_pid_maps_shows_it(decls: str) -> None:
    m = machine(decls)
    records, error = run(m.kernel())
    python = PYTHON if m.anon_name else [ln for ln in PYTHON if "[anon:" not in ln]
    assert error is None
    # kthreadd has no mm; thread 121 is listed under its process, as /proc lists it
    assert records == expected(1, "init", INIT, m.vmas[1]) + expected(
        120, "python", python, m.vmas[120]
    )


def test_without_anon_name_a_named_region_is_plain_anonymous_memory() -> None:
    m = Machine(OLD)
    m.process(7, "app", [PYTHON[5]])
    (record,) = run(m.kernel())[0]
    assert record["path"] == "" and record["line"] == PYTHON[5].split("[anon:")[0].rstrip() + " "


def test_pid_option_selects_processes_and_says_what_has_no_map() -> None:
    m = machine(NEW)
    kernel = m.kernel()
    records, error = run(kernel, pid="120")
    assert error is None and records == expected(120, "python", PYTHON, m.vmas[120])
    # a thread ID gives its process's map, as /proc/TID/maps does
    records, _ = run(kernel, pid="121")
    assert [r["line"] for r in records] == PYTHON and {r["pid"] for r in records} == {121}
    records, error = run(kernel, pid="2, 999,1,2")
    assert error is None
    assert records == [
        marker(2, "kthreadd", "pid 2 is a kernel thread: it has no memory map"),
        marker(999, None, "no process with PID 999 in the image"),
        *expected(1, "init", INIT, m.vmas[1]),
    ]
    for bad in ("x", "1,,2", "-1", "0"):
        with pytest.raises(UsageError, match="--pid takes PIDs separated by commas"):
            run(kernel, pid=bad)


def test_a_broken_tree_is_a_marker_among_several_and_the_end_alone() -> None:
    m = machine(NEW)
    mt = m.mms[120]
    # python's maple tree: its root node of an impossible type (15), as a torn tree shows
    root = mt + m.sk.offsetof("struct maple_tree", "ma_root")
    node = int.from_bytes(m.sk.read(root, 8), "little")
    m.sk.write_u64(root, node & ~0x78 | 15 << 3)
    kernel = m.kernel()
    records, error = run(kernel)
    assert error is None
    broken = f"maple tree {mt:#x}: node {node & ~0xFF:#x} has impossible node type 15"
    assert records == [*expected(1, "init", INIT, m.vmas[1]), marker(120, "python", broken)]
    records, error = run(kernel, pid="120")
    assert records == [] and error == f"maps: stopped after 0 records: {broken}"


def test_a_loop_in_the_vm_next_list_ends_that_process_only() -> None:
    m = machine(OLD)
    vmas = m.vmas[1]
    m.sk.set(vmas[1], "struct vm_area_struct", "vm_next", vmas[0])
    records, error = run(m.kernel())
    python = [ln for ln in PYTHON if "[anon:" not in ln]
    assert error is None
    assert records == [
        *expected(1, "init", INIT, vmas),
        marker(1, "init", f"mm {m.mms[1]:#x}: VMA {vmas[0]:#x} is reached twice"),
        *expected(120, "python", python, m.vmas[120]),
    ]


def test_a_process_torn_mid_capture_is_a_marker() -> None:
    m = machine(NEW)
    # python exited while the capture ran: its third VMA was freed and reused by init
    third = m.vmas[120][2]
    m.sk.set(third, "struct vm_area_struct", "vm_mm", m.mms[1])
    records, error = run(m.kernel())
    assert error is None
    assert records == [
        *expected(1, "init", INIT, m.vmas[1]),
        *expected(120, "python", PYTHON[:2], m.vmas[120][:2]),
        marker(
            120,
            "python",
            f"mm {m.mms[120]:#x}: VMA {third:#x} belongs to mm {m.mms[1]:#x}: freed and reused",
        ),
    ]


def test_absurd_vmas_of_the_first_process_are_implausible() -> None:
    for bad, why in (
        ({"vm_end": 0x400000}, "start >= end"),
        ({"vm_start": 0x400800}, "not aligned to 4096"),
    ):
        m = Machine(OLD)
        m.process(1, "init", INIT)
        for member, value in bad.items():
            m.sk.set(m.vmas[1][0], "struct vm_area_struct", member, value)
        records, error = run(m.kernel())
        assert records == []
        assert error is not None and error.startswith(
            "maps: stopped after 0 records: the kernel metadata looks wrong for this image:"
            f" pid 1 (init) VMA {m.vmas[1][0]:#x} spans"
        )
        assert why in error and "checked: start < end, both multiples of 4096" in error
    # above the end of user space: 2^47 - 4096 with 4-level paging
    m = Machine(OLD)
    m.process(1, "init", ["800000000000-800000001000 rw-p 00000000 00:00 0 "])
    _, error = run(m.kernel())
    assert error is not None and "above the end of user space 0x7ffffffff000" in error


def test_a_later_process_s_absurd_vma_is_torn_not_implausible() -> None:
    m = machine(OLD)
    vma = m.vmas[120][0]
    m.sk.set(vma, "struct vm_area_struct", "vm_end", 0x1000)
    records, error = run(m.kernel())
    assert error is None
    assert records[-1] == marker(
        120,
        "python",
        f"pid 120 (python) VMA {vma:#x} spans 0x55d0c0a00000-0x1000, start >= end: torn",
    )


def test_the_vsyscall_page_follows_the_map_unless_vsyscall_is_none() -> None:
    for mode, shown in ((0, True), (1, True), (2, False)):
        m = Machine(NEW)
        m.process(1, "init", INIT)
        gate_name = m.sk.global_("gate_vma_name", "u64")
        ops = m.sk.global_("gate_vma_ops", "struct vm_operations_struct", name=gate_name)
        gate = m.sk.global_(
            "gate_vma",
            "struct vm_area_struct",
            vm_start=0xFFFFFFFFFF600000,
            vm_end=0xFFFFFFFFFF601000,
            vm_ops=ops,
        )
        # vsyscall=xonly leaves it VM_EXEC only (map_vsyscall())
        m.sk.set(gate, "struct vm_area_struct", "vm_flags", 0x4)
        where = m.sk.global_("vsyscall_mode", "u64")
        m.sk.write_u64(where, mode)
        records, error = run(m.kernel())
        assert error is None
        lines = [r["line"] for r in records]
        assert lines == ([*INIT, VSYSCALL] if shown else INIT)
        if shown:
            assert records[-1]["vma"] == gate and records[-1]["path"] == "[vsyscall]"
