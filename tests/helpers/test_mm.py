"""collector.helpers.mm on synthetic kernels: VMAs in a maple tree (6.1+) or a vm_next list
(before) and the /proc/PID/maps facts of each; struct pages and the direct map; a process's
user memory read through its own page tables."""

from __future__ import annotations

import itertools

import pytest

from collector.errors import BrokenStructure, ImageError, NotApplicable
from collector.helpers.mm import (
    UserPageNotCaptured,
    UserPageNotPresent,
    access_process_vm,
    cmdline,
    environ,
    for_each_vma,
    page_address,
    page_to_pfn,
    page_to_phys,
    page_to_virt,
    pfn_to_page,
    phys_to_virt,
    proc_cmdline,
    show_map_vma,
    virt_to_page,
    virt_to_phys,
    vmalloc_to_page,
)
from collector.helpers.sched import PF_KTHREAD
from collector.kernel.object import Value
from collector.memory import Fate, PageNotCaptured
from collector.profiles.x86_64 import PageNotPresent
from collector.testing import SyntheticKernel
from collector.testing.trees import MAPLE_TREE, XARRAY, mt_build

# -- VMAs -----------------------------------------------------------------------------------------

COMMON = """
typedef unsigned int dev_t;
struct super_block { dev_t s_dev; };
struct inode { unsigned long i_ino; struct super_block *i_sb; };
struct path { void *mnt; void *dentry; };
struct file { struct path f_path; struct inode *f_inode; };
struct vm_operations_struct { void *open; void *close; const char *(*name)(void *vma); };
struct vm_special_mapping { const char *name; void *pages; };
struct anon_vma_name { unsigned int kref; char name[]; };
"""
NEW = (
    XARRAY
    + MAPLE_TREE
    + COMMON
    + """
struct mm_struct { struct maple_tree mm_mt; unsigned long start_brk, brk, start_stack; };
struct vm_area_struct {
    unsigned long vm_start; unsigned long vm_end; struct mm_struct *vm_mm;
    union { const unsigned long vm_flags; unsigned long __vm_flags; };
    unsigned long vm_pgoff; struct file *vm_file; void *vm_private_data;
    const struct vm_operations_struct *vm_ops; struct anon_vma_name *anon_name;
};
"""
)
OLD = (
    COMMON
    + """
struct mm_struct { struct vm_area_struct *mmap; unsigned long start_brk, brk, start_stack; };
struct vm_area_struct {
    unsigned long vm_start; unsigned long vm_end; struct vm_area_struct *vm_next;
    struct mm_struct *vm_mm; unsigned long vm_flags; unsigned long vm_pgoff;
    struct file *vm_file; void *vm_private_data; const struct vm_operations_struct *vm_ops;
};
"""
)

MAPS = [
    "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234                       /usr/bin/python3",
    "55d0c0a01000-55d0c0a05000 r-xp 00001000 08:01 1234                       /usr/bin/python3",
    "55d0c0a05000-55d0c0a06000 rw-p 00005000 08:01 1234                       /usr/bin/python3",
    "55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]",
    "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 ",
    "7f0000100000-7f0000101000 rw-p 00000000 00:00 0                          [anon:cache]",
    "7f0000200000-7f0000210000 r--s 00000000 00:1a 99                         /dev/shm/x",
    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]",
    "7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0                          [vdso]",
]
FLAGS = {"r": 0x1, "w": 0x2, "x": 0x4, "s": 0x88}  # VM_SHARED | VM_MAYSHARE


