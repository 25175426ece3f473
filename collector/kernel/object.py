"""Typed kernel objects over BTF: read a kernel structure member by member, as C reads it.

An :class:`Object` is a typed place in kernel virtual memory (kernel, :class:`Type`,
address). Nothing is read until a value is asked for, and then only the bytes of that value:
``task.comm.string()`` reads 16 bytes, never the whole ``struct task_struct``. Member access
follows pointers as C's ``->`` does, so ``task.mm.pgd`` works on a ``struct task_struct *``.

Reads go through :meth:`collector.kernel.kernel.Kernel.read_virt`: a page the image lacks
raises :class:`~collector.memory.PageNotCaptured` naming the page's fate, an unmapped address
:class:`~collector.profiles.x86_64.TranslationError`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from collector.errors import ImageError
from collector.kernel.btf import BTF, BTF_INT_BOOL, BTF_INT_CHAR, Kind, Member

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: The longest string :meth:`Object.string` reads unless told otherwise.
DEFAULT_STRING_MAX = 4096
#: The most elements :meth:`Object.value` of an array turns into Python values.
MAX_ARRAY_VALUES = 1 << 20

_QUALIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_AGGREGATES = frozenset({Kind.STRUCT, Kind.UNION})
_ENUMS = frozenset({Kind.ENUM, Kind.ENUM64})
_INT_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
_FLOAT_FORMATS = {2: "e", 4: "f", 8: "d"}


class ObjectError(ImageError):
    """An operation does not fit the object's type (no such member, a struct used as an
    integer, an index past an array's end), or a type name is not in BTF."""


# -- types ------------------------------------------------------------------------------------


