"""The kernel's BPF Type Format (include/uapi/linux/btf.h, Documentation/bpf/btf.rst).

Parses a raw BTF blob such as /sys/kernel/btf/vmlinux and answers layout questions about
kernel types (sizes, member offsets, enum values) without debug symbols.
"""

from __future__ import annotations

import re
import struct
from array import array
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from collector.errors import ImageError

BTF_MAGIC = 0xEB9F
BTF_VERSION = 1
# struct btf_header as first published; a longer hdr_len is allowed (the header is extensible).
BTF_HEADER_SIZE = 24

# How far a chain of typedef/qualifier/array references may go before it is called cyclic.
# Real kernels stay under 10; the cap turns a crafted loop into an error instead of a hang.
MAX_REF_DEPTH = 64
# How deeply anonymous members or by-value aggregates may nest.
MAX_NESTING = 64


def btf_magic_version(head: bytes, what: str) -> tuple[str, int]:
    """The byte order (``"<"`` or ``">"``) and ``hdr_len`` of a BTF header whose magic and
    version check out; at least its first 8 bytes are needed.

    :param what: what the errors call the BTF (``"BTF"``, ``"BTF in memory"``).
    :raises ImageError: bad magic or a version other than 1.
    """
    if head[:2] == b"\x9f\xeb":
        e = "<"
    elif head[:2] == b"\xeb\x9f":
        e = ">"
    else:
        raise ImageError(f"{what}: bad magic {head[:2].hex()} (expected 0xeB9F)")
    version, _flags, hdr_len = struct.unpack_from(e + "BBI", head, 2)
    if version != BTF_VERSION:
        raise ImageError(f"{what}: unsupported version {version}")
    return e, hdr_len


def btf_check_sections(
    type_off: int, type_len: int, str_off: int, str_len: int, body: int, what: str
) -> None:
    """The type and string sections lie inside the ``body`` bytes after the header and do
    not overlap (btf_check_sec_info(), kernel/bpf/btf.c).

    :raises ImageError: naming ``what`` and the section.
    """
    for name, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
        if off + length > body:
            raise ImageError(
                f"{what}: {name} section {off}+{length} exceeds the {body} bytes after the header"
            )
    if type_off < str_off + str_len and str_off < type_off + type_len:
        raise ImageError(f"{what}: type and string sections overlap")