def build(decls: str) -> tuple[SyntheticKernel, int, list[int]]:
    """An address space holding the VMAs of :data:`MAPS`; their addresses in order."""
    sk = SyntheticKernel(decls)
    mm = sk.new("struct mm_struct", start_brk=0x55D0C1000000, brk=0x55D0C1021000)
    sk.set(mm, "struct mm_struct", "start_stack", 0x7FFD00020F00)
    has_anon_name = "anon_name" in decls
    # special_mapping_vmops.name = special_mapping_name, the method that names the vDSO
    name_method = sk.global_("special_mapping_name", "u64")
    ops = sk.global_("special_mapping_vmops", "struct vm_operations_struct", name=name_method)
    vdso_name = sk.new("struct vm_special_mapping")
    name_text = sk.alloc(8)
    sk.write(name_text, b"[vdso]\0")
    sk.set(vdso_name, "struct vm_special_mapping", "name", name_text)
    files: dict[str, int] = {}
    vmas = []
    for line in MAPS:
        span, perms, offset, dev, inode, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        flags = sum(FLAGS[c] for c in perms if c in FLAGS)
        vma = sk.new("struct vm_area_struct", vm_start=start, vm_end=end, vm_mm=mm)
        sk.set(vma, "struct vm_area_struct", "vm_flags", flags)
        path = rest[0] if rest else ""
        if path.startswith("/"):
            if path not in files:
                major, minor = (int(x, 16) for x in dev.split(":"))
                sb = sk.new("struct super_block", s_dev=(major << 20) | minor)
                ino = sk.new("struct inode", i_ino=int(inode), i_sb=sb)
                files[path] = sk.new("struct file", f_inode=ino)
            sk.set(vma, "struct vm_area_struct", "vm_file", files[path])
            sk.set(vma, "struct vm_area_struct", "vm_pgoff", int(offset, 16) >> 12)
        elif path == "[vdso]":
            sk.set(vma, "struct vm_area_struct", "vm_ops", ops)
            sk.set(vma, "struct vm_area_struct", "vm_private_data", vdso_name)
        elif path.startswith("[anon:") and has_anon_name:
            name = sk.alloc(64)  # struct anon_vma_name and the name that follows it
            sk.write(name + 4, path[6:-1].encode() + b"\0")
            sk.set(vma, "struct vm_area_struct", "anon_name", name)
        vmas.append(vma)
    if "mm_mt" in decls:
        entries = [
            (int(line[:12], 16), int(line[13:25], 16) - 1, v)
            for line, v in zip(MAPS, vmas, strict=True)
        ]
        mt_build(sk, mm, entries, alloc_range=True, leaf_fill=4, fanout=3)
    else:
        sk.set(mm, "struct mm_struct", "mmap", vmas[0])
        for a, b in itertools.pairwise(vmas):
            sk.set(a, "struct vm_area_struct", "vm_next", b)
    return sk, mm, vmas


def test_maple_tree_address_space_gives_proc_maps_lines() -> None:
    sk, mm, vmas = build(NEW)
    kernel = sk.kernel()
    got = list(for_each_vma(kernel.object("struct mm_struct", mm).address_of()))
    assert [v.address for v in got] == vmas
    lines = []
    for vma, want in zip(got, MAPS, strict=True):
        entry = show_map_vma(vma)
        path = want.split()[5] if entry.file is not None else None
        lines.append(entry.line(path))
    assert lines == MAPS
    python = show_map_vma(got[1])
    assert (python.major, python.minor, python.inode, python.perms) == (8, 1, 1234, "r-xp")
    assert python.file is not None and python.file.address == int(got[1].vm_file)


def test_vm_next_list_before_6_1() -> None:
    sk, mm, vmas = build(OLD)
    kernel = sk.kernel()
    got = list(for_each_vma(kernel.object("struct mm_struct", mm)))
    assert [v.address for v in got] == vmas
    assert list(for_each_vma(Value(kernel, kernel.type("struct mm_struct *"), 0))) == []
    # no anon_name member: the named anonymous VMA shows no name
    assert show_map_vma(got[5]).name is None and show_map_vma(got[3]).name == "[heap]"


def test_vm_next_loop_and_misfiled_vma() -> None:
    sk, mm, vmas = build(OLD)
    sk.set(vmas[4], "struct vm_area_struct", "vm_next", vmas[1])
    with pytest.raises(BrokenStructure, match="reached twice"):
        list(for_each_vma(sk.kernel().object("struct mm_struct", mm)))
    sk, mm, vmas = build(NEW)
    sk.set(vmas[2], "struct vm_area_struct", "vm_start", 0x1000)
    with pytest.raises(BrokenStructure, match="files it under"):
        list(for_each_vma(sk.kernel().object("struct mm_struct", mm)))


# -- struct pages, the direct map and user memory ------------------------------------------------

