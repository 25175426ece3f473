"""drgn over a collector image, without DWARF: the image's memory, VMCOREINFO, kallsyms and BTF.

``program(IMAGE)`` returns a :class:`drgn.Program` whose memory is the image's physical memory
(drgn walks the kernel's page tables itself), whose symbols are the image's kallsyms, whose
types are built on demand from the image's BTF and whose global variables are typed from
:data:`collector.kernel.variables.GLOBALS` and BTF ``VAR`` entries. drgn's own helpers
(``for_each_task``, ``for_each_module``, ``get_dmesg``...) then run on it as on a vmcore with
debug info. drgn is optional: ``pip install 'collector[drgn]'``.
"""

from __future__ import annotations

import bisect
import importlib
import os
import pkgutil
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from collector.errors import CollectorError, ImageError, NotApplicable
from collector.kernel.btf import BTF_INT_BOOL, BTF_INT_SIGNED, MAX_REF_DEPTH, Kind
from collector.kernel.kernel import Kernel
from collector.kernel.symbols import MAX_SYMBOL_OFFSET
from collector.kernel.variables import GLOBALS, Global, declared_type
from collector.memory import PageNotCaptured, PhysicalMemory

if TYPE_CHECKING:
    import drgn

#: The oldest drgn with :meth:`drgn.Program.set_linux_kernel_custom`, the only way to make a
#: Linux kernel program over memory that is not a file drgn reads itself.
MIN_DRGN = "0.1.0"

#: Names of the finders registered on the program.
FINDER = "collector-btf"
SYMBOL_FINDER = "collector-kallsyms"

#: Globals drgn's helpers read (``prog["avenrun"]``...) that neither :data:`GLOBALS` nor a BTF
#: ``VAR`` types, checked against the image's BTF and symbol table as GLOBALS entries are
#: (:func:`collector.kernel.variables.declared_type`). ``[]`` is a length the kernel's
#: configuration sets: what the symbol table leaves room for.
DRGN_GLOBALS: dict[str, Global] = {
    "avenrun": Global("unsigned long [3]", "kernel/sched/loadavg.c: unsigned long avenrun[3];"),
    "init_net": Global("struct net", "net/core/net_namespace.c: struct net init_net;"),
    "net_namespace_list": Global(
        "struct list_head", "net/core/net_namespace.c: LIST_HEAD(net_namespace_list);"
    ),
    "init_ipc_ns": Global(
        "struct ipc_namespace", "ipc/msgutil.c: struct ipc_namespace init_ipc_ns"
    ),
    "root_task_group": Global(
        "struct task_group", "kernel/sched/core.c: struct task_group root_task_group;"
    ),
    "cgrp_dfl_root": Global(
        "struct cgroup_root", "kernel/cgroup/cgroup.c: struct cgroup_root cgrp_dfl_root"
    ),
    "mod_tree": Global(
        "struct mod_tree_root",
        "kernel/module/main.c: struct mod_tree_root mod_tree __cacheline_aligned",
    ),
    "node_states": Global(
        "nodemask_t []", "mm/page_alloc.c: nodemask_t node_states[NR_NODE_STATES]"
    ),
    "memblock": Global("struct memblock", "mm/memblock.c: struct memblock memblock"),
    "min_low_pfn": Global("unsigned long", "mm/memblock.c: unsigned long min_low_pfn;"),
    "max_low_pfn": Global("unsigned long", "mm/memblock.c: unsigned long max_low_pfn;"),
    "__highest_present_section_nr": Global(
        "unsigned long", "mm/sparse.c: unsigned long __highest_present_section_nr;"
    ),
    "vm_committed_as": Global(
        "struct percpu_counter", "mm/util.c: struct percpu_counter vm_committed_as"
    ),
    "hstates": Global("struct hstate []", "mm/hugetlb.c: struct hstate hstates[HUGE_MAX_HSTATE];"),
    "hugetlb_max_hstate": Global("int", "mm/hugetlb.c: int hugetlb_max_hstate __read_mostly;"),
    "swap_info": Global(
        "struct swap_info_struct *[]",
        "mm/swapfile.c: static struct swap_info_struct *swap_info[MAX_SWAPFILES];",
    ),
    "nr_swapfiles": Global("unsigned int", "mm/swapfile.c: static unsigned int nr_swapfiles;"),
    "total_swap_pages": Global("long", "mm/swapfile.c: long total_swap_pages;"),
    "nr_swap_pages": Global("atomic_long_t", "mm/swapfile.c: atomic_long_t nr_swap_pages;"),
    "nr_irqs": Global("int", "kernel/irq/irqdesc.c: int nr_irqs = NR_IRQS;"),
    "sysfs_root_kn": Global(
        "struct kernfs_node *", "fs/sysfs/mount.c: struct kernfs_node *sysfs_root_kn;"
    ),
}

