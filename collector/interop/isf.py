"""Volatility 3 symbol tables (ISF, the Intermediate Symbol Format) built from an image alone:
types from its BTF, symbols from its kallsyms, the KASLR offset from its VMCOREINFO.

Volatility 3 otherwise needs an ISF made by dwarf2json from the kernel's DWARF debug
information, which a machine rarely keeps. The kernel's BTF describes the same structs,
unions, enums and typedefs, so the table built here has what Volatility's Linux plugins read,
laid out the way dwarf2json lays it out (format 6.2.0, volatility3/schemas/schema-6.2.0.json):

- typedefs and qualifiers are resolved to their target, as dwarf2json does;
- an anonymous struct, union or enum is named after the typedef that names it (dwarf2json
  0.7+, for ``kernel_cap_t``), else ``unnamed_`` and a hash of its definition;
- an anonymous member is a field ``unnamed_field_<offset>`` with ``"anonymous": true``, which
  Volatility (6.2.0 tables: ``Version8Format._reduce_fields``) flattens into its parent;
- symbols carry their link-time (unrelocated) addresses: Volatility finds the KASLR shift
  itself, from VMCOREINFO or from ``init_task``;
- ``linux_banner`` carries the banner as ``constant_data``: Volatility picks the table whose
  banner it finds in the memory file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import collector
from collector.errors import CollectorError, ImageError
from collector.kernel.btf import BTF, BTF_INT_BOOL, MAX_REF_DEPTH, Kind
from collector.kernel.kernel import Kernel
from collector.kernel.object import Type
from collector.kernel.variables import GLOBALS, tk_core_timekeeper_offset, variable_type
from collector.profiles.x86_64 import START_KERNEL_MAP

#: The ISF format written. Volatility 3 picks a reader by major version and the highest minor
#: it knows (``IntermediateSymbolTable._closest_version``). 6.2.0 is the first format whose
#: reader flattens anonymous members and the one dwarf2json writes; volatility3 2.28 ships
#: schema-6.3.0.json but no reader for it, so a 6.3.0 table would validate and then fail to
#: load.
FORMAT_VERSION = "6.2.0"
PRODUCER = "collector"

#: Globals some Volatility 3 Linux plugins read as typed objects (``object_from_symbol``) that
#: :data:`collector.kernel.variables.GLOBALS` does not list; C type and the declaration mirrored.
VOLATILITY_GLOBALS: dict[str, tuple[str, str]] = {
    "init_files": ("struct files_struct", "fs/file.c: struct files_struct init_files = {"),
    "net_namespace_list": (
        "struct list_head",
        "net/core/net_namespace.c: LIST_HEAD(net_namespace_list);",
    ),
    "mod_tree": (
        "struct mod_tree_root",
        "kernel/module/main.c: struct mod_tree_root mod_tree __cacheline_aligned = {",
    ),
    "tty_drivers": ("struct list_head", "drivers/tty/tty_io.c: LIST_HEAD(tty_drivers);"),
    "keyboard_notifier_list": (
        "struct atomic_notifier_head",
        "drivers/tty/vt/keyboard.c: static ATOMIC_NOTIFIER_HEAD(keyboard_notifier_list);",
    ),
    "prog_idr": ("struct idr", "kernel/bpf/syscall.c: static DEFINE_IDR(prog_idr);"),
    "idt_table": (
        "gate_desc []",
        "arch/x86/kernel/idt.c: static gate_desc idt_table[IDT_ENTRIES] __page_aligned_bss;",
    ),
    "ftrace_ops_list": (
        "struct ftrace_ops *",
        "kernel/trace/ftrace.c: struct ftrace_ops __rcu *ftrace_ops_list __read_mostly",
    ),
    "ftrace_list_end": (
        "struct ftrace_ops",
        "kernel/trace/ftrace.c: struct ftrace_ops ftrace_list_end __read_mostly = {",
    ),
    # Volatility's kallsyms reader sizes kallsyms_num_syms and kallsyms_markers by this
    # symbol's type (unsigned long before 4.20, 80ffbaa5b1bd).
    "kallsyms_num_syms": (
        "unsigned int",
        "kernel/kallsyms_internal.h: extern const unsigned int kallsyms_num_syms;",
    ),
    "cap_last_cap": ("int", "kernel/sysctl.c: static const int cap_last_cap = CAP_LAST_CAP;"),
    "socket_file_ops": (
        "const struct file_operations",
        "net/socket.c: static const struct file_operations socket_file_ops = {",
    ),
    "sockfs_dentry_operations": (
        "const struct dentry_operations",
        "net/socket.c: static const struct dentry_operations sockfs_dentry_operations = {",
    ),
    "page_offset_base": (
        "unsigned long",
        "arch/x86/kernel/head64.c: unsigned long page_offset_base __ro_after_init",
    ),
    "vmemmap_base": (
        "unsigned long",
        "arch/x86/kernel/head64.c: unsigned long vmemmap_base __ro_after_init",
    ),
}

#: The /proc seq_file operations of the network protocols, which Volatility's check_afinfo
#: checks point into the kernel; each is ``[static] const struct seq_operations NAME = {``.
for _name, _source in (
    ("raw_seq_ops", "net/ipv4/raw.c"),
    ("udp_seq_ops", "net/ipv4/udp.c"),
    ("arp_seq_ops", "net/ipv4/arp.c"),
    ("unix_seq_ops", "net/unix/af_unix.c"),
    ("udp6_seq_ops", "net/ipv6/udp.c"),
    ("raw6_seq_ops", "net/ipv6/raw.c"),
    ("tcp4_seq_ops", "net/ipv4/tcp_ipv4.c"),
    ("tcp6_seq_ops", "net/ipv6/tcp_ipv6.c"),
    ("packet_seq_ops", "net/packet/af_packet.c"),
):
    VOLATILITY_GLOBALS[_name] = (
        "struct seq_operations",
        f"{_source}: const struct seq_operations {_name} = {{",
    )

#: Linker-made section bounds, declared in include/asm-generic/sections.h as
#: ``extern char _text[], _stext[], _etext[];`` and so on: DWARF types them ``char []``, and
#: Volatility reads their addresses through typed objects (``object_from_symbol("_text")``).
SECTION_SYMBOLS = (
    "_text",
    "_stext",
    "_etext",
    "_sdata",
    "_edata",
    "__start_rodata",
    "__end_rodata",
    "_sinittext",
    "_einittext",
    "__bss_start",
    "__bss_stop",
    "_end",
)

#: The most elements an array of unknown length (``gate_desc idt_table[]``) is given.
_MAX_UNSIZED = 1 << 16
#: The longest banner read (init/version.c's linux_banner is one line of ~200 bytes).
_MAX_BANNER = 4096

_AGGREGATES = frozenset({Kind.STRUCT, Kind.UNION})
_ENUMS = frozenset({Kind.ENUM, Kind.ENUM64})
_QUALIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_VOID = {"kind": "base", "name": "void"}
_FUNCTION = {"kind": "function"}


@dataclass
class IsfResult:
    """A built symbol table: ``document`` is the ISF itself; ``notes`` say what was left out."""

    document: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many base types, user types, enums and symbols the table holds."""
        return {
            key: len(self.document[key]) for key in ("base_types", "user_types", "enums", "symbols")
        }


