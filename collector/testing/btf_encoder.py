"""A small BTF encoder for tests, following Documentation/bpf/btf.rst (not the parser).

Each method appends one type record and returns its type id (ids start at 1; 0 is void).
A referenced id may be one not added yet, as in real BTF (a struct pointing to itself).
"""

from __future__ import annotations

import struct

KIND = {
    "int": 1,
    "ptr": 2,
    "array": 3,
    "struct": 4,
    "union": 5,
    "enum": 6,
    "fwd": 7,
    "typedef": 8,
    "volatile": 9,
    "const": 10,
    "restrict": 11,
    "func": 12,
    "func_proto": 13,
    "var": 14,
    "datasec": 15,
    "float": 16,
    "decl_tag": 17,
    "type_tag": 18,
    "enum64": 19,
}
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4


def info(kind: str, vlen: int = 0, kind_flag: int = 0) -> int:
    """btf_type.info: vlen in bits 0-15, kind in bits 24-28, kind_flag in bit 31."""
    return (kind_flag << 31) | (KIND[kind] << 24) | (vlen & 0xFFFF)


class Encoder:
    """Builds a raw BTF blob of either byte order."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.strings = bytearray(b"\0")
        self._offsets: dict[str, int] = {"": 0}
        self.records: list[bytes] = []

    @property
    def next_id(self) -> int:
        return len(self.records) + 1

    def s(self, text: str) -> int:
        """Offset of ``text`` in the string section, adding it once."""
        if text not in self._offsets:
            self._offsets[text] = len(self.strings)
            self.strings += text.encode() + b"\0"
        return self._offsets[text]

    def u32(self, *values: int) -> bytes:
        return struct.pack(f"{self.e}{len(values)}I", *(v & 0xFFFFFFFF for v in values))

    def raw(self, name_off: int, info_word: int, size_or_type: int, extra: bytes = b"") -> int:
        """Append a record exactly as given (for crafted input)."""
        self.records.append(self.u32(name_off, info_word, size_or_type) + extra)
        return len(self.records)

    def add(
        self,
        name: str,
        kind: str,
        size_or_type: int,
        extra: bytes = b"",
        vlen: int = 0,
        kind_flag: int = 0,
    ) -> int:
        return self.raw(self.s(name), info(kind, vlen, kind_flag), size_or_type, extra)

    # one method per kind, in btf.rst order -------------------------------------------

    def int(
        self, name: str, size: int, encoding: int = 0, bits: int | None = None, offset: int = 0
    ) -> int:
        nbits = 8 * size if bits is None else bits
        return self.add(name, "int", size, self.u32((encoding << 24) | (offset << 16) | nbits))

    def ptr(self, target: int) -> int:
        return self.add("", "ptr", target)

    def array(self, elem: int, nelems: int, index: int = 0) -> int:
        return self.add("", "array", 0, self.u32(elem, index, nelems))

    def _aggregate(
        self, kind: str, name: str, size: int, members: list[tuple], kind_flag: int
    ) -> int:
        extra = b""
        for m in members:
            m_name, m_type, bit_offset = m[:3]
            bitfield_size = m[3] if len(m) > 3 else 0
            offset = (bitfield_size << 24) | bit_offset if kind_flag else bit_offset
            extra += self.u32(self.s(m_name), m_type, offset)
        return self.add(name, kind, size, extra, vlen=len(members), kind_flag=kind_flag)

    def struct(self, name: str, size: int, members: list[tuple], kind_flag: int = 0) -> int:
        """members: (name, type id, bit offset[, bitfield size when kind_flag is 1])."""
        return self._aggregate("struct", name, size, members, kind_flag)

    def union(self, name: str, size: int, members: list[tuple], kind_flag: int = 0) -> int:
        return self._aggregate("union", name, size, members, kind_flag)

    def enum(
        self, name: str, values: list[tuple[str, int]], size: int = 4, signed: bool = False
    ) -> int:
        extra = b"".join(self.u32(self.s(n)) + struct.pack(self.e + "i", v) for n, v in values)
        return self.add(name, "enum", size, extra, vlen=len(values), kind_flag=int(signed))

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add(name, "fwd", 0, kind_flag=int(union))

    def typedef(self, name: str, target: int) -> int:
        return self.add(name, "typedef", target)

    def volatile(self, target: int) -> int:
        return self.add("", "volatile", target)

    def const(self, target: int) -> int:
        return self.add("", "const", target)

    def restrict(self, target: int) -> int:
        return self.add("", "restrict", target)

    def func(self, name: str, proto: int, linkage: int = 1) -> int:
        return self.add(name, "func", proto, vlen=linkage)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(self.u32(self.s(n), t) for n, t in params)
        return self.add("", "func_proto", ret, extra, vlen=len(params))

    def var(self, name: str, type_id: int, linkage: int = 1) -> int:
        return self.add(name, "var", type_id, self.u32(linkage))

    def datasec(self, name: str, size: int, entries: list[tuple[int, int, int]]) -> int:
        extra = b"".join(self.u32(*entry) for entry in entries)
        return self.add(name, "datasec", size, extra, vlen=len(entries))

    def float(self, name: str, size: int) -> int:
        return self.add(name, "float", size)

    def decl_tag(self, name: str, target: int, component_idx: int = -1) -> int:
        return self.add(name, "decl_tag", target, struct.pack(self.e + "i", component_idx))

    def type_tag(self, name: str, target: int) -> int:
        return self.add(name, "type_tag", target)

    def enum64(
        self, name: str, values: list[tuple[str, int]], size: int = 8, signed: bool = False
    ) -> int:
        extra = b"".join(
            self.u32(self.s(n), v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF) for n, v in values
        )
        return self.add(name, "enum64", size, extra, vlen=len(values), kind_flag=int(signed))

    # the blob ------------------------------------------------------------------------

    def encode(self, hdr_len: int = 24, version: int = 1, gap: int = 0) -> bytes:
        """struct btf_header, then the type section, ``gap`` zero bytes, the string section."""
        types = b"".join(self.records)
        strings = bytes(self.strings)
        header = struct.pack(
            self.e + "HBBIIIII",
            0xEB9F,
            version,
            0,
            hdr_len,
            0,
            len(types),
            len(types) + gap,
            len(strings),
        )
        header += bytes(hdr_len - len(header))
        return header + types + bytes(gap) + strings


# ---------------------------------------------------------------------- the shared sample

SAMPLE_SIZE = 128


def sample(endian: str = "<") -> tuple[bytes, dict[str, int]]:
    """A blob with every kind and a struct exercising each layout feature.

    struct sample (kind_flag 1, 128 bytes), offsets in bytes unless marked as bits::

        0    unsigned long flags
        8    union {                                   (anonymous, 16 bytes)
                 struct list_head lru;
                 struct { unsigned long compound_head; unsigned char order; };
             }
        24   unsigned int a:3 (bit 192); int b:5 (bit 195); unsigned int :4 (bit 200);
             unsigned int c:20 (bit 204)
        28   atomic_t _refcount                        (typedef of struct { int counter; })
        32   int matrix[2][3]                          (chained arrays)
        56   char comm[8]
        64   enum pageflags mode                       (unsigned)
        68   enum signed_e neg                         (signed)
        72   enum big64 big                            (ENUM64, unsigned)
        80   enum minus64 minus                        (ENUM64, signed)
        88   double ratio
        96   _Bool flag
        98   short int small
        100  my_u32 u                                  (typedef -> const -> volatile -> typedef)
        104  struct list_head *head
        112  unsigned long long e:40 (bit 896); long long int f:20 (bit 936)
        120  union word_or_bytes word                  { unsigned int word; unsigned char bytes[4]; }
        124  unsigned int data[]                       (flexible, zero length)

    Also: struct oldbits (kind_flag 0, bitfields in int types), struct packed3 (a bitfield that
    straddles its declared unit), a FWD named ``sample`` before the struct, struct and typedef
    both named ``dup``, and FUNC/FUNC_PROTO/VAR/DATASEC/DECL_TAG/TYPE_TAG/FWD/RESTRICT/FLOAT.
    """
    enc = Encoder(endian)
    ids: dict[str, int] = {}
    ids["uint"] = enc.int("unsigned int", 4)
    ids["int"] = enc.int("int", 4, INT_SIGNED)
    ids["ulong"] = enc.int("long unsigned int", 8)
    ids["char"] = enc.int("char", 1)
    ids["bool"] = enc.int("_Bool", 1, INT_BOOL)
    ids["short"] = enc.int("short int", 2, INT_SIGNED)
    ids["llong"] = enc.int("long long int", 8, INT_SIGNED)
    ids["ullong"] = enc.int("long long unsigned int", 8)
    ids["uchar"] = enc.int("unsigned char", 1)
    ids["double"] = enc.float("double", 8)
    ids["fwd_sample"] = enc.fwd("sample")
    lh = enc.next_id
    ids["list_head"] = enc.struct("list_head", 16, [("next", lh + 1, 0), ("prev", lh + 1, 64)])
    ids["list_head_ptr"] = enc.ptr(lh)
    ids["anon_s1"] = enc.struct(
        "", 16, [("compound_head", ids["ulong"], 0), ("order", ids["uchar"], 64)]
    )
    ids["anon_u1"] = enc.union("", 16, [("lru", lh, 0), ("", ids["anon_s1"], 0)])
    ids["atomic_body"] = enc.struct("", 4, [("counter", ids["int"], 0)])
    ids["atomic_t"] = enc.typedef("atomic_t", ids["atomic_body"])
    ids["row"] = enc.array(ids["int"], 3, ids["uint"])
    ids["matrix"] = enc.array(ids["row"], 2, ids["uint"])
    ids["comm"] = enc.array(ids["char"], 8, ids["uint"])
    ids["pageflags"] = enc.enum("pageflags", [("PG_locked", 0), ("PG_lru", 4), ("PG_high", -16)])
    ids["signed_e"] = enc.enum("signed_e", [("NEG", -129)], signed=True)
    ids["big64"] = enc.enum64("big64", [("BIG", 0xFFFFF00000000001)])
    ids["minus64"] = enc.enum64("minus64", [("MINUS", -2), ("PLUS", 3)], signed=True)
    ids["u32"] = enc.typedef("u32", ids["uint"])
    ids["volatile"] = enc.volatile(ids["u32"])
    ids["const"] = enc.const(ids["volatile"])
    ids["my_u32"] = enc.typedef("my_u32", ids["const"])
    ids["bytes4"] = enc.array(ids["uchar"], 4, ids["uint"])
    ids["word_or_bytes"] = enc.union(
        "word_or_bytes", 4, [("word", ids["uint"], 0), ("bytes", ids["bytes4"], 0)]
    )
    ids["data"] = enc.array(ids["uint"], 0, ids["uint"])
    ids["sample"] = enc.struct(
        "sample",
        SAMPLE_SIZE,
        [
            ("flags", ids["ulong"], 0, 0),
            ("", ids["anon_u1"], 64, 0),
            ("a", ids["uint"], 192, 3),
            ("b", ids["int"], 195, 5),
            ("", ids["uint"], 200, 4),
            ("c", ids["uint"], 204, 20),
            ("_refcount", ids["atomic_t"], 224, 0),
            ("matrix", ids["matrix"], 256, 0),
            ("comm", ids["comm"], 448, 0),
            ("mode", ids["pageflags"], 512, 0),
            ("neg", ids["signed_e"], 544, 0),
            ("big", ids["big64"], 576, 0),
            ("minus", ids["minus64"], 640, 0),
            ("ratio", ids["double"], 704, 0),
            ("flag", ids["bool"], 768, 0),
            ("small", ids["short"], 784, 0),
            ("u", ids["my_u32"], 800, 0),
            ("head", ids["list_head_ptr"], 832, 0),
            ("e", ids["ullong"], 896, 40),
            ("f", ids["llong"], 936, 20),
            ("word", ids["word_or_bytes"], 960, 0),
            ("data", ids["data"], 992, 0),
        ],
        kind_flag=1,
    )
    # kind_flag 0: the int type carries the bitfield (BTF_INT_BITS, BTF_INT_OFFSET).
    ids["bits3"] = enc.int("unsigned int", 4, bits=3)
    ids["bits5s"] = enc.int("int", 4, INT_SIGNED, bits=5)
    ids["bits4o2"] = enc.int("unsigned int", 4, bits=4, offset=2)
    ids["oldbits"] = enc.struct(
        "oldbits", 4, [("x", ids["bits3"], 0), ("y", ids["bits5s"], 3), ("z", ids["bits4o2"], 8)]
    )
    ids["packed3"] = enc.struct(
        "packed3", 3, [("p", ids["uint"], 6, 12), ("q", ids["uchar"], 18, 4)], kind_flag=1
    )
    ids["dup_struct"] = enc.struct("dup", 4, [("x", ids["int"], 0)])
    ids["dup_typedef"] = enc.typedef("dup", ids["int"])
    ids["fwd_union"] = enc.fwd("ufwd", union=True)
    ids["proto"] = enc.func_proto(ids["int"], [("count", ids["int"]), ("", 0)])
    ids["func"] = enc.func("do_thing", ids["proto"], linkage=1)
    ids["var"] = enc.var("jiffies", ids["ulong"], linkage=1)
    ids["datasec"] = enc.datasec(".data..percpu", 8, [(ids["var"], 0, 8)])
    ids["decl_tag_member"] = enc.decl_tag("user", ids["sample"], 3)
    ids["decl_tag_struct"] = enc.decl_tag("aligned", ids["sample"])
    ids["type_tag"] = enc.type_tag("rcu", ids["list_head"])
    ids["rcu_ptr"] = enc.ptr(ids["type_tag"])
    ids["restrict"] = enc.restrict(ids["rcu_ptr"])
    return enc.encode(), ids


def sample_record(endian: str = "<", salt: int = 0) -> tuple[bytes, dict]:
    """The bytes of one struct sample, packed by hand at the offsets in its docstring."""
    e = endian
    buf = bytearray(SAMPLE_SIZE)
    v = {
        "flags": 0x1122334455667788 + salt,
        "next": 0xFFFF888000001000 + 16 * salt,
        "prev": 0xFFFF8880000020AB + 256 * salt,
        "a": (5 + salt) % 8,
        "b": -3 + salt % 4,
        "c": 0xABCDE - salt,
        "counter": -7 - salt,
        "matrix": [[1, -2, 3 + salt], [4, 5, -6]],
        "comm": b"init" + bytes([48 + salt % 10]) + b"\0\0\0",
        "mode": 0xFFFFFFF0,
        "neg": -129,
        "big": 0xFFFFF00000000001,
        "minus": -2,
        "ratio": 2.5 + salt,
        "flag": salt % 2,
        "small": -300 + salt,
        "u": 0xDEADBEEF,
        "head": 0xFFFF888000003000,
        "e": 0x123456789A + salt,
        "f": -5 - salt,
        "word": 0x04030201 + salt,
    }
    struct.pack_into(e + "QQQ", buf, 0, v["flags"], v["next"], v["prev"])
    if e == "<":
        unit = v["a"] | (v["b"] & 0x1F) << 3 | 0xF << 8 | v["c"] << 12  # :4 padding set to ones
        unit64 = v["e"] | (v["f"] & 0xFFFFF) << 40
    else:  # big-endian bit numbering starts at the most significant bit
        unit = v["a"] << 29 | (v["b"] & 0x1F) << 24 | 0xF << 20 | v["c"]
        unit64 = v["e"] << 24 | (v["f"] & 0xFFFFF) << 4
    struct.pack_into(e + "Ii", buf, 24, unit, v["counter"])
    struct.pack_into(e + "6i", buf, 32, *v["matrix"][0], *v["matrix"][1])
    buf[56:64] = v["comm"]
    struct.pack_into(e + "IiQqd", buf, 64, v["mode"], v["neg"], v["big"], v["minus"], v["ratio"])
    struct.pack_into(
        e + "BxhIQQI", buf, 96, v["flag"], v["small"], v["u"], v["head"], unit64, v["word"]
    )
    return bytes(buf), v