#: VMCOREINFO ``SYMBOL()`` entries that hold a variable's value, not its address
#: (``VMCOREINFO_SYMBOL_ARRAY``: the vmemmap base and the mem_section pointer): no symbol
#: lives there.
VALUE_SYMBOLS = frozenset({"vmemmap", "mem_section"})

#: x86_64 kernel addresses are in the upper half; kallsyms' per-CPU symbols below it are
#: offsets into the per-CPU area, not addresses, and name nothing there.
KERNEL_HALF = 1 << 63


def _import_drgn() -> Any:
    """drgn itself, or one line saying how to get it."""
    try:
        import drgn
    except ImportError:
        raise CollectorError(
            "drgn is not installed: pip install 'collector[drgn]' (or pip install drgn)"
        ) from None
    if not hasattr(drgn.Program, "set_linux_kernel_custom"):
        raise CollectorError(
            f"drgn {getattr(drgn, '__version__', '?')} is too old: collector needs drgn >="
            f" {MIN_DRGN} (Program.set_linux_kernel_custom); pip install -U drgn"
        )
    return drgn


def program(image: str | os.PathLike[str] | PhysicalMemory | Kernel) -> drgn.Program:
    """A :class:`drgn.Program` over a collector image, typed from the image's BTF.

    :param image: the image's path, an opened image (:func:`collector.image.open.open_image`)
        or a :class:`~collector.kernel.kernel.Kernel`. A path is opened here and stays open as
        long as the program lives.
    :raises CollectorError: drgn is missing or too old; the image has no VMCOREINFO, no BTF or
        no symbols (one line each).
    """
    drgn = _import_drgn()
    if isinstance(image, Kernel):
        kernel = image
    elif isinstance(image, PhysicalMemory):
        kernel = Kernel(image)
    else:
        from collector.image.open import open_image

        kernel = Kernel(open_image(image))
    if kernel.profile.name != "x86_64":
        raise NotApplicable(
            f"drgn interop knows the x86_64 profile only, not {kernel.profile.name}"
        )
    vmcoreinfo = _vmcoreinfo_text(kernel)
    btf = kernel.btf  # fails here, in one line, rather than inside the first lookup
    symbols = kernel.symbols
    platform = drgn.Platform(
        drgn.Architecture.X86_64,
        drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN,
    )
    prog = drgn.Program(platform, vmcoreinfo=vmcoreinfo)
    _add_memory(drgn, prog, kernel.memory)
    prog.set_linux_kernel_custom(vmcoreinfo, False)
    types = BtfTypes(drgn, prog, btf)
    kallsyms = KallsymsFinder(drgn, symbols)
    objects = ObjectFinder(drgn, prog, kernel, types)
    prog.register_type_finder(FINDER, types.find, enable_index=0)
    prog.register_object_finder(FINDER, objects.find, enable_index=-1)
    prog.register_symbol_finder(SYMBOL_FINDER, kallsyms.find, enable_index=0)
    # The finders hold the kernel, and so the open image, for as long as the program lives.
    prog.cache["collector_kernel"] = kernel
    return prog


def _vmcoreinfo_text(kernel: Kernel) -> bytes:
    """VMCOREINFO as drgn parses it, with ``SYMBOL(swapper_pg_dir)`` drgn walks from."""
    entries = kernel.vmcoreinfo.raw_entries()
    if "SYMBOL(swapper_pg_dir)" not in entries and "SYMBOL(init_top_pgt)" in entries:
        # arch/x86/include/asm/pgtable_64.h: #define swapper_pg_dir init_top_pgt; kernels
        # before 4.19 (commit "crash_core: use VMCOREINFO_SYMBOL_ARRAY() for swapper_pg_dir")
        # and hand-made notes name only the latter.
        entries["SYMBOL(swapper_pg_dir)"] = entries["SYMBOL(init_top_pgt)"]
    return "".join(f"{key}={value}\n" for key, value in entries.items()).encode("ascii")