DECLARATIONS = """
struct list_head { struct list_head *next, *prev; };
typedef struct { unsigned long pgd; } pgd_t;
struct file;
struct mm_struct {
    struct {
        unsigned long mmap_base;
        pgd_t *pgd;
        unsigned long start_stack;
        unsigned long arg_start, arg_end, env_start, env_end;
        struct file *exe_file;
    };
};
struct task_struct {
    unsigned int __state;
    unsigned int flags;
    int pid;
    char comm[16];
    struct mm_struct *mm;
};
struct page {
    unsigned long flags;
    struct list_head lru;
    void *mapping;
    unsigned long index;
    unsigned long private;
    int _mapcount;
    int _refcount;
    unsigned long memcg_data;
};
"""

VMEMMAP = 0xFFFFEA0000000000  # the non-KASLR base the synthetic layout falls back to
PAGE_OFFSET = 0xFFFF888000000000
START_KERNEL_MAP = 0xFFFFFFFF80000000
KiB4 = 4096
MiB2 = 2 << 20


def make(levels: int = 4) -> SyntheticKernel:
    sk = SyntheticKernel(DECLARATIONS, levels=levels)
    sk.vmcoreinfo_extra.append("SIZE(page)=64")
    return sk


# -- struct page and the direct map ------------------------------------------------------------


def test_pfn_to_page_is_a_typed_pointer_into_the_vmemmap() -> None:
    sk = make()
    # Back the struct page of PFN 0x1234 so its members can be read through the pointer.
    backing = sk.alloc_page()
    where = VMEMMAP + 0x1234 * 64
    sk.tables.map(where - where % KiB4, sk.virt_to_phys(backing))
    sk.set(backing + where % KiB4, "struct page", "flags", 0x400)
    sk.set(backing + where % KiB4, "struct page", "_refcount", 3)
    kernel = sk.kernel()

    page = pfn_to_page(kernel, 0x1234)
    assert str(page.type) == "struct page *"
    assert page.value() == where
    assert page.flags.value() == 0x400
    assert page._refcount.value() == 3
    assert page_to_pfn(page) == 0x1234
    assert page_to_pfn(page.deref()) == 0x1234  # a struct page object works too
    assert page_to_phys(page) == 0x1234 * KiB4
    assert page_to_virt(page) == page_address(page) == PAGE_OFFSET + 0x1234 * KiB4


def test_page_to_pfn_refuses_what_is_not_a_struct_page() -> None:
    kernel = make().kernel()
    t = kernel.type("struct page *")
    with pytest.raises(ImageError, match="not a struct page"):
        page_to_pfn(Value(kernel, t, VMEMMAP + 65))
    with pytest.raises(ImageError, match="not a struct page"):
        page_to_pfn(Value(kernel, t, VMEMMAP - 64))
    with pytest.raises(ImageError, match="out of range"):
        pfn_to_page(kernel, -1)


def test_virt_to_page_of_the_direct_map_and_the_kernel_image() -> None:
    sk = make()
    obj = sk.new("struct task_struct", pid=7)
    init = sk.global_("init_task", "struct task_struct", pid=0)
    kernel = sk.kernel()
    paddr = obj - PAGE_OFFSET
    assert virt_to_phys(kernel, obj) == paddr
    assert phys_to_virt(kernel, paddr) == obj
    assert page_to_pfn(virt_to_page(kernel, obj)) == paddr // KiB4
    assert virt_to_page(kernel, obj).value() == VMEMMAP + paddr // KiB4 * 64
    # The kernel image maps at __START_KERNEL_map + phys_base (0 here).
    assert page_to_pfn(virt_to_page(kernel, init)) == (init - START_KERNEL_MAP) // KiB4


def test_vmalloc_addresses_need_a_page_walk() -> None:
    sk = make()
    backing = sk.alloc_page()
    vmalloc = 0xFFFFC90000123000
    sk.tables.map(vmalloc, sk.virt_to_phys(backing))
    kernel = sk.kernel()
    with pytest.raises(ImageError, match="not in the direct map"):
        virt_to_page(kernel, vmalloc)
    assert page_to_pfn(vmalloc_to_page(kernel, vmalloc + 0x10)) == sk.virt_to_phys(backing) >> 12
    with pytest.raises(PageNotPresent):
        vmalloc_to_page(kernel, vmalloc + KiB4)


