"""C declarations to BTF: the layout agrees with a struct encoded by hand from the ABI rules,
and the blob parses as BTF."""

from __future__ import annotations

import pytest

from collector.kernel.btf import BTF, Kind
from collector.testing import CDeclError, compile_btf
from collector.testing.btf_encoder import SAMPLE_SIZE, sample

# struct sample of collector.testing.btf_encoder, whose offsets were worked out by hand
# from the x86_64 SysV rules and written into that encoder, in C.
SAMPLE_C = """
struct list_head { struct list_head *next, *prev; };
typedef struct { int counter; } atomic_t;
enum pageflags { PG_locked, PG_lru = 4, PG_high = -16 };
enum signed_e { NEG = -129 };
enum big64 { BIG = 0xFFFFF00000000001 };
enum minus64 { MINUS = -2, PLUS = 3, HUGE_ = 0x100000000 };
typedef const volatile u32 my_u32;
union word_or_bytes { unsigned int word; unsigned char bytes[4]; };
struct sample {
    unsigned long flags;
    union {
        struct list_head lru;
        struct { unsigned long compound_head; unsigned char order; };
    };
    unsigned int a:3; int b:5; unsigned int :4; unsigned int c:20;
    atomic_t _refcount;
    int matrix[2][3];
    char comm[8];
    enum pageflags mode;
    enum signed_e neg;
    enum big64 big;
    enum minus64 minus;
    double ratio;
    _Bool flag;
    short small;
    my_u32 u;
    struct list_head *head;
    unsigned long long e:40; long long f:20;
    union word_or_bytes word;
    unsigned int data[];
};
"""


def test_layout_matches_the_hand_encoded_sample() -> None:
    blob, layout = compile_btf(SAMPLE_C)
    ours = BTF.parse(blob)
    theirs = BTF.parse(sample()[0])
    assert ours.sizeof("sample") == theirs.sizeof("sample") == SAMPLE_SIZE
    assert layout.sizeof("struct sample") == SAMPLE_SIZE
    for member in theirs.members("sample"):
        if member.name:
            assert ours.bit_offsetof("sample", member.name) == theirs.bit_offsetof(
                "sample", member.name
            ), member.name
    for path in ("lru.next", "compound_head", "order", "_refcount.counter", "word.bytes[2]"):
        assert ours.offsetof("sample", path) == theirs.offsetof("sample", path), path
        assert layout.offsetof("struct sample", path) == theirs.offsetof("sample", path), path
    assert ours.enum_value("minus64", "MINUS") == -2
    assert ours.kind(ours.find("big64")) is Kind.ENUM64
    assert ours.enum_value("big64", "BIG") == 0xFFFFF00000000001


def test_per_cpu_variables_are_vars_in_the_percpu_section() -> None:
    blob, _ = compile_btf("struct rq { int nr_running; };\nDEFINE_PER_CPU(struct rq, runqueues);")
    btf = BTF.parse(blob)
    (var,) = [t for t in btf.types() if t.kind is Kind.VAR]
    (sec,) = [t for t in btf.types() if t.kind is Kind.DATASEC]
    assert (var.name, btf.type(var.ref).name, sec.name) == ("runqueues", "rq", ".data..percpu")
    assert [s.type_id for s in sec.secinfos] == [var.id]


@pytest.mark.parametrize(
    "text, message",
    [
        ("struct a { struct nosuch x; };", "incomplete type"),
        ("struct a { nosuch_t x; };", "unknown type"),
        ("struct a { int x }", "expected ;"),
        ("struct a { long double x; };", "unknown base type"),
        ("struct a { int x; }; struct a { int y; };", "defined twice"),
        ("struct a { char x:9; };", "wider than its type"),
    ],
)
def test_what_it_does_not_understand_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(CDeclError, match=message):
        compile_btf(text)