def _add_memory(drgn: Any, prog: drgn.Program, memory: PhysicalMemory) -> None:
    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        try:
            return memory.read(address, count)
        except PageNotCaptured as exc:
            raise drgn.FaultError(str(exc), exc.paddr) from None

    for start, end in memory.ranges():
        prog.add_memory_segment(start, end - start, read, physical=True)


# ---------------------------------------------------------------------------------- symbols


class KallsymsFinder:
    """A drgn symbol finder over the image's symbol table (kallsyms).

    kallsyms has no sizes: a symbol runs to the next higher symbol address (at most
    :data:`collector.kernel.symbols.MAX_SYMBOL_OFFSET`), as ``kallsyms_lookup_size_offset()``
    assumes too. Addresses below :data:`KERNEL_HALF` (per-CPU offsets) and
    :data:`VALUE_SYMBOLS` are never the symbol of an address.
    """

    def __init__(self, drgn: Any, symbols: Any) -> None:
        self._drgn = drgn
        self._table = symbols
        self._sorted: list[Any] | None = None
        self._addresses: list[int] = []

    def _by_address(self) -> list[Any]:
        if self._sorted is None:
            # SymbolTable iterates in address order.
            self._sorted = [
                s for s in self._table if not (s.type == "?" and s.name in VALUE_SYMBOLS)
            ]
            self._addresses = [s.address for s in self._sorted]
        return self._sorted

    def _make(self, sym: Any) -> drgn.Symbol:
        drgn = self._drgn
        # The last symbol reaches as far as collector's own address_to_symbol() lets it.
        nxt = self._table.next_address(sym.address)
        size = MAX_SYMBOL_OFFSET if nxt is None else min(nxt - sym.address, MAX_SYMBOL_OFFSET)
        letter = sym.type
        if letter in "wWvV":
            binding = drgn.SymbolBinding.WEAK
        elif letter.isupper():
            binding = drgn.SymbolBinding.GLOBAL
        elif letter.islower():
            binding = drgn.SymbolBinding.LOCAL
        else:
            binding = drgn.SymbolBinding.UNKNOWN
        if letter in "tT":
            kind = drgn.SymbolKind.FUNC
        elif letter in "dDbBrRgGsS":
            kind = drgn.SymbolKind.OBJECT
        else:
            kind = drgn.SymbolKind.UNKNOWN
        return drgn.Symbol(sym.name, sym.address, size, binding, kind)

    def find(
        self, prog: drgn.Program, name: str | None, address: int | None, one: bool
    ) -> list[drgn.Symbol]:
        """drgn's symbol finder protocol: ``(prog, name, address, one)``."""
        if address is not None:
            return self._at(name, address, one)
        if name is not None:
            sym = self._table.symbol(name)
            if sym is None or (sym.type == "?" and name in VALUE_SYMBOLS):
                return []
            if one:
                return [self._make(sym)]
            return [self._make(s) for s in self._by_address() if s.name == name]
        syms = self._by_address()
        return [self._make(s) for s in (syms[:1] if one else syms)]

    def _at(self, name: str | None, address: int, one: bool) -> list[drgn.Symbol]:
        if address < KERNEL_HALF:
            return []
        syms = self._by_address()
        k = bisect.bisect_right(self._addresses, address)
        if k == 0:
            return []
        start = self._addresses[k - 1]
        first = bisect.bisect_left(self._addresses, start)
        hits = []
        for sym in syms[first:k]:
            if name is not None and sym.name != name:
                continue
            made = self._make(sym)
            if address < start + max(made.size, 1):
                hits.append(made)
                if one:
                    break
        return hits


# ---------------------------------------------------------------------------------- types


