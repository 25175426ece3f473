"""Symbol tables: /proc/kallsyms text, VMCOREINFO, and kallsyms decoded from memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import ImageError, NotApplicable
from collector.kernel.kallsyms_decode import decode_kallsyms
from collector.kernel.symbols import KallsymsHidden, Symbol, SymbolNotFound, SymbolTable
from collector.kernel.vmcoreinfo import VmcoreInfo
from tests.kernel import kallsyms_layout

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
0000000000001000 A cpu_debug_store
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000010 t secondary_startup_64
ffffffff81001000 T do_one_initcall
ffffffff82a0a000 D init_top_pgt
ffffffff82c01c80 D init_task
ffffffff82c01c80 d local_alias
ffffffffc0a01000 t ext4_fill_super\t[ext4]
ffffffffc0a02000 T init_task\t[fake]
garbage line that is not a symbol
ffffffffzzzzzzzz T bad_hex
"""


def test_from_kallsyms_text_lookups():
    table = SymbolTable.from_kallsyms_text(KALLSYMS)
    assert table.source == "kallsyms text"
    assert len(table) == 11
    assert table.lookup("_stext") == 0xFFFFFFFF81000000
    assert table.get("init_top_pgt") == 0xFFFFFFFF82A0A000
    # The core kernel's symbol wins over a module's of the same name.
    assert table.lookup("init_task") == 0xFFFFFFFF82C01C80
    assert table.symbol("ext4_fill_super") == Symbol(
        "ext4_fill_super", 0xFFFFFFFFC0A01000, "t", "ext4"
    )
    assert table.get("bad_hex") is None
    assert "do_one_initcall" in table
    assert [s.address for s in table] == sorted(s.address for s in table)


def test_lookup_names_the_missing_symbol():
    table = SymbolTable.from_kallsyms_text(KALLSYMS)
    with pytest.raises(SymbolNotFound, match="'modules'") as info:
        table.lookup("modules")
    assert isinstance(info.value, NotApplicable)
    assert "kallsyms text" in str(info.value)


def test_address_to_symbol():
    table = SymbolTable.from_kallsyms_text(KALLSYMS)
    assert table.address_to_symbol(0xFFFFFFFF81001234) == ("do_one_initcall", 0x234)
    # Two symbols at one address: the first in table order, like get_symbol_pos().
    assert table.address_to_symbol(0xFFFFFFFF81000004) == ("_stext", 4)
    assert table.address_to_symbol(0xFFFFFFFF82C01C90) == ("init_task", 0x10)
    assert table.address_to_symbol(0x10) == ("fixed_percpu_data", 0x10)
    # The direct map lies between per-CPU offsets and the kernel: no symbol there.
    assert table.address_to_symbol(0xFFFF888000000000) is None
    assert table.address_to_symbol(0xFFFFFFFF81000004, max_offset=2) is None
    empty_start = SymbolTable([Symbol("x", 0x100)], "test")
    assert empty_start.address_to_symbol(0xFF) is None


def test_unprivileged_kallsyms_is_recognised():
    text = "0000000000000000 T _stext\n0000000000000000 D init_task\n"
    with pytest.raises(KallsymsHidden, match="without privilege"):
        SymbolTable.from_kallsyms_text(text.encode())
    with pytest.raises(ImageError, match="no symbol line"):
        SymbolTable.from_kallsyms_text("nothing here\n")


def test_from_vmcoreinfo_and_merge():
    info = VmcoreInfo.parse(
        "SYMBOL(init_top_pgt)=ffffffff82a0a000\nSYMBOL(node_data)=ffffffff82e41c40\n"
    )
    vmci = SymbolTable.from_vmcoreinfo(info)
    assert vmci.source == "vmcoreinfo"
    assert vmci.lookup("node_data") == 0xFFFFFFFF82E41C40
    merged = SymbolTable.from_kallsyms_text(KALLSYMS).merged(vmci)
    assert merged.source == "kallsyms text + vmcoreinfo"
    assert len(merged) == 12
    assert merged.lookup("node_data") == 0xFFFFFFFF82E41C40


# -- decoding kallsyms from memory ------------------------------------------------------------

BASE = 0xFFFFFFFF82E00000
BIG = "_RNvMs_NtCs" + "".join(
    f"{chr(97 + i % 26)}{i % 10}{chr(65 + (i * 7) % 26)}" for i in range(150)
)
SYMBOLS = [
    ("fixed_percpu_data", "A", 0x0),
    ("irq_stack_backing_store", "A", 0x1000),
    ("cpu_number", "D", 0x2000C),
    ("_stext", "T", 0xFFFFFFFF81000000),
    ("_text", "T", 0xFFFFFFFF81000000),
    ("startup_64", "T", 0xFFFFFFFF81000000),
    ("secondary_startup_64", "T", 0xFFFFFFFF81000060),
    ("do_one_initcall", "T", 0xFFFFFFFF81001F20),
    ("do_sys_open", "T", 0xFFFFFFFF8137A2B0),
    ("do_sys_openat2", "T", 0xFFFFFFFF8137A140),
    ("page_offset_base", "D", 0xFFFFFFFF8261A918),
    ("vmemmap_base", "D", 0xFFFFFFFF8261A908),
    ("init_task", "D", 0xFFFFFFFF82A0C940),
    ("init_top_pgt", "D", 0xFFFFFFFF82A0A000),
    (BIG, "t", 0xFFFFFFFF81234560),
    ("__per_cpu_end", "D", 0x32000),
]
PERCPU = frozenset({"fixed_percpu_data", "irq_stack_backing_store", "cpu_number", "__per_cpu_end"})


