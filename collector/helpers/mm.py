"""Memory management: struct pages and the direct map, a process's own user memory, and its
VMAs as /proc/PID/maps shows them.

Mirrors include/linux/mm.h, include/linux/mm_types.h, include/asm-generic/memory_model.h
(``pfn_to_page`` with SPARSEMEM_VMEMMAP), arch/x86/include/asm/page.h (``__pa``/``__va``,
``virt_to_page``), mm/memory.c (``access_process_vm``), fs/proc/base.c (``/proc/PID/cmdline``
and ``environ``) and fs/proc/task_mmu.c (``/proc/PID/maps``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.errors import BrokenStructure, ImageError, NotApplicable
from collector.helpers.maple_tree import DEFAULT_MAX_COUNT, mt_for_each
from collector.helpers.sched import is_kthread
from collector.kernel.btf import Kind
from collector.kernel.object import Object, Type, Value
from collector.kernel.symbols import SymbolNotFound
from collector.memory import PageNotCaptured
from collector.profiles.x86_64 import START_KERNEL_MAP, PageNotPresent, TranslationError

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

# -- struct page and the direct map ------------------------------------------------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def _page_pointer_type(kernel: Kernel) -> Type:
    return Type.pointer_to(kernel.type("struct page"))


def pfn_to_page(kernel: Kernel, pfn: int) -> Object:
    """``pfn_to_page()``: the ``struct page *`` of page frame ``pfn`` in the vmemmap.

    The pointer is ``vmemmap + pfn`` in C's pointer arithmetic: the stride is ``sizeof(struct
    page)`` from BTF, the base the layout worked out from the image.

    :param kernel: the kernel.
    :param pfn: ``unsigned long`` page frame number.
    :raises ImageError: the PFN is out of range.
    """
    t = _page_pointer_type(kernel)
    if not 0 <= pfn < 1 << (52 - PAGE_SHIFT):
        raise ImageError(f"PFN {pfn:#x} is out of range")
    return Value(kernel, t, kernel.layout.vmemmap_base + pfn * t.pointee.size)


def page_to_pfn(page: Object) -> int:
    """``page_to_pfn()``: the page frame number of a page.

    :param page: ``struct page *`` (a pointer) or a ``struct page`` object.
    :raises ImageError: the address is not a struct page in the vmemmap.
    """
    kernel = page.kernel
    address = _page_address_of(page)
    size = kernel.type("struct page").size
    offset = address - kernel.layout.vmemmap_base
    if offset < 0 or offset % size or offset // size >= 1 << (52 - PAGE_SHIFT):
        raise ImageError(
            f"{address:#x} is not a struct page in the vmemmap at {kernel.layout.vmemmap_base:#x}"
        )
    return offset // size


def _page_address_of(page: Object) -> int:
    """The address of the struct page a ``struct page *`` or ``struct page`` names."""
    r = page.type.resolved()
    if r.kind is Kind.PTR:
        return page.value()
    if r.kind is Kind.STRUCT:
        return page.address
    raise ImageError(f"{page.type} is not a struct page or a pointer to one")


def _max_physmem_bits(kernel: Kernel) -> int:
    """``MAX_PHYSMEM_BITS`` (arch/x86/include/asm/sparsemem.h): how far the direct map
    reaches; VMCOREINFO gives it, else 46 with 4-level paging and 52 with 5-level."""
    bits = kernel.vmcoreinfo.number("MAX_PHYSMEM_BITS")
    if bits is None or not 32 <= bits <= 52:
        bits = 52 if kernel.paging.levels == 5 else 46
    return bits


def virt_to_phys(kernel: Kernel, address: int) -> int:
    """``virt_to_phys()``/``__pa()``: the physical address of a direct-map or kernel-image
    address (``unsigned long``), by arithmetic as the kernel does.

    :raises ImageError: the address is in neither (vmalloc, vmemmap, user space: use
        :func:`vmalloc_to_page` or :func:`access_process_vm`).
    """
    layout = kernel.layout
    if address < START_KERNEL_MAP:
        offset = address - layout.page_offset_base
        if not 0 <= offset < 1 << _max_physmem_bits(kernel):
            raise ImageError(
                f"{address:#x} is not in the direct map at {layout.page_offset_base:#x} nor in"
                " the kernel image"
            )
    return layout.virt_to_phys(address)


def phys_to_virt(kernel: Kernel, paddr: int) -> int:
    """``phys_to_virt()``/``__va()``: the direct-map address of physical address ``paddr``
    (``phys_addr_t``)."""
    return kernel.layout.phys_to_virt(paddr)


def virt_to_pfn(kernel: Kernel, address: int) -> int:
    """``virt_to_pfn()``: the page frame of a direct-map or kernel-image address."""
    return virt_to_phys(kernel, address) >> PAGE_SHIFT


def pfn_to_virt(kernel: Kernel, pfn: int) -> int:
    """``pfn_to_virt()``: the direct-map address of page frame ``pfn``."""
    return phys_to_virt(kernel, pfn << PAGE_SHIFT)


def virt_to_page(kernel: Kernel, address: int) -> Object:
    """``virt_to_page()``: the ``struct page *`` of a direct-map or kernel-image address
    (``const void *``).

    :raises ImageError: the address is in neither (see :func:`vmalloc_to_page`).
    """
    return pfn_to_page(kernel, virt_to_pfn(kernel, address))


def page_to_phys(page: Object) -> int:
    """``page_to_phys()``: the physical address of a ``struct page *``'s page."""
    return page_to_pfn(page) << PAGE_SHIFT


