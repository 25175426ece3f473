"""The loaded kernel modules, as /proc/modules lists them, set beside the /proc/modules the
capture took: ``struct module`` on the ``modules`` list (include/linux/module.h,
kernel/module/procfs.c, kernel/module/main.c) and its parameters (include/linux/moduleparam.h,
kernel/params.c).

:func:`module_record` turns one ``struct module`` into a record; other analyses that find
modules elsewhere than on the list use it too.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from collector.api import (
    Analysis,
    CollectorError,
    Field,
    Implausible,
    for_each_module,
    hookimpl,
    module_address,
    module_core_size,
    module_init_size,
    module_refcount,
    module_size,
    module_state,
    plausible_int,
    plausible_text,
)
from collector.helpers.module import module_flags_taint, module_users, taint_flags

if TYPE_CHECKING:
    from collector.api import Kernel, Object

FIELDS = (
    Field("name", "str", "the module's name (module->name)"),
    Field(
        "address",
        "hex",
        "where its code starts, as /proc/modules shows it: mem[MOD_TEXT].base (6.4 on),"
        " core_layout.base before",
    ),
    Field(
        "size",
        "int",
        "bytes as /proc/modules counts them: every mem[] region (6.4 on), core_layout.size"
        " plus init_layout.size before",
    ),
    Field("core_size", "int", "bytes that stay after loading (the init regions left out)"),
    Field("init_size", "int", "bytes of the init regions; 0 once the module is live"),
    Field("state", "str", "Live, Loading, Unloading or Unformed (module->state)"),
    Field(
        "refcount",
        "int",
        "module_refcount(): module->refcnt less its base of 1; null on kernels built"
        " without CONFIG_MODULE_UNLOAD (/proc/modules prints -)",
    ),
    Field(
        "users",
        "str",
        "/proc/modules' fourth column: the modules using this one (module->source_list),"
        " each followed by a comma, then [permanent], when it has an init but no exit"
        " function; - when neither",
    ),
    Field(
        "taints",
        "str",
        "the taint letters /proc/modules prints in parentheses (module->taints through"
        " kernel/panic.c's taint_flags: O out of tree, E unsigned...); empty when none",
    ),
    Field(
        "parameters",
        "str",
        "module->kp: name=value for the standard types (numbers, Y/N for bools, strings"
        " JSON-quoted), the name alone for arrays and custom types; space-separated",
    ),
    Field("module", "hex", "the address of the struct module"),
    Field(
        "proc_modules",
        "str",
        "the /proc/modules taken when the capture began: present (same name, size and address),"
        " differs, missing (not in it), missing-from-list (in it but not on the list in"
        " memory: a record of its own, from its line); null when the image has no such blob",
    ),
    Field("notes", "str", "what differs from /proc/modules, and why a record is partial"),
)

LSMOD = Analysis(
    name="lsmod",
    summary="loaded kernel modules: address, sizes, state, users, taints, parameters,"
    " checked against the captured /proc/modules",
    fields=FIELDS,
    run=lambda kernel, options: lsmod(kernel),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [LSMOD]


#: The most parameters a module is believed to declare (module->num_kp); the largest in-tree
#: drivers have a few dozen.
MAX_PARAMS = 4096
#: The longest parameter string read: sysfs shows a parameter in one page.
MAX_PARAM_STRING = 4096
#: A module's name is ``char name[MODULE_NAME_LEN]``; a user's is read no further.
MODULE_NAME_LEN = 64


# -- one struct module ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleContext:
    """What reading many modules of one kernel shares, found once: the taint table, the
    standard parameter types by the address of their ``struct kernel_param_ops``, and the
    module area. Build it with :meth:`of`."""

    taint_flags: tuple[tuple[str, bool], ...]
    param_ops: Mapping[int, str]
    area: tuple[int, int] | None

    @classmethod
    def of(cls, kernel: Kernel) -> ModuleContext:
        ops = {}
        for name in PARAM_FORMATS:
            address = kernel.symbols.get(name)
            if address is not None:
                ops[address] = name
        return cls(taint_flags(kernel), ops, module_area(kernel))


def module_area(kernel: Kernel) -> tuple[int, int] | None:
    """``[MODULES_VADDR, MODULES_END)`` of the image's architecture profile, or None when the
    profile does not say."""
    low = getattr(kernel.profile, "MODULES_VADDR", None)
    high = getattr(kernel.profile, "MODULES_END", None)
    return None if low is None or high is None else (low, high)


def module_record(module: Object, context: ModuleContext | None = None) -> dict[str, Any]:
    """The lsmod record of one ``struct module`` (every field; ``proc_modules`` and ``notes``
    are None, the cross-view with /proc/modules being the walk's business).

    :param context: what :meth:`ModuleContext.of` found for the module's kernel; found here
        when not given (once per walk is enough).
    :raises Implausible: the name is not text, the state no ``enum module_state`` value, the
        address outside the module area, a size or the parameter count out of bounds.
    """
    if context is None:
        context = ModuleContext.of(module.kernel)
    where = f"module {module.address:#x}"
    name = plausible_text(module.name.value(), f"{where} name")
    where = f"module {name!r} ({module.address:#x})"
    if module.state.enumerator() is None:
        raise Implausible(f"{where} state", f"is {module.state.value()}, no enum module_state")
    address = module_address(module)
    span = (1 << 32) - 1  # the sizes are unsigned int
    if context.area is not None:
        low, high = context.area
        span = high - low
        if not low <= address < high:
            raise Implausible(
                f"{where} address", f"is {address:#x}, outside the module area {low:#x}..{high:#x}"
            )
    size = plausible_int(module_size(module), 1, span, f"{where} size")
    record = dict.fromkeys(f.name for f in FIELDS)
    # Without CONFIG_MODULE_UNLOAD there is no refcnt and no usage: /proc/modules prints
    # " - -" (kernel/module/procfs.c, print_unload_info()).
    unload = module.type.has_member("refcnt") and module.type.has_member("source_list")
    record.update(
        name=name,
        address=address,
        size=size,
        core_size=module_core_size(module),
        init_size=module_init_size(module),
        state=module_state(module),
        refcount=module_refcount(module) if unload else None,
        users=proc_modules_users(module) if unload else "-",
        taints=module_flags_taint(module, context.taint_flags),
        parameters=module_parameters(module, context.param_ops, f"{where} num_kp"),
        module=module.address,
    )
    return record


def proc_modules_users(module: Object) -> str:
    """/proc/modules' fourth column, as ``print_unload_info()`` writes it: each user's name
    and a comma, ``[permanent],`` for a module that can be loaded but not unloaded (an init
    function and no exit function), ``-`` when neither."""
    out = "".join(f"{user.name.text(MODULE_NAME_LEN)}," for user in module_users(module))
    if module.type.has_member("exit") and module.init.value() and not module.exit.value():
        out += "[permanent],"
    return out or "-"


# -- parameters ----------------------------------------------------------------------------------

#: kernel/params.c's standard ``param_ops_*`` (STANDARD_PARAM_DEF and friends): how each keeps
#: its value at ``kp->arg`` (a struct format) and how its ``get()`` prints it. ``charp`` holds
#: a ``char *``, ``string`` a ``struct kparam_string``; bools print Y or N (invbool inverted).
PARAM_FORMATS: dict[str, str] = {
    "param_ops_byte": "<B",
    "param_ops_short": "<h",
    "param_ops_ushort": "<H",
    "param_ops_int": "<i",
    "param_ops_uint": "<I",
    "param_ops_long": "<q",
    "param_ops_ulong": "<Q",
    "param_ops_ullong": "<Q",
    "param_ops_hexint": "<I",
    "param_ops_bint": "<i",
    "param_ops_bool": "?",
    "param_ops_bool_enable_only": "?",
    "param_ops_invbool": "?",
    "param_ops_charp": "charp",
    "param_ops_string": "string",
}


def module_parameters(module: Object, param_ops: Mapping[int, str], what: str) -> str:
    """``module->kp[0..num_kp)`` as ``name=value`` words (see :data:`PARAM_FORMATS`); a
    parameter of another type (an array, a module's own ops), or whose value cannot be read,
    is its name alone, and one whose name cannot be read is ``?``."""
    count = plausible_int(module.num_kp.value(), 0, MAX_PARAMS, what)
    words = []
    for i in range(count):
        kp = module.kp[i]
        # The parameters add to a module's record; a page of them the image lacks must not
        # cost the module list.
        try:
            name = kp.name.text(MAX_PARAM_STRING)
        except CollectorError:
            words.append("?")
            continue
        try:
            kind = param_ops.get(kp.ops.value())
            value = None if kind is None else _param_value(module.kernel, kind, kp.arg.value())
        except CollectorError:
            value = None
        words.append(name if value is None else f"{name}={value}")
    return " ".join(words)


def _param_value(kernel: Kernel, kind: str, arg: int) -> str:
    fmt = PARAM_FORMATS[kind]
    if fmt == "charp":  # param_get_charp(): "%s" of *(char **)arg
        pointer = kernel.read_pointer(arg)
        return "(null)" if pointer == 0 else _quoted(kernel.read_cstring(pointer, MAX_PARAM_STRING))
    if fmt == "string":  # struct kparam_string { unsigned int maxlen; char *string; }
        kps = kernel.object("struct kparam_string", arg)
        # param_set_copystring() keeps the text and its NUL within maxlen bytes.
        limit = min(max(kps.maxlen.value() - 1, 0), MAX_PARAM_STRING)
        return _quoted(kernel.read_cstring(kps["string"].value(), limit))
    (value,) = struct.unpack(fmt, kernel.read_virt(arg, struct.calcsize(fmt)))
    if fmt == "?":
        return "Y" if value != (kind == "param_ops_invbool") else "N"
    if kind == "param_ops_hexint":  # "%#08x": C prints no 0x for zero
        return f"{value:#08x}" if value else "00000000"
    return str(value)


def _quoted(raw: bytes) -> str:
    return json.dumps(raw.decode("utf-8", "backslashreplace"), ensure_ascii=False)


# -- /proc/modules as captured -------------------------------------------------------------------


@dataclass(frozen=True)
class ProcModule:
    """One line of /proc/modules: ``name size refcount users state address [(taints)]``."""

    name: str
    size: int
    refcount: int | None
    users: str
    state: str
    address: int
    taints: str


def parse_proc_modules(text: bytes) -> dict[str, ProcModule]:
    """The lines of a /proc/modules text by module name (the first line of a name wins); lines
    that are not /proc/modules lines are left out."""
    out: dict[str, ProcModule] = {}
    for line in text.decode("utf-8", "backslashreplace").splitlines():
        words = line.split()
        if len(words) not in (6, 7):
            continue
        name, size, refs, users, state, address, *taints = words
        try:
            parsed = ProcModule(
                name=name,
                size=int(size),
                refcount=None if refs == "-" else int(refs),
                users=users,
                state=state,
                address=int(address, 16),
                # module_flags(): "(" letters, then + loading or - unloading, ")"
                taints="".join(taints).strip("()").rstrip("+-"),
            )
        except ValueError:
            continue
        out.setdefault(name, parsed)
    return out


def compare_with_proc(record: Mapping[str, Any], line: ProcModule | None) -> tuple[str, str | None]:
    """``(proc_modules, notes)`` for a module read from memory and its /proc/modules line."""
    if line is None:
        if record["state"] == "Unformed":
            return "missing", "/proc/modules does not show modules still being set up"
        return "missing", "not in /proc/modules when the capture began (loaded since?)"
    differences = []
    if line.size != record["size"]:
        differences.append(f"size {line.size} in /proc/modules")
    # kptr_restrict can make /proc/modules print 0 for every address: nothing to compare.
    if line.address and line.address != record["address"]:
        differences.append(f"address {line.address:#x} in /proc/modules")
    if differences:
        return "differs", "; ".join(differences)
    return "present", None


def proc_only_record(line: ProcModule) -> dict[str, Any]:
    """The record of a module /proc/modules listed but the walk did not find: its line."""
    record = dict.fromkeys(f.name for f in FIELDS)
    record.update(
        name=line.name,
        address=line.address or None,
        size=line.size,
        state=line.state,
        refcount=line.refcount,
        users=line.users,
        taints=line.taints,
        proc_modules="missing-from-list",
        notes="in /proc/modules when the capture began but not on the modules list in memory"
        " (unloaded since, or taken off the list); the other fields are its /proc/modules line",
    )
    return record


# -- the walk ------------------------------------------------------------------------------------


def lsmod(kernel: Kernel) -> Iterator[dict[str, Any]]:
    """One record per module on the ``modules`` list, in list order, then one per module only
    the captured /proc/modules shows.

    :raises Implausible: a module whose fields no kernel holds (see :func:`module_record`).
    :raises BrokenStructure: the list does not close.
    """
    blob = kernel.memory.blob("modules")
    proc = None if blob is None else parse_proc_modules(blob)
    context = ModuleContext.of(kernel)
    seen = set()
    for module in for_each_module(kernel):
        record = module_record(module, context)
        if proc is not None:
            record["proc_modules"], record["notes"] = compare_with_proc(
                record, proc.get(record["name"])
            )
            seen.add(record["name"])
        yield record
    for name, line in (proc or {}).items():
        if name not in seen:
            yield proc_only_record(line)


__all__ = [
    "LSMOD",
    "PARAM_FORMATS",
    "ModuleContext",
    "ProcModule",
    "compare_with_proc",
    "lsmod",
    "module_area",
    "module_parameters",
    "module_record",
    "parse_proc_modules",
    "proc_modules_users",
    "proc_only_record",
]