class Type:
    """A C type of the kernel: a BTF type id, or a pointer to or array of another Type.

    BTF only has the pointer and array types the kernel's own code uses; ``struct page **``
    or ``struct pglist_data *[64]`` are made here when asked for. Typedefs and qualifiers are
    kept for :func:`str` and stripped for everything else.
    """

    __slots__ = ("_int", "_resolved", "_size", "btf", "id", "kind", "length", "target")

    def __init__(
        self, btf: BTF, type_id: int = 0, target: Type | None = None, length: int | None = None
    ) -> None:
        self.btf = btf
        self.id = type_id
        self.target = target
        self.length = length
        self._size: int | None = None
        self._resolved: Type | None = None
        self._int: tuple[int, bool, bool] | None = None
        if target is not None:
            self.kind = Kind.ARRAY if length is not None else Kind.PTR
        else:
            self.kind = btf.kind(btf.resolve(type_id))

    # construction
    @classmethod
    def pointer_to(cls, target: Type) -> Type:
        return cls(target.btf, target=target)

    @classmethod
    def array_of(cls, element: Type, length: int) -> Type:
        if length < 0:
            raise ObjectError(f"an array of {length} elements")
        return cls(element.btf, target=element, length=length)

    # what it is
    def resolved(self) -> Type:
        """The type with typedefs and qualifiers stripped (itself when there are none)."""
        if self.target is not None or self.id == 0:
            return self
        r = self._resolved
        if r is None:
            rid = self.btf.resolve(self.id)
            r = self._resolved = self if rid == self.id else Type(self.btf, rid)
        return r

    @property
    def _bt(self) -> Any:
        """The BTF record of the resolved type (not for made-up pointers and arrays)."""
        return self.btf.type(self.btf.resolve(self.id))

    @property
    def size(self) -> int:
        """``sizeof`` in bytes.

        :raises ObjectError: void, a function or an incomplete (forward-declared) type.
        """
        if self._size is None:
            if self.kind is Kind.PTR:
                self._size = self.btf.pointer_size
            elif self.target is not None:
                self._size = (self.length or 0) * self.target.size
            else:
                try:
                    self._size = self.btf.sizeof(self.id)
                except ImageError as exc:
                    raise ObjectError(f"{self} has no size: {exc}") from None
        return self._size

    @property
    def pointee(self) -> Type:
        """What a pointer points to, or an array's element type."""
        if self.target is not None:
            return self.target
        t = self._bt
        if t.kind is Kind.PTR:
            return Type(self.btf, t.ref or 0)
        if t.kind is Kind.ARRAY:
            return Type(self.btf, t.elem_type)
        raise ObjectError(f"{self} is not a pointer or an array")

    @property
    def array_length(self) -> int:
        if self.kind is not Kind.ARRAY:
            raise ObjectError(f"{self} is not an array")
        return self.length if self.target is not None else self._bt.nelems

    @property
    def tag(self) -> str:
        """The name without ``struct``/``union``/``enum`` of the resolved type ('' if none)."""
        return "" if self.target is not None else self._bt.name

    def int_format(self) -> tuple[int, bool, bool]:
        """``(size, signed, bool)`` of an integer or enum type."""
        f = self._int
        if f is None:
            bt = self.resolved()._bt
            f = self._int = (
                bt.size or 0,
                bt.signed,
                bt.kind is Kind.INT and bool(bt.encoding & BTF_INT_BOOL),
            )
        return f

    def is_char(self) -> bool:
        """Whether this is a one-byte character type (``char``, ``signed/unsigned char``)."""
        r = self.resolved()
        if r.kind is not Kind.INT or r.target is not None:
            return False
        t = r._bt
        return t.size == 1 and (bool(t.encoding & BTF_INT_CHAR) or "char" in t.name)

    def is_aggregate(self) -> bool:
        return self.kind in _AGGREGATES

    def member(self, name: str) -> tuple[int, int, Type]:
        """``(bit offset, bitfield width or 0, type)`` of a member of a struct or union,
        looking through anonymous members as C does.

        :raises ObjectError: not a struct or union, or no such member.
        """
        if self.kind not in _AGGREGATES:
            raise ObjectError(f"{self} has no members (looking for {name!r})")
        rid = self.btf.resolve(self.id)
        cache = _member_cache(self.btf)
        found = cache.get((rid, name))
        if found is None:
            hit = self.btf._scope(rid).get(name)
            if hit is None:
                raise ObjectError(f"{self} has no member {name!r}")
            bit, m = hit
            found = cache[(rid, name)] = (*_bitfield(self.btf, m, bit), Type(self.btf, m.type_id))
        return found

    def has_member(self, path: str) -> bool:
        """Whether ``path`` (``"a.b.c"``) names a member, through anonymous members."""
        t: Type = self
        for name in path.split("."):
            try:
                t = t.member(name)[2].resolved()
            except ObjectError:
                return False
        return True

    def members(self) -> list[tuple[str, int, Type]]:
        """The direct members: ``(name, bit offset, type)``; anonymous ones have name ''."""
        if self.kind not in _AGGREGATES:
            raise ObjectError(f"{self} has no members")
        return [(m.name, m.bit_offset, Type(self.btf, m.type_id)) for m in self._bt.members]

    def enumerators(self) -> list[tuple[str, int]]:
        if self.kind not in _ENUMS:
            raise ObjectError(f"{self} is not an enum")
        return [(e.name, e.value) for e in self._bt.enumerators]

    # identity and display
    def _key(self) -> tuple:
        # Structural for pointers and arrays: BTF's own "struct page *" equals one made here.
        if self.target is not None:
            return (self.kind, self.target._key(), self.length)
        rid = self.btf.resolve(self.id)
        if self.kind is Kind.PTR:
            return (Kind.PTR, self.pointee._key(), None)
        if self.kind is Kind.ARRAY:
            return (Kind.ARRAY, self.pointee._key(), self.array_length)
        return (rid,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Type) and self.btf is other.btf and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return _type_name(self, "")

    def __repr__(self) -> str:
        return f"Type({str(self)!r})"


def _member_cache(btf: BTF) -> dict[tuple[int, str], tuple[int, int, Type]]:
    """Member lookups of one BTF, dropped with it: (aggregate type id, name) -> (bit, width,
    type)."""
    cache = btf.derived.get("members")
    if cache is None:
        cache = btf.derived["members"] = {}
    return cache