def page_to_virt(page: Object) -> int:
    """``page_to_virt()``: the direct-map address of a ``struct page *``'s page."""
    return pfn_to_virt(page.kernel, page_to_pfn(page))


def page_address(page: Object) -> int:
    """``page_address()``: the kernel address of a page; on x86_64 always its direct-map
    address (there is no highmem), as :func:`page_to_virt`."""
    return page_to_virt(page)


def vmalloc_to_page(kernel: Kernel, address: int) -> Object:
    """``vmalloc_to_page()``: the ``struct page *`` behind any mapped kernel address
    (vmalloc, modules, vmemmap...), found by walking the kernel's page tables.

    :raises TranslationError: the address is not mapped.
    :raises PageNotCaptured: a page table on the way is not in the image.
    """
    return pfn_to_page(kernel, kernel.translate(address).paddr >> PAGE_SHIFT)


# -- a process's user memory --------------------------------------------------------------------

#: The longest read :func:`access_process_vm` accepts (bounds hostile sizes).
MAX_USER_READ = 64 * 1024 * 1024
#: /proc/PID/cmdline reads at most one page when a process rewrote its argv (setproctitle).
_PROCTITLE_MAX = PAGE_SIZE


class UserPageNotPresent(PageNotPresent):
    """A user address of a process is not in memory: its page was never touched, is swapped
    out or is being migrated. The kernel would fault it in; an image cannot. (A PROT_NONE
    page, which NUMA balancing makes of pages still in memory, is read like any other.)

    ``pid`` and ``address`` name where; ``swap_entry`` is the raw not-present entry when it
    holds one (nonzero), else 0.
    """

    def __init__(
        self,
        message: str,
        vaddr: int,
        level: str,
        steps: tuple = (),
        pid: int = -1,
        swap_entry: int = 0,
    ) -> None:
        super().__init__(message, vaddr, level, steps)
        self.pid = pid
        self.address = vaddr
        self.swap_entry = swap_entry


class UserPageNotCaptured(PageNotCaptured):
    """The page behind a user address (or a page table on the way to it) is not in the
    image; the message names the user address, the process and the page's fate."""

    def __init__(
        self, address: int, pid: int, comm: str, cause: PageNotCaptured, what: str
    ) -> None:
        super().__init__(cause.paddr, cause.fate, cause.errno)
        detail = f" (errno {cause.errno})" if cause.errno else ""
        self.args = (
            f"user address {address:#x} of pid {pid} ({comm}): {what} at physical"
            f" {cause.paddr:#x} was not captured: {cause.fate.label}{detail}",
        )
        self.address = address
        self.pid = pid


def _identity(task: Object) -> tuple[int, str]:
    return int(task.pid), task.comm.text(16)


