"""C declarations to BTF, for synthetic kernels in tests.

Parses a small subset of C (struct, union, enum and typedef definitions, pointers, arrays,
bitfields, anonymous members, function pointers, and ``DEFINE_PER_CPU(type, name);``, which
BTF records as a VAR in the ``.data..percpu`` section as kernel BTF does) and lays the types out as the x86_64 SysV
ABI does (natural alignment; a bitfield shares its declared type's storage unit unless it
would straddle it). :func:`compile_btf` returns a raw BTF blob (include/uapi/linux/btf.h)
that :class:`collector.kernel.btf.BTF` parses, and a :class:`Layout` that tells where each
member lies, so a test can write values into memory without repeating offsets by hand::

    blob, layout = compile_btf('''
        struct list_head { struct list_head *next, *prev; };
        struct task_struct { int pid; char comm[16]; struct list_head tasks; };
    ''')
    layout.offsetof("struct task_struct", "tasks.next")   # 24
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from collector.testing.btf_encoder import INT_BOOL, INT_CHAR, INT_SIGNED, info

#: Integer typedefs every description may use without declaring them (include/linux/types.h).
PRELUDE = """
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;
typedef unsigned long long u64; typedef signed char s8; typedef short s16; typedef int s32;
typedef long long s64; typedef _Bool bool; typedef unsigned long size_t;
typedef long long loff_t; typedef int pid_t; typedef unsigned int uid_t; typedef unsigned int gid_t;
typedef unsigned long long phys_addr_t; typedef unsigned long pgoff_t;
"""

# C spelling (words sorted) -> (BTF name, size, encoding).
_BASE = {
    ("char",): ("char", 1, INT_SIGNED | INT_CHAR),
    ("char", "signed"): ("signed char", 1, INT_SIGNED),
    ("char", "unsigned"): ("unsigned char", 1, 0),
    ("short",): ("short int", 2, INT_SIGNED),
    ("int", "short"): ("short int", 2, INT_SIGNED),
    ("short", "unsigned"): ("short unsigned int", 2, 0),
    ("int", "short", "unsigned"): ("short unsigned int", 2, 0),
    ("int",): ("int", 4, INT_SIGNED),
    ("signed",): ("int", 4, INT_SIGNED),
    ("int", "signed"): ("int", 4, INT_SIGNED),
    ("unsigned",): ("unsigned int", 4, 0),
    ("int", "unsigned"): ("unsigned int", 4, 0),
    ("long",): ("long int", 8, INT_SIGNED),
    ("int", "long"): ("long int", 8, INT_SIGNED),
    ("long", "unsigned"): ("long unsigned int", 8, 0),
    ("int", "long", "unsigned"): ("long unsigned int", 8, 0),
    ("long", "long"): ("long long int", 8, INT_SIGNED),
    ("int", "long", "long"): ("long long int", 8, INT_SIGNED),
    ("long", "long", "unsigned"): ("long long unsigned int", 8, 0),
    ("int", "long", "long", "unsigned"): ("long long unsigned int", 8, 0),
    ("_Bool",): ("_Bool", 1, INT_BOOL),
}
_FLOATS = {("float",): 4, ("double",): 8}
_BASE_WORDS = {"char", "short", "int", "long", "signed", "unsigned", "_Bool", "float", "double"}
_QUALIFIERS = {"const", "volatile", "static", "extern", "__rcu", "__user", "__percpu"}
_TOKEN = re.compile(r"\s*(?:(//[^\n]*|/\*.*?\*/)|([A-Za-z_]\w*)|(0x[0-9a-fA-F]+|\d+)|(\S))", re.S)


class CDeclError(ValueError):
    """The description is not C this parser understands; the message says where."""


# -- the type model ---------------------------------------------------------------------------


@dataclass(eq=False)
class CType:
    """One C type. ``kind``: int, float, void, pointer, array, struct, union, enum, typedef, func."""

    kind: str
    name: str = ""
    size: int = 0
    align: int = 1
    encoding: int = 0
    target: CType | None = None  # pointer, array, typedef
    length: int = 0  # array
    members: list[CMember] = field(default_factory=list)
    enumerators: list[tuple[str, int]] = field(default_factory=list)
    complete: bool = True
    btf_id: int = 0

    def resolved(self) -> CType:
        t = self
        while t.kind == "typedef":
            assert t.target is not None
            t = t.target
        return t


@dataclass(eq=False)
class CMember:
    """A member: ``name`` ('' for anonymous), its type, bit offset and bitfield width (0: none)."""

    name: str
    type: CType
    bit_offset: int = 0
    bits: int = 0


# -- parsing ----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, types: dict[str, CType]) -> None:
        self.types = types  # "struct x", "union x", "enum x", typedef names
        self.tokens: list[str] = []
        self.pos = 0
        self.anonymous: list[CType] = []
        self.percpu: list[tuple[str, CType]] = []

    def parse(self, text: str) -> None:
        self.tokens = [
            m.group(2) or m.group(3) or m.group(4)
            for m in _TOKEN.finditer(text)
            if not m.group(1) and (m.group(2) or m.group(3) or m.group(4))
        ]
        self.pos = 0
        while self.pos < len(self.tokens):
            self.declaration()

    # tokens
    def peek(self, k: int = 0) -> str | None:
        i = self.pos + k
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self, expect: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expect is not None and tok != expect):
            context = " ".join(self.tokens[max(0, self.pos - 6) : self.pos + 1])
            raise CDeclError(f"expected {expect or 'more'} near {context!r}, got {tok!r}")
        self.pos += 1
        return tok

    def number(self) -> int:
        negative = False
        if self.peek() == "-":
            self.take()
            negative = True
        tok = self.take()
        try:
            value = int(tok, 0)
        except ValueError:
            raise CDeclError(f"expected a number, got {tok!r}") from None
        return -value if negative else value

    # declarations
    def declaration(self) -> None:
        if self.peek() == ";":
            self.take()
            return
        if self.peek() == "DEFINE_PER_CPU":  # a per-CPU variable: BTF types these
            self.take()
            self.take("(")
            base = self.type_spec()
            while self.peek() == "*":
                self.take()
                base = CType("pointer", target=base, size=8, align=8)
            self.take(",")
            name = self.take()
            self.take(")")
            self.take(";")
            self.percpu.append((name, base))
            return
        if self.peek() == "typedef":
            self.take()
            base = self.type_spec()
            while True:
                name, t, _bits = self.declarator(base)
                self.types[name] = CType("typedef", name, target=t)
                if self.peek() != ",":
                    break
                self.take(",")
            self.take(";")
            return
        self.type_spec()
        self.take(";")

    def type_spec(self) -> CType:
        while self.peek() in _QUALIFIERS:
            self.take()
        tok = self.peek()
        if tok in ("struct", "union"):
            return self.aggregate()
        if tok == "enum":
            return self.enum()
        words = []
        while self.peek() in _BASE_WORDS or (self.peek() in _QUALIFIERS and words):
            w = self.take()
            if w not in _QUALIFIERS:
                words.append(w)
        if words:
            key = tuple(sorted(words))
            if key in _FLOATS:
                return self.types.setdefault(
                    f"float {key}", CType("float", " ".join(words), _FLOATS[key], _FLOATS[key])
                )
            if key not in _BASE:
                raise CDeclError(f"unknown base type {' '.join(words)!r}")
            name, size, enc = _BASE[key]
            return self.types.setdefault(f"int {name}", CType("int", name, size, size, enc))
        name = self.take()
        if name == "void":
            return self.types.setdefault("void", CType("void", "void"))
        if name not in self.types:
            raise CDeclError(f"unknown type {name!r}")
        while self.peek() in _QUALIFIERS:
            self.take()
        return self.types[name]

    def aggregate(self) -> CType:
        kind = self.take()
        name = ""
        if self.peek() not in ("{",):
            name = self.take()
        key = f"{kind} {name}"
        if name:
            t = self.types.get(key)
            if t is None:
                t = self.types[key] = CType(kind, name, complete=False)
        else:
            t = CType(kind, "")
            self.anonymous.append(t)
        if self.peek() == "{":
            if name and t.complete and t.members:
                raise CDeclError(f"{key} is defined twice")
            self.take("{")
            members: list[CMember] = []
            while self.peek() != "}":
                members.extend(self.member_declaration())
            self.take("}")
            while self.peek() in ("__packed", "__aligned"):
                self.take()
            t.members = members
            t.complete = True
            _lay_out(t)
        return t

    def enum(self) -> CType:
        self.take("enum")
        name = self.take() if self.peek() != "{" else ""
        key = f"enum {name}"
        t = self.types.get(key) if name else None
        if t is None:
            t = CType("enum", name, 4, 4)
            if name:
                self.types[key] = t
            else:
                self.anonymous.append(t)
        if self.peek() == "{":
            self.take("{")
            value = 0
            while self.peek() != "}":
                label = self.take()
                if self.peek() == "=":
                    self.take("=")
                    value = self.number()
                t.enumerators.append((label, value))
                value += 1
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
            if any(v < 0 for _n, v in t.enumerators):
                t.encoding = INT_SIGNED
            if any(v >= 1 << 32 or v < -(1 << 31) for _n, v in t.enumerators):
                t.size = t.align = 8
        return t

    def member_declaration(self) -> list[CMember]:
        base = self.type_spec()
        if self.peek() == ";":  # an anonymous struct or union
            self.take(";")
            if base.kind not in ("struct", "union") or base.name:
                raise CDeclError("a member needs a name")
            return [CMember("", base)]
        out = []
        while True:
            name, t, bits = self.declarator(base)
            out.append(CMember(name, t, bits=bits))
            if self.peek() != ",":
                break
            self.take(",")
        self.take(";")
        return out

    def dimensions(self, t: CType) -> CType:
        """``t`` made an array by any ``[N]`` that follow (``[]``: length 0)."""
        dims = []
        while self.peek() == "[":
            self.take("[")
            dims.append(0 if self.peek() == "]" else self.number())
            self.take("]")
        for n in reversed(dims):
            t = CType("array", target=t, length=n)
            elem = t.target.resolved() if t.target else t
            t.size, t.align = n * elem.size, elem.align
        return t

    def declarator(self, base: CType) -> tuple[str, CType, int]:
        t = base
        while self.peek() in ("*", "const", "volatile", "__rcu", "__percpu", "__user"):
            if self.take() == "*":
                t = CType("pointer", target=t, size=8, align=8)
        if self.peek() == "(":  # (*name)[N]: a pointer to an array; (*name)(...): a function
            self.take("(")
            self.take("*")
            name = self.take()
            self.take(")")
            if self.peek() == "[":
                return name, CType("pointer", target=self.dimensions(t), size=8, align=8), 0
            depth = 0
            while True:
                tok = self.take()
                depth += tok == "("
                depth -= tok == ")"
                if depth == 0:
                    break
            func = CType("func", name)
            return name, CType("pointer", target=func, size=8, align=8), 0
        name = "" if self.peek() == ":" else self.take()
        t = self.dimensions(t)
        bits = 0
        if self.peek() == ":":
            self.take(":")
            bits = self.number()
        return name, t, bits


def _lay_out(t: CType) -> None:
    """Give each member of a struct or union its bit offset, and the aggregate its size."""
    bit = 0
    align = 1
    end = 0
    for m in t.members:
        mt = m.type.resolved()
        if not mt.complete or (mt.kind in ("struct", "union") and not mt.size and mt.members):
            raise CDeclError(f"member {m.name!r} of {t.kind} {t.name}: incomplete type")
        a = mt.align or 1
        align = max(align, a)
        if t.kind == "union":
            m.bit_offset = 0
            end = max(end, m.bits or 8 * mt.size)
            continue
        if m.bits:
            unit = 8 * mt.size
            if m.bits > unit:
                raise CDeclError(f"bitfield {m.name!r} is wider than its type")
            if bit // unit != (bit + m.bits - 1) // unit:
                bit = -(-bit // unit) * unit
            m.bit_offset = bit
            bit += m.bits
        else:
            bit = -(-bit // (8 * a)) * 8 * a
            m.bit_offset = bit
            bit += 8 * mt.size
        end = bit
    t.align = align
    nbytes = -(-end // 8)
    t.size = -(-nbytes // align) * align


# -- BTF --------------------------------------------------------------------------------------


class _Emitter:
    """Writes each CType once as BTF records, ids in order of first use."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self._offsets: dict[str, int] = {"": 0}
        self.records: list[bytes | None] = []
        self._ptrs: dict[int, int] = {}

    def s(self, text: str) -> int:
        if text not in self._offsets:
            self._offsets[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self._offsets[text]

    def record(
        self,
        tid: int,
        name: str,
        kind: str,
        st: int,
        extra: bytes = b"",
        vlen: int = 0,
        kflag: int = 0,
    ) -> None:
        self.records[tid - 1] = (
            struct.pack("<III", self.s(name), info(kind, vlen, kflag), st) + extra
        )

    def id(self, t: CType) -> int:
        if t.kind == "void":
            return 0
        if t.btf_id:
            return t.btf_id
        self.records.append(None)
        t.btf_id = tid = len(self.records)
        if t.kind == "int":
            bits = 8 * t.size
            self.record(tid, t.name, "int", t.size, struct.pack("<I", (t.encoding << 24) | bits))
        elif t.kind == "float":
            self.record(tid, t.name, "float", t.size)
        elif t.kind == "pointer":
            assert t.target is not None
            self.record(tid, "", "ptr", self.id(t.target))
        elif t.kind == "func":
            proto = len(self.records) + 1
            self.records.append(struct.pack("<III", 0, info("func_proto", 0), 0))
            self.record(tid, t.name, "func", proto, vlen=1)
        elif t.kind == "typedef":
            assert t.target is not None
            self.record(tid, t.name, "typedef", self.id(t.target))
        elif t.kind == "array":
            assert t.target is not None
            elem = self.id(t.target)
            index = self.id(CType("int", "unsigned int", 4, 4))
            self.record(tid, "", "array", 0, struct.pack("<III", elem, index, t.length))
        elif t.kind == "enum":
            if t.size == 8:
                extra = b"".join(
                    struct.pack("<III", self.s(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF)
                    for n, v in t.enumerators
                )
                kind = "enum64"
            else:
                extra = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in t.enumerators)
                kind = "enum"
            signed = int(bool(t.encoding & INT_SIGNED))
            self.record(tid, t.name, kind, t.size, extra, len(t.enumerators), signed)
        elif t.kind in ("struct", "union"):
            if not t.complete:
                self.record(tid, t.name, "fwd", 0, kflag=int(t.kind == "union"))
                return tid
            kflag = int(any(m.bits for m in t.members))
            extra = b""
            for m in t.members:
                offset = (m.bits << 24) | m.bit_offset if kflag else m.bit_offset
                extra += struct.pack("<III", self.s(m.name), self.id(m.type), offset)
            self.record(tid, t.name, t.kind, t.size, extra, len(t.members), kflag)
        else:
            raise CDeclError(f"cannot encode a {t.kind}")
        return tid

    def percpu(self, variables: list[tuple[str, CType]]) -> None:
        """A VAR for each per-CPU variable and the ``.data..percpu`` DATASEC holding them."""
        if not variables:
            return
        entries = []
        offset = 0
        for name, t in variables:
            type_id = self.id(t)
            self.records.append(
                struct.pack("<III", self.s(name), info("var"), type_id) + struct.pack("<I", 1)
            )
            entries.append(struct.pack("<III", len(self.records), offset, t.resolved().size))
            offset += t.resolved().size
        self.records.append(
            struct.pack("<III", self.s(".data..percpu"), info("datasec", len(entries)), offset)
            + b"".join(entries)
        )

    def blob(self) -> bytes:
        types = b"".join(r or b"" for r in self.records)
        strings = bytes(self.strings)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
        return header + types + strings


@dataclass
class Layout:
    """Where each member lies, as :func:`compile_btf` laid the types out."""

    types: dict[str, CType]

    def type(self, name: str) -> CType:
        """A type by its C name: ``"struct task_struct"``, ``"pid_t"``, ``"int"``."""
        t = self.types.get(name) or self.types.get(f"int {name}")
        if t is None:
            raise KeyError(f"no type {name!r} in the description")
        return t

    def sizeof(self, name: str) -> int:
        return self.type(name).resolved().size

    def member(self, type_name: str, path: str) -> tuple[int, CMember]:
        """``(bit offset, member)`` of a member path (``"a.b[2].c"``; anonymous members are
        transparent) from the start of ``type_name``."""
        t = self.type(type_name).resolved()
        bit = 0
        found: CMember | None = None
        for part in path.split("."):
            name, *indexes = part.replace("]", "").split("[")
            hit = _find_member(t, name)
            if hit is None:
                raise KeyError(f"{type_name} has no member {path!r}")
            offset, found = hit
            bit += offset
            t = found.type.resolved()
            for index in indexes:
                assert t.kind == "array" and t.target is not None
                t = t.target.resolved()
                bit += 8 * int(index, 0) * t.size
        assert found is not None
        return bit, found

    def offsetof(self, type_name: str, path: str) -> int:
        bit, member = self.member(type_name, path)
        if member.bits or bit % 8:
            raise KeyError(f"{type_name}.{path} is a bitfield")
        return bit // 8


def _find_member(t: CType, name: str) -> tuple[int, CMember] | None:
    for m in t.members:
        if m.name == name:
            return m.bit_offset, m
        if not m.name:
            inner = _find_member(m.type.resolved(), name)
            if inner is not None:
                return m.bit_offset + inner[0], inner[1]
    return None


def compile_btf(source: str, prelude: bool = True) -> tuple[bytes, Layout]:
    """Parse C declarations and return ``(BTF blob, layout)``.

    Every type named in ``source`` is encoded, in order, even if nothing refers to it.

    :raises CDeclError: the text is not C this parser understands.
    """
    types: dict[str, CType] = {}
    # Every base type is in the BTF, as in a kernel's, used or not.
    for name, size, enc in _BASE.values():
        types.setdefault(f"int {name}", CType("int", name, size, size, enc))
    parser = _Parser(types)
    if prelude:
        parser.parse(PRELUDE)
    parser.parse(source)
    emitter = _Emitter()
    for t in list(types.values()):
        emitter.id(t)
    emitter.percpu(parser.percpu)
    return emitter.blob(), Layout(types)
