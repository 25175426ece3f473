"""Loaded kernel modules (include/linux/module.h, kernel/module/procfs.c, kernel/module/main.c).

Modules are ``struct module`` linked through ``list`` on the global ``modules`` list, the
list /proc/modules prints. Which module uses which is kept in ``struct module_use`` entries
(kernel/module/main.c: ``add_module_usage``); the taint letters come from kernel/panic.c's
``taint_flags`` table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.errors import CollectorError
from collector.helpers.list import DEFAULT_MAX_COUNT, list_for_each_entry
from collector.kernel.object import Object, Type

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: ``MODULE_REF_BASE`` (kernel/module/main.c): a live module's refcnt starts at 1.
MODULE_REF_BASE = 1

#: /proc/modules' words for ``enum module_state``.
MODULE_STATES = {
    "MODULE_STATE_LIVE": "Live",
    "MODULE_STATE_COMING": "Loading",
    "MODULE_STATE_GOING": "Unloading",
    "MODULE_STATE_UNFORMED": "Unformed",
}


def for_each_module(kernel: Kernel, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """Every loaded module (``struct module``), in the order /proc/modules lists them."""
    return list_for_each_entry("struct module", kernel.variable("modules"), "list", max_count)


def module_name(module: Object) -> str:
    """The module's name (``module->name``)."""
    return module.name.text()


def _memories(module: Object) -> dict[str, tuple[int, int]]:
    """``{region: (base, size)}`` of the module's memory."""
    # 6.4 ("module: replace module_layout with module_memory") split each layout into
    # mem[MOD_TEXT], mem[MOD_DATA]... indexed by enum mod_mem_type.
    if module.type.has_member("mem"):
        kernel = module.kernel
        out = {}
        for name, value in kernel.type("enum mod_mem_type").enumerators():
            if name == "MOD_MEM_NUM_TYPES" or not 0 <= value < len(module.mem):
                continue
            region = module.mem[value]
            out[name] = (region.base.value(), region.size.value())
        return out
    core, init = module.core_layout, module.init_layout
    return {
        "core": (core.base.value(), core.size.value()),
        "init": (init.base.value(), init.size.value()),
    }


def module_memory(module: Object) -> dict[str, tuple[int, int]]:
    """``{region: (base, size)}`` of each memory region of a module, empty ones included.

    6.4 on: ``mod->mem[type]`` named by ``enum mod_mem_type`` (``MOD_TEXT``, ``MOD_DATA``,
    ``MOD_RODATA``, ``MOD_RO_AFTER_INIT``, ``MOD_INIT_TEXT``...), each allocated on its own.
    Before: ``core`` and ``init`` (``mod->core_layout``, ``mod->init_layout``).

    :param module: ``struct module *``
    """
    return _memories(module)


def module_address(module: Object) -> int:
    """Where the module's code starts, the address /proc/modules shows."""
    regions = _memories(module)
    return regions["MOD_TEXT"][0] if "MOD_TEXT" in regions else regions["core"][0]


def module_size(module: Object) -> int:
    """The module's size in bytes as /proc/modules counts it: every region (init regions
    are zero once the module is live)."""
    return sum(size for _base, size in _memories(module).values())


def module_core_size(module: Object) -> int:
    """Bytes of the module that stay after loading (the init regions excluded)."""
    return sum(size for name, (_b, size) in _memories(module).items() if not _is_init(name))


def module_init_size(module: Object) -> int:
    """Bytes of the module's init regions (zero once it is live: they are freed)."""
    return sum(size for name, (_b, size) in _memories(module).items() if _is_init(name))


def _is_init(region: str) -> bool:
    # for_class_mod_mem_type(type, init) covers MOD_INIT_TEXT, MOD_INIT_DATA and
    # MOD_INIT_RODATA; MOD_RO_AFTER_INIT is core memory that becomes read-only after init.
    return region.startswith("MOD_INIT_") or region == "init"


def module_refcount(module: Object) -> int:
    """``module_refcount()``: how many users hold the module."""
    return module.refcnt.counter.value() - MODULE_REF_BASE


def module_state(module: Object) -> str:
    """``Live``, ``Loading``, ``Unloading`` or ``Unformed``, as /proc/modules says."""
    name = module.state.enumerator()
    return MODULE_STATES.get(name or "", f"state {module.state.value()}")


# -- who uses whom -------------------------------------------------------------------------------


