"""numpy views derived from BTF construct definitions agree with construct, field by field."""

from __future__ import annotations

import struct
from typing import Any

import construct
import numpy as np
import pytest

from collector.errors import ImageError
from collector.kernel.btf import BTF
from collector.kernel.bulk import bitfield, bulk_view, dtype_for
from collector.kernel.constructs import CBitField, CStruct, struct_definition
from collector.testing.btf_encoder import SAMPLE_SIZE, sample, sample_record

VMLINUX = "/sys/kernel/btf/vmlinux"


def _same(subcon: Any, value: Any, numpy_value: Any, path: str) -> None:
    """Compare one construct value with the numpy value of the same field."""
    if isinstance(subcon, CStruct):
        for f in subcon.fields:
            if isinstance(f, CBitField):
                continue  # checked through bitfield() on the whole array
            _same(f.subcon, value[f.name], numpy_value[f.name], f"{path}.{f.name}")
    elif isinstance(subcon, construct.Array):
        assert len(value) == len(numpy_value), path
        for i, v in enumerate(value):
            _same(subcon.subcon, v, numpy_value[i], f"{path}[{i}]")
    elif isinstance(subcon, construct.Bytes):
        # numpy's S type drops trailing NULs when it hands out an item
        assert value.rstrip(b"\0") == bytes(numpy_value), path
        assert len(value) == subcon.length
    else:
        assert value == numpy_value.item(), path


@pytest.mark.parametrize("endian", ["<", ">"])
def test_numpy_view_equals_construct_for_every_field(endian: str) -> None:
    btf = BTF.parse(sample(endian)[0])
    defn = struct_definition(btf, "sample")
    records = [sample_record(endian, salt)[0] for salt in range(5)]
    data = b"".join(records)
    view = bulk_view(data, defn, len(records))
    assert view.dtype.itemsize == SAMPLE_SIZE == defn.sizeof()
    for i, record in enumerate(records):
        parsed = defn.parse(record)
        _same(defn, parsed, view[i], "sample")
        for name in ("a", "b", "c", "e", "f"):
            assert bitfield(view, name)[i] == parsed[name], name
    # values derived by hand, not from either reader
    _, v3 = sample_record(endian, 3)
    assert view["flags"][3] == v3["flags"]
    assert view["compound_head"][3] == v3["next"] == view["lru"]["next"][3]
    assert bitfield(view, "b")[3] == v3["b"]
    assert bitfield(view, "f")[3] == v3["f"]
    assert view["matrix"][3].tolist() == v3["matrix"]
    assert view["comm"][3] == v3["comm"].rstrip(b"\0")


def test_dtype_offsets_follow_btf() -> None:
    btf = BTF.parse(sample()[0])
    dt = dtype_for(struct_definition(btf, "sample"))
    expected = {
        "flags": 0,
        "lru": 8,
        "compound_head": 8,
        "order": 16,
        "a": 24,
        "b": 24,
        "c": 24,
        "_refcount": 28,
        "matrix": 32,
        "comm": 56,
        "mode": 64,
        "e": 112,
        "f": 112,
        "word": 120,
        "data": 124,
    }
    assert {n: dt.fields[n][1] for n in expected} == expected
    assert dt.fields["matrix"][0].shape == (2, 3)
    assert dt.fields["comm"][0] == np.dtype("S8")
    assert dt.fields["a"][0] == np.dtype("<u4")
    assert dt.fields["e"][0] == np.dtype("<u8")
    assert dt.fields["ratio"][0] == np.dtype("<f8")
    assert dt.fields["minus"][0] == np.dtype("<i8")
    assert dt.fields["data"][0].shape == (0,)
    assert dtype_for(struct_definition(btf, "sample")) is dt


def test_packed_bitfield_in_a_three_byte_window() -> None:
    btf = BTF.parse(sample()[0])
    packed = struct_definition(btf, "packed3")
    raw = b"".join(
        (p << 6 | q << 18).to_bytes(3, "little") for p, q in [(0xABC, 9), (1, 15), (0xFFF, 0)]
    )
    view = bulk_view(raw, packed, 3)
    assert bitfield(view, "p").tolist() == [0xABC, 1, 0xFFF]
    assert bitfield(view, "q").tolist() == [9, 15, 0]