def vmcoreinfo_for(image: kallsyms_layout.KallsymsImage) -> VmcoreInfo:
    return VmcoreInfo.parse("\n".join(image.vmcoreinfo_lines()) + "\n")


def expected_in_table_order(symbols):
    return sorted(((n, t, a) for n, t, a in symbols), key=lambda s: (s[2], symbols.index(s)))


@pytest.mark.parametrize("mode", kallsyms_layout.MODES)
def test_decode_every_address_encoding(mode):
    symbols = SYMBOLS if mode == "absolute_percpu" else SYMBOLS[3:-1]
    image = kallsyms_layout.build(symbols, BASE, mode=mode, percpu=PERCPU)
    # The layout really exercises the two-byte ("big" symbol) token count.
    assert max(image.token_counts) >= 128
    table = decode_kallsyms(image.read, vmcoreinfo_for(image))
    assert table.source == "decoded from memory"
    got = [(s.name, s.type, s.address) for s in table]
    assert got == expected_in_table_order(symbols)
    assert table.lookup("init_top_pgt") == 0xFFFFFFFF82A0A000
    assert table.lookup(BIG) == 0xFFFFFFFF81234560
    assert table.address_to_symbol(0xFFFFFFFF8137A2B4) == ("do_sys_open", 4)
    if mode == "absolute_percpu":
        assert table.lookup("cpu_number") == 0x2000C


def test_decode_via_symbol_table_builder():
    image = kallsyms_layout.build(SYMBOLS[3:-1], BASE, mode="relative")
    table = decode_kallsyms(image.read, vmcoreinfo_for(image))
    assert table.lookup("do_one_initcall") == 0xFFFFFFFF81001F20


def _patched(image, label: str, offset: int, data: bytes):
    buf = bytearray(image.data)
    at = image.addresses[label] - image.base + offset
    buf[at : at + len(data)] = data
    return kallsyms_layout.KallsymsImage(
        image.base, bytes(buf), image.addresses, image.token_counts, image.sorted_symbols
    )


def test_decode_rejects_bad_tables():
    image = kallsyms_layout.build(SYMBOLS[3:-1], BASE, mode="relative")
    info = vmcoreinfo_for(image)
    for count in (0, 10_000_000):
        bad = _patched(image, "kallsyms_num_syms", 0, struct.pack("<I", count))
        with pytest.raises(ImageError, match="kallsyms_num_syms"):
            decode_kallsyms(bad.read, info)
    # A name token that expands to a control character is not a symbol name.
    bad = _patched(image, "kallsyms_names", 1, b"\x00")
    tokens = _patched(bad, "kallsyms_token_table", 0, b"\x01")
    with pytest.raises(ImageError, match="not a symbol name"):
        decode_kallsyms(tokens.read, info)
    # A token count no real name has (0x3fff tokens, two-byte form) is refused up front.
    bad = _patched(image, "kallsyms_names", 0, b"\xff\x7f")
    with pytest.raises(ImageError, match="claims 16383 tokens"):
        decode_kallsyms(bad.read, info)
    # Offsets out of order mean the encoding was misread.
    bad = _patched(image, "kallsyms_offsets", 4, struct.pack("<I", 0x7FFFFFF0))
    with pytest.raises(ImageError, match="out of order"):
        decode_kallsyms(bad.read, info)
    missing = VmcoreInfo.parse(
        "\n".join(line for line in image.vmcoreinfo_lines() if "token_index" not in line)
    )
    with pytest.raises(ImageError, match=r"SYMBOL\(kallsyms_token_index\)"):
        decode_kallsyms(image.read, missing)


def test_decode_unreadable_memory_is_an_image_error():
    image = kallsyms_layout.build(SYMBOLS[3:-1], BASE, mode="relative")

    def read(vaddr, size):
        from collector.memory import Fate, PageNotCaptured

        if vaddr >= image.addresses["kallsyms_names"]:
            raise PageNotCaptured(0x1000, Fate.MISSING)
        return image.read(vaddr, size)

    with pytest.raises(ImageError):
        decode_kallsyms(read, vmcoreinfo_for(image))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(noise=st.binary(min_size=1, max_size=400), at=st.integers(0, 200))
def test_decode_of_corrupted_names_never_crashes(noise, at):
    image = kallsyms_layout.build(SYMBOLS[3:-1], BASE, mode="relative")
    size = image.addresses["kallsyms_markers"] - image.addresses["kallsyms_names"]
    bad = _patched(image, "kallsyms_names", at % size, noise[: size - at % size])
    try:
        table = decode_kallsyms(bad.read, vmcoreinfo_for(image))
    except ImageError:
        return
    assert len(table) == len(image.sorted_symbols)
