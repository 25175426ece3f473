"""Images from other tools, analysed like native ones: the capture exported to LiME (which
carries no blobs: no BTF, no kallsyms, no VMCOREINFO, no meminfo) and rewritten as AVML
writes it, against the native image and the guest's own files."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.analyze import analyze_kernel
from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from collector.memory import PhysicalMemory
from tests.image.avml_writer import write_avml_like
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm

#: Fields only a native image can fill: they come from what the capture recorded beside
#: memory (the header's start time, /proc/modules), which LiME and AVML files do not carry.
NATIVE_ONLY = {
    "sysinfo": {"capture_time", "notes"},
    "lsmod": {"proc_modules"},
    "pslist": set(),
    "dmesg": set(),
    "maps": set(),
}


def collect(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "collector", *argv], capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.fixture(scope="module")
def lime(capture: Capture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("foreign") / "export.lime"
    collect("export", str(capture.image), "--to", "lime", "-o", str(path))
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def avml(lime: Path) -> Iterator[Path]:
    pytest.importorskip("cramjam", reason="the avml extra (cramjam) is not installed")
    path = lime.with_suffix(".avml")
    with open_image(lime) as memory, path.open("wb") as out:
        write_avml_like(memory.ranges(), memory.read, out)
    yield path
    path.unlink()


def guest_symbol(capture: Capture, name: str) -> int:
    """The address the guest's own /proc/kallsyms gives ``name``."""
    found = re.search(
        rb"^([0-9a-f]{16}) \w " + name.encode() + rb"$", capture.fact("kallsyms"), re.M
    )
    assert found is not None, name
    return int(found.group(1), 16)


def test_a_lime_export_carries_no_metadata(lime: Path) -> None:
    with open_image(lime) as memory:
        assert memory.metadata == {"format": "lime"}
        for name in (
            "btf",
            "cpuinfo",
            "iomem",
            "kallsyms",
            "kcore-phdrs",
            "meminfo",
            "modules",
            "vmcoreinfo",
        ):
            assert memory.blob(name) is None


def test_btf_recovered_from_memory_is_the_guests_own(capture: Capture, lime: Path) -> None:
    with open_image(lime) as memory:
        kernel = Kernel(memory)
        started = time.perf_counter()
        symbols = kernel.symbols
        decoded = time.perf_counter()
        btf = kernel.btf
        recovered = time.perf_counter()
        print(
            f"kallsyms decoded in {decoded - started:.2f} s, BTF recovered in"
            f" {recovered - decoded:.3f} s"
        )
        guest_btf = capture.fact("btf")  # /sys/kernel/btf/vmlinux in the guest
        assert btf._data == guest_btf
        start = guest_symbol(capture, "__start_BTF")
        assert guest_symbol(capture, "__stop_BTF") - start == len(guest_btf)
        assert kernel.sources["btf"] == (
            f"recovered from memory at {start:#x} ({len(guest_btf)} bytes, __start_BTF..__stop_BTF)"
        )
        assert symbols.source == "decoded from memory + vmcoreinfo"
        assert kernel.sources["kallsyms"].startswith("decoded from memory (")
        # VMCOREINFO found by a scan is the text of the note /sys/kernel/vmcoreinfo names.
        note = int(capture.fact("vmcoreinfo-location").split()[0], 16)
        found = kernel.vmcoreinfo.paddr
        assert kernel.sources["vmcoreinfo"] == f"found in memory at physical {found:#x}"
        text = memory.read(note + 24, 1024).split(b"\0", 1)[0]
        assert memory.read(found, len(text)) == text


def records(memory: PhysicalMemory, name: str) -> list[dict]:
    result = analyze_kernel(Kernel(memory), name)
    assert result.error is None, result.error
    return [{k: v for k, v in r.items() if k not in NATIVE_ONLY[name]} for r in result.records]


@pytest.mark.parametrize("name", sorted(NATIVE_ONLY))
def test_analyses_of_the_lime_export_match_the_native_image(
    capture: Capture, lime: Path, name: str
) -> None:
    with open_image(capture.image) as native, open_image(lime) as other:
        expected = records(native, name)
        assert expected  # a record set to compare, not two empty ones
        assert records(other, name) == expected


def test_sysinfo_of_the_lime_export_says_why_a_field_is_empty(capture: Capture, lime: Path) -> None:
    with open_image(lime) as memory:
        [record] = analyze_kernel(Kernel(memory), "sysinfo").records
    assert [k for k, v in record.items() if v is None] == ["capture_time"]
    btf = capture.fact("btf")
    assert record["notes"] == (
        "capture_time: the lime format records no capture start time; BTF recovered from"
        f" memory at {guest_symbol(capture, '__start_BTF'):#x} ({len(btf)} bytes,"
        " __start_BTF..__stop_BTF): no blob 'btf'"
    )
    # MemTotal of the guest's /proc/meminfo, from totalram_pages in memory.
    meminfo = capture.before["memory"]["meminfo"]
    kib = int(re.search(r"^MemTotal:\s+(\d+) kB$", meminfo, re.M).group(1))
    assert record["mem_total"] == kib * 1024
    assert record["release"] == capture.fact("uname-r").decode().strip()


@pytest.mark.parametrize("name", ["sysinfo", "pslist", "lsmod", "dmesg"])
def test_analyses_of_an_avml_file_match_the_lime_export(lime: Path, avml: Path, name: str) -> None:
    with open_image(lime) as plain, open_image(avml) as compressed:
        expected = records(plain, name)
        got = records(compressed, name)
    if name == "sysinfo":
        # AVML leaves out 16 MiB blocks of zeros, so its ranges cover less.
        for record in (expected[0], got[0]):
            del record["range_bytes"]
    assert got == expected


def test_collect_info_says_where_the_metadata_came_from(
    capture: Capture, lime: Path, avml: Path
) -> None:
    btf = capture.fact("btf")
    start = guest_symbol(capture, "__start_BTF")
    for path in (lime, avml):
        lines = collect("info", str(path)).splitlines()
        print("\n".join(line for line in lines if not line.startswith("range:")))
        assert lines[-4] == "blobs:    none"
        assert lines[-3].startswith("vmcoreinfo: found in memory at physical 0x")
        assert lines[-2].startswith("kallsyms:   decoded from memory (")
        assert lines[-1] == (
            f"btf:        recovered from memory at {start:#x} ({len(btf)} bytes,"
            " __start_BTF..__stop_BTF)"
        )