def module_users(module: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """The modules that use ``module`` (``struct module *``), in the order /proc/modules
    prints them in its fourth column.

    ``add_module_usage(a, b)`` ("a uses b") puts one ``struct module_use`` on
    ``b->source_list`` (through ``use->source_list``) with ``use->source = a``, and the same
    entry on ``a->target_list``. Kernels built without CONFIG_MODULE_UNLOAD keep no usage.
    """
    for use in list_for_each_entry(
        "struct module_use", module.source_list, "source_list", max_count
    ):
        yield use.source


def module_uses(module: Object, max_count: int = DEFAULT_MAX_COUNT) -> Iterator[Object]:
    """The modules ``module`` uses (``struct module *``): its ``target_list``."""
    for use in list_for_each_entry(
        "struct module_use", module.target_list, "target_list", max_count
    ):
        yield use.target


# -- taints --------------------------------------------------------------------------------------

#: kernel/panic.c's ``taint_flags[]``, indexed by TAINT_* bit: ``(c_true, module)``, where
#: ``module`` says whether the flag is also set on modules and printed for them. Used when the
#: image's own table cannot be read. TAINT_TEST ("N") came in 6.0, TAINT_FWCTL ("J") in 6.15.
TAINT_FLAGS: tuple[tuple[str, bool], ...] = (
    ("P", True),  # TAINT_PROPRIETARY_MODULE
    ("F", True),  # TAINT_FORCED_MODULE
    ("S", False),  # TAINT_CPU_OUT_OF_SPEC
    ("R", False),  # TAINT_FORCED_RMMOD
    ("M", False),  # TAINT_MACHINE_CHECK
    ("B", False),  # TAINT_BAD_PAGE
    ("U", False),  # TAINT_USER
    ("D", False),  # TAINT_DIE
    ("A", False),  # TAINT_OVERRIDDEN_ACPI_TABLE
    ("W", False),  # TAINT_WARN
    ("C", True),  # TAINT_CRAP
    ("I", False),  # TAINT_FIRMWARE_WORKAROUND
    ("O", True),  # TAINT_OOT_MODULE
    ("E", True),  # TAINT_UNSIGNED_MODULE
    ("L", False),  # TAINT_SOFTLOCKUP
    ("K", True),  # TAINT_LIVEPATCH
    ("X", True),  # TAINT_AUX
    ("T", True),  # TAINT_RANDSTRUCT
    ("N", True),  # TAINT_TEST
    ("J", True),  # TAINT_FWCTL
)

#: ``module->taints`` is an unsigned long: no table has more flags than this.
_MAX_TAINT_FLAGS = 64


def taint_flags(kernel: Kernel) -> tuple[tuple[str, bool], ...]:
    """The kernel's ``taint_flags[]`` (kernel/panic.c) as ``(c_true, module)`` pairs, read
    from the image; :data:`TAINT_FLAGS` when the image lacks the symbol or the type, or its
    table does not look like one (every ``c_true`` an upper-case letter).

    TAINT_FLAGS_COUNT is a macro, so the table's length is what fits before the next symbol;
    the padding after it reads as NUL letters and ends it. Only ``c_true`` and ``module`` are
    read: struct taint_flag grew a ``desc`` pointer after 6.1 (6.12 has it).
    """
    address = kernel.symbols.get("taint_flags")
    if address is None:
        return TAINT_FLAGS
    try:
        entry = kernel.type("struct taint_flag")
        room = (kernel.symbols.next_address(address) or address) - address
        count = min(room // max(entry.size, 1), _MAX_TAINT_FLAGS)
        table = kernel.object(Type.array_of(entry, count), address)
        out = []
        for i in range(count):
            letter = table[i].c_true.value()
            if letter == 0:
                break
            if not ord("A") <= letter <= ord("Z"):
                return TAINT_FLAGS
            out.append((chr(letter), bool(table[i].module.value())))
    except CollectorError:
        return TAINT_FLAGS
    return tuple(out) if out else TAINT_FLAGS


def module_flags_taint(module: Object, flags: tuple[tuple[str, bool], ...] | None = None) -> str:
    """The module's taint letters, as ``module_flags_taint()`` (kernel/module/main.c) writes
    them inside the parentheses of /proc/modules: ``c_true`` of every flag marked for modules
    whose bit is set in ``module->taints``, in bit order (``"OE"``); ``""`` when none.

    :param flags: :func:`taint_flags` of the module's kernel (read once per walk); read
        here when not given.
    """
    if flags is None:
        flags = taint_flags(module.kernel)
    taints = module.taints.value()
    return "".join(
        c for bit, (c, for_modules) in enumerate(flags) if for_modules and taints >> bit & 1
    )