# -- user memory --------------------------------------------------------------------------------


def process(sk: SyntheticKernel, pid: int = 100, **mm: int) -> tuple[int, object]:
    """A task with its own address space; (task address, the AddressSpace)."""
    space = sk.address_space()
    mm_address = sk.new("struct mm_struct", pgd=space.pgd, **mm)
    task = sk.new("struct task_struct", pid=pid, comm=b"proc", mm=mm_address)
    return task, space


@pytest.mark.parametrize("levels", [4, 5])
def test_access_process_vm_reads_4k_and_2m_pages_through_the_process_tables(levels: int) -> None:
    sk = make(levels)
    task, space = process(sk)
    # The second page first, so the two are not next to each other in physical memory.
    space.map(0x401000)
    space.map(0x400000)
    space.map(0x600000, MiB2)
    first = bytes(range(256)) * 16
    space.write(0x400000, first)
    space.write(0x401000, b"second page")
    space.write(0x600000 + 0x100FF0, b"inside the large page, across 4 KiB")
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)

    assert access_process_vm(t, 0x400000, KiB4) == first
    # Across the boundary of two 4 KiB pages backed by unrelated physical pages.
    assert access_process_vm(t, 0x400FFC, 15) == first[-4:] + b"second page"
    assert space.physical(0x401000) < space.physical(0x400000)
    # Inside one 2 MiB page, across what would be a 4 KiB boundary.
    got = access_process_vm(t, 0x600000 + 0x100FF0, 35)
    assert got == b"inside the large page, across 4 KiB"
    assert access_process_vm(t, 0x400000, 0) == b""


def test_a_page_never_touched_names_the_address() -> None:
    sk = make()
    task, space = process(sk)
    space.map(0x400000)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    with pytest.raises(
        UserPageNotPresent, match=r"0x401000 of pid 100 \(proc\).*never touched"
    ) as e:
        access_process_vm(t, 0x400FF0, 32)
    assert e.value.address == 0x401000
    assert e.value.pid == 100
    assert e.value.swap_entry == 0
    # A generic handler of unmapped addresses catches it too.
    with pytest.raises(PageNotPresent):
        access_process_vm(t, 0x7FFF0000, 1)


def test_a_swapped_out_page_says_so() -> None:
    sk = make()
    task, space = process(sk)
    space.map(0x400000)
    swap_entry = 0x3F_0000_0200  # present bit clear, a swap type and offset above it
    space.set_pte(0x401000, swap_entry)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    with pytest.raises(UserPageNotPresent, match="swapped out") as e:
        access_process_vm(t, 0x401000, 8)
    assert e.value.swap_entry == swap_entry
    assert e.value.level == "PT"


def test_prot_none_pages_are_in_memory_and_read() -> None:
    sk = make()
    task, space = process(sk)
    backing = sk.alloc_page()
    sk.write(backing, b"hinted by NUMA balancing")
    huge = sk.alloc(MiB2, MiB2)
    sk.write(huge + 0x12345, b"a huge PROT_NONE page")
    paddr, huge_paddr = sk.virt_to_phys(backing), sk.virt_to_phys(huge)
    # Present bit clear, _PAGE_PROTNONE (bit 8) set, the frame number stored inverted.
    space.set_pte(0x400000, (~paddr & 0x000FFFFFFFFFF000) | 0x100 | 0x60 | 0x4 | 0x2)
    space.map(0x800000, MiB2)
    pd = space.tables.table_at(0x800000, "PD")
    space.tables.set_entry(pd, 4, (~huge_paddr & 0x000FFFFFFFFFF000) | 0x100 | 0x80 | 0x66)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    assert access_process_vm(t, 0x400000, 24) == b"hinted by NUMA balancing"
    assert access_process_vm(t, 0x800000 + 0x12345, 21) == b"a huge PROT_NONE page"


def test_prot_none_frames_stored_as_they_are_read_too() -> None:
    # Before 4.19 a PROT_NONE entry kept its frame number as it is.
    sk = make()
    task, space = process(sk)
    backing = sk.alloc_page()
    sk.write(backing, b"not inverted")
    space.set_pte(0x400000, sk.virt_to_phys(backing) | 0x100 | 0x66)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    assert access_process_vm(t, 0x400000, 12) == b"not inverted"


