"""VMA helpers: an address space in a maple tree (6.1+) or a vm_next list (before), and the
/proc/PID/maps facts of each VMA."""

from __future__ import annotations

import itertools

import pytest

from collector.errors import BrokenStructure
from collector.helpers.mm import for_each_vma, show_map_vma
from collector.kernel.object import Value
from collector.testing import SyntheticKernel
from collector.testing.trees import MAPLE_TREE, XARRAY, mt_build

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
    ops = sk.global_("special_mapping_vmops", "struct vm_operations_struct")
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