class BtfTypes:
    """drgn types made from BTF on first use, cached by type id.

    Struct, union and function members are lazy (drgn calls back for a member's type when it
    is first used), so a lookup converts the type asked for and the types it names directly,
    never the whole graph.
    """

    #: How deep an eager chain (typedef, qualifier, pointer, array, return type) may go.
    MAX_DEPTH = 4 * MAX_REF_DEPTH

    def __init__(self, drgn: Any, prog: drgn.Program, btf: Any) -> None:
        self._drgn = drgn
        self._prog = prog
        self.btf = btf
        self._cache: dict[int, drgn.Type] = {}
        self._building: set[int] = set()
        self._ints: dict[tuple[int, bool], drgn.Type] = {}

    # -- the finder ---------------------------------------------------------------------------

    def find(
        self, prog: drgn.Program, kinds: Any, name: str, filename: str | None
    ) -> drgn.Type | None:
        """drgn's type finder protocol: ``(prog, kinds, name, filename)``."""
        if filename is not None:
            return None  # BTF records no source files
        tid = self.lookup(kinds, name)
        return None if tid is None else self.type(tid)

    def lookup(self, kinds: Any, name: str) -> int | None:
        """The BTF type id of the type named ``name`` of one of drgn's ``kinds``, or None.

        A complete definition wins over a forward declaration (``FWD``, an enum without
        enumerators); among equals, the lowest id.
        """
        TypeKind = self._drgn.TypeKind
        btf = self.btf
        incomplete = None
        for tid in btf.find_all(name):
            k = btf.kind(tid)
            if k is Kind.STRUCT and TypeKind.STRUCT in kinds:
                return tid
            if k is Kind.UNION and TypeKind.UNION in kinds:
                return tid
            if k in (Kind.ENUM, Kind.ENUM64) and TypeKind.ENUM in kinds:
                if btf.type(tid).vlen:
                    return tid
                incomplete = incomplete or tid
            elif k is Kind.TYPEDEF and TypeKind.TYPEDEF in kinds:
                return tid
            elif k is Kind.INT:
                is_bool = bool(btf.type(tid).encoding & BTF_INT_BOOL)
                if TypeKind.BOOL in kinds if is_bool else TypeKind.INT in kinds:
                    return tid
            elif k is Kind.FLOAT and TypeKind.FLOAT in kinds:
                return tid
            elif k is Kind.FWD and incomplete is None:
                union = btf.type(tid).kind_flag
                if TypeKind.UNION in kinds if union else TypeKind.STRUCT in kinds:
                    incomplete = tid
        return incomplete

    # -- conversion ---------------------------------------------------------------------------

    def type(self, tid: int) -> drgn.Type:
        """The drgn type of BTF type id ``tid`` (0 is void)."""
        t = self._cache.get(tid)
        if t is not None:
            return t
        if tid in self._building or len(self._building) > self.MAX_DEPTH:
            raise ImageError(f"BTF: type id {tid} refers to itself or nests too deeply")
        self._building.add(tid)
        try:
            t = self._convert(tid)
        finally:
            self._building.discard(tid)
        self._cache[tid] = t
        return t

    def _int(self, size: int, signed: bool) -> drgn.Type:
        """An integer type of ``size`` bytes (an enum's compatible type, which BTF omits)."""
        key = (size, signed)
        t = self._ints.get(key)
        if t is None:
            names = {1: "char", 2: "short", 4: "int", 8: "long"}
            base = names.get(size, f"__int{8 * size}")
            name = base if signed else f"unsigned {base}"
            t = self._ints[key] = self._prog.int_type(name, size, signed)
        return t

    def _convert(self, tid: int) -> drgn.Type:
        drgn = self._drgn
        prog = self._prog
        btf = self.btf
        if tid == 0:
            return prog.void_type()
        t = btf.type(tid)
        k = t.kind
        name = t.name or None
        if k is Kind.INT:
            if t.encoding & BTF_INT_BOOL:
                return prog.bool_type(t.name, t.size)
            return prog.int_type(t.name, t.size, bool(t.encoding & BTF_INT_SIGNED))
        if k is Kind.FLOAT:
            return prog.float_type(t.name, t.size)
        if k is Kind.PTR:
            return prog.pointer_type(self.type(t.ref or 0), btf.pointer_size)
        if k is Kind.ARRAY:
            # BTF writes both `[0]` and a flexible `[]` as 0 elements; the kernel only uses
            # the second now, which drgn calls an incomplete array (length None).
            return prog.array_type(self.type(t.elem_type), t.nelems or None)
        if k is Kind.TYPEDEF:
            return prog.typedef_type(t.name, self.type(t.ref or 0))
        if k in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT):
            inner = self.type(t.ref or 0)
            add = {
                Kind.CONST: drgn.Qualifiers.CONST,
                Kind.VOLATILE: drgn.Qualifiers.VOLATILE,
                Kind.RESTRICT: drgn.Qualifiers.RESTRICT,
            }[k]
            return inner.qualified(inner.qualifiers | add)
        if k is Kind.TYPE_TAG:
            return self.type(t.ref or 0)  # an annotation (__user, __rcu) for the verifier
        if k in (Kind.STRUCT, Kind.UNION):
            members = [self._member(m) for m in t.members]
            make = prog.struct_type if k is Kind.STRUCT else prog.union_type
            return make(name, t.size, members)
        if k in (Kind.ENUM, Kind.ENUM64):
            if not t.vlen:
                return prog.enum_type(name)
            enumerators = [drgn.TypeEnumerator(e.name, e.value) for e in t.enumerators]
            signed = t.kind_flag or any(e.value < 0 for e in t.enumerators)
            return prog.enum_type(name, self._int(t.size, signed), enumerators)
        if k is Kind.FWD:
            kinds = drgn.TypeKindSet({drgn.TypeKind.UNION if t.kind_flag else drgn.TypeKind.STRUCT})
            full = self.lookup(kinds, t.name)
            if full is not None and btf.kind(full) is not Kind.FWD:
                return self.type(full)
            return prog.union_type(name) if t.kind_flag else prog.struct_type(name)
        if k is Kind.FUNC_PROTO:
            params = list(t.params)
            variadic = bool(params) and params[-1].type_id == 0 and not params[-1].name
            if variadic:
                params.pop()
            return prog.function_type(
                self.type(t.ref or 0),
                [drgn.TypeParameter(self._lazy(p.type_id), p.name or None) for p in params],
                variadic,
            )
        if k is Kind.FUNC:
            return self.type(t.ref or 0)
        raise ImageError(f"BTF: type id {tid} ({k.name.lower()} {t.name}) is not a C type")

    def from_collector(self, t: Any) -> drgn.Type:
        """The drgn type of a :class:`collector.kernel.object.Type` (a BTF id, or a pointer
        to or array of one that BTF itself lacks)."""
        if t.target is None:
            return self.type(t.id)
        if t.length is None:
            return self._prog.pointer_type(self.from_collector(t.target), self.btf.pointer_size)
        return self._prog.array_type(self.from_collector(t.target), t.length)

    def _lazy(self, tid: int) -> Callable[[], drgn.Type]:
        return lambda: self.type(tid)

    def _member(self, m: Any) -> drgn.TypeMember:
        drgn = self._drgn
        bits = m.bitfield_size
        offset = m.bit_offset
        if not bits:
            # kind_flag 0 aggregates encode a bitfield in the member's own int type.
            inner = self.btf.type(self.btf.resolve(m.type_id))
            if inner.kind is Kind.INT and (inner.bits_offset or inner.bits != 8 * inner.size):
                bits = inner.bits
                offset += inner.bits_offset
        if bits:
            prog, tid = self._prog, m.type_id

            def bitfield() -> drgn.Object:
                return drgn.Object(prog, self.type(tid), bit_field_size=bits)

            return drgn.TypeMember(bitfield, m.name or None, offset)
        return drgn.TypeMember(self._lazy(m.type_id), m.name or None, offset)


