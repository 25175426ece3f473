"""Exports of real captures, against the guest's own /proc/iomem, /proc/kallsyms, uname and
QEMU's pmemsave of its kernel code, and read by drgn and gdb: the ELF export is a kernel core
those tools recognise (also when made from a LiME file, which carries no VMCOREINFO of its
own), its kernel PT_LOAD is where the guest put the kernel, and LiME and ELF exports give
every captured page back as the image holds it."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from collector.cli import main
from collector.image.elfcore import ElfCore
from collector.image.lime import LimeImage
from collector.image.reader import NativeImage
from collector.memory import Fate
from tests.vm.conftest import Capture, iomem_entries

pytestmark = pytest.mark.vm

drgn = pytest.importorskip("drgn")

#: __NEW_UTS_LEN + 1 (include/uapi/linux/utsname.h): each field of struct new_utsname.
UTS_FIELD = 65
PT_LOAD, PT_NOTE = 1, 4
START_KERNEL_MAP = 0xFFFFFFFF80000000


def export(image: Path, fmt: str, out: Path) -> Path:
    assert main(["export", str(image), "--to", fmt, "-o", str(out)]) == 0
    return out


def phdrs(path: Path) -> list[tuple]:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    (e_phoff,) = struct.unpack_from("<Q", head, 32)
    (e_phnum,) = struct.unpack_from("<H", head, 56)
    return [struct.unpack_from("<IIQQQQQQ", head, e_phoff + 56 * i) for i in range(e_phnum)]


def kallsyms_address(capture: Capture, name: str) -> int:
    m = re.search(rf"^([0-9a-f]+) \w {re.escape(name)}$", capture.fact("kallsyms").decode(), re.M)
    assert m, name
    return int(m.group(1), 16)


def check_kernel_core(capture: Capture, path: Path, source: str) -> None:
    """The kernel PT_LOAD sits where the guest's iomem and kallsyms say; gdb and drgn read
    the guest's kernel code through it, as QEMU saw it; drgn takes the file for a kernel."""
    text = kallsyms_address(capture, "_text")
    (code, _), *_ = iomem_entries(capture.iomem, "Kernel code")
    (_, bss_end), *_ = iomem_entries(capture.iomem, "Kernel bss")
    kernel = [p for p in phdrs(path) if p[0] == PT_LOAD and p[3] >= START_KERNEL_MAP]
    assert len(kernel) == 1, kernel
    _, _, _, vaddr, paddr, filesz, memsz, _ = kernel[0]
    assert (vaddr, paddr) == (text, code)
    if source == "iomem":  # the "Kernel code" .. "Kernel bss" lines, as kexec-tools does
        assert filesz == memsz == bss_end - code
    else:  # the page tables: _text to _end rounded up to 2 MiB (cleanup_highmap())
        end = kallsyms_address(capture, "_end")
        assert filesz == memsz == -(-(end - text) // (2 << 20)) * (2 << 20)
    start, end, qemu_code = capture.qemu["Kernel code"]
    assert start == code
    core = ElfCore(path)
    try:
        assert core.read_virtual(text, len(qemu_code)) == qemu_code
        info = core.blob("vmcoreinfo").decode()
    finally:
        core.close()

    prog = drgn.Program()
    prog.set_core_dump(str(path))
    assert drgn.ProgramFlags.IS_LINUX_KERNEL in prog.flags
    assert prog.read(text, 4096) == qemu_code[:4096]
    uts = int(re.search(r"^SYMBOL\(init_uts_ns\)=([0-9a-f]+)$", info, re.M).group(1), 16)
    name = int(re.search(r"^OFFSET\(uts_namespace\.name\)=(\d+)$", info, re.M).group(1))
    release = prog.read(uts + name + 2 * UTS_FIELD, UTS_FIELD).split(b"\0")[0]
    assert release == capture.fact("uname-r").strip()

    dump = path.with_suffix(".gdb")
    gdb = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", f"core-file {path}",
         "-ex", f"dump binary memory {dump} {text:#x} {text + 4096:#x}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gdb.returncode == 0, gdb.stderr
    assert dump.read_bytes() == qemu_code[:4096]


def test_elf_export_is_a_kernel_core(capture: Capture, tmp_path: Path) -> None:
    elf = export(capture.image, "elf", tmp_path / "native.elf")
    check_kernel_core(capture, elf, "iomem")
    with NativeImage(capture.image) as img, ElfCore(elf) as core:
        assert core.problems == []
        for blob in ("vmcoreinfo", "btf", "kallsyms"):
            assert core.blob(blob) == img.blob(blob), blob
        assert core.blob("btf") == capture.fact("btf")


def test_lime_export_to_elf_carries_vmcoreinfo(capture: Capture, tmp_path: Path) -> None:
    lime = export(capture.image, "lime", tmp_path / "m.lime")
    elf = export(lime, "elf", tmp_path / "from-lime.elf")
    notes = [p for p in phdrs(elf) if p[0] == PT_NOTE]
    assert len(notes) == 1
    with NativeImage(capture.image) as img, ElfCore(elf) as core:
        assert core.blob("vmcoreinfo") == img.blob("vmcoreinfo").rstrip(b"\0")
        assert core.blob("btf") is None  # a LiME file has no blobs to carry
    check_kernel_core(capture, elf, "page tables")


@pytest.mark.parametrize("fmt", ["lime", "elf"])
def test_round_trip_gives_every_captured_page_back(
    capture: Capture, fmt: str, tmp_path: Path
) -> None:
    out = export(capture.image, fmt, tmp_path / f"rt.{fmt}")
    step = 4 << 20
    with NativeImage(capture.image) as img:
        back = LimeImage(out) if fmt == "lime" else ElfCore(out)
        try:
            assert back.ranges() == img.ranges()
            for start, end in img.readable_ranges():
                for at in range(start, end, step):
                    n = min(step, end - at)
                    assert back.read(at, n) == img.read(at, n), hex(at)
            for run in img.fate_runs():
                page = run.start
                if fmt == "lime":
                    assert back.read(page, 1) == b"\0"
                else:
                    assert back.fate(page).fate == run.fate != Fate.READ
        finally:
            back.close()
