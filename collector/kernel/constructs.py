"""construct definitions of kernel types, built from BTF (see collector.kernel.btf).

A struct or union becomes a :class:`CStruct`: a construct.Construct whose fields sit at the
offsets BTF gives, so union members overlap and anonymous members are flattened as in C.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import construct
from construct import Array, Bytes, BytesInteger, Container, FormatField, ListContainer
from construct.core import stream_read, stream_write

from collector.errors import ImageError
from collector.kernel.btf import BTF, BTF_INT_CHAR, MAX_NESTING, Kind

# The most Python objects one parse of a definition may produce. Zero-sized structs let a
# crafted blob describe billions of elements in no bytes at all; real kernels stay far below.
MAX_PARSE_NODES = 1 << 22

_INT_CODES = {1: "B", 2: "H", 4: "L", 8: "Q"}  # construct.FormatField spells u32 "L"
_FLOAT_CODES = {2: "e", 4: "f", 8: "d"}


class CField(NamedTuple):
    """A member at a byte ``offset`` in its (outermost flattened) struct, parsed by ``subcon``."""

    name: str
    offset: int
    subcon: construct.Construct


class CBitField(NamedTuple):
    """A bitfield: ``bits`` bits at ``shift`` from the least significant bit of the storage unit.

    The storage unit is the ``storage`` bytes at byte ``offset``, read as an integer in the
    kernel's byte order (for x86_64: a little-endian unit of the member's declared type).
    """

    name: str
    offset: int
    storage: int
    shift: int
    bits: int
    signed: bool


Field = CField | CBitField


class CStruct(construct.Construct):
    """A C struct or union of fixed size whose fields are read at explicit offsets.

    Parsing reads exactly ``size`` bytes (a short stream raises construct's StreamError) and
    returns a Container holding every field of ``fields``; building writes the fields present
    in the given dict over zeroes. Not compilable: use :func:`parse_struct` on untrusted bytes.
    """

    def __init__(
        self, typename: str, kind: str, size: int, fields: tuple[Field, ...], byteorder: str
    ) -> None:
        super().__init__()
        self.typename = typename  # the C tag ("page"), '' for an anonymous aggregate
        self.kind = kind  # "struct" or "union"
        self.size = size
        self.fields = fields
        self.byteorder = byteorder  # '<' or '>'
        self._by_name = {f.name: f for f in fields}
        self._plan: _Plan | None = None
        self._dtype: Any = None  # filled by collector.kernel.bulk.dtype_for
        self._cost = 1 + len(fields)

    def __repr__(self) -> str:
        return f"<CStruct {self.kind} {self.typename or '(anonymous)'} size={self.size}>"

    def field(self, name: str) -> Field:
        """The field called ``name`` (anonymous members' fields are reachable directly)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"{self.kind} {self.typename or '(anonymous)'} has no member {name!r}"
            ) from None

    def offsetof(self, name: str) -> int:
        """Byte offset of a field (for a bitfield: of its storage unit)."""
        return self.field(name).offset

    # construct interface ------------------------------------------------------------

    def _parse(self, stream: Any, context: Any, path: str) -> Container:
        return self._decode(stream_read(stream, self.size, path), 0)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        buf = bytearray(self.size)
        self._encode(obj, buf, 0)
        stream_write(stream, bytes(buf), self.size, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size

    # fast paths over a bytes-like buffer ---------------------------------------------

    def _decode(self, buf: Any, base: int) -> Container:
        plan = self._plan
        if plan is None:
            plan = self._plan = _Plan(self)
        if plan.only is not None:  # all scalars, no overlaps: one unpack in field order
            return Container(zip(plan.names, plan.only(buf, base)))  # noqa: B905 (kwargs slow zip)
        values = plan.blank.copy()
        for unpack, slots in plan.runs:
            for slot, value in zip(slots, unpack(buf, base)):  # noqa: B905
                values[slot] = value
        for slot, decode, offset in plan.others:
            values[slot] = decode(buf, base + offset)
        return Container(zip(plan.names, values))  # noqa: B905

    def _encode(self, obj: Any, buf: bytearray, base: int) -> None:
        for f in self.fields:
            if f.name not in obj:
                continue
            value = obj[f.name]
            if isinstance(f, CBitField):
                _encode_bitfield(f, value, buf, base, self.byteorder)
            else:
                _encode_value(f.subcon, value, buf, base + f.offset)


class _Plan:
    """How a CStruct decodes: scalar fields that do not overlap share one struct.unpack_from."""

    def __init__(self, defn: CStruct) -> None:
        self.names = tuple(f.name for f in defn.fields)
        self.blank: list[Any] = [None] * len(self.names)
        self.others: list[tuple[int, Callable[[Any, int], Any], int]] = []
        # Union members overlap, so scalars go into as many runs as needed for none of a
        # run's fields to overlap; each run is one format with pad bytes between fields.
        runs: list[tuple[list[str], list[int], list[int]]] = []  # (format parts, slots, [end])
        order = sorted(range(len(defn.fields)), key=lambda i: defn.fields[i].offset)
        for slot in order:
            f = defn.fields[slot]
            if isinstance(f, CField) and isinstance(f.subcon, FormatField):
                size = f.subcon.sizeof()
                for parts, slots, end in runs:  # noqa: B007 (the loop picks the run to extend)
                    if end[0] <= f.offset:
                        break
                else:
                    parts, slots, end = [], [], [0]
                    runs.append((parts, slots, end))
                if f.offset > end[0]:
                    parts.append(f"{f.offset - end[0]}x")
                parts.append(f.subcon.fmtstr[1:])
                slots.append(slot)
                end[0] = f.offset + size
            else:
                self.others.append((slot, _field_decoder(f, defn.byteorder), f.offset))
        self.runs = [
            (struct.Struct(defn.byteorder + "".join(parts)).unpack_from, tuple(slots))
            for parts, slots, _ in runs
        ]
        self.only = None
        if len(self.runs) == 1 and not self.others and self.runs[0][1] == tuple(range(len(order))):
            self.only = self.runs[0][0]


def parse_struct(
    defn: construct.Construct, data: bytes | bytearray | memoryview, offset: int = 0
) -> Any:
    """Parse ``defn`` from ``data`` at ``offset``, checking the length first.

    :raises ImageError: when fewer than sizeof(defn) bytes are available, or parsing fails.
    """
    # construct's sizeof() builds a context on every call; a CStruct knows its size.
    size = defn.size if isinstance(defn, CStruct) else defn.sizeof()
    if offset < 0 or len(data) - offset < size:
        what = defn.typename if isinstance(defn, CStruct) else type(defn).__name__
        raise ImageError(
            f"{what}: needs {size} bytes at offset {offset}, only {max(0, len(data) - offset)} available"
        )
    if isinstance(defn, CStruct):
        return defn._decode(data, offset)
    try:
        return defn.parse(bytes(data[offset : offset + size]))
    except construct.ConstructError as e:
        raise ImageError(f"{type(defn).__name__}: {e}".splitlines()[0]) from None


# ---------------------------------------------------------------------- decoders


def _decoder(subcon: construct.Construct) -> Callable[[Any, int], Any]:
    """A function (buffer, offset) -> value equivalent to subcon.parse on those bytes."""
    if isinstance(subcon, CStruct):
        return subcon._decode
    if isinstance(subcon, FormatField):
        unpack = struct.Struct(subcon.fmtstr).unpack_from
        return lambda buf, off: unpack(buf, off)[0]
    if isinstance(subcon, Bytes) and isinstance(subcon.length, int):
        n = subcon.length
        return lambda buf, off: bytes(buf[off : off + n])
    if isinstance(subcon, BytesInteger) and isinstance(subcon.length, int):
        n, signed = subcon.length, subcon.signed
        order = "little" if subcon.swapped else "big"
        return lambda buf, off: int.from_bytes(buf[off : off + n], order, signed=signed)
    if isinstance(subcon, Array) and isinstance(subcon.count, int):
        n, elem = subcon.count, subcon.subcon
        if isinstance(elem, FormatField):
            many = struct.Struct(elem.fmtstr[0] + str(n) + elem.fmtstr[1:]).unpack_from
            return lambda buf, off: ListContainer(many(buf, off))
        step = elem.sizeof()
        one = _decoder(elem)
        return lambda buf, off: ListContainer([one(buf, off + i * step) for i in range(n)])
    size = subcon.sizeof()
    return lambda buf, off: subcon.parse(bytes(buf[off : off + size]))


def _field_decoder(f: Field, byteorder: str) -> Callable[[Any, int], Any]:
    if isinstance(f, CField):
        return _decoder(f.subcon)
    mask = (1 << f.bits) - 1
    shift, bits, signed = f.shift, f.bits, f.signed
    sign = 1 << (bits - 1)
    code = _INT_CODES.get(f.storage)
    if code is not None:
        unpack = struct.Struct(byteorder + code).unpack_from

        def read(buf: Any, off: int) -> int:
            return unpack(buf, off)[0]
    else:
        n = f.storage
        order = "little" if byteorder == "<" else "big"

        def read(buf: Any, off: int) -> int:
            return int.from_bytes(buf[off : off + n], order)

    if signed:

        def decode(buf: Any, off: int) -> int:
            v = (read(buf, off) >> shift) & mask
            return v - (v & sign) * 2

        return decode
    return lambda buf, off: (read(buf, off) >> shift) & mask


def _encode_value(subcon: construct.Construct, value: Any, buf: bytearray, off: int) -> None:
    if isinstance(subcon, CStruct):
        subcon._encode(value, buf, off)
    elif isinstance(subcon, FormatField):
        struct.pack_into(subcon.fmtstr, buf, off, value)
    elif isinstance(subcon, Bytes) and isinstance(subcon.length, int):
        raw = bytes(value)
        if len(raw) > subcon.length:
            raise construct.StreamError(f"{len(raw)} bytes do not fit in char[{subcon.length}]")
        buf[off : off + len(raw)] = raw
    elif isinstance(subcon, Array) and isinstance(subcon.count, int):
        if len(value) > subcon.count:
            raise construct.RangeError(
                f"{len(value)} elements do not fit in an array of {subcon.count}"
            )
        step = subcon.subcon.sizeof()
        for i, v in enumerate(value):
            _encode_value(subcon.subcon, v, buf, off + i * step)
    else:
        raw = subcon.build(value)
        buf[off : off + len(raw)] = raw


def _encode_bitfield(f: CBitField, value: int, buf: bytearray, base: int, byteorder: str) -> None:
    order = "little" if byteorder == "<" else "big"
    start = base + f.offset
    unit = int.from_bytes(buf[start : start + f.storage], order)
    mask = ((1 << f.bits) - 1) << f.shift
    unit = (unit & ~mask) | ((value << f.shift) & mask)
    buf[start : start + f.storage] = unit.to_bytes(f.storage, order)


# ---------------------------------------------------------------------- building from BTF


def _cost(subcon: construct.Construct) -> int:
    """How many Python objects one parse creates, roughly: bounds hostile zero-size arrays."""
    if isinstance(subcon, CStruct):
        return getattr(subcon, "_cost", 1)
    if isinstance(subcon, Array) and isinstance(subcon.count, int):
        return 1 + subcon.count * _cost(subcon.subcon)
    return 1


def _storage_unit(
    bit: int, bits: int, declared: int, size: int, byteorder: str
) -> tuple[int, int, int]:
    """(byte offset, storage bytes, shift from the LSB) of a bitfield at struct bit ``bit``.

    x86_64 (System V psABI) places a bitfield inside an aligned unit of its declared type
    unless the struct is packed; packed fields that straddle such units get the smallest
    1/2/4/8-byte window inside the struct that covers them.
    """
    start = bit // 8
    end = (bit + bits + 7) // 8
    windows = []
    if declared in _INT_CODES:
        windows.append(((bit // (8 * declared)) * declared, declared))
    windows += [(min(start, size - n), n) for n in (1, 2, 4, 8) if n >= end - start]
    for off, n in windows:
        if 0 <= off <= start and end <= off + n <= size:
            break
    else:
        off, n = start, end - start
    within = bit - 8 * off
    shift = within if byteorder == "<" else 8 * n - within - bits
    return off, n, shift


class _Builder:
    def __init__(self, btf: BTF) -> None:
        self.btf = btf
        self.e = btf.endian
        self.active: set[int] = set()

    def build(self, type_id: int, depth: int = 0) -> construct.Construct:
        btf = self.btf
        tid = btf.resolve(type_id)
        cache = _cache(btf)
        cached = cache.get(tid)
        if cached is not None:
            return cached
        if depth > MAX_NESTING:
            raise ImageError(f"BTF: type id {type_id} nests by value more than {MAX_NESTING} deep")
        if tid in self.active:
            raise ImageError(f"BTF: type id {tid} contains itself by value")
        self.active.add(tid)
        try:
            con = self._build(tid, depth)
        finally:
            self.active.discard(tid)
        if _cost(con) > MAX_PARSE_NODES:
            raise ImageError(
                f"BTF: type id {tid} would expand to more than {MAX_PARSE_NODES} values"
            )
        cache[tid] = con
        return con

    def _build(self, tid: int, depth: int) -> construct.Construct:
        btf = self.btf
        t = btf.type(tid)
        e = self.e
        kind = t.kind
        if kind is Kind.INT:
            return self._int(t.size or 0, t.signed, tid)
        if kind in (Kind.ENUM, Kind.ENUM64):
            return self._int(t.size or 0, t.kind_flag, tid)
        if kind is Kind.PTR:
            return FormatField(e, _INT_CODES[btf.pointer_size])
        if kind is Kind.FLOAT:
            code = _FLOAT_CODES.get(t.size or 0)
            if code is None:
                return Bytes(t.size or 0)
            return FormatField(e, code)
        if kind is Kind.ARRAY:
            elem = btf.type(btf.resolve(t.elem_type))
            if (
                elem.kind is Kind.INT
                and elem.size == 1
                and (elem.name == "char" or elem.encoding & BTF_INT_CHAR)
            ):
                return Bytes(t.nelems)
            return Array(t.nelems, self.build(t.elem_type, depth + 1))
        if kind in (Kind.STRUCT, Kind.UNION):
            return self._aggregate(t, depth)
        what = f"{kind.name.lower()} {t.name}".strip() if tid else "void"
        raise ImageError(f"BTF: type id {tid} ({what}) has no layout to parse")

    def _int(self, size: int, signed: bool, tid: int) -> construct.Construct:
        code = _INT_CODES.get(size)
        if code is not None:
            return FormatField(self.e, code.lower() if signed else code)
        if 0 < size <= 16:
            return BytesInteger(size, signed=signed, swapped=self.e == "<")
        raise ImageError(f"BTF: integer type id {tid} has unsupported size {size}")

    def _aggregate(self, t: Any, depth: int) -> CStruct:
        btf = self.btf
        size = t.size or 0
        kind = t.kind.name.lower()
        label = f"{kind} {t.name or '(anonymous)'} (type id {t.id})"
        fields: list[Field] = []
        names: set[str] = set()

        def add(f: Field) -> None:
            if f.name in names:
                raise ImageError(f"BTF: {label} has two members named {f.name!r}")
            names.add(f.name)
            fields.append(f)

        for m in t.members:
            mt = btf.type(btf.resolve(m.type_id))
            bits = m.bitfield_size
            bit = m.bit_offset
            if (
                not bits
                and mt.kind is Kind.INT
                and (mt.bits_offset or mt.bits != 8 * (mt.size or 0))
            ):
                # kind_flag 0: the bitfield is described by the int type itself.
                bits, bit = mt.bits, bit + mt.bits_offset
            if bits:
                if mt.kind not in (Kind.INT, Kind.ENUM, Kind.ENUM64) or not mt.size:
                    raise ImageError(f"BTF: bitfield {m.name!r} of {label} is not an integer")
                if bit + bits > 8 * size or bits > 8 * mt.size:
                    raise ImageError(f"BTF: bitfield {m.name!r} of {label} lies outside it")
                if not m.name:
                    continue  # an unnamed bitfield is padding, as in C
                off, n, shift = _storage_unit(bit, bits, mt.size, size, btf.endian)
                add(CBitField(m.name, off, n, shift, bits, mt.signed))
                continue
            if bit % 8:
                raise ImageError(f"BTF: member {m.name!r} of {label} is not byte-aligned")
            off = bit // 8
            if not m.name:
                if mt.kind not in (Kind.STRUCT, Kind.UNION):
                    continue
                inner = self.build(mt.id, depth + 1)
                assert isinstance(inner, CStruct)
                if off + inner.size > size:
                    raise ImageError(f"BTF: an anonymous member of {label} lies outside it")
                for f in inner.fields:
                    add(f._replace(offset=f.offset + off))
                continue
            sub = self.build(m.type_id, depth + 1)
            if off + sub.sizeof() > size:
                raise ImageError(f"BTF: member {m.name!r} of {label} lies outside its {size} bytes")
            add(CField(m.name, off, sub))
        result = CStruct(t.name, kind, size, tuple(fields), btf.endian)
        result._cost = 1 + sum(1 if isinstance(f, CBitField) else _cost(f.subcon) for f in fields)
        return result


def _cache(btf: BTF) -> dict[int, construct.Construct]:
    """Definitions built from one BTF, dropped with it."""
    cache = btf.derived.get("constructs")
    if cache is None:
        cache = btf.derived["constructs"] = {}
    return cache


def construct_for(btf: BTF, type_id: int) -> construct.Construct:
    """The construct definition of any sized type id, built once per ``btf``.

    Structs and unions become :class:`CStruct`; integers, enums and pointers FormatField
    (pointers as unsigned integers); ``char`` arrays Bytes; other arrays Array; floats
    FormatField (or Bytes for long double).

    :raises ImageError: the type has no layout (void, a function, a forward declaration) or
        its BTF is malformed.
    """
    cached = _cache(btf).get(btf.resolve(type_id))
    return cached if cached is not None else _Builder(btf).build(type_id)


def struct_definition(btf: BTF, name: str) -> construct.Construct:
    """The construct definition of ``struct name`` or ``union name`` (or a typedef to one).

    :raises ImageError: BTF has no such struct or union.
    """
    return construct_for(btf, btf.aggregate_id(name))
