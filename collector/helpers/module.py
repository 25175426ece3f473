"""Loaded kernel modules (include/linux/module.h, kernel/module/procfs.c).

Modules are ``struct module`` linked through ``list`` on the global ``modules`` list, the
list /proc/modules prints.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.helpers.list import DEFAULT_MAX_COUNT, list_for_each_entry
from collector.kernel.object import Object

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
    return sum(
        size
        for name, (_b, size) in _memories(module).items()
        if "INIT" not in name and name != "init"
    )


def module_init_size(module: Object) -> int:
    """Bytes of the module's init regions (zero once it is live: they are freed)."""
    return sum(
        size for name, (_b, size) in _memories(module).items() if "INIT" in name or name == "init"
    )


def module_refcount(module: Object) -> int:
    """``module_refcount()``: how many users hold the module."""
    return module.refcnt.counter.value() - MODULE_REF_BASE


def module_state(module: Object) -> str:
    """``Live``, ``Loading``, ``Unloading`` or ``Unformed``, as /proc/modules says."""
    name = module.state.enumerator()
    return MODULE_STATES.get(name or "", f"state {module.state.value()}")