def test_a_page_not_captured_names_the_address_and_its_fate() -> None:
    sk = make()
    task, space = process(sk)
    space.map(0x400000)
    space.map(0x401000)
    space.drop(0x401000, Fate.UNREADABLE)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    assert access_process_vm(t, 0x400000, 16) == bytes(16)
    with pytest.raises(UserPageNotCaptured, match=r"0x401000 of pid 100 \(proc\).*unreadable") as e:
        access_process_vm(t, 0x400FF8, 16)
    assert e.value.fate is Fate.UNREADABLE
    assert e.value.paddr == space.physical(0x401000)
    assert isinstance(e.value, PageNotCaptured)


def test_user_reads_stay_in_user_space() -> None:
    sk = make()
    task, _space = process(sk)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    with pytest.raises(ImageError, match="not a user address"):
        access_process_vm(t, PAGE_OFFSET, 8)
    with pytest.raises(ImageError, match="not a user address"):
        access_process_vm(t, (1 << 47) - 8, 16)  # into the guard page below the hole
    with pytest.raises(ImageError, match="refused"):
        access_process_vm(t, 0x400000, -1)


def test_kernel_threads_and_exited_tasks_have_no_user_memory() -> None:
    sk = make()
    _, space = process(sk)
    kthread = sk.new("struct task_struct", pid=2, comm=b"kthreadd", flags=PF_KTHREAD)
    # A kernel thread that borrowed a process's mm (kthread_use_mm) still has none of its own.
    mm = sk.new("struct mm_struct", pgd=space.pgd)
    borrowing = sk.new("struct task_struct", pid=3, comm=b"kworker", flags=PF_KTHREAD, mm=mm)
    zombie = sk.new("struct task_struct", pid=50, comm=b"gone")
    kernel = sk.kernel()
    for address, why in (
        (kthread, "kernel thread"),
        (borrowing, "kernel thread"),
        (zombie, "no mm"),
    ):
        t = kernel.object("struct task_struct", address)
        with pytest.raises(NotApplicable, match=why):
            access_process_vm(t, 0x400000, 1)
        assert cmdline(t) == []
        assert proc_cmdline(t) == b""
        assert environ(t) == []


# -- /proc/PID/cmdline and environ ----------------------------------------------------------------


STACK_TOP = 0x7FFFFFFFF000


def test_cmdline_across_a_page_boundary() -> None:
    sk = make()
    argv = [b"/usr/bin/python3", b"-c", b"print('x')", b"two words", b""]
    envp = [b"HOME=/root", b"PATH=/usr/bin:/bin"]
    args = b"".join(a + b"\0" for a in argv)
    env = b"".join(e + b"\0" for e in envp)
    # The arguments start 20 bytes before a page boundary, so they straddle two pages.
    arg_start = STACK_TOP - KiB4 - 20
    task, space = process(
        sk,
        arg_start=arg_start,
        arg_end=arg_start + len(args),
        env_start=arg_start + len(args),
        env_end=arg_start + len(args) + len(env),
    )
    space.map(STACK_TOP - 2 * KiB4)
    space.map(STACK_TOP - KiB4)
    space.write(arg_start, args + env)
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    assert proc_cmdline(t) == args
    assert cmdline(t) == argv
    assert environ(t) == envp


def test_cmdline_rewritten_by_setproctitle_runs_into_the_environment() -> None:
    sk = make()
    arg_start = 0x7FFF0000
    title = b"master process: a title longer than argv was"
    task, space = process(
        sk,
        arg_start=arg_start,
        arg_end=arg_start + 8,
        env_start=arg_start + 8,
        env_end=arg_start + 100,
    )
    space.map(arg_start)
    space.write(arg_start, title + b"\0leftover\0")
    kernel = sk.kernel()
    t = kernel.object("struct task_struct", task)
    # The last byte of argv is no longer NUL: the first string, with its NUL, is shown.
    assert proc_cmdline(t) == title + b"\0"
    assert cmdline(t) == [title]


def test_cmdline_before_exec_finished_is_empty() -> None:
    sk = make()
    task, _space = process(sk, arg_start=0x1000, arg_end=0x1010, env_start=0, env_end=0)
    kernel = sk.kernel()
    assert cmdline(kernel.object("struct task_struct", task)) == []


