"""Kernel modules hidden from the kernel's own lists: three views of the loaded modules
compared (kernel/module/main.c, kernel/params.c, mm/vmalloc.c).

1. the module list: ``struct module`` on ``modules`` through ``list`` (/proc/modules, lsmod);
2. the sysfs kset: ``module_kset->list`` of ``struct kobject``, each the ``kobj`` of a
   ``struct module_kobject`` whose ``mod`` is the module (/sys/module);
3. module memory: the busy vmalloc areas in the module area, each holding one region of a
   module (``mod->mem[type]`` from 6.4, ``core_layout``/``init_layout`` before).

A module that unlinks itself from the list (``list_del(&THIS_MODULE->list)``) stays in the
other two views; one that also deletes its kobject still leaves its memory allocated.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from collector.api import (
    Analysis,
    Field,
    ImageError,
    Implausible,
    Object,
    Option,
    PageNotCaptured,
    container_of,
    for_each_module,
    for_each_vmap_area_reverse,
    hookimpl,
    list_for_each_entry,
    module_address,
    module_memory,
    module_size,
    module_state,
    plausible_text,
    vmap_area_lists,
)
from collector.profiles.x86_64 import MODULES_END, MODULES_VADDR, PAGE_SIZE

if TYPE_CHECKING:
    from collector.api import Kernel

VIEW_LIST = "module list"
VIEW_KSET = "sysfs kset"
VIEW_MEMORY = "module memory"
VIEWS = (VIEW_LIST, VIEW_KSET, VIEW_MEMORY)

#: ``MODULE_NAME_LEN`` (include/linux/module.h): ``64 - sizeof(unsigned long)``.
MODULE_NAME_LEN = 56
#: The most modules either list may hold before it is called broken: far above the few
#: thousand a distribution ships, low enough that a hostile image cannot keep us busy.
MAX_MODULES = 65_536
#: Each module-area allocation takes at least a page and its guard page.
MAX_AREAS = (MODULES_END - MODULES_VADDR) // (2 * PAGE_SIZE)
#: The first entries of each view are checked strictly: a bad one means the image's types
#: do not fit its memory. Later ones may be torn by a live capture and are passed over.
STRICT = 4
#: The most bytes of one unclaimed allocation searched for a ``struct module``.
MAX_SCAN = 64 << 20

#: Who made a module-area allocation, by the function ``vm_struct->caller`` falls in: the
#: return address of the call into the vmalloc core, i.e. the caller of module_alloc()
#: (before 6.10) or of execmem_alloc() (6.10 on), after the compiler's inlining and tail
#: calls (on Debian 6.1 and 6.12 every module region says ``load_module``, BPF packs
#: ``bpf_prog_pack_alloc``).
MODULE_LOADER = "module loader"
_OWNERS = {
    # kernel/module/main.c: move_module() calls module_alloc() (before 6.4) or
    # module_memory_alloc() (6.4 on), usually inlined into load_module().
    "load_module": MODULE_LOADER,
    "layout_and_allocate": MODULE_LOADER,
    "move_module": MODULE_LOADER,
    "module_memory_alloc": MODULE_LOADER,
    "module_alloc": MODULE_LOADER,
    # kernel/kprobes.c: __get_insn_slot() calls alloc_insn_page() (arch/x86/kernel/kprobes/core.c)
    # for out-of-line instruction slots; optprobes call alloc_optinsn_page().
    "alloc_insn_page": "kprobes",
    "__get_insn_slot": "kprobes",
    "alloc_optinsn_page": "kprobes",
    # arch/x86/kernel/ftrace.c: trampolines for ftrace_ops (create_trampoline(), alloc_tramp()).
    "alloc_tramp": "ftrace",
    "create_trampoline": "ftrace",
    "arch_ftrace_update_trampoline": "ftrace",
    # arch/x86/kernel/alternative.c (6.15): indirect-thunk pages for ITS mitigation.
    "its_alloc": "its thunks",
}


def allocation_owner(caller: str | None) -> str:
    """Which subsystem made a module-area allocation, from the name of the function its
    ``vm_struct->caller`` falls in: ``module loader``, ``bpf`` (JIT images, prog packs,
    trampolines and dispatchers: every caller in kernel/bpf/ and the x86 JIT has ``bpf`` in
    its name), ``kprobes``, ``ftrace``, ``its thunks``, else ``unknown``."""
    if caller is None:
        return "unknown"
    if caller in _OWNERS:
        return _OWNERS[caller]
    if "bpf" in caller:
        return "bpf"
    return "unknown"


#: Owners whose allocations are not modules: never reported as unclaimed module memory.
NOT_MODULES = frozenset({"bpf", "kprobes", "ftrace", "its thunks"})

FIELDS = (
    Field(
        "kind",
        "str",
        "module (a struct module on the module list or in the sysfs kset), recovered module"
        " (a struct module found only inside module memory), unclaimed memory (a module-area"
        " allocation no module accounts for) or, with --all, other allocation (BPF, kprobes,"
        " ftrace: not modules)",
    ),
    Field("name", "str", "module->name; null for memory no struct module was found in"),
    Field("module", "hex", "the struct module's address; null for unclaimed memory"),
    Field(
        "base",
        "hex",
        "where the module's code starts (mem[MOD_TEXT].base, core_layout.base before 6.4),"
        " as /proc/modules shows it; for memory, the allocation's start (vmap_area.va_start)",
    ),
    Field(
        "size",
        "int",
        "the module's size as /proc/modules counts it (every region); for memory, the"
        " allocation's size with its guard page, as /proc/vmallocinfo counts it",
    ),
    Field("state", "str", "Live, Loading, Unloading or Unformed (module->state); null for memory"),
    Field(
        "seen_in",
        "str",
        "the views that hold it, comma-separated: module list, sysfs kset, module memory",
    ),
    Field("missing_from", "str", "the views that lack it, comma-separated; empty when none"),
    Field(
        "caller",
        "str",
        "the symbol vm_struct->caller falls in (function+offset) for the allocation holding"
        " the module's base or for the memory itself: who allocated it",
    ),
)

HIDDEN_MODULES = Analysis(
    name="hidden_modules",
    summary="modules missing from the module list, the sysfs kset or module memory",
    fields=FIELDS,
    options=(
        Option(
            "all",
            bool,
            False,
            "also modules all three views agree on, and module-area allocations of BPF,"
            " kprobes and ftrace",
        ),
    ),
    run=lambda kernel, options: hidden_modules(kernel, show_all=options["all"]),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [HIDDEN_MODULES]


# -- the views ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Area:
    """A busy vmalloc area in the module area: ``[start, end)``, guard page included."""

    start: int
    end: int
    #: ``va->vm``: the ``struct vm_struct *`` (NULL for vm_map_ram() areas).
    vm: int
    #: ``vm->caller`` as ``function+0xoffset`` (the bare address if no symbol holds it).
    caller: str | None
    #: :func:`allocation_owner` of the function ``vm->caller`` falls in.
    owner: str


@dataclass
class _Module:
    """A ``struct module`` some view holds, and which views do."""

    address: int
    name: str
    state: str | None
    base: int
    size: int
    regions: tuple[tuple[int, int], ...]  # (base, size) of each non-empty region
    kind: str = "module"
    views: set[str] = field(default_factory=set)


def _in_module_area(address: int) -> bool:
    return MODULES_VADDR <= address < MODULES_END


def _read_module(module: Object, strict: bool, kind: str = "module") -> _Module:
    """What the comparison needs of one ``struct module``; ``strict`` checks it is real."""
    what = f"struct module {module.address:#x}"
    raw = module.name.string(MODULE_NAME_LEN)
    if strict:
        name = plausible_text(raw, f"{what} name")
    else:
        name = raw.decode("utf-8", "backslashreplace")
    regions = tuple((b, s) for b, s in module_memory(module).values() if s)
    if strict:
        for base, size in regions:
            if not _in_module_area(base) or not _in_module_area(base + size - 1):
                raise Implausible(
                    f"{what} ({name}) memory",
                    f"{base:#x}+{size:#x} is outside the module area"
                    f" {MODULES_VADDR:#x}-{MODULES_END:#x}",
                )
    return _Module(
        address=module.address,
        name=name,
        state=module_state(module),
        base=module_address(module),
        size=module_size(module),
        regions=regions,
        kind=kind,
    )


def module_list_view(kernel: Kernel) -> Iterator[_Module]:
    """The modules on ``modules``, in list order (the first :data:`STRICT` checked)."""
    for i, module in enumerate(for_each_module(kernel, MAX_MODULES)):
        yield _read_module(module, strict=i < STRICT)


def module_kset_view(kernel: Kernel) -> Iterator[Object]:
    """The ``struct module`` of each loaded module in ``module_kset`` (kernel/params.c).

    Built-in modules have kobjects there too (``locate_module_kobject()`` makes one for each
    built-in with parameters or a version), with ``mod`` NULL: they are not loaded modules
    and are passed over. A loaded module's ``module_kobject`` is its own ``mod->mkobj``; an
    entry whose ``mod`` does not hold it is not a module's (checked strictly for the first
    entries, passed over later as a torn read).
    """
    kset = kernel.variable("module_kset")
    mkobj_offset = kernel.object("struct module", 0).mkobj.address
    for i, kobj in enumerate(
        list_for_each_entry("struct kobject", kset.list, "entry", MAX_MODULES)
    ):
        strict = i < STRICT
        mk = container_of(kobj, "struct module_kobject", "kobj")
        if strict:
            plausible_text(kobj.name.string(MODULE_NAME_LEN), f"kobject {kobj.address:#x} name")
        mod = mk.mod.value()
        if not mod:
            continue
        if mod + mkobj_offset != mk.address:
            if strict:
                raise Implausible(
                    f"module_kobject {mk.address:#x} in module_kset",
                    f"points at struct module {mod:#x}, whose mkobj is elsewhere",
                )
            continue
        yield kernel.object("struct module", mod)


def module_area_allocations(kernel: Kernel) -> list[Area]:
    """The busy vmalloc areas between ``MODULES_VADDR`` and ``MODULES_END``, by address.

    Each busy list is walked from its end (its highest address) down to the first area below
    the module area, so the rest of vmalloc space, where stacks come and go while a live
    machine is captured, is never read. The last area of a list is checked strictly; one out
    of address order later means the list is broken.
    """
    areas: list[Area] = []
    symbols = kernel.symbols
    for head in vmap_area_lists(kernel):
        above = MODULES_END
        for i, va in enumerate(for_each_vmap_area_reverse(head, MAX_AREAS)):
            start, end = va.va_start.value(), va.va_end.value()
            if start < MODULES_VADDR:
                break
            if start % PAGE_SIZE or end % PAGE_SIZE or not start < end <= above:
                what = f"vmap_area {va.address:#x} on the list at {head.address:#x}"
                detail = f"spans {start:#x}-{end:#x}, not a page-aligned range below {above:#x}"
                if i == 0:
                    raise Implausible(what, detail)
                raise ImageError(f"hidden_modules: {what} {detail}: the list is out of order")
            above = start
            vm = va.vm.value()
            caller = function = None
            if vm:
                address = kernel.object("struct vm_struct", vm).caller.value()
                hit = symbols.address_to_symbol(address)
                if hit is None:
                    caller = f"{address:#x}"
                else:
                    function = hit[0]
                    caller = f"{function}+{hit[1]:#x}"
            areas.append(Area(start, end, vm, caller, allocation_owner(function)))
    areas.sort(key=lambda a: a.start)
    for a, b in pairwise(areas):
        if b.start < a.end:
            raise ImageError(
                f"hidden_modules: vmap areas {a.start:#x}-{a.end:#x} and"
                f" {b.start:#x}-{b.end:#x} overlap"
            )
    return areas


class _Areas:
    """The module-area allocations, looked up by address."""

    def __init__(self, areas: list[Area]) -> None:
        self.areas = areas
        self._starts = [a.start for a in areas]

    def containing(self, address: int) -> Area | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.areas[i].end:
            return self.areas[i]
        return None


# -- recovering a struct module from memory -------------------------------------------------


def find_struct_module(kernel: Kernel, area: Area) -> _Module | None:
    """A ``struct module`` inside ``area``, found by its back-pointer: a loaded module's
    ``mkobj.mod`` points at the module itself (``mod_sysfs_init()``), which a hider rarely
    thinks to clear. The candidate must also have a printable name and one of its own
    memory regions holding it (the module structure lives in the module's data section,
    ``.gnu.linkonce.this_module``). Pages the image lacks are skipped.
    """
    back = kernel.object("struct module", 0).member("mkobj").mod.address
    words_per_page = PAGE_SIZE // 8
    offsets = np.arange(words_per_page, dtype=np.uint64) * np.uint64(8)
    for page in range(area.start, min(area.end, area.start + MAX_SCAN), PAGE_SIZE):
        try:
            data = kernel.read_virt(page, PAGE_SIZE)
        except (ImageError, PageNotCaptured):
            continue  # the guard page, or a page the image lacks
        words = np.frombuffer(data, dtype="<u8")
        expected = np.uint64(page - back) + offsets
        for index in np.nonzero(words == expected)[0]:
            candidate = page + int(index) * 8 - back
            if candidate < area.start:
                continue
            module = kernel.object("struct module", candidate)
            try:
                found = _read_module(module, strict=True, kind="recovered module")
            except (ImageError, PageNotCaptured):
                continue
            if any(b <= candidate < b + s for b, s in found.regions):
                return found
    return None


# -- the comparison -------------------------------------------------------------------------


def _views(seen: set[str]) -> tuple[str, str]:
    return (
        ", ".join(v for v in VIEWS if v in seen),
        ", ".join(v for v in VIEWS if v not in seen),
    )


def hidden_modules(kernel: Kernel, show_all: bool = False) -> Iterator[dict[str, Any]]:
    """Records of modules and module memory that the three views do not agree on.

    No record means every module is in all three views and every module-area allocation
    belongs to one of them or to BPF, kprobes or ftrace. ``show_all`` adds a record for
    every module and every other allocation.
    """
    modules: dict[int, _Module] = {}
    for module in module_list_view(kernel):
        modules.setdefault(module.address, module).views.add(VIEW_LIST)
    listed = len(modules)
    in_kset = 0
    for i, obj in enumerate(module_kset_view(kernel)):
        known = modules.get(obj.address)
        if known is None:
            known = modules[obj.address] = _read_module(obj, strict=i < STRICT)
        else:
            in_kset += 1
        known.views.add(VIEW_KSET)
    if listed >= 2 and in_kset == 0:
        raise Implausible("module_kset", f"holds none of the {listed} modules of the module list")

    areas = _Areas(module_area_allocations(kernel))
    claimed: set[int] = set()

    def claim(module: _Module) -> bool:
        """Mark the areas holding the module's regions; whether it has every region."""
        whole = True
        for base, _size in module.regions:
            area = areas.containing(base)
            if area is None:
                whole = False
            else:
                claimed.add(area.start)
        return whole and bool(module.regions)

    in_memory = 0
    for module in modules.values():
        if claim(module):
            module.views.add(VIEW_MEMORY)
            in_memory += VIEW_LIST in module.views
    with_memory = sum(1 for m in modules.values() if VIEW_LIST in m.views and m.regions)
    if with_memory >= 2 and in_memory == 0:
        raise Implausible(
            "the vmap areas of the module area",
            f"hold none of the {with_memory} modules of the module list",
        )

    # Allocations from the module loader (or from no code we know) that no module claims:
    # look inside for the struct module of a module that left both lists.
    for area in areas.areas:
        if area.start in claimed or area.owner in NOT_MODULES:
            continue
        module = find_struct_module(kernel, area)
        if module is None or module.address in modules:
            continue
        modules[module.address] = module
        if claim(module):
            module.views.add(VIEW_MEMORY)

    for module in modules.values():
        if module.views == set(VIEWS) and not show_all:
            continue
        seen_in, missing_from = _views(module.views)
        holder = areas.containing(module.base)
        yield {
            "kind": module.kind,
            "name": module.name,
            "module": module.address,
            "base": module.base,
            "size": module.size,
            "state": module.state,
            "seen_in": seen_in,
            "missing_from": missing_from,
            "caller": None if holder is None else holder.caller,
        }

    for area in areas.areas:
        if area.start in claimed:
            continue
        other = area.owner in NOT_MODULES
        if other and not show_all:
            continue
        seen_in, missing_from = _views({VIEW_MEMORY})
        yield {
            "kind": "other allocation" if other else "unclaimed memory",
            "name": None,
            "module": None,
            "base": area.start,
            "size": area.end - area.start,
            "state": None,
            "seen_in": seen_in,
            "missing_from": "" if other else missing_from,
            "caller": area.caller,
        }
