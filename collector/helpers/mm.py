"""Address spaces: the VMAs of a ``struct mm_struct`` and what /proc/PID/maps says of each
(include/linux/mm.h, include/linux/mm_types.h, fs/proc/task_mmu.c).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from collector.errors import BrokenStructure, NotApplicable
from collector.helpers.maple_tree import DEFAULT_MAX_COUNT, mt_for_each
from collector.kernel.btf import Kind
from collector.kernel.object import Object
from collector.kernel.symbols import SymbolNotFound

# include/linux/mm.h: vm_flags bits that /proc/PID/maps shows.
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_MAYSHARE = 0x80
PAGE_SHIFT = 12
#: include/linux/kdev_t.h: the kernel's dev_t keeps the minor number in its low 20 bits.
MINORBITS = 20


def _struct(obj: Object) -> Object:
    return obj.deref() if obj.type.resolved().kind is Kind.PTR else obj


def for_each_vma(mm: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_vma(vmi, vma)``: every VMA of an address space, by increasing address.

    :param mm: ``struct mm_struct *`` (NULL, as a kernel thread's ``task->mm`` is, has none)
    :param max_count: the most VMAs before the address space is called broken.
    :returns: ``struct vm_area_struct`` objects.
    :raises BrokenStructure: a broken maple tree or list, or a VMA whose bounds are not the
        range the tree files it under.
    """
    if mm.is_null():
        return
    mm = _struct(mm)
    kernel = mm.kernel
    vma_type = kernel.type("struct vm_area_struct")
    if mm.type.resolved().has_member("mm_mt"):
        # 6.1 keeps VMAs in a maple tree ("mm: start tracking VMAs with maple tree"), each
        # filed under [vm_start, vm_end - 1], and drops the list ("mm: remove the vma
        # linked list").
        for first, last, entry in mt_for_each(mm.member("mm_mt"), max_count=max_count):
            vma = kernel.object(vma_type, entry.value())
            start, end = int(vma.vm_start), int(vma.vm_end)
            if (start, end - 1) != (first, last):
                raise BrokenStructure(
                    f"mm {mm.address:#x}: VMA {vma.address:#x} spans {start:#x}-{end:#x} but the"
                    f" maple tree files it under {first:#x}-{last + 1:#x}"
                )
            yield vma
        return
    if not mm.type.resolved().has_member("mmap"):
        raise NotApplicable(f"{mm.type} has neither mm_mt nor mmap: unknown VMA layout")
    # Before 6.1: a list through vm_next, sorted by address.
    seen: set[int] = set()
    address = mm.member("mmap").value()
    previous_end = 0
    while address:
        if address in seen:
            raise BrokenStructure(f"mm {mm.address:#x}: VMA {address:#x} is reached twice")
        seen.add(address)
        if len(seen) > max_count:
            raise BrokenStructure(f"mm {mm.address:#x}: more than {max_count} VMAs")
        vma = kernel.object(vma_type, address)
        start = int(vma.vm_start)
        if start < previous_end:
            raise BrokenStructure(f"mm {mm.address:#x}: VMA {address:#x} out of order")
        previous_end = int(vma.vm_end)
        yield vma
        address = vma.member("vm_next").value()


@dataclass(frozen=True)
class MapsEntry:
    """What one /proc/PID/maps line says of a VMA, but the file's path.

    ``file`` is the ``struct file *`` of a file mapping (None for anonymous memory): its
    path is ``d_path(&file->f_path)``. ``name`` is the name shown for a mapping without a
    file (``[heap]``, ``[stack]``, ``[vdso]``, ``[anon:NAME]``), None if it has none.
    """

    start: int
    end: int
    flags: int
    offset: int
    major: int
    minor: int
    inode: int
    file: Object | None
    name: str | None

    @property
    def perms(self) -> str:
        """The permissions column: ``r``/``w``/``x`` or ``-``, then ``s`` shared or ``p``."""
        return (
            ("r" if self.flags & VM_READ else "-")
            + ("w" if self.flags & VM_WRITE else "-")
            + ("x" if self.flags & VM_EXEC else "-")
            + ("s" if self.flags & VM_MAYSHARE else "p")
        )

    def line(self, path: str | None = None) -> str:
        """The /proc/PID/maps line (without its newline); ``path`` names a file mapping."""
        head = (
            f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x}"
            f" {self.major:02x}:{self.minor:02x} {self.inode} "
        )
        name = path if self.file is not None else self.name
        # show_map_vma() pads the name to a column 25 + 6 * sizeof(void *) characters in.
        return head if name is None else head.ljust(25 + 6 * 8 - 1) + " " + name


def show_map_vma(vma: Object) -> MapsEntry:
    """The facts fs/proc/task_mmu.c's ``show_map_vma()`` prints for one VMA.

    :param vma: ``struct vm_area_struct *``
    """
    vma = _struct(vma)
    flags = int(vma.vm_flags)
    file = vma.vm_file
    if file.is_null():
        return MapsEntry(
            int(vma.vm_start), int(vma.vm_end), flags, 0, 0, 0, 0, None, _anonymous_name(vma)
        )
    inode = file.f_inode
    dev = int(inode.i_sb.s_dev)
    return MapsEntry(
        int(vma.vm_start),
        int(vma.vm_end),
        flags,
        int(vma.vm_pgoff) << PAGE_SHIFT,
        dev >> MINORBITS,
        dev & ((1 << MINORBITS) - 1),
        int(inode.i_ino),
        file.deref(),
        None,
    )


def _anonymous_name(vma: Object) -> str | None:
    """The name /proc/PID/maps gives a VMA without a file (get_vma_name() in 6.11+)."""
    kernel = vma.kernel
    start, end = int(vma.vm_start), int(vma.vm_end)
    special = _special_mapping_name(vma)
    if special is not None:
        return special
    mm = vma.vm_mm
    if mm.is_null():
        return "[vdso]"
    if start <= int(mm.brk) and end >= int(mm.start_brk):
        return "[heap]"
    start_stack = int(mm.start_stack)
    if start <= start_stack <= end:
        return "[stack]"
    # CONFIG_ANON_VMA_NAME (5.17, "mm: add a field to store names for private anonymous
    # memory"): prctl(PR_SET_VMA_ANON_NAME) names.
    if vma.type.resolved().has_member("anon_name"):
        anon = vma.member("anon_name")
        if not anon.is_null():
            # name[] is a flexible array: read it as the C string it is.
            text = kernel.read_cstring(anon.member("name").address, 256)
            return "[anon:" + text.decode("utf-8", "backslashreplace") + "]"
    return None


def _special_mapping_name(vma: Object) -> str | None:
    """``vma->vm_ops->name(vma)`` for install_special_mapping()'s VMAs (the vDSO and vvar
    pages): their vm_ops is ``special_mapping_vmops`` and vm_private_data their
    ``struct vm_special_mapping``, whose ``name`` the callback returns."""
    kernel = vma.kernel
    ops = vma.vm_ops.value()
    if not ops:
        return None
    try:
        special = kernel.symbol("special_mapping_vmops")
    except SymbolNotFound:
        return None
    if ops != special:
        return None
    mapping = vma.vm_private_data.cast(kernel.type("struct vm_special_mapping *"))
    if mapping.is_null():
        return None
    return mapping.name.text(64)