# ---------------------------------------------------------------------------------- objects


class ObjectFinder:
    """Global variables, functions and enumerators by name, for drgn's object lookups.

    Variables are typed from :data:`GLOBALS` (then :data:`DRGN_GLOBALS`, then a BTF ``VAR``,
    which covers per-CPU variables) and placed at their kallsyms address; functions are BTF
    ``FUNC`` entries at their symbol; constants are enumerators of BTF enums.
    """

    def __init__(self, drgn: Any, prog: drgn.Program, kernel: Kernel, types: BtfTypes) -> None:
        self._drgn = drgn
        self._prog = prog
        self._kernel = kernel
        self._types = types
        self._enumerators: dict[str, tuple[int, int]] | None = None

    def find(
        self, prog: drgn.Program, name: str, flags: Any, filename: str | None
    ) -> drgn.Object | None:
        """drgn's object finder protocol: ``(prog, name, flags, filename)``."""
        if filename is not None:
            return None
        F = self._drgn.FindObjectFlags
        if flags & F.VARIABLE:
            obj = self.variable(name)
            if obj is not None:
                return obj
        if flags & F.FUNCTION:
            obj = self.function(name)
            if obj is not None:
                return obj
        if flags & F.CONSTANT:
            return self.constant(name)
        return None

    def _address(self, name: str) -> int | None:
        return self._kernel.symbols.get(name)

    def variable(self, name: str) -> drgn.Object | None:
        """The global ``name`` at its symbol's address, or None when it cannot be typed."""
        address = self._address(name)
        if address is None:
            return None
        entry = GLOBALS.get(name) or DRGN_GLOBALS.get(name)
        if entry is not None:
            try:
                t = self._types.from_collector(declared_type(self._kernel, name, entry))
            except NotApplicable:
                return None
            return self._drgn.Object(self._prog, t, address=address)
        # Per-CPU variables too: drgn's per_cpu() adds __per_cpu_offset[cpu] to the address.
        btf = self._types.btf
        for tid in btf.find_all(name):
            if btf.kind(tid) is Kind.VAR:
                t = self._types.type(btf.type(tid).ref or 0)
                return self._drgn.Object(self._prog, t, address=address)
        return None

    def function(self, name: str) -> drgn.Object | None:
        """The function ``name`` (a BTF ``FUNC``) at its symbol's address, or None."""
        btf = self._types.btf
        for tid in btf.find_all(name):
            if btf.kind(tid) is Kind.FUNC:
                address = self._address(name)
                if address is None:
                    return None
                return self._drgn.Object(self._prog, self._types.type(tid), address=address)
        return None

    def constant(self, name: str) -> drgn.Object | None:
        """The enumerator ``name`` as a value of its enum type, or None."""
        if self._enumerators is None:
            btf = self._types.btf
            index: dict[str, tuple[int, int]] = {}
            for tid in range(1, len(btf) + 1):
                if btf.kind(tid) in (Kind.ENUM, Kind.ENUM64):
                    for e in btf.type(tid).enumerators:
                        index.setdefault(e.name, (tid, e.value))
            self._enumerators = index
        hit = self._enumerators.get(name)
        if hit is None:
            return None
        tid, value = hit
        return self._drgn.Object(self._prog, self._types.type(tid), value=value)