def _user_mm(task: Object) -> Object | None:
    """``get_task_mm()``: the task's ``struct mm_struct *``, or None for a kernel thread or a
    task whose memory is gone (a zombie)."""
    if is_kthread(task):
        # A kernel thread may borrow a process's mm (kthread_use_mm); it is not its own.
        return None
    mm = task.mm
    return None if mm.is_null() else mm


def task_size_max(kernel: Kernel) -> int:
    """``TASK_SIZE_MAX`` (arch/x86/include/asm/page_64_types.h): the end of user space, one
    guard page below the top of the lower canonical half (2^47 with 4-level paging, 2^56
    with 5-level); no VMA of a process ends above it."""
    return (1 << (56 if kernel.paging.levels == 5 else 47)) - PAGE_SIZE


class _UserPages:
    """Walks one process's page tables (``mm->pgd``) with the profile's walker."""

    def __init__(self, task: Object) -> None:
        kernel = task.kernel
        self.kernel = kernel
        self.pid, self.comm = _identity(task)
        mm = _user_mm(task)
        if mm is None:
            why = "is a kernel thread" if is_kthread(task) else "has no mm (exited)"
            raise NotApplicable(f"pid {self.pid} ({self.comm}) {why}: it has no user memory")
        self.mm = mm
        pgd = mm.pgd.value()
        try:
            top = virt_to_phys(kernel, pgd)
        except ImageError:
            raise BrokenStructure(
                f"pid {self.pid} ({self.comm}): mm->pgd {pgd:#x} is not a direct-map address"
            ) from None
        if top % PAGE_SIZE:
            raise BrokenStructure(
                f"pid {self.pid} ({self.comm}): mm->pgd {pgd:#x} is not page-aligned"
            )
        kpaging = kernel.paging
        self.paging = kernel.profile.Paging(kernel.memory, top, kpaging.levels, kpaging.sme_mask)
        self.end = task_size_max(kernel)
        self.physmem_bits = _max_physmem_bits(kernel)

    def read(self, address: int, size: int) -> bytes:
        if size < 0 or size > MAX_USER_READ:
            raise ImageError(f"a read of {size} bytes of user memory refused")
        if address < 0 or address + size > self.end:
            raise ImageError(
                f"{address:#x}+{size:#x} of pid {self.pid} ({self.comm}) is not a user address"
                f" (user space ends at {self.end:#x})"
            )
        out = bytearray()
        # One walk per page (or per large page): at most size / 4096 + 1 iterations.
        while size > 0:
            paddr, room = self._translate(address)
            n = min(size, room)
            try:
                out += self.kernel.memory.read(paddr, n)
            except PageNotCaptured as exc:
                raise UserPageNotCaptured(
                    address, self.pid, self.comm, exc, "the page behind it"
                ) from None
            address += n
            size -= n
        return bytes(out)

    def _translate(self, address: int) -> tuple[int, int]:
        """Physical address of ``address`` and how many bytes to the end of its page."""
        try:
            t = self.paging.translate(address)
        except PageNotCaptured as exc:
            raise UserPageNotCaptured(address, self.pid, self.comm, exc, "a page table") from None
        except PageNotPresent as exc:
            entry = exc.steps[-1].entry if exc.steps else 0
            found = _protnone(entry, exc.level, address, self.paging.sme_mask, self.physmem_bits)
            if found is not None:
                return found
            if entry:
                why = (
                    f"its {exc.level} entry holds {entry:#x}, not present: swapped out or"
                    " being migrated"
                )
            else:
                why = f"its {exc.level} entry is empty: never touched or not mapped"
            raise UserPageNotPresent(
                f"user address {address:#x} of pid {self.pid} ({self.comm}) is not in"
                f" memory: {why}",
                address,
                exc.level,
                exc.steps,
                pid=self.pid,
                swap_entry=entry,
            ) from None
        except TranslationError as exc:
            raise BrokenStructure(
                f"pid {self.pid} ({self.comm}): the page tables at mm->pgd are broken: {exc}"
            ) from None
        return t.paddr, t.page_size - t.paddr % t.page_size


