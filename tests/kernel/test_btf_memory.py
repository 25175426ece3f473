"""BTF read from the kernel's .BTF section in memory when an image carries no btf blob."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from collector.cli import main
from collector.errors import ImageError, NotApplicable
from collector.image.export import export_lime
from collector.kernel.btf_memory import MAX_BTF_BYTES, check_btf_header, find_btf_in_memory
from collector.kernel.symbols import Symbol, SymbolTable
from collector.memory import Fate
from collector.testing import SyntheticKernel
from collector.testing.kernel import START_KERNEL_MAP

DECLS = """
struct list_head { struct list_head *next, *prev; };
struct task_struct { int pid; char comm[16]; struct list_head tasks; };
"""


def image_with_btf_in_rodata(blob: bytes | None = None, stop_pad: int = 0):
    """A synthetic kernel whose BTF lies between __start_BTF and __stop_BTF, without a blob.

    Returns the kernel builder, the section's address and the bytes placed there.
    """
    sk = SyntheticKernel(DECLS)
    data = sk.btf if blob is None else blob
    start = sk.global_("__start_BTF", "char", len(data) + stop_pad)
    sk.write(start, data)
    sk.symbol("__stop_BTF", start + len(data) + stop_pad, "R")
    sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    sk.blobs["btf"] = None  # what a LiME file or an ELF core gives: no blobs at all
    return sk, start, data


def test_btf_is_read_from_memory_when_the_image_has_no_blob() -> None:
    sk, start, data = image_with_btf_in_rodata()
    kernel = sk.kernel()
    task = kernel.variable("init_task")
    assert (task.pid.value(), task.comm.string()) == (0, b"swapper/0")
    # The recovered BTF is the section byte for byte, used exactly as a blob would be.
    assert kernel.btf.offsetof("task_struct", "tasks") == 24
    assert kernel.btf._data == data
    where = f"memory at {start:#x} ({len(data)} bytes, __start_BTF..__stop_BTF)"
    assert kernel.sources["btf"] == f"recovered from {where}"
    assert kernel.notes == [f"BTF recovered from {where}: no blob 'btf'"]


def test_a_blob_wins_and_a_broken_blob_falls_back_to_memory() -> None:
    sk, start, data = image_with_btf_in_rodata()
    sk.blobs["btf"] = data
    kernel = sk.kernel()
    assert kernel.btf._data == data
    assert kernel.sources["btf"] == "blob btf"
    assert kernel.notes == []

    sk.blobs["btf"] = b"\x9f\xeb\x02\x00" + data[4:]
    kernel = sk.kernel()
    assert kernel.btf._data == data
    assert kernel.notes == [
        f"BTF recovered from memory at {start:#x} ({len(data)} bytes, __start_BTF..__stop_BTF):"
        " blob 'btf' unusable (BTF: unsupported version 2)"
    ]


def header(data: bytes, **fields: int) -> bytes:
    """``data`` with struct btf_header fields replaced."""
    names = ("magic", "version", "flags", "hdr_len", "type_off", "type_len", "str_off", "str_len")
    values = dict(zip(names, struct.unpack_from("<HBBIIIII", data), strict=True))
    values.update(fields)
    return struct.pack("<HBBIIIII", *values.values()) + data[24:]


def test_check_btf_header_accepts_the_kernels_own_layout() -> None:
    sk = SyntheticKernel(DECLS)
    assert check_btf_header(sk.btf, len(sk.btf)) == 24
    # Big-endian BTF (s390x, ppc64 kernels) has the magic the other way round.
    _, type_len, _, str_len = struct.unpack_from("<IIII", sk.btf, 8)
    big = struct.pack(">HBBIIIII", 0xEB9F, 1, 0, 24, 0, type_len, type_len, str_len)
    assert check_btf_header(big, 24 + type_len + str_len) == 24


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"magic": 0x1234}, "bad magic 3412 (expected 0xeB9F)"),
        ({"version": 2}, "unsupported version 2"),
        ({"hdr_len": 16}, "header length 16 is not within 24..{size}"),
        ({"hdr_len": 5000}, "header length 5000 is not within 24..{size}"),
        ({"type_len": 1 << 20}, "type section 0+1048576 exceeds the {body} bytes after the header"),
        ({"str_off": 1 << 31}, "string section 2147483648+{str_len} exceeds the {body} bytes"),
        ({"str_off": 0}, "type and string sections overlap"),
        ({"str_len": 1}, "header and sections (24+{type_len}+1 bytes) do not fill the {size}"),
    ],
)
def test_check_btf_header_refuses_what_the_kernel_refuses(change: dict, message: str) -> None:
    data = SyntheticKernel(DECLS).btf
    size = len(data)
    _, type_len, _, str_len = struct.unpack_from("<IIII", data, 8)
    expected = message.format(size=size, body=size - 24, type_len=type_len, str_len=str_len)
    with pytest.raises(ImageError) as e:
        check_btf_header(header(data, **change), size)
    assert str(e.value).startswith("BTF in memory: " + expected)


def test_a_broken_section_in_memory_says_where_it_looked() -> None:
    data = SyntheticKernel(DECLS).btf
    sk, start, _ = image_with_btf_in_rodata(header(data, version=7))
    with pytest.raises(NotApplicable) as e:
        _ = sk.kernel().btf
    assert str(e.value) == (
        "the image carries no usable BTF: no blob 'btf', and none recovered from memory:"
        f" BTF section at {start:#x} ({len(data)} bytes): BTF in memory: unsupported version 7"
    )


def test_padding_after_the_sections_is_refused() -> None:
    # btf_check_sec_info() refuses a .BTF section the header does not cover exactly.
    sk, _, data = image_with_btf_in_rodata(stop_pad=8)
    with pytest.raises(NotApplicable) as e:
        _ = sk.kernel().btf
    assert f"do not fill the {len(data) + 8} bytes between __start_BTF and __stop_BTF" in str(
        e.value
    )


def test_a_string_section_that_does_not_start_with_nul_fails_the_full_parse() -> None:
    data = bytearray(SyntheticKernel(DECLS).btf)
    str_off = struct.unpack_from("<I", data, 16)[0]
    data[24 + str_off] = ord("x")
    sk, start, _ = image_with_btf_in_rodata(bytes(data))
    with pytest.raises(NotApplicable) as e:
        _ = sk.kernel().btf
    assert str(e.value).endswith(
        f"BTF section at {start:#x} ({len(data)} bytes) does not parse:"
        " BTF: string section must start and end with a NUL byte"
    )


def test_a_section_page_not_captured_is_named() -> None:
    sk, start, data = image_with_btf_in_rodata()
    sk.drop(start)
    with pytest.raises(NotApplicable) as e:
        _ = sk.kernel().btf
    paddr = start - START_KERNEL_MAP
    assert str(e.value).endswith(
        f"BTF section at {start:#x} ({len(data)} bytes): physical page"
        f" {paddr - paddr % 4096:#x} was not captured: {Fate.EXCLUDED.label}"
    )


def test_without_the_symbols_nothing_is_read() -> None:
    reads: list[tuple[int, int]] = []

    def read_virt(vaddr: int, size: int) -> bytes:
        reads.append((vaddr, size))
        return bytes(size)

    table = SymbolTable([Symbol("_stext", 0xFFFFFFFF81000000, "T")], "kallsyms text")
    with pytest.raises(ImageError) as e:
        find_btf_in_memory(read_virt, table)
    assert str(e.value) == "the kernel symbols (kallsyms text) have no __start_BTF and __stop_BTF"
    # A span no kernel has (a misread table) is refused before any read.
    start = 0xFFFFFFFF82000000
    table = SymbolTable(
        [Symbol("__start_BTF", start, "R"), Symbol("__stop_BTF", start + MAX_BTF_BYTES + 1, "R")],
        "decoded from memory",
    )
    with pytest.raises(ImageError) as e:
        find_btf_in_memory(read_virt, table)
    assert str(e.value) == (
        f"__start_BTF {start:#x} .. __stop_BTF {start + MAX_BTF_BYTES + 1:#x} spans"
        f" {MAX_BTF_BYTES + 1} bytes: not a BTF section (expected 24..{MAX_BTF_BYTES})"
    )
    assert reads == []


def test_collect_info_on_a_lime_file_says_where_kernel_metadata_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sk, start, data = image_with_btf_in_rodata()
    # This made-up kernel has no kallsyms tables to decode, so VMCOREINFO itself names the
    # section; real kernels' kallsyms (decoded from memory) does (tests/vm).
    sk.vmcoreinfo_extra += [
        f"SYMBOL(__start_BTF)={start:x}",
        f"SYMBOL(__stop_BTF)={start + len(data):x}",
    ]
    text = sk.vmcoreinfo().encode()
    note = sk.global_("vmcoreinfo_data", "char", len(text) + 1)
    sk.write(note, text)
    path = tmp_path / "m.lime"
    with path.open("wb") as out:
        export_lime(sk.memory(), out)
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4:] == [
        "blobs:    none",
        f"vmcoreinfo: found in memory at physical {note - START_KERNEL_MAP:#x}",
        "kallsyms:   VMCOREINFO SYMBOL() entries only",
        f"btf:        recovered from memory at {start:#x} ({len(data)} bytes,"
        " __start_BTF..__stop_BTF)",
    ]
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kernel_metadata"]["btf"] == lines[-1].split(None, 1)[1]