def _bitfield(btf: BTF, m: Member, bit: int) -> tuple[int, int]:
    """(bit offset, width) of a member; width 0 for a member that is not a bitfield."""
    if m.bitfield_size:
        return bit, m.bitfield_size
    t = btf.type(btf.resolve(m.type_id))
    if t.kind is Kind.INT and (t.bits_offset or t.bits != 8 * (t.size or 0)):
        # kind_flag 0: the int type itself says which bits of its storage the member uses.
        return bit + t.bits_offset, t.bits
    return bit, 0


def _type_name(t: Type, inner: str) -> str:
    """C's spelling of ``t`` around a declarator ``inner`` (``char *[4]``, ``int (*)[3]``)."""
    if t.target is not None:
        if t.kind is Kind.PTR:
            return _type_name(t.target, "*" + inner)
        return _type_name(t.target, _array(inner, t.length or 0))
    bt = t.btf.type(t.id) if t.id else None
    if bt is None:
        return _join("void", inner)
    if bt.kind is Kind.PTR:
        return _type_name(Type(t.btf, bt.ref or 0), "*" + inner)
    if bt.kind is Kind.ARRAY:
        return _type_name(Type(t.btf, bt.elem_type), _array(inner, bt.nelems))
    if bt.kind in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG):
        return _type_name(Type(t.btf, bt.ref or 0), inner)
    if bt.kind is Kind.FUNC:
        return _type_name(Type(t.btf, bt.ref or 0), inner)
    if bt.kind is Kind.FUNC_PROTO:
        params = ", ".join(str(Type(t.btf, p.type_id)) if p.type_id else "..." for p in bt.params)
        ret = _type_name(Type(t.btf, bt.ref or 0), "")
        return f"{ret} ({inner})({params or 'void'})" if inner else f"{ret} ({params or 'void'})"
    prefix = {
        Kind.STRUCT: "struct ",
        Kind.UNION: "union ",
        Kind.ENUM: "enum ",
        Kind.ENUM64: "enum ",
        Kind.FWD: "union " if bt.kind_flag else "struct ",
    }.get(bt.kind, "")
    return _join(prefix + (bt.name or "(anonymous)"), inner)


def _array(inner: str, length: int) -> str:
    return f"({inner})[{length}]" if inner.startswith("*") else f"{inner}[{length}]"


def _join(base: str, inner: str) -> str:
    if not inner:
        return base
    return f"{base} {inner}"


_DECL = re.compile(r"^(.*?)\s*((?:\*\s*)*)((?:\[\s*\d*\s*\])*)\s*$")


def parse_type(btf: BTF, spelling: str) -> Type:
    """A :class:`Type` from its C spelling: ``struct task_struct``, ``char *``,
    ``unsigned long [8192]``, ``struct pglist_data *[]`` (an unknown length is 0), ``pid_t``.

    :raises ObjectError: the base type is not in BTF, or the spelling is not understood.
    """
    m = _DECL.match(spelling.strip())
    if m is None or not m.group(1):
        raise ObjectError(f"cannot read the type {spelling!r}")
    base, stars, dims = m.group(1).strip(), m.group(2), m.group(3)
    base = re.sub(r"\b(const|volatile)\b", "", base).strip()
    base = " ".join(base.split())
    t = Type(btf, _base_id(btf, base))
    for _ in range(stars.count("*")):
        t = Type.pointer_to(t)
    lengths = [int(n) if n.strip() else 0 for n in re.findall(r"\[\s*(\d*)\s*\]", dims)]
    for n in reversed(lengths):
        t = Type.array_of(t, n)
    return t


_KIND_WORDS = {
    "struct": (Kind.STRUCT,),
    "union": (Kind.UNION,),
    "enum": (Kind.ENUM, Kind.ENUM64),
}
# C spellings of integer types and the names BTF gives them (as pahole writes them).
_INT_ALIASES = {
    "unsigned": "unsigned int",
    "unsigned long": "long unsigned int",
    "unsigned long long": "long long unsigned int",
    "long": "long int",
    "long long": "long long int",
    "unsigned short": "short unsigned int",
    "short": "short int",
    "signed char": "signed char",
}