#: ``_PAGE_PROTNONE`` (arch/x86/include/asm/pgtable_types.h): the global bit, which no user
#: page sets, marks a PROT_NONE or NUMA-hinting entry whose present bit is clear.
_PAGE_PROTNONE = 1 << 8
_PAGE_PSE = 1 << 7
_PFN_MASK = 0x000FFFFFFFFFF000
_PROTNONE_LEAVES = {"PT": 1 << 12, "PD": 1 << 21, "PDPT": 1 << 30}


def _protnone(
    entry: int, level: str, address: int, sme_mask: int, physmem_bits: int
) -> tuple[int, int] | None:
    """Where a PROT_NONE leaf entry points, as ``(paddr, bytes to the end of its page)``, or
    None for any other not-present entry.

    The kernel counts such an entry as present (``pte_present()`` tests ``_PAGE_PRESENT |
    _PAGE_PROTNONE``): NUMA balancing turns pages PROT_NONE to catch the next access, so
    the page is still in memory. Since 4.19 ("x86/speculation/l1tf: Protect PROT_NONE PTEs
    against speculation") the frame number of a not-present entry is stored inverted
    (asm/pgtable-invert.h). Above the last level only a huge page is a leaf (``_PAGE_PSE``).
    """
    size = _PROTNONE_LEAVES.get(level)
    if size is None or not entry & _PAGE_PROTNONE:
        return None
    if level != "PT" and not entry & _PAGE_PSE:
        return None
    offset = address % size
    # Kernels before 4.19 store it as it is; an inverted small frame number lies far above
    # any physical address, so the one that is a physical address is the right reading.
    for raw in (~entry, entry):
        base = raw & _PFN_MASK & ~sme_mask & ~(size - 1)
        if base < 1 << physmem_bits:
            return base + offset, size - offset
    return None


def access_process_vm(task: Object, address: int, size: int) -> bytes:
    """``access_process_vm()`` for reading: ``size`` bytes of a process's user memory at
    ``address``, translated through its own page tables (``task->mm->pgd``), page by page.

    Unlike the kernel, which faults pages in and returns how much it read, an image has only
    what was in RAM: the first page that cannot be read raises.

    :param task: ``struct task_struct *`` of any thread of the process.
    :param address: ``unsigned long`` user address.
    :param size: bytes to read.
    :raises NotApplicable: a kernel thread, or a task whose memory is gone.
    :raises UserPageNotPresent: a page is not in memory (never touched, swapped out).
    :raises UserPageNotCaptured: a page (or a page table) is not in the image; names its fate.
    :raises ImageError: the range is not in user space, or too large.
    :raises BrokenStructure: ``mm->pgd`` or the page tables cannot be real.
    """
    return _UserPages(task).read(address, size)


def proc_cmdline(task: Object) -> bytes:
    """The bytes /proc/PID/cmdline gives (fs/proc/base.c ``get_mm_cmdline``): ``mm->arg_start``
    to ``mm->arg_end``; when the process rewrote its argv and the last byte is no longer NUL
    (setproctitle), its first string, up to one page, running on into the environment.

    :param task: ``struct task_struct *``.
    :returns: empty for a kernel thread or an exited task, as /proc gives.
    :raises UserPageNotPresent, UserPageNotCaptured: a page of the arguments is not there.
    """
    if _user_mm(task) is None:
        return b""
    pages = _UserPages(task)
    mm = pages.mm
    # "Check if process spawned far enough to have cmdline."
    env_end = int(mm.env_end)
    if not env_end:
        return b""
    arg_start, arg_end = int(mm.arg_start), int(mm.arg_end)
    env_start = int(mm.env_start)
    if arg_start >= arg_end:
        return b""
    # setproctitle() may overflow into the environment, only when it follows the arguments.
    if env_start != arg_end or env_end < env_start:
        env_end = arg_end
    total = env_end - arg_start
    last = pages.read(arg_end - 1, 1)
    if last != b"\0":
        return _proctitle(pages, arg_start, total)
    return pages.read(arg_start, arg_end - arg_start)