class Kind(IntEnum):
    """BTF_KIND_* from include/uapi/linux/btf.h."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# BTF_INT_ENCODING bits.
BTF_INT_SIGNED = 1 << 0
BTF_INT_CHAR = 1 << 1
BTF_INT_BOOL = 1 << 2

# Bytes that follow struct btf_type, per kind: a fixed part plus vlen records.
_FIXED_EXTRA = {
    Kind.INT: 4,  # u32 encoding/offset/bits
    Kind.PTR: 0,
    Kind.ARRAY: 12,  # struct btf_array
    Kind.STRUCT: 0,
    Kind.UNION: 0,
    Kind.ENUM: 0,
    Kind.FWD: 0,
    Kind.TYPEDEF: 0,
    Kind.VOLATILE: 0,
    Kind.CONST: 0,
    Kind.RESTRICT: 0,
    Kind.FUNC: 0,
    Kind.FUNC_PROTO: 0,
    Kind.VAR: 4,  # struct btf_var
    Kind.DATASEC: 0,
    Kind.FLOAT: 0,
    Kind.DECL_TAG: 4,  # struct btf_decl_tag
    Kind.TYPE_TAG: 0,
    Kind.ENUM64: 0,
}
_PER_VLEN = {
    Kind.STRUCT: 12,  # struct btf_member
    Kind.UNION: 12,
    Kind.ENUM: 8,  # struct btf_enum
    Kind.FUNC_PROTO: 8,  # struct btf_param
    Kind.DATASEC: 12,  # struct btf_var_secinfo
    Kind.ENUM64: 12,  # struct btf_enum64
}
# Indexed by kind number for the hot loop; None marks a kind whose record length is unknown.
_FIXED_TABLE: tuple[int | None, ...] = tuple(_FIXED_EXTRA.get(k) for k in range(32))
_PER_TABLE: tuple[int, ...] = tuple(_PER_VLEN.get(k, 0) for k in range(32))

_SIZED = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.DATASEC, Kind.FLOAT}
)
_QUALIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_ENUMS = frozenset({Kind.ENUM, Kind.ENUM64})
_AGGREGATES = frozenset({Kind.STRUCT, Kind.UNION})

# find(name) without a kind: types a C programmer means by a bare name come first.
_FIND_RANK = {
    Kind.STRUCT: 0,
    Kind.UNION: 1,
    Kind.ENUM: 2,
    Kind.ENUM64: 3,
    Kind.TYPEDEF: 4,
    Kind.INT: 5,
    Kind.FLOAT: 6,
    Kind.FUNC: 7,
    Kind.VAR: 8,
    Kind.DATASEC: 9,
    Kind.FWD: 10,
    Kind.TYPE_TAG: 11,
    Kind.DECL_TAG: 12,
}


class Member(NamedTuple):
    """One struct btf_member: bit_offset from the start of the aggregate; bitfield_size 0 if none."""

    name: str
    bit_offset: int
    bitfield_size: int
    type_id: int


class Enumerator(NamedTuple):
    """One enumerator of an ENUM or ENUM64, its value already sign-corrected."""

    name: str
    value: int


class Param(NamedTuple):
    """One struct btf_param of a FUNC_PROTO (name '' and type 0 for a trailing '...')."""

    name: str
    type_id: int


class VarSecinfo(NamedTuple):
    """One struct btf_var_secinfo of a DATASEC."""

    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Type:
    """One decoded BTF type. Fields that do not apply to the kind keep their defaults.

    ``size`` is set for INT, STRUCT, UNION, ENUM, ENUM64, DATASEC, FLOAT; ``ref`` for the kinds
    whose btf_type holds a type id (PTR, TYPEDEF, qualifiers, FUNC, FUNC_PROTO's return type,
    VAR, DECL_TAG, TYPE_TAG).
    """

    id: int
    kind: Kind
    name: str
    kind_flag: bool = False
    vlen: int = 0
    size: int | None = None
    ref: int | None = None
    members: tuple[Member, ...] = ()
    enumerators: tuple[Enumerator, ...] = ()
    params: tuple[Param, ...] = ()
    secinfos: tuple[VarSecinfo, ...] = ()
    # INT
    encoding: int = 0
    bits_offset: int = 0
    bits: int = 0
    # ARRAY
    elem_type: int = 0
    index_type: int = 0
    nelems: int = 0
    # VAR (btf_var.linkage) and FUNC (linkage lives in vlen)
    linkage: int = 0
    # DECL_TAG
    component_idx: int = -1

    @property
    def signed(self) -> bool:
        """Whether an INT, ENUM or ENUM64 holds signed values."""
        if self.kind is Kind.INT:
            return bool(self.encoding & BTF_INT_SIGNED)
        return self.kind in _ENUMS and self.kind_flag


VOID = Type(id=0, kind=Kind.UNKN, name="void")

_PATH_PART = re.compile(r"([^.\[\]]*)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")


def _parse_path(path: str) -> list[tuple[str, list[int]]]:
    """Split ``a.b[2].c`` into [('a', []), ('b', [2]), ('c', [])]."""
    parts = []
    for piece in path.split("."):
        m = _PATH_PART.fullmatch(piece)
        if m is None or not m.group(1):
            raise ValueError(f"bad member path {path!r}")
        parts.append((m.group(1), [int(i) for i in _INDEX.findall(m.group(2))]))
    return parts


def _kind_of(kind: Kind | int | str | None) -> Kind | None:
    if kind is None or isinstance(kind, Kind):
        return kind
    if isinstance(kind, str):
        try:
            return Kind[kind.upper()]
        except KeyError:
            raise ValueError(f"unknown BTF kind {kind!r}") from None
    return Kind(kind)


class BTF:
    """A parsed BTF blob. Build with :meth:`BTF.parse`; types are decoded on first use."""

    def __init__(
        self,
        data: bytes,
        endian: str,
        offsets: array,
        strs: tuple[int, int],
        name_offsets: array | None = None,
    ) -> None:
        self._data = data
        self.endian = endian  # '<' or '>', the byte order of the blob and of its kernel
        self._offs = offsets
        # Each type's name offset, as native 4-byte words: a name is looked up by searching
        # these bytes, without decoding the other hundred thousand names (see _ids_named).
        self._name_offs = name_offsets.tobytes() if name_offsets is not None else None
        self._named: dict[str, list[int]] = {}
        self._names_start_strings: bool | None = None
        self._str_start, self._str_end = strs
        self._u32x3 = struct.Struct(endian + "III")
        self._u32 = struct.Struct(endian + "I")
        self._i32 = struct.Struct(endian + "i")
        self._types: dict[int, Type] = {}
        self._strings: dict[int, str] = {}
        self._names: dict[str, list[int]] | None = None
        self._enumerators: dict[str, list[tuple[int, int]]] | None = None
        self._pointer_size: int | None = None
        self._scopes: dict[int, dict[str, tuple[int, Member]]] = {}
        self._resolved: dict[int, int] = {}
        self._scoping: set[int] = set()
        #: What other layers derive from these types (construct definitions, member
        #: lookups), by name. Kept here, not in module-level weak maps, so it is dropped with
        #: the BTF: its entries hold the BTF themselves, and a weak map's values that refer to
        #: their own key keep it alive for the life of the process.
        self.derived: dict[str, dict] = {}

    # ------------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> BTF:
        """Parse a raw BTF blob (header, type and string sections); raise ImageError if malformed.

        :param data: the whole blob, e.g. the bytes of /sys/kernel/btf/vmlinux.
        :returns: a BTF whose types are decoded lazily.
        """
        data = bytes(data)
        if len(data) < 8:
            raise ImageError(f"BTF: blob of {len(data)} bytes is too short for a header")
        e, hdr_len = btf_magic_version(data, "BTF")
        if hdr_len < BTF_HEADER_SIZE:
            raise ImageError(f"BTF: header length {hdr_len} is shorter than {BTF_HEADER_SIZE}")
        if hdr_len > len(data):
            raise ImageError(f"BTF: header length {hdr_len} exceeds the blob ({len(data)} bytes)")
        type_off, type_len, str_off, str_len = struct.unpack_from(e + "IIII", data, 8)
        btf_check_sections(type_off, type_len, str_off, str_len, len(data) - hdr_len, "BTF")
        s0 = hdr_len + str_off
        s1 = s0 + str_len
        # The first string is the empty one and every string is NUL-terminated, so a name
        # offset below str_len always finds its terminator inside the section.
        if str_len == 0 or data[s0] != 0 or data[s1 - 1] != 0:
            raise ImageError("BTF: string section must start and end with a NUL byte")
        t0 = hdr_len + type_off
        offsets, names = cls._scan_types(data, e, t0, t0 + type_len, str_len)
        return cls(data, e, offsets, (s0, s1), names)

    @staticmethod
    def _scan_types(data: bytes, e: str, t0: int, t1: int, str_len: int) -> tuple[array, array]:
        """Walk the type section once, recording where each type's record starts and the
        offset of its name."""
        unpack = struct.Struct(e + "II").unpack_from
        fixed = _FIXED_TABLE
        per = _PER_TABLE
        offsets = array("Q")
        names = array("I")
        append = offsets.append
        append_name = names.append
        off = t0
        last = t1 - 12
        while off < t1:
            if off > last:
                raise ImageError(
                    f"BTF: type id {len(offsets) + 1} is truncated at the end of the type section"
                )
            name_off, info = unpack(data, off)
            kind = (info >> 24) & 0x1F
            extra = fixed[kind]
            if extra is None or kind == 0:
                raise ImageError(f"BTF: type id {len(offsets) + 1} has unknown kind {kind}")
            if name_off >= str_len:
                raise ImageError(
                    f"BTF: type id {len(offsets) + 1} name offset {name_off} is outside the "
                    f"string section"
                )
            append(off)
            append_name(name_off)
            off += 12 + extra + (info & 0xFFFF) * per[kind]
        if off != t1:
            raise ImageError(f"BTF: type id {len(offsets)} runs past the end of the type section")
        return offsets, names

    # ------------------------------------------------------------------ strings and types

    def __len__(self) -> int:
        """The number of types, void excluded (the highest valid type id)."""
        return len(self._offs)

    def _str(self, off: int) -> str:
        s = self._strings.get(off)
        if s is None:
            if off >= self._str_end - self._str_start:
                raise ImageError(f"BTF: name offset {off} is outside the string section")
            start = self._str_start + off
            end = self._data.index(b"\0", start, self._str_end)
            s = self._data[start:end].decode("utf-8", "replace")
            self._strings[off] = s
        return s

    def _check_id(self, type_id: int) -> None:
        if not 0 <= type_id <= len(self._offs):
            raise ImageError(f"BTF: type id {type_id} is out of range (1..{len(self._offs)})")

    def _info(self, type_id: int) -> tuple[int, int, int]:
        """(name_off, info, size_or_type) of a type id > 0, without decoding the rest."""
        return self._u32x3.unpack_from(self._data, self._offs[type_id - 1])

    def kind(self, type_id: int) -> Kind:
        """The kind of a type id (void is UNKN)."""
        self._check_id(type_id)
        if type_id == 0:
            return Kind.UNKN
        return Kind((self._info(type_id)[1] >> 24) & 0x1F)

    def type(self, type_id: int) -> Type:
        """Decode one type by id (0 is void); raise ImageError if the id or record is bad."""
        t = self._types.get(type_id)
        if t is None:
            self._check_id(type_id)
            t = VOID if type_id == 0 else self._decode(type_id)
            self._types[type_id] = t
        return t

    def _decode(self, tid: int) -> Type:
        data = self._data
        off = self._offs[tid - 1]
        name_off, info, st = self._u32x3.unpack_from(data, off)
        kind = Kind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        name = self._str(name_off)
        body = off + 12
        common = {"id": tid, "kind": kind, "name": name, "kind_flag": kflag, "vlen": vlen}
        if kind is Kind.INT:
            (v,) = self._u32.unpack_from(data, body)
            return Type(
                **common,
                size=st,
                encoding=(v >> 24) & 0x0F,
                bits_offset=(v >> 16) & 0xFF,
                bits=v & 0xFF,
            )
        if kind is Kind.ARRAY:
            elem, index, nelems = self._u32x3.unpack_from(data, body)
            return Type(**common, elem_type=elem, index_type=index, nelems=nelems)
        if kind in _AGGREGATES:
            members = []
            for m_name, m_type, m_off in self._u32x3.iter_unpack(data[body : body + 12 * vlen]):
                if kflag:
                    members.append(Member(self._str(m_name), m_off & 0xFFFFFF, m_off >> 24, m_type))
                else:
                    members.append(Member(self._str(m_name), m_off, 0, m_type))
            return Type(**common, size=st, members=tuple(members))
        if kind is Kind.ENUM:
            values = []
            for e_name, e_val in struct.iter_unpack(
                self.endian + "Ii", data[body : body + 8 * vlen]
            ):
                values.append(Enumerator(self._str(e_name), e_val if kflag else e_val & 0xFFFFFFFF))
            return Type(**common, size=st, enumerators=tuple(values))
        if kind is Kind.ENUM64:
            values = []
            for e_name, lo, hi in self._u32x3.iter_unpack(data[body : body + 12 * vlen]):
                v = (hi << 32) | lo
                if kflag and v >= 1 << 63:
                    v -= 1 << 64
                values.append(Enumerator(self._str(e_name), v))
            return Type(**common, size=st, enumerators=tuple(values))
        if kind is Kind.FUNC_PROTO:
            params = tuple(
                Param(self._str(p_name), p_type)
                for p_name, p_type in struct.iter_unpack(
                    self.endian + "II", data[body : body + 8 * vlen]
                )
            )
            return Type(**common, ref=st, params=params)
        if kind is Kind.DATASEC:
            secinfos = tuple(
                VarSecinfo(*v) for v in self._u32x3.iter_unpack(data[body : body + 12 * vlen])
            )
            return Type(**common, size=st, secinfos=secinfos)
        if kind is Kind.VAR:
            (linkage,) = self._u32.unpack_from(data, body)
            return Type(**common, ref=st, linkage=linkage)
        if kind is Kind.FUNC:
            return Type(**common, ref=st, linkage=vlen)
        if kind is Kind.DECL_TAG:
            (idx,) = self._i32.unpack_from(data, body)
            return Type(**common, ref=st, component_idx=idx)
        if kind is Kind.FLOAT:
            return Type(**common, size=st)
        if kind is Kind.FWD:
            return Type(**common)
        # PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
        return Type(**common, ref=st)

    def types(self) -> list[Type]:
        """Every type, in id order (void excluded)."""
        return [self.type(i) for i in range(1, len(self._offs) + 1)]

    # ------------------------------------------------------------------ lookup

    def _name_index(self) -> dict[str, list[int]]:
        if self._names is None:
            names: dict[str, list[int]] = {}
            unpack = self._u32.unpack_from
            data = self._data
            for tid, off in enumerate(self._offs, 1):
                name_off = unpack(data, off)[0]
                if name_off:
                    names.setdefault(self._str(name_off), []).append(tid)
            self._names = names
        return self._names

    def _ids_named(self, name: str) -> list[int]:
        """The ids of the types named ``name``, in id order.

        A kernel's BTF names some hundred thousand types, and decoding every name to build
        the full index costs seconds on a slow machine, where a live capture's ``--skip``
        needs a few dozen names. So a name is found in the string section (each NUL, name,
        NUL), and its offset among the types' name offsets, without decoding the others.
        """
        if self._names is not None:
            return self._names.get(name, [])
        hit = self._named.get(name)
        if hit is not None:
            return hit
        raw = self._name_offs
        # A name that holds a NUL or a replacement character (a name decoded from bytes that
        # are not UTF-8) is looked up in the full index, to give exactly what it gives.
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            encoded = b""
        if raw is None or not encoded or b"\0" in encoded or "\ufffd" in name:
            return self._name_index().get(name, [])
        import numpy as np

        data, s0, s1 = self._data, self._str_start, self._str_end
        offs = np.frombuffer(raw, dtype=np.uint32)
        if self._names_start_strings is None:
            # Whether every type's name starts a string (the byte before it is a NUL), as
            # every BTF writer makes it; the format allows a name in the middle of a string.
            named = offs[offs > 0].astype(np.int64)
            text = np.frombuffer(data, dtype=np.uint8, count=s1 - s0, offset=s0)
            self._names_start_strings = not bool(text[named - 1].any())
        if not self._names_start_strings:
            return self._name_index().get(name, [])
        pattern = b"\0" + encoded + b"\0"
        wanted = []
        pos = data.find(pattern, s0, s1)
        while pos != -1:
            wanted.append(pos + 1 - s0)
            pos = data.find(pattern, pos + 1, s1)
        ids: list[int] = []
        if wanted:
            hits = offs == wanted[0] if len(wanted) == 1 else np.isin(offs, wanted)
            ids = (np.flatnonzero(hits) + 1).tolist()
        if len(self._named) < 4096:
            self._named[name] = ids
        return ids

    def find(self, name: str, kind: Kind | int | str | None = None) -> int:
        """The type id named ``name``; raise ImageError if there is none.

        :param name: a C name without its tag (``"page"``, not ``"struct page"``).
        :param kind: restrict to one kind (a Kind, its number or its name such as ``"struct"``).
            Without it, a complete struct/union/enum/typedef is preferred over other kinds,
            then the lowest id.
        """
        want = _kind_of(kind)
        ids = self._ids_named(name)
        best, best_rank = 0, len(_FIND_RANK) + 1
        for tid in ids:
            k = self.kind(tid)
            if want is not None:
                if k is want:
                    return tid
                continue
            rank = _FIND_RANK.get(k, len(_FIND_RANK))
            if rank < best_rank:
                best, best_rank = tid, rank
        if best:
            return best
        what = f"{want.name.lower()} " if want is not None else ""
        raise ImageError(f"BTF has no {what}type named {name!r}")

    def find_all(self, name: str) -> list[int]:
        """Every type id named ``name``, of any kind, in id order."""
        return list(self._ids_named(name))

    def _id(self, name_or_id: str | int, kinds: frozenset[Kind] | None = None) -> int:
        """A type id from a name (preferring ``kinds``, then typedefs to them) or an id."""
        if isinstance(name_or_id, int):
            self._check_id(name_or_id)
            return name_or_id
        if kinds is None:
            return self.find(name_or_id)
        candidates = self._ids_named(name_or_id)
        for tid in candidates:
            if self.kind(tid) in kinds:
                return tid
        for tid in candidates:
            if self.kind(tid) is Kind.TYPEDEF and self.kind(self.resolve(tid)) in kinds:
                return tid
        wanted = "/".join(sorted(k.name.lower() for k in kinds))
        raise ImageError(f"BTF has no {wanted} named {name_or_id!r}")

    def resolve(self, type_id: int) -> int:
        """Strip typedef, const, volatile, restrict and type_tag from a type id."""
        hit = self._resolved.get(type_id)
        if hit is not None:
            return hit
        rid = self._resolve(type_id)
        self._resolved[type_id] = rid
        return rid

    def _resolve(self, type_id: int) -> int:
        tid = type_id
        for _ in range(MAX_REF_DEPTH):
            self._check_id(tid)
            if tid == 0:
                return 0
            _, info, ref = self._info(tid)
            if ((info >> 24) & 0x1F) not in _QUALIFIERS:
                return tid
            tid = ref
        raise ImageError(f"BTF: type id {type_id} has a cyclic or too deep typedef/qualifier chain")

    @property
    def pointer_size(self) -> int:
        """Bytes in a pointer: the size of ``long`` in this BTF, 8 if it has no ``long``."""
        if self._pointer_size is None:
            size = 8
            for name in ("long unsigned int", "long int", "unsigned long", "long"):
                for tid in self.find_all(name):
                    t = self.type(tid)
                    if t.kind is Kind.INT and t.size in (4, 8):
                        size = t.size
                        break
                else:
                    continue
                break
            self._pointer_size = size
        return self._pointer_size

    def sizeof(self, name_or_id: str | int) -> int:
        """sizeof() of a type by name or id, in bytes; ImageError for void, functions, FWD."""
        tid = self._id(name_or_id)
        count = 1
        for _ in range(MAX_REF_DEPTH):
            t = self.type(self.resolve(tid))
            if t.kind in _SIZED:
                return count * (t.size or 0)
            if t.kind is Kind.PTR:
                return count * self.pointer_size
            if t.kind is Kind.ARRAY:
                count *= t.nelems
                tid = t.elem_type
                continue
            what = f"{t.kind.name.lower()} {t.name}".strip()
            raise ImageError(f"BTF: type id {t.id} ({what}) has no size")
        raise ImageError(f"BTF: type id {name_or_id} has a cyclic or too deep array chain")

    def members(self, struct_name: str | int) -> list[Member]:
        """The direct members of a struct or union (anonymous members have name '')."""
        t = self.type(self.resolve(self._id(struct_name, _AGGREGATES)))
        if t.kind not in _AGGREGATES:
            raise ImageError(
                f"BTF: type id {t.id} ({t.name or 'anonymous'}) is not a struct or union"
            )
        return list(t.members)

    def _scope(self, agg_id: int, depth: int = 0) -> dict[str, tuple[int, Member]]:
        """Every member name reachable in a struct/union as in C, through anonymous members.

        :returns: name -> (bit offset from the aggregate's start, the member); cached.
        """
        scope = self._scopes.get(agg_id)
        if scope is not None:
            return scope
        if depth > MAX_NESTING or agg_id in self._scoping:
            raise ImageError(
                f"BTF: anonymous members of type id {agg_id} nest too deeply or in a cycle"
            )
        self._scoping.add(agg_id)
        try:
            scope = {}
            t = self.type(agg_id)

            def add(name: str, bit: int, member: Member) -> None:
                # C forbids duplicates, which also keeps this linear on crafted input.
                if name in scope:
                    raise ImageError(
                        f"BTF: {t.kind.name.lower()} {t.name or agg_id} has two members named {name!r}"
                    )
                scope[name] = (bit, member)

            for m in t.members:
                if m.name:
                    add(m.name, m.bit_offset, m)
                    continue
                inner = self.resolve(m.type_id)
                if self.kind(inner) in _AGGREGATES:
                    for name, (bit, member) in self._scope(inner, depth + 1).items():
                        add(name, m.bit_offset + bit, member)
        finally:
            self._scoping.discard(agg_id)
        self._scopes[agg_id] = scope
        return scope

    def _walk(self, struct_name: str | int, path: str) -> tuple[int, Member | None, int] | None:
        """Follow a member path; (bit offset, last member, its type id) or None if absent."""
        tid = self.resolve(self._id(struct_name, _AGGREGATES))
        bit = 0
        member: Member | None = None
        for name, indexes in _parse_path(path):
            if self.kind(tid) not in _AGGREGATES:
                return None
            found = self._scope(tid).get(name)
            if found is None:
                return None
            offset, member = found
            bit += offset
            tid = self.resolve(member.type_id)
            for index in indexes:
                t = self.type(tid)
                if t.kind is not Kind.ARRAY:
                    return None
                tid = self.resolve(t.elem_type)
                bit += 8 * index * self.sizeof(tid)
        return bit, member, tid

    def bit_offsetof(self, struct_name: str | int, path: str) -> int:
        """Bit offset of ``path`` (``"a.b[2].c"``, anonymous members transparent) in a struct."""
        found = self._walk(struct_name, path)
        if found is None:
            raise ImageError(f"BTF: struct {struct_name} has no member {path!r}")
        member = found[1]
        if member is not None and not member.bitfield_size:
            # kind_flag 0 encodes bitfields through the member's int type instead.
            t = self.type(self.resolve(member.type_id))
            if t.kind is Kind.INT:
                return found[0] + t.bits_offset
        return found[0]

    def offsetof(self, struct_name: str | int, path: str) -> int:
        """offsetof() in bytes of ``path`` in a struct or union; ImageError for a bitfield."""
        found = self._walk(struct_name, path)
        if found is None:
            raise ImageError(f"BTF: struct {struct_name} has no member {path!r}")
        bit, member, _ = found
        if member is not None and (self._is_bitfield(member) or bit % 8):
            raise ImageError(f"BTF: {struct_name}.{path} is a bitfield and has no byte offset")
        return bit // 8

    def _is_bitfield(self, member: Member) -> bool:
        if member.bitfield_size:
            return True
        t = self.type(self.resolve(member.type_id))
        return t.kind is Kind.INT and (t.bits_offset != 0 or t.bits != 8 * (t.size or 0))

    def has_member(self, struct_name: str | int, path: str) -> bool:
        """Whether a struct or union (by name or id) has member ``path``; False if it is absent."""
        try:
            tid = self._id(struct_name, _AGGREGATES)
        except ImageError:
            if isinstance(struct_name, str):
                return False
            raise
        return self._walk(tid, path) is not None

    def _enumerator_index(self) -> dict[str, list[tuple[int, int]]]:
        if self._enumerators is None:
            index: dict[str, list[tuple[int, int]]] = {}
            for tid, off in enumerate(self._offs, 1):
                info = self._u32.unpack_from(self._data, off + 4)[0]
                if (info >> 24) & 0x1F in _ENUMS:
                    for e in self.type(tid).enumerators:
                        index.setdefault(e.name, []).append((tid, e.value))
            self._enumerators = index
        return self._enumerators

    def enum_value(self, enum_name: str | None, enumerator: str) -> int:
        """The value of ``enumerator``, in ``enum enum_name`` or (None) in any enum."""
        if enum_name is not None:
            for tid in self.find_all(enum_name):
                t = self.type(self.resolve(tid))
                if t.kind in _ENUMS:
                    for e in t.enumerators:
                        if e.name == enumerator:
                            return e.value
            if not any(self.kind(self.resolve(t)) in _ENUMS for t in self.find_all(enum_name)):
                raise ImageError(f"BTF has no enum named {enum_name!r}")
            raise ImageError(f"BTF: enum {enum_name} has no enumerator {enumerator!r}")
        hits = self._enumerator_index().get(enumerator)
        if not hits:
            raise ImageError(f"BTF has no enumerator named {enumerator!r}")
        return hits[0][1]

    def aggregate_id(self, name: str) -> int:
        """The type id of ``struct name`` or ``union name`` (a typedef to one is followed).

        :raises ImageError: there is no such struct or union.
        """
        return self.resolve(self._id(name, _AGGREGATES))


# ---------------------------------------------------------------------- VMCOREINFO


class CrossCheck(list):
    """Disagreements between VMCOREINFO and BTF, one readable line each.

    ``missing`` lists the entries whose type or member BTF does not have at all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.missing: list[str] = []


_VMCOREINFO_KEY = re.compile(r"(SIZE|OFFSET|LENGTH)\(([^()]+)\)")


def cross_check(btf: BTF, vmcoreinfo_entries: dict[str, int]) -> CrossCheck:
    """Compare VMCOREINFO's SIZE(x), OFFSET(x.y) and LENGTH(x.y) entries with BTF.

    :param vmcoreinfo_entries: keys as VMCOREINFO writes them (``"OFFSET(page._refcount)"``),
        values as integers. Other keys (SYMBOL, NUMBER, ...) are ignored.
    :returns: a list of disagreement lines (empty when all agree); its ``missing`` attribute
        lists the entries that name a type or member BTF lacks.
    """
    result = CrossCheck()
    for key, value in vmcoreinfo_entries.items():
        m = _VMCOREINFO_KEY.fullmatch(key)
        if m is None:
            continue
        what, arg = m.groups()
        struct_name, _, path = arg.partition(".")
        if what != "SIZE" and not path:
            continue  # LENGTH(symbol) describes a variable, not a type
        try:
            if what == "SIZE":
                if not btf.find_all(arg):
                    result.missing.append(f"{key}: BTF has no type {arg!r}")
                    continue
                got = btf.sizeof(arg)
            elif not btf.has_member(struct_name, path):
                result.missing.append(f"{key}: BTF has no member {struct_name}.{path}")
                continue
            elif what == "OFFSET":
                got = btf.offsetof(struct_name, path)
            else:
                found = btf._walk(struct_name, path)
                t = btf.type(found[2]) if found else VOID
                if t.kind is not Kind.ARRAY:
                    result.append(f"{key}: VMCOREINFO says {value}, BTF member is not an array")
                    continue
                got = t.nelems
        except ValueError:  # VMCOREINFO comes from the image: a path that is no C path
            result.missing.append(f"{key}: not a member path")
            continue
        except ImageError as e:
            result.append(f"{key}: VMCOREINFO says {value}, {e}")
            continue
        if got != value:
            result.append(f"{key}: VMCOREINFO says {value}, BTF says {got}")
    return result
