"""BTF parsing, lookups, construct definitions and VMCOREINFO cross-checks."""

from __future__ import annotations

import os
import struct
import time

import construct
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import ImageError
from collector.kernel.btf import BTF, Kind, Member, cross_check
from collector.kernel.bulk import dtype_for
from collector.kernel.constructs import (
    CBitField,
    CStruct,
    construct_for,
    parse_struct,
    struct_definition,
)
from collector.testing.btf_encoder import SAMPLE_SIZE, Encoder, info, sample, sample_record

VMLINUX = "/sys/kernel/btf/vmlinux"


def _vmlinux() -> bytes:
    try:
        with open(VMLINUX, "rb") as f:
            return f.read()
    except OSError as e:
        pytest.skip(f"{VMLINUX} is not readable here: {e.strerror}")


@pytest.fixture(scope="module")
def vmlinux() -> BTF:
    return BTF.parse(_vmlinux())


@pytest.fixture(scope="module", params=["<", ">"], ids=["little", "big"])
def both(request: pytest.FixtureRequest) -> tuple[BTF, dict[str, int]]:
    blob, ids = sample(request.param)
    return BTF.parse(blob), ids


@pytest.fixture(scope="module")
def le() -> tuple[BTF, dict[str, int]]:
    blob, ids = sample("<")
    return BTF.parse(blob), ids


# ---------------------------------------------------------------------- header


def _header(blob: bytes, **fields: int) -> bytes:
    names = ["magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len"]
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", blob), strict=True))
    values.update(fields)
    return struct.pack("<HBBIIIII", *(values[n] for n in names)) + blob[24:]


def test_big_and_little_endian_blobs_give_the_same_types() -> None:
    little, big = BTF.parse(sample("<")[0]), BTF.parse(sample(">")[0])
    assert little.endian == "<" and big.endian == ">"
    assert len(little) == len(big) == 49
    assert little.types() == big.types()