def _proctitle(pages: _UserPages, arg_start: int, total: int) -> bytes:
    """``get_mm_proctitle()``: the first string at ``arg_start`` within one page, with its NUL
    when it has one, at most ``total`` bytes."""
    want = min(_PROCTITLE_MAX, total)
    got = bytearray()
    # The kernel reads what it can of one page and stops at the first fault.
    while len(got) < want:
        step = min(want - len(got), PAGE_SIZE - (arg_start + len(got)) % PAGE_SIZE)
        try:
            got += pages.read(arg_start + len(got), step)
        except (UserPageNotPresent, UserPageNotCaptured):
            if not got:
                raise
            break
    nul = got.find(b"\0")
    return bytes(got if nul < 0 else got[: nul + 1])


def cmdline(task: Object) -> list[bytes]:
    """``argv`` of a process as /proc/PID/cmdline shows it, split at NULs (the final NUL ends
    the last argument; an empty argument stays an empty bytes).

    :param task: ``struct task_struct *``.
    :returns: ``[]`` for a kernel thread or an exited task.
    """
    return _split(proc_cmdline(task))


def proc_environ(task: Object) -> bytes:
    """The bytes /proc/PID/environ gives: ``mm->env_start`` to ``mm->env_end``.

    :param task: ``struct task_struct *``.
    :returns: empty for a kernel thread or an exited task.
    """
    if _user_mm(task) is None:
        return b""
    pages = _UserPages(task)
    mm = pages.mm
    env_start, env_end = int(mm.env_start), int(mm.env_end)
    if not env_end or env_start >= env_end:
        return b""
    return pages.read(env_start, env_end - env_start)


def environ(task: Object) -> list[bytes]:
    """The environment of a process (``NAME=value`` each), as /proc/PID/environ shows it.

    :param task: ``struct task_struct *``.
    :returns: ``[]`` for a kernel thread or an exited task.
    """
    return _split(proc_environ(task))


def _split(data: bytes) -> list[bytes]:
    if not data:
        return []
    parts = data.split(b"\0")
    if data.endswith(b"\0"):
        parts.pop()
    return parts


# -- address spaces: VMAs and /proc/PID/maps ----------------------------------------------

# include/linux/mm.h: vm_flags bits that /proc/PID/maps shows.
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_MAYSHARE = 0x80
#: include/linux/kdev_t.h: the kernel's dev_t keeps the minor number in its low 20 bits.
MINORBITS = 20
#: include/linux/mm_types.h ANON_VMA_NAME_MAX_LEN: the longest name prctl() accepts.
ANON_VMA_NAME_MAX_LEN = 80
#: arch/x86/include/asm/mmu.h: bit 1 of ``mm->context.flags`` (MM_CONTEXT_HAS_VSYSCALL, a
#: mask until 6.4 and a bit number since; the same bit either way).
MM_CONTEXT_HAS_VSYSCALL = 1 << 1
#: arch/x86/entry/vsyscall/vsyscall_64.c: ``enum { EMULATE, XONLY, NONE } vsyscall_mode``.
VSYSCALL_NONE = 2


def _struct(obj: Object) -> Object:
    return obj.deref() if obj.type.resolved().kind is Kind.PTR else obj