def test_bitfield_in_a_nested_struct_and_errors() -> None:
    btf = BTF.parse(sample()[0])
    outer = construct.Struct("inner" / struct_definition(btf, "oldbits"), "n" / construct.Int32ul)
    dt = dtype_for(outer)
    data = struct.pack("<II", 0b1011_00_10110_101, 7)
    view = np.frombuffer(data, dt)
    assert bitfield(view, "inner.y").tolist() == [-10]
    assert view["n"].tolist() == [7]
    with pytest.raises(TypeError, match="not a bitfield"):
        bitfield(view, "n")
    with pytest.raises(KeyError):
        bitfield(view, "inner.nope")


def test_bulk_view_checks_length() -> None:
    btf = BTF.parse(sample()[0])
    defn = struct_definition(btf, "sample")
    data = sample_record()[0] * 2
    assert len(bulk_view(data, defn, 2)) == 2
    assert len(bulk_view(data, defn, 1, offset=SAMPLE_SIZE)) == 1
    with pytest.raises(
        ImageError, match="3 records of 128 bytes at offset 0 need 384 bytes, only 256"
    ):
        bulk_view(data, defn, 3)
    with pytest.raises(ImageError, match="need 128 bytes, only 127"):
        bulk_view(data, defn, 1, offset=129)
    with pytest.raises(ImageError):
        bulk_view(data, defn, -1)
    view = bulk_view(bytearray(data), defn, 2)
    with pytest.raises(ValueError):
        view["flags"][0] = 1


def test_plain_construct_definitions_too() -> None:
    defn = construct.Struct(
        "a" / construct.Int16ub, construct.Padding(2), "b" / construct.Array(2, construct.Int32sl)
    )
    dt = dtype_for(defn)
    assert (dt.itemsize, dt.fields["a"][1], dt.fields["b"][1]) == (12, 0, 4)
    with pytest.raises(TypeError, match="no numpy equivalent"):
        dtype_for(construct.GreedyBytes)


def test_real_struct_page_dtype() -> None:
    try:
        with open(VMLINUX, "rb") as f:
            btf = BTF.parse(f.read())
    except OSError as e:
        pytest.skip(f"{VMLINUX} is not readable here: {e.strerror}")
    page = struct_definition(btf, "page")
    dt = dtype_for(page)
    # SIZE/OFFSET values of VMCOREINFO on a Debian 6.1 kernel; struct page
    # in include/linux/mm_types.h keeps them through 6.18.
    assert dt.itemsize == page.sizeof() == 64
    offsets = {
        n: dt.fields[n][1]
        for n in ("flags", "_refcount", "mapping", "lru", "_mapcount", "private", "compound_head")
    }
    assert offsets == {
        "flags": 0,
        "_refcount": 52,
        "mapping": 24,
        "lru": 8,
        "_mapcount": 48,
        "private": 40,
        "compound_head": 8,
    }
    # Three hand-made struct pages: a refcount, a mapping pointer and a tail page's head.
    data = bytearray(64 * 3)
    struct.pack_into("<i", data, 64 * 0 + 52, 1)
    struct.pack_into("<Q", data, 64 * 1 + 24, 0xFFFF888012345678)
    struct.pack_into("<Q", data, 64 * 2 + 8, 0xFFFFEA0000001001)
    view = bulk_view(bytes(data), page, 3)
    assert view["_refcount"]["counter"].tolist() == [1, 0, 0]  # atomic_t is struct { int counter; }
    assert view["mapping"].tolist() == [0, 0xFFFF888012345678, 0]
    assert view["compound_head"].tolist() == [0, 0, 0xFFFFEA0000001001]
    for i in range(3):
        parsed = page.parse(bytes(data[64 * i : 64 * i + 64]))
        _same(page, parsed, view[i], "page")
