"""/proc/iomem parsing and range selection, on real iomem files and hand-made ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.acquire.iomem import (
    Range,
    apply_user_ranges,
    is_unprivileged_view,
    parse_iomem,
    parse_range,
    system_ram,
    walk,
)
from collector.errors import CollectorError

DATA = Path(__file__).parent.parent / "data" / "acquire"


def read(name: str) -> str:
    return (DATA / name).read_text()


# -- real files -------------------------------------------------------------------------


def test_this_machine_as_root():
    roots = parse_iomem(read("iomem-firecracker-6.18.txt"))
    assert [(r.start, r.end, r.name) for r in roots][:3] == [
        (0x0, 0xFFF, "Reserved"),
        (0x1000, 0x9FBFF, "System RAM"),
        (0x9FC00, 0xFFFFF, "Reserved"),
    ]
    assert len(list(walk(roots))) == 27  # one resource per line of the file
    assert system_ram(roots) == [
        Range(0x1000, 0x9FC00),
        Range(0x100000, 0xC0000000),
        Range(0x100000000, 0x640000000),
    ]
    assert not is_unprivileged_view(roots)


def test_this_machine_nesting():
    roots = parse_iomem(read("iomem-firecracker-6.18.txt"))
    by_line = {r.line: r for r in walk(roots)}
    code = by_line[7]
    assert (code.name, code.depth, code.start, code.end) == ("Kernel code", 1, 0x1000000, 0x220BB07)
    assert code.parent is by_line[6] and by_line[6].name == "System RAM"
    ecam_bus = by_line[14]
    assert ecam_bus.depth == 2 and ecam_bus.parent is by_line[13]
    assert ecam_bus.parent.parent is by_line[12]
    virtio = by_line[19]
    assert (virtio.name, virtio.start, virtio.end) == (
        "virtio-pci-modern",
        0x4000000000,
        0x400007FFFF,
    )
    assert [c.name for c in by_line[17].children] == [
        "0000:00:01.0",
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:00:05.0",
    ]


def test_this_machine_without_privileges():
    roots = parse_iomem(read("iomem-firecracker-6.18-unprivileged.txt"))
    assert is_unprivileged_view(roots)
    with pytest.raises(CollectorError, match="CAP_SYS_ADMIN"):
        system_ram(roots)


@pytest.mark.parametrize(
    "name",
    ["iomem-debian-6.1-qemu-512m.txt", "iomem-debian-6.12-qemu-512m.txt"],
)
def test_debian_guests(name):
    roots = parse_iomem(read(name))
    ram = system_ram(roots)
    # A Debian 6.1 guest showed "00001000-0009fbff : System RAM", then RAM from 1 MiB to 0x1ffdffff.
    assert ram == [Range(0x1000, 0x9FC00), Range(0x100000, 0x1FFE0000)]
    assert [r.display() for r in ram] == ["0x1000-0x9fbff", "0x100000-0x1ffdffff"]
    assert ram[0].last == 0x9FBFF
    tops = [r.name for r in roots]
    assert tops[-2:] == ["PCI Bus 0000:00", "Reserved"]
    assert roots[-1].start == 0xFD00000000 and roots[-1].end == 0xFFFFFFFFFF


# -- hand-made layouts ------------------------------------------------------------------


def test_nested_system_ram_is_found_where_it_is():
    text = (
        "00001000-0009efff : System RAM\n"
        "00100000-3fffffff : System RAM\n"
        "  01000000-01ffffff : Kernel code\n"
        "180000000-1bfffffff : Soft Reserved\n"
        "  180000000-1bfffffff : dax0.0\n"
        "    180000000-1bfffffff : System RAM (kmem)\n"
        "10000000000-1007fffffff : virtio0\n"
        "  10000000000-1003fffffff : System RAM (virtio_mem)\n"
        "  10040000000-1007fffffff : Reserved\n"
    )
    ram = system_ram(parse_iomem(text))
    assert ram == [
        Range(0x1000, 0x9F000),
        Range(0x100000, 0x40000000),
        Range(0x180000000, 0x1C0000000),
        Range(0x10000000000, 0x10040000000),
    ]
    assert [r.name for r in ram] == [
        "System RAM",
        "System RAM",
        "System RAM (kmem)",
        "System RAM (virtio_mem)",
    ]


def test_ram_inside_ram_is_not_counted_twice():
    text = "00100000-3fffffff : System RAM\n  00200000-002fffff : System RAM\n"
    assert system_ram(parse_iomem(text)) == [Range(0x100000, 0x40000000)]


def test_adjacent_ranges_are_not_merged():
    text = "00100000-001fffff : System RAM\n00200000-002fffff : System RAM\n"
    assert system_ram(parse_iomem(text)) == [Range(0x100000, 0x200000), Range(0x200000, 0x300000)]


def test_full_64_bit_addresses_and_sub_page_ranges():
    text = "00000000-000003ff : System RAM\nffffffff00000000-ffffffffffffffff : System RAM\n"
    ram = system_ram(parse_iomem(text))
    assert ram == [Range(0, 0x400), Range(0xFFFFFFFF00000000, 1 << 64)]
    assert ram[1].last == 0xFFFFFFFFFFFFFFFF
    assert ram[1].size == 1 << 32


def test_siblings_at_the_deepest_printed_level():
    # r_show() prints nothing deeper than MAX_IORES_LEVEL (5): deeper resources show up as
    # siblings at that level.
    text = (
        "00000000-ffffffff : a\n"
        "  00000000-0fffffff : b\n"
        "    00000000-00ffffff : c\n"
        "      00000000-000fffff : d\n"
        "        00000000-0000ffff : e\n"
        "          00000000-00000fff : f\n"
        "          00000000-000000ff : g\n"
    )
    res = list(walk(parse_iomem(text)))
    assert [(r.name, r.depth) for r in res][-2:] == [("f", 5), ("g", 5)]
    assert res[-1].parent is res[-3]


def test_trailing_newlines_are_fine():
    assert len(parse_iomem("00001000-00001fff : System RAM\n\n\n")) == 1
    assert parse_iomem("") == []


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("00001000-00001fff : System RAM\nhello\n", 2, "not 'START-END : NAME'"),
        ("00001000-00001fff : System RAM\n\n00002000-00002fff : x\n", 2, "not 'START-END"),
        ("00002000-00001fff : System RAM\n", 1, "after end"),
        ("00000000-ffffffff : a\n   00001000-00001fff : b\n", 2, "odd indentation"),
        ("00000000-ffffffff : a\n    00001000-00001fff : b\n", 2, "below no parent"),
        ("  00001000-00001fff : a\n", 1, "below no parent"),
        ("00001000-00001fff : a\n  00000000-00001fff : b\n", 2, "outside its parent"),
        ("00001000-00001fff System RAM\n", 1, "not 'START-END"),
        ("00001000-1ffffffffffffffff : System RAM\n", 1, "not 'START-END"),
        ("0x1000-0x1fff : System RAM\n", 1, "not 'START-END"),
        ("\t00001000-00001fff : System RAM\n", 1, "not 'START-END"),
    ],
)
def test_garbage_names_its_line(text, line, what):
    with pytest.raises(CollectorError) as info:
        parse_iomem(text)
    message = str(info.value)
    assert message.startswith(f"/proc/iomem line {line}: ")
    assert what in message
    assert "\n" not in message


def test_overlapping_ram_is_refused():
    text = "00100000-002fffff : System RAM\n00200000-003fffff : System RAM\n"
    with pytest.raises(CollectorError, match="overlap"):
        system_ram(parse_iomem(text))


# -- ranges -----------------------------------------------------------------------------


def test_range_arithmetic():
    r = Range(0x1000, 0x9FC00, "System RAM")
    assert r.size == 0x9EC00
    assert r.contains(0x1000) and r.contains(0x9FBFF) and not r.contains(0x9FC00)
    assert r.contains(Range(0x2000, 0x3000)) and not r.contains(Range(0x9F000, 0xA0000))
    assert r.intersect(Range(0x9F000, 0xA0000)) == Range(0x9F000, 0x9FC00)
    assert r.intersect(Range(0x9FC00, 0xA0000)) is None
    assert r.subtract([Range(0x2000, 0x3000), Range(0x0, 0x1800)]) == [
        Range(0x1800, 0x2000),
        Range(0x3000, 0x9FC00),
    ]
    assert str(r) == "0x1000-0x9fbff"
    assert Range(1, 2, "a") == Range(1, 2, "b")  # names take no part in comparisons
    with pytest.raises(ValueError):
        Range(2, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x1000-0x1fff", Range(0x1000, 0x2000)),
        ("0X1000-0X1FFF", Range(0x1000, 0x2000)),
        ("4096-8191", Range(0x1000, 0x2000)),
        ("0x100000+4M", Range(0x100000, 0x500000)),
        ("0x100000+4m", Range(0x100000, 0x500000)),
        ("0+4K", Range(0, 0x1000)),
        ("0x100000000+1G", Range(0x100000000, 0x140000000)),
        ("0x1000+0x800", Range(0x1000, 0x1800)),
        ("0xffffffffffff0000-0xffffffffffffffff", Range(0xFFFFFFFFFFFF0000, 1 << 64)),
        (" 0x1000 - 0x1fff ", Range(0x1000, 0x2000)),
    ],
)
def test_parse_range(text, expected):
    assert parse_range(text) == expected


def test_parse_range_keeps_a_name():
    r = parse_range("rom=0xf0000-0xfffff")
    assert (r.start, r.end, r.name) == (0xF0000, 0x100000, "rom")
    assert not r.is_ram
    assert parse_range("0x1000-0x1fff").is_ram


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("0x2000-0x1000", "end is below start"),
        ("abc", "expected START-END or START+SIZE"),
        ("0x1000", "expected START-END or START+SIZE"),
        ("0x1000+0", "size is zero"),
        ("0x1000+4Q", "is not a number"),
        ("0xg000-0x1fff", "is not a number"),
        ("0x-0x1fff", "is not a number"),
        ("=0x1000-0x1fff", "empty name"),
        ("0xffffffffffffffff+2", "beyond the 64-bit address space"),
        ("-5-7", "is not a number"),
    ],
)
def test_parse_range_errors_are_one_line(text, what):
    with pytest.raises(CollectorError) as info:
        parse_range(text)
    assert what in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


RAM = [Range(0x1000, 0x9FC00, "System RAM"), Range(0x100000, 0x600000, "System RAM")]


def test_include_inside_ram_adds_nothing():
    selected, excluded = apply_user_ranges(RAM, [Range(0x200000, 0x300000)], [])
    assert selected == RAM and excluded == []


def test_unnamed_include_outside_ram_is_refused():
    with pytest.raises(CollectorError) as info:
        apply_user_ranges(RAM, [Range(0xF0000, 0x100000)], [])
    assert "outside System RAM" in str(info.value) and "NAME=START-END" in str(info.value)
    assert info.value.exit_code == 2


def test_named_include_outside_ram_becomes_its_own_range():
    selected, _ = apply_user_ranges(RAM, [parse_range("rom=0xf0000-0x100fff")], [])
    assert selected == [RAM[0], Range(0xF0000, 0x100000), RAM[1]]
    assert [r.name for r in selected] == ["System RAM", "rom", "System RAM"]
    assert [r.is_ram for r in selected] == [True, False, True]


def test_overlapping_named_includes_are_refused():
    with pytest.raises(CollectorError, match="overlap"):
        apply_user_ranges(
            RAM, [parse_range("a=0xf0000-0xf1fff"), parse_range("b=0xf1000-0xf2fff")], []
        )


def test_exclusions_are_recorded_not_dropped():
    selected, excluded = apply_user_ranges(
        RAM, [], [Range(0x9F800, 0x100800), Range(0x300010, 0x300020), Range(0x700000, 0x800000)]
    )
    assert selected == RAM  # the LiME ranges do not change
    # Widened to whole pages, clipped to the selected ranges, never outside them.
    assert excluded == [
        Range(0x9F000, 0x9FC00),
        Range(0x100000, 0x101000),
        Range(0x300000, 0x301000),
    ]


def test_overlapping_exclusions_merge_within_a_range():
    _, excluded = apply_user_ranges(RAM, [], [Range(0x200000, 0x202000), Range(0x201000, 0x204000)])
    assert excluded == [Range(0x200000, 0x204000)]