# ---------------------------------------------------------------------------------- the CLI


def run(
    prog: drgn.Program, code: str | None = None, script: str | None = None, args: Sequence[str] = ()
) -> None:
    """What ``drgn`` does with a program: run ``code`` (``-e``), a script, standard input
    when it is not a terminal, or else an interactive session.

    ``-e`` code and standard input see drgn's default globals (``prog``, drgn's names and all
    of ``drgn.helpers.linux``); a script sees ``prog`` and imports the rest, with ``sys.argv``
    set to the script and its arguments, as drgn's own command line does.
    """
    drgn = _import_drgn()
    cli = importlib.import_module("drgn.cli")

    if code is None and script is None and sys.stdin.isatty():
        cli.run_interactive(prog, banner_func=lambda default: _banner(prog, default))
        return
    saved_argv, saved_path = sys.argv, list(sys.path)
    try:
        drgn.set_default_prog(prog)
        if script is not None:
            sys.argv = [script, *args]
            if pkgutil.get_importer(script) is None:
                sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, init_globals={"prog": prog}, run_name="__main__")
        else:
            namespace = cli.default_globals(prog)
            sys.path.insert(0, "")
            if code is None:
                sys.argv = [""]
                namespace["__file__"] = "<stdin>"
                exec(compile(sys.stdin.read(), "<stdin>", "exec"), namespace)
            else:
                sys.argv = ["-e", *args]
                exec(code, namespace)
    finally:
        # A library caller keeps its own argv and import path.
        sys.argv, sys.path[:] = saved_argv, saved_path


def _banner(prog: drgn.Program, default: str) -> str:
    kernel = prog.cache.get("collector_kernel")
    release = kernel.release if kernel is not None else None
    return (
        f"drgn on a collector image (Linux {release or 'of unknown release'}): types from BTF,"
        f" symbols from kallsyms, no DWARF.\n{default}"
    )