def build_isf(kernel: Kernel) -> IsfResult:
    """The Volatility 3 symbol table of the kernel in an image.

    :param kernel: the image's kernel; it needs BTF (blob ``btf``), symbols and VMCOREINFO.
    :raises NotApplicable: the image has no BTF, no symbols or no VMCOREINFO.
    :raises ImageError: BTF is malformed, or ``linux_banner`` is missing or unreadable
        (without it Volatility cannot match the table to the memory file).
    """
    btf = kernel.btf
    notes: list[str] = []
    types = _Types(btf, notes)
    doc: dict[str, Any] = {
        "metadata": _metadata(kernel),
        "base_types": types.base_types,
        "user_types": types.user_types,
        "enums": types.enums,
        "symbols": _symbols(kernel, types, notes),
    }
    types.finish()
    return IsfResult(doc, notes)


def write_isf(result: IsfResult, out: BinaryIO, xz: bool = False) -> int:
    """Write the table as JSON (``xz`` compressed, as Volatility reads ``.json.xz``).

    :returns: the bytes written.
    """
    data = json.dumps(result.document, separators=(",", ":"), sort_keys=True).encode()
    if xz:
        # Preset 1: a third of the time of the default preset for a file a few percent larger.
        data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=1)
    out.write(data)
    return len(data)


# -- metadata ---------------------------------------------------------------------------------