def _base_id(btf: BTF, base: str) -> int:
    if base == "void":
        return 0
    word, _, name = base.partition(" ")
    kinds = _KIND_WORDS.get(word)
    if kinds is not None:
        for tid in btf.find_all(name):
            if btf.kind(tid) in kinds:
                return tid
        for tid in btf.find_all(name):  # only declared, never defined
            if btf.kind(tid) is Kind.FWD:
                return tid
        raise ObjectError(f"BTF has no {word} {name}")
    for candidate in (base, _INT_ALIASES.get(base)):
        if candidate is None:
            continue
        for tid in btf.find_all(candidate):
            if btf.kind(tid) in (Kind.TYPEDEF, Kind.INT, Kind.FLOAT):
                return tid
    raise ObjectError(f"BTF has no type named {base!r}")


# -- objects ----------------------------------------------------------------------------------


class Object:
    """A typed object in kernel virtual memory, read lazily.

    :param kernel: the kernel whose memory holds it.
    :param type: its type.
    :param address: its virtual address.
    :param bit_offset: for a bitfield, the bit (from ``address``) its value starts at.
    :param bit_size: for a bitfield, its width in bits; 0 for anything else.
    """

    __slots__ = ("_bit_offset", "_bit_size", "_kernel", "_type", "address")

    def __init__(
        self, kernel: Kernel, type: Type, address: int, bit_offset: int = 0, bit_size: int = 0
    ) -> None:
        self._kernel = kernel
        self._type = type
        #: The object's virtual address (of the byte holding its first bit, for a bitfield).
        self.address = address
        self._bit_offset = bit_offset
        self._bit_size = bit_size

    # -- what it is --------------------------------------------------------------------------

    @property
    def type(self) -> Type:
        """The object's type; ``str(obj.type)`` spells it as C does."""
        return self._type

    @property
    def kernel(self) -> Kernel:
        return self._kernel

    def __repr__(self) -> str:
        bits = f", bits {self._bit_offset}:{self._bit_size}" if self._bit_size else ""
        return f"Object({str(self._type)!r}, {self.address:#x}{bits})"

    def __eq__(self, other: object) -> bool:
        """Two objects are equal when they are the same place of the same type."""
        if not isinstance(other, Object):
            return NotImplemented
        return (
            self.address == other.address
            and self._bit_offset == other._bit_offset
            and self._bit_size == other._bit_size
            and self._type == other._type
        )

    def __hash__(self) -> int:
        return hash((self.address, self._bit_offset, self._type))

    # -- members and elements ----------------------------------------------------------------

    def _aggregate(self) -> Object:
        """Self for a struct or union; the pointee for a pointer to one (C's ``->``)."""
        r = self._type.resolved()
        if r.kind in _AGGREGATES:
            return self
        if r.kind is Kind.PTR and r.pointee.resolved().kind in _AGGREGATES:
            return self.deref()
        raise ObjectError(f"{self._type} has no members")

    def member(self, name: str) -> Object:
        """The member ``name`` (``obj.name`` and ``obj["name"]`` mean the same); a path
        ``"a.b.c"`` is followed member by member, through pointers as ``->`` does.

        :raises ObjectError: no such member.
        """
        obj = self
        for part in name.split("."):
            base = obj._aggregate()
            r = base._type.resolved()
            bit, width, mtype = r.member(part)
            obj = Object(base._kernel, mtype, base.address + bit // 8, bit % 8, width)
            if not width and bit % 8:
                raise ObjectError(f"member {part!r} of {r} is not byte-aligned")
        return obj

    def __getattr__(self, name: str) -> Object:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.member(name)
        except ObjectError as exc:
            raise AttributeError(str(exc)) from None

    def __getitem__(self, key: int | str) -> Object:
        """``obj["member"]``, or element ``obj[i]`` of an array (bounds-checked) or of the
        memory a pointer points to (not bounds-checked, as in C)."""
        if isinstance(key, str):
            return self.member(key)
        if not isinstance(key, int):
            raise TypeError(f"index must be an int or a member name, not {type(key).__name__}")
        r = self._type.resolved()
        if r.kind is Kind.ARRAY:
            n = r.array_length
            if n and not 0 <= key < n:  # a flexible array (length 0) is not checked
                raise IndexError(f"index {key} out of range for {self._type}")
            elem = r.pointee
            return Object(self._kernel, elem, self.address + key * elem.size)
        if r.kind is Kind.PTR:
            elem = r.pointee
            return Object(self._kernel, elem, self.value() + key * elem.size)
        raise ObjectError(f"{self._type} cannot be indexed")

    def __len__(self) -> int:
        r = self._type.resolved()
        if r.kind is not Kind.ARRAY:
            raise TypeError(f"{self._type} has no length")
        return r.array_length

    def __iter__(self) -> Iterator[Object]:
        """The elements of an array."""
        for i in range(len(self)):
            yield self[i]

    def deref(self) -> Object:
        """``*ptr``: the object a pointer points to (its address is the pointer's value).

        :raises ObjectError: not a pointer.
        """
        r = self._type.resolved()
        if r.kind is not Kind.PTR:
            raise ObjectError(f"{self._type} is not a pointer")
        return Object(self._kernel, r.pointee, self.value())

    def address_of(self) -> Object:
        """``&obj``: a pointer object (without an address of its own) to this one."""
        return Value(self._kernel, Type.pointer_to(self._type), self.address)

    def cast(self, type: str | Type) -> Object:
        """The same place read as another type (``(struct foo *)obj`` reinterprets a pointer's
        value, anything else reinterprets the bytes at the object's address)."""
        t = self._kernel.type(type) if isinstance(type, str) else type
        if t.resolved().kind is Kind.PTR and self._type.resolved().kind in (Kind.PTR, Kind.INT):
            return Value(self._kernel, t, self.value())
        return Object(self._kernel, t, self.address)

    def container_of(self, type: str | Type, member: str) -> Object:
        """``container_of(ptr, type, member)``: see :func:`container_of`."""
        return container_of(self, type, member)

    # -- values ------------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        """The object's bytes (``sizeof`` of its type), read now."""
        return self._kernel.read_virt(self.address, self._type.size)

    def value(self) -> Any:
        """The object's value, read now: an int for integers, enums, pointers and bitfields;
        bool, float; ``bytes`` for a char array; a list for other arrays; the parsed struct
        (a construct Container) for a struct or union, the whole of it.
        """
        r = self._type.resolved()
        kind = r.kind
        if self._bit_size:
            return self._read_bitfield(r)
        if kind is Kind.PTR:
            return int.from_bytes(self._kernel.read_virt(self.address, r.size), "little")
        if kind is Kind.INT or kind in _ENUMS:
            return self._read_int(r)
        if kind is Kind.FLOAT:
            fmt = _FLOAT_FORMATS.get(r.size)
            if fmt is None:
                return self.read_bytes()
            return struct.unpack("<" + fmt, self.read_bytes())[0]
        if kind is Kind.ARRAY:
            elem = r.pointee
            if elem.is_char():
                return self.read_bytes()
            n = r.array_length
            if n > MAX_ARRAY_VALUES:
                raise ObjectError(f"{self._type} has too many elements to read at once")
            return [self[i].value() for i in range(n)]
        if kind in _AGGREGATES:
            from collector.kernel.constructs import construct_for, parse_struct

            return parse_struct(construct_for(r.btf, r.id), self.read_bytes())
        raise ObjectError(f"{self._type} has no value")

    def _read_int(self, r: Type) -> int | bool:
        size, signed, is_bool = r.int_format()
        v = int.from_bytes(self._kernel.read_virt(self.address, size), "little", signed=signed)
        return bool(v) if is_bool else v

    def _read_bitfield(self, r: Type) -> int:
        first = self._bit_offset
        nbytes = (first + self._bit_size + 7) // 8
        raw = int.from_bytes(self._kernel.read_virt(self.address, nbytes), "little")
        v = (raw >> first) & ((1 << self._bit_size) - 1)
        if (r.kind in _ENUMS or r.kind is Kind.INT) and r._bt.signed and v >> (self._bit_size - 1):
            v -= 1 << self._bit_size
        return v

    def __int__(self) -> int:
        v = self.value()
        if isinstance(v, bool | int):
            return int(v)
        raise ObjectError(f"{self._type} is not an integer")

    __index__ = __int__

    def __bool__(self) -> bool:
        """False for a null pointer or a zero integer; True for anything else."""
        r = self._type.resolved()
        if r.kind is Kind.PTR or r.kind is Kind.INT or r.kind in _ENUMS or self._bit_size:
            return bool(self.value())
        return True

    def is_null(self) -> bool:
        """Whether a pointer is NULL."""
        return self._type.resolved().kind is Kind.PTR and self.value() == 0

    def enumerator(self) -> str | None:
        """The name of an enum's value (``"PIDTYPE_PID"``), or None when no enumerator has it."""
        r = self._type.resolved()
        if r.kind not in _ENUMS:
            raise ObjectError(f"{self._type} is not an enum")
        v = self.value()
        for name, value in r.enumerators():
            if value == v:
                return name
        return None

    def string(self, max_len: int = DEFAULT_STRING_MAX) -> bytes:
        """A NUL-terminated string: the characters of a char array (up to its NUL or its end),
        or those a ``char *`` points to (up to the NUL or ``max_len`` bytes).

        :raises ObjectError: neither a char array nor a char pointer.
        """
        r = self._type.resolved()
        if r.kind is Kind.ARRAY and r.pointee.is_char():
            if r.array_length == 0:  # a flexible char name[]: it runs to its NUL
                return self._kernel.read_cstring(self.address, max_len)
            data = self._kernel.read_virt(self.address, min(r.size, max_len))
            nul = data.find(b"\0")
            return data if nul < 0 else data[:nul]
        if r.kind is Kind.PTR and (r.pointee.is_char() or r.pointee.id == 0):
            return self._kernel.read_cstring(self.value(), max_len)
        raise ObjectError(f"{self._type} is not a string")

    def text(self, max_len: int = DEFAULT_STRING_MAX) -> str:
        """:meth:`string` decoded as UTF-8, bytes that are not shown as ``\\xNN``."""
        return self.string(max_len).decode("utf-8", "backslashreplace")


class Value(Object):
    """A value with no place in memory, such as ``&obj`` or a pointer made by a cast."""

    __slots__ = ("_value",)

    def __init__(self, kernel: Kernel, type: Type, value: int) -> None:
        super().__init__(kernel, type, 0)
        self._value = value

    def value(self) -> Any:
        return self._value

    def read_bytes(self) -> bytes:
        return (self._value & (1 << 8 * self._type.size) - 1).to_bytes(self._type.size, "little")

    def __repr__(self) -> str:
        return f"Value({str(self._type)!r}, {self._value:#x})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Value):
            return NotImplemented
        return self._value == other._value and self._type == other._type

    def __hash__(self) -> int:
        return hash((self._value, self._type))


def container_of(obj: Object, type: str | Type, member: str) -> Object:
    """``container_of(ptr, type, member)`` (include/linux/container_of.h): the ``type`` that
    holds ``obj`` as its member ``member``.

    :param obj: a pointer to the member (its value is the member's address), or the member
        object itself (its address is).
    :param type: the containing type, e.g. ``"struct task_struct"``.
    :param member: the member's name or path, e.g. ``"tasks"``.
    """
    kernel = obj.kernel
    t = kernel.type(type) if isinstance(type, str) else type
    r = obj.type.resolved()
    where = obj.value() if r.kind is Kind.PTR else obj.address
    bit, width, _ = _member_path(t, member)
    if width or bit % 8:
        raise ObjectError(f"container_of through bitfield {member!r} of {t}")
    return Object(kernel, t, (where - bit // 8) & 0xFFFFFFFFFFFFFFFF)


def _member_path(t: Type, path: str) -> tuple[int, int, Type]:
    bit = 0
    width = 0
    cur = t
    for part in path.split("."):
        b, width, cur = cur.resolved().member(part)
        bit += b
    return bit, width, cur