def for_each_vma(mm: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """``for_each_vma(vmi, vma)``: every VMA of an address space, by increasing address.

    Each VMA is checked against the address space it was reached from: its ``vm_mm`` is
    ``mm`` (set when the VMA is allocated and never changed; a VMA freed and reused while a
    capture ran belongs to another) and its bounds are where the tree or list files it.

    :param mm: ``struct mm_struct *`` (NULL, as a kernel thread's ``task->mm`` is, has none)
    :param max_count: the most VMAs before the address space is called broken.
    :returns: ``struct vm_area_struct`` objects.
    :raises BrokenStructure: a broken maple tree or list, a VMA of another address space, or
        a VMA whose bounds are not the range the tree files it under.
    """
    if mm.is_null():
        return
    mm = _struct(mm)
    kernel = mm.kernel
    vma_type = kernel.type("struct vm_area_struct")

    def checked(address: int) -> Object:
        vma = kernel.object(vma_type, address)
        owner = vma.vm_mm.value()
        if owner != mm.address:
            raise BrokenStructure(
                f"mm {mm.address:#x}: VMA {address:#x} belongs to mm {owner:#x}: freed and reused"
            )
        return vma

    if mm.type.resolved().has_member("mm_mt"):
        # 6.1 keeps VMAs in a maple tree ("mm: start tracking VMAs with maple tree"), each
        # filed under [vm_start, vm_end - 1], and drops the list ("mm: remove the vma
        # linked list").
        for first, last, entry in mt_for_each(mm.member("mm_mt"), max_count=max_count):
            vma = checked(entry.value())
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
        vma = checked(address)
        start = int(vma.vm_start)
        if start < previous_end:
            raise BrokenStructure(f"mm {mm.address:#x}: VMA {address:#x} out of order")
        previous_end = int(vma.vm_end)
        yield vma
        address = vma.member("vm_next").value()


def get_gate_vma(mm: Object) -> Object | None:
    """``get_gate_vma(mm)`` (arch/x86/entry/vsyscall/vsyscall_64.c): the vsyscall page's
    ``struct vm_area_struct``, which /proc/PID/maps shows after the address space's own VMAs
    (``[vsyscall]``), or None where there is none: ``vsyscall=none``, a 32-bit process, a
    kernel built without vsyscall emulation.

    :param mm: ``struct mm_struct *``.
    """
    kernel = mm.kernel
    try:
        gate = kernel.symbol("gate_vma")
        mode = kernel.symbol("vsyscall_mode")
    except SymbolNotFound:
        return None
    if kernel.read_u32(mode) == VSYSCALL_NONE:
        return None
    context = _struct(mm).member("context")
    if context.type.resolved().has_member("flags"):
        # set_personality_64bit() sets MM_CONTEXT_HAS_VSYSCALL; a 32-bit process lacks it.
        # Older kernels mark the 32-bit process instead (context.ia32_compat).
        if not int(context.flags) & MM_CONTEXT_HAS_VSYSCALL:
            return None
    elif context.type.resolved().has_member("ia32_compat") and int(context.ia32_compat):
        return None
    return kernel.object("struct vm_area_struct", gate)


@dataclass(frozen=True)
class MapsEntry:
    """What one /proc/PID/maps line says of a VMA, but a file's path.

    ``file`` is the ``struct file *`` of a file mapping (None for anonymous memory): its
    path is ``d_path(&file->f_path)`` (see :func:`collector.helpers.fs.seq_path`). ``name``
    is the name shown instead of a path: ``[heap]``, ``[stack]``, ``[vdso]``, ``[vvar]``,
    ``[vsyscall]``, ``[anon:NAME]``, or ``[anon_shmem:NAME]`` for a named shared anonymous
    mapping (which has a file); None if the line shows a path or nothing.
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

    @property
    def needs_path(self) -> bool:
        """Whether the line ends in the file's path (a file mapping without a name)."""
        return self.file is not None and self.name is None

    def line(self, path: str | None = None) -> str:
        """The /proc/PID/maps line (without its newline); ``path`` names a file mapping."""
        head = (
            f"{self.start:08x}-{self.end:08x} {self.perms} {self.offset:08x}"
            f" {self.major:02x}:{self.minor:02x} {self.inode} "
        )
        name = path if self.needs_path else self.name
        # show_map_vma() pads the name to a column 25 + 6 * sizeof(void *) characters in.
        return head if name is None else head.ljust(25 + 6 * 8 - 1) + " " + name


def show_map_vma(vma: Object) -> MapsEntry:
    """The facts fs/proc/task_mmu.c's ``show_map_vma()`` prints for one VMA (its name
    as ``get_vma_name()`` gives it since 6.11, and the same rules before).

    :param vma: ``struct vm_area_struct *``
    :raises NotApplicable: the VMA is named by a ``vm_ops->name`` method not rendered here.
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
    # 6.2 ("mm: anonymous shared memory naming") lets a shared anonymous mapping (a shmem
    # file) carry a prctl() name; before, anon_name shared a union with the file-only
    # vma->shared and meant nothing for a file.
    anon = _anon_vma_name(vma) if _anon_name_outside_union(vma) else None
    return MapsEntry(
        int(vma.vm_start),
        int(vma.vm_end),
        flags,
        int(vma.vm_pgoff) << PAGE_SHIFT,
        dev >> MINORBITS,
        dev & ((1 << MINORBITS) - 1),
        int(inode.i_ino),
        file.deref(),
        None if anon is None else f"[anon_shmem:{anon}]",
    )


def _anon_name_outside_union(vma: Object) -> bool:
    t = vma.type.resolved()
    if not t.has_member("anon_name"):
        return False
    if not t.has_member("shared"):
        return True
    return t.member("anon_name")[0] != t.member("shared")[0]


def _anon_vma_name(vma: Object) -> str | None:
    """``anon_vma_name(vma)->name``: a prctl(PR_SET_VMA_ANON_NAME) name, or None.

    CONFIG_ANON_VMA_NAME (5.17, "mm: add a field to store names for private anonymous
    memory") adds ``vma->anon_name``; a kernel built without it has no member.
    """
    if vma.vm_mm.is_null() or not vma.type.resolved().has_member("anon_name"):
        return None
    anon = vma.member("anon_name")
    if anon.is_null():
        return None
    # name[] is a flexible array: read it as the C string it is.
    text = vma.kernel.read_cstring(anon.member("name").address, ANON_VMA_NAME_MAX_LEN + 1)
    return text.decode("utf-8", "backslashreplace")


def _anonymous_name(vma: Object) -> str | None:
    """The name /proc/PID/maps gives a VMA without a file (``get_vma_name()`` in 6.11+,
    inline in ``show_map_vma()`` before)."""
    special = _vm_ops_name(vma)
    if special is not None:
        return special
    mm = vma.vm_mm
    if mm.is_null():
        return "[vdso]"
    start, end = int(vma.vm_start), int(vma.vm_end)
    start_brk, brk = int(mm.start_brk), int(mm.brk)
    if _initial_heap_is_strict(vma.kernel):
        heap = start < brk and end > start_brk
    else:
        heap = start <= brk and end >= start_brk
    if heap:
        return "[heap]"
    start_stack = int(mm.start_stack)
    if start <= start_stack <= end:
        return "[stack]"
    # The kernel asks whether the VMA has a file first (anon_vma_name() gave NULL for one
    # before 6.2); here the VMA has none.
    anon = _anon_vma_name(vma)
    return None if anon is None else f"[anon:{anon}]"


def _initial_heap_is_strict(kernel: Kernel) -> bool:
    """Whether ``[heap]`` needs the VMA to overlap ``[start_brk, brk)`` rather than touch it.

    6.6's ``vma_is_initial_heap()`` ("mm: factor out VMA stack and heap checks") asks
    ``vm_start < brk && vm_end > start_brk``; before, ``show_map_vma()`` asked ``<=`` and
    ``>=``, so a VMA ending right at ``start_brk`` was ``[heap]`` too. The change is in
    inline code and leaves no trace in BTF or the symbols, so the release says which rule
    the kernel follows; an unreadable release gets the newer rule.
    """
    release = kernel.release or ""
    parts = release.split(".", 2)
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1][:3] if c.isdigit()))
    except (ValueError, IndexError):
        return True
    return (major, minor) >= (6, 6)


def _vm_ops_name(vma: Object) -> str | None:
    """``vma->vm_ops->name(vma)``, for the methods that name VMAs on x86_64: those of
    ``_install_special_mapping()`` (the vDSO and vvar pages, ``special_mapping_name``: the
    ``name`` of the ``struct vm_special_mapping`` in ``vm_private_data``) and the vsyscall
    page's ``gate_vma_name`` (``[vsyscall]``)."""
    kernel = vma.kernel
    ops = vma.vm_ops
    if ops.is_null():
        return None
    function = ops.member("name").value()
    if not function:
        return None
    hit = kernel.symbols.address_to_symbol(function, max_offset=0)
    method = hit[0] if hit else f"{function:#x}"
    if method == "gate_vma_name":
        return "[vsyscall]"
    if method == "special_mapping_name":
        mapping = vma.vm_private_data.cast(kernel.type("struct vm_special_mapping *"))
        return None if mapping.is_null() else mapping.member("name").text(64)
    raise NotApplicable(
        f"VMA {vma.address:#x} is named by its vm_ops->name method {method}, which is code,"
        " not data: it is not rendered offline"
    )
