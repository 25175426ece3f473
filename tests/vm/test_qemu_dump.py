"""Images other tools make: QEMU's dump-guest-memory of a real Linux guest opens as an image,
holds the bytes QEMU itself reports, and analyses like a native capture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from collector.image.elfcore import ElfCore
from collector.image.open import open_image
from collector.image.reader import NativeImage
from tests.vm.conftest import Capture, iomem_entries

pytestmark = pytest.mark.vm


def collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=300
    )


def test_qemu_dump_is_an_image(capture: Capture) -> None:
    guest = capture.guest
    out = guest.out_dir / "dump"
    out.mkdir(exist_ok=True)
    low = 16 << 20
    (code_start, code_end), *_ = iomem_entries(capture.iomem, "Kernel code")
    guest.qmp.stop()  # dump and pmemsave must see the same memory
    try:
        dump = guest.qmp.dump_guest_memory(out / "guest.elf")
        guest.qmp.pmemsave(0, low, out / "low.bin")
        guest.qmp.pmemsave(code_start, code_end - code_start, out / "code.bin")
    finally:
        guest.qmp.cont()
    assert guest.alive()

    with ElfCore(dump) as core:
        assert core.problems == []
        ram = iomem_entries(capture.iomem, "System RAM")
        for start, end in ram:  # every byte of System RAM is in the dump
            assert any(s <= start and end <= e for s, e in core.ranges()), (start, end)
        expected = (out / "low.bin").read_bytes()
        for start, end in ram:
            if start < low:
                end = min(end, low)
                assert core.read(start, end - start) == expected[start:end]
        assert core.read(code_start, code_end - code_start) == (out / "code.bin").read_bytes()
        # QEMU writes the guest's VMCOREINFO note (-device vmcoreinfo, qemu_fw_cfg loaded):
        # the same text the capture took from /proc/kcore in the same boot.
        with NativeImage(capture.image) as img:
            assert core.blob("vmcoreinfo") == img.blob("vmcoreinfo")
    with open_image(dump) as sniffed:
        assert type(sniffed) is ElfCore

    info = collect("info", str(dump), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["format"] == "elf-core"
    # No BTF and no kallsyms travel in a QEMU dump: kallsyms is decoded from memory through
    # VMCOREINFO, and BTF read from the kernel's .BTF section it locates.
    result = collect("analyze", str(dump), "sysinfo", "--format", "json")
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    uname = capture.fact("uname-a").decode().split()
    assert (record["sysname"], record["nodename"], record["release"]) == tuple(uname[:3])
    native = collect("analyze", str(capture.image), "sysinfo", "--format", "json")
    (native_record,) = json.loads(native.stdout)
    for field in ("version", "machine", "build_id", "kerneloffset", "phys_base", "paging_mode"):
        assert record[field] == native_record[field], field