def test_longer_header_and_gap_between_sections_are_accepted() -> None:
    enc = Encoder()
    enc.int("int", 4, 1)
    btf = BTF.parse(enc.encode(hdr_len=32, gap=12))
    assert btf.type(1).name == "int" and btf.sizeof("int") == 4


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "too short"),
        (b"\x9f\xeb\x01\x00", "too short"),
        (b"\x00\x00" + bytes(30), "bad magic 0000"),
        (_header(sample()[0], version=2), "unsupported version 2"),
        (_header(sample()[0], hdr_len=16), "header length 16"),
        (_header(sample()[0], hdr_len=1 << 30), "exceeds the blob"),
        (_header(sample()[0], type_len=1 << 31), "type section"),
        (_header(sample()[0], str_len=1 << 31), "string section"),
        (_header(sample()[0], str_off=0), "overlap"),
        (sample()[0][:-1], "string section"),
    ],
)
def test_bad_headers_raise_one_line(blob: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as e:
        BTF.parse(blob)
    assert "\n" not in str(e.value)


def test_strings_must_start_and_end_with_nul() -> None:
    enc = Encoder()
    enc.int("int", 4)
    blob = bytearray(enc.encode())
    blob[-1] = ord("x")
    with pytest.raises(ImageError, match="NUL"):
        BTF.parse(bytes(blob))


def test_truncated_record_unknown_kind_and_bad_name_raise() -> None:
    enc = Encoder()
    enc.raw(0, info("int"), 4)  # no u32 after it: cut short
    with pytest.raises(ImageError, match="type id 1 runs past"):
        BTF.parse(enc.encode())
    enc = Encoder()
    enc.raw(0, 25 << 24, 0)
    with pytest.raises(ImageError, match="type id 1 has unknown kind 25"):
        BTF.parse(enc.encode())
    enc = Encoder()
    enc.raw(0, 0, 0)
    with pytest.raises(ImageError, match="unknown kind 0"):
        BTF.parse(enc.encode())
    enc = Encoder()
    enc.raw(999, info("ptr"), 0)
    with pytest.raises(ImageError, match="name offset 999"):
        BTF.parse(enc.encode())
    enc = Encoder()
    enc.raw(0, info("struct", vlen=0xFFFF), 8)  # 65535 members promised, none present
    with pytest.raises(ImageError, match="runs past"):
        BTF.parse(enc.encode())
    enc = Encoder()
    enc.int("int", 4)
    blob = enc.encode(gap=4)
    # type_len 18: one full INT record and 2 stray bytes
    blob = _header(blob, type_len=18)
    with pytest.raises(ImageError, match="type id 2 is truncated"):
        BTF.parse(blob)


# ---------------------------------------------------------------------- every kind


def test_every_kind_decodes(both: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = both
    t = btf.type(ids["int"])
    assert (t.kind, t.name, t.size, t.bits, t.bits_offset, t.signed) == (
        Kind.INT,
        "int",
        4,
        32,
        0,
        True,
    )
    assert btf.type(ids["bool"]).encoding == 4
    assert btf.type(ids["list_head_ptr"]).ref == ids["list_head"]
    arr = btf.type(ids["row"])
    assert (arr.kind, arr.elem_type, arr.index_type, arr.nelems) == (
        Kind.ARRAY,
        ids["int"],
        ids["uint"],
        3,
    )
    lh = btf.type(ids["list_head"])
    assert lh.kind is Kind.STRUCT and lh.size == 16
    assert lh.members == (
        Member("next", 0, 0, ids["list_head_ptr"]),
        Member("prev", 64, 0, ids["list_head_ptr"]),
    )
    assert btf.type(ids["anon_u1"]).kind is Kind.UNION
    pf = btf.type(ids["pageflags"])
    assert pf.kind is Kind.ENUM and not pf.signed
    assert [(e.name, e.value) for e in pf.enumerators] == [
        ("PG_locked", 0),
        ("PG_lru", 4),
        ("PG_high", 0xFFFFFFF0),
    ]
    assert btf.type(ids["signed_e"]).enumerators[0].value == -129
    assert (
        btf.type(ids["fwd_sample"]).kind is Kind.FWD and not btf.type(ids["fwd_sample"]).kind_flag
    )
    assert btf.type(ids["fwd_union"]).kind_flag
    assert btf.type(ids["u32"]).kind is Kind.TYPEDEF
    assert btf.type(ids["volatile"]).kind is Kind.VOLATILE
    assert btf.type(ids["const"]).kind is Kind.CONST
    assert btf.type(ids["restrict"]).kind is Kind.RESTRICT
    func = btf.type(ids["func"])
    assert (func.kind, func.name, func.ref, func.linkage) == (
        Kind.FUNC,
        "do_thing",
        ids["proto"],
        1,
    )
    proto = btf.type(ids["proto"])
    assert proto.kind is Kind.FUNC_PROTO and proto.ref == ids["int"]
    assert [tuple(p) for p in proto.params] == [("count", ids["int"]), ("", 0)]
    var = btf.type(ids["var"])
    assert (var.kind, var.name, var.ref, var.linkage) == (Kind.VAR, "jiffies", ids["ulong"], 1)
    sec = btf.type(ids["datasec"])
    assert (sec.kind, sec.name, sec.size) == (Kind.DATASEC, ".data..percpu", 8)
    assert [tuple(s) for s in sec.secinfos] == [(ids["var"], 0, 8)]
    assert (btf.type(ids["double"]).kind, btf.type(ids["double"]).size) == (Kind.FLOAT, 8)
    tag = btf.type(ids["decl_tag_member"])
    assert (tag.kind, tag.name, tag.ref, tag.component_idx) == (
        Kind.DECL_TAG,
        "user",
        ids["sample"],
        3,
    )
    assert btf.type(ids["decl_tag_struct"]).component_idx == -1
    tt = btf.type(ids["type_tag"])
    assert (tt.kind, tt.name, tt.ref) == (Kind.TYPE_TAG, "rcu", ids["list_head"])
    big = btf.type(ids["big64"])
    assert big.kind is Kind.ENUM64 and big.size == 8
    assert big.enumerators[0].value == 0xFFFFF00000000001
    assert [e.value for e in btf.type(ids["minus64"]).enumerators] == [-2, 3]
    assert btf.type(0).name == "void"
    with pytest.raises(ImageError, match="type id 50 is out of range"):
        btf.type(50)


def test_kind_flag_zero_bitfields_come_from_the_int_type(le: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = le
    assert btf.bit_offsetof("oldbits", "x") == 0
    assert btf.bit_offsetof("oldbits", "y") == 3
    assert btf.bit_offsetof("oldbits", "z") == 10  # member offset 8 + BTF_INT_OFFSET 2


# ---------------------------------------------------------------------- lookups


def test_find_prefers_complete_types_and_honours_kind(le: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = le
    assert btf.find("sample") == ids["sample"]  # not the FWD that comes first
    assert btf.find("sample", "fwd") == ids["fwd_sample"]
    assert btf.find("dup") == ids["dup_struct"]
    assert btf.find("dup", Kind.TYPEDEF) == ids["dup_typedef"]
    assert btf.find("dup", "typedef") == ids["dup_typedef"]
    with pytest.raises(ImageError, match="no type named 'missing'"):
        btf.find("missing")
    with pytest.raises(ImageError, match="no union type named 'sample'"):
        btf.find("sample", "union")


def _names_both_ways(blob: bytes) -> tuple[BTF, dict[str, list[int]]]:
    """A fresh BTF to look names up in, and the full index of another, built name by name."""
    full = BTF.parse(blob)
    index: dict[str, list[int]] = {}
    for tid in range(1, len(full) + 1):
        name = full.type(tid).name
        if name:
            index.setdefault(name, []).append(tid)
    return BTF.parse(blob), index


@pytest.mark.parametrize("endian", ["<", ">"])
def test_names_are_found_without_decoding_every_name(endian: str) -> None:
    blob, _ = sample(endian)
    btf, index = _names_both_ways(blob)
    for name, ids in index.items():
        assert btf.find_all(name) == ids, name
    assert btf.find_all("missing") == [] and btf.find_all("amp") == []
    assert btf._names is None  # no lookup needed the index of every name


def test_a_name_in_the_middle_of_a_string_is_found_too() -> None:
    # The format lets a name offset point into another string ("page" inside "struct_page"):
    # no writer does that, and then every name is looked up in the full index.
    enc = Encoder()
    u32 = enc.int("unsigned int", 4)
    whole = enc.struct("struct_page", 4, [("x", u32, 0)])
    inner = enc.raw(enc.s("struct_page") + len("struct_"), info("typedef"), whole)
    plain = enc.typedef("page", u32)
    btf, index = _names_both_ways(enc.encode())
    assert index["page"] == [inner, plain]
    assert btf.find_all("page") == [inner, plain]
    assert btf.find_all("struct_page") == [whole]


def test_resolve_sizeof_and_pointer_size(le: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = le
    assert btf.resolve(ids["my_u32"]) == ids["uint"]
    assert btf.resolve(ids["restrict"]) == ids["rcu_ptr"]
    assert btf.resolve(ids["type_tag"]) == ids["list_head"]
    assert btf.sizeof("sample") == SAMPLE_SIZE
    assert btf.sizeof("my_u32") == 4
    assert btf.sizeof("atomic_t") == 4
    assert btf.sizeof(ids["matrix"]) == 24
    assert btf.sizeof(ids["list_head_ptr"]) == 8
    assert btf.sizeof(ids["data"]) == 0
    assert btf.sizeof("pageflags") == 4
    assert btf.pointer_size == 8
    with pytest.raises(ImageError, match="has no size"):
        btf.sizeof(ids["fwd_union"])
    with pytest.raises(ImageError, match="has no size"):
        btf.sizeof("do_thing")


def test_offsetof_reaches_into_anonymous_members(both: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = both
    expected = {
        "flags": 0,
        "lru": 8,
        "lru.prev": 16,
        "compound_head": 8,
        "order": 16,
        "_refcount": 28,
        "_refcount.counter": 28,
        "matrix": 32,
        "matrix[1]": 44,
        "matrix[1][2]": 52,
        "comm": 56,
        "head": 104,
        "word": 120,
        "word.bytes[3]": 123,
        "data": 124,
    }
    assert {path: btf.offsetof("sample", path) for path in expected} == expected
    assert btf.bit_offsetof("sample", "a") == 192
    assert btf.bit_offsetof("sample", "c") == 204
    assert btf.bit_offsetof("sample", "f") == 936
    with pytest.raises(ImageError, match="bitfield"):
        btf.offsetof("sample", "a")
    with pytest.raises(ImageError, match="no member 'nope'"):
        btf.offsetof("sample", "nope")
    with pytest.raises(ValueError, match="bad member path"):
        btf.offsetof("sample", "lru..next")


def test_members_and_has_member(le: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = le
    members = btf.members("sample")
    assert members[0] == Member("flags", 0, 0, ids["ulong"])
    assert members[1] == Member("", 64, 0, ids["anon_u1"])
    assert members[2] == Member("a", 192, 3, ids["uint"])
    assert members[4] == Member("", 200, 4, ids["uint"])
    assert btf.has_member("sample", "compound_head")
    assert btf.has_member("sample", "lru.next")
    assert btf.has_member("sample", "a")
    assert not btf.has_member("sample", "lru.nope")
    assert not btf.has_member("sample", "flags.x")
    assert not btf.has_member("absent", "x")
    assert not btf.has_member("ufwd", "x")


def test_enum_value(le: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = le
    assert btf.enum_value("pageflags", "PG_lru") == 4
    assert btf.enum_value(None, "PG_lru") == 4
    assert btf.enum_value(None, "PG_high") == 0xFFFFFFF0
    assert btf.enum_value(None, "NEG") == -129
    assert btf.enum_value("minus64", "MINUS") == -2
    assert btf.enum_value(None, "BIG") == 0xFFFFF00000000001
    with pytest.raises(ImageError, match="no enumerator 'PG_nope'"):
        btf.enum_value("pageflags", "PG_nope")
    with pytest.raises(ImageError, match="no enum named 'nope'"):
        btf.enum_value("nope", "PG_lru")
    with pytest.raises(ImageError, match="no enumerator named 'PG_nope'"):
        btf.enum_value(None, "PG_nope")


def test_reference_cycles_are_errors_not_hangs() -> None:
    enc = Encoder()
    enc.typedef("a", 2)
    enc.const(1)
    enc.array(4, 2)  # [3] array of [4]
    enc.array(3, 2)  # [4] array of [3]
    enc.int("int", 4, 1)
    enc.struct("selfish", 4, [("me", 6, 0)])  # [6] contains itself by value
    btf = BTF.parse(enc.encode())
    with pytest.raises(ImageError, match="cyclic"):
        btf.resolve(1)
    with pytest.raises(ImageError, match="cyclic"):
        btf.sizeof(3)
    with pytest.raises(ImageError, match="contains itself"):
        struct_definition(btf, "selfish")
    enc = Encoder()
    enc.typedef("dangling", 99)
    with pytest.raises(ImageError, match="type id 99 is out of range"):
        BTF.parse(enc.encode()).sizeof("dangling")


def test_anonymous_member_cycle_and_duplicates_are_errors() -> None:
    enc = Encoder()
    enc.int("int", 4, 1)
    enc.struct("loop", 4, [("", 2, 0)])  # [2] anonymous member of its own type
    enc.struct("twice", 4, [("x", 1, 0), ("x", 1, 0)])
    btf = BTF.parse(enc.encode())
    with pytest.raises(ImageError, match="cycle"):
        btf.has_member("loop", "x")
    with pytest.raises(ImageError, match="two members named 'x'"):
        btf.offsetof("twice", "x")
    with pytest.raises(ImageError, match="two members named 'x'"):
        struct_definition(btf, "twice")


# ---------------------------------------------------------------------- construct


def test_sample_struct_parses_every_feature(both: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = both
    data, v = sample_record(btf.endian)
    p = struct_definition(btf, "sample").parse(data)
    assert p.flags == v["flags"]
    assert (p.lru.next, p.lru.prev) == (v["next"], v["prev"])
    assert p.compound_head == v["next"]  # same bytes as lru.next: a union
    assert p.order == (0xAB if btf.endian == "<" else 0xFF)  # first byte of lru.prev
    assert (p.a, p.b, p.c) == (v["a"], v["b"], v["c"])
    assert "" not in p  # the unnamed :4 is padding
    assert p._refcount.counter == v["counter"]
    assert p.matrix == v["matrix"]
    assert p.comm == v["comm"]
    assert (p.mode, p.neg, p.big, p.minus) == (v["mode"], v["neg"], v["big"], v["minus"])
    assert p.ratio == v["ratio"]
    assert (p.flag, p.small, p.u, p.head) == (v["flag"], v["small"], v["u"], v["head"])
    assert (p.e, p.f) == (v["e"], v["f"])
    assert p.word.word == v["word"]
    expected_bytes = list(struct.pack(btf.endian + "I", v["word"]))
    assert p.word.bytes == expected_bytes
    assert p.data == []


def test_bitfield_storage_units_follow_the_declared_type(le: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = le
    s = struct_definition(btf, "sample")
    assert s.field("a") == CBitField("a", 24, 4, 0, 3, False)
    assert s.field("b") == CBitField("b", 24, 4, 3, 5, True)
    assert s.field("f") == CBitField("f", 112, 8, 40, 20, True)
    old = struct_definition(btf, "oldbits").parse(struct.pack("<I", 0b1011_00_10110_101))
    assert (old.x, old.y, old.z) == (0b101, -10, 0b1011)


def test_packed_bitfield_straddling_its_unit() -> None:
    btf = BTF.parse(sample("<")[0])
    packed = struct_definition(btf, "packed3")
    # p = 0xABC at bit 6, q = 0x9 at bit 18, in a 3-byte little-endian window
    raw = (0xABC << 6 | 0x9 << 18).to_bytes(3, "little")
    p = packed.parse(raw)
    assert (p.p, p.q) == (0xABC, 0x9)
    assert packed.field("p").storage == 3


def test_build_round_trips(both: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = both
    s = struct_definition(btf, "sample")
    data, _ = sample_record(btf.endian, salt=3)
    parsed = s.parse(data)
    rebuilt = s.build(parsed)
    # the :4 padding bits are not a field, so they come back zero
    pad = bytearray(data)
    if btf.endian == "<":
        pad[25] &= 0xF0
    else:
        pad[25] &= 0x0F
    assert rebuilt == bytes(pad)
    assert s.build({"flags": 1}) == struct.pack(btf.endian + "Q", 1) + bytes(SAMPLE_SIZE - 8)


def test_parse_struct_checks_bounds(le: tuple[BTF, dict[str, int]]) -> None:
    btf, _ = le
    s = struct_definition(btf, "sample")
    data, v = sample_record()
    assert parse_struct(s, b"\0" * 8 + data, 8).flags == v["flags"]
    assert parse_struct(s, memoryview(data)).flags == v["flags"]
    with pytest.raises(ImageError, match="sample: needs 128 bytes at offset 1, only 127 available"):
        parse_struct(s, data, 1)
    with pytest.raises(ImageError, match="needs 128 bytes"):
        parse_struct(s, data, -1)
    with pytest.raises(construct.StreamError):
        s.parse(data[:-1])
    assert parse_struct(construct_for(btf, btf.find("pageflags")), b"\x04\0\0\0") == 4
    with pytest.raises(ImageError, match="needs 4 bytes"):
        parse_struct(construct_for(btf, btf.find("pageflags")), b"\x04")


def test_struct_definitions_are_cached_and_composable(le: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = le
    assert struct_definition(btf, "sample") is struct_definition(btf, "sample")
    assert construct_for(btf, ids["atomic_t"]) is construct_for(btf, ids["atomic_body"])
    assert struct_definition(btf, "atomic_t") is construct_for(btf, ids["atomic_body"])
    lh = struct_definition(btf, "list_head")
    pair = construct.Struct("a" / lh, "n" / construct.Int8ul)
    parsed = pair.parse(struct.pack("<QQB", 1, 2, 3))
    assert (parsed.a.next, parsed.a.prev, parsed.n) == (1, 2, 3)
    assert construct.Array(2, lh).parse(struct.pack("<4Q", 1, 2, 3, 4))[1].prev == 4
    with pytest.raises(ImageError, match="no struct/union named 'pageflags'"):
        struct_definition(btf, "pageflags")
    with pytest.raises(ImageError, match="has no layout"):
        construct_for(btf, ids["fwd_union"])


def test_member_outside_its_struct_is_an_error() -> None:
    enc = Encoder()
    enc.int("long", 8, 1)
    enc.struct("tight", 4, [("x", 1, 0)])
    with pytest.raises(ImageError, match=r"member .x. of struct tight .* lies outside its 4 bytes"):
        struct_definition(BTF.parse(enc.encode()), "tight")


def test_zero_size_amplification_is_refused() -> None:
    enc = Encoder()
    enc.struct("empty", 0, [])
    enc.array(1, 1 << 30)
    enc.struct("huge", 0, [("many", 2, 0)])
    btf = BTF.parse(enc.encode())
    with pytest.raises(ImageError, match="more than"):
        struct_definition(btf, "huge")


# ---------------------------------------------------------------------- VMCOREINFO


def test_cross_check_against_synthetic_vmcoreinfo(le: tuple[BTF, dict[str, int]]) -> None:
    btf, ids = le
    entries = {
        "OSRELEASE": 0,
        "SIZE(sample)": 128,
        "SIZE(list_head)": 16,
        "OFFSET(list_head.next)": 0,
        "OFFSET(sample.compound_head)": 8,
        "OFFSET(sample._refcount)": 28,
        "OFFSET(sample.lru)": 16,  # wrong on purpose
        "SIZE(atomic_t)": 8,  # wrong on purpose
        "LENGTH(sample.comm)": 8,
        "LENGTH(sample.matrix)": 3,  # wrong: 2 rows
        "LENGTH(node_data)": 64,  # a variable: not checked
        "SYMBOL(swapper_pg_dir)": 0xFFFFFFFF82000000,
        "NUMBER(PG_lru)": 4,
        "SIZE(folio)": 64,
        "OFFSET(sample.mapping)": 24,
        "OFFSET(sample.lru..x)": 0,
        "OFFSET(sample.a)": 24,  # a bitfield has no byte offset
        "SIZE(ufwd)": 8,  # declared only
    }
    result = cross_check(btf, entries)
    assert list(result) == [
        "OFFSET(sample.lru): VMCOREINFO says 16, BTF says 8",
        "SIZE(atomic_t): VMCOREINFO says 8, BTF says 4",
        "LENGTH(sample.matrix): VMCOREINFO says 3, BTF says 2",
        "OFFSET(sample.a): VMCOREINFO says 24, BTF: sample.a is a bitfield and has no byte offset",
        f"SIZE(ufwd): VMCOREINFO says 8, BTF: type id {ids['fwd_union']} (fwd ufwd) has no size",
    ]
    assert result.missing == [
        "SIZE(folio): BTF has no type 'folio'",
        "OFFSET(sample.mapping): BTF has no member sample.mapping",
        "OFFSET(sample.lru..x): not a member path",
    ]
    wrong = {
        "OFFSET(sample.lru)",
        "SIZE(atomic_t)",
        "LENGTH(sample.matrix)",
        "SIZE(folio)",
        "OFFSET(sample.mapping)",
        "OFFSET(sample.lru..x)",
        "OFFSET(sample.a)",
        "SIZE(ufwd)",
    }
    agree = {k: v for k, v in entries.items() if k not in wrong}
    clean = cross_check(btf, agree)
    assert clean == [] and clean.missing == []


# ---------------------------------------------------------------------- hostile input


def _exercise(blob: bytes) -> None:
    """Everything a plugin might do with a blob must end in a result or an ImageError."""
    try:
        btf = BTF.parse(blob)
    except ImageError:
        return
    for tid in range(len(btf) + 1):
        try:
            t = btf.type(tid)
            btf.resolve(tid)
            if t.name:
                btf.find(t.name)
            for e in t.enumerators:
                btf.enum_value(None, e.name)
            btf.sizeof(tid)
            if t.kind in (Kind.STRUCT, Kind.UNION):
                for m in btf.members(tid):
                    if m.name.isidentifier():
                        btf.has_member(tid, m.name)
                defn = construct_for(btf, tid)
                if defn.sizeof() <= 4096:
                    parse_struct(defn, bytes(range(256)) * 16)
                    dtype_for(defn)
        except ImageError as e:
            assert "\n" not in str(e)


_VALID = sample("<")[0]


@settings(
    max_examples=300, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(st.integers(0, len(_VALID) * 8 - 1), min_size=1, max_size=8))
def test_bit_flips_give_btf_or_image_error(bits: list[int]) -> None:
    blob = bytearray(_VALID)
    for bit in bits:
        blob[bit // 8] ^= 1 << (bit % 8)
    _exercise(bytes(blob))


@settings(max_examples=150, deadline=2000, database=None)
@given(st.integers(0, len(_VALID)))
def test_truncations_give_btf_or_image_error(length: int) -> None:
    _exercise(_VALID[:length])


@settings(max_examples=200, deadline=2000, database=None)
@given(st.binary(max_size=2048), st.booleans())
def test_random_bytes_give_btf_or_image_error(tail: bytes, with_header: bool) -> None:
    if with_header:  # get past the magic and header checks into the type section
        strings = b"\0abc\0"
        types = tail[: len(tail) // 4 * 4]
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
        blob = header + types + strings
    else:
        blob = tail
    _exercise(blob)


@settings(max_examples=100, deadline=2000, database=None)
@given(
    st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=40)
)
def test_crafted_records_give_btf_or_image_error(words: list[tuple[int, int]]) -> None:
    """Records with plausible kinds and small type ids, to reach the deeper code."""
    enc = Encoder()
    enc.s("x")
    for kind_word, value in words:
        kind = kind_word % 20
        vlen = (kind_word >> 5) % 4
        kflag = (kind_word >> 7) & 1
        small = value % (len(words) + 2)
        extra = b"".join(
            enc.u32(1, (value >> 3) % (len(words) + 2), (value >> 8) % 256) for _ in range(vlen)
        )
        if kind in (1, 14, 17):
            extra = enc.u32(value)
        elif kind == 3:
            extra = enc.u32(small, 1, value % 5)
        elif kind in (6, 13):
            extra = b"".join(enc.u32(1, value) for _ in range(vlen))
        enc.raw(
            1, (kflag << 31) | (kind << 24) | vlen, small if kind not in (1, 4, 5) else value % 17
        )
        enc.records[-1] += extra
    _exercise(enc.encode())


# ---------------------------------------------------------------------- the real kernel


def test_real_vmlinux_parses_and_answers(vmlinux: BTF) -> None:
    start = time.perf_counter()
    BTF.parse(_vmlinux())
    elapsed = time.perf_counter() - start
    print(f"parsed {VMLINUX} ({len(vmlinux)} types) in {elapsed:.3f} s")
    # Facts of every x86_64 kernel: struct list_head is two pointers, TASK_COMM_LEN is 16,
    # enum pid_type starts with PIDTYPE_PID = 0 then PIDTYPE_TGID = 1.
    assert vmlinux.sizeof("list_head") == 16
    assert vmlinux.offsetof("list_head", "prev") == 8
    assert vmlinux.enum_value(None, "TASK_COMM_LEN") == 16
    assert vmlinux.enum_value("pid_type", "PIDTYPE_TGID") == 1
    assert vmlinux.pointer_size == 8
    task = struct_definition(vmlinux, "task_struct")
    assert task.size == vmlinux.sizeof("task_struct")
    assert task.field("comm") == (
        "comm",
        vmlinux.offsetof("task_struct", "comm"),
        task.field("comm").subcon,
    )
    assert isinstance(task.field("comm").subcon, construct.Bytes)
    record = bytearray(task.size)
    off = vmlinux.offsetof("task_struct", "comm")
    record[off : off + 16] = b"swapper/0".ljust(16, b"\0")
    assert parse_struct(task, record).comm == b"swapper/0".ljust(16, b"\0")


def test_real_struct_page_matches_vmcoreinfo(vmlinux: BTF) -> None:
    # VMCOREINFO of a Debian 6.1 kernel. include/linux/mm_types.h keeps these
    # members at the same places through 6.18: flags, a 40-byte union of lru/compound_head/
    # mapping/private, the _mapcount/page_type union, then _refcount.
    vmcoreinfo = {
        "SIZE(page)": 64,
        "OFFSET(page.flags)": 0,
        "OFFSET(page._refcount)": 52,
        "OFFSET(page.mapping)": 24,
        "OFFSET(page.lru)": 8,
        "OFFSET(page._mapcount)": 48,
        "OFFSET(page.private)": 40,
        "OFFSET(page.compound_head)": 8,
        "OFFSET(list_head.next)": 0,
        "OFFSET(list_head.prev)": 8,
    }
    result = cross_check(vmlinux, vmcoreinfo)
    assert result == [] and result.missing == []


def test_every_real_struct_builds(vmlinux: BTF) -> None:
    built = 0
    for tid in range(1, len(vmlinux) + 1):
        if vmlinux.kind(tid) in (Kind.STRUCT, Kind.UNION):
            defn = construct_for(vmlinux, tid)
            assert isinstance(defn, CStruct) and defn.size == vmlinux.sizeof(tid)
            built += 1
    assert built > 1000
    # parse a sample of them from arbitrary bytes: never an exception
    noise = os.urandom(1 << 17)
    for tid in range(1, len(vmlinux) + 1, 97):
        if vmlinux.kind(tid) in (Kind.STRUCT, Kind.UNION) and vmlinux.sizeof(tid) <= len(noise):
            parse_struct(construct_for(vmlinux, tid), noise)
