"""The types of the kernel's well-known global variables, which BTF does not carry.

Kernel BTF describes every type but types only per-CPU variables: ``init_task`` is a symbol
without a type. This table gives each global its C type as the kernel source declares it;
the line it mirrors is kept beside it. A type is checked against the image's BTF when used: a
type BTF lacks is an error, and so is one larger than the room the symbol table leaves before
the next symbol (a sign that the table and the kernel disagree), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector.errors import NotApplicable
from collector.kernel.btf import BTF, Kind
from collector.kernel.object import Object, ObjectError, Type

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: The most elements an array of unknown length (``node_data[]``) is given.
MAX_UNSIZED_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Global:
    """A global variable: its C type (``[]`` for an array whose length is a config option)
    and the declaration it mirrors (file: line)."""

    type: str
    source: str


#: Global variables by symbol name. Arrays sized by a config option (``NR_CPUS``,
#: ``MAX_NUMNODES``) are ``[]``: their length is what the symbol table leaves room for.
GLOBALS: dict[str, Global] = {
    # processes
    "init_task": Global("struct task_struct", "init/init_task.c: struct task_struct init_task = {"),
    "init_pid_ns": Global("struct pid_namespace", "kernel/pid.c: struct pid_namespace init_pid_ns"),
    "init_uts_ns": Global(
        "struct uts_namespace", "init/version.c: struct uts_namespace init_uts_ns"
    ),
    "init_mm": Global("struct mm_struct", "mm/init-mm.c: struct mm_struct init_mm = {"),
    # modules
    "modules": Global(
        "struct list_head",
        "kernel/module/main.c: LIST_HEAD(modules); (kernel/module.c before 5.19)",
    ),
    "taint_flags": Global(
        "const struct taint_flag []",
        "kernel/panic.c: const struct taint_flag taint_flags[TAINT_FLAGS_COUNT]",
    ),
    "tainted_mask": Global("unsigned long", "kernel/panic.c: static unsigned long tainted_mask"),
    # the kernel log
    "prb": Global(
        "struct printk_ringbuffer *",
        "kernel/printk/printk.c: static struct printk_ringbuffer *prb = &printk_rb_static;",
    ),
    "log_buf": Global("char *", "kernel/printk/printk.c: static char *log_buf = __log_buf;"),
    "log_buf_len": Global("u32", "kernel/printk/printk.c: static u32 log_buf_len"),
    "saved_command_line": Global("char *", "init/main.c: char *saved_command_line;"),
    "linux_banner": Global("const char []", "init/version.c: const char linux_banner[] ="),
    # memory
    "node_data": Global(
        "struct pglist_data *[]",
        "arch/x86/mm/numa.c: struct pglist_data *node_data[MAX_NUMNODES] __read_mostly;",
    ),
    "mem_section": Global(
        "struct mem_section **",
        "mm/sparse.c: struct mem_section **mem_section; (CONFIG_SPARSEMEM_EXTREME)",
    ),
    "slab_caches": Global("struct list_head", "mm/slab_common.c: LIST_HEAD(slab_caches);"),
    "vm_zone_stat": Global(
        "atomic_long_t []",
        "mm/vmstat.c: atomic_long_t vm_zone_stat[NR_VM_ZONE_STAT_ITEMS]",
    ),
    "vm_node_stat": Global(
        "atomic_long_t []",
        "mm/vmstat.c: atomic_long_t vm_node_stat[NR_VM_NODE_STAT_ITEMS]",
    ),
    "_totalram_pages": Global("atomic_long_t", "mm/page_alloc.c: atomic_long_t _totalram_pages"),
    # CPUs
    "__per_cpu_offset": Global(
        "unsigned long []",
        "arch/x86/kernel/setup_percpu.c: unsigned long __per_cpu_offset[NR_CPUS]",
    ),
    "nr_cpu_ids": Global("unsigned int", "kernel/smp.c: unsigned int nr_cpu_ids = NR_CPUS;"),
    "__cpu_possible_mask": Global(
        "struct cpumask", "kernel/cpu.c: struct cpumask __cpu_possible_mask __ro_after_init;"
    ),
    "__cpu_online_mask": Global(
        "struct cpumask", "kernel/cpu.c: struct cpumask __cpu_online_mask __read_mostly;"
    ),
    "__cpu_present_mask": Global(
        "struct cpumask", "kernel/cpu.c: struct cpumask __cpu_present_mask __read_mostly;"
    ),
    # time
    "jiffies_64": Global("u64", "kernel/time/timer.c: u64 jiffies_64 = INITIAL_JIFFIES;"),
    "jiffies": Global("unsigned long", "arch/x86/kernel/vmlinux.lds.S: jiffies = jiffies_64;"),
    # sysfs
    "module_kset": Global("struct kset *", "kernel/params.c: struct kset *module_kset;"),
    # file systems
    "super_blocks": Global("struct list_head", "fs/super.c: static LIST_HEAD(super_blocks);"),
}

_PERCPU_SECTION = ".data..percpu"


def variable_type(kernel: Kernel, name: str) -> Type:
    """The type of global ``name``: from :data:`GLOBALS`, else from a BTF ``VAR``.

    :raises NotApplicable: the variable is unknown, is per-CPU (use ``per_cpu``), or its
        declared type does not fit this kernel.
    """
    entry = GLOBALS.get(name)
    if entry is None:
        kernel.symbol(name)  # an unknown symbol is named as such first
        return _btf_variable_type(kernel, name)
    return declared_type(kernel, name, entry)


def declared_type(kernel: Kernel, name: str, entry: Global) -> Type:
    """The type ``entry`` declares for global ``name``, checked as :func:`variable_type`
    checks :data:`GLOBALS` entries (for tables of globals kept elsewhere).

    :raises NotApplicable: the symbol is unknown, or the type is not in BTF or does not fit.
    """
    address = kernel.symbol(name)
    try:
        t = kernel.type(entry.type)
    except ObjectError as exc:
        raise NotApplicable(
            f"global {name}: its type {entry.type!r} ({entry.source}) does not exist in this"
            f" kernel's BTF: {exc}"
        ) from None
    room = _room(kernel, address)
    r = t.resolved()
    if r.kind is Kind.ARRAY and r.array_length == 0:
        elem = r.pointee.size
        if room is None:
            raise NotApplicable(
                f"global {name}: the length of {entry.type} is not known (no symbol follows it)"
            )
        return Type.array_of(r.pointee, min(room // elem, MAX_UNSIZED_ELEMENTS))
    if room is not None and t.size > room:
        raise NotApplicable(
            f"global {name}: {t} is {t.size} bytes but the next symbol is {room} bytes after"
            f" {address:#x}; the declaration it mirrors ({entry.source}) does not fit this kernel"
        )
    return t


def variable(kernel: Kernel, name: str) -> Object:
    """The global variable ``name`` as an :class:`Object` (see :func:`variable_type`)."""
    return Object(kernel, variable_type(kernel, name), kernel.symbol(name))


def _room(kernel: Kernel, address: int) -> int | None:
    nxt = kernel.symbols.next_address(address)
    return None if nxt is None else nxt - address


def _btf_var(btf: BTF, name: str) -> int | None:
    """The type id of BTF's ``VAR`` named ``name``, or None."""
    for tid in btf.find_all(name):
        if btf.kind(tid) is Kind.VAR:
            return tid
    return None