def test_a_cmdline_page_that_is_not_there_raises() -> None:
    sk = make()
    arg_start = STACK_TOP - KiB4 - 8
    task, space = process(
        sk,
        arg_start=arg_start,
        arg_end=arg_start + 32,
        env_start=arg_start + 32,
        env_end=arg_start + 40,
    )
    space.map(STACK_TOP - 2 * KiB4)
    space.map(STACK_TOP - KiB4)
    space.write(arg_start, b"a" * 31 + b"\0")
    space.drop(STACK_TOP - KiB4)
    kernel = sk.kernel()
    with pytest.raises(UserPageNotCaptured, match="excluded"):
        cmdline(kernel.object("struct task_struct", task))


def test_a_vma_of_another_address_space_is_a_broken_structure() -> None:
    for decls in (NEW, OLD):
        sk, mm, vmas = build(decls)
        other = sk.new("struct mm_struct")
        sk.set(vmas[3], "struct vm_area_struct", "vm_mm", other)
        got = for_each_vma(sk.kernel().object("struct mm_struct", mm))
        with pytest.raises(BrokenStructure, match=f"VMA {vmas[3]:#x} belongs to mm {other:#x}"):
            list(got)


@pytest.mark.parametrize(
    ("release", "touching"), [("6.1.0-57-amd64", "[heap]"), ("6.12.117+deb12-amd64", None)]
)
def test_a_vma_touching_the_heap_is_heap_before_6_6_only(release: str, touching: str) -> None:
    # [start_brk, brk) = [0x10000, 0x12000): one VMA inside, one ending at start_brk, one
    # starting at brk; 6.6's vma_is_initial_heap() wants an overlap, older kernels a touch.
    sk = SyntheticKernel(OLD, release=release)
    mm = sk.new("struct mm_struct", start_brk=0x10000, brk=0x12000)
    spans = [(0xE000, 0x10000), (0x10000, 0x12000), (0x12000, 0x13000)]
    vmas = [sk.new("struct vm_area_struct", vm_start=a, vm_end=b, vm_mm=mm) for a, b in spans]
    kernel = sk.kernel()
    names = [show_map_vma(kernel.object("struct vm_area_struct", v)).name for v in vmas]
    assert names == [touching, "[heap]", touching]


def test_named_shared_anonymous_memory_is_anon_shmem_from_6_2() -> None:
    # 6.2 moved anon_name out of the union with vma->shared: a shmem file may carry a name.
    sk, _mm, vmas = build(NEW)
    name = sk.alloc(64)
    sk.write(name + 4, b"ring\0")
    sk.set(vmas[6], "struct vm_area_struct", "anon_name", name)
    entry = show_map_vma(sk.kernel().object("struct vm_area_struct", vmas[6]))
    assert (entry.name, entry.needs_path, entry.inode) == ("[anon_shmem:ring]", False, 99)
    assert entry.line("/dev/shm/x").endswith(" [anon_shmem:ring]")
    # 5.17-6.1: anon_name shares a union with vma->shared, and a file's is not a name.
    sk, _mm, vmas = build(OLD.replace("void *vm_private_data;", UNION_6_1))
    sk.set(vmas[6], "struct vm_area_struct", "shared.rb", 0x1234)
    entry = show_map_vma(sk.kernel().object("struct vm_area_struct", vmas[6]))
    assert entry.name is None and entry.needs_path


UNION_6_1 = (
    "void *vm_private_data; union { struct { void *rb; unsigned long last; } shared;"
    " struct anon_vma_name *anon_name; };"
)


def test_a_vma_named_by_an_unknown_method_says_so() -> None:
    sk, _mm, vmas = build(NEW)
    method = sk.global_("drm_vma_name", "u64")
    ops = sk.global_("drm_vm_ops", "struct vm_operations_struct", name=method)
    sk.set(vmas[4], "struct vm_area_struct", "vm_ops", ops)
    with pytest.raises(NotApplicable, match="vm_ops->name method drm_vma_name"):
        show_map_vma(sk.kernel().object("struct vm_area_struct", vmas[4]))