def _metadata(kernel: Kernel) -> dict[str, Any]:
    """Format, producer, and where types and symbols came from (hashes of the blobs used)."""
    linux: dict[str, list[dict[str, str]]] = {}
    btf_blob = kernel.memory.blob("btf")
    linux["types"] = [_source("btf", btf_blob)]
    symbols: dict[str, str] = {"name": kernel.symbols.source}
    blob = kernel.memory.blob("kallsyms")
    if kernel.symbols.source.startswith("kallsyms text") and blob:
        # /proc/kallsyms has System.map's form: address, type letter, name.
        symbols = {"kind": "system-map", **_source("kallsyms", blob)}
    linux["symbols"] = [symbols]
    return {
        "format": FORMAT_VERSION,
        "producer": {"name": PRODUCER, "version": collector.__version__},
        "linux": linux,
    }


def _source(name: str, blob: bytes | None) -> dict[str, str]:
    entry = {"name": name}
    if blob:
        entry["hash_type"] = "sha256"
        entry["hash_value"] = hashlib.sha256(blob).hexdigest()
    return entry


# -- types ------------------------------------------------------------------------------------


def _unnamed_name(entry: dict[str, Any]) -> str:
    """The ISF name of an anonymous type: a hash of its entry, so equal anonymous types share
    one entry and names are stable."""
    digest = hashlib.sha1(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
    return f"unnamed_{digest}"


class _Types:
    """BTF types as ISF ``base_types``, ``user_types`` and ``enums`` with type descriptors."""

    def __init__(self, btf: BTF, notes: list[str]) -> None:
        self.btf = btf
        self.notes = notes
        self.endian = "big" if btf.endian == ">" else "little"
        self.base_types: dict[str, dict[str, Any]] = {}
        self.user_types: dict[str, dict[str, Any]] = {}
        self.enums: dict[str, dict[str, Any]] = {}
        self._names: dict[int, str] = {}  # aggregate/enum type id -> ISF name
        self._tags: dict[tuple[str, str], str] = {}  # ("user"/"enum", C tag) -> ISF name
        self._descriptors: dict[int, dict[str, Any]] = {}
        self._rendering: set[int] = set()
        self._skipped: Counter[str] = Counter()
        self._base()
        self._name_types()
        for tid in range(1, len(btf) + 1):
            kind = btf.kind(tid)
            if kind not in _AGGREGATES and kind not in _ENUMS:
                continue
            name = self._names.get(tid)
            if name is None:
                self.name_of(tid)  # anonymous: named after its entry, which it adds
            elif kind in _AGGREGATES:
                self.user_types.setdefault(name, self._render(tid))
            else:
                self.enums.setdefault(name, self._render_enum(tid))

    def finish(self) -> None:
        for what, n in sorted(self._skipped.items()):
            self.notes.append(f"{n} {what} left out")

    # base types

    def _base(self) -> None:
        self.base_types["void"] = {
            "kind": "void",
            "size": 0,
            "signed": False,
            "endian": self.endian,
        }
        # dwarf2json's pointer: an unsigned integer of the pointer's size.
        self.base_types["pointer"] = {
            "kind": "int",
            "size": self.btf.pointer_size,
            "signed": False,
            "endian": self.endian,
        }
        for tid in range(1, len(self.btf) + 1):
            kind = self.btf.kind(tid)
            if kind not in (Kind.INT, Kind.FLOAT):
                continue
            t = self.btf.type(tid)
            if not t.name or t.name in self.base_types:
                continue
            if kind is Kind.FLOAT:
                entry = {"kind": "float", "size": t.size, "signed": True}
            elif t.encoding & BTF_INT_BOOL:
                entry = {"kind": "bool", "size": t.size, "signed": False}
            else:
                # pahole does not set BTF_INT_CHAR; DWARF's char kinds are the char names.
                kind_name = "char" if "char" in t.name else "int"
                entry = {"kind": kind_name, "size": t.size, "signed": t.signed}
            entry["endian"] = self.endian
            self.base_types[t.name] = entry

    def _int_base(self, size: int, signed: bool) -> str:
        """The name of an ``int`` base type of ``size`` bytes (an enum's base), as dwarf2json
        picks it: the first in name order; made up (``u8``, ``s64``...) when there is none."""
        for name in sorted(self.base_types):
            b = self.base_types[name]
            if (
                b["kind"] == "int"
                and name != "pointer"
                and (b["size"], b["signed"]) == (size, signed)
            ):
                return name
        name = f"{'s' if signed else 'u'}{8 * size}"
        self.base_types.setdefault(
            name, {"kind": "int", "size": size, "signed": signed, "endian": self.endian}
        )
        return name

    # names

    def _name_types(self) -> None:
        """Give each named struct, union and enum its name; a tag several types share (local
        structs of different files) goes to the most referenced one, the others get
        ``tag__<id>``; then anonymous ones named by a typedef get the typedef's name."""
        btf = self.btf
        groups: dict[tuple[str, str], list[int]] = {}
        refs: Counter[int] = Counter()
        typedefs: list[tuple[int, int]] = []
        for tid in range(1, len(btf) + 1):
            kind = btf.kind(tid)
            if kind in _AGGREGATES or kind in _ENUMS:
                t = btf.type(tid)
                for m in t.members:
                    refs[m.type_id] += 1
                if t.name:
                    space = "enum" if kind in _ENUMS else "user"
                    groups.setdefault((space, t.name), []).append(tid)
            elif kind in (Kind.PTR, Kind.VAR, *_QUALIFIERS):
                ref = btf.type(tid).ref or 0
                refs[ref] += 1
                if kind is Kind.TYPEDEF:
                    typedefs.append((tid, ref))
            elif kind is Kind.ARRAY:
                refs[btf.type(tid).elem_type] += 1
        for key, ids in groups.items():
            ids.sort(key=lambda i: (-refs[i], i))
            self._tags[key] = key[1]
            self._names[ids[0]] = key[1]
            for other in ids[1:]:
                self._names[other] = f"{key[1]}__{other}"
        for tid, target in typedefs:
            if not 0 < target <= len(btf):
                continue
            kind = btf.kind(target)
            if (kind not in _AGGREGATES and kind not in _ENUMS) or target in self._names:
                continue
            space = "enum" if kind in _ENUMS else "user"
            name = btf.type(tid).name
            if name and (space, name) not in self._tags:
                self._tags[(space, name)] = name
                self._names[target] = name

    def name_of(self, tid: int) -> str:
        """The ISF name of a struct, union or enum; an anonymous one is named after a hash of
        its definition, so equal anonymous types share one entry and names are stable."""
        name = self._names.get(tid)
        if name is None:
            if tid in self._rendering:
                raise ImageError(f"BTF: anonymous type id {tid} contains itself")
            self._rendering.add(tid)
            try:
                kind = self.btf.kind(tid)
                entry = self._render_enum(tid) if kind in _ENUMS else self._render(tid)
            finally:
                self._rendering.discard(tid)
            name = self._names[tid] = _unnamed_name(entry)
            (self.enums if kind in _ENUMS else self.user_types).setdefault(name, entry)
        return name

    # descriptors

    def descriptor(self, tid: int, depth: int = 0) -> dict[str, Any]:
        """The ISF type descriptor of a BTF type id: typedefs and qualifiers resolved."""
        hit = self._descriptors.get(tid)
        if hit is not None:
            return hit
        if depth > MAX_REF_DEPTH:
            raise ImageError(f"BTF: type id {tid} is a cyclic or too deep pointer/array chain")
        rid = self.btf.resolve(tid)
        t = self.btf.type(rid)
        kind = t.kind
        d: dict[str, Any]
        if rid == 0:
            d = _VOID
        elif kind in (Kind.INT, Kind.FLOAT):
            d = {"kind": "base", "name": t.name if t.name in self.base_types else "void"}
        elif kind is Kind.PTR:
            d = {"kind": "pointer", "subtype": self.descriptor(t.ref or 0, depth + 1)}
        elif kind is Kind.ARRAY:
            sub = self.descriptor(t.elem_type, depth + 1)
            d = {"kind": "array", "count": t.nelems, "subtype": sub}
        elif kind in _AGGREGATES:
            d = {"kind": kind.name.lower(), "name": self.name_of(rid)}
        elif kind in _ENUMS:
            d = {"kind": "enum", "name": self.name_of(rid)}
        elif kind is Kind.FWD:
            # A declared-only struct: the complete one of that tag if BTF has it.
            union = t.kind_flag
            d = {
                "kind": "union" if union else "struct",
                "name": self._tags.get(("user", t.name), t.name),
            }
        elif kind in (Kind.FUNC_PROTO, Kind.FUNC):
            d = _FUNCTION
        else:
            d = _VOID
        self._descriptors[tid] = d
        return d

    def type_descriptor(self, t: Type) -> dict[str, Any]:
        """The descriptor of a :class:`collector.kernel.object.Type` (made-up pointers and
        arrays included)."""
        if t.target is not None:
            sub = self.type_descriptor(t.target)
            if t.length is None:
                return {"kind": "pointer", "subtype": sub}
            return {"kind": "array", "count": t.length, "subtype": sub}
        return self.descriptor(t.id)

    # entries

    def _render(self, tid: int) -> dict[str, Any]:
        t = self.btf.type(tid)
        fields: dict[str, dict[str, Any]] = {}
        for m in t.members:
            target = self.btf.type(self.btf.resolve(m.type_id))
            bits, bit = m.bitfield_size, m.bit_offset
            # kind_flag 0: a bitfield is told by its int type's bits and bits_offset.
            if (
                not bits
                and target.kind is Kind.INT
                and not t.kind_flag
                and (target.bits_offset or target.bits != 8 * (target.size or 0))
            ):
                bits, bit = target.bits, bit + target.bits_offset
            if bits:
                entry = self._bitfield(target, bit, bits)
                if entry is None:
                    self._skipped["bitfields that fit no storage unit of their type"] += 1
                    continue
            else:
                entry = {"offset": bit // 8, "type": self.descriptor(m.type_id)}
            name = m.name
            if not name:
                if target.kind not in _AGGREGATES:
                    continue  # padding such as `int :3;`
                name = f"unnamed_field_{entry['offset']:x}"
                n = 1
                while name in fields:  # several anonymous members of a union share offset 0
                    n += 1
                    name = f"unnamed_field_{entry['offset']:x}_{n}"
                entry["anonymous"] = True
            fields[name] = entry
        return {"kind": t.kind.name.lower(), "size": t.size or 0, "fields": fields}

    def _bitfield(self, target: Any, bit: int, bits: int) -> dict[str, Any] | None:
        """A bitfield field: the storage unit of its type that holds it, and its bits there."""
        if target.kind in _ENUMS:
            base = {"kind": "enum", "name": self.name_of(target.id)}
        elif target.kind is Kind.INT and target.name in self.base_types:
            base = {"kind": "base", "name": target.name}
        else:
            return None
        width = 8 * (target.size or 0)
        if width == 0:
            return None
        offset = bit // width * (width // 8)
        position = bit - 8 * offset
        if position + bits > width:  # a packed struct: a unit starting at the field's byte
            offset, position = bit // 8, bit % 8
            if position + bits > width:
                return None
        if self.endian == "big":
            position = width - position - bits
        return {
            "offset": offset,
            "type": {
                "kind": "bitfield",
                "bit_position": position,
                "bit_length": bits,
                "type": base,
            },
        }

    def _render_enum(self, tid: int) -> dict[str, Any]:
        t = self.btf.type(tid)
        constants = {e.name: e.value for e in t.enumerators}
        # Older BTF (kind_flag 0) does not say whether an enum is signed; a negative value does.
        signed = t.signed or any(v < 0 for v in constants.values())
        size = t.size or 4
        return {"size": size, "base": self._int_base(size, signed), "constants": constants}


# -- symbols ----------------------------------------------------------------------------------


def _symbols(kernel: Kernel, types: _Types, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Every core-kernel symbol at its link-time address, typed where the type is known."""
    table = kernel.symbols
    offset = kernel.kaslr_offset
    out: dict[str, dict[str, Any]] = {}
    for sym in table:
        if sym.module is not None or sym.name in out:
            continue
        chosen = table.symbol(sym.name) or sym
        if chosen.module is not None:
            continue
        if chosen.type == "?" and chosen.address < START_KERNEL_MAP:
            # Only in VMCOREINFO, outside the kernel image: SYMBOL(vmemmap) is the value of
            # the vmemmap base (kernel/crash_core.c), not where a variable lies.
            continue
        out[sym.name] = {"address": _unrelocated(chosen.address, offset)}
    for name in GLOBALS:
        if name in out:
            _type_symbol(out[name], types, notes, name, lambda n=name: variable_type(kernel, n))
    for name, (spelling, source) in VOLATILITY_GLOBALS.items():
        if name in out:
            _type_symbol(
                out[name],
                types,
                notes,
                name,
                lambda n=name, s=spelling, src=source: _global(kernel, n, s, src),
            )
    if "tk_core" in out and "type" not in out["tk_core"]:
        try:
            out["tk_core"]["type"] = _tk_core(kernel, types)
        except CollectorError as exc:
            notes.append(f"symbol tk_core left untyped: {exc}")
    char_array = {"kind": "array", "count": 0, "subtype": {"kind": "base", "name": "char"}}
    for name in SECTION_SYMBOLS:
        if name in out and "char" in types.base_types:
            out[name]["type"] = char_array
    for var_id, name in _btf_vars(types.btf):
        entry = out.get(name)
        if entry is not None and "type" not in entry:
            entry["type"] = types.descriptor(types.btf.type(var_id).ref or 0)
    banner = out.get("linux_banner")
    if banner is None:
        raise ImageError(
            "the kernel's symbols have no linux_banner: Volatility 3 matches a symbol table to "
            "a memory file by that banner"
        )
    address = table.lookup("linux_banner")
    try:
        text = kernel.read_cstring(address, _MAX_BANNER)
    except CollectorError as exc:
        raise ImageError(f"linux_banner at {address:#x} cannot be read: {exc}") from None
    if not text.startswith(b"Linux version "):
        raise ImageError(
            f"linux_banner at {address:#x} does not start with 'Linux version ': {text[:40]!r}"
        )
    # The whole array, NUL included, as dwarf2json copies it from .rodata.
    banner["constant_data"] = base64.b64encode(text + b"\0").decode()
    return out


def _tk_core(kernel: Kernel, types: _Types) -> dict[str, Any]:
    """The type of ``tk_core`` (kernel/time/timekeeping.c), which Volatility's boottime reads.

    From 6.13 it is ``struct tk_data``. Before, it is a static anonymous
    ``struct { seqcount_raw_spinlock_t seq; struct timekeeper timekeeper; }`` that BTF has no
    record of (BTF types only per-CPU variables), so it is written out here as a user type,
    named like dwarf2json's anonymous ones after a hash of its entry.
    """
    if kernel.btf.has_member("tk_data", "timekeeper"):
        return types.type_descriptor(kernel.type("struct tk_data"))
    seq_type = (
        "seqcount_raw_spinlock_t"
        if kernel.btf.has_member("seqcount_raw_spinlock", "seqcount")
        else "seqcount_t"
    )
    seq = kernel.type(seq_type)
    timekeeper = kernel.type("struct timekeeper")
    at = tk_core_timekeeper_offset(kernel.btf)
    entry = {
        "kind": "struct",
        "size": at + timekeeper.size,
        "fields": {
            "seq": {"offset": 0, "type": types.type_descriptor(seq)},
            "timekeeper": {"offset": at, "type": types.type_descriptor(timekeeper)},
        },
    }
    name = _unnamed_name(entry)
    types.user_types.setdefault(name, entry)
    return {"kind": "struct", "name": name}


def _unrelocated(address: int, kaslr_offset: int) -> int:
    """The link-time address of a kernel-image symbol; per-CPU offsets and absolute symbols
    (below ``__START_KERNEL_map``) are not moved by KASLR and stay as they are."""
    if address >= START_KERNEL_MAP:
        return address - kaslr_offset
    return address


def _type_symbol(entry: dict, types: _Types, notes: list[str], name: str, get: Any) -> None:
    try:
        entry["type"] = types.type_descriptor(get())
    except CollectorError as exc:
        notes.append(f"symbol {name} left untyped: {exc}")


def _global(kernel: Kernel, name: str, spelling: str, source: str) -> Type:
    """The type of a global of :data:`VOLATILITY_GLOBALS`, checked against the room the symbol
    table leaves it (an unsized array gets that room)."""
    t = kernel.type(spelling)
    address = kernel.symbol(name)
    nxt = kernel.symbols.next_address(address)
    room = None if nxt is None else nxt - address
    r = t.resolved()
    if r.kind is Kind.ARRAY and r.array_length == 0:
        if room is None:
            raise ImageError(f"the length of {spelling} is not known (no symbol follows it)")
        return Type.array_of(r.pointee, min(room // r.pointee.size, _MAX_UNSIZED))
    if room is not None and t.size > room:
        raise ImageError(
            f"{spelling} is {t.size} bytes but the next symbol is {room} bytes after it;"
            f" the declaration it mirrors ({source}) does not fit this kernel"
        )
    return t


def _btf_vars(btf: BTF) -> Iterator[tuple[int, str]]:
    """(type id, name) of every BTF VAR: the per-CPU variables, which BTF types."""
    for tid in range(1, len(btf) + 1):
        if btf.kind(tid) is Kind.VAR:
            yield tid, btf.type(tid).name