def _btf_variable_type(kernel: Kernel, name: str) -> Type:
    btf = kernel.btf
    var = _btf_var(btf, name)
    if var is not None:
        if _in_percpu_section(btf, var):
            raise NotApplicable(
                f"{name} is a per-CPU variable: read it with per_cpu(kernel, {name!r}, cpu)"
            )
        return Type(btf, btf.type(var).ref or 0)
    raise NotApplicable(
        f"the type of global {name!r} is unknown: BTF types only per-CPU variables, and"
        " collector.kernel.variables.GLOBALS has no entry for it"
    )


def _in_percpu_section(btf: BTF, var_id: int) -> bool:
    for tid in btf.find_all(_PERCPU_SECTION):
        t = btf.type(tid)
        if t.kind is Kind.DATASEC and any(s.type_id == var_id for s in t.secinfos):
            return True
    return False


def percpu_variable_type(kernel: Kernel, name: str) -> Type:
    """The type of per-CPU variable ``name``, from its BTF ``VAR``.

    :raises NotApplicable: BTF has no such variable.
    """
    btf = kernel.btf
    var = _btf_var(btf, name)
    if var is None:
        raise NotApplicable(f"BTF has no per-CPU variable named {name!r}")
    return Type(btf, btf.type(var).ref or 0)


def tk_core_timekeeper_offset(btf: BTF) -> int:
    """Where ``struct timekeeper timekeeper`` sits inside ``tk_core``."""
    # v6.13 "timekeeping: Define a struct type for tk_core to make it reusable" named the
    # type struct tk_data.
    if btf.has_member("tk_data", "timekeeper"):
        return btf.offsetof("tk_data", "timekeeper")
    # Before, tk_core is an anonymous struct { seq; struct timekeeper timekeeper; }, so the
    # timekeeper follows seq, aligned to its 8-byte members (u64, ktime_t). v5.10
    # "timekeeping: Use sequence counter with associated raw spinlock" made seq a
    # seqcount_raw_spinlock_t; it was a seqcount_t before.
    if btf.has_member("seqcount_raw_spinlock", "seqcount"):
        seq = btf.sizeof("seqcount_raw_spinlock")
    else:
        seq = btf.sizeof("seqcount")
    return (seq + 7) // 8 * 8
