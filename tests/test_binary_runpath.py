"""tools.binary.drop_runpath: RPATH and RUNPATH leave the dynamic table, nothing else moves."""

from __future__ import annotations

import ctypes
import struct
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tools.binary import drop_runpath

DT_NULL, DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 14, 15, 29


def tiny_elf(entries: list[tuple[int, int]]) -> tuple[bytes, int]:
    """A 64-bit little-endian ELF with one PT_DYNAMIC segment holding ``entries``; the
    table's offset."""
    phoff, dynoff = 64, 64 + 56
    table = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 2, 6, dynoff, dynoff, dynoff, len(table), len(table), 8)
    return header + phdr + table + b"trailing bytes", dynoff


def test_the_tags_go_and_later_entries_move_up():
    data, dynoff = tiny_elf(
        [(DT_NEEDED, 1), (DT_RUNPATH, 5), (DT_SONAME, 9), (DT_RPATH, 7), (DT_NULL, 0)]
    )
    patched = drop_runpath(data)
    assert patched is not None and len(patched) == len(data)
    assert patched[:dynoff] == data[:dynoff] and patched.endswith(b"trailing bytes")
    table = patched[dynoff : dynoff + 5 * 16]
    assert list(struct.iter_unpack("<qQ", table)) == [
        (DT_NEEDED, 1),
        (DT_SONAME, 9),
        (DT_NULL, 0),
        (DT_NULL, 0),
        (DT_NULL, 0),
    ]


def test_nothing_to_drop_or_not_an_elf():
    data, _ = tiny_elf([(DT_NEEDED, 1), (DT_NULL, 0)])
    assert drop_runpath(data) is None
    assert drop_runpath(b"#!/bin/sh\n" + bytes(100)) is None


def test_a_real_extension_module_loses_its_runpath_and_still_loads(tmp_path):
    # An interpreter built under a prefix (pyenv) gives its extension modules a RUNPATH.
    lib_dynload = Path(sysconfig.get_path("platstdlib")) / "lib-dynload"
    module = next(lib_dynload.glob("_struct.*.so"), None)
    if module is None or "PATH)" not in _dynamic(module):
        pytest.skip("this interpreter's extension modules carry no RPATH/RUNPATH")
    copy = tmp_path / module.name
    copy.write_bytes(drop_runpath(module.read_bytes()) or b"")
    assert "PATH)" not in _dynamic(copy)
    assert _dynamic(copy).count("(NEEDED)") == _dynamic(module).count("(NEEDED)")
    ctypes.CDLL(str(copy))


def _dynamic(path: Path) -> str:
    return subprocess.run(
        ["readelf", "-d", str(path)], capture_output=True, text=True, check=True
    ).stdout
